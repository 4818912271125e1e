r"""The cost of a gs:// workdir: the CPU-protocol training loop, local vs GCS.

  python -m experiments.benchmarks.benchmark_gcs_workdir --steps=200 --rounds=1

Runs the CPU protocol's SimCLR config for `--steps` steps twice per round,
once with a local workdir and once with `gs://` on fake-gcs-server (started
here on 127.0.0.1, in memory; tests/gcs_server.py), alternating, with
metrics every 20 steps and a checkpoint every 100 as the config sets. The
figure is the training loop's time for the steps after the first report
(compilation excluded), from the `steps_per_sec` rows of metrics.jsonl: it
includes the checkpoint saves and, on gs://, the uploads of metrics.jsonl
and the event file that follow each checkpoint. Prints one JSON line per
run and the ratio gs/local. Run it alone: the two cores are shared.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from experiments.common.repo import REPO_ROOT as ROOT


def _gcs_server_module():
  spec = importlib.util.spec_from_file_location(
      'gcs_server', os.path.join(ROOT, 'tests', 'gcs_server.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rows(text):
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _loop_seconds(rows, first_step):
  """Seconds of the steps after the first report, from steps_per_sec."""
  reports = [r for r in rows if 'steps_per_sec' in r]
  total, previous = 0.0, None
  for row in reports:
    if previous is not None and row['step'] > first_step:
      total += (row['step'] - previous) / row['steps_per_sec']
    previous = row['step']
  return total


def _run(workdir, steps, env):
  start = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'cdg_jax.main',
       '--config=configs/cpu_protocol.py:simclr_cifar10',
       f'--workdir={workdir}', f'--config.num_steps={steps}',
       '--config.plot_images=0'],
      cwd=ROOT, env=env, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  return time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--rounds', type=int, default=1)
  args = parser.parse_args()
  server = _gcs_server_module().GcsServer()
  env = {**os.environ, **server.env, 'PYTHONPATH': ROOT}
  figures = {'local': [], 'gs': []}
  try:
    for round_index in range(args.rounds):
      for kind in ('local', 'gs'):
        if kind == 'local':
          workdir = tempfile.mkdtemp(prefix='cdg_jax_bench_')
        else:
          workdir = f'gs://{server.bucket()}/run'
        wall = _run(workdir, args.steps, env)
        if kind == 'local':
          with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            rows = _rows(f.read())
        else:
          bucket = workdir.split('/')[2]
          name = urllib.parse.quote('run/metrics.jsonl', safe='')
          with urllib.request.urlopen(
              f'{server.url}/storage/v1/b/{bucket}/o/{name}?alt=media') as r:
            rows = _rows(r.read().decode())
        loop = _loop_seconds(rows, first_step=20)
        figures[kind].append(loop)
        print(json.dumps({'round': round_index, 'workdir': kind,
                          'loop_s_after_step_20': round(loop, 2),
                          'process_wall_s': round(wall, 1)}), flush=True)
  finally:
    server.stop()
  local, remote = sum(figures['local']), sum(figures['gs'])
  print(json.dumps({'gs_over_local': round(remote / local, 4),
                    'steps': args.steps, 'rounds': args.rounds}))


if __name__ == '__main__':
  main()
