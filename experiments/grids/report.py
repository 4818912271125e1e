"""The grid's report: results.md / results.csv tables and the plots.

Built from every result in `<results_dir>/runs/` (`<name>.json`; the
results set aside in `runs/earlier/` by a rerun are not read): the main
table, the seed summary, the matched-FLOPs comparison, the gap to dense
along scale, the per-layer densities, `accuracy_vs_flops.png`,
`matched_flops.png` and `gap_to_dense.png`.

A result is a record (`records.py`) with a 'record' header (date, command,
commit, machine, devices, versions); results saved before the header existed
are read too. The table's 'finished' and 'cpu' columns come from the
header's date and CPU model where the result does not have them itself;
results.csv leaves the rest of the header out.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from experiments.grids.grids import GRIDS


class ResultFileError(ValueError):
  """A file under `<results_dir>/runs/` that is not a run's result."""


def read_result(path: str) -> dict[str, Any]:
  """One run's saved result; ResultFileError naming the file and the
  problem when it is empty, not JSON, or not a result."""
  # The runner writes a result whole (a temporary file, then a rename), so a
  # bad file was truncated or edited by hand; without the file's name,
  # json's own message ("Expecting value: line 1 column 1") leaves the user
  # to search the directory for it.
  name = os.path.basename(path)[:-len('.json')]
  fix = (f'Restore it, or delete it and run python -m '
         f'experiments.grids.run_grid again to train {name} anew.')
  with open(path, 'rb') as f:
    data = f.read()
  if not data.strip():
    raise ResultFileError(f'{path}: the result file is empty. {fix}')
  try:
    result = json.loads(data)
  except ValueError as e:
    raise ResultFileError(f'{path}: not valid JSON ({e}). {fix}') from e
  if not isinstance(result, dict) or not isinstance(result.get('name'), str):
    raise ResultFileError(
        f'{path}: not a run\'s result (a JSON object with a "name"; found '
        f'{type(result).__name__}'
        f'{" without a name" if isinstance(result, dict) else ""}). {fix}')
  if 'record' in result and not isinstance(result['record'], dict):
    raise ResultFileError(
        f'{path}: its "record" header is a {type(result["record"]).__name__}, '
        f'not a JSON object (records.py). {fix}')
  return result


def load_results(results_dir: str) -> list[dict[str, Any]]:
  """All saved run results, in grid order, then by name.

  Raises:
    ResultFileError: a file under `<results_dir>/runs/` is empty, not JSON,
      or not a run's result (the message names it).
  """
  runs_dir = os.path.join(results_dir, 'runs')
  if not os.path.isdir(runs_dir):
    return []
  results = []
  for filename in sorted(os.listdir(runs_dir)):
    path = os.path.join(runs_dir, filename)
    # runs/earlier/ (results a rerun set aside) is a folder: not read.
    if filename.endswith('.json') and os.path.isfile(path):
      results.append(with_defaults(read_result(path)))
  order = {run.name: i for i, run in enumerate(
      r for runs in GRIDS.values() for r in runs)}
  return sorted(results, key=lambda r: (order.get(r['name'], len(order)),
                                        r['name']))


# Gating fields added after the first runs (issues 12, 20 and 22), with the
# value every earlier run had: a result saved before a field existed is read
# as having run with it.
ADDED_GATING_DEFAULTS = {'grouping': 'first', 'saliency_norm': 'batch',
                         'saliency_grad': False, 'surrogate': 'sigmoid',
                         'target_anneal_fraction': 0.0,
                         'partner_norm': 'shared',
                         'predictor_saliency': 'bounded', 'stage_blocks': [],
                         'budget_bounds_fraction': 0.0,
                         'budget_start_fraction': 0.0,
                         'budget_ramp_fraction': 0.0}


def with_defaults(result: dict[str, Any]) -> dict[str, Any]:
  """A result with the fields earlier runs did not record, at their values,
  and 'finished' and 'cpu' from its 'record' header (if it has one)."""
  return {'eval_split': 'test', 'learning_rate': 1.0, 'dense_knn_top1': None,
          'linear_protocol': 'fast', 'linear_epochs': 100,
          'linear_feature_norm': 'none',
          'dense_linear_top1': None, 'diverged_at_step': None,
          **ADDED_GATING_DEFAULTS, **from_header(result), **result}


def from_header(result: dict[str, Any]) -> dict[str, Any]:
  """'finished' ('2026-12-03 20:14:59 UTC', as results wrote it before the
  header) and 'cpu' (the CPU model) of a result with a 'record' header."""
  head = result.get('record')
  if not isinstance(head, dict):
    return {}
  fields = {'cpu': head.get('cpu_model')}
  date = head.get('date')
  if isinstance(date, str):
    fields['finished'] = (date[:-1].replace('T', ' ') + ' UTC'
                          if date.endswith('Z') else date.replace('T', ' '))
  return fields


def trained(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The results that have accuracies (not diverged runs)."""
  return [r for r in results if r.get('diverged_at_step') is None]


TABLE_COLUMNS = ('name', 'framework', 'dataset', 'eval_split', 'method',
                 'knn_top1',
                 'linear_top1', 'flops_reduction', 'gate_density', 'seed',
                 'steps', 'train_wall_s', 'linear_eval_wall_s',
                 'train_command', 'linear_eval_command')


# What defines a run's setting, apart from its seed: runs equal on these are
# the same experiment at different seeds. Gating fields count only where the
# kind uses them (a dense run ignores them all, the predictors ignore the
# regulariser form and the saliency statistics; see layers.GatingSpec), so
# rows trained before a default changed still group with later ones.
SETTING_FIELDS = ('framework', 'dataset', 'eval_split', 'model', 'image_size',
                  'batch_size', 'steps', 'learning_rate', 'linear_protocol',
                  'linear_feature_norm', 'gating')
GATING_FIELDS = {
    'none': (),
    'cdg': ('block', 'regularizer', 'weight', 'density_target',
            'saliency_stats', 'branches',
            *(f for f in ADDED_GATING_DEFAULTS if f != 'predictor_saliency')),
    'channel_predictor': ('weight', 'density_target', 'branches',
                          'predictor_saliency'),
    'spatial_predictor': ('block', 'weight', 'density_target', 'branches'),
}
SEED_MEASURES = ('knn_top1', 'linear_top1', 'flops_reduction')


def seed_summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean, min and max over seeds of each setting run with several seeds.

  A rerun with a seed already counted (the `repro` row) is left out: it
  measures determinism, not the spread between seeds.

  Returns:
    One entry per setting with two or more seeds, in the order of the
    settings' first results: {'method', 'framework', 'dataset', 'steps',
    'seeds', 'runs', and for each of SEED_MEASURES '<m>_mean', '<m>_min',
    '<m>_max'}.
  """
  by_setting: dict[tuple, dict[int, dict[str, Any]]] = {}
  for r in map(with_defaults, trained(results)):
    fields = SETTING_FIELDS + GATING_FIELDS[r['gating']]
    key = tuple((f, json.dumps(r.get(f))) for f in fields)
    by_setting.setdefault(key, {}).setdefault(r['seed'], r)
  summary = []
  for runs in by_setting.values():
    if len(runs) < 2:
      continue
    seeds = sorted(runs)
    first = runs[seeds[0]]
    entry = {'method': first['method'], 'framework': first['framework'],
             'dataset': first['dataset'], 'eval_split': first['eval_split'],
             'steps': first['steps'],
             'seeds': seeds, 'runs': [runs[s]['name'] for s in seeds]}
    for measure in SEED_MEASURES:
      values = [runs[s][measure] for s in seeds]
      entry[f'{measure}_mean'] = sum(values) / len(values)
      entry[f'{measure}_min'] = min(values)
      entry[f'{measure}_max'] = max(values)
    summary.append(entry)
  return summary


def write_table(results: list[dict[str, Any]], results_dir: str) -> None:
  """Writes results.csv (every field) and results.md (the headline columns)."""
  results = [with_defaults(r) for r in results]
  os.makedirs(results_dir, exist_ok=True)
  # The record header stays in the run's file (its date and CPU model are
  # the 'finished' and 'cpu' columns).
  fields = list(TABLE_COLUMNS) + sorted(
      {k for r in results for k in r} - set(TABLE_COLUMNS) - {'record'})
  with open(os.path.join(results_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in results:
      writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                       for k, v in r.items() if k != 'record'})
  lines = ['Every accuracy and FLOPs figure is measured on the split named in '
           'the "split" column: `test` (the 10,000-image test set; training '
           'on all 25,000 training images) or `validation` (5,000 '
           'class-balanced images held out of the training set; training on '
           'the other 20,000). Choices are made on validation rows only.', '',
           'A dense-partner run trains two networks: the "dense path" column '
           'gives kNN / linear top-1 of its dense network (the same weights, '
           'every gate open; 1.00x). A run whose loss became non-finite shows '
           'the step it stopped at instead of accuracies.', '',
           '| run | framework | data | split | method | kNN top-1 | linear '
           'top-1 | FLOPs reduction | gate density | dense path | seed | '
           'steps | wall (train + linear eval) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
           '| --- | --- |']
  for r in results:
    if r['diverged_at_step'] is not None:
      measures = (f'diverged at step {r["diverged_at_step"]} | - | - | - '
                  f'| - ')
    else:
      dense = ('-' if r['dense_knn_top1'] is None else
               f'{100 * r["dense_knn_top1"]:.2f} / '
               f'{100 * r["dense_linear_top1"]:.2f}')
      measures = (f'{100 * r["knn_top1"]:.2f} | {100 * r["linear_top1"]:.2f} '
                  f'| {r["flops_reduction"]:.2f}x | {r["gate_density"]:.3f} '
                  f'| {dense} ')
    lines.append(
        f'| {r["name"]} | {r["framework"]} | {r["dataset"]} '
        f'| {r["eval_split"]} | {r["method"]} | {measures}'
        f'| {r["seed"]} | {r["steps"]} '
        f'| {r["train_wall_s"]:.0f} s + {r["linear_eval_wall_s"]:.0f} s |')
  summary = seed_summary(results)
  if summary:
    lines += ['', 'Across seeds (settings run with several seeds; mean, then '
              'min-max):', '',
              '| method | framework | data | split | steps | seeds | kNN top-1 '
              '| linear top-1 | FLOPs reduction |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for e in summary:
      def spread(measure, scale, unit):
        return (f'{scale * e[measure + "_mean"]:.2f}{unit} '
                f'({scale * e[measure + "_min"]:.2f}-'
                f'{scale * e[measure + "_max"]:.2f})')
      lines.append(
          f'| {e["method"]} | {e["framework"]} | {e["dataset"]} '
          f'| {e["eval_split"]} | {e["steps"]} | {", ".join(map(str, e["seeds"]))} '
          f'| {spread("knn_top1", 100, "")} '
          f'| {spread("linear_top1", 100, "")} '
          f'| {spread("flops_reduction", 1, "x")} |')
  lines += matched_lines(results)
  lines += gap_lines(results)
  lines += width_lines(results)
  lines += layer_lines(results)
  lines += ['', 'Commands (run from the repository root; each run\'s workdir '
            'under --workdir_root):', '']
  for r in results:
    then = (f' then `{r["linear_eval_command"]}`'
            if r['linear_eval_command'] else ' (diverged: no evaluation)')
    lines.append(f'- `{r["name"]}`: `{r["train_command"]}`{then}')
  with open(os.path.join(results_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def layer_lines(results: list[dict[str, Any]]) -> list[str]:
  """Per-layer gate densities of the runs that recorded them (issue 30 on).

  One table per network shape (the same gated layers with the same MAC
  shares): its first row is each layer's share of the backbone's dense MACs,
  then one row of densities per run, on the run's evaluation split.
  """
  tables: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for r in map(with_defaults, results):
    if r.get('layer_density') and r.get('layer_flops_share'):
      shape = tuple((name, round(r['layer_flops_share'][name], 4))
                    for name in r['layer_density'])
      tables.setdefault(shape, []).append(r)
  if not tables:
    return []
  lines = ['', 'Per-layer gate density (fraction of open gates on the run\'s '
           'split) and each gated layer\'s share of the backbone\'s dense '
           'MACs: where each run spent its FLOPs.']
  for shape, rows in tables.items():
    names = [name.replace('backbone/', '').replace('stage', 's')
             .replace('_block', 'b').replace('/conv', 'c')
             for name, _ in shape]
    lines += ['', '| run | split | ' + ' | '.join(names) + ' |',
              '| --- | --- |' + ' --- |' * len(names),
              '| MAC share | - | ' + ' | '.join(
                  f'{100 * share:.1f}%' for _, share in shape) + ' |']
    lines += [f'| {r["name"]} | {r["eval_split"]} | ' + ' | '.join(
        f'{r["layer_density"][name]:.3f}' for name, _ in shape) + ' |'
              for r in rows]
  return lines


def write_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """accuracy_vs_flops.png: kNN and linear top-1 against FLOPs reduction."""
  results = [with_defaults(r) for r in trained(results)]
  if not results:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  # One row of panels per framework, dataset, split, training length and
  # resolution: only runs trained the same way are compared against each
  # other's dense line.
  panel = lambda r: (r['framework'], r['dataset'], r['eval_split'],
                     r['steps'], r['image_size'])
  settings = sorted({panel(r) for r in results})
  fig, axes = plt.subplots(len(settings), 2, squeeze=False,
                           figsize=(11, 3.8 * max(1, len(settings))))
  methods = sorted({r['method'] for r in results})
  markers = dict(zip(methods, 'os^vDPX*<>phH8d'))
  # Up to 20 methods with distinct colours (the default cycle has 10): the
  # strong shades of tab20 first, then the light ones.
  colors = [plt.get_cmap('tab20')(i) for i in (*range(0, 20, 2),
                                               *range(1, 20, 2))]
  for row, setting in enumerate(settings):
    framework, dataset, split, steps, size = setting
    subset = [r for r in results if panel(r) == setting]
    dense = [r for r in subset if r['gating'] == 'none']
    for col, key in enumerate(('knn_top1', 'linear_top1')):
      ax = axes[row][col]
      for r in subset:
        color = colors[methods.index(r['method']) % len(colors)]
        # Main grid rows filled; ablations, reruns and other seeds hollow.
        hollow = r['group'] in ('ablations', 'repro', 'seeds')
        ax.scatter(r['flops_reduction'], 100 * r[key], s=90 if hollow else 55,
                   marker=markers.get(r['method'], 'o'), label=r['method'],
                   facecolors='none' if hollow else color, edgecolors=color,
                   linewidths=1.5)
      if dense:
        # The target region: >= 2x fewer FLOPs, within 2 points of
        # dense (its mean over seeds where there are several).
        dense_mean = sum(r[key] for r in dense) / len(dense)
        ax.axhline(100 * dense_mean - 2, color='gray', ls='--', lw=0.8)
        ax.axvline(2.0, color='gray', ls=':', lw=0.8)
      ax.set_xlabel(f'backbone FLOPs reduction (x, {split} split)')
      ax.set_ylabel(f'{"kNN" if key == "knn_top1" else "linear"} top-1 (%)')
      ax.set_title(f'{framework}, {dataset}, {split} split, {steps} steps, '
                   f'{size}x{size}\nhollow: other '
                   f'seeds, ablations, reruns; dashed: dense (mean) - 2 '
                   f'points; dotted: 2x', fontsize=8)
      ax.grid(alpha=0.3)
      handles, labels = ax.get_legend_handles_labels()
      unique = {}
      for label, handle in zip(labels, handles):
        unique.setdefault(label, handle)  # the first: the filled main row
      ax.legend(unique.values(), unique.keys(), fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, 'accuracy_vs_flops.png'), dpi=110)
  plt.close(fig)


# Matched-FLOPs comparison (issue 12): each method's accuracy-vs-FLOPs curve
# from its seed-0 test rows of the CPU protocol (SimCLR, CIFAR-10, 4 epochs)
# at several density targets, read off at these reductions by linear
# interpolation between the two nearest measured points.
MATCHED_REDUCTIONS = (2.0, 2.5)
MATCHED_SETTING = {'framework': 'simclr', 'dataset': 'cifar10',
                   'eval_split': 'test', 'steps': 388, 'seed': 0,
                   'image_size': 16, 'model': 'resnet18 width 16',
                   'linear_protocol': 'fast'}
FIRST_READING = {'grouping': 'first', 'saliency_norm': 'batch',
                 'saliency_grad': False, 'surrogate': 'sigmoid',
                 'target_anneal_fraction': 0.0, 'block': [1, 1, 1],
                 'regularizer': 'density', 'weight': 1.0,
                 'saliency_stats': 'per_branch', 'branches': 'both',
                 'partner_norm': 'shared'}
# The variant of issue 20 (ours, after Krishna et al.): CDG's first reading
# with a dense partner branch that has its own BatchNorm.
DENSE_PARTNER = {**FIRST_READING, 'branches': 'dense_partner',
                 'partner_norm': 'separate'}


def _cdg_default() -> dict[str, Any]:
  """The library's CDG defaults, in the fields a result records."""
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  defaults = config_lib.gating_config().to_dict()
  return {k: (list(defaults[k]) if k == 'block' else defaults[k])
          for k in FIRST_READING}


def curves(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Accuracy-vs-FLOPs curves: {label: rows sorted by FLOPs reduction}."""
  results = [with_defaults(r) for r in trained(results)]
  # The rerun of a row (group 'repro') is not another point of the curve.
  base = [r for r in results if r['group'] != 'repro' and
          all(r.get(k) == v for k, v in MATCHED_SETTING.items())]
  default = _cdg_default()
  families = {'CDG (default)': lambda r: r['gating'] == 'cdg' and all(
      r[k] == v for k, v in default.items())}
  if default != FIRST_READING:
    families['CDG (first reading)'] = lambda r: r['gating'] == 'cdg' and all(
        r[k] == v for k, v in FIRST_READING.items())
  families['CDG dense partner'] = lambda r: r['gating'] == 'cdg' and all(
      r[k] == v for k, v in DENSE_PARTNER.items())
  families['channel predictor'] = lambda r: (
      r['gating'] == 'channel_predictor' and
      r['predictor_saliency'] == 'bounded')
  families['spatial predictor'] = lambda r: r['gating'] == 'spatial_predictor'
  return {label: sorted([r for r in base if keep(r)],
                        key=lambda r: r['flops_reduction'])
          for label, keep in families.items()}


def interpolate(rows: list[dict[str, Any]], reduction: float,
                measure: str) -> float | None:
  """`measure` at `reduction` on the piecewise-linear curve; None outside."""
  points = [(r['flops_reduction'], r[measure]) for r in rows]
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= reduction <= x1 and x1 > x0:
      return y0 + (reduction - x0) / (x1 - x0) * (y1 - y0)
  exact = [y for x, y in points if abs(x - reduction) < 1e-9]
  return exact[0] if exact else None


def matched_lines(results: list[dict[str, Any]]) -> list[str]:
  """The matched-FLOPs section of results.md."""
  curve = curves(results)
  dense = [r for r in map(with_defaults, trained(results))
           if r['gating'] == 'none'
           and all(r.get(k) == v for k, v in MATCHED_SETTING.items()
                   if k != 'seed')]
  if not any(len(rows) >= 2 for rows in curve.values()):
    return []
  lines = ['', 'Matched FLOPs (test split; SimCLR, CIFAR-10, 388 steps, seed '
           '0): each method\'s kNN / linear top-1 read off its curve at the '
           'given backbone FLOPs reduction, **interpolated** linearly between '
           'the two nearest measured density targets ("n/a": outside the '
           'measured range). Points: ' + '; '.join(
               f'{label}: ' + ', '.join(
                   f'{r["flops_reduction"]:.2f}x {100 * r["knn_top1"]:.2f}'
                   for r in rows) for label, rows in curve.items()) + '.', '']
  if dense:
    lines += [f'Dense (mean of seeds {sorted(r["seed"] for r in dense)}): kNN '
              f'{100 * sum(r["knn_top1"] for r in dense) / len(dense):.2f}, '
              f'linear {100 * sum(r["linear_top1"] for r in dense) / len(dense):.2f}.',
              '']
  header = ' | '.join(f'kNN at {x}x | linear at {x}x'
                      for x in MATCHED_REDUCTIONS)
  lines += [f'| method | {header} |',
            '| --- |' + ' --- | --- |' * len(MATCHED_REDUCTIONS)]
  for label, rows in curve.items():
    cells = []
    for x in MATCHED_REDUCTIONS:
      for measure in ('knn_top1', 'linear_top1'):
        value = interpolate(rows, x, measure)
        cells.append('n/a' if value is None else f'{100 * value:.2f}')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return lines


def _save_panels(fig, axes, path: str) -> None:
  """A grid and a legend on every panel; the figure written and closed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_matched_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """matched_flops.png: the methods' kNN curves against FLOPs, dense line."""
  curve = curves(results)
  if not any(len(rows) >= 2 for rows in curve.values()):
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  dense = [r for r in map(with_defaults, trained(results))
           if r['gating'] == 'none'
           and all(r.get(k) == v for k, v in MATCHED_SETTING.items()
                   if k != 'seed')]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, measure in zip(axes, ('knn_top1', 'linear_top1')):
    for label, rows in curve.items():
      if rows:
        ax.plot([r['flops_reduction'] for r in rows],
                [100 * r[measure] for r in rows], 'o-', label=label)
    if dense:
      mean = 100 * sum(r[measure] for r in dense) / len(dense)
      ax.axhline(mean, color='black', lw=1, label='dense (mean of seeds)')
      ax.axhline(mean - 2, color='gray', ls='--', lw=0.8,
                 label='dense - 2 points')
    for x in MATCHED_REDUCTIONS:
      ax.axvline(x, color='gray', ls=':', lw=0.8)
    ax.set_xlabel('backbone FLOPs reduction (x, test split)')
    ax.set_ylabel(f'{"kNN" if measure == "knn_top1" else "linear"} top-1 (%)')
    ax.set_title('SimCLR, CIFAR-10, CPU protocol (388 steps), seed 0; '
                 'dotted: 2.0x and 2.5x', fontsize=8)
  _save_panels(fig, axes, os.path.join(results_dir, 'matched_flops.png'))


# The gap to dense along scale (issue 20 item 6): SimCLR, CIFAR-10, test
# split, seed 0; each column trained as the CPU protocol except the named
# axis. Rows: the runs of each method at each point (None: not run).
SCALE_POINTS = ('4 epochs', '12 epochs', '36 epochs', '32x32')
SCALE_RUNS = {
    'dense': ('simclr_c10_dense', 'simclr_c10_dense_12ep',
              'simclr_c10_dense_36ep', 'simclr_c10_dense_32px'),
    'CDG': ('simclr_c10_cdg', 'simclr_c10_cdg_12ep', 'simclr_c10_cdg_36ep',
            'simclr_c10_cdg_32px'),
    'CDG dense partner': ('simclr_c10_cdg_partner', 'simclr_c10_cdg_partner_12ep',
                          'simclr_c10_cdg_partner_36ep',
                          'simclr_c10_cdg_partner_32px'),
    'channel predictor (density 0.4)': (
        'simclr_c10_channel_predictor_d0.4', None, None,
        'simclr_c10_channel_predictor_d0.4_32px'),
}
_PARTNER_DENSE_PATH = 'CDG dense partner: its dense network'


def scale_gaps(results: list[dict[str, Any]]
               ) -> dict[str, list[dict[str, float] | None]]:
  """{method: per SCALE_POINTS, None or {'knn', 'linear' (gaps to dense in
  points, negative = below dense), 'flops'}}; the dense partner's dense
  network as a method of its own."""
  by_name = {r['name']: r for r in map(with_defaults, trained(results))}
  dense = [by_name.get(name) for name in SCALE_RUNS['dense']]
  gaps: dict[str, list[dict[str, float] | None]] = {}
  for method, names in SCALE_RUNS.items():
    if method == 'dense':
      continue
    rows = [by_name.get(name) if name else None for name in names]
    gaps[method] = [
        None if r is None or d is None else
        {'knn': 100 * (r['knn_top1'] - d['knn_top1']),
         'linear': 100 * (r['linear_top1'] - d['linear_top1']),
         'flops': r['flops_reduction']}
        for r, d in zip(rows, dense)]
    if method == 'CDG dense partner':
      gaps[_PARTNER_DENSE_PATH] = [
          None if r is None or d is None or r['dense_knn_top1'] is None else
          {'knn': 100 * (r['dense_knn_top1'] - d['knn_top1']),
           'linear': 100 * (r['dense_linear_top1'] - d['linear_top1']),
           'flops': 1.0}
          for r, d in zip(rows, dense)]
  return gaps


def gap_lines(results: list[dict[str, Any]]) -> list[str]:
  """The gap-to-dense section of results.md (empty before any scale run)."""
  gaps = scale_gaps(results)
  by_name = {r['name']: r for r in trained(results)}
  if not any(name in by_name for name in SCALE_RUNS['dense'][2:]):
    return []
  dense = ['-' if by_name.get(n) is None else
           f'{100 * by_name[n]["knn_top1"]:.2f} / '
           f'{100 * by_name[n]["linear_top1"]:.2f}'
           for n in SCALE_RUNS['dense']]
  lines = ['', 'Gap to dense along scale (test split; SimCLR, CIFAR-10, seed '
           '0; each column trained as the CPU protocol except the named axis: '
           '4 epochs at 16x16 is the protocol itself). Each cell: kNN gap / '
           'linear gap in points (negative: below dense), and the backbone '
           'FLOPs reduction; "-": not run.', '',
           '| method | ' + ' | '.join(SCALE_POINTS) + ' |',
           '| --- |' + ' --- |' * len(SCALE_POINTS),
           '| dense (kNN / linear top-1) | ' + ' | '.join(dense) + ' |']
  for method, cells in gaps.items():
    text = ['-' if c is None else
            f'{c["knn"]:+.2f} / {c["linear"]:+.2f} ({c["flops"]:.2f}x)'
            for c in cells]
    lines.append(f'| {method} | ' + ' | '.join(text) + ' |')
  return lines


def write_gap_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """gap_to_dense.png: each method's gap to dense at each scale point."""
  if not gap_lines(results):
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  gaps = scale_gaps(results)
  # The epoch points are one axis (length at 16x16) and are joined by a line
  # only between neighbours that were both run; 32x32 is another axis (4
  # epochs), drawn as a marker of the method's colour beyond a separator.
  resolution = SCALE_POINTS.index('32x32')
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, measure in zip(axes, ('knn', 'linear')):
    for i, (method, cells) in enumerate(gaps.items()):
      color = f'C{i}'
      style = '--' if method == _PARTNER_DENSE_PATH else '-'
      # NaN for a point not run: matplotlib breaks the line there.
      length = [float('nan') if c is None else c[measure]
                for c in cells[:resolution]]
      ax.plot(range(resolution), length, marker='o', ls=style, color=color,
              label=method)
      if cells[resolution] is not None:
        ax.plot([resolution], [cells[resolution][measure]], marker='s',
                color=color, ls='none')
    ax.axvline(resolution - 0.5, color='gray', lw=0.8)
    ax.axhline(0, color='black', lw=1)
    ax.axhline(-1, color='gray', ls=':', lw=0.8)
    ax.set_xticks(range(len(SCALE_POINTS)), SCALE_POINTS)
    ax.set_ylabel(f'{"kNN" if measure == "knn" else "linear"} top-1 minus '
                  f'dense (points)')
    ax.set_title('SimCLR, CIFAR-10, test split, seed 0; dotted: 1 point '
                 'below dense\nleft of the separator: length at 16x16; '
                 'right: 32x32 at 4 epochs', fontsize=8)
  _save_panels(fig, axes, os.path.join(results_dir, 'gap_to_dense.png'))


# The gap along width (issue 39): SimCLR, CIFAR-10, 16x16, 4 epochs, test
# split; per width and method, the run of each seed (0, 1, 2).
WIDTHS = (16, 32, 64)
WIDTH_METHODS = ('dense', 'CDG', 'channel predictor (density 0.4)')
_WIDTH_PREFIXES = {'dense': 'simclr_c10_dense', 'CDG': 'simclr_c10_cdg',
                   'channel predictor (density 0.4)':
                       'simclr_c10_channel_predictor_d0.4'}


def _width_run_name(method: str, width: int, seed: int) -> str:
  suffix = '' if width == 16 else f'_w{width}'
  return _WIDTH_PREFIXES[method] + suffix + (f'_seed{seed}' if seed else '')


def width_rows(results: list[dict[str, Any]]
               ) -> dict[int, dict[str, dict[int, dict[str, Any]]]]:
  """{width: {method: {seed: result}}} of the runs there are."""
  by_name = {r['name']: r for r in trained(results)}
  rows: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}
  for width in WIDTHS:
    for method in WIDTH_METHODS:
      for seed in (0, 1, 2):
        r = by_name.get(_width_run_name(method, width, seed))
        if r is not None:
          rows.setdefault(width, {}).setdefault(method, {})[seed] = r
  return rows


def width_gaps(results: list[dict[str, Any]], method: str,
               metric: str = 'knn_top1') -> dict[int, dict[int, float]]:
  """{width: {seed: `metric` gap to the dense run of the same seed, points}}
  (`metric`: 'knn_top1' or 'linear_top1'; seeds where either run lacks it
  are left out)."""
  gaps: dict[int, dict[int, float]] = {}
  for width, methods in width_rows(results).items():
    dense, gated = methods.get('dense', {}), methods.get(method, {})
    for seed in sorted(set(dense) & set(gated)):
      if dense[seed].get(metric) is None or gated[seed].get(metric) is None:
        continue
      gaps.setdefault(width, {})[seed] = 100 * (
          gated[seed][metric] - dense[seed][metric])
  return gaps


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values)


def _cell(runs: dict[int, dict[str, Any]], key: str) -> str:
  if not runs:
    return '-'
  values = [100 * runs[s][key] for s in sorted(runs)]
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return (f'{_mean(values):.2f} ({min(values):.2f}-{max(values):.2f})')


def width_lines(results: list[dict[str, Any]]) -> list[str]:
  """The gap-along-width section of results.md (empty before width runs)."""
  rows = width_rows(results)
  if not any(width != 16 for width in rows):
    return []
  lines = ['', 'The gap along width (test split; SimCLR, CIFAR-10, 16x16, 4 '
           'epochs, the CPU protocol except the width). kNN / linear top-1: '
           'the mean over the seeds run (min-max); gap: the CDG (channel '
           'predictor) run minus the dense run of the same seed, in kNN '
           'points, mean and per seed; FLOPs reduction and per-layer gate '
           'density range of CDG, mean over its seeds.', '',
           '| width | seeds | dense kNN / linear | CDG kNN / linear | '
           'channel predictor d0.4 kNN / linear | CDG gap (per seed) | '
           'predictor gap (per seed) | CDG FLOPs red. | predictor FLOPs '
           'red. | CDG layer density | convolutions | CPUs |',
           '| --- |' + ' --- |' * 11]
  cdg_gaps = width_gaps(results, 'CDG')
  predictor_gaps = width_gaps(results, 'channel predictor (density 0.4)')
  for width in WIDTHS:
    methods = rows.get(width, {})
    if not methods:
      continue
    seeds = sorted(set().union(*(set(m) for m in methods.values())))

    def gap_text(gaps):
      if not gaps:
        return '-'
      return (f'{_mean(gaps.values()):+.2f} (' + ', '.join(
          f'{gaps[s]:+.2f}' for s in sorted(gaps)) + ')')

    def reduction(method):
      runs = methods.get(method, {})
      return (f'{_mean(r["flops_reduction"] for r in runs.values()):.2f}x'
              if runs else '-')

    cdg = methods.get('CDG', {})
    densities = [d for r in cdg.values()
                 for d in (r.get('layer_density') or {}).values()]
    density = (f'{min(densities):.2f}-{max(densities):.2f}' if densities
               else '-')
    cells = [' / '.join((_cell(methods.get(m, {}), 'knn_top1'),
                         _cell(methods.get(m, {}), 'linear_top1')))
             for m in WIDTH_METHODS]
    lines.append(
        f'| {width} | {",".join(map(str, seeds))} | ' + ' | '.join(cells) +
        f' | {gap_text(cdg_gaps.get(width, {}))} | '
        f'{gap_text(predictor_gaps.get(width, {}))} | {reduction("CDG")} | '
        f'{reduction("channel predictor (density 0.4)")} | {density} | '
        f'{formulations(methods)} | {machines(methods)} |')
  lines += ['', "convolutions: how the runs computed them (`cdg_jax.gating."
            "ops.conv`): 'xla' is XLA's convolution everywhere, as before "
            "issue 40; 'auto' the per-shape default since. They compute the "
            'same sums and differ in rounding only, which is enough to flip '
            'some gate decisions, so a run is not bit-identical across them '
            '(issue 40 measured 0.25 kNN points on the width-16 CDG run). '
            'CPUs: the machines the runs trained on, per method where they '
            'differ; training is deterministic per CPU model, so on '
            'different models a seed is another draw of the same '
            'experiment.']
  lines += width_density_lines(rows)
  return lines


def machines(methods: dict[str, dict[int, dict[str, Any]]]) -> str:
  """The CPU models the runs of one width trained on: one name when all
  share it, else per method ('dense: ...; CDG: ...')."""
  by_method = {method: sorted({r.get('cpu') or '?' for r in runs.values()})
               for method, runs in methods.items() if runs}
  every = sorted({cpu for cpus in by_method.values() for cpu in cpus})
  if len(every) <= 1:
    return ', '.join(every) or '-'
  return '; '.join(f'{method}: {", ".join(cpus)}'
                   for method, cpus in by_method.items())


def formulations(methods: dict[str, dict[int, dict[str, Any]]]) -> str:
  """The convolution formulations the runs of one width trained with
  (results written before the field existed used XLA's convolution)."""
  return ', '.join(sorted({r.get('conv_formulation', 'xla')
                           for runs in methods.values()
                           for r in runs.values()}))


def width_density_lines(
    rows: dict[int, dict[str, dict[int, dict[str, Any]]]]) -> list[str]:
  """Each gated layer's density in the CDG runs of each width (mean over
  seeds, eval split) beside the layer's share of the dense MACs."""
  # Runs written before issue 30 did not record their layers' densities.
  runs = {w: [r for r in rows.get(w, {}).get('CDG', {}).values()
              if r.get('layer_density')] for w in WIDTHS}
  widths = [w for w in WIDTHS if runs[w]]
  if not widths:
    return []
  layers = list(runs[widths[0]][0]['layer_density'])
  lines = ['', 'Where CDG closes its gates at each width: each gated '
           "layer's density (the fraction of its output positions computed "
           'on the test split, mean over the seeds run) and its share of the '
           "backbone's dense MACs. Widths whose runs predate the per-layer "
           'record are left out.', '',
           f'| layer | MACs share (width {widths[0]}) | ' + ' | '.join(
               f'width {w} ({len(runs[w])} seed{"s" * (len(runs[w]) > 1)})'
               for w in widths) + ' |',
           '| --- | --- |' + ' --- |' * len(widths)]
  share = runs[widths[0]][0].get('layer_flops_share') or {}
  for layer in layers:
    cells = [f'{_mean(r["layer_density"][layer] for r in runs[w]):.3f}'
             for w in widths]
    lines.append(f'| {layer} | {100 * share.get(layer, float("nan")):.1f}% | '
                 + ' | '.join(cells) + ' |')
  lines.append('| all (FLOPs reduction) | 100% | ' + ' | '.join(
      f'{_mean(r["gate_density"] for r in runs[w]):.3f} '
      f'({_mean(r["flops_reduction"] for r in runs[w]):.2f}x)'
      for w in widths) + ' |')
  return lines


def write_width_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """gap_vs_width.png: the kNN gap (left) and the linear gap (right) to dense
  against width, each seed a point, the mean over seeds a line; CDG and the
  channel predictor."""
  if not width_lines(results):
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, (metric, name) in zip(axes, (('knn_top1', 'kNN'),
                                       ('linear_top1', 'linear'))):
    _width_panel(ax, results, metric)
    ax.set_ylabel(f'{name} top-1 minus dense, same seed (points)')
    ax.set_title(f'{name}: SimCLR, CIFAR-10, 16x16, 4 epochs, test split; '
                 'dots: seeds; dotted: 1 point below dense', fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, 'gap_vs_width.png'), dpi=120)
  plt.close(fig)


def _width_panel(ax, results: list[dict[str, Any]], metric: str) -> None:
  """One panel of gap_vs_width.png: `metric`'s gap per method and width."""
  for i, method in enumerate(('CDG', 'channel predictor (density 0.4)')):
    gaps = width_gaps(results, method, metric)
    widths = [w for w in WIDTHS if gaps.get(w)]
    if not widths:
      continue
    for width in widths:
      ax.scatter([width] * len(gaps[width]), list(gaps[width].values()),
                 color=f'C{i}', alpha=0.6, s=30)
    ax.plot(widths, [_mean(gaps[w].values()) for w in widths], color=f'C{i}',
            marker='o', label=f'{method} (mean over seeds)')
  ax.axhline(0, color='black', lw=1)
  ax.axhline(-1, color='gray', ls=':', lw=0.8)
  ax.set_xscale('log', base=2)
  ax.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
  ax.set_xlabel('ResNet-18 width (channels of the first stage)')
  ax.legend(fontsize=8)


def write_report(results_dir: str) -> list[dict[str, Any]]:
  """Writes the tables and plots of every result in `results_dir`; returns
  the results (ResultFileError on a bad result file, see `load_results`)."""
  results = load_results(results_dir)
  if results:
    write_table(results, results_dir)
    write_plot(results, results_dir)
    write_matched_plot(results, results_dir)
    write_gap_plot(results, results_dir)
    write_width_plot(results, results_dir)
  return results
