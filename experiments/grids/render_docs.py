r"""Renders the tables of figures in the docs from result records.

  python -m experiments.grids.render_docs  # rewrites every rendered table
  python -m experiments.grids.render_docs --check   # exit 1 if a table differs

A rendered table sits between two markers in a Markdown file:

  <!-- table:NAME -->
  ...rendered lines, ending with the records they come from...
  <!-- /table:NAME -->

`TABLES` maps each NAME to the function that renders it from files under
`experiments/results/` (grid results in `runs/`, benchmark records; the
tables beyond README's are made in `doc_tables.py` and `bench_tables.py`); the
function also returns the files it read, which the block names on its last
line. Everything outside the markers is prose and is left alone. `--check`
re-renders every block and names each one whose text differs from what the
records say (a hand-edited figure, a record added or changed since), with the
first differing line; a marker without its closing marker or a NAME without
a renderer is an error too.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments.common import records
from experiments.common.repo import REPO_ROOT
from experiments.common.repo import RESULTS
from experiments.grids import bench_tables
from experiments.grids import doc_tables
from experiments.grids import report
from experiments.grids.doc_tables import Rendered

DOCS = ('README.md', 'docs/sparse.md', 'docs/running.md',
        'experiments/README.md')
_OPEN = re.compile(r'^<!-- table:([\w.-]+) -->$')


_repo_path = doc_tables.repo_path
_pct = doc_tables.pct


# ------------------------------------------------------------------ tables

# README's headline table: (label, the seed-0 run, the runs of seeds 0-2).
# A label's '{cpu}' is the CPU family the seed-0 run trained on.
HEADLINE_ROWS = (
    ('dense', 'simclr_c10_dense', ('simclr_c10_dense', 'simclr_c10_dense_seed1',
                                   'simclr_c10_dense_seed2')),
    ('CDG', 'simclr_c10_cdg', ('simclr_c10_cdg', 'simclr_c10_cdg_seed1',
                               'simclr_c10_cdg_seed2')),
    ('CDG structured 2x2x4', 'simclr_c10_cdg_structured', ()),
    ('channel predictor (FBS-style)', 'simclr_c10_channel_predictor',
     ('simclr_c10_channel_predictor', 'simclr_c10_channel_predictor_seed1',
      'simclr_c10_channel_predictor_seed2')),
    ('spatial predictor (dual-gating-style)', 'simclr_c10_spatial_predictor',
     ('simclr_c10_spatial_predictor', 'simclr_c10_spatial_predictor_seed1',
      'simclr_c10_spatial_predictor_seed2')),
)


def _results_by_name() -> tuple[dict[str, dict[str, Any]], str]:
  results = report.load_results(RESULTS)
  return {r['name']: r for r in report.trained(results)}, os.path.join(
      RESULTS, 'runs')


def _seed_mean(runs: list[dict[str, Any]], with_reduction: bool) -> str:
  if len(runs) < 2:
    return '-'
  knn = sum(r['knn_top1'] for r in runs) / len(runs)
  linear = sum(r['linear_top1'] for r in runs) / len(runs)
  text = f'{100 * knn:.2f} / {100 * linear:.2f}'
  if with_reduction:
    text += f' ({sum(r["flops_reduction"] for r in runs) / len(runs):.2f}x)'
  return text


def headline_table() -> Rendered:
  """README's headline rows: seed 0 and the mean of seeds 0-2."""
  by_name, runs_dir = _results_by_name()
  lines = ['| SimCLR, CIFAR-10 (test split) | kNN top-1 | linear top-1 | '
           'backbone FLOPs reduction | kNN / linear, mean of seeds 0-2 |',
           '| --- | --- | --- | --- | --- |']
  sources = []
  for label, first, seeds in HEADLINE_ROWS:
    run = by_name[first]
    seed_runs = [by_name[name] for name in seeds if name in by_name]
    dense = run['gating'] == 'none'
    lines.append(f'| {label} | {_pct(run["knn_top1"])} | '
                 f'{_pct(run["linear_top1"])} | '
                 f'{run["flops_reduction"]:.2f}x | '
                 f'{_seed_mean(seed_runs, with_reduction=not dense)} |')
    sources += [first] + [name for name in seeds if name != first and
                          name in by_name]
  return Rendered(lines, [_repo_path(os.path.join(runs_dir, f'{n}.json'))
                          for n in sources])


def _width_sources(rows) -> list[str]:
  names = sorted(r['name'] for methods in rows.values()
                 for runs in methods.values() for r in runs.values())
  return [_repo_path(os.path.join(RESULTS, 'runs', f'{n}.json'))
          for n in names]


def width_table() -> Rendered:
  """The gap along width in full (`report.width_lines`' first table)."""
  results = report.load_results(RESULTS)
  lines = report.width_lines(results)
  first = next(i for i, line in enumerate(lines) if line.startswith('|'))
  end = next((i for i in range(first, len(lines))
              if not lines[i].startswith('|')), len(lines))
  return Rendered(lines[first:end],
                  _width_sources(report.width_rows(results)))


def _gap_cell(methods, method: str, key: str) -> str:
  """Mean over the seeds both runs have of (method - dense) in points, and
  the seeds' own gaps."""
  dense, gated = methods.get('dense', {}), methods.get(method, {})
  seeds = sorted(set(dense) & set(gated))
  if not seeds:
    return 'not run'
  gaps = [100 * (gated[s][key] - dense[s][key]) for s in seeds]
  return (f'{sum(gaps) / len(gaps):+.2f} (' +
          ', '.join(f'{g:+.2f}' for g in gaps) + ')')


def width_gap_table() -> Rendered:
  """README's gap along width: kNN and linear gaps to dense, per seed."""
  results = report.load_results(RESULTS)
  rows = report.width_rows(results)
  predictor = 'channel predictor (density 0.4)'
  lines = ['| width | seeds (dense, CDG, predictor) | CDG kNN gap | CDG '
           'linear gap | channel predictor kNN gap | channel predictor linear '
           'gap | FLOPs reduction (CDG / predictor) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for width in report.WIDTHS:
    methods = rows.get(width, {})
    seeds = '; '.join(','.join(map(str, sorted(methods.get(m, {}))))
                      or '-' for m in ('dense', 'CDG', predictor))

    def reduction(method):
      runs = list(methods.get(method, {}).values())
      return (f'{sum(r["flops_reduction"] for r in runs) / len(runs):.2f}x'
              if runs else '-')

    lines.append(f'| {width} | {seeds} | '
                 f'{_gap_cell(methods, "CDG", "knn_top1")} | '
                 f'{_gap_cell(methods, "CDG", "linear_top1")} | '
                 f'{_gap_cell(methods, predictor, "knn_top1")} | '
                 f'{_gap_cell(methods, predictor, "linear_top1")} | '
                 f'{reduction("CDG")} / {reduction(predictor)} |')
  return Rendered(lines, _width_sources(rows))


# The speed targets the peer benchmark is read against (ours / theirs, as
# speeds: above 1, ours is faster).
# Issue 49's targets (issue 40's were 0.6 and 1.0).
PEER_TARGETS = {'dense_vs_torch_compiled_dense': 0.8,
                'sparse_vs_torch_compiled_masked': 1.5,
                'sparse_vs_best_dense': 1.6}


def _verdict(ratio: float | None, target: float | None) -> str:
  if ratio is None:
    return '-'
  if target is None:
    return f'**{ratio:.2f}x**'
  if ratio >= target:
    return f'**{ratio:.2f}x** (target {target}x: met)'
  return f'**{ratio:.2f}x** (target {target}x: missed by {target - ratio:.2f})'


def peer_table(record_path: str) -> Callable[[], Rendered]:
  """README's table against PyTorch's compiled step, from one peer record
  (its paired ratios: per round, then the median)."""
  def render() -> Rendered:
    record = records.read_record(os.path.join(REPO_ROOT, record_path))
    rows = {row['key']: row['median_step_s'] for row in record['rows']}
    flags = record['flags']
    reduction = next(row['flops_reduction'] for row in record['rows']
                     if row['key'] == 'cdg_jax/sparse')
    lines = [f'| step, width {flags["width"]}, {flags["image_size"]}x'
             f'{flags["image_size"]}, batch {flags["batch_size"]} | cdg_jax | '
             f'PyTorch compiled | ours / theirs (speed) |',
             '| --- | --- | --- | --- |']
    for label, ours, theirs, ratio in (
        ('dense', 'cdg_jax/dense', 'torch/dense/compiled_channels_last',
         'dense_vs_torch_compiled_dense'),
        (f'sparse tiles, {reduction:.2f}x fewer FLOPs, vs PyTorch masked',
         'cdg_jax/sparse', 'torch/masked/compiled_channels_last',
         'sparse_vs_torch_compiled_masked')):
      lines.append(f'| {label} | {rows[ours]:.2f} s | {rows[theirs]:.2f} s | '
                   + _verdict(record['ratios'][ratio]['paired'],
                              PEER_TARGETS[ratio]) + ' |')
    if record.get('best_dense'):
      # Records of several layouts (--other_cpu_devices): the sparse step
      # of a training run's layout against our fastest dense layout.
      devices = {row['key']: row['devices'] for row in record['rows']}
      best = record['best_dense']['variant']
      lines.append(
          f'| sparse tiles ({devices["cdg_jax/sparse"]} devices) vs our '
          f'fastest dense ({devices[best]} devices: '
          f'{record["best_dense"]["median_step_s"]:.2f} s) | '
          f'{rows["cdg_jax/sparse"]:.2f} s | - | '
          + _verdict(record['default_sparse_vs_best_dense'],
                     PEER_TARGETS['sparse_vs_best_dense']) + ' |')
    return Rendered(lines, [record_path])
  return render


TABLES: dict[str, Callable[[], Rendered]] = {
    'headline': headline_table,
    'width': width_table,
    'width_gaps': width_gap_table,
    'peer': peer_table('experiments/results/peer/2026-12-07T21-55-22-xeon.json'),
    **doc_tables.GRID_TABLES,
    **bench_tables.BENCH_TABLES,
}


# --------------------------------------------------------------- rendering


def block_lines(name: str) -> list[str]:
  """The rendered block of table `name`, markers excluded."""
  if name not in TABLES:
    raise KeyError(f'No renderer for the table {name!r} (known: '
                   f'{", ".join(sorted(TABLES))}); add it to '
                   f'experiments/grids/render_docs.py TABLES or fix the marker.')
  rendered = TABLES[name]()
  by_folder: dict[str, list[str]] = {}
  for source in rendered.sources:
    folder, file = os.path.split(source)
    by_folder.setdefault(folder, []).append(file)
  return rendered.lines + ['', 'Rendered by `python -m '
                           'experiments.grids.render_docs` from ' +
                           '; '.join(f'`{folder}/`: ' + ', '.join(files)
                                     for folder, files in by_folder.items())
                           + '.']


def render_text(text: str, path: str) -> tuple[str, list[str]]:
  """`text` with every table block re-rendered, and the names of the blocks
  whose content changed."""
  lines = text.split('\n')
  out, changed, i = [], [], 0
  while i < len(lines):
    match = _OPEN.match(lines[i])
    out.append(lines[i])
    i += 1
    if not match:
      continue
    name = match.group(1)
    close = f'<!-- /table:{name} -->'
    try:
      end = lines.index(close, i)
    except ValueError:
      raise ValueError(f'{path}: <!-- table:{name} --> has no closing '
                       f'{close}.') from None
    new = block_lines(name)
    if lines[i:end] != new:
      changed.append(_first_difference(name, lines[i:end], new))
    out += new + [close]
    i = end + 1
  return '\n'.join(out), changed


def _first_difference(name: str, old: Sequence[str], new: Sequence[str]
                      ) -> str:
  for k, (a, b) in enumerate(zip(old, new)):
    if a != b:
      return (f'table {name!r}, line {k + 1}:\n    in the file:  {a}\n'
              f'    from records: {b}')
  return (f'table {name!r}: {len(old)} lines in the file, {len(new)} from '
          f'the records')


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  check = '--check' in argv
  paths = [a for a in argv if not a.startswith('--')] or [
      os.path.join(REPO_ROOT, d) for d in DOCS]
  stale = []
  for path in paths:
    with open(path) as f:
      text = f.read()
    new_text, changed = render_text(text, path)
    stale += [f'{_repo_path(path)}: {c}' for c in changed]
    if changed and not check:
      with open(path, 'w') as f:
        f.write(new_text)
  if check and stale:
    print('Tables that differ from their records (run python -m '
          'experiments.grids.render_docs to re-render them):\n' +
          '\n'.join(stale))
    return 1
  print(f'{len(stale)} table(s) re-rendered.' if not check else
        'Every rendered table matches its records.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
