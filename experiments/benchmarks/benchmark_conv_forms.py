r"""The convolution's formulation, shape by shape: XLA's convolution against
patches and matrix products, forward and backward, on this machine.

  python -m experiments.benchmarks.benchmark_conv_forms  # both networks
  python -m experiments.benchmarks.benchmark_conv_forms --networks=protocol --repeats=3

For every convolution shape of the CIFAR ResNet-18 at width 64 on 32x32
(the peer benchmark's, 256 views) and at width 16 on 16x16 (the CPU
protocol's, 512 views), times one forward and backward pass (gradients
for the input and the kernel of `sum(conv(x, k) * g)`, the batch sharded
over the CPU devices as training shards it) in each formulation of
`cdg_jax.gating.ops.CONV_FORMULATIONS`, the formulations in turn within
each repeat. Reports the median per formulation, the speed-up over XLA's
convolution and the largest difference of the outputs and gradients from
it, relative to their largest magnitude. Each run writes a new record into
`--out` (`results/conv_forms/<date>-<cpu>.json`, `records.py`: machine,
devices, XLA flags, versions, command and date in its header) and its
Markdown beside it.
"""

import os
import statistics
import time

from absl import app
from absl import flags

from experiments.common import records
from experiments.common.conv_shapes import NETWORKS
from experiments.common.conv_shapes import resnet18_shapes
from experiments.common.repo import REPO_ROOT

flags.DEFINE_list('networks', ['wide', 'protocol'],
                  "'wide': width 64, 32x32, 256 views; 'protocol': width "
                  "16, 16x16, 512 views.")
flags.DEFINE_integer('repeats', 5, 'Timed passes per formulation and shape.')
flags.DEFINE_integer('cpu_devices', 0, 'CPU devices (0: one per core).')
flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                        'conv_forms'),
                    'Folder of the records: each run writes a new '
                    '<date>-<cpu>.json (records.py) and its .md.')
FLAGS = flags.FLAGS

def time_shape(shape: dict, mesh, repeats: int) -> dict:
  """Median seconds and differences from XLA's convolution, per
  formulation, for one shape."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import ops  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n, s, cin, cout, k, stride = (shape['batch'], shape['size'],
                                shape['channels_in'], shape['channels_out'],
                                shape['kernel'], shape['stride'])
  x = jax.device_put(rng.standard_normal((n, s, s, cin), np.float32),
                     parallel.data_sharding(mesh))
  kernel = jax.device_put(
      rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin),
      parallel.replicated(mesh))
  out_size = -(-s // stride)
  g = jax.device_put(rng.standard_normal((n, out_size, out_size, cout),
                                         np.float32),
                     parallel.data_sharding(mesh))
  passes = {}
  for form in ops.CONV_FORMULATIONS:
    def loss(x, kernel, g, form=form):
      return jnp.sum(ops.conv(x, kernel, (stride, stride), 'SAME',
                              formulation=form) * g)
    passes[form] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  outputs = {form: jax.block_until_ready(f(x, kernel, g))
             for form, f in passes.items()}
  reference = jax.tree_util.tree_leaves(outputs['xla'])
  times = {form: [] for form in passes}
  for _ in range(repeats):
    for form, f in passes.items():
      start = time.perf_counter()
      jax.block_until_ready(f(x, kernel, g))
      times[form].append(time.perf_counter() - start)
  result = {}
  for form in passes:
    leaves = jax.tree_util.tree_leaves(outputs[form])
    difference = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                     for a, b in zip(leaves, reference))
    result[form] = {'median_s': statistics.median(times[form]),
                    'relative_difference': difference}
  for form in passes:
    result[form]['speedup'] = (result['xla']['median_s']
                               / result[form]['median_s'])
  return result


def write_report(result: dict, out: str, devices: dict | None = None) -> str:
  """Writes a new record of `result` into `out`, its Markdown beside it;
  returns the record's path."""
  return records.write_record(out, 'conv_forms', result, render=render,
                              devices=devices)


def render(result: dict) -> str:
  """The Markdown of a conv_forms record."""
  forms = result['formulations']
  lines = ['# The convolution\'s formulation, shape by shape', '',
           *records.header_lines(result),
           '- the batch sharded over the devices', '',
           'Forward and backward (input and kernel gradients) of one '
           'convolution; median of '
           f"{result['repeats']} passes, formulations in turn; speed-up over "
           "'xla'; difference: largest over output and gradients, relative "
           'to their largest magnitude.', '',
           '| network | shape (N, size, Cin->Cout, k, stride) x layers | '
           + ' | '.join(f'{f} ms (speed-up, difference)' for f in forms)
           + ' |', '| --- | --- |' + ' --- |' * len(forms)]
  totals = {}
  for row in result['rows']:
    shape = row['shape']
    cells = []
    for form in forms:
      r = row['times'][form]
      totals.setdefault(row['network'], {}).setdefault(form, 0.0)
      totals[row['network']][form] += r['median_s'] * shape['layers']
      cells.append(f"{1e3 * r['median_s']:.1f} ({r['speedup']:.2f}x, "
                   f"{r['relative_difference']:.0e})")
    lines.append(
        f"| {row['network']} | {shape['batch']}, {shape['size']}, "
        f"{shape['channels_in']}->{shape['channels_out']}, "
        f"{shape['kernel']}, {shape['stride']} x {shape['layers']} | "
        + ' | '.join(cells) + ' |')
  lines += ['', 'All layers of each network (time x layers, summed):', '']
  for network, by_form in totals.items():
    lines.append(f'- {network}: ' + ', '.join(
        f"{f} {1e3 * t:.0f} ms ({by_form['xla'] / t:.2f}x)"
        for f, t in by_form.items()))
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = set(FLAGS.networks) - set(NETWORKS)
  if unknown:
    raise app.UsageError(f'Unknown networks {sorted(unknown)}; expected '
                         f'{sorted(NETWORKS)}.')
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu(FLAGS.cpu_devices)   # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import ops  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  rows = []
  for network in FLAGS.networks:
    for shape in resnet18_shapes(*NETWORKS[network]):
      times = time_shape(shape, mesh, FLAGS.repeats)
      rows.append({'network': network, 'shape': shape, 'times': times})
      print(network, shape, {f: round(t['speedup'], 2)
                             for f, t in times.items()}, flush=True)
  result = {'flags': {'networks': FLAGS.networks,
                      'cpu_devices': FLAGS.cpu_devices},
            'repeats': FLAGS.repeats,
            'formulations': list(ops.CONV_FORMULATIONS), 'rows': rows}
  devices = {'platform': jax.default_backend(),
             'count': int(mesh.devices.size),
             'processes': jax.process_count(),
             'kind': jax.devices()[0].device_kind}
  path = write_report(result, FLAGS.out, devices)
  records.print_record(path)


if __name__ == '__main__':
  app.run(main)
