r"""Prints the FLOPs table of a config's network or of a trained run.

  python -m cdg_jax.flops_table --config=configs/default.py   # or: cdg-flops
  python -m cdg_jax.flops_table --workdir=/tmp/smoke

With `--config`: a randomly initialised network on one batch of random images
(gates use batch statistics, as in training). With `--workdir`: the backbone
a training run exported, measured over the whole test split of its data
(gates in eval mode). The counting itself is `cdg_jax.gating.flops`.
"""

from __future__ import annotations

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


def main(argv):
  """Prints the FLOPs table of a trained run, or of a config's random network."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  cli.quiet_logging()
  if flags.FLAGS.workdir:
    with cli.reported_errors():
      config, report = trained_report(flags.FLAGS.workdir)
    print(f'{config.model.name} ({config.model.stem} stem, width '
          f'{config.model.width}), gating.kind={config.gating.kind}, trained '
          f'in {flags.FLAGS.workdir}; gates in eval mode, densities averaged '
          f'over the whole test split of {config.data.source}:'
          f'{config.data.dataset}.')
    print(report.format_table())
    return
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('Give --config (random network) or --workdir '
                         '(trained run).')
  batch_size = flags.FLAGS.batch_size
  model = models.create_resnet(config.model,
                               config_lib.read_gating(config.gating).layer)
  size = config.data.image_size
  rng = jax.random.key(config.seed)
  init_rng, data_rng = jax.random.split(rng)
  variables = jax.jit(lambda r: model.init(
      r, jnp.zeros((1, size, size, 3)), train=False))(init_rng)
  x = jax.random.normal(data_rng, (batch_size, size, size, 3))
  report = flops.measure(model, variables, x, train=True)
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
