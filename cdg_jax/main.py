r"""Pretrains a CDG-gated ResNet with self-supervised learning.

  python -m cdg_jax.main --config=configs/byol_cifar100.py --workdir=/tmp/byol
  cdg-train --config=configs/byol_cifar100.py --workdir=/tmp/byol  # installed
  python -m cdg_jax.main --config=configs/byol_cifar100.py:smoke --workdir=/tmp/s

Re-running with the same --workdir resumes from its latest checkpoint; a
workdir that holds another run's outputs without a checkpoint is refused
unless the config is that run's, or --set_aside_earlier_run moves them aside.
Override any config field on the command line, e.g. `--config.batch_size=512`.
SIGTERM or Ctrl-C saves a checkpoint after the current step and exits with
status 143; success exits with 0, any failure with a non-zero status and
its reason as the last line (`FATAL: ...`). The console shows progress and
results, `-v 0` adds the INFO logs (per-step metrics, checkpointing, the
tracebacks behind a FATAL line).
"""

# Before any third-party import of the program: a library-only install
# (`pip install cdg_jax`) gets the install command, not a ModuleNotFoundError.
from cdg_jax import run as _run  # pylint: disable=g-import-not-at-top
_run.require_program_dependencies('cdg-train (python -m cdg_jax.main)')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cdg_jax.run import cli
from cdg_jax.run import parallel

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with variants: file.py:smoke,dense.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, metrics and results.')
_SET_ASIDE = flags.DEFINE_bool(
    'set_aside_earlier_run', False,
    'Train a new run in a --workdir that holds another run\'s outputs but no '
    'checkpoint (refused otherwise, unless the config is that run\'s): its '
    'files are first moved to <workdir>/earlier_runs/<time>/.')
flags.mark_flags_as_required(['config', 'workdir'])
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
  config = _CONFIG.value
  # Before JAX starts: on a CPU-only host, one XLA device per core (the flag
  # does nothing on GPU/TPU machines).
  parallel.configure_cpu(config.cpu_devices)
  # TensorFlow is imported only by the TFDS source, which keeps it off the
  # accelerators (input_pipeline._import_tfds).
  cli.initialize_distributed_from_flags()
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  with cli.reported_errors():
    train.train_and_evaluate(config, _WORKDIR.value,
                             set_aside_earlier_run=_SET_ASIDE.value)


def run() -> None:
  """Entry point of `python -m cdg_jax.main` and `cdg-train`."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
