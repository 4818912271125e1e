r"""Train-step speed of the sparse train step against masked CDG and dense.

  python -m experiments.benchmarks.benchmark_sparse_step  # ~12 min, 2 cores
  python -m experiments.benchmarks.benchmark_sparse_step --width=16 --image_size=16 \
      --batch_size=32 --repeats=2 --out=/tmp/sparse_step   # a quick check

The SimCLR train step (both views, SimCLR loss, gate regulariser, LARS,
online probe: `pretraining.assemble`) of a CIFAR ResNet (`--model` resnet18,
`--width` 64, `--image_size` 32, `--batch_size` 128 images, synthetic uint8 images) for:

  dense           `gating.kind='none'`;
  masked          tile-gated CDG (`--tiles`, all channels per tile), the
                  conditional path computed everywhere and masked;
  sparse, none    the same with `gating.sparse_training=True`: the
                  conditional path at the open tiles only, forward and
                  backward; no gate gradient at closed tiles;
  sparse, sampled the same plus a forward-only sample of
                  `--sample_fraction` of the tiles for the closed tiles'
                  gate gradient.

The gates of the randomly initialised network are set to each tile density of
`--densities` by one threshold shared by all channels, found by bisection on
the MAC-weighted density of a training-mode pass; the state is then the same
for every variant (the dense one has no thresholds). Each variant is
compiled once (the density is a value, not a shape) and not donated, so every
timed call starts from the same state; within every repeat the variants run
in turn, so ratios compare like with like on a machine whose speed drifts.
The FLOPs reduction is the step's own metric (backbone, both views). The
step runs unsharded, on one device (the header's `devices.count`). Each run
writes a new record into `--out` (`results/sparse_step/<date>-<cpu>.json`,
`records.py`: machine, devices, versions, command and date in its header)
and its Markdown beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags

from experiments.benchmarks import tile_schemes
from experiments.common import records
from experiments.common.repo import REPO_ROOT

flags.DEFINE_string('model', 'resnet18', 'Backbone (cdg_jax.models).')
flags.DEFINE_integer('width', 64, 'Backbone width.')
flags.DEFINE_integer('image_size', 32, 'Image size.')
flags.DEFINE_integer('batch_size', 128, 'Images per step (two views each).')
flags.DEFINE_string('tiles', '8-8-4-4', 'Tile scheme: t or t1-t2-t3-t4 (see '
                    'benchmark_sparse.py).')
flags.DEFINE_list('densities', ['0.25', '0.4'], 'Target tile densities.')
flags.DEFINE_float('sample_fraction', 0.0625, "The 'sampled' form's sample.")
flags.DEFINE_integer('repeats', 3, 'Timed steps per variant and density.')
flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                        'sparse_step'),
                    'Folder of the records: each run writes a new '
                    '<date>-<cpu>.json (records.py) and its .md.')
FLAGS = flags.FLAGS

VARIANTS = ('dense', 'masked', 'sparse, none', 'sparse, sampled')


def _config(variant: str):
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.name = FLAGS.model
  config.model.width = FLAGS.width
  config.data.image_size = FLAGS.image_size
  config.batch_size = FLAGS.batch_size
  config.num_steps = 1000
  if variant == 'dense':
    config.gating.kind = 'none'
    return config
  tiling = tile_schemes.gating_config_of(FLAGS.tiles)
  config.gating.block = tiling['block']
  config.gating.stage_blocks = tiling['stage_blocks']
  if variant.startswith('sparse'):
    config.gating.sparse_training = True
    if variant.endswith('sampled'):
      config.gating.closed_tile_gradient = 'sampled'
      config.gating.closed_tile_sample = FLAGS.sample_fraction
  return config


def _with_thresholds(state, value):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, value)
      if path[-1].key == 'threshold' else p, state.params)
  return state.replace(params=params)


def _threshold_for(run, state, images, density: float) -> float:
  """One threshold for every gate giving `density` (MAC-weighted) in a
  training-mode pass of the online backbone, by bisection."""
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import flops  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import layers  # pylint: disable=g-import-not-at-top
  backbone = run.networks.online.backbone
  gated = [c for c in run.costs if c.gated]
  names = [c.name.removeprefix('backbone/') for c in gated]

  @jax.jit
  def measured(state):
    _, collections = backbone.apply(
        {'params': state.params['backbone'],
         'batch_stats': state.batch_stats['backbone']}, images, train=True,
        mutable=['batch_stats', layers.DENSITY_COLLECTION])
    densities = flops.mean_densities(collections[layers.DENSITY_COLLECTION])
    return (sum(c.macs * densities[n] for c, n in zip(gated, names))
            / sum(c.macs for c in gated))

  low, high = -3.0, 3.0
  for _ in range(20):
    middle = (low + high) / 2
    if float(measured(_with_thresholds(state, middle))) > density:
      low = middle
    else:
      high = middle
  return (low + high) / 2


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  from cdg_jax.ssl import pretraining  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (FLAGS.batch_size, FLAGS.image_size,
                                          FLAGS.image_size, 3), np.uint8),
           'label': rng.integers(0, 10, (FLAGS.batch_size,)).astype(np.int32)}
  runs, steps = {}, {}
  for variant in VARIANTS:
    config = _config(variant)
    settings = pretraining.read_settings(config, config_lib.validate(config),
                                         50_000)
    runs[variant] = pretraining.assemble(settings)
    steps[variant] = jax.jit(runs[variant].train_step)
  base_state = runs['masked'].init_state(jax.random.key(0))
  dense_state = runs['dense'].init_state(jax.random.key(0))
  views = jax.numpy.concatenate(augment.two_views(
      jax.random.key(1), jax.numpy.asarray(batch['image']),
      _config('masked').augment))
  rows = []
  for density in (float(d) for d in FLAGS.densities):
    threshold = _threshold_for(runs['masked'], base_state, views, density)
    state = _with_thresholds(base_state, threshold)
    states = {v: dense_state if v == 'dense' else state for v in VARIANTS}
    metrics, times = {}, {v: [] for v in VARIANTS}
    for variant in VARIANTS:   # compile (first density only) and warm up
      start = time.perf_counter()
      _, metrics[variant] = jax.block_until_ready(
          steps[variant](states[variant], batch))
      print(f'{variant}: first call {time.perf_counter() - start:.1f} s',
            flush=True)
    for _ in range(FLAGS.repeats):
      for variant in VARIANTS:
        start = time.perf_counter()
        jax.block_until_ready(steps[variant](states[variant], batch))
        times[variant].append(time.perf_counter() - start)
    dense_s = statistics.median(times['dense'])
    for variant in VARIANTS:
      median = statistics.median(times[variant])
      # The machine's speed drifts between repeats (the dense step ranged
      # over 1.3x within one run here): the ratio within each repeat, then
      # its median, compares like with like.
      paired = statistics.median(
          d / t for d, t in zip(times['dense'], times[variant]))
      row = {'target_density': density, 'variant': variant,
             'gate_density': float(metrics[variant].get('gate_density', 1.0)),
             'flops_reduction': float(metrics[variant]['flops_reduction']),
             'median_step_s': median, 'speedup_vs_dense': dense_s / median,
             'paired_speedup_vs_dense': paired, 'times_s': times[variant]}
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != 'times_s'}),
            flush=True)
  result = {'flags': {
      'model': FLAGS.model, 'width': FLAGS.width,
      'image_size': FLAGS.image_size, 'batch_size': FLAGS.batch_size,
      'tiles': FLAGS.tiles, 'densities': FLAGS.densities,
      'sample_fraction': FLAGS.sample_fraction, 'repeats': FLAGS.repeats},
            'rows': rows}
  path = records.write_record(FLAGS.out, 'sparse_step', result,
                              render=render,
                              # The arrays of the last step: one device.
                              devices=records.devices_of(metrics))
  records.print_record(path)


def render(result: dict) -> str:
  """The Markdown of a sparse_step record."""
  f_ = result['flags']
  lines = [f'# Sparse train step: SimCLR, CIFAR {f_.get("model", "resnet18")} '
           f'width {f_["width"]}', '', *records.header_lines(result), '',
           f'SimCLR train step, CIFAR {f_.get("model", "resnet18")} width '
           f'{f_["width"]}, {f_["image_size"]}x{f_["image_size"]}, batch '
           f'{f_["batch_size"]} images (2 views), tiles {f_["tiles"]}, sample '
           f'fraction {f_["sample_fraction"]}; median of {f_["repeats"]} '
           f'steps, variants in turn within each repeat.', '',
           '| target density | variant | gate density | FLOPs reduction | '
           'step s (median) | speed vs dense (of medians) | speed vs dense '
           '(median of per-repeat ratios) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  lines += [f'| {r["target_density"]:.2f} | {r["variant"]} | '
            f'{r["gate_density"]:.3f} | {r["flops_reduction"]:.2f}x | '
            f'{r["median_step_s"]:.2f} | {r["speedup_vs_dense"]:.2f}x | '
            + (f'{r["paired_speedup_vs_dense"]:.2f}x |'
               if 'paired_speedup_vs_dense' in r else '- |')
            for r in result['rows']]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main)
