"""Every failure ends with one last line that names the value and the fix.

The cases of the hostile round of 2026-12-03 (issue 33), each run as a user
runs it: the real command in a real process, its last line asserted, and
nothing left on disk. The inputs alone decide these, so each must stop
before any work (no workdir made, no data made or read).
"""

import os
import re
import sys

import numpy as np
import pytest

from cdg_jax import linear_eval
from cdg_jax import train
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.run import memory
from cdg_jax.run import plots
from cdg_jax.run import run_control
import launch
import xla_env
from test_train import ROOT, load_config

SMOKE = '--config=configs/simclr_cifar10.py:smoke'


def _command(*args, module='cdg_jax.main', env=None, timeout=300):
  # A fork of a process that has imported the program (launch.run_module):
  # the command as `python -m` runs it, without 4 s of imports each time.
  return launch.run_module(module, args, cwd=ROOT, timeout=timeout,
                           env={**os.environ, 'PYTHONPATH': ROOT,
                                **(env or {})})


def _last_line(result):
  lines = [l for l in result.stderr.strip().splitlines() if '%|' not in l]
  return lines[-1] if lines else ''


@pytest.mark.parametrize('args,status,last_line', [
    # A launch flag: the flag that is wrong, not another one.
    (['--coordinator_address=127.0.0.1:1', '--num_processes=0',
      '--process_id=0'], 2,
     'FATAL: --num_processes=0 must be at least 1 (the number of processes '
     'of the run).'),
    # A config variant that does not exist: the reason last, not first.
    (['--config=configs/simclr_cifar10.py:smokee'], 2,
     "FATAL: --config=configs/simclr_cifar10.py:smokee: Unknown config "
     "variant 'smokee'; expected any of ('smoke', 'dense', 'structured', "
     "'tiles', 'channel_predictor', 'spatial_predictor', 'dense_partner'), "
     "comma-separated."),
    # stage_blocks values and types: the entry that is wrong, by index.
    ([SMOKE, '--config.gating.stage_blocks=bogus'], 1,
     "  gating.stage_blocks[0]='bogus' must be three ints (bh, bw, bc), e.g. "
     "(4, 4, 0): a block of bh x bw positions and bc channels (0: all "
     "channels)."),
    ([SMOKE, "--config.gating.stage_blocks=((4,4,0),(4,4,'x'),(4,4,0),"
             "(4,4,0))"], 1,
     "  gating.stage_blocks[1]=(4, 4, 'x') must be three ints (bh, bw, bc), "
     "e.g. (4, 4, 0): a block of bh x bw positions and bc channels (0: all "
     "channels)."),
    ([SMOKE, '--config.gating.stage_blocks=((4,4,0),(3,3,0),(4,4,0),'
             '(4,4,0))'], 1,
     "FATAL: This config cannot run on this data (16x16 images, 512 for "
     "training, data.source='fake'): gating.stage_blocks[1]=(3, 3, 0) does "
     "not tile a gated feature map of shape (H, W, C)=(8, 8, 16): block "
     "height 3 does not divide 8. Choose a height that divides 8 (or one at "
     "least 8, which covers the whole map)."),
    # linear_eval.epochs: checked with the rest of the config.
    ([SMOKE, '--config.linear_eval.epochs=0'], 1,
     '  linear_eval.epochs=0 must be a positive number of passes over the '
     'training set.'),
])
def test_bad_inputs_stop_before_any_work_naming_the_value(
    tmp_path, args, status, last_line):
  config = [a for a in args if a.startswith('--config=')]
  rest = [a for a in args if not a.startswith('--config=')]
  workdir = str(tmp_path / 'run')
  result = _command(*(config or [SMOKE]), *rest, f'--workdir={workdir}')
  assert result.returncode == status, result.stderr[-3000:]
  assert _last_line(result) == last_line, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir)


def test_an_image_size_that_cannot_fit_is_refused_with_the_estimate(
    tmp_path):
  # 4096x4096: terabytes of activations, more than any machine has.
  workdir = str(tmp_path / 'run')
  result = _command(SMOKE, '--config.data.image_size=4096',
                    f'--workdir={workdir}')
  assert result.returncode == 1, result.stderr[-3000:]
  last = _last_line(result)
  assert last.startswith('FATAL: data.image_size=4096 with batch_size=32 '
                         'does not fit: the train step needs about '), last
  assert 'at 4096x4096 on resnet10 width 8' in last
  assert last.endswith('Lower data.image_size or batch_size, or use a smaller '
                       'model.')
  assert not os.path.exists(workdir)


def test_the_memory_estimate_bounds_what_xla_allocates():
  """The estimate is an upper estimate of the step's memory, within 2x of
  what XLA's buffer assignment of the whole compiled SimCLR step needs."""
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax.ssl import pretraining  # pylint: disable=g-import-not-at-top
  config = load_config('simclr_cifar10')
  config.data.image_size = 32
  gating = config_lib.read_gating(config.gating)
  estimate = memory.train_step_bytes(config.model, gating.layer,
                                     config.batch_size, (32, 32, 3),
                                     num_devices=1)
  run = pretraining.assemble(pretraining.read_settings(config, gating, 512))
  state = jax.eval_shape(lambda: run.init_state(jax.random.key(0)))
  step = run.train_step
  batch = {'image': jax.ShapeDtypeStruct((32, 32, 32, 3), np.uint8),
           'label': jax.ShapeDtypeStruct((32,), np.int32)}
  compiled = jax.jit(step).lower(state, batch).compile().memory_analysis()
  xla = compiled.temp_size_in_bytes + compiled.argument_size_in_bytes
  assert xla <= estimate.total <= 2 * xla, (estimate, xla)


def test_linear_eval_settings_are_refused_before_the_backbone_is_loaded(
    tmp_path):
  """epochs=0 used to end in an IndexError (augmented protocol) or after the
  features were extracted (fast protocol)."""
  missing = str(tmp_path / 'no_run_here')
  for protocol in ('fast', 'augmented'):
    config = load_config('simclr_cifar10')
    config.linear_eval.protocol = protocol
    config.linear_eval.epochs = 0
    # The settings are checked first: the missing workdir is not reached.
    with pytest.raises(ValueError, match=r'linear_eval\.epochs=0 must be a '
                                         r'positive number'):
      linear_eval.run_linear_eval(config, missing)
  config = load_config('simclr_cifar10')
  config.linear_eval.augmented.crop_scale = (0.5, 0.2)
  with pytest.raises(ValueError, match=r'crop_scale=\(0\.5, 0\.2\) must be'):
    linear_eval.run_linear_eval(config, missing)
  # As a command: the same last line.
  result = _command(SMOKE, '--config.linear_eval.protocol=augmented',
                    '--config.linear_eval.epochs=0', f'--workdir={missing}',
                    module='cdg_jax.linear_eval')
  assert result.returncode == 1
  assert _last_line(result) == ('  linear_eval.epochs=0 must be a positive '
                                'number of passes over the training set.')


_UNEXPECTED = r"""
import runpy, sys
from cdg_jax import train
def broken(config, workdir, **options):
  raise RuntimeError('an unforeseen failure')
train.train_and_evaluate = broken
sys.argv = ['cdg_jax.main'] + sys.argv[1:]
runpy.run_module('cdg_jax.main', run_name='__main__')
"""


def test_an_unexpected_error_shows_its_traceback_only_when_asked(tmp_path):
  args = [SMOKE, f'--workdir={tmp_path / "run"}']
  quiet = launch.run([sys.executable, '-c', _UNEXPECTED, *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, 'PYTHONPATH': ROOT})
  assert quiet.returncode == 1
  assert 'Traceback' not in quiet.stderr, quiet.stderr
  assert _last_line(quiet) == (
      'FATAL: RuntimeError: an unforeseen failure (an unexpected error: its '
      'traceback is shown with -v 0)')
  verbose = launch.run([sys.executable, '-c', _UNEXPECTED, *args, '-v', '0'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  assert verbose.returncode == 1
  assert 'Traceback (most recent call last)' in verbose.stderr
  assert _last_line(verbose) == 'FATAL: RuntimeError: an unforeseen failure'


def test_a_workdir_in_use_is_refused_before_the_data_are_read(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with run_control.WorkdirLock(workdir):   # a live run: this process
    config = load_config('simclr_cifar10')
    # Data that do not exist: reading them first would fail differently.
    config.data.source = 'npz'
    config.data.npz_path = str(tmp_path / 'missing.npz')
    with pytest.raises(run_control.WorkdirLockedError,
                       match=f'in use by process {os.getpid()}'):
      train.train_and_evaluate(config, workdir)
    assert os.listdir(workdir) == [run_control.LOCK_FILE]


def test_a_damaged_checkpoint_is_described_in_words():
  """Orbax's own message embeds the repr of a bound method; the reason
  comes from TensorStore's error under it."""
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.backbone.stem_'
                       'conv.kernel/0.0" in OCDBT database at local file '
                       '"/w/checkpoints/6/default/": Requested byte range '
                       '[0, 9) is not valid for value of size 4')
    except ValueError as inner:
      raise Exception('Encountered error while reading array index: (slice('
                      '0, 3, 1),). See full TensorStore details: <bound method '
                      'pybind11_detail_function_record.spec of TensorStore({'
                      '...') from inner
  except Exception as e:  # pylint: disable=broad-except
    reason = checkpoints.restore_failure(e)
  assert reason == ("a data file is shorter than the checkpoint's index says "
                    '(truncated), while reading params.backbone.stem_conv.'
                    'kernel')
  try:
    raise KeyError('a key orbax did not expect <bound method x>')
  except KeyError as e:
    # Nothing readable in the chain: the type and the start of the message.
    assert checkpoints.restore_failure(e).startswith('KeyError: ')


def test_the_mask_picture_shows_every_gated_layer_with_a_key(tmp_path):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  masks = {f'backbone/stage{i}_block0/conv{j}': np.full((2, 8, 8), 0.5)
           for i in range(1, 5) for j in (1, 2)}
  path = str(tmp_path / 'masks.png')
  shown = plots.plot_masks(images, masks, path)
  assert shown == [name.replace('backbone/', '') for name in masks]
  assert os.path.getsize(path) > 0


def test_the_summary_says_when_sparse_inference_ran():
  summary = {'framework': 'simclr', 'model': 'resnet10', 'gating': 'cdg',
             'steps': 4, 'wall_time_s': 1.0, 'knn_top1': 0.5, 'knn_top5': 0.9,
             'flops_reduction': 2.0, 'sparse_inference': True}
  assert 'block-sparse inference' in train.format_summary(summary)
  summary['sparse_inference'] = False
  assert 'block-sparse' not in train.format_summary(summary)


def test_a_forked_command_is_the_command():
  # launch.run_module (a fork of a process that has imported the program),
  # against the same command as a fresh interpreter: the same status, output
  # and last line, and the fork's environment is the command's (XLA reads
  # its flags in the fork: four host devices, not conftest's two).
  args = [SMOKE, '--config.batch_size=6', '--workdir=/nonexistent/run']
  env = {**os.environ, 'PYTHONPATH': ROOT,
         'XLA_FLAGS': xla_env.xla_flags(device_count=4)}
  real = launch.run([sys.executable, '-m', 'cdg_jax.main', *args], cwd=ROOT,
                    env=env, capture_output=True, text=True, timeout=300)
  forked = launch.run_module('cdg_jax.main', args, cwd=ROOT, env=env,
                             timeout=300)
  assert forked.returncode == real.returncode == 1, forked.stderr[-2000:]
  assert _last_line(forked) == _last_line(real)
  assert 'divisible by the 4 devices' in _last_line(forked), _last_line(forked)
  # The same console output, up to the host memory free at the moment.
  free = lambda text: re.sub(r'[\d.]+ GiB of available', 'N GiB of available',
                             text)
  assert free(forked.stdout) == free(real.stdout)
  assert '4 CPU device(s)' in forked.stdout
