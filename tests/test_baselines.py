"""Tests of the predictor baselines: channel (FBS-style) and spatial
(dual-gating-style) predictor gating, their FLOPs and their train step."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import ops
from cdg_jax.gating import predictors
from cdg_jax.gating import regularizers
from cdg_jax.gating.layers import GatedConv, GatingSpec
from cdg_jax.ssl import models
from cdg_jax.ssl import pretraining
from cdg_jax.run import config_lib
from tests.test_pretraining import fixed_batch, jit_setup, tiny_config


def _apply(layer, variables, x, **kwargs):
  return layer.apply(variables, x, mutable=['gating', 'gate_masks', 'gate_aux'],
                     **kwargs)


def test_channel_predictor_keeps_top_k_and_scales_dense_conv():
  spec = GatingSpec(kind='channel_predictor', density_target=0.3)
  layer = GatedConv(10, (3, 3), (1, 1), spec)
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 8))
  variables = layer.init(jax.random.key(1), x)
  p = jax.tree.map(np.asarray, variables['params'])
  assert p['predictor_w1'].shape == (8, 2) and p['predictor_w2'].shape == (2, 10)
  y, state = _apply(layer, variables, x, train=True)

  # Hand computation in numpy.
  xn = np.asarray(x, np.float64)
  hidden = np.maximum(xn.mean(axis=(1, 2)) @ p['predictor_w1']
                      + p['predictor_b1'], 0)
  s = 2 / (1 + np.exp(-(hidden @ p['predictor_w2'] + p['predictor_b2'])))
  k = 3                                   # ceil(0.3 * 10)
  keep = np.zeros_like(s)
  for i, row in enumerate(s):
    keep[i, np.argsort(-row)[:k]] = 1
  mask = np.asarray(state['gate_masks']['mask'][0])
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(axis=-1), k)  # every sample, position
  np.testing.assert_array_equal(mask, np.broadcast_to(keep[:, None, None], mask.shape))
  dense = ops.conv(x, variables['params']['kernel'])
  np.testing.assert_allclose(y, dense * (keep * s)[:, None, None], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(state['gating']['density'][0], [0.3] * 3, rtol=1e-6)
  l1 = np.asarray(state['gate_aux']['saliency_l1'][0])
  np.testing.assert_allclose(l1, s.sum(axis=-1), rtol=1e-5)
  # FBS's auxiliary loss: lambda * sum_layers mean_samples ||s||_1.
  reg = regularizers.gate_regularizer(
      regularizers.RegularizerSpec(kind='channel_predictor', weight=1e-4),
      variables['params'], {}, state['gate_aux'])
  np.testing.assert_allclose(reg, 1e-4 * s.sum(axis=-1).mean(), rtol=1e-5)

  # The gradient of the output reaches the predictor (through the saliency).
  def loss(params):
    out, _ = _apply(layer, {'params': params}, x, train=True)
    return jnp.sum(out * jnp.arange(10.0))
  grads = jax.jit(jax.grad(loss))(variables['params'])   # one program
  for name in ('predictor_w1', 'predictor_w2', 'predictor_b2'):
    assert np.abs(grads[name]).max() > 0, name


def test_channel_predictor_scales_after_batchnorm_whose_statistics_see_every_channel():
  # FBS order: BN(conv(x)) * (mask * s). Scaling before BN left dropped
  # channels with a running variance near 0 (1e-18 on real CIFAR) and blew up
  # evaluation features to 3e14.
  spec = GatingSpec(kind='channel_predictor', density_target=0.25)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 4))
  block = models.BasicBlock(features=8, gating=spec)
  variables = block.init(jax.random.key(1), x)
  out, state = block.apply(variables, x, train=True,
                           mutable=['batch_stats', 'gate_masks'])
  p = variables['params']
  y1 = ops.conv(x, p['conv1']['kernel'])
  mean, var = np.asarray(y1).mean(axis=(0, 1, 2)), np.asarray(y1).var(
      axis=(0, 1, 2))
  # The running statistics of bn1 moved towards the dense conv's statistics,
  # for all 8 channels although each sample keeps only 2.
  bn1 = state['batch_stats']['bn1']
  np.testing.assert_allclose(bn1['mean'], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn1['var'], 0.9 + 0.1 * var, rtol=1e-4)
  masks = state['gate_masks']['conv1']['mask'][0]
  np.testing.assert_array_equal(np.asarray(masks).sum(axis=-1), 2)
  # conv1's output: normalised dense conv, then the kept channels scaled.
  _, _, saliency = predictors.channel_predictor_conv(
      x, p['conv1']['kernel'], p['conv1']['predictor_w1'],
      p['conv1']['predictor_b1'], p['conv1']['predictor_w2'],
      p['conv1']['predictor_b2'], k=2)
  normalised = (y1 - mean) / np.sqrt(var + 1e-5) * p['bn1']['scale'] + p[
      'bn1']['bias']
  expected, _, _ = predictors.channel_predictor_conv(
      x, p['conv1']['kernel'], p['conv1']['predictor_w1'],
      p['conv1']['predictor_b1'], p['conv1']['predictor_w2'],
      p['conv1']['predictor_b2'], k=2,
      normalize=lambda y: (y - mean) / np.sqrt(var + 1e-5))
  np.testing.assert_allclose(
      expected, normalised * (np.asarray(masks[:, :1, :1, :]) *
                              np.asarray(saliency)[:, None, None, :]),
      rtol=1e-4, atol=1e-5)


def _pool_logits(x, pred_kernel, pred_bias, grid):
  """Numpy reference: average-pool to the grid, then a 3x3 SAME conv."""
  n, h, w, c = x.shape
  gh, gw = grid
  pooled = x.reshape(n, gh, h // gh, gw, w // gw, c).mean(axis=(2, 4))
  padded = np.pad(pooled, ((0, 0), (1, 1), (1, 1), (0, 0)))
  logits = np.zeros((n, gh, gw))
  for i in range(gh):
    for j in range(gw):
      logits[:, i, j] = np.einsum('nabc,abc->n', padded[:, i:i + 3, j:j + 3],
                                  pred_kernel[..., 0])
  return logits + pred_bias[0]


def test_spatial_predictor_block_mask_is_hard_and_trains_the_predictor():
  spec = GatingSpec(kind='spatial_predictor', block=(2, 2, 4),
                    gumbel_temperature=0.5)
  layer = GatedConv(6, (3, 3), (2, 2), spec)       # 8x8 -> 4x4, grid 2x2
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
  variables = layer.init(jax.random.key(1), x)
  p = jax.tree.map(np.asarray, variables['params'])
  dense = ops.conv(x, variables['params']['kernel'], (2, 2))

  # Eval: the deterministic gate 1[logits > 0] on the pooled grid.
  y, state = _apply(layer, variables, x, train=False)
  logits = _pool_logits(np.asarray(x, np.float64), p['predictor_kernel'],
                        p['predictor_bias'], (2, 2))
  expected = np.repeat(np.repeat((logits > 0).astype(np.float32), 2, 1), 2, 2)
  mask = np.asarray(state['gate_masks']['mask'][0])
  np.testing.assert_array_equal(mask, np.broadcast_to(expected[..., None], mask.shape))
  np.testing.assert_allclose(y, dense * expected[..., None], rtol=1e-5, atol=1e-6)

  # Train: Gumbel noise from the 'gumbel' stream; still hard 0/1, constant
  # within 2x2 blocks and across all channels.
  y, state = _apply(layer, variables, x, train=True,
                    rngs={'gumbel': jax.random.key(2)})
  mask = np.asarray(state['gate_masks']['mask'][0])
  assert set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(mask, np.broadcast_to(mask[..., :1], mask.shape))
  grid = mask[:, ::2, ::2, 0]
  np.testing.assert_array_equal(
      mask, np.broadcast_to(np.repeat(np.repeat(grid, 2, 1), 2, 2)[..., None],
                            mask.shape))
  np.testing.assert_allclose(y, dense * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state['gating']['density'][0], grid.mean(axis=(1, 2)))
  with pytest.raises(ValueError, match="rngs=\\{'gumbel': key\\}"):
    layer.apply(variables, x, train=True, mutable=['gating'])

  # The straight-through gradient of the output and of the density loss
  # reaches the predictor parameters.
  def loss(params):
    out, st = _apply(layer, {'params': params}, x, train=True,
                     rngs={'gumbel': jax.random.key(2)})
    densities = flops.mean_densities(st['gating'])
    return (jnp.sum(out * jnp.arange(6.0))
            + regularizers.gate_regularizer(
                regularizers.RegularizerSpec(kind='spatial_predictor',
                                             density_target=0.1, weight=1.0),
                params, densities))
  grads = jax.grad(loss)(variables['params'])
  assert np.abs(grads['predictor_kernel']).max() > 0
  assert np.abs(grads['predictor_bias']).max() > 0
  # Density loss alone: lambda * sum_layers (density - target)^2.
  spec_d = regularizers.RegularizerSpec(kind='spatial_predictor',
                                        density_target=0.5, weight=2.0)
  np.testing.assert_allclose(
      regularizers.gate_regularizer(spec_d, {}, {'a': 0.7, 'b': 0.2}),
      2.0 * (0.2**2 + 0.3**2), rtol=1e-6)


@pytest.mark.parametrize('kind', ['channel_predictor', 'spatial_predictor'])
def test_eval_mode_is_deterministic_and_batch_independent(kind):
  model = models.create_resnet({'name': 'resnet10', 'width': 8},
                               config_lib.read_gating({'kind': kind}).layer)   # 8x8: stage 4 is 1x1
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])   # not op by op
  run = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['gating']))
  out4, st4 = run(variables, x)
  out4b, st4b = run(variables, x)
  out2, st2 = run(variables, x[2:])
  np.testing.assert_array_equal(out4, out4b)
  np.testing.assert_allclose(out4[2:], out2, rtol=1e-5, atol=1e-6)
  d4 = flops.per_sample_densities(st4['gating'])
  d2 = flops.per_sample_densities(st2['gating'])
  assert len(d4) == 8
  for name in d4:
    np.testing.assert_array_equal(d4[name][2:], d2[name])
    np.testing.assert_array_equal(d4[name], flops.per_sample_densities(
        st4b['gating'])[name])


# (C_in, C_out, output size) of the eight 3x3 block convs of a width-8
# CIFAR ResNet-10 at 16x16.
_GATED = [(8, 8, 16), (8, 8, 16), (8, 16, 8), (16, 16, 8),
          (16, 32, 4), (32, 32, 4), (32, 64, 2), (64, 64, 2)]


def test_flops_of_predictor_layers_include_the_predictor():
  cost = flops.LayerCost('p', 'conv', 'backbone', 1000, 0, (2, 2, 8), 1200,
                         'spatial_predictor', 50)
  assert cost.gated and cost.effective_macs(0.25) == 300
  x = jnp.zeros((2, 16, 16, 3))

  # Channel predictor: density is exactly k / C_out, k = ceil(0.3 * C_out).
  model = models.create_resnet({'name': 'resnet10', 'width': 8},
                               config_lib.read_gating({'kind': 'channel_predictor',
                                'density_target': 0.3}).layer)
  variables = jax.jit(model.init)(jax.random.key(0), x)   # not op by op
  report = flops.measure(model, variables, x)
  rows = {r.name: r for r in report.rows}
  gated = [r for r in report.rows if r.density is not None]
  assert len(gated) == 8
  expected = sum(r.dense_macs for r in report.rows if r.density is None)
  for row, (c_in, c_out, _) in zip(gated, _GATED):
    k = math.ceil(0.3 * c_out - 1e-6)
    assert row.density == pytest.approx(k / c_out)
    hidden = c_in // 4
    expected += row.dense_macs * k / c_out + c_in * hidden + hidden * c_out
  # 16x16 SAME 3x3: 3 * 16 - 2 = 46 taps per dimension read the input.
  assert rows['stage1_block0/conv1'].dense_macs == 46 * 46 * 8 * 8
  np.testing.assert_allclose(report.backbone_effective_macs, expected, rtol=1e-6)

  # Spatial predictor, (2, 2) blocks, gates forced shut (bias -1e9) or open:
  # the 3x3 predictor conv on a g x g grid reads (3g - 2)^2 taps (1 for g=1).
  model = models.create_resnet({'name': 'resnet10', 'width': 8},
                               config_lib.read_gating({'kind': 'spatial_predictor', 'block': (2, 2, 1)}).layer)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  taps = lambda g: (3 * g - 2) ** 2 if g > 1 else 1
  predictor = sum(taps(size // 2) * c_in for c_in, _, size in _GATED)
  assert predictor == 11008
  for bias, density in ((-1e9, 0.0), (1e9, 1.0)):
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, bias)
        if path[-1].key == 'predictor_bias' else p, variables['params'])
    report = flops.measure(model, {**variables, 'params': params}, x)
    assert report.gated_density == density
    ungated = sum(r.dense_macs for r in report.rows if r.density is None)
    gated = sum(r.dense_macs for r in report.rows if r.density is not None)
    np.testing.assert_allclose(report.backbone_effective_macs,
                               ungated + density * gated + predictor, rtol=1e-7)


# (SimCLR with the spatial predictor runs the same online network and checks
# as BYOL's case, which adds the gated target.)
@pytest.mark.parametrize('framework,kind', [('simclr', 'channel_predictor'),
                                            ('byol', 'spatial_predictor')])
def test_train_step_trains_the_predictors(framework, kind):
  config = tiny_config(framework, num_steps=4)
  config.gating.kind = kind
  config.gating.regularizer = 'density'   # the predictors' loss is their own
  if kind == 'spatial_predictor':
    config.gating.block = (2, 2, 1)
  config.gating.weight = 1e-2
  _, state, _, step_fn = jit_setup(config)   # setup's, initialised jitted
  if framework == 'byol':   # the target is gated the same way (EMA'd predictors)
    target_conv = state.target_params['backbone']['stage1_block0']['conv1']
    assert 'predictor_kernel' in target_conv
  name = 'predictor_w2' if kind == 'channel_predictor' else 'predictor_kernel'
  before = np.asarray(state.params['backbone']['stage1_block0']['conv1'][name])
  state, metrics = jax.jit(step_fn)(state, fixed_batch())
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['gate_loss'] > 0
  assert len(metrics['layer_density']) == 8
  assert metrics['flops_reduction'] > 1
  after = np.asarray(state.params['backbone']['stage1_block0']['conv1'][name])
  assert np.abs(after - before).max() > 0
  if framework == 'byol':
    target_after = np.asarray(state.target_params['backbone']['stage1_block0']
                              ['conv1'][name])
    assert np.abs(target_after - before).max() > 0


def test_spec_validation_names_the_predictor_kinds():
  with pytest.raises(ValueError, match="'channel_predictor', 'spatial_predictor'"):
    GatingSpec(kind='fbs')
  with pytest.raises(ValueError, match='density_target must be in'):
    GatingSpec(kind='channel_predictor', density_target=0.0)
  with pytest.raises(ValueError, match='gumbel_temperature must be finite '
                     'and > 0, got 0.0'):
    GatingSpec(kind='spatial_predictor', gumbel_temperature=0.0)
  # CDG-only fields are not read by the baselines: setting one is refused,
  # not ignored; at their defaults they do not constrain them.
  with pytest.raises(ValueError, match=r"gating.groups=1 would be ignored: it "
                     r"is read only with gating.kind='cdg', and this config "
                     r"has gating.kind='spatial_predictor'"):
    config_lib.read_gating({'kind': 'spatial_predictor', 'groups': 1})
  with pytest.raises(ValueError, match=r"gating.regularizer='flops' would be "
                     r"ignored: .* gating.kind='channel_predictor'"):
    config_lib.read_gating({'kind': 'channel_predictor',
                            'regularizer': 'flops'})
  assert config_lib.read_gating({'kind': 'spatial_predictor',
                                 'weight': 2.0}).layer.enabled
  assert predictors.num_kept_channels(10, 0.3) == 3
  assert predictors.num_kept_channels(8, 0.01) == 1
