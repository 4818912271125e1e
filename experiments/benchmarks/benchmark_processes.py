r"""Train-step time of 2 processes x 1 device against 1 process x 2 devices.

  python -m experiments.benchmarks.benchmark_processes  # the CPU protocol
  python -m experiments.benchmarks.benchmark_processes --steps=10 --config=simclr_cifar10,dense

The same global computation either way (the batch split over two devices);
what differs is how the devices exchange gradients, BatchNorm statistics and
contrastive negatives: inside one process (XLA's in-process collectives) or
between two processes over the distributed runtime (gloo over TCP on
127.0.0.1). The ratio is that overhead. Each configuration compiles, runs
one warm-up step, then times `--steps` steps; the median is printed (in the
two-process case, process 0's). Nothing else should run on the machine.
"""

import json
import os
import socket
import subprocess

from absl import app
from absl import flags

from experiments.common import repo
from experiments.common.repo import REPO_ROOT as ROOT

flags.DEFINE_string('config', 'simclr_cifar10',
                    'configs/cpu_protocol.py argument: file[,variants].')
flags.DEFINE_integer('steps', 10, 'Timed steps per configuration.')
flags.DEFINE_integer('process_id', -1, 'Internal: run as this process.')
flags.DEFINE_integer('num_processes', 1, 'Internal.')
flags.DEFINE_integer('port', 0, 'Internal: coordinator port.')
FLAGS = flags.FLAGS


def _time_here() -> dict:
  """Times the step in this process (after joining the others, if any)."""
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  if FLAGS.num_processes > 1:
    parallel.initialize_distributed(f'127.0.0.1:{FLAGS.port}',
                                    FLAGS.num_processes, FLAGS.process_id)
  config = repo.config_module('cpu_protocol').get_config(FLAGS.config)
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.common import step_timing  # pylint: disable=g-import-not-at-top
  result = step_timing.time_step(config, FLAGS.steps)
  result['processes'] = jax.process_count()
  return result


def _run(num_processes: int, devices_per_process: int) -> dict:
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS':
         f'--xla_force_host_platform_device_count={devices_per_process}'}
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      repo.module_command(__spec__.name) + [
          f'--process_id={i}', f'--num_processes={num_processes}',
          f'--port={port}', f'--config={FLAGS.config}',
          f'--steps={FLAGS.steps}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(num_processes)]
  outputs = [p.communicate() for p in processes]
  for p, (_, err) in zip(processes, outputs):
    if p.returncode:
      raise RuntimeError(f'A benchmark process failed:\n{err[-3000:]}')
  return json.loads([l for l in outputs[0][0].splitlines()
                     if l.startswith('{')][-1])


def main(argv):
  del argv
  if FLAGS.process_id >= 0:
    print(json.dumps(_time_here()), flush=True)
    return
  one = _run(1, 2)
  two = _run(2, 1)
  print(f'configs/cpu_protocol.py:{FLAGS.config}, batch of the config, '
        f'median of {FLAGS.steps} steps, {os.cpu_count()} CPU cores:')
  for label, r in (('1 process x 2 devices', one),
                   ('2 processes x 1 device', two)):
    print(f'  {label:<24} {r["median_step_s"]:.3f} s/step  '
          f'{r["images_per_s"]:.1f} images/s  (first step, with compilation, '
          f'{r["first_step_s"]:.1f} s)')
  print(f'  2 processes / 1 process step time: '
        f'{two["median_step_s"] / one["median_step_s"]:.2f}')


if __name__ == '__main__':
  app.run(main)
