"""Preemption, damaged checkpoints, one run per workdir, and clear input errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from cdg_jax import train
from cdg_jax.data import input_pipeline
from cdg_jax.run import checkpoints
from cdg_jax.run import metric_logging
from cdg_jax.run import run_control
from test_train import ROOT, load_config
import _run_shared
import launch
import xla_env

_SMOKE = ['--config=configs/simclr_cifar10.py:smoke', '--config.num_steps=40',
          '--config.log_every_steps=1', '--config.checkpoint.every_steps=1000',
          '--config.plot_images=0']


def _smoke_config():
  config = load_config('simclr_cifar10')
  config.num_steps = 40
  config.log_every_steps = 1
  config.checkpoint.every_steps = 1000
  config.plot_images = 0
  return config


def _metric_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


def _assert_same_backbone(a, b):
  _, _, first = checkpoints.load_backbone(a)
  _, _, second = checkpoints.load_backbone(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7),
               first, second)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """The smoke run without interruption, for the resumed runs to match."""
  straight = str(tmp_path_factory.mktemp('straight') / 'run')
  train.train_and_evaluate(_smoke_config(), straight)
  return straight


def _delivered(watcher, timeout=5.0):
  # A signal sent to this process runs its Python handler in the main
  # thread at the next bytecode boundary, not inside os.kill.
  deadline = time.time() + timeout
  while watcher.signal_name is None and time.time() < deadline:
    time.sleep(0.001)
  return watcher.signal_name


def test_the_watcher_stops_on_either_signal_and_a_second_sigint_interrupts():
  # SIGTERM and SIGINT take one path from the handler on (the stop after
  # the step, the checkpoint, the "Stopped by" line): the real process
  # below is sent SIGTERM; here, that both signals reach that path, that a
  # second Ctrl-C while stopping interrupts at once, and that the handlers
  # are given back.
  previous = {sig: signal.getsignal(sig)
              for sig in run_control.PreemptionWatcher.SIGNALS}
  for signum in run_control.PreemptionWatcher.SIGNALS:
    with run_control.PreemptionWatcher() as watcher:
      assert not watcher.should_stop(1)
      os.kill(os.getpid(), signum)
      assert _delivered(watcher) == signal.Signals(signum).name
      assert watcher.should_stop(1)
      if signum == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
          os.kill(os.getpid(), signal.SIGINT)
          time.sleep(5)
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_a_signal_saves_a_checkpoint_and_the_resumed_run_matches(
    tmp_path, straight_run):
  straight = straight_run
  signum = signal.SIGTERM
  # The same run as a real process, sent the signal once it has logged step 3.
  workdir = str(tmp_path / 'preempted')
  process = launch.popen(
      [sys.executable, '-m', 'cdg_jax.main', *_SMOKE, f'--workdir={workdir}'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      process.send_signal(signum)
      break
    time.sleep(0.02)
  _, stderr = process.communicate(timeout=300)
  # 143, not an abort (134) from a thread still inside JAX at exit.
  assert process.returncode == 143, stderr[-3000:]
  assert 'FATAL' not in stderr and 'Aborted' not in stderr
  assert stderr.strip().splitlines()[-1].startswith(
      f'Stopped by {signal.Signals(signum).name} after step')
  assert 'Run the same command again to resume from step' in stderr
  # Quiet by default: no orbax or absl INFO lines on the console.
  assert 'checkpoint_manager.py' not in stderr
  stopped = int(stderr.split('resume from step ')[1].split('.')[0])
  assert 3 <= stopped < 40
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stopped)]
  assert not os.path.exists(os.path.join(workdir, run_control.LOCK_FILE))

  summary = train.train_and_evaluate(_smoke_config(), workdir)
  assert summary['resumed_from_step'] == stopped and summary['steps'] == 40
  _assert_same_backbone(straight, workdir)
  # One row per logged step, as in the uninterrupted run.
  assert _metric_steps(workdir) == _metric_steps(straight) == list(range(1, 41))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  # The reference: 4 steps, a checkpoint every 2 (trained once per test
  # process); the run to damage is a copy of it, files and all.
  config = _run_shared.small_config()
  reference = _run_shared.copy_of_small_run(tmp_path / 'reference')
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  # Truncate every array file of the newest checkpoint.
  damaged = os.path.join(workdir, 'checkpoints', '4')
  for folder, _, files in os.walk(damaged):
    for name in files:
      if os.sep + 'd' in folder:
        path = os.path.join(folder, name)
        os.truncate(path, os.path.getsize(path) // 2)
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from_step'] == 2
  _assert_same_backbone(reference, workdir)
  # Nothing is deleted: the damaged step is moved aside.
  moved = os.listdir(os.path.join(workdir, checkpoints.DAMAGED_DIR))
  assert len(moved) == 1 and moved[0].startswith('4-')
  assert _metric_steps(workdir) == [1, 2, 3, 4]

  # When no checkpoint restores, the error names the directory and the fix,
  # and, from the command line, is the last line of the output: orbax's
  # tracebacks and its closed event loops' exceptions stay in the log.
  for step in ('2', '4'):
    _truncate_arrays(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(checkpoints.NoValidCheckpointError,
                     match=r'(?s)None of the 2 checkpoint\(s\) in .*checkpoints'
                     r'.*start this run from scratch'):
    train.train_and_evaluate(config, workdir)
  result = _main(f'--workdir={workdir}', '--config.num_steps=4',
                 '--config.checkpoint.every_steps=2',
                 '--config.log_every_steps=1')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1
  assert lines[-1] == (f'No checkpoint of {workdir}/checkpoints restores '
                       f'(damaged files): use a new --workdir, or move that '
                       f'directory aside to start this run from scratch.')
  assert 'Event loop is closed' not in result.stderr
  assert 'Traceback' not in result.stderr
  assert len(_messages(result.stderr)) < 10, lines


def _messages(stderr):
  """The lines of a command's stderr other than its progress bar."""
  return [line for line in stderr.strip().splitlines() if '%|' not in line]


def _truncate_arrays(step_dir):
  for folder, _, files in os.walk(step_dir):
    for name in files:
      if os.sep + 'd' in folder:
        path = os.path.join(folder, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _main(*args, env=None, module='cdg_jax.main'):
  """Runs a command of the package as `python -m` does (smoke config), in
  a fork of a process that has imported the program (launch.run_module)."""
  # --config comes first: its overrides may only follow it.
  config = [a for a in args if a.startswith('--config=')] or [
      '--config=configs/simclr_cifar10.py:smoke']
  args = [a for a in args if not a.startswith('--config=')]
  return launch.run_module(
      module, [*config, '--config.plot_images=0', *args], cwd=ROOT,
      timeout=600, env={**os.environ, 'PYTHONPATH': ROOT, **(env or {})})


def test_shape_errors_come_before_the_workdir_and_the_fix_reruns_there(
    tmp_path):
  """Errors the first compiled step used to find, after config.json."""
  workdir = str(tmp_path / 'run')
  result = _main(f'--workdir={workdir}', '--config.gating.block=(3,3,0)',
                 '--config.num_steps=4')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('FATAL: This config '
                                                           'cannot run')
  assert 'block height 3 does not divide 16' in result.stderr
  assert not os.path.exists(workdir)
  # The same workdir with the corrected value: no stale config blocks it.
  os.makedirs(workdir)
  checkpoints.write_config(_smoke_config(), workdir)  # a config, no checkpoint
  config = _smoke_config()
  config.num_steps = 4
  config.gating.block = (2, 2, 0)
  # A small bank and test split (of the one synthetic source) keep the
  # evaluation short. Block-sparse evaluation of such a run (which compiles
  # a program per tile capacity) is test_evaluation's: here the point is
  # that the corrected value trains in the same workdir.
  config.data.fake_num_train = 64
  config.data.fake_num_test = 32
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == 4
  assert summary['sparse_inference'] is False
  # The workdir's config is the corrected one.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['gating']['block'] == [2, 2, 0]
  # Sparse inference on untiled gates: refused before training.
  other = str(tmp_path / 'sparse')
  result = _main(f'--workdir={other}', '--config.eval.sparse_inference=True')
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert 'Sparse inference skips closed tiles' in last
  assert 'gating.block=(1, 1, 1)' in last
  assert not os.path.exists(other)


@pytest.mark.parametrize('config,message', [
    ({'gating.groups': 3}, 'gating.groups=3 does not divide the 8 input'),
    ({'data.validation_size': 490},
     'batch_size=32 exceeds the 22 training images left after holding out '
     'data.validation_size=490'),
])
def test_late_shape_errors_name_the_value_before_the_workdir(tmp_path, config,
                                                            message):
  run_config = _smoke_config()
  for key, value in config.items():
    block, field = key.split('.')
    run_config[block][field] = value
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(run_config, workdir)
  assert not os.path.exists(workdir)


def test_eight_devices_evaluate_with_the_default_eval_batch(tmp_path):
  """eval.batch_size=500 is rounded up to 504 for 8 devices, not refused."""
  workdir = str(tmp_path / 'run')
  result = _main(f'--workdir={workdir}', '--config.num_steps=2',
                 env={'XLA_FLAGS': xla_env.xla_flags(device_count=8)})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['steps'] == 2 and 0 <= summary['knn_top1'] <= 1
  result = _main(f'--workdir={workdir}', '--config.linear_eval.epochs=1',
                 module='cdg_jax.linear_eval',
                 env={'XLA_FLAGS': xla_env.xla_flags(device_count=8)})
  assert result.returncode == 0, result.stderr[-3000:]


def _small_filesystem(path, size):
  """Mounts a tmpfs of `size` at `path`; False where this is not permitted."""
  os.makedirs(path, exist_ok=True)
  mounted = launch.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                            'tmpfs', str(path)], capture_output=True)
  return mounted.returncode == 0


_ENOSPC_WRAPPER = r"""
import errno, runpy, sys
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step >= 20:
    raise OSError(errno.ENOSPC, 'No space left on device', str(self.directory))
  return _save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.argv = ['cdg_jax.main'] + sys.argv[1:]
runpy.run_module('cdg_jax.main', run_name='__main__')
"""


def _temporary_files(workdir):
  return [os.path.join(folder, name)
          for folder, folders, files in os.walk(workdir)
          for name in files + folders if 'tmp' in name]


def test_writes_that_end_after_a_failed_save_leave_nothing_behind(tmp_path):
  """Orbax reports a save's first failed write while TensorStore finishes
  others, recreating the half-written step: it is removed until it stays
  gone for `quiet_seconds` (the full-disk test met such a late write once,
  in CI)."""
  directory = tmp_path / 'checkpoints'
  (directory / '10').mkdir(parents=True)
  late_write = directory / '20.orbax-checkpoint-tmp' / 'default' / 'd' / 'x'

  def write_late():
    # The first write may come before the removal begins or after it (a save
    # that failed before orbax created its directories in the background).
    # Like TensorStore, a write whose directory is removed under it tries
    # again: each of the three lands.
    for delay in (0.0, 0.3, 0.3):
      time.sleep(delay)
      while True:
        try:
          late_write.parent.mkdir(parents=True, exist_ok=True)
          late_write.write_bytes(b'late')
          break
        except FileNotFoundError:
          continue

  writer = threading.Thread(target=write_late)
  start = time.monotonic()
  writer.start()
  removed = checkpoints.remove_unfinished(str(directory), quiet_seconds=1.0)
  waited = time.monotonic() - start
  writer.join()
  assert removed == ['20.orbax-checkpoint-tmp']
  assert sorted(os.listdir(directory)) == ['10']
  assert waited >= 1.6   # the last write came 0.6 s in, then 1 s quiet
  # At the start of a run (quiet_seconds=0) nothing is waited for.
  late_write.parent.mkdir(parents=True)
  start = time.monotonic()
  assert checkpoints.remove_unfinished(str(directory)) == [
      '20.orbax-checkpoint-tmp']
  assert checkpoints.remove_unfinished(str(directory)) == []
  assert sorted(os.listdir(directory)) == ['10']
  assert time.monotonic() - start < 0.5


def test_a_full_disk_ends_with_one_clear_line_and_loses_nothing(tmp_path):
  """A real small filesystem where the test may mount one (root), else a
  checkpoint write that raises OSError(ENOSPC) from step 20 on."""
  small = tmp_path / 'small'
  real = _small_filesystem(small, '1400k')   # one smoke checkpoint is 0.8 MB
  try:
    workdir = str(small / 'run')
    args = ['--config=configs/simclr_cifar10.py:smoke', f'--workdir={workdir}',
            '--config.plot_images=0']
    if real:
      result = _main(*args)
    else:
      result = launch.run(
          [sys.executable, '-c', _ENOSPC_WRAPPER, *args], cwd=ROOT,
          capture_output=True, text=True, timeout=600,
          env={**os.environ, 'PYTHONPATH': ROOT})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert lines[-1] == (
        f'FATAL: Could not write the checkpoint of step 20 in {workdir}/'
        f'checkpoints: the disk is full (No space left on device). Free '
        f'space on that filesystem (or use a --workdir on a larger one) and '
        f'run the same command again: it resumes from step 10, the newest '
        f'complete checkpoint.'), lines[-5:]
    assert 'Event loop is closed' not in result.stderr
    assert len(_messages(result.stderr)) < 5, lines
    assert not _temporary_files(workdir)
    if real:
      # Run again on the disk still full: the same kind of last line (what
      # could not be written, where, the step it resumes from), no
      # traceback, and no temporary file or lock left behind.
      again = _main(*args)
      assert again.returncode == 1, again.stderr[-3000:]
      last = again.stderr.strip().splitlines()[-1]
      # Which write meets the full disk first varies (the lock, the config,
      # a checkpoint); an error without a file name names the workdir.
      assert re.fullmatch(
          rf'FATAL: Could not write (.+ in |to ){re.escape(workdir)}'
          r'(/checkpoints)?'
          r': the disk is full \(No space left on device\)\. Free space on '
          r'that filesystem \(or use a --workdir on a larger one\) and run '
          r'the same command again: it resumes from step 10, the newest '
          r'complete checkpoint\.', last), last
      assert 'Traceback' not in again.stderr
      assert not _temporary_files(workdir)
      assert not os.path.exists(os.path.join(workdir, run_control.LOCK_FILE))
    # Nothing saved is lost: on a larger disk the run resumes from step 10.
    moved = str(tmp_path / 'moved')
    shutil.copytree(workdir, moved)
  finally:
    if real:
      launch.run(['umount', str(small)], check=False)
  summary = train.train_and_evaluate(load_config('simclr_cifar10'), moved)
  assert summary['resumed_from_step'] == 10 and summary['steps'] == 20


def test_a_second_run_on_a_workdir_is_refused_and_stale_locks_are_taken(
    tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  lock = os.path.join(workdir, run_control.LOCK_FILE)
  with open(lock, 'w') as f:   # a live owner: this very process
    json.dump({'host': os.uname().nodename, 'pid': os.getpid(),
               'started': 'now'}, f)
  with pytest.raises(run_control.WorkdirLockedError,
                     match=f'in use by process {os.getpid()}.*delete'):
    train.train_and_evaluate(load_config('simclr_cifar10'), workdir)
  assert os.listdir(workdir) == [run_control.LOCK_FILE]   # nothing touched

  dead = launch.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  with open(lock, 'w') as f:
    json.dump({'host': os.uname().nodename, 'pid': int(dead.stdout),
               'started': 'earlier'}, f)
  with run_control.WorkdirLock(workdir):
    with open(lock) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert not os.path.exists(lock)


def test_jsonl_writer_merges_rows_of_a_step_and_drops_rows_after_a_resume(
    tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = metric_logging.JsonlWriter(path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'loss': float(step)})
    writer.write_scalars(step, {'steps_per_sec': 10.0})
  writer.write_scalars(3, {'eval/knn_top1': 0.5})
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1] == {'step': 3, 'loss': 3.0, 'steps_per_sec': 10.0,
                      'eval/knn_top1': 0.5}
  assert [r['step'] for r in rows] == [1, 2, 3]
  resumed = metric_logging.JsonlWriter(path, resume_step=2)
  resumed.write_scalars(2, {'eval/knn_top1': 0.25})
  resumed.write_scalars(3, {'loss': 2.5})
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{'step': 1, 'loss': 1.0, 'steps_per_sec': 10.0},
                  {'step': 2, 'loss': 2.0, 'steps_per_sec': 10.0,
                   'eval/knn_top1': 0.25},
                  {'step': 3, 'loss': 2.5}]


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 0, 'batch_size=0 must be a positive number'),
    ('num_steps', -5, 'num_steps=-5 must be positive, or -1'),
    ('gating.density_target', 1.5, 'density_target must be in'),
    ('log_every_steps', 0, 'log_every_steps=0 must be positive'),
    ('model.dtype', 'float16', "model.dtype='float16' must be one of"),
])
def test_bad_config_values_are_reported_before_the_workdir_is_touched(
    tmp_path, field, value, message):
  config = load_config('simclr_cifar10')
  node = config
  *parents, leaf = field.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def _npz_config(path, image_size=16):
  config = load_config('simclr_cifar10')
  config.data.source = 'npz'
  config.data.npz_path = str(path)
  config.data.image_size = image_size
  return config.data


def test_bad_npz_files_name_the_path_and_the_problem(tmp_path):
  images = np.zeros((20, 32, 32, 3), np.uint8)
  labels = np.arange(20) % 10
  good = tmp_path / 'good.npz'
  np.savez(good, x_train=images, y_train=labels, x_test=images, y_test=labels)
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  with pytest.raises(ValueError, match=r'truncated\.npz.*damaged or truncated'):
    input_pipeline.create_source(_npz_config(truncated))
  text = tmp_path / 'notes.npz'
  text.write_text('not arrays')
  with pytest.raises(ValueError, match=r'notes\.npz.* is not an \.npz archive'):
    input_pipeline.create_source(_npz_config(text))
  for split in ('train', 'test'):
    empty = tmp_path / f'empty_{split}.npz'
    arrays = dict(x_train=images, y_train=labels, x_test=images,
                  y_test=labels)
    arrays[f'x_{split}'] = images[:0]
    arrays[f'y_{split}'] = labels[:0]
    np.savez(empty, **arrays)
    # Resizing (32 -> 16) an empty split used to fail inside numpy.
    with pytest.raises(ValueError, match=f'x_{split} holds no images'):
      input_pipeline.create_source(_npz_config(empty))


def test_config_json_is_replaced_whole_never_seen_half_written(
    tmp_path, monkeypatch):
  """On a resumed run of several processes, process 0 rewrites config.json
  while the others read it (`checkpoints.check_compatible`): a reader must
  find the old file or the new one. A truncated read once stopped process 1
  alone and left process 0 waiting at orbax's start-up barrier."""
  workdir = str(tmp_path)
  path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  old = _smoke_config()
  checkpoints.write_config(old, workdir)
  new = _smoke_config()
  new.num_steps = 41
  seen = []
  replace = os.replace

  def replace_and_look(source, target):
    # What a reader finds just before the new file takes its place.
    with open(path) as f:
      seen.append(json.load(f)['num_steps'])
    replace(source, target)

  monkeypatch.setattr(os, 'replace', replace_and_look)
  checkpoints.write_config(new, workdir)
  assert seen == [old.num_steps]
  with open(path) as f:
    assert json.load(f)['num_steps'] == 41
  assert os.listdir(workdir) == [checkpoints.CONFIG_FILE]
