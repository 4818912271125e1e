r"""Where XLA:CPU's convolution backward spends its time: the kernel gradient
against the transposes that lay its operands out, shape by shape.

  python -m experiments.benchmarks.benchmark_weight_gradient
  python -m experiments.benchmarks.benchmark_weight_gradient --network=protocol --repeats=3

XLA:CPU computes the kernel gradient of a NHWC convolution as another
convolution whose input is the layer's input batch-minor (CHWN) and whose
kernel is the output gradient HWNC; it transposes both operands first, and
fuses into the first transpose whatever produced the input (in a ResNet the
previous layer's BatchNorm and ReLU, which a profile then counts as
BatchNorm: `profile_step.py`'s 'convolution operand layouts').

For each stride-1 3x3 convolution of the CIFAR ResNet-18 (`--network`, as
`benchmark_conv_forms.py` has them; the batch sharded over the CPU devices as
training shards it) this times, in turn within each repeat:

  forward           conv(x, k)
  input gradient    the vjp of conv for x alone
  kernel gradient   the vjp of conv for k alone (XLA's, transposes included)
  kernel gradient from laid-out operands
                    the same convolution XLA runs, on operands already
                    CHWN / HWNC (checked equal to the kernel gradient)
  input to CHWN     the transpose of x XLA puts before it
  gradient to HWNC  the transpose of the output gradient
  copy              x + 1, what moving the bytes of x once costs

and two formulations of the kernel gradient that avoid the batch-minor
transpose (each checked against XLA's):

  images stacked    the padded images stacked into one tall image, x as
                    channel-major (C, N(H+2)+2, W+2, 1) (a 2-D transpose)
                    and the gradient as a kernel (N(H+2), W, 1, C_out) (a
                    reshape): one convolution with one input feature
  nine matrix products
                    one (C_in x NHW) @ (NHW x C_out) product per kernel
                    position, on shifted slices of channel-major x

Each run writes a new record into `--out`
(`results/weight_gradient/<date>-<cpu>.json`, `records.py`: machine,
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


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: the
  other benchmarks a test process imports define 'repeats' and 'out' too."""
  flags.DEFINE_enum('network', 'wide', sorted(NETWORKS),
                    "'wide': width 64, 32x32, 256 views; 'protocol': "
                    'width 16, 16x16, 512 views.')
  flags.DEFINE_integer('repeats', 7, 'Timed runs per part and shape.')
  flags.DEFINE_integer('cpu_devices', 0, 'CPU devices (0: one per core).')
  flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments',
                                          'results', 'weight_gradient'),
                      'Folder of the records: each run writes a new '
                      '<date>-<cpu>.json (records.py) and its .md.')


FLAGS = flags.FLAGS

PARTS = ('forward', 'input gradient', 'kernel gradient',
         'kernel gradient from laid-out operands', 'input to CHWN',
         'gradient to HWNC', 'copy', 'kernel gradient, images stacked',
         'kernel gradient, nine matrix products')
# The kernel gradients checked against XLA's.
KERNEL_GRADIENTS = ('kernel gradient from laid-out operands',
                    'kernel gradient, images stacked',
                    'kernel gradient, nine matrix products')
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def kernel_gradient_from_laid_out(x_chwn, g_hwnc, size: int):
  """The kernel gradient of a stride-1 'SAME' convolution of odd `size` from
  its input CHWN and its output gradient HWNC: dk[i, j, c, o] = sum over n,
  h, w of x[n, h+i-p, w+j-p, c] g[n, h, w, o], a convolution over (h, w)
  whose batch is c and whose features are n (XLA:CPU's own form)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pad = (size - 1) // 2
  out = jax.lax.conv_general_dilated(x_chwn, g_hwnc, (1, 1),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=_DIMENSIONS)
  return jnp.transpose(out, (1, 2, 0, 3))   # (C_in, kh, kw, C_out) -> HWIO


def kernel_gradient_images_stacked(x, g, size: int):
  """`kernel_gradient_from_laid_out`'s result for NHWC `x` and `g`, with
  the images stacked along the height (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, h, w, c = x.shape
  pad = (size - 1) // 2
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = n * (h + 2 * pad)
  tall = jnp.transpose(padded.reshape(-1, c)).reshape(c, rows, w + 2 * pad, 1)
  # The extra rows let the last image's window shift; the gradient's rows
  # padded below each image are zero, so no window mixes two images.
  tall = jnp.pad(tall, ((0, 0), (0, 2 * pad), (0, 0), (0, 0)))
  kernel = jnp.pad(g, ((0, 0), (0, 2 * pad), (0, 0), (0, 0))).reshape(
      rows, w, 1, g.shape[-1])
  out = jax.lax.conv_general_dilated(tall, kernel, (1, 1), 'VALID',
                                     dimension_numbers=_DIMENSIONS)
  return jnp.transpose(out, (1, 2, 0, 3))


def kernel_gradient_nine_products(x, g, size: int):
  """`kernel_gradient_from_laid_out`'s result for NHWC `x` and `g`, as one
  matrix product per kernel position."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, h, w, c = x.shape
  pad = (size - 1) // 2
  channel_major = jnp.transpose(
      jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), (3, 0, 1, 2))
  flat_g = g.reshape(-1, g.shape[-1])
  products = [channel_major[:, :, i:i + h, j:j + w].reshape(c, -1) @ flat_g
              for i in range(size) for j in range(size)]
  return jnp.stack(products).reshape(size, size, c, g.shape[-1])


def part_functions() -> dict:
  """The jitted function of each of `PARTS`, each of (x, kernel, g)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=_DIMENSIONS)

  def to_chwn(x):
    return jnp.transpose(x, (3, 1, 2, 0))

  def to_hwnc(g):
    return jnp.transpose(g, (1, 2, 0, 3))

  functions = {
      'forward': lambda x, kernel, g: conv(x, kernel),
      'input gradient': lambda x, kernel, g: jax.vjp(
          lambda x_: conv(x_, kernel), x)[1](g)[0],
      'kernel gradient': lambda x, kernel, g: jax.vjp(
          lambda k_: conv(x, k_), kernel)[1](g)[0],
      'kernel gradient from laid-out operands':
          lambda x, kernel, g: kernel_gradient_from_laid_out(
              to_chwn(x), to_hwnc(g), kernel.shape[0]),
      'input to CHWN': lambda x, kernel, g: to_chwn(x),
      'gradient to HWNC': lambda x, kernel, g: to_hwnc(g),
      'copy': lambda x, kernel, g: x + 1.0,
      'kernel gradient, images stacked': lambda x, kernel, g:
          kernel_gradient_images_stacked(x, g, kernel.shape[0]),
      'kernel gradient, nine matrix products': lambda x, kernel, g:
          kernel_gradient_nine_products(x, g, kernel.shape[0]),
  }
  return {part: jax.jit(f) for part, f in functions.items()}


def time_shape(shape: dict, mesh, repeats: int) -> dict:
  """Median seconds of each part for one shape, and each of
  `KERNEL_GRADIENTS`' largest difference from XLA's kernel gradient,
  relative to its largest magnitude.
  'kernel gradient from laid-out operands' is timed on operands laid out
  beforehand, so that it holds the convolution alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n, s, cin, cout, k = (shape['batch'], shape['size'], shape['channels_in'],
                        shape['channels_out'], shape['kernel'])
  data = parallel.data_sharding(mesh)
  x = jax.device_put(rng.standard_normal((n, s, s, cin), np.float32), data)
  g = jax.device_put(rng.standard_normal((n, s, s, cout), np.float32), data)
  kernel = jax.device_put(
      rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin),
      parallel.replicated(mesh))
  functions = part_functions()
  expected = functions['kernel gradient'](x, kernel, g)
  differences = {}
  for part in KERNEL_GRADIENTS:
    checked = functions[part](x, kernel, g)
    differences[part] = float(jnp.max(jnp.abs(checked - expected))
                              / jnp.max(jnp.abs(expected)))
  x_chwn = jax.block_until_ready(functions['input to CHWN'](x, kernel, g))
  g_hwnc = jax.block_until_ready(functions['gradient to HWNC'](x, kernel, g))
  convolution_alone = jax.jit(kernel_gradient_from_laid_out,
                              static_argnums=2)
  calls = {part: (lambda f=f: f(x, kernel, g)) for part, f in functions.items()}
  calls['kernel gradient from laid-out operands'] = (
      lambda: convolution_alone(x_chwn, g_hwnc, k))
  for call in calls.values():   # compile outside the timing
    jax.block_until_ready(call())
  times = {part: [] for part in PARTS}
  for _ in range(repeats):
    for part in PARTS:
      start = time.perf_counter()
      jax.block_until_ready(calls[part]())
      times[part].append(time.perf_counter() - start)
  return {'median_s': {part: statistics.median(t) for part, t in times.items()},
          'kernel_gradient_relative_difference': differences}


def write_report(result: dict, out: str, devices: dict | None = None) -> str:
  """Writes a new record of `result` into `out`, its Markdown beside it;
  returns the record's path."""
  return records.write_record(out, 'weight_gradient', result, render=render,
                              devices=devices)


def render(result: dict) -> str:
  """The Markdown of a weight_gradient record."""
  lines = ['# The convolution backward: kernel gradient against its operand '
           'transposes', '', *records.header_lines(result),
           '- the batch sharded over the devices', '',
           f"Median ms of {result['repeats']} runs, parts in turn; "
           "'transposes' is the two operand transposes' share of XLA's "
           'kernel gradient; difference: the largest of the other kernel '
           'gradients\' against XLA\'s, relative to its largest magnitude.',
           '',
           '| shape (N, size, Cin->Cout, k) x layers | '
           + ' | '.join(PARTS) + ' | transposes | difference |',
           '| --- |' + ' --- |' * (len(PARTS) + 2)]
  for row in result['rows']:
    shape, median = row['shape'], row['median_s']
    share = ((median['input to CHWN'] + median['gradient to HWNC'])
             / median['kernel gradient'])
    lines.append(
        f"| {shape['batch']}, {shape['size']}, {shape['channels_in']}->"
        f"{shape['channels_out']}, {shape['kernel']} x {shape['layers']} | "
        + ' | '.join(f'{1e3 * median[p]:.1f}' for p in PARTS)
        + f" | {share:.0%} | "
        f"{max(row['kernel_gradient_relative_difference'].values()):.0e} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu(FLAGS.cpu_devices)   # before JAX starts
  mesh = parallel.make_mesh()
  rows = []
  for shape in resnet18_shapes(*NETWORKS[FLAGS.network]):
    if shape['stride'] != 1 or shape['kernel'] != 3 or shape['channels_in'] < 8:
      continue   # the stem's and the strided layers' backward differ
    row = {'shape': shape, **time_shape(shape, mesh, FLAGS.repeats)}
    rows.append(row)
    print(shape, {p: round(1e3 * t, 1) for p, t in row['median_s'].items()},
          flush=True)
  result = {'flags': {'network': FLAGS.network,
                      'cpu_devices': FLAGS.cpu_devices},
            'repeats': FLAGS.repeats, 'parts': list(PARTS), 'rows': rows}
  # The header's devices: this process's, every one of them in the mesh.
  path = write_report(result, FLAGS.out)
  records.print_record(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
