"""The installable package: the wheel in a fresh environment, and the layout.

The wheel test builds the project's wheel, installs it into a new virtual
environment without the TFDS extra (so without TensorFlow), and runs the
three console commands from a directory outside the repository, with the
config file addressed by its path, as a user of `pip install cdg_jax` would.
"""

import ast
import json
import os
import shutil
import sys

import pytest

import launch
from test_train import ROOT

PACKAGE = os.path.join(ROOT, 'cdg_jax')


def _imports_of(module_path):
  """The cdg_jax modules a module imports, at the top or inside functions."""
  modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith('.py')}
  with open(module_path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'cdg_jax':
        found |= {a.name for a in node.names if a.name in modules}
      elif node.module.startswith('cdg_jax.'):
        found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names
                if a.name.startswith('cdg_jax.')}
  return found


def test_no_module_imports_one_that_imports_it_back():
  modules = sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith('.py'))
  graph = {m: _imports_of(os.path.join(PACKAGE, f'{m}.py')) - {m}
           for m in modules}

  def reachable(start):
    seen, stack = set(), [start]
    while stack:
      for nxt in graph[stack.pop()]:
        if nxt not in seen:
          seen.add(nxt)
          stack.append(nxt)
    return seen

  circles = {m: sorted(d for d in graph[m] if m in reachable(d))
             for m in modules if m in reachable(m)}
  assert circles == {}
  # The counting module stands alone: the FLOPs command lives apart.
  assert 'evaluation' not in reachable('flops')
  assert {'predictors'} <= graph['layers'] and 'predictors' not in reachable(
      'gating')


def test_importing_flops_does_not_import_evaluation():
  result = launch.run(
      [sys.executable, '-c', 'import sys, cdg_jax.flops; print(sorted(m for m '
       'in sys.modules if m.startswith("cdg_jax")))'],
      cwd=ROOT, capture_output=True, text=True, check=True,
      env={**os.environ, 'PYTHONPATH': ROOT})
  loaded = json.loads(result.stdout.replace("'", '"'))
  assert 'cdg_jax.flops' in loaded and 'cdg_jax.evaluation' not in loaded


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """A fresh virtual environment with only the project's wheel installed."""
  root = tmp_path_factory.mktemp('wheel')
  # Built from a copy of what the wheel is made of, so that setuptools'
  # build/ and *.egg-info land there, not in the checkout.
  source = root / 'source'
  shutil.copytree(PACKAGE, source / 'cdg_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), source / name)
  wheels = root / 'dist'
  launch.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                  '--quiet', '-w', str(wheels), str(source)], check=True,
                 capture_output=True, text=True)
  [wheel] = [w for w in os.listdir(wheels) if w.endswith('.whl')]
  venv = root / 'venv'
  launch.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  result = launch.run(
      [str(venv / 'bin' / 'pip'), 'install', '--quiet', str(wheels / wheel)],
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return venv


def _command(venv, name, *args, cwd):
  # A clean environment: nothing from the repository or this test session
  # (no PYTHONPATH, no forced host devices).
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['PATH'] = f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}'
  return launch.run([str(venv / 'bin' / name), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def test_the_wheel_runs_the_commands_without_tensorflow(installed, tmp_path):
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  python = str(installed / 'bin' / 'python')
  probe = launch.run(
      [python, '-c', 'import importlib.util as u, cdg_jax; '
       'print(u.find_spec("tensorflow") is None, cdg_jax.__file__)'],
      cwd=outside, capture_output=True, text=True, check=True)
  no_tensorflow, location = probe.stdout.split()
  assert no_tensorflow == 'True'                    # no TFDS extra
  assert str(installed) in location                 # not the repository's
  config = os.path.join(ROOT, 'configs', 'simclr_cifar10.py') + ':smoke'
  workdir = str(tmp_path / 'run')
  # -v 0: the INFO lines (metrics, progress rate and ETA) on the console too.
  result = _command(installed, 'cdg-train', f'--config={config}',
                    f'--workdir={workdir}', '--config.num_steps=4',
                    '--config.log_every_steps=2',
                    '--config.checkpoint.every_steps=2',
                    '--config.plot_images=1', '-v', '0', cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'kNN top-1' in result.stdout
  assert os.path.exists(os.path.join(workdir, 'summary.json'))
  # Progress reports (rate and ETA) and TensorBoard event files without
  # TensorFlow, as clu gives them with it.
  assert 'steps/s, ETA' in result.stdout + result.stderr
  events = [f for f in os.listdir(workdir)
            if f.startswith('events.out.tfevents')]
  assert events and os.path.getsize(os.path.join(workdir, events[0])) > 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4]
  assert any('steps_per_sec' in r for r in records)
  result = _command(installed, 'cdg-linear-eval', f'--config={config}',
                    f'--workdir={workdir}', '--config.linear_eval.epochs=2',
                    cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'test top-1' in result.stdout
  result = _command(installed, 'cdg-flops', f'--workdir={workdir}',
                    cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reduction' in result.stdout.lower()
  # The package data came along (ImageNet-100's class list).
  listing = launch.run(
      [python, '-c', 'import importlib.resources as r; print(r.files("cdg_jax")'
       '.joinpath("imagenet100_classes.txt").read_text().split())'],
      cwd=outside, capture_output=True, text=True, check=True)
  wnids = json.loads(listing.stdout.replace("'", '"'))
  assert len(wnids) == 100 and all(w.startswith('n') for w in wnids)
