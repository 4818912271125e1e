r"""Inference speed of block-sparse CDG against masked CDG and the dense backbone.

  python -m experiments.benchmarks.benchmark_sparse  # ~10 min, 2 cores
  python -m experiments.benchmarks.benchmark_sparse --workdirs=/tmp/cdg_grid/simclr_c10_cdg_tiles4

Backbone inference (train=False, features only) images/s of CIFAR ResNet-18
(`--width` 64, `--image_size` 32, `--batch_size` 256, synthetic images) for:

  dense           the plain network;
  masked CDG      tile-gated CDG (gating.block = (t, t, 0)) computed densely
                  and masked, as in training;
  sparse CDG      the same network with `models.with_sparse_inference`
                  (cdg_jax.gating.sparse: gather the open tiles with their halo, one
                  dense convolution, scatter-add).

The gates of a randomly initialised network are set to each tile density of
`--densities` by one threshold shared by all channels, found by bisection on
the measured MAC-weighted density (BatchNorm and saliency statistics from one
training-mode pass). For each `--workdirs` entry (a trained run with
tile-structured gates) the trained backbone itself is timed on its own test
images, at the density it learned. Every configuration is compiled, warmed up
and timed (median of `--repeats`) in the same process, so ratios compare like
with like. Each run writes a new record into `--out`
(`results/sparse_speed/<date>-<cpu>.json`, `records.py`: the machine,
devices, versions, command and date in its header), its Markdown (`.md`)
and the plot (`.png`) beside it with the same stem. The forward passes run
unsharded, on one device; where the host has
several (`configure_cpu`: one per core), the random networks' dense and
sparse passes are also timed with the batch sharded over all of them, as
evaluation runs (the sparse executor per device), and each row carries
`sparse_inference_vs_best_dense`: the faster dense layout's time over the
faster sparse layout's (the header's `devices.count` then counts them
all).
"""

from __future__ import annotations

import datetime
import functools
import os
import statistics
import time

from absl import app
from absl import flags

from experiments.benchmarks.tile_schemes import gating_config_of
from experiments.benchmarks.tile_schemes import stage_tiles
from experiments.common import records
from experiments.common.repo import REPO_ROOT

flags.DEFINE_integer('width', 64, 'Backbone width.')
flags.DEFINE_integer('image_size', 32, 'Image size.')
flags.DEFINE_integer('batch_size', 256, 'Images per forward pass.')
flags.DEFINE_list('tiles', ['4', '8-8-4-4'],
                  'Tile schemes: t (gating.block = (t, t, 0) everywhere) or '
                  't1-t2-t3-t4, one tile size per ResNet stage '
                  '(gating.stage_blocks).')
flags.DEFINE_list('profile_densities', ['0.1', '0.25', '0.4', '0.55', '0.7'],
                  'Tile densities of the per-stage profile (empty: none).')
flags.DEFINE_list('densities', ['0.1', '0.2', '0.3', '0.4', '0.5', '0.6',
                                '0.7', '0.8', '0.9'],
                  'Target tile densities of the gated layers.')
flags.DEFINE_integer('repeats', 5, 'Timed forward passes per configuration.')
flags.DEFINE_list('workdirs', [], 'Trained tile-structured CDG runs to time.')
flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                        'sparse_speed'),
                    'Folder of the records: each run writes a new '
                    '<date>-<cpu>.json (records.py), its .md and .png.')
FLAGS = flags.FLAGS


def _time(fn, *args) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))   # compile and warm up
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _time_together(functions: dict, *args) -> dict:
  """Median seconds of each function, timed in turn within every repeat.

  Interleaving puts every function under the same machine state in each
  round: on a shared 2-core machine the speed drifts by 20% over minutes,
  which timing one function after the other would turn into a ratio.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for fn in functions.values():
    jax.block_until_ready(fn(*args))   # compile and warm up
  times = {name: [] for name in functions}
  for _ in range(FLAGS.repeats):
    for name, fn in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _devices_used() -> dict:
  """The devices the timed forward passes ran on: every device where there
  are several (the random networks' sharded passes), else JAX's default
  one ('available' counts all)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = records.devices_of(jax.numpy.zeros(()))
  return {**devices, 'count': jax.device_count()}


def _forward(model, variables):
  """A jitted forward; the variables are arguments, not baked-in constants."""
  import jax  # pylint: disable=g-import-not-at-top
  forward = jax.jit(lambda v, images: model.apply(v, images, train=False))
  return lambda images: forward(variables, images)


def _sharded_forward(model, variables, images):
  """A jitted forward over every device, the batch sharded, as evaluation
  runs it (traced under the mesh: the sparse executor runs per device), its
  operands placed once; called with the (ignored) unsharded images."""
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  forward = jax.jit(parallel.traced_under(
      mesh, lambda v, x: model.apply(v, x, train=False)),
                    in_shardings=(parallel.replicated(mesh),
                                  parallel.data_sharding(mesh)))
  placed = (parallel.replicate(variables, mesh),
            jax.device_put(images, parallel.data_sharding(mesh)))
  return lambda _: forward(*placed)


def _density_array(model, variables, images, costs):
  """MAC-weighted mean gate density of the gated layers (a traced scalar)."""
  from cdg_jax.gating import flops  # pylint: disable=g-import-not-at-top
  _, collections = model.apply(variables, images, train=False,
                               mutable=['gating'])
  densities = flops.mean_densities(collections['gating'])
  gated = [c for c in costs if c.gated]
  return (sum(c.macs * densities[c.name] for c in gated) /
          sum(c.macs for c in gated))


def _density(model, variables, images, costs) -> float:
  return float(_density_array(model, variables, images, costs))


def _with_thresholds(variables, value):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, value)
      if path[-1].key == 'threshold' else p, variables['params'])
  return {**variables, 'params': params}


def random_network_rows(tile: str) -> list[dict]:
  """Dense, masked and sparse images/s at each target density."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import flops  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import config_lib
  from cdg_jax.ssl import models
  size, batch = FLAGS.image_size, FLAGS.batch_size
  model_config = {'name': 'resnet18', 'width': FLAGS.width}
  gating_config = gating_config_of(tile)
  dense = models.create_resnet(model_config)
  masked = models.create_resnet(model_config,
                                config_lib.read_gating(gating_config).layer)
  fast = models.with_sparse_inference(masked)
  rng = np.random.default_rng(0)
  images = jax.numpy.asarray(
      rng.normal(0, 1, (batch, size, size, 3)).astype(np.float32))
  variables = masked.init(jax.random.key(0), images[:2])
  _, stats = masked.apply(variables, images, train=True,
                          mutable=['batch_stats'])
  variables = {'params': variables['params'], **stats}
  costs = flops.layer_costs(masked, variables, images[:1], train=False)
  dense_forward = _forward(dense, _strip_gates(variables))
  # One compiled density measurement; variables, images and the shared
  # threshold are arguments (closed over, XLA would constant-fold the
  # network). The bisection looks at a quarter of the batch (4x cheaper);
  # the density reported is the whole batch's.
  density_of = jax.jit(lambda v, x, threshold: _density_array(
      masked, _with_thresholds(v, threshold), x, costs))
  rows = []
  for target in (float(d) for d in FLAGS.densities):
    low, high = -5.0, 5.0   # threshold bounds: density falls as it rises
    # Tile densities jump with the threshold (a tile's saliency averages
    # many positions and channels): 16 halvings, not fewer.
    for _ in range(16):
      middle = (low + high) / 2
      if float(density_of(variables, images[:batch // 4], middle)) > target:
        low = middle
      else:
        high = middle
    gated = _with_thresholds(variables, (low + high) / 2)
    density = _density(masked, gated, images, costs)
    reduction = flops.flops_reduction(costs, _layer_densities(
        masked, gated, images))
    forwards = {'dense': dense_forward, 'masked': _forward(masked, gated),
                'sparse': _forward(fast, gated)}
    if len(jax.devices()) > 1:
      # Both layouts, so that sparse is also compared with the best dense.
      forwards.update(
          dense_sharded=_sharded_forward(dense, _strip_gates(variables),
                                         images),
          sparse_sharded=_sharded_forward(fast, gated, images))
    seconds = _time_together(forwards, images)
    dense_s, masked_s, sparse_s = (seconds[k] for k in
                                   ('dense', 'masked', 'sparse'))
    rows.append({'tile': tile, 'target_density': target, 'density': density,
                 'flops_reduction': float(reduction),
                 'dense_images_per_s': batch / dense_s,
                 'masked_images_per_s': batch / masked_s,
                 'sparse_images_per_s': batch / sparse_s,
                 'sparse_speedup': dense_s / sparse_s,
                 'masked_speedup': dense_s / masked_s,
                 **_layouts(seconds, batch)})
    print(f'  tiles {tile}, density {density:.3f} ({float(reduction):.2f}x '
          f'fewer FLOPs): dense {batch / dense_s:.1f}, masked '
          f'{batch / masked_s:.1f}, sparse {batch / sparse_s:.1f} '
          f'images/s; sparse / dense speed {dense_s / sparse_s:.2f}x'
          + (f'; sharded: dense {rows[-1]["dense_sharded_images_per_s"]:.1f}, '
             f'sparse {rows[-1]["sparse_sharded_images_per_s"]:.1f} images/s'
             if 'dense_sharded' in seconds else '')
          + f'; sparse vs best dense '
          f'{rows[-1]["sparse_inference_vs_best_dense"]:.2f}x', flush=True)
  return rows


def _layouts(seconds: dict, batch: int) -> dict:
  """The sharded layout's speeds and `sparse_inference_vs_best_dense`: the
  faster dense layout's time over the faster sparse layout's (the one
  device ones alone where only one device exists)."""
  dense = min(v for k, v in seconds.items() if k.startswith('dense'))
  sparse = min(v for k, v in seconds.items() if k.startswith('sparse'))
  sharded = {f'{k}_images_per_s': batch / seconds[k]
             for k in ('dense_sharded', 'sparse_sharded') if k in seconds}
  return {**sharded, 'sparse_inference_vs_best_dense': dense / sparse}


def profile_rows(scheme: str) -> list[dict]:
  """Where the time of one stride-1 gated layer per stage goes.

  For each stage of the network (map size, channels and tile of `scheme`),
  a 3x3 C -> C layer on random inputs, each part compiled and timed on its
  own: the dense convolution, the masked (training) form, the base path, the
  saliency and gate, the gather of the open tiles' windows, their
  convolution, and adding them back; and the whole sparse layer in one
  function. The open tiles are a random draw at each tile density; the
  whole layer computes its gate and then takes that draw (the gate's tiles
  XOR a fixed pattern), so it pays for the gate like a real layer.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import ops  # pylint: disable=g-import-not-at-top
  # The layer timings use the convolution the training program uses (the
  # per-shape choice on CPU, or CDG_JAX_CONV_FORMULATION), as before the
  # formulation became an explicit argument.
  conv_form = ops.program_formulation()
  rng = np.random.default_rng(0)
  rows = []
  for stage, tile in enumerate(stage_tiles(scheme)):
    layer = _profiled_layer(stage, tile, conv_form)
    for target in (float(d) for d in FLAGS.profile_densities):
      row = _profile_row(scheme, stage, layer, rng, target, conv_form)
      rows.append(row)
      parts = ', '.join(f'{k} {row[k + "_ms"]:.1f}' for k in
                        ('base', 'gate', 'gather', 'tile_conv',
                         'tile_patches', 'assemble')
                        if k + '_ms' in row)
      print(f'  profile {scheme} stage {stage + 1} ({layer.size}x{layer.size}'
            f'x{layer.channels}, {layer.bh}x{layer.bw} tiles) density '
            f'{row["density"]:.2f}: dense {row["dense_ms"]:.1f} ms, sparse '
            f'layer {row["sparse_ms"]:.1f} ms ({parts}); '
            f'{row["sparse_speedup"]:.2f}x', flush=True)
  return rows


def _profiled_layer(stage: int, tile: int, conv_form: str):
  """`profile_rows`' layer of `stage`: its inputs, its compiled parts, and
  the times of those that do not depend on the open tiles (dense, masked,
  base path, gate)."""
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import ops
  from cdg_jax.gating import sparse
  from cdg_jax.gating import tiling
  # pylint: enable=g-import-not-at-top
  batch, groups = FLAGS.batch_size, 4
  size = FLAGS.image_size // 2**stage
  channels = FLAGS.width * 2**stage
  block = (tile, tile, 0)
  bh, bw = tiling.effective_tile((size, size), (tile, tile))
  grid = (size // bh, size // bw)
  keys = jax.random.split(jax.random.key(stage), 2)
  x = jax.random.normal(keys[0], (batch, size, size, channels))
  kernel = jax.random.normal(keys[1], (3, 3, channels, channels)) * (
      2.0 / (9 * channels)) ** 0.5
  y_base = jax.jit(lambda x, k: ops.base_conv(
      x, k, groups, formulation=conv_form))(x, kernel)
  gate_stats = dict(running_mean=jnp.mean(y_base, axis=(0, 1, 2)),
                    running_var=jnp.var(y_base, axis=(0, 1, 2)))
  threshold = jnp.zeros((channels,))
  x_cond, k_cond = ops.conditional_operands(x, kernel, groups)

  def gate_tiles(y):
    return tiling.tile_gate(y, threshold, block[:2], **gate_stats)[1]

  def sparse_layer(x, flip):
    y = ops.base_conv(x, kernel, groups, formulation=conv_form)
    return sparse.sparse_add_conditional(
        y, x, k_cond, jnp.logical_xor(gate_tiles(y), flip),
        cond_channels_from=channels // groups, formulation=conv_form)

  masked_layer = jax.jit(lambda x: ops.gated_conv(
      x, kernel, threshold, groups=groups, block=block, formulation=conv_form,
      **gate_stats)[0])
  dense_conv = jax.jit(functools.partial(ops.conv, formulation=conv_form))
  times = {'dense': _time(dense_conv, x, kernel),
           'masked': _time(masked_layer, x),
           'base': _time(jax.jit(lambda x, k: ops.base_conv(
               x, k, groups, formulation=conv_form)),
                         x, kernel),
           'gate': _time(jax.jit(gate_tiles), y_base)}
  gate_now = jax.jit(gate_tiles)(y_base)
  sparse_layer = jax.jit(sparse_layer)
  num_tiles = batch * grid[0] * grid[1]
  return types.SimpleNamespace(
      batch=batch, groups=groups, size=size, channels=channels, bh=bh, bw=bw,
      grid=grid, x=x, kernel=kernel, y_base=y_base, x_cond=x_cond,
      k_cond=k_cond, dense_conv=dense_conv, sparse_layer=sparse_layer,
      gate_now=gate_now, times=times, num_tiles=num_tiles,
      caps=tiling.capacities(num_tiles))


def _profile_row(scheme: str, stage: int, layer, rng, target: float,
                 conv_form: str) -> dict:
  """One row of `profile_rows`: `layer` with a random draw of open tiles at
  tile density `target`, its parts and the whole sparse layer timed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cdg_jax.gating import tiling  # pylint: disable=g-import-not-at-top
  batch, grid, bh, bw = layer.batch, layer.grid, layer.bh, layer.bw
  groups, x, kernel = layer.groups, layer.x, layer.kernel
  tile_mask = jnp.asarray(rng.random((batch, *grid)) < target)
  num_open = int(tile_mask.sum())
  capacity = next((c for c in layer.caps if c >= num_open), None)
  row = {'tiles': scheme, 'stage': stage + 1, 'map': layer.size,
         'channels': layer.channels, 'tile': [bh, bw],
         'density': num_open / layer.num_tiles, 'capacity': capacity,
         'num_tiles': layer.num_tiles, **{f'{k}_ms': 1e3 * v
                                          for k, v in layer.times.items()}}
  if capacity is not None:
    gather = jax.jit(lambda x, m, capacity=capacity: tiling.gather_windows(
        x, jnp.nonzero(m.reshape(-1), size=capacity, fill_value=0)[0],
        grid, (bh, bw), (3, 3), (1, 1)))
    tile_conv = {method: jax.jit(
        lambda w, method=method: tiling.tile_convolution(
            w, layer.k_cond, (1, 1), method, formulation=conv_form))
                 for method in ('conv', 'patches')}
    assemble = jax.jit(lambda y, t, m: y + tiling.assemble_tiles(t, m))
    windows = gather(layer.x_cond, tile_mask)
    tiles = tile_conv['conv'](windows)
    row.update(gather_ms=1e3 * _time(gather, layer.x_cond, tile_mask),
               tile_conv_ms=1e3 * _time(tile_conv['conv'], windows),
               tile_patches_ms=1e3 * _time(tile_conv['patches'], windows),
               assemble_ms=1e3 * _time(assemble, layer.y_base, tiles,
                                       tile_mask))
  # The whole layer's ratio to dense is timed in alternation with it.
  flip = jnp.logical_xor(layer.gate_now, tile_mask)
  seconds = _time_together({'dense': lambda: layer.dense_conv(x, kernel),
                            'sparse': lambda: layer.sparse_layer(x, flip)})
  row['dense_ms'] = 1e3 * seconds['dense']
  row['sparse_ms'] = 1e3 * seconds['sparse']
  row['sparse_speedup'] = seconds['dense'] / seconds['sparse']
  # MACs of the layer relative to dense: base path 1/G, conditional
  # (G-1)/G times the density.
  row['macs_reduction'] = 1 / (1 / groups + (1 - 1 / groups)
                               * row['density'])
  return row


def _layer_densities(model, variables, images):
  from cdg_jax.gating import flops  # pylint: disable=g-import-not-at-top
  _, collections = model.apply(variables, images, train=False,
                               mutable=['gating'])
  return flops.mean_densities(collections['gating'])


def _strip_gates(variables):
  """Dense variables from gated ones: no thresholds, no saliency statistics."""
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict
  params = {k: v for k, v in flat(variables['params']).items()
            if k[-1] != 'threshold'}
  stats = {k: v for k, v in flat(variables['batch_stats']).items()
           if not k[-1].startswith('saliency')}
  unflat = flax.traverse_util.unflatten_dict
  return {'params': unflat(params), 'batch_stats': unflat(stats)}


def trained_rows(workdir: str) -> dict:
  """A trained tile-gated backbone on its own test images: the three speeds."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from cdg_jax.data import augment
  from cdg_jax.data import input_pipeline
  from cdg_jax.gating import flops
  from cdg_jax.run import checkpoints
  from cdg_jax.ssl import models
  # pylint: enable=g-import-not-at-top
  config, masked, variables = checkpoints.load_backbone(workdir)
  fast = models.with_sparse_inference(masked)
  dense = models.create_resnet(config.model)
  source = input_pipeline.create_source(config.data)
  batch = next(iter(source.eval_batches('test', FLAGS.batch_size)))
  images = augment.preprocess_eval(jax.numpy.asarray(batch['image']),
                                   config.augment)
  costs = flops.layer_costs(masked, variables, images[:1], train=False)
  densities = _layer_densities(masked, variables, images)
  density = _density(masked, variables, images, costs)
  seconds = _time_together({'dense': _forward(dense, _strip_gates(variables)),
                            'masked': _forward(masked, variables),
                            'sparse': _forward(fast, variables)}, images)
  dense_s, masked_s, sparse_s = (seconds[k] for k in
                                 ('dense', 'masked', 'sparse'))
  n = images.shape[0]
  row = {'workdir': workdir,
         'block': '-'.join(f'{b[0]}x{b[1]}x{b[2]}'
                           for b in masked.gating.blocks),
         'model': f'{config.model.name} width {config.model.width}',
         'image_size': config.data.image_size, 'density': density,
         'flops_reduction': float(flops.flops_reduction(costs, densities)),
         'dense_images_per_s': n / dense_s, 'masked_images_per_s': n / masked_s,
         'sparse_images_per_s': n / sparse_s,
         'sparse_speedup': dense_s / sparse_s,
         'masked_speedup': dense_s / masked_s}
  print(f'{workdir}: density {density:.3f}, {row["flops_reduction"]:.2f}x '
        f'fewer FLOPs; dense {row["dense_images_per_s"]:.0f}, masked '
        f'{row["masked_images_per_s"]:.0f}, sparse '
        f'{row["sparse_images_per_s"]:.0f} images/s; sparse / dense speed '
        f'{row["sparse_speedup"]:.2f}x', flush=True)
  return row


def break_even(rows: list[dict]) -> float | None:
  """Density where sparse speed equals dense speed (linear interpolation)."""
  ordered = sorted(rows, key=lambda r: r['density'])
  for a, b in zip(ordered, ordered[1:]):
    if (a['sparse_speedup'] - 1) * (b['sparse_speedup'] - 1) <= 0 and (
        a['sparse_speedup'] != b['sparse_speedup']):
      t = (1 - a['sparse_speedup']) / (b['sparse_speedup'] - a['sparse_speedup'])
      return a['density'] + t * (b['density'] - a['density'])
  return None


def write_report(report: dict, out: str, devices: dict | None = None) -> str:
  """Writes a new record of `report` into `out` (its Markdown and plot
  beside it); returns the record's path."""
  path = records.write_record(out, 'sparse_speed', report, render=render,
                              devices=devices)
  plot(records.read_record(path), records.beside(path, '.png'))
  return path


def _layout_lines(report: dict) -> list[str]:
  """The Markdown table of both layouts (empty where one device ran)."""
  lines = []
  layouts = [r for r in report['random'] if 'dense_sharded_images_per_s' in r]
  if layouts:
    lines += ['', f'Both layouts ({report.get("date", "date not recorded")}): '
              f'the batch on one device, and sharded over '
              f'{report["record"]["devices"].get("available", "all")} '
              f'devices (the sparse executor per device); '
              f'`sparse_inference_vs_best_dense` is the faster dense '
              f'layout\'s time over the faster sparse layout\'s.', '',
              '| tile | gated-layer density | dense, 1 device | dense, '
              'sharded | sparse, 1 device | sparse, sharded | '
              'sparse_inference_vs_best_dense |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for r in layouts:
      lines.append(
          f'| {r["tile"]} | {r["density"]:.3f} | '
          f'{r["dense_images_per_s"]:.1f} | '
          f'{r["dense_sharded_images_per_s"]:.1f} | '
          f'{r["sparse_images_per_s"]:.1f} | '
          f'{r["sparse_sharded_images_per_s"]:.1f} | '
          f'{r["sparse_inference_vs_best_dense"]:.2f}x |')
  return lines


def render(report: dict) -> str:
  """The Markdown of a sparse_speed record."""
  f_ = report['flags']
  lines = ['# Block-sparse CDG inference speed', '',
           *records.header_lines(report), '',
           f'CIFAR ResNet-18 width {f_["width"]}, {f_["image_size"]}x'
           f'{f_["image_size"]}, batch {f_["batch_size"]}, inference; median '
           f'of {f_["repeats"]} passes. Speeds relative to the dense network '
           f'in the same run.', '',
           '| tile | gated-layer density | FLOPs reduction | dense images/s | '
           'masked CDG images/s | sparse CDG images/s | sparse / dense | '
           'masked / dense |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in report['random']:
    lines.append(f'| {r["tile"]} | {r["density"]:.3f} | '
                 f'{r["flops_reduction"]:.2f}x | {r["dense_images_per_s"]:.1f} '
                 f'| {r["masked_images_per_s"]:.1f} | '
                 f'{r["sparse_images_per_s"]:.1f} | {r["sparse_speedup"]:.2f}x '
                 f'| {r["masked_speedup"]:.2f}x |')
  lines += _layout_lines(report)
  for tile, density in report['break_even'].items():
    lines.append('')
    lines.append(f'Break-even density (tiles {tile}): '
                 + ('none in the measured range' if density is None else
                    f'{density:.2f} (sparse faster than dense below it)'))
  if report['profile']:
    lines += ['', '## Profile: one stride-1 gated layer per stage', '',
              f'3x3 C -> C convolution at the stage\'s map size, batch '
              f'{f_["batch_size"]}, random inputs and a random draw of open '
              f'tiles at each density; each part compiled and timed alone '
              f'(ms, median of {f_["repeats"]}); the open tiles\' '
              f'convolution both as a convolution of the windows and as one '
              f'matrix product over their patches; "sparse layer" is the '
              f'whole executor in one function (base, gate, capacity switch, '
              f'gather, tile convolution as `tile_conv=\'auto\'` picks it, '
              f'add back). MACs: the layer\'s dense / gated '
              f'multiply-accumulates.', '',
              '| tiles | stage (map x C, tile) | tile density | dense | '
              'masked | base path | saliency + gate | gather | tile conv | '
              'tile patches x kernel | add back | sparse layer | dense / '
              'sparse | MACs reduction |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
              '--- | --- | --- | --- |']
    for r in report['profile']:
      part = lambda k, r=r: f'{r[k]:.1f}' if k in r else 'dense fallback'
      lines.append(
          f'| {r["tiles"]} | {r["stage"]} ({r["map"]}x{r["map"]}x'
          f'{r["channels"]}, {r["tile"][0]}x{r["tile"][1]}) | '
          f'{r["density"]:.2f} | {r["dense_ms"]:.1f} | {r["masked_ms"]:.1f} | '
          f'{r["base_ms"]:.1f} | {r["gate_ms"]:.1f} | {part("gather_ms")} | '
          f'{part("tile_conv_ms")} | {part("tile_patches_ms")} | '
          f'{part("assemble_ms")} | '
          f'{r["sparse_ms"]:.1f} | {r["sparse_speedup"]:.2f}x | '
          f'{r["macs_reduction"]:.2f}x |')
  if report['trained']:
    lines += ['', '## Trained tile-structured backbones (their own test '
              'images)', '', '| run | model | block | gated-layer density | '
              'FLOPs reduction | dense images/s | masked images/s | sparse '
              'images/s | sparse / dense |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in report['trained']:
      lines.append(f'| {os.path.basename(r["workdir"])} | {r["model"]}, '
                   f'{r["image_size"]}x{r["image_size"]} | {r["block"]} | '
                   f'{r["density"]:.3f} | {r["flops_reduction"]:.2f}x | '
                   f'{r["dense_images_per_s"]:.1f} | '
                   f'{r["masked_images_per_s"]:.1f} | '
                   f'{r["sparse_images_per_s"]:.1f} | '
                   f'{r["sparse_speedup"]:.2f}x |')
  return '\n'.join(lines) + '\n'


def plot(report: dict, path: str) -> None:
  """The speed-vs-density plot of a sparse_speed record, to `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for tile in sorted({r['tile'] for r in report['random']}):
    rows = sorted((r for r in report['random'] if r['tile'] == tile),
                  key=lambda r: r['density'])
    ax.plot([r['density'] for r in rows], [r['sparse_speedup'] for r in rows],
            'o-', label=f'sparse CDG, tiles {tile}')
    ax.plot([r['density'] for r in rows], [r['masked_speedup'] for r in rows],
            's--', label=f'masked CDG, tiles {tile}')
  for r in report['trained']:
    ax.plot(r['density'], r['sparse_speedup'], '*', ms=12,
            label=f'trained {os.path.basename(r["workdir"])} (own size)')
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set_xlabel('gated-layer density (fraction of conditional work kept)')
  ax.set_ylabel('speed relative to dense (x)')
  head = report['record']
  ax.set_title(f'Inference, {head["machine"] or head["cpu_model"]}, '
               f'{head["date"][:10]}', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu()
  report = {'flags': {'width': FLAGS.width, 'image_size': FLAGS.image_size,
                      'batch_size': FLAGS.batch_size, 'tiles': FLAGS.tiles,
                      'densities': FLAGS.densities,
                      'profile_densities': FLAGS.profile_densities,
                      'repeats': FLAGS.repeats, 'workdirs': FLAGS.workdirs},
            'random': [], 'profile': [], 'trained': [],
            'date': datetime.date.today().isoformat()}
  for scheme in FLAGS.tiles:
    stage_tiles(scheme)   # a bad scheme fails before anything is timed
  if FLAGS.profile_densities:
    for scheme in FLAGS.tiles:
      report['profile'] += profile_rows(scheme)
  for scheme in FLAGS.tiles:
    report['random'] += random_network_rows(scheme)
  report['break_even'] = {
      scheme: break_even([r for r in report['random'] if r['tile'] == scheme])
      for scheme in FLAGS.tiles}
  for workdir in FLAGS.workdirs:
    report['trained'].append(trained_rows(workdir))
  path = write_report(report, FLAGS.out, devices=_devices_used())
  print(f'Record: {path} (its .md and .png beside it)')


if __name__ == '__main__':
  app.run(main)
