"""`GatedConv` as a peer of `flax.linen.Conv`: its options, its refusals, and
a spec whose every field the layer reads."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import ops
from cdg_jax.gating.layers import GatedConv
from cdg_jax.gating.layers import GatingSpec

X = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))

# nn.Conv's options, one at a time (and one combination); `use_bias` is
# always given, since GatedConv's default (False) is not nn.Conv's.
OPTIONS = {
    'defaults': {},
    'valid': {'padding': 'VALID'},
    'int_padding': {'padding': 2},
    'pairs': {'padding': ((1, 0), (2, 1))},
    'ints_per_dim': {'padding': (0, 1)},
    'same_lower': {'padding': 'SAME_LOWER'},
    'circular': {'padding': 'CIRCULAR'},
    'reflect': {'padding': 'REFLECT'},
    'strided': {'strides': 2},
    'bias': {'use_bias': True,
             'bias_init': nn.initializers.normal(1.0)},
    'param_dtype': {'param_dtype': jnp.bfloat16, 'dtype': None},
    'dtype': {'dtype': jnp.bfloat16},
    'precision': {'precision': jax.lax.Precision.HIGHEST},
    'combined': {'padding': ((0, 2), (1, 1)), 'strides': (2, 1),
                 'use_bias': True, 'bias_init': nn.initializers.normal(1.0)},
}


@pytest.mark.parametrize('name', list(OPTIONS))
def test_plain_and_open_gated_conv_equal_nn_conv_bit_for_bit(name):
  options = {'use_bias': False, **OPTIONS[name]}
  reference = nn.Conv(4, (3, 3), **options)
  params = reference.init(jax.random.key(0), X)['params']
  want = reference.apply({'params': params}, X)
  plain = GatedConv(4, (3, 3), **options)
  assert (jax.tree.map(jnp.shape, plain.init(jax.random.key(0), X)['params'])
          == jax.tree.map(jnp.shape, params))
  np.testing.assert_array_equal(plain.apply({'params': params}, X), want)
  # CDG with every gate open: the same parameters plus the threshold.
  gated = GatedConv(4, (3, 3), gating=GatingSpec(), gate_mode='open',
                    **options)
  variables = gated.init(jax.random.key(0), X)
  variables = {**variables, 'params': {**variables['params'], **params}}
  got = gated.apply(variables, X)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)


def test_options_reach_the_gated_path():
  # VALID padding, a stride and a bias, gated: every gate closed leaves the
  # base path plus the bias; every gate open (by threshold) the dense
  # convolution plus the bias, up to the split's float rounding.
  layer = GatedConv(4, (3, 3), strides=2, padding='VALID', use_bias=True,
                    bias_init=nn.initializers.normal(1.0),
                    gating=GatingSpec())
  variables = layer.init(jax.random.key(0), X)
  params = variables['params']
  assert params['bias'].shape == (4,)
  closed = {**variables, 'params': {**params,
                                    'threshold': jnp.full((4,), 1e9)}}
  y, state = layer.apply(closed, X, mutable=['gating'])
  assert y.shape == (2, 3, 3, 4)
  base = ops.base_conv(X, params['kernel'], 4, strides=(2, 2),
                       padding='VALID')
  np.testing.assert_array_equal(y, base + params['bias'])
  assert float(state['gating']['density'][0].max()) == 0.0
  opened = {**variables, 'params': {**params,
                                    'threshold': jnp.full((4,), -1e9)}}
  dense = jax.lax.conv_general_dilated(
      X, params['kernel'], (2, 2), 'VALID',
      dimension_numbers=ops.DIMENSION_NUMBERS) + params['bias']
  np.testing.assert_allclose(layer.apply(opened, X), dense, rtol=1e-5,
                             atol=1e-5)


def test_the_bias_does_not_move_the_gate():
  # The saliency is taken from Y_base without the bias: the same masks and
  # the same running statistics whatever the bias.
  layer = GatedConv(4, (3, 3), use_bias=True, gating=GatingSpec())
  variables = layer.init(jax.random.key(0), X)
  results = []
  for bias in (jnp.zeros((4,)), jnp.array([5.0, -3.0, 100.0, 0.5])):
    params = {**variables['params'], 'bias': bias}
    y, state = layer.apply({**variables, 'params': params}, X, train=True,
                           mutable=['batch_stats', 'gate_masks'])
    results.append((y - bias, state))
  jax.tree.map(np.testing.assert_array_equal, results[0][1], results[1][1])
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-4)


def test_the_spatial_predictor_masks_the_biased_convolution():
  layer = GatedConv(4, (3, 3), use_bias=True,
                    bias_init=nn.initializers.normal(1.0),
                    gating=GatingSpec(kind='spatial_predictor',
                                      block=(2, 2, 1)))
  variables = layer.init(jax.random.key(0), X)
  y, state = layer.apply(variables, X, mutable=['gate_masks'])
  mask = state['gate_masks']['mask'][0]
  assert 0 < float(mask.mean()) < 1
  reference = nn.Conv(4, (3, 3), use_bias=True)
  dense = reference.apply(
      {'params': {k: variables['params'][k] for k in ('kernel', 'bias')}}, X)
  np.testing.assert_array_equal(y, dense * mask)


def test_a_gating_that_is_no_spec_is_refused():
  with pytest.raises(TypeError, match='gating must be a GatingSpec or None, '
                     'got str'):
    GatedConv(4, (3, 3), gating='cdg').init(jax.random.key(0), X)


def test_sparse_execution_takes_pads_equal_to_same():
  spec = GatingSpec(block=(2, 2, 0), execution='sparse')
  for padding in ('SAME', 1, ((1, 1), (1, 1))):
    GatedConv(4, (3, 3), gating=spec, padding=padding).init(
        jax.random.key(0), X)


def test_formulation_is_the_layers_field_not_the_environment(monkeypatch):
  params = nn.Conv(4, (3, 3), strides=2).init(jax.random.key(0), X)
  want = nn.Conv(4, (3, 3), strides=2).apply(params, X)
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'patches')
  # The default is XLA's convolution whatever the environment says.
  got = GatedConv(4, (3, 3), strides=2, use_bias=True).apply(params, X)
  np.testing.assert_array_equal(got, want)
  patches = GatedConv(4, (3, 3), strides=2, use_bias=True,
                      formulation='patches').apply(params, X)
  np.testing.assert_allclose(patches, want, rtol=1e-5, atol=1e-5)


# For each GatingSpec field: (the spec it is changed in, a changed value).
# Each must change what the layer traces (its init, train and eval passes
# and the gradient): no field is ignored by the layer.
CHANGED = {
    'kind': ({}, 'channel_predictor'),
    'groups': ({}, 2),
    'grouping': ({}, 'diagonal'),
    'block': ({}, (2, 2, 1)),
    'alpha': ({}, 3.0),
    'surrogate': ({}, 'hard_sigmoid'),
    'threshold_init': ({}, 0.5),
    'saliency_norm': ({}, 'sample'),
    'saliency_grad': ({}, True),
    'saliency_momentum': ({}, 0.5),
    'epsilon': ({}, 1e-3),
    'predictor_saliency': ({'kind': 'channel_predictor'}, 'relu'),
    'density_target': ({'kind': 'channel_predictor'}, 0.75),
    'gumbel_temperature': ({'kind': 'spatial_predictor'}, 2.0),
    'execution': ({'block': (2, 2, 0)}, 'sparse'),
    'closed_tile_gradient': ({'block': (2, 2, 0),
                              'execution': 'sparse_training'}, 'sampled'),
    'closed_tile_sample': ({'block': (2, 2, 0),
                            'execution': 'sparse_training',
                            'closed_tile_gradient': 'sampled'}, 0.5),
}


def _traced(spec: GatingSpec) -> str:
  """The jaxpr of the layer's init, train and eval passes and gradient."""
  layer = GatedConv(4, (3, 3), gating=spec)
  rngs = {'gumbel': jax.random.key(2), 'closed_tiles': jax.random.key(3)}

  def everything(x):
    variables = layer.init(jax.random.key(0), x)

    def loss(params):
      y, state = layer.apply({**variables, 'params': params}, x, train=True,
                             rngs=rngs, mutable=True)
      return jnp.sum(y ** 2), state
    grads, state = jax.grad(loss, has_aux=True)(variables['params'])
    return variables, grads, state, layer.apply(variables, x, mutable=True)
  return str(jax.make_jaxpr(everything)(X))


def test_no_gating_spec_field_is_ignored_by_the_layer():
  fields = {f.name for f in dataclasses.fields(GatingSpec)}
  assert fields == set(CHANGED), 'give every GatingSpec field a change here'
  assert _traced(GatingSpec()) == _traced(GatingSpec())   # deterministic
  for name, (base, value) in CHANGED.items():
    spec = GatingSpec(**base)
    assert getattr(spec, name) != value, name
    changed = dataclasses.replace(spec, **{name: value})
    assert _traced(spec) != _traced(changed), (
        f'GatedConv ignores GatingSpec.{name}')


@pytest.mark.parametrize('padding', ['VALID', 1, ((0, 2), (1, 0)), 'REFLECT'])
def test_layer_costs_count_the_layers_padding_as_nn_convs(padding):
  from cdg_jax.gating import flops  # pylint: disable=g-import-not-at-top
  costs = []
  for layer in (nn.Conv(4, (3, 3), strides=2, padding=padding),
                GatedConv(4, (3, 3), strides=2, padding=padding,
                          gating=GatingSpec())):
    variables = jax.eval_shape(layer.init, jax.random.key(0), X)
    (cost,) = flops.layer_costs(layer, variables, X)
    costs.append((cost.macs, cost.padded_macs, cost.output_shape))
  assert costs[0] == costs[1]


@pytest.mark.parametrize('options,message', [
    ({'kernel_dilation': 2}, r"kernel_dilation=2 is not supported: a dilated "
     r"kernel is not implemented by the gated convolution .*Leave "
     r"kernel_dilation at 1, or use flax.linen.Conv"),
    ({'input_dilation': (1, 2)}, r'input_dilation=\(1, 2\) is not '
     r'supported: an input dilation \(a transposed convolution\)'),
    ({'feature_group_count': 2}, r'feature_group_count=2 is not supported: '
     r'the gated convolution splits the input channels into gating.groups'),
    ({'mask': np.ones((3, 3, 4, 4))}, r'mask=<array of shape \(3, 3, 4, '
     r'4\)> is not supported: a fixed mask on the kernel is not implemented'),
    ({'padding': 'CAUSAL'}, r"padding='CAUSAL' is not a padding of a 2-D "
     r"convolution \('CAUSAL' is nn.Conv's padding of 1-D convolutions; it "
     r"takes 'SAME', 'VALID'"),
    ({'padding': (1, 2, 3)}, r'padding=\(1, 2, 3\) is not a padding of a '
     r'2-D convolution \(it takes'),
    ({'padding': -1}, r'padding=-1 has a negative pad, which crops the '
     r'input'),
    ({'formulation': 'im2col'}, r"Unknown convolution formulation "
     r"GatedConv.formulation='im2col'; expected None \(XLA's convolution, "
     r"as nn.Conv\) or one of 'xla', 'patches', 'shifted_dots', 'auto'"),
    ({'padding': 'VALID',
      'gating': GatingSpec(block=(2, 2, 0), execution='sparse_inference')},
     r"gating.execution='sparse_inference' skips closed tiles by convolving "
     r"windows of the SAME-padded input \(cdg_jax.gating.tiling\), which "
     r"cannot honour padding='VALID': it pads \(H, W\) by \(\(0, 0\), "
     r"\(0, 0\)\), SAME by \(\(1, 1\), \(1, 1\)\) for this 8x8 input. Use "
     r"padding='SAME' \(or pads equal to it\) or gating.execution='masked'"),
    ({'padding': 'REFLECT',
      'gating': GatingSpec(block=(2, 2, 0), execution='sparse_training')},
     r"cannot honour padding='REFLECT': it pads with the input's own values, "
     r"the windows with zeros for this 8x8 input"),
])
def test_options_not_taken_are_refused_with_the_reason(options, message):
  with pytest.raises(ValueError, match=message):
    GatedConv(4, (3, 3), **options).init(jax.random.key(0), X)
