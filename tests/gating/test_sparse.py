"""Block-sparse execution equals masked execution, per layer (the program's
backbones: tests/test_sparse_resnet.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import ops
from cdg_jax.gating import sparse
from cdg_jax.gating import tiling

from two_devices import collectives
from two_devices import on_two_devices


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




def test_two_devices_skip_tiles_per_shard_with_nothing_crossing_devices():
  # Inference with running statistics: every sample is on its own, so on a
  # 2-device mesh the executor (per shard, tiling.per_batch_shard) gives
  # the one-device output with no collective at all; on the whole sharded
  # batch its tile gathers crossed the devices.
  kx, kk = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (4, 8, 8, 8))
  kernel = jax.random.normal(kk, (3, 3, 8, 8)) * 0.2
  threshold = jnp.linspace(-0.5, 0.5, 8)
  stats = (jnp.full((8,), 0.1), jnp.full((8,), 2.0))

  def fast(x, kernel, threshold, mean, var):
    return sparse.sparse_gated_conv(x, kernel, threshold, block=(2, 2, 0),
                                    running_mean=mean, running_var=var)[:2]
  step = on_two_devices(fast, (True, False, False, False, False))
  got, mask = step(x, kernel, threshold, *stats)
  want, want_mask, _ = jax.jit(lambda *a: ops.gated_conv(
      *a[:3], block=(2, 2, 0), running_mean=a[3], running_var=a[4]))(
          x, kernel, threshold, *stats)
  assert 0 < float(want_mask.mean()) < 1
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert collectives(step.lower(x, kernel, threshold,
                                *stats).compile().as_text()) == 0
