"""The checkout the experiments sit in: its root, its results, its config
files, and its experiments run as processes of their own.

Experiments run as modules from the repository root (`python -m
experiments.grids.run_grid`), so the checkout's `cdg_jax` and `experiments`
are imported, never an installed copy; a process an experiment starts runs
its module the same way, from the root (`module_command`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESULTS = os.path.join(REPO_ROOT, 'experiments', 'results')


def module_command(module: str) -> list[str]:
  """The command that runs the experiments module `module` (a dotted name,
  e.g. a module's own `__spec__.name`) in a fresh interpreter: start it with
  `cwd=REPO_ROOT` (or REPO_ROOT on PYTHONPATH) so that it is found."""
  return [sys.executable, '-m', module]


def config_module(name: str) -> types.ModuleType:
  """The config file `configs/<name>.py` as a module, loaded from its path
  (configs/ is no package)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO_ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def protocol_config():
  """The CPU protocol's CDG SimCLR config (`configs/cpu_protocol.py:
  simclr_cifar10`) on synthetic images of its shape."""
  config = config_module('cpu_protocol').get_config('simclr_cifar10')
  config.data.source = 'fake'
  return config
