"""Preemption, damaged checkpoints, one run per workdir, and clear input errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cdg_jax import checkpoints
from cdg_jax import input_pipeline
from cdg_jax import metric_logging
from cdg_jax import run_control
from cdg_jax import train
from test_train import ROOT, load_config

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


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path):
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(_smoke_config(), straight)

  # The same run as a real process, sent SIGTERM once it has logged step 3.
  workdir = str(tmp_path / 'preempted')
  process = subprocess.Popen(
      [sys.executable, '-m', 'cdg_jax.main', *_SMOKE, f'--workdir={workdir}'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
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
  config = load_config('simclr_cifar10')
  config.num_steps = 6
  config.checkpoint.every_steps = 3
  config.log_every_steps = 3
  config.plot_images = 0
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')
  train.train_and_evaluate(config, reference)
  train.train_and_evaluate(config, workdir)
  # Truncate every array file of the newest checkpoint.
  damaged = os.path.join(workdir, 'checkpoints', '6')
  for folder, _, files in os.walk(damaged):
    for name in files:
      if os.sep + 'd' in folder:
        path = os.path.join(folder, name)
        os.truncate(path, os.path.getsize(path) // 2)
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from_step'] == 3
  _assert_same_backbone(reference, workdir)
  # Nothing is deleted: the damaged step is moved aside.
  moved = os.listdir(os.path.join(workdir, checkpoints.DAMAGED_DIR))
  assert len(moved) == 1 and moved[0].startswith('6-')
  assert _metric_steps(workdir) == [3, 6]

  # When no checkpoint restores, the error names the directory and the fix.
  for step in ('3', '6'):
    os.remove(os.path.join(workdir, 'checkpoints', step, 'default',
                           '_METADATA'))
  with pytest.raises(checkpoints.NoValidCheckpointError,
                     match=r'(?s)None of the 2 checkpoint\(s\) in .*checkpoints'
                     r'.*start the run from scratch'):
    train.train_and_evaluate(config, workdir)


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

  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
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
