"""Block-sparse execution equals masked execution, per layer and per backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import ops
from cdg_jax.gating import sparse
from cdg_jax.gating import tiling
from cdg_jax.run import config_lib
from cdg_jax.ssl import models


def test_tile_rules_padding_and_capacities_by_hand():
  assert tiling.effective_tile((16, 16), (4, 4)) == (4, 4)
  assert tiling.effective_tile((2, 2), (4, 4)) == (2, 2)    # clamped
  with pytest.raises(ValueError, match=r'does not tile.*\(6, 6\)'):
    tiling.effective_tile((6, 6), (4, 4))
  assert tiling.same_padding(8, 3, 1) == (1, 1)
  assert tiling.same_padding(8, 3, 2) == (0, 1)   # XLA SAME, even input
  assert tiling.same_padding(7, 3, 2) == (1, 1)
  assert tiling.capacities(64) == [4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56]
  assert tiling.capacities(4) == [1, 2, 3]
  assert tiling.capacities(64, (0.125, 0.25)) == [8, 16]
  assert tiling.capacities(100, (0.3, 0.31)) == [30, 31]
  # The gate's block rule: bc = 0 is all channels, blocks clamp to the map.
  assert ops.effective_block((1, 2, 2, 8), (4, 4, 0)) == (2, 2, 8)


def test_assemble_tiles_places_open_tiles_by_hand():
  # Two samples, a 2x2 grid of 1x2 tiles; open: sample 0 tile (0, 1), sample 1
  # tiles (0, 0) and (1, 1). Tile k holds the value k + 1 (row 3 is unused).
  tile_mask = jnp.asarray([[[False, True], [False, False]],
                           [[True, False], [False, True]]])
  tiles = jnp.arange(1.0, 5.0)[:, None, None, None] * jnp.ones((4, 1, 2, 1))
  expected = np.zeros((2, 2, 4, 1))
  expected[0, 0, 2:4] = 1.0
  expected[1, 0, 0:2] = 2.0
  expected[1, 1, 2:4] = 3.0
  np.testing.assert_array_equal(tiling.assemble_tiles(tiles, tile_mask),
                                expected)


def _layer(h, c_in=8, c_out=12, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (3, h, h, c_in))
  kernel = jax.random.normal(kk, (3, 3, c_in, c_out)) * 0.2
  return x, kernel


@pytest.mark.parametrize('tile_conv', ['conv', 'patches'])
# (16, 4, 1) was dropped: the same stride-1 path and the same 48 tiles and
# 11 capacities as (8, 2, 1).
@pytest.mark.parametrize('h,tile,stride', [(8, 1, 1), (8, 2, 1), (8, 4, 2),
                                           (16, 8, 2), (4, 8, 1), (7, 1, 2)])
def test_sparse_conditional_equals_masked_for_every_capacity(h, tile, stride,
                                                            tile_conv):
  x, kernel = _layer(h)
  strides = (stride, stride)
  y_base = ops.base_conv(x, kernel, 4, 'first', strides)
  x_cond, k_cond = ops.conditional_operands(x, kernel, 4, 'first')
  out = y_base.shape[1]
  bh, _ = tiling.effective_tile((out, out), (tile, tile))
  # The whole input goes in; the executor reads channels 2: (C_in / G = 2).
  run = jax.jit(lambda y, m: sparse.sparse_add_conditional(
      y, x, k_cond, m, strides, tile_conv=tile_conv, cond_channels_from=2))
  rng = np.random.default_rng(h * 10 + tile)
  grid = (3, out // bh, out // bh)
  num_tiles = int(np.prod(grid))
  with pytest.raises(ValueError, match=r'8 - 0 channels; the kernel expects 6'):
    sparse.sparse_add_conditional(y_base, x, k_cond, jnp.ones(grid, bool))
  # Exactly each capacity open, and one more (the next branch up), so every
  # capacity branch and the dense fallback run; none and all open too.
  caps = tiling.capacities(num_tiles)
  counts = sorted({0, num_tiles} | {c for cap in caps for c in (cap, cap + 1)
                                    if c <= num_tiles})
  assert len(counts) >= min(num_tiles, 4)
  for count in counts:
    flat = np.zeros(num_tiles, bool)
    flat[rng.choice(num_tiles, count, replace=False)] = True
    tile_mask = jnp.asarray(flat.reshape(grid))
    mask = jnp.repeat(jnp.repeat(tile_mask, bh, 1), bh, 2)[..., None]
    expected = y_base + mask * ops.conv(x_cond, k_cond, strides)
    np.testing.assert_allclose(run(y_base, tile_mask), expected, rtol=1e-5,
                               atol=1e-5, err_msg=f'{count} tiles open')


def test_sparse_gated_conv_equals_gated_conv_for_both_groupings():
  x, kernel = _layer(8, c_in=8, c_out=8, seed=3)
  threshold = jnp.linspace(-0.5, 0.5, 8)
  stats = dict(running_mean=jnp.full((8,), 0.1),
               running_var=jnp.full((8,), 2.0))
  # Each form compiled as one program (op-by-op dispatch compiles every
  # operation on its own).
  masked_fn = jax.jit(ops.gated_conv,
                      static_argnames=('groups', 'grouping', 'strides',
                                       'block'))
  fast_fn = jax.jit(sparse.sparse_gated_conv,
                    static_argnames=('groups', 'grouping', 'strides',
                                     'block'))
  for grouping in ('first', 'diagonal'):
    for strides in ((1, 1), (2, 2)):
      masked, mask, _ = masked_fn(
          x, kernel, threshold, groups=4, grouping=grouping, strides=strides,
          block=(2, 2, 0), **stats)
      fast, fast_mask, _ = fast_fn(
          x, kernel, threshold, groups=4, grouping=grouping, strides=strides,
          block=(2, 2, 0), **stats)
      np.testing.assert_array_equal(fast_mask, mask)
      assert 0 < float(mask.mean()) < 1
      np.testing.assert_allclose(fast, masked, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'needs gating.block=\(bh, bw, 0\)'):
    sparse.sparse_gated_conv(x, kernel, threshold, block=(2, 2, 4), **stats)


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
