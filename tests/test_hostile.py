"""Hostile round 4 (issue 42): settings that would do nothing or harm.

Each bad input is run as a user runs it (the real command, its last line
asserted, nothing left on disk); the guards that need a trained state (a NaN
state with a finite loss, a resume that changes the objective) run the
training program in-process on the smoke config.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cdg_jax
from cdg_jax import linear_eval
from cdg_jax import train
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.ssl import pretraining
import _run_shared
from test_failures import SMOKE, _command, _last_line
from test_train import load_config

_SMOKE_DENSE = '--config=configs/simclr_cifar10.py:smoke,dense'


@pytest.mark.parametrize('args,last_line', [
    # Never validated before: a negative epsilon trained a NaN state.
    ([SMOKE, '--config.gating.epsilon=-1'],
     '  gating.epsilon must be finite and > 0 (it keeps the saliency variance '
     'away from 0), got -1.0.'),
    # NaN slipped past `alpha <= 0`.
    ([SMOKE, '--config.gating.alpha=nan'],
     '  gating.alpha must be finite and > 0, got nan.'),
    ([SMOKE, '--config.ssl.temperature=-0.5'],
     '  ssl.temperature=-0.5 must be finite and > 0 (the contrastive losses '
     'divide the similarities by it; a negative one inverts the loss).'),
    ([SMOKE, '--config.ssl.temperature=0'],
     '  ssl.temperature=0.0 must be finite and > 0 (the contrastive losses '
     'divide the similarities by it; a negative one inverts the loss).'),
    # Config errors, not the data's: no "cannot run on this data" prefix.
    (['--config=configs/byol_cifar10.py:smoke',
      '--config.ssl.tau_schedule=bogus'],
     "  ssl.tau_schedule='bogus' must be one of ['cosine', 'constant']."),
    (['--config=configs/mocov2_cifar10.py:smoke', '--config.ssl.queue_size=48'],
     '  ssl.queue_size=48 must be a positive multiple of batch_size=32: the '
     'queue is updated a whole batch at a time.'),
    ([SMOKE, '--config.gating.regularizer=flops', '--config.gating.weight=-1'],
     '  gating.weight must be finite and >= 0 (a negative weight rewards '
     'leaving the target), got -1.0.'),
    # Accepted and ignored before: each now names the field, the value and
    # what to change.
    (['--config=configs/simclr_cifar10.py:smoke,channel_predictor',
      '--config.gating.regularizer=flops'],
     "  gating.regularizer='flops' would be ignored: it is read only with "
     "gating.kind='cdg', and this config has "
     "gating.kind='channel_predictor'. Remove the override (the default is "
     "'density') or change gating.kind."),
    ([SMOKE, '--config.gating.closed_tile_sample=0.5'],
     "  gating.closed_tile_sample=0.5 would be ignored: it is read only with "
     "gating.closed_tile_gradient='sampled', and this config has "
     "gating.closed_tile_gradient='none'. Remove the override (the default "
     "is 0.0625) or change gating.closed_tile_gradient."),
    ([_SMOKE_DENSE, '--config.gating.density_target=0.3'],
     "  gating.density_target=0.3 would be ignored: it is read only with "
     "gating.kind='channel_predictor' or 'spatial_predictor', or "
     "gating.kind='cdg' with gating.regularizer='density' or 'flops', and "
     "this config has gating.kind='none', gating.regularizer='density'. "
     "Remove the override (the default is 0.25) or change gating.kind or "
     "gating.regularizer."),
], ids=['epsilon', 'alpha_nan', 'temperature_negative', 'temperature_zero',
        'tau_schedule', 'queue_size', 'weight_negative',
        'predictor_regularizer', 'closed_tile_sample', 'dense_density_target'])
def test_bad_or_ignored_settings_stop_before_any_work(tmp_path, args,
                                                      last_line):
  workdir = str(tmp_path / 'run')
  result = _command(*args, f'--workdir={workdir}')
  assert result.returncode == 1, result.stderr[-3000:]
  assert _last_line(result) == last_line, result.stderr[-3000:]
  assert 'cannot run on this data' not in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir)


def _smoke(num_steps):
  config = load_config('simclr_cifar10')
  config.num_steps = num_steps
  config.log_every_steps = 1
  config.checkpoint.every_steps = 2
  config.plot_images = 0
  return config


def test_a_nan_state_with_a_finite_loss_is_never_saved_or_exported(
    tmp_path, monkeypatch):
  real_jit_train_step = pretraining.jit_train_step

  def poisoned(step_fn, mesh):
    """The real step, whose saliency statistics of one layer turn NaN at
    step 3 while the loss stays finite (as gating.epsilon=-1 did)."""
    step = real_jit_train_step(step_fn, mesh)

    def run(state, batch):
      state, metrics = step(state, batch)
      if int(state.step) >= 3:
        state = state.replace(batch_stats=jax.tree_util.tree_map_with_path(
            lambda path, x: x * jnp.nan if 'stage1_block0/conv1/saliency_var'
            in jax.tree_util.keystr(path, simple=True, separator='/') else x,
            state.batch_stats))
      return state, metrics
    # The shape check before the workdir traces the step it will run.
    run.eval_shape = getattr(step, 'eval_shape', None)
    return run

  monkeypatch.setattr(pretraining, 'jit_train_step', poisoned)
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(_smoke(6), workdir)
  message = str(error.value)
  assert message.startswith(
      'NaN or infinite values in the train state at step 3, in 1 array '
      '(batch_stats/backbone/stage1_block0/conv1/saliency_var), while the '
      'loss was still finite; training stopped without saving or exporting '
      'this state. The last good checkpoint is step 2 in '), message
  assert message.endswith('Likely cause: the saliency statistics: '
                          'gating.epsilon=1e-05, gating.saliency_momentum=0.9.')
  assert checkpoints.complete_steps(workdir) == [2]
  for name in ('backbone', 'summary.json'):
    assert not os.path.exists(os.path.join(workdir, name)), name


def test_a_nan_backbone_is_refused_by_linear_eval(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  config = load_config('simclr_cifar10')
  checkpoints.write_config(config, workdir)
  checkpoints.export_backbone(
      workdir, {'conv': {'kernel': np.full((3, 3, 3, 8), np.nan, np.float32)},
                'bn': {'scale': np.ones(8, np.float32)}},
      {'bn': {'mean': np.zeros(8, np.float32)}})
  with pytest.raises(ValueError, match=r'holds NaN or infinite values in 1 '
                     r'array \(params/conv/kernel\): the run that wrote it '
                     r'diverged'):
    linear_eval.run_linear_eval(config, workdir)


def test_a_resume_that_changes_the_objective_is_recorded_or_refused(tmp_path):
  # A finished run of 4 steps (metrics at every step, a checkpoint every 2;
  # trained once per test process, copied here).
  workdir = _run_shared.copy_of_small_run(tmp_path / 'run')
  assert checkpoints.complete_steps(workdir) == [2, 4]
  # Finished: a changed regulariser would train nothing, yet the summary
  # would describe it; refused, config.json left as the run was trained.
  changed = _smoke(4)
  changed.gating.regularizer = 'flops'
  with pytest.raises(ValueError, match=r"has trained all 4 steps, so these "
                     r"changed fields would train nothing, yet its summary "
                     r"would describe the run under them: "
                     r"gating.regularizer 'density' -> 'flops'\. Revert"):
    train.train_and_evaluate(changed, workdir)
  assert checkpoints.read_config(workdir).gating.regularizer == 'density'
  # With steps left to train, it goes on and records the change with its
  # step; fields of execution only (model.dtype, eval) change silently.
  changed.num_steps = 6
  changed.eval.knn_k = 20
  summary = train.train_and_evaluate(changed, workdir)
  recorded = [{'step': 4, 'changes': {
      'gating.regularizer': {'before': 'density', 'after': 'flops'},
      'num_steps': {'before': 4, 'after': 6}}}]
  assert summary['config_changes'] == recorded
  assert checkpoints.read_changes(workdir) == recorded
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['config_changes'] == recorded
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = {row['step']: row for row in map(json.loads, f)}
  assert rows[4]['config_change/gating.regularizer'] == "'density' -> 'flops'"
  assert rows[4]['config_change/num_steps'] == '4 -> 6'
  assert 'loss' in rows[4] and 'loss' in rows[6]
  assert not any(key.startswith('config_change/') for key in rows[6])
  assert 'Changed on the resume at step 4: gating.regularizer' in (
      train.format_summary(summary))


def test_a_second_linear_evaluation_keeps_the_first(tmp_path):
  workdir = str(tmp_path)
  fast = {'linear_eval': {'protocol': 'fast', 'epochs': 100},
          'data': {'dataset': 'cifar10'}, 'sparse_inference': False,
          'eval_split': 'test', 'top1': 0.4}
  with open(os.path.join(workdir, linear_eval.RESULTS_FILE), 'w') as f:
    json.dump(fast, f)
  # The same evaluation again replaces itself.
  assert linear_eval.keep_earlier_result(workdir, dict(fast, top1=0.41)) is None
  # Another protocol moves the first aside, then the next one further.
  augmented = dict(fast, linear_eval={'protocol': 'augmented', 'epochs': 30})
  assert linear_eval.keep_earlier_result(workdir, augmented) == (
      'linear_eval.1.json')
  with open(os.path.join(workdir, 'linear_eval.1.json')) as f:
    assert json.load(f) == fast
  with open(os.path.join(workdir, linear_eval.RESULTS_FILE), 'w') as f:
    json.dump(augmented, f)
  assert linear_eval.keep_earlier_result(workdir, fast) == 'linear_eval.2.json'
  # Tuples in memory are lists in the file: still the same evaluation.
  settings = dict(fast, linear_eval={'crop_scale': (0.08, 1.0)})
  with open(os.path.join(workdir, linear_eval.RESULTS_FILE), 'w') as f:
    json.dump(settings, f)
  assert linear_eval.keep_earlier_result(workdir, settings) is None


def test_the_public_layers_say_what_input_they_take():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'GatedConv takes a batch of images in '
                     r'NHWC layout, \(N, H, W, C\), got an input of shape '
                     r'\(16, 16\)'):
    cdg_jax.GatedConv(8).init(key, jnp.ones((16, 16)))
  with pytest.raises(ValueError, match=r'GatedConv is a 2-D convolution: '
                     r'kernel_size and strides must be \(height, width\) '
                     r'pairs, got kernel_size=\(3,\)'):
    cdg_jax.GatedConv(8, kernel_size=(3,)).init(key, jnp.ones((2, 16, 3)))
  layer = cdg_jax.GatedConv(8, gating=cdg_jax.GatingSpec())
  variables = layer.init(key, jnp.ones((2, 8, 8, 4)))
  with pytest.raises(ValueError, match=r"GatedConv was initialised for 4 "
                     r"input channels, got an input of shape \(2, 8, 8, 3\) "
                     r"\(3 channels\)"):
    layer.apply(variables, jnp.ones((2, 8, 8, 3)))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return cdg_jax.GatedConv(8, name='conv')(x)
  net_variables = Net().init(key, jnp.ones((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="GatedConv 'conv' was initialised for "
                     "4 input channels"):
    Net().apply(net_variables, jnp.ones((1, 8, 8, 2)))
  with pytest.raises(ValueError, match=r"The model block \{'width': 8\} lacks "
                     r"\['name'\]: give at least 'name'"):
    cdg_jax.create_resnet({'width': 8})


# For every field of `FIELD_READ_WHEN`: a value in its range and a spec in
# which it is not read.
_UNREAD = {
    'groups': (2, dict(kind='spatial_predictor')),
    'grouping': ('diagonal', dict(kind='channel_predictor')),
    'stage_blocks': (((4, 4, 0),) * 4, dict(kind='spatial_predictor')),
    'alpha': (3.0, dict(kind='none')),
    'surrogate': ('hard_sigmoid', dict(kind='channel_predictor')),
    'threshold_init': (-1.0, dict(kind='spatial_predictor')),
    'saliency_norm': ('sample', dict(kind='none')),
    'saliency_grad': (True, dict(kind='channel_predictor')),
    'saliency_momentum': (0.5, dict(kind='spatial_predictor')),
    'epsilon': (1e-3, dict(kind='none')),
    'saliency_stats': ('joint', dict(kind='channel_predictor')),
    'regularizer': ('threshold', dict(kind='spatial_predictor')),
    'block': ((2, 2, 4), dict(kind='channel_predictor')),
    'layers': (('stem',), dict(kind='none')),
    'branches': ('online', dict(kind='none')),
    'weight': (2.0, dict(kind='none')),
    'partner_norm': ('separate', dict()),
    'predictor_saliency': ('relu', dict()),
    'threshold_target': (0.5, dict()),
    'density_target': (0.3, dict(regularizer='threshold')),
    'target_anneal_fraction': (0.5, dict(kind='channel_predictor')),
    'budget_bounds_fraction': (0.3, dict()),
    'budget_start_fraction': (0.3, dict()),
    'budget_ramp_fraction': (0.3, dict()),
    'gumbel_temperature': (0.5, dict()),
    'closed_tile_gradient': ('sampled', dict()),
    'closed_tile_sample': (0.5, dict()),
}


def test_every_gating_field_is_classified_and_refused_where_unread():
  # A new field must say where it is read (or be read wherever gates are).
  assert set(config_lib.FIELD_READ_WHEN) == set(config_lib.GATING_FIELDS) - {
      'kind', 'sparse_training'}
  assert set(_UNREAD) == set(config_lib.FIELD_READ_WHEN)
  for name, (value, context) in _UNREAD.items():
    with pytest.raises(ValueError) as error:
      config_lib.read_gating({**context, name: value})
    assert str(error.value).startswith(
        f'gating.{name}={value!r} would be ignored: it is read only with '), (
            name, str(error.value))
