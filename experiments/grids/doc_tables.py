"""The tables of figures `render_docs` renders beyond README's: grid-run
tables (rows of `results/runs/`), tables cut out of the grid report
(`report.py`), and benchmark tables read from dated records.

Each public factory returns a function of no arguments that renders a
table from the records and returns it as `Rendered` (its lines and the
repository paths of the files read); `render_docs.TABLES` names them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from experiments.common import records
from experiments.common.repo import REPO_ROOT
from experiments.common.repo import RESULTS
from experiments.grids import report


@dataclasses.dataclass
class Rendered:
  """A table's lines and the files (repository paths) they come from."""
  lines: list[str]
  sources: list[str]


def repo_path(path: str) -> str:
  return os.path.relpath(path, REPO_ROOT)


def pct(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def _row(cells: Sequence[str]) -> str:
  return '| ' + ' | '.join(cells) + ' |'


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return [_row(head), _row(['---'] * len(head))] + [_row(r) for r in rows]


# ---------------------------------------------------------- grid-run tables


def _stage_means(run: dict[str, Any]) -> str:
  layers = run.get('layer_density') or {}
  stages: dict[str, list[float]] = {}
  for name, density in layers.items():
    stages.setdefault(name.split('_')[0], []).append(density)
  if not stages:
    return '-'
  return ' / '.join(f'{sum(v) / len(v):.2f}' for _, v in sorted(stages.items()))


def _dense_network(run: dict[str, Any]) -> str:
  if run.get('dense_knn_top1') is None:
    return ''
  return f'{pct(run["dense_knn_top1"])} / {pct(run["dense_linear_top1"])}'


# Column name -> (header, the cell of one run).
COLUMNS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    'knn': ('kNN top-1', lambda r: pct(r['knn_top1'])),
    'linear': ('linear top-1', lambda r: pct(r['linear_top1'])),
    'flops': ('FLOPs reduction', lambda r: f'{r["flops_reduction"]:.2f}x'),
    'density': ('gate density', lambda r: f'{r["gate_density"]:.3f}'),
    'stages': ('mean density per stage (1 / 2 / 3 / 4)', _stage_means),
    'dense_network': ('dense network kNN / linear', _dense_network),
    'seed': ('seed', lambda r: str(r['seed'])),
}


def read_run(name: str) -> tuple[dict[str, Any], str]:
  """A grid run's result by name (`runs/<name>.json`), or by a path under
  `results/` (a result kept elsewhere), and its file."""
  path = os.path.join(RESULTS, name if name.endswith('.json') else
                      os.path.join('runs', f'{name}.json'))
  return report.with_defaults(report.read_result(path)), repo_path(path)


def run_table(label_heads: Sequence[str],
              rows: Sequence[tuple[Sequence[str], str]],
              columns: Sequence[str]) -> Callable[[], Rendered]:
  """A table with one row per grid run: its label cells, then `columns`
  (names in `COLUMNS`) of the run."""
  def render() -> Rendered:
    body, sources = [], []
    for labels, name in rows:
      run, path = read_run(name)
      body.append(list(labels) + [COLUMNS[c][1](run) for c in columns])
      sources.append(path)
    return Rendered(md_table(list(label_heads) + [COLUMNS[c][0] for c in columns],
                           body), sources)
  return render


SEED_METHODS = (('dense', 'simclr_c10_dense'), ('CDG', 'simclr_c10_cdg'),
                ('channel predictor', 'simclr_c10_channel_predictor'),
                ('spatial predictor', 'simclr_c10_spatial_predictor'))


def seeds_table() -> Rendered:
  """The core rows at seeds 0-2: per seed kNN / linear (reduction), the
  mean (min-max) kNN, mean linear and mean reduction."""
  body, sources = [], []
  for label, first in SEED_METHODS:
    runs = []
    for name in (first, f'{first}_seed1', f'{first}_seed2'):
      run, path = read_run(name)
      runs.append(run)
      sources.append(path)
    dense = runs[0]['gating'] == 'none'
    cells = [f'{pct(r["knn_top1"])} / {pct(r["linear_top1"])}' +
             ('' if dense else f', {r["flops_reduction"]:.2f}x') for r in runs]
    knn = [r['knn_top1'] for r in runs]
    mean = lambda key: sum(r[key] for r in runs) / len(runs)
    body.append([label] + cells + [
        f'{pct(mean("knn_top1"))} ({pct(min(knn))}-{pct(max(knn))})',
        pct(mean('linear_top1')), f'{mean("flops_reduction"):.2f}x'])
  return Rendered(md_table(
      ['method (test split)', 'seed 0', 'seed 1', 'seed 2',
       'mean (min-max) kNN', 'mean linear', 'mean FLOPs reduction'], body),
      sources)


def _loss_text(losses: Sequence[Sequence[float]]) -> str:
  steps = [int(s) for s, _ in losses]
  return (', '.join(f'{v:.3g}' for _, v in losses) +
          f' at steps {steps[0]}-{steps[-1]}')


def diverged_table(rows: Sequence[tuple[str, str]]) -> Callable[[], Rendered]:
  """Runs whose loss became non-finite: the step and the losses before."""
  def render() -> Rendered:
    body, sources = [], []
    for label, name in rows:
      run, path = read_run(name)
      body.append([label, run['framework'], f'{run["learning_rate"]:g}',
                   f'non-finite at **step {run["diverged_at_step"]}** '
                   f'(total loss {_loss_text(run["losses_before_divergence"])})'])
      sources.append(path)
    return Rendered(md_table(['run', 'framework', 'base learning rate',
                            'what happens'], body), sources)
  return render


def linear_protocols_table() -> Rendered:
  """The core dense and CDG runs scored by the fast protocol, and their
  reruns scored by the augmented protocol, raw and with feature BatchNorm."""
  body, sources = [], []
  for label, stem in (('dense', 'dense'), ('CDG', 'cdg')):
    fast, p1 = read_run(f'simclr_c10_{stem}')
    raw, p2 = read_run(f'simclr_c10_{stem}_augmented_linear')
    bn, p3 = read_run(f'simclr_c10_{stem}_augmented_linear_bn')
    body.append([label, pct(fast['knn_top1']), pct(fast['linear_top1']),
                 pct(raw['linear_top1']), pct(bn['knn_top1']),
                 pct(bn['linear_top1']), f'{fast["flops_reduction"]:.2f}x'])
    sources += [p1, p2, p3]
  return Rendered(md_table(
      ['SimCLR, CIFAR-10 (test split)', 'kNN top-1 (AMD EPYC)',
       'linear, fast (100 epochs, standardised)',
       'linear, augmented, raw features (30 epochs, AMD EPYC)',
       'kNN top-1 (rerun, Intel Xeon)',
       'linear, augmented + feature BatchNorm (30 epochs, Intel Xeon)',
       'FLOPs reduction'], body), sources)


_OPEN_ROW = re.compile(r'^\| (\S+) \| (as trained|all open) \| ([\d.]+) \| '
                       r'([\d.]+x) \|')
OPEN_GATES_DENSE = {'simclr_c10_cdg': 'simclr_c10_dense',
                    'simclr_c10_cdg_seed1': 'simclr_c10_dense_seed1',
                    'simclr_c10_cdg_12ep': 'simclr_c10_dense_12ep',
                    'simclr_c10_cdg_structured': 'simclr_c10_dense',
                    'byol_c10_cdg': 'byol_c10_dense'}


def open_gates_table() -> Rendered:
  """`results/open_gates.md` (the diagnostic's output) beside the dense run
  trained the same way."""
  path = os.path.join(RESULTS, 'open_gates.md')
  cells: dict[str, dict[str, tuple[str, str]]] = {}
  with open(path) as f:
    for line in f:
      match = _OPEN_ROW.match(line)
      if match:
        run, gates, knn, flops = match.groups()
        cells.setdefault(run, {})[gates] = (knn, flops)
  body, sources = [], [repo_path(path)]
  for run, gates in cells.items():
    dense, dense_path = read_run(OPEN_GATES_DENSE[run])
    knn, flops = gates['as trained']
    body.append([run, f'{knn} ({flops})', gates['all open'][0],
                 pct(dense['knn_top1'])])
    sources.append(dense_path)
  return Rendered(md_table(['CDG run (test split)', 'kNN, gates as trained',
                          'kNN, all gates open', 'dense run, same training'],
                         body), sources)


# ------------------------------------------------- tables of the grid report


def _run_paths(names) -> list[str]:
  return [repo_path(os.path.join(RESULTS, 'runs', f'{n}.json'))
          for n in sorted(set(names))]


def _matched_runs(results) -> list[str]:
  dense = [r['name'] for r in report.trained(results)
           if r['gating'] == 'none' and r['name'] in
           ('simclr_c10_dense', 'simclr_c10_dense_seed1',
            'simclr_c10_dense_seed2')]
  return dense + [r['name'] for rows in report.curves(results).values()
                  for r in rows]


def _scale_runs(results) -> list[str]:
  del results
  return [n for names in report.SCALE_RUNS.values() for n in names if n]


def report_table(lines_of: Callable[[list[dict[str, Any]]], list[str]],
                 runs_of: Callable[[list[dict[str, Any]]], list[str]]
                 ) -> Callable[[], Rendered]:
  """The first Markdown table among the lines `lines_of(results)` of the
  grid report; its sources are the runs `runs_of(results)` names."""
  def render() -> Rendered:
    results = report.load_results(RESULTS)
    lines = lines_of(results)
    first = next(i for i, line in enumerate(lines) if line.startswith('|'))
    end = next((i for i in range(first, len(lines))
                if not lines[i].startswith('|')), len(lines))
    return Rendered(lines[first:end], _run_paths(runs_of(results)))
  return render


def curve_points_table() -> Rendered:
  """Each method's measured points of the matched-FLOPs curves."""
  results = report.load_results(RESULTS)
  body, names = [], []
  for method, points in report.curves(results).items():
    body.append([method, '; '.join(
        f'{p["density_target"]:g} -> {p["flops_reduction"]:.2f}x, '
        f'{pct(p["knn_top1"])} / {pct(p["linear_top1"])}' for p in points)])
    names += [p['name'] for p in points]
  return Rendered(md_table(['method (test split, seed 0)',
                          'density target -> FLOPs reduction, kNN / linear'],
                         body), _run_paths(names))


# ----------------------------------------------------------- the tables

_SELECTION = (
    ('`sel_dense`', 'dense network'),
    ('`sel_cdg`', 'CDG\'s first reading (base path on the first C_in/G '
     'channels, batch statistics without gradient, sigmoid, target 0.25)'),
    ('`sel_cdg_diagonal`', 'block-diagonal base path (CGNet)'),
    ('`sel_cdg_saliency_grad`', 'gradient through the saliency statistics'),
    ('`sel_cdg_instance_norm`', 'per-sample (instance-norm) saliency with '
     'gradient (first author)'),
    ('`sel_cdg_hard_sigmoid`', 'hard-sigmoid surrogate (first author)'),
    ('`sel_cdg_threshold_sum`', 'channel gating\'s summed threshold '
     'regulariser, lambda 1e-4, target 1.0'),
    ('`sel_cdg_lineage`', 'all four lineage choices together'),
    ('`sel_cdg_lineage_density`', 'the lineage\'s gate, at our density '
     'target 0.25'),
    ('`sel_cdg_anneal`', 'ours: density target annealed linearly from 1 to '
     '0.25 over the first half of training'))

_PARTNER_SELECTION = (
    ('`sel_cdg_partner`', 'dense partner (2026-12-01), shared BatchNorm'),
    ('`sel_cdg_partner_separate`', 'dense partner (2026-12-01), separate '
     'BatchNorm'),
    ('`sel_byol_dense`', 'BYOL dense'),
    ('`sel_byol_cdg`', 'BYOL CDG, both branches gated'),
    ('`sel_byol_cdg_online`', 'BYOL CDG, EMA target dense'))

_BUDGET = (
    ('`sel_dense`', 'dense network'),
    ('`sel_cdg`', 'uniform per-layer target 0.25, lambda 1 (default); AMD '
     'EPYC, 2026-11-28'),
    ('`sel_cdg_repro`', 'the same command on the Intel Xeon'),
    ('`sel_cdg_flops_bounds_l10`', 'budget, bounds over 1/3, lambda 10'),
    ('`sel_cdg_flops_l10`', 'budget, no bounds, lambda 10'),
    ('`sel_cdg_flops_delayed_l10`', 'budget from 1/4, ramped over 1/10, '
     'lambda 10'),
    ('`sel_cdg_flops_bounds_l30`', 'budget, bounds over 1/3, lambda 30'),
    ('`sel_cdg_flops_l30`', 'budget, no bounds, lambda 30'),
    ('`sel_cdg_flops_delayed_l30`', 'budget from 1/4, ramped over 1/10, '
     'lambda 30'))

_ABLATIONS = (
    ('none (per-branch statistics, density target 0.25, unstructured)',
     'simclr_c10_cdg'),
    ('joint saliency statistics', 'simclr_c10_cdg_joint_stats'),
    ('density target 0.35', 'simclr_c10_cdg_target0.35'),
    ('density target 0.15', 'simclr_c10_cdg_target0.15'),
    ('threshold regulariser, lambda 0.1 toward 1.0',
     'simclr_c10_cdg_threshold_reg'),
    ('structured blocks 1x1x4 (channels only)', 'simclr_c10_cdg_block114'),
    ('structured blocks 2x2x4 (core grid)', 'simclr_c10_cdg_structured'),
    ('tiles 4x4 (`--grid=tiles`)', 'simclr_c10_cdg_tiles4'))

_TILES32 = (
    ('unstructured CDG, 32x32 (`simclr_c10_cdg_32px`)', 'simclr_c10_cdg_32px'),
    ('masked step (`tiles32`, 2026-12-02)', 'simclr_c10_cdg_tiles8844_32px'),
    ('sparse step, \'none\'', 'simclr_c10_cdg_tiles8844_32px_sparse_none'),
    ('sparse step, \'sampled\' (1/16)',
     'simclr_c10_cdg_tiles8844_32px_sparse_sampled'),
    ('sparse step, \'none\', final code',
     'sparse/final_code_accuracy/simclr_c10_cdg_tiles8844_32px_sparse_none.json'))


# The paper's network and input (issue 50): width 64, seed 0, the CPU
# protocol at 16x16 and at 32x32. (method, input, run).
PAPER_INPUT_RUNS = (
    ('dense', '16x16', 'simclr_c10_dense_w64'),
    ('CDG', '16x16', 'simclr_c10_cdg_w64'),
    ('dense', '32x32', 'simclr_c10_dense_w64_32px'),
    ('CDG', '32x32', 'simclr_c10_cdg_w64_32px'))


def _training_time(run: dict[str, Any]) -> str:
  """The run's training wall time; a resumed run's counts its last part only."""
  minutes = f'{run["train_wall_s"] / 60:.0f} min'
  resumed = run.get('resumed_from_step') or 0
  if resumed:
    return f'{minutes} (steps {resumed}-{run["steps"]} only: resumed)'
  return minutes


def paper_input_table() -> Rendered:
  """Dense and CDG at width 64 on 16x16 and 32x32 inputs, seed 0: accuracy,
  each CDG run's gap to the dense run of its input, training time and
  machine. A run not there yet is a row saying so."""
  runs_dir = os.path.join(RESULTS, 'runs')
  body, sources, dense = [], [], {}
  for method, size, name in PAPER_INPUT_RUNS:
    path = os.path.join(runs_dir, f'{name}.json')
    if not os.path.exists(path):
      body.append([method, size, f'no result yet (`{name}`)'] + ['-'] * 5)
      continue
    run, source = read_run(name)
    sources.append(source)
    if method == 'dense':
      dense[size] = run
    reference = dense.get(size)
    gap = ('-' if method == 'dense' or reference is None else
           f'{100 * (run["knn_top1"] - reference["knn_top1"]):+.2f} / '
           f'{100 * (run["linear_top1"] - reference["linear_top1"]):+.2f}')
    body.append([method, size, pct(run['knn_top1']), pct(run['linear_top1']),
                 gap, f'{run["flops_reduction"]:.2f}x', _training_time(run),
                 f'{run.get("cpu") or "?"}, {run.get("finished") or "?"}'])
  return Rendered(md_table(
      ['width 64, seed 0 (test split)', 'input', 'kNN top-1', 'linear top-1',
       'gap to dense of its input (kNN / linear)', 'FLOPs reduction',
       'training wall time', 'CPU, finished'], body), sources)


def _labelled(rows, first=lambda label: label.replace('`', '').split(' ')[0]):
  return tuple(((label, what), first(label)) for label, what in rows)


GRID_TABLES: dict[str, Callable[[], Rendered]] = {
    'seeds': seeds_table,
    'open_gates': open_gates_table,
    'selection': run_table(['run (validation split)', 'what changes'],
                           _labelled(_SELECTION + _PARTNER_SELECTION),
                           ('knn', 'linear', 'flops', 'dense_network')),
    'budget': run_table(['run (validation split)', 'regulariser'],
                        _labelled(_BUDGET),
                        ('knn', 'linear', 'flops', 'density', 'stages')),
    'fbs': diverged_table((
        ('`simclr_c10_channel_predictor_relu`', 'simclr_c10_channel_predictor_relu'),
        ('`simclr_c10_channel_predictor_relu_lr0.1`',
         'simclr_c10_channel_predictor_relu_lr0.1'),
        ('`byol_c10_channel_predictor_relu`', 'byol_c10_channel_predictor_relu'),
        ('`byol_c10_channel_predictor_relu_lr0.1`',
         'byol_c10_channel_predictor_relu_lr0.1'))),
    'matched_points': curve_points_table,
    'matched': report_table(report.matched_lines, _matched_runs),
    'scale_gaps': report_table(report.gap_lines, _scale_runs),
    'linear_protocols': linear_protocols_table,
    'ablations': run_table(['change to the CDG row (test split, seed 0)'],
                           tuple(((a,), b) for a, b in _ABLATIONS),
                           ('knn', 'linear', 'flops', 'density')),
    'paper_input': paper_input_table,
    'tiles32_sparse': run_table(['trained with (test split, seed 0)'],
                                tuple(((a,), b) for a, b in _TILES32),
                                ('knn', 'linear', 'flops', 'density')),
}
