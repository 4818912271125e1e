r"""Median train-step time: CDG-gated vs dense SimCLR, 1 device vs one per core.

  python -m experiments.benchmarks.benchmark_step  # both device counts
  python -m experiments.benchmarks.benchmark_step --devices=1 --steps=5

CIFAR ResNet-18 (width 64), SimCLR, batch 128 images (256 views of 32x32),
synthetic uint8 images (the step's cost does not depend on pixel values:
masked work is computed and multiplied by zero, see docs/method.md [gated convolution]).
Each configuration is compiled, warmed up for one step, then timed over
`--steps` steps; the median is printed. The device count must be fixed before
JAX starts, so without `--devices` the script runs itself once per count.
"""

import json
import os
import subprocess

from absl import app
from absl import flags

from experiments.common import repo

flags.DEFINE_integer('devices', 0, 'CPU devices for this run (0: run 1 and '
                     'one per core in subprocesses).')
flags.DEFINE_integer('steps', 5, 'Timed steps per configuration.')
flags.DEFINE_integer('batch_size', 128, 'Images per step (two views each).')
flags.DEFINE_string('framework', 'simclr', 'SSL framework.')
FLAGS = flags.FLAGS


def _time_one(kind: str):
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  config.framework = FLAGS.framework
  if FLAGS.framework in ('byol', 'simsiam'):
    config.ssl.predictor_hidden_dims = (512,)
    config.ssl.predictor_dim = 128
  config.gating.kind = kind
  config.batch_size = FLAGS.batch_size
  config.num_steps = 1000
  from experiments.common import step_timing  # pylint: disable=g-import-not-at-top
  return step_timing.time_step(config, FLAGS.steps)


def main(argv):
  del argv
  if FLAGS.devices:
    for kind in ('none', 'cdg'):
      print(json.dumps(_time_one(kind)), flush=True)
    return
  results = []
  for devices in sorted({1, os.cpu_count() or 1}):
    env = {**os.environ, 'XLA_FLAGS':
           f'--xla_force_host_platform_device_count={devices}'}
    out = subprocess.run(
        repo.module_command(__spec__.name) + [
            f'--devices={devices}', f'--steps={FLAGS.steps}',
            f'--batch_size={FLAGS.batch_size}',
            f'--framework={FLAGS.framework}'],
        env=env, cwd=repo.REPO_ROOT, check=True, capture_output=True,
        text=True).stdout
    results += [json.loads(l) for l in out.splitlines() if l.startswith('{')]
  print(f'{FLAGS.framework}, CIFAR ResNet-18, batch {FLAGS.batch_size} images '
        f'(2 views), median of {FLAGS.steps} steps:')
  print(f'{"devices":>7}  {"gating":>6}  {"step s":>7}  {"img/s":>7}  '
        f'{"gated/dense":>11}')
  for r in results:
    dense = next(d for d in results if d['devices'] == r['devices']
                 and d['gating'] == 'none')
    print(f'{r["devices"]:>7}  {r["gating"]:>6}  {r["median_step_s"]:>7.2f}  '
          f'{r["images_per_s"]:>7.1f}  '
          f'{r["median_step_s"] / dense["median_step_s"]:>11.2f}')


if __name__ == '__main__':
  app.run(main)
