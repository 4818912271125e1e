"""Block-sparse execution in the program's ResNets: sparse backbones equal masked
ones, per-stage tiles, and their checks."""

import jax
import numpy as np
import pytest

from cdg_jax.run import config_lib
from cdg_jax.ssl import models


def test_sparse_backbone_equals_masked_backbone_and_compiles_once():
  # Two 8x8 images and 4x4 tiles: 8 tiles on the first stage's maps, 2 on
  # the later ones, so the executor compiles 7 or 1 capacity branches per
  # gated layer rather than 11 (what is checked does not depend on the size).
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  gating_config = {'kind': 'cdg', 'block': (4, 4, 0)}
  model_config = {'name': 'resnet10', 'width': 8}
  masked = models.create_resnet(model_config, config_lib.read_gating(gating_config).layer)
  fast = models.with_sparse_inference(models.create_resnet(
      model_config, config_lib.read_gating(gating_config).layer))
  # Compiled rather than op by op (which compiles every operation alone).
  variables = jax.jit(masked.init)(jax.random.key(0), x)
  # Running statistics from a training pass, so the gates are mixed.
  _, updates = jax.jit(lambda v, x: masked.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  variables = {'params': variables['params'], **updates}
  traces = []

  def forward(model, images):
    traces.append(model.gating.sparse_inference)
    return model.apply(variables, images, train=False, mutable=['gating'])

  forward_masked = jax.jit(lambda images: forward(masked, images))
  forward_fast = jax.jit(lambda images: forward(fast, images))
  for scale in (1.0, 3.0):   # other inputs open other tiles
    expected, densities = forward_masked(scale * x)
    got, fast_densities = forward_fast(scale * x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, fast_densities, densities)
  assert traces.count(True) == 1
  with pytest.raises(ValueError, match="gating.kind='cdg' and gating.block"):
    models.with_sparse_inference(models.create_resnet(
        model_config, config_lib.read_gating({'kind': 'cdg'}).layer))
  with pytest.raises(ValueError, match="gating.kind='spatial_predictor'"):
    models.with_sparse_inference(models.create_resnet(
        model_config, config_lib.read_gating({'kind': 'spatial_predictor', 'block': (2, 2, 0)}).layer))


def test_stage_blocks_give_each_stage_its_tile_and_sparse_equals_masked():
  # Two 8x8 images (fewer tiles, so fewer capacity branches to compile).
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  model_config = {'name': 'resnet10', 'width': 8}
  # Maps 8/4/2/1: 4x4 tiles on the first stage, 2x2 on the next two (one
  # tile, the whole 2x2 map, on the third), 1x1 on the last.
  stage_blocks = ((4, 4, 0), (2, 2, 0), (2, 2, 0), (1, 1, 0))
  gating_config = {'kind': 'cdg', 'block': (1, 1, 1),
                   'stage_blocks': stage_blocks}
  masked = models.create_resnet(model_config, config_lib.read_gating(gating_config).layer)
  fast = models.with_sparse_inference(masked)
  # Compiled rather than op by op (which compiles every operation alone).
  variables = jax.jit(masked.init)(jax.random.key(0), x)
  _, updates = jax.jit(lambda v, x: masked.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  variables = {'params': variables['params'], **updates}
  expected, collections = jax.jit(lambda v, x: masked.apply(
      v, x, train=False, mutable=['gate_masks']))(variables, x)
  got = jax.jit(lambda v, images: fast.apply(v, images, train=False))(
      variables, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  masks = collections['gate_masks']
  for stage, (tile, _, _) in enumerate(stage_blocks):
    mask = np.asarray(masks[f'stage{stage + 1}_block0']['conv2']['mask'][0])
    n, h, w, c = mask.shape
    tiles = mask.reshape(n, h // tile, tile, w // tile, tile, c)
    # One decision per tile, across all channels ...
    assert (tiles == tiles[:, :, :1, :, :1, :1]).all(), stage
    # ... and not a coarser one: the first stage's 4x4 tiles differ.
    if stage == 0:
      assert len(np.unique(tiles[:, :, 0, :, 0, 0])) == 2
  # The same tile everywhere through stage_blocks is `block` itself.
  uniform = models.create_resnet(model_config, config_lib.read_gating({
      'kind': 'cdg', 'block': (2, 2, 0), 'stage_blocks': ((2, 2, 0),) * 4}).layer)
  plain = models.create_resnet(model_config, config_lib.read_gating({'kind': 'cdg',
                                              'block': (2, 2, 0)}).layer)
  apply = lambda model: jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, x)
  np.testing.assert_array_equal(apply(uniform), apply(plain))


def test_stage_blocks_are_validated_with_the_bad_value_named():
  # The ResNet's placement of its gates (`models.ResNetGating`).
  with pytest.raises(ValueError, match=r'stage_blocks\[1\] must be three ints'):
    models.ResNetGating(stage_blocks=((4, 4, 0), (4, 0, 0)))
  with pytest.raises(ValueError, match="read only with gating.kind='cdg'"):
    config_lib.read_gating({'kind': 'spatial_predictor',
                            'stage_blocks': ((4, 4, 0),) * 4})
  spec = models.ResNetGating(stage_blocks=((8, 8, 0), (4, 4, 0)))
  assert spec.for_stage(1, 2).block == (4, 4, 0)
  assert spec.blocks == ((8, 8, 0), (4, 4, 0))   # the stem is not gated
  assert models.ResNetGating(layers=('stem',), stage_blocks=((8, 8, 0),)
                             ).blocks == ((1, 1, 1), (8, 8, 0))
  with pytest.raises(ValueError, match=r'2 entries for a ResNet of 4 stages'):
    spec.for_stage(0, 4)
  # Sparse inference needs every stage's block to cover all channels.
  with pytest.raises(ValueError, match=r'stage_blocks=\(\(4, 4, 0\), \(2, 2, 4\)'):
    models.with_sparse_inference(models.create_resnet(
        {'name': 'resnet10', 'width': 8}, config_lib.read_gating({
            'kind': 'cdg', 'block': (4, 4, 0),
            'stage_blocks': ((4, 4, 0), (2, 2, 4), (2, 2, 0), (2, 2, 0))}).layer))
  config = config_lib.base_config()
  config.gating.stage_blocks = ((4, 4, 0),) * 3
  with pytest.raises(ValueError, match=r'3 entries for a ResNet of 4 stages'):
    config_lib.validate(config)
