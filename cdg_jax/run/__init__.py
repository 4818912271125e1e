"""Running the program: the config parse, checkpoints, logging, processes.

  config_lib       base config, recipes, variants, and the one parse into
                   typed specs (`validate`)
  checkpoints      orbax checkpoints, the exported backbone, resume checks
  metric_logging   metrics.jsonl, TensorBoard, the console
  run_control      workdir lock, preemption signals
  parallel         the device mesh, several hosts
  memory           the train step's memory estimate, before any work
  cli              flags, quiet logging, errors reported as one message
  plots            gate-mask figures
"""

import importlib.util

# What the program imports beyond the library (pyproject.toml's `train`
# extra): import name -> distribution.
PROGRAM_DEPENDENCIES = {
    'optax': 'optax', 'orbax': 'orbax-checkpoint',
    'ml_collections': 'ml-collections', 'clu': 'clu',
    'tensorboardX': 'tensorboardX', 'dm_pix': 'dm-pix', 'absl': 'absl-py',
    'matplotlib': 'matplotlib', 'tqdm': 'tqdm', 'etils': 'etils',
    'fsspec': 'fsspec',
}


def require_program_dependencies(command: str) -> None:
  """Exits with the install command when the program's dependencies are
  missing (a library-only `pip install cdg_jax`), before an import of one
  of them would fail with a bare ModuleNotFoundError."""
  missing = [distribution for module, distribution in
             PROGRAM_DEPENDENCIES.items()
             if importlib.util.find_spec(module) is None]
  if missing:
    raise SystemExit(
        f'FATAL: {command} is the training program, which needs packages '
        f'this environment lacks ({", ".join(missing)}): pip install '
        f'"cdg_jax[train]" (or the repository\'s requirements.txt). The '
        f'library alone (cdg_jax.gating, the names cdg_jax exports) needs '
        f'only jax and flax.')
