"""Tables of figures rendered from dated benchmark records (peer, levers,
profile, sparse_speed, sparse_step, knn_vs_linear) for `render_docs`.

Each factory takes the record's repository path (or paths) and returns a
function of no arguments that renders the table as `doc_tables.Rendered`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from experiments.common import records
from experiments.common.repo import REPO_ROOT
from experiments.grids.doc_tables import Rendered
from experiments.grids.doc_tables import md_table
from experiments.grids.doc_tables import pct


def _read(path: str) -> dict[str, Any]:
  return records.read_record(os.path.join(REPO_ROOT, path))


def _when_where(record: dict[str, Any]) -> str:
  head = record['record']
  cpu = (head.get('cpu_model') or '?').replace('Intel(R) Xeon(R) Processor',
                                               'Intel Xeon')
  return f'{cpu}, {head["date"][:10]}'


PEER_VARIANTS = (('dense', 'dense'), ('masked (nothing skipped)', 'masked'),
                 ('sparse, \'none\' ({r:.2f}x fewer FLOPs)', 'sparse'))
PEER_TORCH = ('eager_nchw', 'eager_channels_last', 'compiled_channels_last')


def peer_steps_table(path: str) -> Callable[[], Rendered]:
  """Median step times of every variant of one peer record, and the minor
  page faults per step where it counted them."""
  def render() -> Rendered:
    record = _read(path)
    rows = {row['key']: row for row in record['rows']}
    faults = 'minor_faults_per_step' in rows['cdg_jax/dense']
    body = []
    for label, kind in PEER_VARIANTS:
      ours = rows[f'cdg_jax/{kind}']
      cells = [label.format(r=ours['flops_reduction']),
               f'{ours["median_step_s"]:.2f} s']
      for form in PEER_TORCH:
        theirs = rows.get(f'torch/{kind}/{form}')
        cells.append('-' if theirs is None else
                     f'{theirs["median_step_s"]:.2f} s')
      if faults:
        cells.append(f'{ours["minor_faults_per_step"] / 1e6:.2f} M')
      body.append(cells)
    head = ['step', f'cdg_jax ({record["record"]["devices"]["count"]} '
            'devices)', 'PyTorch eager NCHW', 'eager channels_last',
            '`torch.compile`'] + (['cdg_jax page faults / step']
                                  if faults else [])
    return Rendered(md_table(head, body), [path])
  return render


def peer_devices_table(paths: Sequence[str]) -> Callable[[], Rendered]:
  """cdg_jax's dense, masked and sparse steps of peer records, one row per
  record and device layout (its machine, date and device count; a record
  of --other_cpu_devices holds several layouts)."""
  def render() -> Rendered:
    body = []
    for path in paths:
      record = _read(path)
      step = {row['key']: row['median_step_s'] for row in record['rows']}
      devices = {row['key']: row.get('devices') for row in record['rows']}
      for dense_key in sorted((k for k in step
                               if k.startswith('cdg_jax/dense')),
                              key=len):
        layout = dense_key[len('cdg_jax/dense'):]
        dense, sparse = step[dense_key], step['cdg_jax/sparse' + layout]
        body.append([
            _when_where(record),
            str(devices[dense_key] or record['record']['devices']['count']),
            f'{dense:.2f} s', f'{step["cdg_jax/masked" + layout]:.2f} s',
            f'{sparse:.2f} s', f'{sparse / dense:.2f}'])
    return Rendered(md_table(['machine, date', 'cdg_jax devices', 'dense',
                            'masked', 'sparse, \'none\'',
                            'sparse / dense time'], body), list(paths))
  return render


def sparse_layouts_table(path: str) -> Callable[[], Rendered]:
  """Block-sparse inference of one sparse_speed record in both layouts
  (one device, the batch sharded over every device) and
  `sparse_inference_vs_best_dense`."""
  def render() -> Rendered:
    record = _read(path)
    devices = record['record']['devices']['available']
    body = [[f'tiles {row["tile"]}', f'{row["density"]:.3f}',
             f'{row["flops_reduction"]:.2f}x',
             f'{row["dense_images_per_s"]:,.0f}',
             f'{row["dense_sharded_images_per_s"]:,.0f}',
             f'{row["sparse_images_per_s"]:,.0f}',
             f'{row["sparse_sharded_images_per_s"]:,.0f}',
             f'**{row["sparse_inference_vs_best_dense"]:.2f}x**']
            for row in record['random']]
    return Rendered(md_table(
        [f'network (width {record["flags"]["width"]}, '
         f'{record["flags"]["image_size"]}x{record["flags"]["image_size"]}, '
         f'batch {record["flags"]["batch_size"]}), {_when_where(record)}',
         'gated-layer density', 'FLOPs reduction', 'dense images/s, 1 device',
         f'dense, {devices} devices', 'sparse, 1 device',
         f'sparse, {devices} devices',
         'sparse_inference_vs_best_dense'], body), [path])
  return render


def sparse_speed_table(path: str, trained: bool = True
                       ) -> Callable[[], Rendered]:
  """Block-sparse inference of one sparse_speed record: random-init rows
  per tile scheme and density, then the trained networks."""
  def render() -> Rendered:
    record = _read(path)
    body = []
    for row in record['random']:
      body.append([f'tiles {row["tile"]}', f'{row["density"]:.3f}',
                   f'{row["flops_reduction"]:.2f}x',
                   f'{row["sparse_speedup"]:.2f}x '
                   f'({row["sparse_images_per_s"]:,.0f} vs '
                   f'{row["dense_images_per_s"]:,.0f} images/s)',
                   f'{row["masked_speedup"]:.2f}x'])
    for row in record['trained'] if trained else ():
      body.append([f'trained, {row["block"]}, {row["model"]}, '
                   f'{row["image_size"]}x{row["image_size"]}',
                   f'{row["density"]:.3f}', f'{row["flops_reduction"]:.2f}x',
                   f'{row["sparse_speedup"]:.2f}x '
                   f'({row["sparse_images_per_s"]:,.0f} vs '
                   f'{row["dense_images_per_s"]:,.0f} images/s)',
                   f'{row["masked_speedup"]:.2f}x'])
    return Rendered(md_table(['network (width 64, 32x32, batch 256 unless '
                            'named)', 'gated-layer density', 'FLOPs reduction',
                            'sparse / dense speed', 'masked / dense'], body),
                    [path])
  return render


STEP_VARIANTS = ('masked', 'sparse, none', 'sparse, sampled')


def sparse_step_table(paths: Sequence[tuple[str, str]]
                      ) -> Callable[[], Rendered]:
  """The sparse train step's records (label, path): per record the
  density-0.25 rows, speed against dense as the median of the per-repeat
  ratios (the ratio of the medians in brackets)."""
  def render() -> Rendered:
    body = []
    for label, path in paths:
      rows = {r['variant']: r for r in _read(path)['rows']
              if r['target_density'] == 0.25}
      gated = rows['masked']
      cells = [label, f'{gated["gate_density"]:.3f}',
               f'{gated["flops_reduction"]:.2f}x',
               f'{rows["dense"]["median_step_s"]:.2f} s']
      for variant in STEP_VARIANTS:
        row = rows[variant]
        cells.append(f'{row["paired_speedup_vs_dense"]:.2f}x '
                     f'({row["speedup_vs_dense"]:.2f}x; '
                     f'{row["median_step_s"]:.2f} s)')
      body.append(cells)
    return Rendered(md_table(['record', 'gated-layer density', 'FLOPs reduction',
                            'dense step (median)', 'masked', 'sparse, \'none\'',
                            'sparse, \'sampled\' (1/16)'], body),
                    [p for _, p in paths])
  return render


def levers_table(path: str, levers: Sequence[tuple[str, str]],
                 steps: Sequence[tuple[str, str]]) -> Callable[[], Rendered]:
  """Median step time per lever (columns) and step (rows) of one levers
  record, with minor page faults per step where it counted them."""
  def render() -> Rendered:
    summary = _read(path)['summary']
    body = []
    for label, step in steps:
      cells = [label]
      for _, lever in levers:
        row = summary[step][lever]
        faults = row.get('minor_faults_per_step')
        cells.append(f'{row["median_step_s"]:.3f} s' +
                     ('' if faults is None else f', {faults:,.0f} faults'))
      body.append(cells)
    return Rendered(md_table(['step'] + [label for label, _ in levers], body),
                    [path])
  return render


PROFILE_STEPS = (('protocol', 'CPU protocol CDG, width 16'),
                 ('dense64', 'dense, width 64'), ('masked64', 'masked, width 64'),
                 ('sparse64', 'sparse, width 64'))
PROFILE_PARTS = (('convolutions', ('convolution',)),
                 ('convolution operand layouts',
                  ('convolution operand layouts',)),
                 ('BatchNorm', ('batchnorm',)),
                 ('gating', ('gating',)),
                 ('sparse tiles', ('sparse tiles (gathers, scatters, indices)',)))


def profile_table(path: str) -> Callable[[], Rendered]:
  """Shares of the busy time per category of each step of a profile record."""
  def render() -> Rendered:
    steps = _read(path)['steps']
    body = []
    for key, label in PROFILE_STEPS:
      if key not in steps:
        continue
      step = steps[key]
      totals: dict[str, float] = {}
      for name, seconds in step['categories'].items():
        category = name.split('|')[0]
        totals[category] = totals.get(category, 0.0) + seconds
      busy = sum(totals.values())
      cells = [f'{label} ({step["step_s"]:.3f} s)']
      named = 0.0
      for _, categories in PROFILE_PARTS:
        part = sum(totals.get(c, 0.0) for c in categories)
        named += part
        cells.append(f'{100 * part / busy:.1f}%' if part else '-')
      cells.append(f'{100 * (busy - named) / busy:.1f}%')
      body.append(cells)
    return Rendered(md_table(['step (wall-clock)'] +
                           [label for label, _ in PROFILE_PARTS] +
                           ['everything else'], body), [path])
  return render


KNN_ROWS = (('kNN, k=200, T=0.1 (protocol)', 'protocol (raw, k=200, T=0.1)'),
            ('kNN, centred features', 'centred'),
            ('kNN, standardised features', 'standardised (the linear input)'),
            ('kNN, PCA-whitened features', 'whitened (PCA)'))
FEATURE_ROWS = (('mean cosine of random pairs', 'mean_pair_cosine', '{:.3f}'),
                ('mean L2 norm', 'mean_l2_norm', '{:.1f}'),
                ('participation ratio', 'participation_ratio', '{:.1f}'),
                ('variance share of the top 1% of dimensions',
                 'top1pct_variance_share', '{:.1%}'))
_METHOD = {'none': 'dense', 'cdg': 'CDG', 'channel_predictor':
           'channel predictor', 'spatial_predictor': 'spatial predictor'}


def _run_label(run: dict[str, Any]) -> str:
  return f"{_METHOD.get(run['gating'], run['gating'])} (seed {run['seed']})"


def _gap_cell(value: float | None, dense: float | None) -> str:
  """'43.21 (-1.91)': a figure and its gap to the dense run's (none given:
  the figure alone)."""
  if value is None:
    return '-'
  if dense is None:
    return pct(value)
  return f'{pct(value)} ({100 * (value - dense):+.2f})'


def _paired(run: dict[str, Any], dense: dict[str, Any]) -> bool:
  """Whether `run` gets a gap to `dense`: another method, same seed."""
  return run is not dense and run['seed'] == dense['seed']


def knn_vs_linear_table(path: str) -> Callable[[], Rendered]:
  """kNN variants (each with its gap to the dense run of the same seed),
  linear top-1 and
  feature statistics of every run of one knn_vs_linear record; rows a
  record lacks (an older one, without whitening) are left out."""
  def render() -> Rendered:
    runs = _read(path)['runs']
    dense = next(run for run in runs if run['gating'] == 'none')
    body = []
    for label, key in KNN_ROWS:
      if all(key in run['knn_top1'] for run in runs):
        body.append([label] + [_gap_cell(
            run['knn_top1'][key],
            None if not _paired(run, dense) else dense['knn_top1'][key])
                               for run in runs])
    body.append(['linear top-1 (fast protocol)'] + [
        _gap_cell(run['linear']['top1'] if run['linear'] else None,
                  None if not _paired(run, dense) or not dense['linear']
                  else dense['linear']['top1'])
        for run in runs])
    for label, key, form in FEATURE_ROWS:
      body.append([label] + [form.format(run['statistics'][key])
                             for run in runs])
    header = [f'width {dense["width"]}, {dense["query_split"]} split '
              f'(gap to dense)'] + [_run_label(run) for run in runs]
    return Rendered(md_table(header, body), [path])
  return render


def gcs_workdir_table(paths: Sequence[str]) -> Callable[[], Rendered]:
  """The gs:// workdir benchmark: per record, each round's loop seconds on
  local disk and on gs:// and the ratio (rounds in the order they ran)."""
  def render() -> Rendered:
    body = []
    for path in paths:
      record = _read(path)
      head = record['record']
      for number, (local, remote, first) in enumerate(_gcs_rounds(record)):
        body.append([head['date'][:16].replace('T', ' '),
                     (head['cpu_model'] or '?'), str(number), first,
                     f'{local:.1f}', f'{remote:.1f}',
                     f'{remote / local:.3f}x'])
      body.append(['', '', 'all', '', '', '',
                   f"**{record['gs_over_local']:.3f}x**"])
    return Rendered(md_table(
        ['record (UTC)', 'CPU', 'round', 'ran first', 'local loop (s)',
         'gs:// loop (s)', 'gs:// / local'], body), list(paths))
  return render


def _gcs_rounds(record: dict[str, Any]) -> list[tuple[float, float, str]]:
  """(local seconds, gs:// seconds, which ran first) per round, from a
  record's runs or, in the first record, its rounds (local ran first)."""
  if 'runs' not in record:
    return [(r['local_loop_s_after_step_20'], r['gs_loop_s_after_step_20'],
             'local') for r in record['rounds']]
  rounds = []
  for number in sorted({run['round'] for run in record['runs']}):
    runs = [run for run in record['runs'] if run['round'] == number]
    by_kind = {run['workdir']: run['loop_s_after_step_20'] for run in runs}
    rounds.append((by_kind['local'], by_kind['gs'], runs[0]['workdir']))
  return rounds


_PEER_EPYC = 'experiments/results/peer/2026-12-05T08-34-29-epyc.json'
_PEER_XEON = 'experiments/results/peer/2026-12-04T16-17-15-xeon.json'
_PEER_XEON_PER_DEVICE = (
    'experiments/results/peer/2026-12-07T18-43-48-xeon.json')
# After the halo add-back's rewrite (the sparse step only changed).
_PEER_XEON_HALO = 'experiments/results/peer/2026-12-07T21-55-22-xeon.json'
_STEPS = (('CPU protocol, width 16', 'protocol'),
          ('dense, width 64, 32x32', 'dense64'))

BENCH_TABLES: dict[str, Callable[[], Rendered]] = {
    'peer_steps': peer_steps_table(_PEER_XEON_HALO),
    'peer_devices': peer_devices_table((_PEER_XEON, _PEER_EPYC,
                                        _PEER_XEON_PER_DEVICE,
                                        _PEER_XEON_HALO)),
    'levers_kernels': levers_table(
        'experiments/results/levers/2026-12-05T04-34-xeon.json',
        (('main before issue 40 (YNNPACK, XLA\'s convolution)', 'conv_xla'),
         ('YNNPACK, per shape', 'default'),
         ('XLA\'s kernels, XLA\'s convolution', 'no_ynn_conv_xla'),
         ('**XLA\'s kernels, per shape (today\'s default)**', 'no_ynn_conv')),
        _STEPS),
    'profile': profile_table(
        'experiments/results/profile/2026-12-05T06-13-13-xeon.json'),
    'profile_per_device': profile_table(
        'experiments/results/profile/2026-12-07T21-11-17-xeon.json'),
    'profile_halo_add_back': profile_table(
        'experiments/results/profile/2026-12-07T21-43-11-xeon.json'),
    'gcs_workdir': gcs_workdir_table((
        'experiments/results/gcs_workdir/2026-12-07T10-33-epyc.json',
        'experiments/results/gcs_workdir/2026-12-07T13-25-16-epyc.json')),
    'knn_vs_linear': knn_vs_linear_table(
        'experiments/results/knn_vs_linear/2026-12-07T13-35-08-epyc.json'),
    'sparse_speed_tiles': sparse_speed_table(
        'experiments/results/sparse_speed/2026-12-02-xeon.json'),
    'sparse_speed_pooled': sparse_speed_table(
        'experiments/results/sparse_speed/2026-12-03-xeon.json'),
    'sparse_speed_layouts': sparse_layouts_table(
        'experiments/results/sparse_speed/2026-12-07T18-46-09-xeon.json'),
    'sparse_step': sparse_step_table((
        ('final code', 'experiments/results/sparse_step/2026-12-03T20-24-58-xeon.json'),
        ('before two clean-ups of the add-back',
         'experiments/results/sparse_step/2026-12-03T19-12-17-xeon.2.json'))),
}
