"""Tests of the gated ResNets: parameter counts, trees, equivalences, errors."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import layers
from cdg_jax.gating import ops
from cdg_jax.gating.layers import GatedConv
from cdg_jax.gating.layers import GatingSpec
from cdg_jax.run import config_lib
from cdg_jax.ssl import models


def _param_count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _shapes(model, size, **kwargs):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False, **kwargs))


@pytest.mark.parametrize('name,stem,classes,size,expected', [
    # Torchvision's counts for the ImageNet models; the CIFAR ResNet-18 with a
    # 10-class head is the well-known 11,173,962.
    ('resnet18', 'cifar', 10, 32, 11_173_962),
    ('resnet50', 'cifar', 10, 32, 23_520_842),
    ('resnet18', 'imagenet', 1000, 64, 11_689_512),
    ('resnet34', 'imagenet', 1000, 64, 21_797_672),
    ('resnet50', 'imagenet', 1000, 64, 25_557_032),
])
def test_dense_parameter_counts(name, stem, classes, size, expected):
  model = models.create_resnet({'name': name, 'stem': stem}, None,
                               num_classes=classes)
  assert _param_count(_shapes(model, size)['params']) == expected


def test_gated_tree_is_dense_tree_plus_thresholds():
  dense = models.create_resnet({'name': 'resnet18'}, None)
  gated = models.create_resnet({'name': 'resnet18'}, config_lib.read_gating({'kind': 'cdg'}).layer)
  flat_dense = flax.traverse_util.flatten_dict(_shapes(dense, 32)['params'])
  flat_gated = flax.traverse_util.flatten_dict(_shapes(gated, 32)['params'])
  extra = {k: v for k, v in flat_gated.items() if k not in flat_dense}
  assert all(k[-1] == 'threshold' for k in extra)
  # Every 3x3 convolution of the 8 basic blocks is gated; stem and shortcuts not.
  assert len(extra) == 16
  assert ('stem_conv', 'threshold') not in extra
  assert all(flat_gated[k].shape == v.shape for k, v in flat_dense.items())


def _tiny(kind, **gating):
  return models.create_resnet({'name': 'resnet18', 'width': 8},
                              config_lib.read_gating({'kind': kind, **gating}).layer)



def _init(model, x):
  """`model.init` as one compiled program (op by op, each operation would
  compile on its own)."""
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), x)


def _apply(model, variables, x, *, train, mutable):
  """`model.apply` as one compiled program."""
  return jax.jit(functools.partial(model.apply, train=train,
                                   mutable=mutable))(variables, x)

@pytest.mark.parametrize('options', [
    {}, {'grouping': 'diagonal', 'saliency_norm': 'sample',
         'saliency_grad': True, 'surrogate': 'hard_sigmoid'}],
    ids=['first_reading', 'lineage'])
def test_gated_network_with_open_gates_equals_dense_network(options):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  dense, gated = _tiny('none'), _tiny('cdg', **options)
  variables = _init(gated, x)
  # Thresholds far below any saliency open every gate.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.full_like(p, -1e9) if path[-1].key == 'threshold' else p,
      variables['params'])
  dense_params = flax.traverse_util.unflatten_dict({
      k: v for k, v in flax.traverse_util.flatten_dict(params).items()
      if k[-1] != 'threshold'})
  dense_stats = {'batch_stats': flax.traverse_util.unflatten_dict({
      k: v for k, v in flax.traverse_util.flatten_dict(
          variables['batch_stats']).items() if not k[-1].startswith('saliency')})}
  for train in [False, True]:
    mutable = ['batch_stats'] if train else False
    out_gated = _apply(gated, {**variables, 'params': params}, x,
                       train=train, mutable=mutable)
    out_dense = _apply(dense, {'params': dense_params, **dense_stats}, x,
                       train=train, mutable=mutable)
    if train:
      out_gated, out_dense = out_gated[0], out_dense[0]
    # Splitting the channel sum reorders float adds; 8 layers amplify it a bit.
    np.testing.assert_allclose(out_gated, out_dense, rtol=1e-3, atol=1e-4)


def test_layers_sow_per_sample_densities_and_masks_on_request():
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  model = _tiny('cdg')
  variables = _init(model, x)
  _, state = _apply(model, variables, x, train=True,
                    mutable=('batch_stats', 'gating', 'gate_masks'))
  densities = flax.traverse_util.flatten_dict(state['gating'])
  masks = flax.traverse_util.flatten_dict(state['gate_masks'])
  assert len(densities) == 16 and len(masks) == 16
  key = ('stage2_block0', 'conv1')
  (density,), (mask,) = densities[key + ('density',)], masks[key + ('mask',)]
  assert mask.shape == (3, 4, 4, 16)
  np.testing.assert_allclose(density, mask.mean(axis=(1, 2, 3)), rtol=1e-6)
  # Running saliency statistics moved from their (0, 1) initialisation.
  stats = state['batch_stats']['stage2_block0']['conv1']
  assert np.abs(stats['saliency_mean']).max() > 0


def test_eval_masks_of_a_sample_do_not_depend_on_the_batch():
  model = _tiny('cdg')
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = _init(model, x)
  _, state = _apply(model, variables, x, train=True, mutable=('batch_stats',))
  variables = {**variables, 'batch_stats': state['batch_stats']}
  other = x.at[1:].set(jax.random.normal(jax.random.key(9), (3, 8, 8, 3)) * 3)
  masks = []
  for batch in (x, other):
    _, s = _apply(model, variables, batch, train=False,
                  mutable=('gate_masks',))
    masks.append(jax.tree.map(lambda m: m[0], s['gate_masks']))
  jax.tree.map(np.testing.assert_array_equal, masks[0], masks[1])


def test_bad_configuration_names_the_bad_value():
  with pytest.raises(ValueError, match="gating.kind='sparse'"):
    models.create_resnet({'name': 'resnet18'}, config_lib.read_gating({'kind': 'sparse'}).layer)
  with pytest.raises(ValueError, match="model.name='resnet19'"):
    models.create_resnet({'name': 'resnet19'}, None)
  # The gating block is parsed once, by the entry point; a raw block here
  # would be a second parse.
  with pytest.raises(TypeError, match=r'takes a GatingSpec or None, got dict'):
    models.create_resnet({'name': 'resnet18'}, {'kind': 'cdg'})
  with pytest.raises(ValueError, match=r"Unknown gating config field\(s\) \['grups'\]"):
    models.create_resnet({'name': 'resnet18'}, config_lib.read_gating({'kind': 'cdg', 'grups': 4}).layer)
  # Gating the stem: 3 input channels are not divisible by 4 groups.
  model = _tiny('cdg', layers='stem,block_3x3')
  with pytest.raises(ValueError, match='groups=4 does not divide the 3 input'):
    _shapes(model, 8)
  # 8x8 CIFAR input: a 3x3 block cannot tile the 8x8 stage-1 maps (a block
  # larger than a map is clamped to it, so only non-dividing sizes fail).
  model = _tiny('cdg', block=(3, 3, 1))
  with pytest.raises(ValueError, match=r'block=\(3, 3, 1\).*height 3 does not divide 8'):
    _shapes(model, 8)
  model = _tiny('cdg', groups=3)
  with pytest.raises(ValueError, match='groups=3 does not divide the 8 input'):
    _shapes(model, 8)


def test_gating_spec_defaults_are_the_config_defaults():
  # One set of defaults: a spec built in code (a notebook) trains what the
  # config files train.
  parsed = config_lib.read_gating(config_lib.gating_config()).layer
  assert models.ResNetGating() == parsed
  assert layers.GatingSpec() == parsed.layer_spec
  # A plain spec given to the ResNet is placed by the same defaults.
  assert models.ResNetGating.of(layers.GatingSpec()) == parsed


def test_placement_is_the_resnets_and_the_config_fields_still_set_it():
  # `gating.layers` and `gating.stage_blocks` of a config reach the ResNet's
  # own settings; a layer's spec has neither.
  assert not {'layers', 'stage_blocks'} & {
      f.name for f in dataclasses.fields(layers.GatingSpec)}
  spec = config_lib.read_gating({
      'kind': 'cdg', 'layers': 'block_3x3,shortcut',
      'stage_blocks': ((4, 4, 0), (2, 2, 0), (2, 2, 0), (2, 2, 0))}).layer
  assert isinstance(spec, models.ResNetGating)
  assert spec.layers == ('block_3x3', 'shortcut')
  model = models.create_resnet({'name': 'resnet10', 'width': 8}, spec)
  shapes = _shapes(model, 8)['params']
  assert 'threshold' in shapes['stage2_block0']['shortcut_conv']
  assert 'threshold' not in shapes['stem_conv']
  # Each layer gets its stage's block, as a plain GatingSpec.
  assert spec.for_stage(1, 4).layer_spec == layers.GatingSpec(block=(2, 2, 0))
  assert type(spec.spec_of('shortcut')) is layers.GatingSpec
  assert spec.spec_of('stem') is None


def test_the_programs_formulation_is_explicit_on_the_network(monkeypatch):
  monkeypatch.delenv(ops.CONV_FORMULATION_VARIABLE, raising=False)
  model = models.create_resnet({'name': 'resnet10', 'width': 8}, None)
  assert model.conv_formulation == 'auto'
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'xla')
  assert models.create_resnet({'name': 'resnet10'}).conv_formulation == 'xla'
  assert models.create_resnet({'name': 'resnet10'}, conv_formulation='patches'
                              ).conv_formulation == 'patches'
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'im2col')
  with pytest.raises(ValueError, match="CDG_JAX_CONV_FORMULATION='im2col'"):
    models.create_resnet({'name': 'resnet10'})
  # A ResNet built directly computes as nn.Conv (XLA's convolution).
  assert models.ResNet((1, 1, 1, 1), models.BasicBlock).conv_formulation is None


def test_lineage_options_are_validated_and_reach_the_layer():
  with pytest.raises(ValueError, match="grouping='block'"):
    GatingSpec(grouping='block')
  with pytest.raises(ValueError, match="surrogate='tanh'"):
    GatingSpec(surrogate='tanh')
  from cdg_jax.gating.regularizers import RegularizerSpec
  with pytest.raises(ValueError, match="regularizer='l1'"):
    RegularizerSpec(regularizer='l1')
  with pytest.raises(ValueError, match='density_target must be in'):
    RegularizerSpec(density_target=1.5)
  with pytest.raises(ValueError, match='density_target must be in'):
    GatingSpec(kind='channel_predictor', density_target=1.5)
  with pytest.raises(ValueError, match='target_anneal_fraction must be in'):
    RegularizerSpec(target_anneal_fraction=-0.1)
  with pytest.raises(ValueError, match=r"gating.target_anneal_fraction=0.5 "
                     r"would be ignored: .* \(a density target to anneal\), "
                     r"and this config has gating.kind='cdg', "
                     r"gating.regularizer='threshold_sum'"):
    config_lib.read_gating({'regularizer': 'threshold_sum',
                            'target_anneal_fraction': 0.5})
  # The threshold forms read no density target: setting one is refused.
  with pytest.raises(ValueError, match=r'gating.density_target=0.3 would be '
                     r'ignored'):
    config_lib.read_gating({'regularizer': 'threshold_sum',
                            'density_target': 0.3})
  # ... and NaN is outside every range.
  with pytest.raises(ValueError, match='gating.alpha must be finite and > 0, '
                     'got nan'):
    GatingSpec(alpha=float('nan'))


def test_a_resnet_gating_is_refused_by_one_layer_with_the_reason():
  """The ResNet's placement fields mean nothing to one layer."""
  gating = models.ResNetGating(layers=('stem',))
  with pytest.raises(ValueError, match=(
      r'GatedConv reads a GatingSpec; this ResNetGating also sets layers, '
      r'stage_blocks, which place gated layers in a network and which one '
      r'layer would ignore. Pass its layer_spec')):
    GatedConv(4, (3, 3), gating=gating).init(
        jax.random.key(0), jnp.ones((1, 8, 8, 4)))
