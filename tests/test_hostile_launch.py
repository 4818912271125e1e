"""Hostile round 5 (issue 53): launch values that disagree, CPU set-up.

* Processes of one run started with different `--num_processes`, or two
  with one `--process_id`: real `cdg_jax.main` processes on 127.0.0.1, which
  must all stop within seconds with one FATAL line naming the flag and the
  values (JAX's runtime checks neither: a 2-process run went on, or both
  aborted after 126 s). The launch check's other outcomes run
  `parallel.check_launch_values` in threads of this process (no JAX).
* `configure_cpu`'s argument and a second call after JAX started: in a
  fresh interpreter, since JAX initialises its backends once per process.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cdg_jax.run import parallel
from test_failures import _command, _last_line
from test_train import ROOT
import launch
import xla_env

_SMOKE = ['--config=configs/simclr_cifar10.py:smoke', '--config.cpu_devices=1']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, port, num_processes, process_id):
  """One `cdg_jax.main` process of a launch on 127.0.0.1:port."""
  return launch.popen(
      [sys.executable, '-m', 'cdg_jax.main', f'--workdir={workdir}', *_SMOKE,
       f'--coordinator_address=127.0.0.1:{port}',
       f'--num_processes={num_processes}', f'--process_id={process_id}'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT,
                     'XLA_FLAGS': xla_env.xla_flags()},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_NUM = ('FATAL: --num_processes differs between the processes of this run: '
        '{} in process 0, {} in process 1. Start every process with the same '
        '--num_processes.')
_DUPLICATE_0 = ('FATAL: --process_id=0 was given to two processes of this run '
                '(one serves the coordinator at 127.0.0.1:{port}, the other '
                'found its port taken). Start each process with its own '
                '--process_id in [0, --num_processes=2).')


@pytest.mark.parametrize('launches,last_line', [
    # (--num_processes, --process_id, seconds after the first start)
    # Process 1 larger: JAX's runtime ran it as a 2-process run (status 0).
    ([(2, 0, 0), (3, 1, 0)], _NUM.format(2, 3)),
    # Process 0 larger (both aborted after the 120 s timeout), and started 2 s
    # after process 1: processes of a launch start seconds apart.
    ([(2, 1, 0), (3, 0, 2)], _NUM.format(3, 2)),
    # Both process 0: the second finds the coordinator port taken and
    # reports to the first (both aborted, at 3 s and 128 s).
    ([(2, 0, 0), (2, 0, 0)], _DUPLICATE_0),
], ids=['num_2_then_3', 'num_3_then_2', 'process_id_0_twice'])
def test_launch_values_that_disagree_stop_every_process_within_seconds(
    tmp_path, launches, last_line):
  workdir, port = str(tmp_path / 'run'), _free_port()
  start = time.time()
  processes = []
  for num_processes, process_id, delay_s in launches:
    time.sleep(max(0.0, start + delay_s - time.time()))
    processes.append(_start(workdir, port, num_processes, process_id))
  results = []
  for process in processes:
    out, err = process.communicate(timeout=110)
    results.append(subprocess.CompletedProcess(process.args,
                                               process.returncode, out, err))
  # Seconds (each process starts in about 5 s here), not the 120 s
  # initialization timeout.
  assert time.time() - start < 60, time.time() - start
  for result in results:
    assert result.returncode == 2, result.stderr[-3000:]
    assert _last_line(result) == last_line.format(port=port)
  assert not os.path.exists(workdir)


def _check_in_threads(launches, timeout_s=10):
  """`check_launch_values` for each (num_processes, process_id, delay_s),
  each in a thread; {index: 'ok' or the exception}."""
  address = f'127.0.0.1:{_free_port()}'
  outcome = {}

  def check(index, num_processes, process_id, delay_s):
    time.sleep(delay_s)
    try:
      parallel.check_launch_values(address, num_processes, process_id,
                                   timeout_s)
      outcome[index] = 'ok'
    except (ValueError, RuntimeError) as e:
      outcome[index] = e

  threads = [threading.Thread(target=check, args=(i, *launch_values))
             for i, launch_values in enumerate(launches)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout_s + 20)
  return address, outcome


def test_the_launch_check_passes_a_correct_launch_started_out_of_order():
  start = time.time()
  _, outcome = _check_in_threads([(3, 2, 0.0), (3, 1, 0.5), (3, 0, 1.5)])
  assert outcome == {0: 'ok', 1: 'ok', 2: 'ok'}
  # Process 0 started last: the others are answered as soon as it has
  # them all (they retry every 0.2 s until it listens).
  assert time.time() - start < 4


def test_the_launch_check_names_a_duplicate_process_id_in_every_process():
  _, outcome = _check_in_threads([(3, 0, 0.0), (3, 1, 0.3), (3, 1, 0.6)])
  for error in outcome.values():
    assert isinstance(error, ValueError)
    assert str(error) == (
        '--process_id=1 was given to two processes of this run. Start each '
        'process with its own --process_id in [0, --num_processes=3).')


def test_the_launch_check_times_out_with_the_missing_processes():
  address, outcome = _check_in_threads([(3, 0, 0.0), (3, 2, 0.3)],
                                       timeout_s=2)
  message = (f'Could not join the distributed runtime as process 0 of 3 at '
             f'{address} within 2 s: process(es) [1] did not report. Start '
             f'every process with the same --coordinator_address and '
             f'--num_processes, or raise --initialization_timeout.')
  # Process 0 stops, and tells process 2, which waited for its verdict.
  assert [type(e) for e in outcome.values()] == [RuntimeError] * 2
  assert str(outcome[0]) == str(outcome[1]) == message


def test_the_launch_check_refuses_a_port_held_by_another_program():
  # A program that answers, but not as process 0 of a launch (JAX's own
  # service answers HTTP/2 and closes).
  with socket.create_server(('127.0.0.1', 0)) as server:
    port = server.getsockname()[1]

    def answer():
      connection, _ = server.accept()
      with connection:
        connection.sendall(b'\x00\x00\x00\x04\x00\x00\x00\x00\x00')

    thread = threading.Thread(target=answer)
    thread.start()
    start = time.time()
    with pytest.raises(RuntimeError) as error:
      parallel.check_launch_values(f'127.0.0.1:{port}', 2, 0, 30)
    thread.join()
  assert time.time() - start < 5
  assert str(error.value) == (
      f'Process 0: the coordinator port 127.0.0.1:{port} is held by a '
      f'process 0 that is already running (is --process_id=0 given to two '
      f'processes?) or another program, not by a process 0 waiting for its '
      f'processes. Check the launch flags, or choose a free port for '
      f'--coordinator_address.')
  # A socket that holds the port without listening (another program's
  # connection): 5 s, not the 30 s timeout.
  with socket.socket() as holder:
    holder.bind(('127.0.0.1', 0))
    port = holder.getsockname()[1]
    start = time.time()
    with pytest.raises(RuntimeError) as error:
      parallel.check_launch_values(f'127.0.0.1:{port}', 2, 0, 30)
  assert time.time() - start < 10
  assert str(error.value) == (
      f'Process 0 could not serve the coordinator at 127.0.0.1:{port}: its '
      f'port is taken, yet nothing there accepts connections ([Errno 111] '
      f'Connection refused). Choose a free port for --coordinator_address.')


_CONFIGURE_CPU = r"""
import json, sys
from cdg_jax.run import parallel
refused = []
for bad in (2.5, '2', True, -1):
  try:
    parallel.configure_cpu(bad)
  except ValueError as e:
    refused.append(str(e))
# Before JAX starts, the last call's count holds.
parallel.configure_cpu(4)
parallel.configure_cpu(3)
import jax
devices = jax.device_count()
parallel.configure_cpu(3)   # the count JAX runs with: nothing to say
print(json.dumps({'refused': refused, 'devices': devices}), flush=True)
parallel.configure_cpu(1)
"""


def test_configure_cpu_refuses_a_bad_count_and_a_late_different_one():
  result = launch.run(
      [sys.executable, '-c', _CONFIGURE_CPU], cwd=ROOT, capture_output=True,
      text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': xla_env.xla_flags()})   # no device count of its own
  assert result.returncode == 1, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['refused'] == [
      f'configure_cpu: cpu_devices={value} ({kind}) must be an int >= 0: the '
      f'number of CPU devices, 0 for one per core.'
      for value, kind in (('2.5', 'float'), ("'2'", 'str'), ('True', 'bool'),
                          ('-1', 'int'))]
  assert report['devices'] == 3
  assert _last_line(result) == (
      'ValueError: configure_cpu(1) asks for 1 CPU device(s), but JAX already '
      'runs on 3: XLA reads its device count once, when JAX starts. Call '
      'configure_cpu before the first JAX computation, or ask for 3.')


def test_a_string_of_gated_roles_is_refused():
  from cdg_jax.ssl.models import ResNetGating  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as error:
    ResNetGating(layers='block_3x3')
  assert str(error.value) == (
      "gating.layers='block_3x3' must be a tuple of role names, e.g. "
      "('block_3x3',), not a string; the roles are 'stem', 'block_3x3', "
      "'block_1x1', 'shortcut'.")
  assert ResNetGating(layers=('block_3x3',)).gates('block_3x3')


_FLOPS_CONFIG = '--config=configs/default.py:smoke'


@pytest.mark.parametrize('args,status,last_line', [
    # Printed "reduction nanx" with status 0.
    ([_FLOPS_CONFIG, '--batch_size=0'], 2,
     'FATAL: --batch_size=0 must be at least 1 (the number of random images '
     'in the measured batch).'),
    # Ended in an MLIR error and JAX's "For simplicity..." note.
    ([_FLOPS_CONFIG, '--batch_size=-2'], 2,
     'FATAL: --batch_size=-2 must be at least 1 (the number of random images '
     'in the measured batch).'),
    # Tracebacks before; now the library's own message, last.
    (['--config=configs/simclr_imagenet100.py:tiles', '--batch_size=1'], 1,
     'FATAL: gating.block=(4, 4, 0) does not tile a gated feature map of '
     'shape (H, W, C)=(14, 14, 256): block height 4 does not divide 14. '
     'Choose a height that divides 14 (or one at least 14, which covers the '
     'whole map).'),
    ([_FLOPS_CONFIG,
      '--config.gating.stage_blocks=((4,4,0),(4,4,0),(4,4,0))'], 1,
     'FATAL: gating.stage_blocks has 3 entries for a ResNet of 4 stages: '
     'give one (bh, bw, bc) per stage, got ((4, 4, 0), (4, 4, 0), '
     '(4, 4, 0)).'),
    # --config was silently ignored beside --workdir.
    ([_FLOPS_CONFIG, '--workdir={workdir}'], 2,
     'FATAL: --config and --workdir={workdir} were both given: --workdir '
     'measures the trained run with the config it was trained with (its '
     'config.json), --config a randomly initialised network of a config '
     'file. Give one of them.'),
    (['--workdir={workdir}', '--batch_size=8'], 2,
     "FATAL: --batch_size=8 would be ignored: it is read only with --config; "
     "--workdir measures the whole test split in batches of the run's "
     "eval.batch_size. Remove --batch_size."),
    ([], 2,
     'FATAL: Give --config (a randomly initialised network of a config file) '
     'or --workdir (a trained run).'),
], ids=['batch_size_zero', 'batch_size_negative', 'tiles_on_imagenet',
        'stage_blocks_three', 'config_and_workdir', 'batch_size_with_workdir',
        'neither'])
def test_flops_command_ends_every_failure_with_one_fatal_line(
    tmp_path, args, status, last_line):
  workdir = str(tmp_path / 'run')
  result = _command(*(a.format(workdir=workdir) for a in args),
                    module='cdg_jax.flops_table')
  assert result.returncode == status, result.stderr[-3000:]
  assert _last_line(result) == last_line.format(workdir=workdir), (
      result.stderr[-3000:])
  assert 'Traceback' not in result.stderr
  assert 'reduction' not in result.stdout
  assert not os.path.exists(workdir)
