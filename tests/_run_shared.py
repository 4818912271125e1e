"""One small finished run per test process, trained once, copied by the tests.

Several tests need the same short uninterrupted run of the smoke config (to
damage, resume, evaluate or compare against): training it costs about as
much as each test's own check. `copy_of_small_run` trains it the first time
a test of this process asks (an xdist worker runs several test files) and
gives each test its own copy, so no test sees another's changes. The run's
directory is removed when the process exits.
"""

import atexit
import functools
import os
import shutil
import tempfile

from cdg_jax import train
from test_train import load_config

# The run: the smoke config, 4 steps, a checkpoint every 2, metrics at every
# step. The same settings on the command line (a test's real command that
# must match the run's config.json; `log_every_steps` and `plot_images` are
# execution fields, free to differ on a resume).
SMALL_RUN_ARGS = ('--config.num_steps=4', '--config.checkpoint.every_steps=2',
                  '--config.log_every_steps=1', '--config.plot_images=0')


def small_config(num_steps=4):
  """The small run's config (`num_steps` changed for a resume that trains
  further)."""
  config = load_config('simclr_cifar10')
  config.num_steps = num_steps
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  config.plot_images = 0
  config.linear_eval.epochs = 1
  return config


@functools.cache
def _small_run() -> str:
  root = tempfile.mkdtemp(prefix='cdg_jax_tests_small_run_')
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  workdir = os.path.join(root, 'run')
  train.train_and_evaluate(small_config(), workdir)
  return workdir


def copy_of_small_run(workdir) -> str:
  """A copy at `workdir` of the finished small run (checkpoints of steps 2
  and 4, backbone, summary.json, metrics.jsonl, config.json); returns
  `workdir` as a string."""
  workdir = str(workdir)
  shutil.copytree(_small_run(), workdir)
  return workdir
