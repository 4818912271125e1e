r"""Prints the FLOPs table of a config's network or of a trained run.

  python -m cdg_jax.flops_table --config=configs/default.py   # or: cdg-flops
  python -m cdg_jax.flops_table --workdir=/tmp/smoke

With `--config`: a randomly initialised network on one batch of random images
(gates use batch statistics, as in training). With `--workdir`: the backbone
a training run exported, measured over the whole test split of its data
(gates in eval mode). Give one of the two; `--batch_size` (default 64) is
read with `--config` only. Every failure ends with one `FATAL: ...` line.
The counting itself is `cdg_jax.gating.flops`.
"""

from __future__ import annotations

# Before any third-party import of the program: a library-only install
# (`pip install cdg_jax`) gets the install command, not a ModuleNotFoundError.
from cdg_jax import run as _run  # pylint: disable=g-import-not-at-top
_run.require_program_dependencies('cdg-flops (python -m cdg_jax.flops_table)')

from typing import Any

import jax
import jax.numpy as jnp

from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.evaluators import gate_flops
from cdg_jax.gating import flops
from cdg_jax.run import checkpoints
from cdg_jax.run import cli
from cdg_jax.run import config_lib
from cdg_jax.run import parallel
from cdg_jax.run import run_control
from cdg_jax.ssl import models


def trained_report(workdir: str) -> tuple[Any, flops.FlopsReport]:
  """FLOPs of the backbone exported in `workdir`, measured on its test split.

  Runs the backbone in eval mode (gates with running saliency statistics) over
  the whole test split of the run's data source and averages the densities.

  Returns:
    (the run's config, the report).
  """
  config, backbone, variables = checkpoints.load_backbone(workdir)
  source = input_pipeline.create_source(config.data)
  mesh = parallel.make_mesh()
  batch_size = extraction.eval_batch_size(config.eval.batch_size, mesh)
  densities = extraction.extract_features(
      backbone, variables, source, 'test', batch_size, config.augment,
      mesh)['densities']
  return config, gate_flops.test_set_flops(backbone, variables, densities,
                                           config.data.image_size)


def _usage_error(message: str) -> None:
  """Ends a misused command: `FATAL: message` last, status 2 (as a bad flag)."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.stdout.flush()
  print(f'FATAL: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def flag_problem(config_given: bool, workdir: str | None, batch_size: int,
                 batch_size_given: bool) -> str | None:
  """What is wrong with the command's flags, in one line (None: nothing).

  The two modes take different flags: `--config` (a random network of the
  config file; `--batch_size` random images) and `--workdir` (a trained run,
  measured with the config it was trained with over its whole test split).
  A flag of the other mode would be silently ignored, so it is refused.
  """
  if config_given and workdir:
    return (f'--config and --workdir={workdir} were both given: --workdir '
            f'measures the trained run with the config it was trained with '
            f'(its config.json), --config a randomly initialised network of '
            f'a config file. Give one of them.')
  if not config_given and not workdir:
    return ('Give --config (a randomly initialised network of a config '
            'file) or --workdir (a trained run).')
  if workdir and batch_size_given:
    return (f'--batch_size={batch_size} would be ignored: it is read only '
            f'with --config; --workdir measures the whole test split in '
            f'batches of the run\'s eval.batch_size. Remove --batch_size.')
  if not workdir and batch_size < 1:
    return (f'--batch_size={batch_size} must be at least 1 (the number of '
            f'random images in the measured batch).')
  return None


def config_report(config, batch_size: int) -> flops.FlopsReport:
  """FLOPs of the config's randomly initialised network on one batch of
  `batch_size` random images, gates with batch statistics (as in training)."""
  model = models.create_resnet(config.model,
                               config_lib.read_gating(config.gating).layer)
  size = config.data.image_size
  rng = jax.random.key(config.seed)
  init_rng, data_rng = jax.random.split(rng)
  variables = jax.jit(lambda r: model.init(
      r, jnp.zeros((1, size, size, 3)), train=False))(init_rng)
  x = jax.random.normal(data_rng, (batch_size, size, size, 3))
  return flops.measure(model, variables, x, train=True)


def main(argv):
  """Prints the FLOPs table of a trained run, or of a config's random network.

  Every failure ends with one `FATAL: ...` line: a misused flag with status
  2, a config or run that cannot be measured with status 1
  (`cli.reported_errors`).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    _usage_error(f'Unexpected arguments: {argv[1:]}; flags are given as '
                 f'--name=value.')
  cli.quiet_logging()
  values = flags.FLAGS
  problem = flag_problem(values.config is not None, values.workdir,
                         values.batch_size, values['batch_size'].present)
  if problem:
    _usage_error(problem)
  # Before JAX starts its backends, as the other commands: one CPU device
  # per core and XLA's own convolution kernels (the numbers do not depend
  # on it, the time does).
  with cli.reported_errors():
    parallel.configure_cpu(values.config.get('cpu_devices', 0)
                           if values.config is not None else 0)
  if values.workdir:
    with cli.reported_errors():
      config, report = trained_report(
          run_control.resolve_workdir(values.workdir))
    print(f'{config.model.name} ({config.model.stem} stem, width '
          f'{config.model.width}), gating.kind={config.gating.kind}, trained '
          f'in {values.workdir}; gates in eval mode, densities averaged '
          f'over the whole test split of {config.data.source}:'
          f'{config.data.dataset}.')
    print(report.format_table())
    return
  config, batch_size = values.config, values.batch_size
  with cli.reported_errors():
    report = config_report(config, batch_size)
  size = config.data.image_size
  print(f'{config.model.name} ({config.model.stem} stem, width '
        f'{config.model.width}), gating.kind={config.gating.kind}, '
        f'{size}x{size} input; randomly initialised, one batch of '
        f'{batch_size} random images, gates with batch statistics.')
  print(report.format_table())


def run() -> None:
  """Entry point of `python -m cdg_jax.flops_table` and `cdg-flops`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # Flags are defined here, not at import, so that importing this module does
  # not claim the global flag names.
  config_flags.DEFINE_config_file('config', None, 'Config file (random init).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run: measure its '
                      'exported backbone on the test split.')
  flags.DEFINE_integer('batch_size', 64, 'Images in the measured batch '
                       '(random-init mode).')
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
