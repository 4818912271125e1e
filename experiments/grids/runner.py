"""Runs grid rows as real commands and saves each result as it finishes.

Each run is pretraining (`python -m cdg_jax.main`) then linear evaluation
(`python -m cdg_jax.linear_eval`), subprocesses from the repository root,
logged to `<workdir>/run_grid.log`; the result goes to
`<results_dir>/runs/<name>.json` at once, and the report is rebuilt.

A result is a record (`records.py`): its 'record' header holds the grid's
command, the date the run finished, the git commit, the machine, the devices
and XLA flags the training ran with, and the package versions; the
pretraining and linear-evaluation command lines are the result's
'train_command' and 'linear_eval_command'. A result is never overwritten: a
run saved again (`--rerun`) first moves the earlier file to
`<results_dir>/runs/earlier/<name>.<date>.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from cdg_jax.gating.ops import CONV_FORMULATION_VARIABLE
from experiments.common import records
from experiments.common.repo import REPO_ROOT
from experiments.grids.grids import GRIDS
from experiments.grids.grids import Run
from experiments.grids.report import ADDED_GATING_DEFAULTS
from experiments.grids.report import write_report


def _shell(command: list[str]) -> str:
  return ' '.join(shlex.quote(part) for part in command)


def _run_command(command: list[str], log_path: str) -> float:
  """Runs `command` from the repository root, appending to `log_path`."""
  start = time.time()
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  with open(log_path, 'a') as log:
    log.write(f'$ {_shell(command)}\n')
    log.flush()
    process = subprocess.run([sys.executable] + command[1:], cwd=REPO_ROOT,
                             env=env, stdout=log, stderr=subprocess.STDOUT,
                             check=False)
  if process.returncode != 0:
    raise RuntimeError(f'Command failed with exit status '
                       f'{process.returncode}: {_shell(command)}\n'
                       f'See the log {log_path}.')
  return time.time() - start


def result_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, 'runs', f'{name}.json')


def run_one(run: Run, results_dir: str, workdir_root: str,
            argv: list[str] | None = None) -> dict[str, Any]:
  """Trains, evaluates and saves one run's result; returns it (with its
  'record' header; `argv`: the grid's command line, default this
  process's)."""
  start = time.time()
  workdir = os.path.join(workdir_root, run.name)
  os.makedirs(os.path.join(results_dir, 'runs'), exist_ok=True)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, 'run_grid.log')
  train_command = run.train_command(workdir)
  eval_command = run.linear_eval_command(workdir)
  with open(log_path, 'a') as log:
    log_start = log.tell()
  try:
    train_s = _run_command(train_command, log_path)
  except RuntimeError:
    with open(log_path) as log:
      log.seek(log_start)
      diverged_at = divergence_step(log.read())
    if diverged_at is None:
      raise
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    result = _diverged_result(run, workdir, config, diverged_at, start,
                              train_command)
    return _save_result(results_dir, run.name, result, argv, config)
  eval_s = _run_command(eval_command, log_path)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'linear_eval.json')) as f:
    linear = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  result = _finished_result(run, config, summary, linear,
                            (train_s, eval_s), (train_command, eval_command))
  return _save_result(results_dir, run.name, result, argv, config)


def _diverged_result(run: Run, workdir: str, config: dict[str, Any],
                     diverged_at: int, start: float,
                     train_command: list[str]) -> dict[str, Any]:
  """The result of a run whose training diverged at step `diverged_at`.

  A divergence is a result (FBS's published saliency, issue 20), not a
  failure of the runner: the step, the losses before it, no accuracy.
  """
  return {**_describe(run, config), 'diverged_at_step': diverged_at,
          'losses_before_divergence': last_losses(workdir),
          'knn_top1': None, 'linear_top1': None, 'flops_reduction': None,
          'gate_density': None, 'steps': diverged_at,
          'eval_split': ('validation' if config['data']['validation_size']
                         else 'test'),
          'train_wall_s': time.time() - start, 'linear_eval_wall_s': 0.0,
          'resumed_from_step': 0, 'train_command': _shell(train_command),
          'linear_eval_command': ''}


def _finished_result(run: Run, config: dict[str, Any],
                     summary: dict[str, Any], linear: dict[str, Any],
                     wall_s: tuple[float, float],
                     commands: tuple[list[str], list[str]]
                     ) -> dict[str, Any]:
  """The result of a trained and evaluated run, from its summary.json and
  linear_eval.json; `wall_s` and `commands`: (training, linear
  evaluation)."""
  train_s, eval_s = wall_s
  train_command, eval_command = commands
  dense_knn = (summary.get('dense_network') or {}).get('knn_top1')
  dense_linear = (linear.get('dense_network') or {}).get('top1')
  return {
      **_describe(run, config),
      'eval_split': summary.get('eval_split', 'test'),
      'num_train': summary.get('num_train'),
      'steps': summary['steps'],
      'knn_top1': summary['knn_top1'], 'linear_top1': linear['top1'],
      'flops_reduction': summary['flops_reduction'],
      'gate_density': linear['gate_density'],
      # Where the network spent its FLOPs (issue 30): each gated layer's
      # density and share of the backbone's dense MACs, on the eval split.
      'layer_density': summary.get('layer_density'),
      'layer_flops_share': summary.get('layer_flops_share'),
      # The dense network of a dense-partner run (every gate open).
      'dense_knn_top1': dense_knn, 'dense_linear_top1': dense_linear,
      'diverged_at_step': None,
      # Which linear protocol made linear_top1 (cdg_jax.linear_eval).
      'linear_protocol': linear.get('linear_eval', {}).get('protocol', 'fast'),
      'linear_epochs': linear.get('linear_eval', {}).get('epochs'),
      # The augmented protocol's feature normalisation (issue 30).
      'linear_feature_norm': linear_feature_norm(linear),
      # The wall time of the commands as run by this grid (a run resumed from
      # a checkpoint counts only its last part; see resumed_from_step).
      'train_wall_s': train_s, 'linear_eval_wall_s': eval_s,
      'resumed_from_step': summary.get('resumed_from_step', 0),
      'train_command': _shell(train_command),
      'linear_eval_command': _shell(eval_command),
      # The date it finished and the CPU model (training is deterministic
      # per CPU model, not across models) are in the 'record' header.
      # How the convolutions were computed (cdg_jax.gating.ops.conv; the
      # formulations differ in rounding only). Results without the field
      # predate the per-shape default and used XLA's convolution.
      'conv_formulation': os.environ.get(CONV_FORMULATION_VARIABLE,
                                         'auto'),
  }


def linear_feature_norm(linear: dict[str, Any]) -> str:
  """The augmented protocol's feature normalisation in a linear_eval.json
  ('none' for the fast protocol, which standardises on its own, and for
  results written before the field existed)."""
  settings = linear.get('linear_eval', {})
  if settings.get('protocol') != 'augmented':
    return 'none'
  return (settings.get('augmented') or {}).get('feature_norm', 'none')


def divergence_step(log_text: str) -> int | None:
  """The step of the training loop's non-finite stop (the loss, or the state
  while the loss was finite) in a log, if any."""
  match = re.search(r'(?:Loss is \S+|NaN or infinite values in the train '
                    r'state) at step (\d+)', log_text)
  return int(match.group(1)) if match else None


def last_losses(workdir: str, count: int = 5) -> list[list[float]]:
  """[step, loss] of the last `count` rows of a run's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        rows.append([row['step'], row['loss']])
  return rows[-count:]


# The devices and XLA flags a training process starts with, by its
# (cpu_devices, XLA_FLAGS, JAX_PLATFORMS): asked once of a process started
# as `cdg_jax.main` starts (`configure_cpu(config.cpu_devices)`).
_TRAINING_DEVICES: dict[tuple, tuple[dict | None, str | None]] = {}
_PROBE = ('import json, os, sys\n'
          'from cdg_jax.run import parallel\n'
          'parallel.configure_cpu(int(sys.argv[1]))\n'
          'import jax\n'
          'print("DEVICES " + json.dumps({"devices": {'
          '"platform": jax.default_backend(), "count": jax.device_count(), '
          '"processes": jax.process_count(), '
          '"kind": jax.devices()[0].device_kind}, '
          '"xla_flags": os.environ.get("XLA_FLAGS", "")}))\n')


def training_devices(config: dict[str, Any]) -> tuple[dict | None,
                                                      str | None]:
  """(devices, XLA_FLAGS) of a training process of `config` on this
  machine, or (None, None) if a process cannot tell."""
  cpu_devices = int(config.get('cpu_devices', 0))
  key = (cpu_devices, os.environ.get('XLA_FLAGS'),
         os.environ.get('JAX_PLATFORMS'))
  if key not in _TRAINING_DEVICES:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    found = (None, None)
    try:
      process = subprocess.run(
          [sys.executable, '-c', _PROBE, str(cpu_devices)], cwd=REPO_ROOT,
          env=env, capture_output=True, text=True, timeout=300, check=False)
      for line in process.stdout.splitlines():
        if line.startswith('DEVICES '):
          reply = json.loads(line[len('DEVICES '):])
          found = (reply['devices'], reply['xla_flags'])
    except (OSError, subprocess.SubprocessError, ValueError):
      pass
    _TRAINING_DEVICES[key] = found
  return _TRAINING_DEVICES[key]


def _save_result(results_dir: str, name: str, result: dict[str, Any],
                 argv: list[str] | None = None,
                 config: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes `result` with its 'record' header to `runs/<name>.json` (an
  earlier result there first moves to `runs/earlier/`); returns it."""
  devices, xla_flags = training_devices(config or {})
  result = {'record': records.header('grid_run', argv=argv, devices=devices,
                                     xla_flags=xla_flags),
            **{k: v for k, v in result.items() if k != 'record'}}
  path = result_path(results_dir, name)
  if os.path.exists(path):
    moved = set_aside(results_dir, name)
    print(f'    the earlier result moved to {moved}', flush=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(path + '.tmp', path)
  return result


def earlier_path(results_dir: str, name: str, date: str) -> str:
  """A new file `runs/earlier/<name>.<date>.json` (never one that exists)."""
  try:
    stamp = records.date_stamp(date)
  except ValueError:   # a date written by hand
    stamp = re.sub(r'[^0-9A-Za-z-]+', '-', date.replace(':', '-')).strip('-')
  folder = os.path.join(results_dir, 'runs', 'earlier')
  path = os.path.join(folder, f'{name}.{stamp}.json')
  number = 2
  while os.path.exists(path):
    path = os.path.join(folder, f'{name}.{stamp}.{number}.json')
    number += 1
  return path


def set_aside(results_dir: str, name: str) -> str:
  """Moves the result of `name` to `runs/earlier/<name>.<date>.json`, its
  date the one it records (its header's, or 'finished' of an old result;
  the file's time if it records none); returns the new path."""
  path = result_path(results_dir, name)
  date = None
  try:
    with open(path) as f:
      earlier = json.load(f)
    date = ((earlier.get('record') or {}).get('date')
            or earlier.get('finished'))
  except (OSError, ValueError, AttributeError):
    pass
  if not isinstance(date, str) or not date:
    date = datetime.datetime.fromtimestamp(
        os.path.getmtime(path), datetime.timezone.utc).strftime(
            '%Y-%m-%dT%H:%M:%SZ')
  else:
    date = date.removesuffix(' UTC').replace(' ', 'T')
  target = earlier_path(results_dir, name, date)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.rename(path, target)
  return target


def _describe(run: Run, config: dict[str, Any]) -> dict[str, Any]:
  """The fields of a result that describe its run (not its measures)."""
  gating = config['gating']
  return {
      'name': run.name, 'group': run.group, 'method': run.method,
      'framework': config['framework'], 'dataset': config['data']['dataset'],
      'seed': config['seed'],
      'gating': gating['kind'], 'block': gating['block'],
      'regularizer': gating['regularizer'], 'weight': gating['weight'],
      'density_target': gating['density_target'],
      'saliency_stats': gating['saliency_stats'],
      'branches': gating['branches'],
      **{field: gating.get(field, default)
         for field, default in ADDED_GATING_DEFAULTS.items()},
      'threshold_target': gating['threshold_target'],
      'learning_rate': config['optim']['base_learning_rate'],
      'model': f'{config["model"]["name"]} width {config["model"]["width"]}',
      'image_size': config['data']['image_size'],
      'batch_size': config['batch_size'],
  }


def select_runs(grids: list[str], only: list[str]) -> list[Run]:
  unknown = [g for g in grids if g not in GRIDS]
  if unknown:
    raise ValueError(f'Unknown --grid {unknown}; expected any of '
                     f'{sorted(GRIDS)}.')
  runs = [run for grid in grids for run in GRIDS[grid]]
  missing = [name for name in only if name not in {r.name for r in runs}]
  if missing:
    raise ValueError(f'--only names {missing} are not runs of --grid={grids}; '
                     f'those are {[r.name for r in runs]}.')
  return [r for r in runs if not only or r.name in only]


def run_grid(grids: list[str], results_dir: str, workdir_root: str,
             only: list[str] = (), rerun: bool = False,
             argv: list[str] | None = None) -> list[dict]:
  """Runs the selected grids, skipping finished runs unless `rerun` (whose
  earlier results move to runs/earlier/); returns all results. `argv`: the
  grid's command line for the results' headers (default this process's)."""
  runs = select_runs(list(grids), list(only))
  for index, run in enumerate(runs):
    path = result_path(results_dir, run.name)
    if os.path.exists(path) and not rerun:
      print(f'[{index + 1}/{len(runs)}] {run.name}: result exists, skipped.',
            flush=True)
      continue
    if rerun:
      shutil.rmtree(os.path.join(workdir_root, run.name), ignore_errors=True)
    print(f'[{index + 1}/{len(runs)}] {run.name}: '
          f'{_shell(run.train_command(os.path.join(workdir_root, run.name)))}',
          flush=True)
    result = run_one(run, results_dir, workdir_root, argv)
    if result.get('diverged_at_step') is not None:
      print(f'    diverged at step {result["diverged_at_step"]} (last losses '
            f'{result["losses_before_divergence"]}), '
            f'{result["train_wall_s"]:.0f} s', flush=True)
    else:
      print(f'    kNN {100 * result["knn_top1"]:.2f}%, linear '
            f'{100 * result["linear_top1"]:.2f}%, FLOPs reduction '
            f'{result["flops_reduction"]:.2f}x, '
            f'{result["train_wall_s"] + result["linear_eval_wall_s"]:.0f} s',
            flush=True)
    write_report(results_dir)
  return write_report(results_dir)
