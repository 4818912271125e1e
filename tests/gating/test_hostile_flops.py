"""Hostile round 5 (issue 53): the library's FLOPs counting and the gates'
regulariser against inputs they used to miscount or pass through.

Each case is either counted right (against a hand count) or refused with one
message that names the bad value and the fix, asserted whole. The FLOPs
command's cases are the program's (tests/test_hostile_launch.py).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import ops
from cdg_jax.gating import regularizers
from cdg_jax.gating.layers import GatedConv
from cdg_jax.gating.layers import GatingSpec

_X8 = (1, 8, 8, 8)      # one 8x8 map of 8 channels; every conv here 8 -> 8


def _conv_cost(input_shape, **conv_kwargs):
  """The one `LayerCost` of an nn.Conv(8, ...) on an input of this shape."""
  conv = nn.Conv(8, use_bias=False, **conv_kwargs)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  (cost,) = flops.layer_costs(conv, variables, x)
  return cost


def _real_taps(input_shape, **conv_kwargs):
  """(output position, tap) pairs that read a real input value, counted by
  the layer itself: a ones kernel over ones, one channel, summed."""
  conv = nn.Conv(1, use_bias=False, kernel_init=nn.initializers.ones,
                 **conv_kwargs)
  x = jnp.ones((*input_shape[:-1], 1))
  return int(jnp.sum(conv.apply(conv.init(jax.random.key(0), x), x)))


# Hand counts, per spatial dimension: the taps of each output that land
# inside the unpadded input ("exact", the module's `macs`), and all of them
# ("conventional", k * k * C_in * C_out * H_out * W_out, its `padded_macs`).
# C_in * C_out = 64 throughout.
@pytest.mark.parametrize('input_shape,conv_kwargs,taps,macs,padded_macs', [
    # 3x3, dilation 2, SAME on 8: the dilated kernel spans 5, padding (2, 2);
    # output o reads rows o-2, o, o+2: 6 + 8 + 6 = 20 real taps per
    # dimension. Exact 20 * 20 * 64; conventional 9 * 64 * 64. (30,976 before:
    # the taps of an undilated 3x3, 22 * 22 * 64.)
    (_X8, dict(kernel_size=(3, 3), kernel_dilation=2), 400, 25_600, 36_864),
    # ... with stride 2: 4 outputs, padding (1, 2); output o reads 2o-1,
    # 2o+1, 2o+3: 2 + 3 + 3 + 2 = 10 per dimension. Conventional 9 * 16 * 64.
    (_X8, dict(kernel_size=(3, 3), kernel_dilation=2, strides=2), 100, 6_400,
     9_216),
    # Input dilation 2 of a 4x4 map (7 rows, real at 0, 2, 4, 6), padding
    # (1, 1), 7 outputs: output o reads o-1, o, o+1, of which 1, 2, 1, 2, 1,
    # 2, 1 are real rows: 10 per dimension. Conventional 9 * 49 * 64.
    ((1, 4, 4, 8), dict(kernel_size=(3, 3), input_dilation=2,
                        padding=((1, 1), (1, 1))), 100, 6_400, 28_224),
    # Circular padding reads real (wrapped) values: every tap counts.
    (_X8, dict(kernel_size=(3, 3), padding='CIRCULAR'), 576, 36_864, 36_864),
    # 1-D causal, k 3 on 8: output o reads o-2, o-1, o: 1 + 2 + 3 * 6 = 21.
    ((1, 8, 8), dict(kernel_size=(3,), padding='CAUSAL'), 21, 1_344, 1_536),
], ids=['dilation2', 'dilation2_stride2', 'input_dilation2', 'circular',
        'causal_1d'])
def test_dilated_and_padded_convolutions_count_the_taps_they_read(
    input_shape, conv_kwargs, taps, macs, padded_macs):
  # The hand count of real taps is what the layer itself reads.
  assert _real_taps(input_shape, **conv_kwargs) == taps
  assert taps * 64 == macs
  cost = _conv_cost(input_shape, **conv_kwargs)
  # The module's convention is the exact count; the conventional one is
  # reported beside it.
  assert cost.macs == macs
  assert cost.padded_macs == padded_macs


def test_a_padding_nn_conv_cannot_apply_is_refused_by_name():
  x = jax.ShapeDtypeStruct(_X8, jnp.float32)
  variables = {'params': {'kernel': jax.ShapeDtypeStruct((3, 3, 8, 8),
                                                         jnp.float32)}}
  with pytest.raises(ValueError) as error:
    flops.layer_costs(nn.Conv(8, (3, 3), padding='FULL', use_bias=False),
                      variables, x)
  assert str(error.value) == (
      "layer_costs cannot count the top-level Conv: padding='FULL' is not a "
      "padding nn.Conv applies to a 2-D convolution; give one of 'SAME', "
      "'SAME_LOWER', 'VALID', 'CIRCULAR', 'REFLECT', an int, or one int or "
      "(low, high) pair per spatial dimension.")
  with pytest.raises(ValueError) as error:
    flops.layer_costs(nn.Conv(8, (3, 3), input_dilation=2, use_bias=False),
                      variables, x)
  assert str(error.value) == (
      "layer_costs cannot count the top-level Conv: nn.Conv cannot apply "
      "padding='SAME' with input_dilation=(2, 2) (lax takes a string padding "
      "only without input dilation); give explicit (low, high) pairs, one "
      "per spatial dimension.")


class _TwoGated(nn.Module):
  """Two CDG-gated 3x3 convolutions (G = 2), 4 -> 4 channels."""

  @nn.compact
  def __call__(self, x, train=False):
    spec = GatingSpec(groups=2)
    x = GatedConv(4, gating=spec, name='g1')(x, train)
    return GatedConv(4, gating=spec, name='g2')(x, train)


@pytest.fixture(scope='module')
def two_gated():
  model = _TwoGated()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  variables = model.init(jax.random.key(1), x)
  costs = flops.layer_costs(model, variables, x)
  return model, variables, x, costs


def test_two_gated_costs_by_hand(two_gated):
  *_, costs = two_gated
  # 3x3 SAME on 4x4: 2 + 3 + 3 + 2 = 10 real taps per dimension, 4 * 4
  # channels.
  assert [(c.name, c.macs, c.padded_macs, c.groups) for c in costs] == [
      ('g1', 1_600, 2_304, 2), ('g2', 1_600, 2_304, 2)]


_DENSE = flops.LayerCost('d', 'conv', 'backbone', 500, 0, (2, 2, 8), 600)
_GATED = flops.LayerCost('g', 'conv', 'backbone', 1000, 4, (2, 2, 8), 1200)


@pytest.mark.parametrize('density,message', [
    (25.0, "The density of gated layer 'g' is 25.0: a density is the "
     "fraction of open gates, in [0, 1] (give 0.25 for 25%)."),
    (-2.0, "The density of gated layer 'g' is -2.0: a density is the "
     "fraction of open gates, in [0, 1]."),
    (math.nan, "The density of gated layer 'g' is nan: a density is the "
     "fraction of open gates, in [0, 1]."),
    (np.float32(1.5), "The density of gated layer 'g' is 1.5: a density is "
     "the fraction of open gates, in [0, 1] (give 0.015 for 1.5%)."),
    (jnp.array([0.2, 0.4]), "The density of gated layer 'g' has shape (2,): "
     "pass one mean density in [0, 1] per layer (a scalar); per-sample "
     "densities are averaged by flops.mean_densities."),
    ((jnp.array([0.2, 0.4]),), "The density of gated layer 'g' is a tuple, "
     "not one number: pass one mean density in [0, 1] per layer, e.g. "
     "flops.mean_densities(state['gating']), not the sown 'gating' "
     "collection itself."),
], ids=['percentage', 'negative', 'nan', 'float32_above_one',
        'per_sample_vector', 'sown_tuple'])
def test_flops_report_refuses_densities_that_are_not_fractions(density,
                                                               message):
  with pytest.raises(ValueError) as error:
    flops.flops_report((_GATED, _DENSE), {'g': density})
  assert str(error.value) == message


def test_flops_report_refuses_the_sown_collection_and_takes_its_means(
    two_gated):
  model, variables, x, costs = two_gated
  _, state = model.apply(variables, x, train=True,
                         mutable=['gating', 'batch_stats'])
  with pytest.raises(ValueError) as error:
    flops.flops_report(costs, state['gating'])
  assert str(error.value) == (
      "flops_report takes {gated layer name: mean density}, got a nested "
      "mapping under 'g1' (the sown 'gating' collection?): pass "
      "flops.mean_densities(state['gating']).")
  # What the message says to do works, and the edges of [0, 1] are valid.
  densities = flops.mean_densities(state['gating'])
  report = flops.flops_report(costs, densities)
  d1, d2 = (float(densities[n]) for n in ('g1', 'g2'))
  np.testing.assert_allclose(report.backbone_effective_macs,
                             1600 * (1 + d1) / 2 + 1600 * (1 + d2) / 2,
                             rtol=1e-6)
  report = flops.flops_report(costs, {'g1': 0.0, 'g2': np.float64(1.0)})
  assert report.backbone_effective_macs == 800 + 1600


def test_the_regulariser_refuses_densities_that_were_never_collected(
    two_gated):
  model, variables, x, costs = two_gated
  params = variables['params']
  # The user's mutable misses the 'gating' collection: no densities at all.
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  densities = flops.mean_densities(state.get('gating', {}))
  assert densities == {}
  fix = ("Apply the network with mutable=['gating', ...] and pass "
         "flops.mean_densities(state['gating']) as densities.")
  # It returned 0.0: the gates were never regularised.
  with pytest.raises(ValueError) as error:
    regularizers.gate_regularizer(regularizers.RegularizerSpec(), params,
                                  densities)
  assert str(error.value) == (
      "The gate regulariser (gating.regularizer='density') has no densities "
      "for 2 of the 2 gated layers ('g1', 'g2'): the forward pass did not "
      "collect the 'gating' collection they sow into. " + fix)
  # It raised KeyError 'g1'.
  budget = regularizers.RegularizerSpec(regularizer='flops')
  with pytest.raises(ValueError) as error:
    regularizers.gate_regularizer(budget, params, densities, costs=costs)
  assert str(error.value) == (
      "The gate regulariser (gating.regularizer='flops') has no densities "
      "for 2 of the 2 gated layers ('g1', 'g2'): the forward pass did not "
      "collect the 'gating' collection they sow into. " + fix)
  # One layer missing, known by the costs' names.
  with pytest.raises(ValueError) as error:
    regularizers.gate_regularizer(budget, params, {'g1': 0.5}, costs=costs)
  assert str(error.value) == (
      "The gate regulariser (gating.regularizer='flops') has no densities "
      "for 1 of the 2 gated layers ('g2'): they are not in the 'gating' "
      "values given (for 'g1'). " + fix)
  # Collected, the density form is lambda * sum_layers (d - 0.25)^2.
  _, state = model.apply(variables, x, train=True,
                         mutable=['gating', 'batch_stats'])
  densities = flops.mean_densities(state['gating'])
  np.testing.assert_allclose(
      regularizers.gate_regularizer(regularizers.RegularizerSpec(), params,
                                    densities),
      sum((float(d) - 0.25) ** 2 for d in densities.values()), rtol=1e-6)


def test_the_channel_predictor_loss_refuses_a_missing_aux_collection():
  spec = GatingSpec(kind='channel_predictor', density_target=0.5)
  layer = GatedConv(8, gating=spec)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  variables = layer.init(jax.random.key(1), x)
  _, state = layer.apply(variables, x, mutable=['gating'])
  with pytest.raises(ValueError) as error:
    regularizers.gate_regularizer(
        regularizers.RegularizerSpec(kind='channel_predictor', weight=1e-4),
        variables['params'], flops.mean_densities(state['gating']),
        state.get('gate_aux', {}))
  assert str(error.value) == (
      "The gate regulariser (gating.kind='channel_predictor') has no "
      "saliency L1 norms for 1 of the 1 gated layers ((the top-level "
      "module)): the forward pass did not collect the 'gate_aux' collection "
      "they sow into. Apply the network with mutable=['gate_aux', ...] and "
      "pass state['gate_aux'] as aux.")


def test_gated_conv_takes_int_strides_and_refuses_an_int_kernel():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  pair = GatedConv(16, strides=(2, 2))
  variables = pair.init(jax.random.key(1), x)
  # An int stride is (s, s), as nn.Conv reads it: the same layer.
  np.testing.assert_array_equal(GatedConv(16, strides=2).apply(variables, x),
                                pair.apply(variables, x))
  assert GatedConv(16, strides=2).apply(variables, x).shape == (2, 4, 4, 16)
  # nn.Conv reads an int kernel_size as a 1-D kernel (k,): refused, not
  # guessed as (k, k).
  assert nn.Conv(16, 3).init(jax.random.key(1), x)['params'][
      'kernel'].shape == (3, 4, 16)
  with pytest.raises(ValueError) as error:
    GatedConv(16, 3).init(jax.random.key(1), x)
  assert str(error.value) == (
      'GatedConv is a 2-D convolution: kernel_size must be a (height, width) '
      'pair, got the int kernel_size=3 (nn.Conv reads an int as a 1-D kernel '
      '(3,)); pass kernel_size=(3, 3).')


@pytest.mark.parametrize('shape', [(8,), (), (16, 1)])
def test_gated_conv_names_the_threshold_shape_it_needs(shape):
  x = jnp.ones((1, 4, 4, 8))
  kernel = jnp.ones((3, 3, 8, 16))
  with pytest.raises(ValueError) as error:
    ops.gated_conv(x, kernel, jnp.zeros(shape))
  assert str(error.value) == (
      f'threshold must have shape (C_out,) = (16,), one threshold per output '
      f'channel of the kernel (3, 3, 8, 16) (kh, kw, C_in, C_out); got shape '
      f'{shape}.')


