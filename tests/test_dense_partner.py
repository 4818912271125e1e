"""The dense partner (gating.branches='dense_partner') and FBS's ReLU saliency.

The dense partner's forward must be the dense network on its half of the
batch and today's CDG on the other half; gradients must reach the shared
weights through both; separate partner BatchNorm must really be two sets.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import layers
from cdg_jax.gating import predictors
from cdg_jax.gating.layers import GatingSpec
from cdg_jax.run import config_lib
from cdg_jax.ssl import models
from cdg_jax.ssl import pretraining

import test_pretraining

MODEL = {'name': 'resnet10', 'width': 8}
SIZE = 8


def _images(n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, 3))


def _partner(partner_norm='shared'):
  return models.create_resnet(
      MODEL, GatingSpec(), gate_mode='partner',
      separate_partner_norm=partner_norm == 'separate')


def _init(model, n=2):
  # Jitted: op-by-op initialisation of even a tiny ResNet takes many seconds
  # on CPU (the same values, up to float32 rounding).
  return jax.jit(lambda key: model.init(key, _images(n)))(jax.random.key(0))


def _apply(model, variables, x, **kwargs):
  """`model.apply(variables, x, **kwargs)`, compiled as one program (op by
  op, a ResNet forward costs far more on CPU)."""
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def _trained_like(variables, seed=1):
  """Variables with every leaf perturbed, so no equality holds by accident
  (BatchNorm scales of 1, biases and thresholds of 0, unit running stats)."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) if 'float' in str(x.dtype)
            else x for x, k in zip(leaves, keys)]
  leaves = [jnp.abs(x) + 0.5 if x.ndim == 1 else x for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _select(tree, like, rename=None):
  """Leaves of `tree` at the paths of `like`; `rename` maps a path's module
  names (e.g. bn1 -> bn1_dense) before the lookup."""
  flat = flax.traverse_util.flatten_dict(tree)
  out = {}
  for path in flax.traverse_util.flatten_dict(like):
    source = tuple(rename(p) for p in path) if rename else path
    out[path] = flat[source]
  return flax.traverse_util.unflatten_dict(out)


@pytest.fixture(scope='module')
def shared_variables():
  return jax.jit(_trained_like)(_init(_partner()))


@pytest.fixture(scope='module')
def separate_variables():
  return jax.jit(_trained_like)(_init(_partner('separate')))


def test_partner_halves_equal_cdg_and_dense_networks_in_eval_mode(
    shared_variables):
  x = _images(6)
  partner = _apply(_partner(), shared_variables, x, train=False,
                   mutable=['gating'])[0]
  gated = models.create_resnet(MODEL, config_lib.read_gating({'kind': 'cdg'}).layer)
  dense = models.create_resnet(MODEL, None)
  gated_out = _apply(gated, shared_variables, x[:3], train=False,
                     mutable=['gating'])[0]
  dense_vars = jax.eval_shape(lambda: dense.init(jax.random.key(0), x))
  dense_apply = jax.jit(lambda v, x: dense.apply(v, x, train=False))
  dense_out = dense_apply(_select(shared_variables, dense_vars), x[3:])
  np.testing.assert_allclose(partner[:3], gated_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(partner[3:], dense_out, rtol=1e-5, atol=1e-5)
  # The gated half is really gated: it differs from the dense network.
  dense_on_gated_half = dense_apply(_select(shared_variables, dense_vars),
                                    x[:3])
  assert np.max(np.abs(partner[:3] - dense_on_gated_half)) > 1e-3
  # models.dense_path is that dense network.
  open_out = _apply(models.dense_path(gated), shared_variables, x[3:],
                    train=False)
  np.testing.assert_allclose(open_out, dense_out, rtol=1e-5, atol=1e-5)


def test_separate_norm_partner_equals_two_networks_in_training(
    separate_variables):
  """Train mode, separate BatchNorm: each half is its own network, with
  batch statistics of its own samples only.

  The ungated stem's BatchNorm is shared, with statistics over the whole
  batch: the two halves hold the same images, so that those equal the
  statistics of either half."""
  x = jnp.concatenate([_images(4)] * 2)
  (partner, updates) = _apply(
      _partner('separate'), separate_variables, x, train=True,
      mutable=['batch_stats', 'gating'])
  gated = models.create_resnet(MODEL, config_lib.read_gating({'kind': 'cdg'}).layer)
  dense = models.create_resnet(MODEL, None)
  gated_vars = jax.eval_shape(lambda: gated.init(jax.random.key(0), x))
  dense_vars = jax.eval_shape(lambda: dense.init(jax.random.key(0), x))
  gated_out = _apply(gated, _select(separate_variables, gated_vars), x[:4],
                     train=True, stat_groups=1,
                     mutable=['batch_stats', 'gating'])[0]

  def rename(part):   # the residual blocks' BatchNorms -> the dense path's
    return f'{part}_dense' if part.startswith(('bn', 'shortcut_bn')) else part
  dense_out = _apply(dense, _select(separate_variables, dense_vars, rename),
                     x[4:], train=True, mutable=['batch_stats'])[0]
  # Equal up to rounding: the stem's statistics are reduced over 8 samples
  # here and 4 there, and training-mode BatchNorm through ten layers turns
  # that into up to 3.4e-5 (2-core Intel Xeon; below 1e-5 on AMD EPYC). The
  # dense half through the gated path's BatchNorms differs by up to 1.9.
  np.testing.assert_allclose(partner[:4], gated_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(partner[4:], dense_out, rtol=1e-4, atol=1e-4)
  # Densities are sown for the gated half only.
  densities = jax.tree.leaves(updates['gating'])
  assert densities and all(d.shape == (4,) for d in densities)


def test_separate_partner_norm_is_two_sets_of_statistics_and_affine(
    separate_variables):
  params = separate_variables['params']['stage2_block0']
  stats = separate_variables['batch_stats']['stage2_block0']
  for name in ('bn1', 'bn2', 'shortcut_bn'):
    assert set(params[name]) == set(params[f'{name}_dense']) == {'scale',
                                                                 'bias'}
    assert set(stats[name]) == set(stats[f'{name}_dense']) == {'mean', 'var'}
  # The stem is not gated: its BatchNorm stays shared.
  assert 'stem_bn_dense' not in separate_variables['params']
  # One training forward updates both sets, each from its own half.
  fresh = _init(_partner('separate'))
  x = jnp.concatenate([_images(4, 1), 3.0 + 2.0 * _images(4, 2)])
  _, updates = _apply(_partner('separate'), fresh, x, train=True,
                      mutable=['batch_stats', 'gating'])
  new = updates['batch_stats']['stage1_block0']
  old = fresh['batch_stats']['stage1_block0']
  for name in ('bn1', 'bn1_dense'):
    assert np.max(np.abs(new[name]['mean'] - old[name]['mean'])) > 1e-4
  assert np.max(np.abs(new['bn1']['mean'] - new['bn1_dense']['mean'])) > 1e-3
  # A shared partner norm has one set.
  shared = jax.eval_shape(   # its structure
      lambda: _partner().init(jax.random.key(0), _images(2)))
  assert 'bn1_dense' not in shared['params']['stage1_block0']


@pytest.mark.parametrize('partner_norm', ['shared', 'separate'])
def test_gradients_reach_the_weights_through_both_paths(partner_norm):
  variables = _init(_partner(partner_norm))
  x = _images(8)

  def half_sum(params, half):
    out, _ = _partner(partner_norm).apply(
        {**variables, 'params': params}, x, train=True,
        mutable=['batch_stats', 'gating'])
    return jnp.sum(jnp.square(out[:4] if half == 0 else out[4:]))

  # Both halves' gradients in one compiled program (op by op, the backward
  # pass through the ResNet takes a minute on CPU).
  grads = jax.jit(lambda params: [jax.grad(half_sum)(params, half)
                                  for half in (0, 1)])(variables['params'])
  for grad in grads:
    kernel = grad['stage2_block0']['conv1']['kernel']
    assert np.max(np.abs(kernel)) > 0
  assert np.max(np.abs(grads[0]['stage2_block0']['conv1']['threshold'])) > 0
  if partner_norm == 'separate':
    # The threshold learns through the gated path only. (A shared BatchNorm
    # couples the halves through its batch statistics, so there the dense
    # half's loss reaches the thresholds too.)
    np.testing.assert_array_equal(
        grads[1]['stage2_block0']['conv1']['threshold'], 0.0)
    block = [g['stage2_block0'] for g in grads]
    np.testing.assert_array_equal(block[0]['bn1_dense']['scale'], 0.0)
    np.testing.assert_array_equal(block[1]['bn1']['scale'], 0.0)
    assert np.max(np.abs(block[1]['bn1_dense']['scale'])) > 0


def test_dense_path_costs_dense_flops(shared_variables):
  gated = models.create_resnet(MODEL, config_lib.read_gating({'kind': 'cdg'}).layer)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  costs = flops.layer_costs(models.dense_path(gated), shared_variables, x,
                            train=False)
  assert costs and not any(c.gated for c in costs)
  dense_costs = flops.layer_costs(
      models.create_resnet(MODEL, None), shared_variables, x,
      train=False)
  assert [c.macs for c in costs] == [c.macs for c in dense_costs]


def _simclr_partner_config(partner_norm='shared'):
  config = config_lib.base_config()
  config.model.name, config.model.width = 'resnet10', 8
  config.data.image_size, config.data.num_classes = SIZE, 4
  config.ssl.projector_hidden_dims, config.ssl.projector_dim = (16,), 8
  config.batch_size, config.num_steps = 4, 2
  config.optim.warmup_epochs = 0.0
  config.gating.branches = 'dense_partner'
  config.gating.partner_norm = partner_norm
  return config


def test_train_step_gates_view_one_and_meters_the_gated_path_only():
  config = _simclr_partner_config()
  run = pretraining.assemble(test_pretraining.settings_of(config, num_train=64))
  networks = run.networks
  assert networks.online.backbone.gate_mode == 'partner'
  state = jax.jit(run.init_state)(jax.random.key(0))   # one program, not op by op
  costs = run.costs
  step = jax.jit(run.train_step)
  images = np.asarray(jax.random.randint(jax.random.key(3), (4, SIZE, SIZE, 3),
                                         0, 256), np.uint8)
  new_state, metrics = step(state, {'image': images,
                                    'label': np.zeros(4, np.int32)})
  assert np.isfinite(metrics['loss'])
  # The FLOPs metric is the gated path's: below the dense cost, from the
  # densities of the four gated (view-1) samples.
  densities = metrics['layer_density']
  expected = flops.flops_reduction(costs, densities)
  np.testing.assert_allclose(metrics['flops_reduction'], expected, rtol=1e-6)
  assert 1.0 < float(metrics['flops_reduction'])
  assert all(0.0 <= float(d) < 1.0 for d in densities.values())
  np.testing.assert_allclose(
      metrics['gate_loss'],
      sum((float(d) - 0.25) ** 2 for d in densities.values()), rtol=1e-5)
  assert int(new_state.step) == 1


@pytest.mark.parametrize('framework', ['byol', 'mocov2'])
def test_dense_partner_of_target_frameworks_points_to_online(framework):
  config = _simclr_partner_config()
  config.framework = framework
  if framework == 'byol':
    config.ssl.predictor_hidden_dims, config.ssl.predictor_dim = (16,), 8
  with pytest.raises(ValueError, match="'online'"):
    config_lib.validate(config)
  # The ':dense_partner' variant picks each framework's form.
  assert config_lib.apply_variants(
      config_lib.base_config(), 'dense_partner').gating.branches == \
      'dense_partner'
  byol = config_lib.base_config()
  byol.framework = framework
  assert config_lib.apply_variants(byol, 'dense_partner').gating.branches == \
      'online'


@pytest.mark.parametrize('gating_config,message', [
    ({'kind': 'cdg', 'partner_norm': 'separate'}, 'dense_partner'),
    ({'kind': 'channel_predictor', 'branches': 'dense_partner'}, "'cdg'"),
    ({'kind': 'cdg', 'predictor_saliency': 'relu'}, 'channel_predictor'),
    ({'kind': 'channel_predictor', 'predictor_saliency': 'sigmoid'},
     "'bounded', 'relu'"),
    ({'kind': 'cdg', 'branches': 'dense'}, 'dense_partner'),
])
def test_bad_partner_and_saliency_options_name_the_value(gating_config,
                                                         message):
  with pytest.raises(ValueError, match=message):
    config_lib.read_gating(gating_config).layer


def test_online_branches_without_a_target_is_refused():
  config = _simclr_partner_config()
  config.gating.branches = 'online'
  with pytest.raises(ValueError, match="framework='simclr' has none"):
    config_lib.validate(config)


def test_relu_saliency_is_fbs_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
  w1, b1 = rng.normal(size=(8, 2)), rng.normal(size=(2,))
  w2, b2 = 3 * rng.normal(size=(2, 6)), rng.normal(size=(6,))
  pooled = x.mean(axis=(1, 2))
  hidden = np.maximum(pooled @ w1 + b1, 0)
  expected = np.maximum(hidden @ w2 + b2, 0)
  got = predictors.channel_saliency(x, *(jnp.asarray(a, jnp.float32)
                                     for a in (w1, b1, w2, b2)), form='relu')
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert np.any(expected == 0) and np.max(expected) > 2  # unbounded, sparse
  bounded = predictors.channel_saliency(x, *(jnp.asarray(a, jnp.float32)
                                         for a in (w1, b1, w2, b2)))
  np.testing.assert_allclose(bounded, 2 / (1 + np.exp(-(hidden @ w2 + b2))),
                             rtol=1e-5)


def test_relu_saliency_layer_starts_near_one():
  layer = layers.GatedConv(
      8, gating=layers.GatingSpec(kind='channel_predictor',
                                  predictor_saliency='relu',
                                  density_target=0.5))
  x = jnp.abs(_images(2)[..., :3])
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['params']['predictor_b2'], 1.0)
  _, aux = layer.apply(variables, x, mutable=['gate_aux', 'gating'])
  # saliency_l1 sums 8 saliencies near 1 (the hidden layer adds a little).
  l1 = aux['gate_aux']['saliency_l1'][0]
  assert np.all(np.abs(l1 / 8 - 1.0) < 0.5)
