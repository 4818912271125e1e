r"""The cost of a gs:// workdir: the CPU-protocol training loop, local vs GCS.

  python -m experiments.benchmarks.benchmark_gcs_workdir --steps=200 --rounds=1

Runs the CPU protocol's SimCLR config for `--steps` steps twice per round,
once with a local workdir and once with `gs://` on fake-gcs-server (started
here on 127.0.0.1, in memory; tests/gcs_server.py), local first in even
rounds and gs:// first in odd ones, with metrics every 20 steps and a
checkpoint every 100 as the config sets. The
figure is the training loop's time for the steps after the first report
(compilation excluded), from the `steps_per_sec` rows of metrics.jsonl: it
includes the checkpoint saves and, on gs://, the uploads of metrics.jsonl
and the event file that follow each checkpoint. Prints one JSON line per
run; writes a dated record (`experiments/common/records.py`) with every
run's seconds per 20 steps and the ratio gs/local, overall and per round.
Run it alone: the two cores are shared.
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

from experiments.common import records

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


def _metrics_rows(server, workdir: str) -> list[dict]:
  """metrics.jsonl of a finished run, from disk or from the bucket."""
  if not workdir.startswith('gs://'):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return _rows(f.read())
  bucket = workdir.split('/')[2]
  name = urllib.parse.quote('run/metrics.jsonl', safe='')
  with urllib.request.urlopen(
      f'{server.url}/storage/v1/b/{bucket}/o/{name}?alt=media') as reply:
    return _rows(reply.read().decode())


def _order(round_index: int) -> tuple[str, str]:
  """local first in even rounds, gs:// first in odd ones: a machine that
  slows (or speeds up) over the benchmark weighs on both alike."""
  return ('local', 'gs') if round_index % 2 == 0 else ('gs', 'local')


def _render(record: dict) -> str:
  lines = ['| round | workdir | loop after step 20 (s) | process wall (s) |',
           '| --- | --- | --- | --- |']
  lines += [f"| {r['round']} | {r['workdir']} | {r['loop_s_after_step_20']} "
            f"| {r['process_wall_s']} |" for r in record['runs']]
  return '\n'.join(lines + [
      '', f"gs:// over local (sums of the loop times): "
      f"**{record['gs_over_local']}x**; per round: "
      f"{', '.join(f'{x}x' for x in record['gs_over_local_per_round'])}", ''])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'experiments', 'results', 'gcs_workdir'))
  args = parser.parse_args()
  server = _gcs_server_module().GcsServer()
  env = {**os.environ, **server.env, 'PYTHONPATH': ROOT}
  runs = []
  try:
    for round_index in range(args.rounds):
      for kind in _order(round_index):
        workdir = (tempfile.mkdtemp(prefix='cdg_jax_bench_') if kind == 'local'
                   else f'gs://{server.bucket()}/run')
        wall = _run(workdir, args.steps, env)
        rows = _metrics_rows(server, workdir)
        runs.append({'round': round_index, 'workdir': kind,
                     'loop_s_after_step_20': round(_loop_seconds(rows, 20), 2),
                     'process_wall_s': round(wall, 1),
                     'seconds_per_20_steps': [
                         [r['step'], round(20 / r['steps_per_sec'], 2)]
                         for r in rows if 'steps_per_sec' in r]})
        print(json.dumps(runs[-1]), flush=True)
  finally:
    server.stop()
  loop = {kind: [r['loop_s_after_step_20'] for r in runs
                 if r['workdir'] == kind] for kind in ('local', 'gs')}
  path = records.write_record(args.out, 'gcs_workdir', {
      'steps': args.steps, 'rounds': args.rounds,
      'checkpoint_every_steps': 100, 'log_every_steps': 20,
      'server': 'fake-gcs-server, memory backend, 127.0.0.1, on the same '
                'cores as the training',
      'runs': runs,
      'gs_over_local': round(sum(loop['gs']) / sum(loop['local']), 4),
      'gs_over_local_per_round': [round(g / l, 4) for g, l in
                                  zip(loop['gs'], loop['local'])],
  }, render=_render, devices={'platform': 'cpu', 'count': None,
                              'note': 'the CPU protocol\'s own devices'})
  records.print_record(path)


if __name__ == '__main__':
  main()
