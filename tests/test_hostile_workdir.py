"""Hostile round 5 (issue 53): what a workdir holds is never lost or misread.

A finished run whose checkpoints were deleted is not overwritten by another
run; a resume that cannot go on is refused before anything in the workdir
is written, naming the field with the values on disk; a linear evaluation
names the backbone it scored, is moved aside when the backbone changes,
waits for no training run and loses no result to a failed write. Each case
runs the real command and asserts its last line; one small run, trained once
for the module, is copied for each case.
"""

import hashlib
import json
import os
import shutil
import socket
import time

import pytest

from cdg_jax import linear_eval
from cdg_jax import train
from cdg_jax.run import checkpoints
from cdg_jax.run import run_control
import _run_shared
import launch
from test_failures import _command, _last_line

SMOKE = '--config=configs/simclr_cifar10.py:smoke'
# The module's run: the smoke config, 4 steps, a checkpoint every 2
# (`_run_shared.SMALL_RUN_ARGS`).
_ARGS = _run_shared.SMALL_RUN_ARGS


def _config(num_steps=4):
  return _run_shared.small_config(num_steps)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished run with a linear evaluation: checkpoints/, backbone/,
  backbone.json, summary.json, metrics.jsonl, linear_eval.json."""
  workdir = _run_shared.copy_of_small_run(
      tmp_path_factory.mktemp('finished') / 'run')
  linear_eval.run_linear_eval(_config(), workdir)
  return workdir


def _copy(finished_run, tmp_path, name='run'):
  workdir = str(tmp_path / name)
  shutil.copytree(finished_run, workdir)
  return workdir


def _files(folder):
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def test_a_finished_run_without_checkpoints_is_not_overwritten(
    finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))   # to save disk
  before = _files(workdir)
  # The hostile case: another run (another seed: a field that changes what
  # is trained, not the shapes) into the finished run's workdir, given as a
  # quoted '~/...' (the shell leaves the ~ to the program).
  result = _command(SMOKE, '--workdir=~/run', '--config.seed=1',
                    *_ARGS, env={'HOME': str(tmp_path)})
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  message = '\n'.join(lines[-6:])
  assert lines[-1] == (
      f'Training here would overwrite them. Use a new --workdir, or pass '
      f'--set_aside_earlier_run to move them to {workdir}/earlier_runs/<time>/ '
      f'and train a new run here.'), message
  assert (f'FATAL: {workdir} holds the outputs of another run (backbone, '
          f'backbone.json, config.json, events.out.tfevents.') in message
  assert ('but no checkpoint, and this config differs from the one it was '
          'trained with:\n  seed: earlier run 0, config 1') in message
  assert f'Workdir: {workdir}' in result.stdout
  assert _files(workdir) == before   # nothing written, nothing lost
  assert not os.path.exists(tmp_path / '~')

  # Said explicitly: the earlier files are moved aside, intact, and the new
  # run trains in the workdir.
  result = _command(SMOKE, f'--workdir={workdir}', '--config.seed=1',
                    *_ARGS, '--set_aside_earlier_run')
  assert result.returncode == 0, result.stderr[-3000:]
  (stamp,) = os.listdir(os.path.join(workdir, 'earlier_runs'))
  assert _files(os.path.join(workdir, 'earlier_runs', stamp)) == before
  assert checkpoints.read_config(workdir).seed == 1
  assert checkpoints.complete_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'linear_eval.json'))


def test_the_same_run_again_may_retrain_and_keeps_the_earlier_files(
    finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  names = checkpoints.earlier_outputs(workdir)
  assert 'summary.json' in names and 'linear_eval.json' in names
  # The config the run was trained with (an execution field may differ).
  same = _config()
  same.eval.batch_size = 64
  assert checkpoints.check_new_run_allowed(same, workdir, False) == names
  before = _files(workdir)
  moved = checkpoints.set_aside_earlier_outputs(workdir, names)
  assert _files(moved) == {k: v for k, v in before.items()}
  assert checkpoints.earlier_outputs(workdir) == []
  # No config.json to check against: refused unless said explicitly.
  bare = _copy(finished_run, tmp_path, 'bare')
  shutil.rmtree(os.path.join(bare, 'checkpoints'))
  os.remove(os.path.join(bare, 'config.json'))
  with pytest.raises(ValueError, match='it has no config.json to check this '
                     'config against.'):
    checkpoints.check_new_run_allowed(same, bare, False)
  assert checkpoints.check_new_run_allowed(same, bare, True)
  # Files the program does not write (a launcher's log) are no run's
  # outputs: neither guarded nor moved.
  fresh = tmp_path / 'fresh'
  fresh.mkdir()
  (fresh / 'run_grid.log').write_text('python -m cdg_jax.main ...')
  assert checkpoints.earlier_outputs(str(fresh)) == []
  (fresh / 'config.json').write_text('{"seed": 3}')
  assert checkpoints.earlier_outputs(str(fresh)) == ['config.json']
  assert checkpoints.check_new_run_allowed(_config(), str(fresh), False) == []


def test_a_refused_resume_writes_nothing_and_names_the_field_on_disk(
    finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  os.remove(os.path.join(workdir, 'config.json'))
  before = _files(workdir)
  result = _command(SMOKE, f'--workdir={workdir}', '--config.model.width=16',
                    *_ARGS)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == ('Run the config the checkpoint was trained with, or '
                       'use a new --workdir. Nothing in the workdir was '
                       'changed.'), lines[-6:]
  assert (f'FATAL: The checkpoint of step 4 in {workdir}/checkpoints does not '
          f'fit this config: model.width: checkpoint 8, config 16. Arrays '
          f'that differ (shapes):') in '\n'.join(lines[-8:])
  assert 'delete' not in result.stderr
  assert _files(workdir) == before   # config.json not rewritten

  # The right command resumes (no config.json to compare the other fields
  # with: said), and config.json is written again.
  result = _command(SMOKE, f'--workdir={workdir}', *_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ('config.json was missing from' in result.stdout
          and 'Resumed from' in result.stdout), result.stdout[-2000:]
  assert checkpoints.read_config(workdir).model.width == 8


@pytest.mark.parametrize('text,problem', [
    ('{"model": {"width": 8', 'is not valid JSON (Expecting'),
    ('{}', 'holds no config ({})'),
])
def test_a_config_json_that_is_no_config_is_named(finished_run, tmp_path,
                                                   text, problem):
  workdir = _copy(finished_run, tmp_path)
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    f.write(text)
  result = _command(SMOKE, f'--workdir={workdir}', *_ARGS)
  assert result.returncode == 1, result.stderr[-3000:]
  last = _last_line(result)
  assert last.startswith(f'FATAL: {path} {problem}'), last
  assert last.endswith(
      f'so the run in {workdir} cannot be checked against this config. '
      f'Restore that file (the run wrote it at its start), or use a new '
      f'--workdir.'), last
  with open(path) as f:
    assert f.read() == text


def test_linear_results_name_their_backbone_and_go_stale_with_it(
    finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  with open(os.path.join(workdir, 'linear_eval.json')) as f:
    scored = json.load(f)['backbone']
  info = checkpoints.read_backbone_info(workdir)
  assert scored['step'] == info['step'] == 4
  assert scored['digest'] == info['digest'] == checkpoints.backbone_digest(
      checkpoints.load_backbone(workdir)[2])
  # A resume that trains further exports another backbone: the result of
  # the earlier one leaves the workdir's top level, named by its step.
  train.train_and_evaluate(_config(num_steps=6), workdir)
  assert not os.path.exists(os.path.join(workdir, 'linear_eval.json'))
  with open(os.path.join(workdir, 'stale_linear_eval',
                         'step4.linear_eval.json')) as f:
    assert json.load(f)['backbone'] == scored
  assert checkpoints.read_backbone_info(workdir)['step'] == 6


def test_linear_eval_refuses_a_workdir_whose_run_is_training(finished_run,
                                                            tmp_path):
  workdir = _copy(finished_run, tmp_path)
  # The lock of a live training run (this process stands in for it).
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
  with open(os.path.join(workdir, run_control.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(),
               'started': started, 'purpose': 'training'}, f)
  result = _command(SMOKE, f'--workdir={workdir}', module='cdg_jax.linear_eval')
  assert result.returncode == 2, result.stderr[-3000:]
  assert _last_line(result) == (
      f'FATAL: The workdir {workdir} is in use by process {os.getpid()} on '
      f'host {socket.gethostname()}, started {started} (training). The '
      f'linear evaluation would read a backbone that may be replaced while '
      f'it runs: wait for that run to end, then evaluate its final backbone. '
      f'If you are sure it is gone, delete {workdir}/run.lock.')


def _read_only_copy(finished_run, tmp_path):
  """A copy of the run on a read-only filesystem (a tmpfs remounted
  read-only), or None where this process may not mount one."""
  mount_point = tmp_path / 'readonly'
  os.makedirs(mount_point)
  mounted = launch.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs',
                        str(mount_point)], capture_output=True)
  if mounted.returncode != 0:
    return None
  workdir = str(mount_point / 'run')
  shutil.copytree(finished_run, workdir)
  launch.run(['mount', '-o', 'remount,ro', str(mount_point)], check=True)
  return workdir


def test_linear_eval_checks_writability_first_and_prints_before_writing(
    finished_run, tmp_path):
  workdir = _read_only_copy(finished_run, tmp_path)
  try:
    if workdir is None:
      pytest.skip('this process may not mount a tmpfs (needs root)')
    result = _command(SMOKE, f'--workdir={workdir}',
                      module='cdg_jax.linear_eval')
    assert result.returncode == 1, result.stderr[-3000:]
    assert _last_line(result).startswith(
        f"FATAL: workdir '{workdir}' is not writable, so linear_eval.json "
        f"could not be written there: [Errno 30] Read-only file system"), (
            _last_line(result))
    assert 'top-1' not in result.stdout   # refused before the evaluation
  finally:
    if workdir is not None:
      launch.run(['umount', str(tmp_path / 'readonly')], check=False)

  # A write that fails after the evaluation (the result's temporary name is
  # taken by a directory): the accuracy is on the console all the same.
  workdir = _copy(finished_run, tmp_path)
  os.makedirs(os.path.join(workdir, 'linear_eval.json.tmp'))
  result = _command(SMOKE, f'--workdir={workdir}',
                    '--config.linear_eval.epochs=1',
                    module='cdg_jax.linear_eval')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'test top-1 ' in result.stdout, result.stdout
  assert 'backbone of step 4' in result.stdout
  assert _last_line(result).startswith('FATAL: IsADirectoryError'), (
      _last_line(result))
