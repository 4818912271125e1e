"""Several processes for real: JAX's distributed runtime on one machine.

Every test starts real `cdg_jax.main` / `cdg_jax.linear_eval` processes that
join through the real coordination service (127.0.0.1, gloo collectives on
CPU, one CPU device per process), and compares numbers or files with a
single-process run, or checks a step, an exit status and a message. No part
of `jax.distributed` is mocked.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cdg_jax.run import checkpoints
from cdg_jax.run import parallel
from cdg_jax.run import run_control
from test_train import ROOT
import launch
import xla_env

STEPS = 8
SMOKE = ['--config=configs/simclr_cifar10.py:smoke',
         f'--config.num_steps={STEPS}', '--config.log_every_steps=1',
         '--config.checkpoint.every_steps=4', '--config.plot_images=2',
         '--config.linear_eval.epochs=3']
# Process 1 runs under this wrapper: it records every file opened for
# writing in the workdir outside orbax's directories, to check that only
# process 0 writes the run's files.
_RECORD_WRITES = r"""
import atexit, builtins, json, os, runpy, sys
workdir, record = os.path.abspath(sys.argv[1]), sys.argv[2]
written = set()
_open = builtins.open
def recording_open(file, mode='r', *args, **kwargs):
  path = os.path.abspath(str(file)) if isinstance(file, (str, os.PathLike)) else ''
  if any(m in mode for m in 'wax+') and path.startswith(workdir + os.sep):
    relative = os.path.relpath(path, workdir)
    # orbax's directories, and the writability probe every process makes.
    if not relative.startswith(('checkpoints', 'backbone', '.write_test')):
      written.add(relative)
  return _open(file, mode, *args, **kwargs)
builtins.open = recording_open
atexit.register(lambda: _open(record, 'w').write(json.dumps(sorted(written))))
sys.argv = [sys.argv[3]] + sys.argv[4:]
runpy.run_module(sys.argv[0], run_name='__main__')
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env():
  """The test environment without conftest's two forced host devices: each
  process splits its host as --config.cpu_devices says."""
  return {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': xla_env.xla_flags()}


def _launch(workdir, *args, num_processes=2, module='cdg_jax.main',
            record=None, port=None, heartbeat_timeout_s=10):
  """Starts the processes of one run; returns (Popen list, port)."""
  port = port or _free_port()
  processes = []
  for process_id in range(num_processes):
    flags = [f'--workdir={workdir}', *SMOKE, '--config.cpu_devices=1', *args,
             f'--coordinator_address=127.0.0.1:{port}',
             f'--num_processes={num_processes}', f'--process_id={process_id}',
             f'--heartbeat_timeout_seconds={heartbeat_timeout_s}']
    if record and process_id == 1:
      command = [sys.executable, '-c', _RECORD_WRITES, workdir, record, module]
    else:
      command = [sys.executable, '-m', module]
    processes.append(launch.popen(
        command + flags, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  return processes, port


def _finish(processes, timeout=600):
  """[(returncode, stdout, stderr)] of each process."""
  results = []
  for process in processes:
    out, err = process.communicate(timeout=timeout)
    results.append((process.returncode, out, err))
  return results


def _excerpt(err):
  """A failed process's stderr for an assertion message: its first lines
  (where JAX's runtime says why it aborts) and its last (the traceback)."""
  if len(err) <= 6000:
    return err
  return f'{err[:3000]}\n[...]\n{err[-3000:]}'


def _report(results):
  """Every process's status and stderr: when one process of a run fails,
  the reason is often in another's output (the one that stopped first)."""
  return '\n'.join(f'--- process {i}: status {code} ---\n{_excerpt(err)}'
                    for i, (code, _, err) in enumerate(results))


def _single(workdir, *args, module='cdg_jax.main'):
  # One process: a fork of a process that has imported the program
  # (launch.run_module). The processes of a launch are real ones (_launch).
  return launch.run_module(
      module, [f'--workdir={workdir}', *SMOKE, '--config.cpu_devices=2',
               *args], cwd=ROOT, env=_env(), timeout=600)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _backbone(workdir):
  return checkpoints.load_backbone(workdir)[2]


def _last_line(stderr):
  return [l for l in stderr.strip().splitlines() if '%|' not in l][-1]


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  """The smoke config as 2 processes x 1 device and as 1 process x 2.

  The two-process run is preempted once: SIGTERM to process 1 after step 2,
  then the same command again, which resumes. So one pair of runs checks
  both that a preempted and resumed two-process run ends where the
  uninterrupted one-process run ends, and (from what the first start left)
  how the processes stop together; each start costs two fresh processes
  that compile everything.
  """
  root = tmp_path_factory.mktemp('runs')
  multi, single = str(root / 'multi'), str(root / 'single')
  records = [str(root / f'process1_writes_{start}.json') for start in (1, 2)]
  processes, _ = _launch(multi, record=records[0])
  assert _wait_for_step(multi, 2, processes)
  processes[1].send_signal(signal.SIGTERM)   # one process only
  stopped = _finish(processes)
  stop = {'results': stopped,
          'checkpoints': checkpoints.complete_steps(multi),
          'locked': os.path.exists(os.path.join(multi, run_control.LOCK_FILE))}
  processes, _ = _launch(multi, record=records[1])
  results = _finish(processes)
  for code, _, err in results:
    assert code == 0, _report(stopped + results)
  result = _single(single)
  assert result.returncode == 0, _excerpt(result.stderr)
  return multi, single, results, records, stop


def test_two_processes_train_as_one_process_with_two_devices(two_runs):
  multi, single, results, records, _ = two_runs
  # Same per-step losses and gate densities: bit-identical, since both runs
  # reduce over the same two devices in the same order (gloo's all-reduce
  # of two operands adds them as XLA's in-process reduction does), and the
  # two-process run's resume restores its state exactly.
  multi_rows, single_rows = _rows(multi), _rows(single)
  assert [r['step'] for r in multi_rows] == list(range(1, STEPS + 1))
  for a, b in zip(multi_rows, single_rows):
    for key in ('loss', 'ssl_loss', 'gate_density', 'flops_reduction'):
      assert a[key] == b[key], (a['step'], key)
  # The same final backbone.
  a, b = _backbone(multi), _backbone(single)
  flat_a = dict(zip(*_paths_and_leaves(a)))
  flat_b = dict(zip(*_paths_and_leaves(b)))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
  # The same evaluation: kNN (bank and queries spread over the processes)
  # and test-set FLOPs.
  with open(os.path.join(multi, 'summary.json')) as f:
    multi_summary = json.load(f)
  with open(os.path.join(single, 'summary.json')) as f:
    single_summary = json.load(f)
  for key in ('knn_top1', 'knn_top5', 'flops_reduction', 'gate_density',
              'layer_density', 'steps'):
    assert multi_summary[key] == single_summary[key], key
  # One summary, printed by process 0 only.
  assert 'kNN top-1' in results[0][1] and 'kNN top-1' not in results[1][1]
  # Process 1 wrote none of the run's files, in either start (orbax's
  # checkpoints and the exported backbone are written collectively).
  for record in records:
    with open(record) as f:
      assert json.load(f) == [], record
  for name in ('metrics.jsonl', 'summary.json', 'config.json',
               'gate_density.png', 'gate_masks.png'):
    assert os.path.exists(os.path.join(multi, name)), name


def _paths_and_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(p) for p, _ in flat], [v for _, v in flat]


def test_linear_eval_of_two_processes_matches_one(two_runs):
  multi, single = two_runs[:2]
  processes, _ = _launch(multi, module='cdg_jax.linear_eval')
  results = _finish(processes)
  for code, _, err in results:
    assert code == 0, _report(results)
  result = _single(single, module='cdg_jax.linear_eval')
  assert result.returncode == 0, _excerpt(result.stderr)
  with open(os.path.join(multi, 'linear_eval.json')) as f:
    multi_eval = json.load(f)
  with open(os.path.join(single, 'linear_eval.json')) as f:
    single_eval = json.load(f)
  for key in ('top1', 'top5', 'train_top1', 'flops_reduction', 'num_train',
              'num_test'):
    assert multi_eval[key] == single_eval[key], key


def _wait_for_step(workdir, step, processes, timeout=300):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(p.poll() is not None for p in processes):
      return False
    if os.path.exists(path):
      with open(path) as f:
        if len(f.readlines()) >= step:
          return True
    time.sleep(0.05)
  return False


def test_sigterm_to_one_process_stops_all_at_one_step_and_they_resume(
    two_runs):
  multi, _, results, _, stop = two_runs
  stopped = set()
  for code, _, err in stop['results']:
    assert code == 143, _report(stop['results'])
    line = _last_line(err)
    assert line.startswith('Stopped by a preemption notice after step'), line
    stopped.add(int(line.split('after step ')[1].split()[0]))
  assert len(stopped) == 1   # the same step in every process
  step = stopped.pop()
  assert 2 <= step < STEPS
  # The step it stopped at was saved (beside step 4, the smoke config's
  # periodic checkpoint, when it stopped later), and the lock released.
  assert stop['checkpoints'][-1] == step
  assert not stop['locked']
  # Started again, both resumed there; process 0 prints for the run. That
  # they ended as the uninterrupted run ends is the first test's.
  assert f'Resumed from {multi}/checkpoints at step {step}.' in results[0][1]
  assert 'Resumed from' not in results[1][1]


def test_a_killed_process_stops_the_other_naming_it_and_the_run_resumes(
    tmp_path, two_runs):
  del two_runs   # trained first: its programs are in the compilation cache
  workdir = str(tmp_path / 'run')
  processes, _ = _launch(workdir, '--config.num_steps=200',
                         '--config.checkpoint.every_steps=4')
  assert _wait_for_step(workdir, 6, processes)
  killed_at = time.time()
  processes[1].send_signal(signal.SIGKILL)
  (code, _, err), (killed, _, _) = _finish(processes, timeout=120)
  assert killed == -signal.SIGKILL
  # Within a bounded time (the 10 s heartbeat timeout bounds it), non-zero,
  # with the lost process named. Caught in a collective (most of a step),
  # the program says so as its last line (status 75); caught elsewhere (in
  # a checkpoint save's wait), JAX's runtime ends the process itself
  # (SIGABRT) with its own message naming the task.
  assert time.time() - killed_at < 60
  if code == 75:
    assert _last_line(err).startswith('FATAL: process 0 stops: lost process 1 '
                                      'of this run'), _last_line(err)
  else:
    assert code == -signal.SIGABRT, _excerpt(err)
    # The runtime's two wordings (which one depends on where the loss is
    # noticed), both naming task 1.
    assert re.search(r'Task 1 heartbeat timeout|stopped sending heartbeats\)'
                     r':\s*1\s', err), _excerpt(err)
  saved = checkpoints.complete_steps(workdir)
  assert saved and saved[-1] >= 4
  # What the kill left restores: the next start resumes from the newest
  # checkpoint and trains on. It is started as one process with both
  # devices (the same global mesh; a two-process resume is the SIGTERM
  # test's): it tests what the kill left on disk, and a second process
  # would compile every program anew (JAX's compilation cache serves
  # process 0 only). It trains to STEPS where the checkpoint is before it
  # (step 4, as a rule): the programs of `two_runs`' single-process run,
  # which the cache holds, instead of new ones for another length.
  result = _single(workdir, '--config.num_steps=' + str(
      max(STEPS, saved[-1] + 2)), '--config.checkpoint.every_steps=4')
  assert result.returncode == 0, _excerpt(result.stderr)
  assert f'at step {saved[-1]}.' in result.stdout


def test_a_second_run_on_the_workdir_is_refused_by_every_process(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, run_control.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(),
               'started': 'now'}, f)   # a live owner: this test
  processes, _ = _launch(workdir)
  results = _finish(processes, timeout=300)
  for code, _, err in results:
    assert code == 2, _report(results)
  assert f'in use by process {os.getpid()}' in _last_line(results[0][2])
  assert 'process 0 of this one found its lock' in _last_line(results[1][2])
  assert sorted(os.listdir(workdir)) == [run_control.LOCK_FILE]


def test_bad_launch_values_fail_fast_with_the_reason(tmp_path):
  workdir = str(tmp_path / 'run')
  port = _free_port()

  def run(*flags, timeout=120):
    return launch.run_module(
        'cdg_jax.main', [f'--workdir={workdir}', *SMOKE,
                         '--config.cpu_devices=1', *flags],
        cwd=ROOT, env=_env(), timeout=timeout)

  result = run(f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
               '--process_id=2')
  assert result.returncode == 2
  assert _last_line(result.stderr) == (
      'FATAL: --process_id=2 must be in [0, --num_processes=2).')
  result = run(f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2')
  assert result.returncode == 2 and '--process_id missing' in result.stderr
  # Nobody serves the coordinator: a clear error after the timeout, no hang
  # and no abort.
  start = time.time()
  result = run(f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
               '--process_id=1', '--initialization_timeout=3')
  assert result.returncode == 1 and time.time() - start < 60
  assert _last_line(result.stderr).startswith(
      f'FATAL: Process 1 could not reach the coordinator at 127.0.0.1:{port} '
      f'within 3 s')
  assert not os.path.exists(workdir)
  # Processes started with different configs: all stop before training.
  processes = []
  for process_id, extra in ((0, []), (1, ['--config.gating.groups=2'])):
    processes.append(launch.popen(
        [sys.executable, '-m', 'cdg_jax.main', f'--workdir={workdir}', *SMOKE,
         '--config.cpu_devices=1', *extra,
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={process_id}'], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  (code0, _, err0), (code1, _, err1) = _finish(processes, timeout=300)
  assert (code0, code1) == (1, 1)
  assert 'gating.groups: process 0 4, process 1 2' in err1
  assert 'Process(es) [1] were started with another config' in err0
  assert not os.path.exists(workdir)


def test_lost_processes_is_empty_on_one_process():
  assert parallel.lost_processes() == []


_CONFIGURE_CPU = """
import json, os, sys
from cdg_jax.run import parallel
added = parallel.configure_cpu(int(sys.argv[1]))
import jax
conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
# 32 channels: XLA gives YNNPACK convolutions of 32 channels or more.
hlo = jax.jit(conv).lower(jax.numpy.ones((2, 8, 8, 32)),
                          jax.numpy.ones((3, 3, 32, 32))).compile().as_text()
print(json.dumps({'added': added, 'flags': os.environ['XLA_FLAGS'],
                  'devices': jax.device_count(),
                  'ynn_convolution': '__ynn' in hlo,
                  # Once JAX has started, the same count again changes
                  # nothing (another count is refused:
                  # tests/test_hostile_launch.py).
                  'again': parallel.configure_cpu(int(sys.argv[1]))}))
"""


def _configure_cpu(cpu_devices, xla_flags):
  process = subprocess.run(
      [sys.executable, '-c', _CONFIGURE_CPU, str(cpu_devices)], cwd=ROOT,
      env={**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=120, check=True)
  return json.loads(process.stdout.strip().splitlines()[-1])


def test_configure_cpu_sets_its_flags_before_jax_starts_and_keeps_the_users():
  fresh = _configure_cpu(3, '')
  assert fresh['added'] == {
      '--xla_cpu_experimental_ynn_fusion_type': parallel.CPU_CONVOLUTION_FLAG,
      '--xla_force_host_platform_device_count':
          '--xla_force_host_platform_device_count=3'}
  assert fresh['devices'] == 3
  # XLA's own convolution kernels, not YNNPACK's; and once JAX has started,
  # nothing changes.
  assert not fresh['ynn_convolution'] and fresh['again'] == {}
  # The user's flags win: here, YNNPACK's convolutions and 2 devices.
  users = ('--xla_cpu_experimental_ynn_fusion_type=+individual_convolution '
           '--xla_force_host_platform_device_count=2')
  kept = _configure_cpu(3, users)
  assert kept['added'] == {} and kept['flags'] == users
  assert kept['devices'] == 2 and kept['ynn_convolution']
  # One device: only the kernels' flag.
  assert list(_configure_cpu(1, '')['added']) == [
      '--xla_cpu_experimental_ynn_fusion_type']


def test_the_tests_compile_with_the_programs_convolution_kernels():
  assert parallel.CPU_CONVOLUTION_FLAG in os.environ['XLA_FLAGS'].split()
