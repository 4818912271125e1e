"""The sparse train step's gated convolution: open tiles only, forward and back.

`sparse_train_gated_conv` gives the output, mask and statistics of
`ops.gated_conv` with the conditional path computed at the open tiles only,
and a custom VJP whose backward pass also touches only the open tiles
(`conditional_at_open_tiles`); with `closed_tile_gradient='sampled'` the
gate's gradient at closed tiles is estimated on a uniform sample of them
(`sample_closed_tiles`). The forward executor is `cdg_jax.gating.sparse`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

from cdg_jax.gating import ops
from cdg_jax.gating import sparse
from cdg_jax.gating import tiling

Array = jax.Array


def _tiles_gradients(tile_mask: Array, capacity: int, strides: Sequence[int],
                     cond_channels_from: int, sparse_input: bool,
                     precision=None):
  """`gradients(x_all, kernel_cond, cotangent) -> (dx_cond, dkernel)` of the
  conditional output at the tiles of `tile_mask` (at most `capacity`).

  Both from the open tiles only: their gathered cotangent tiles times the
  transposed kernel give their windows' gradient, added back into the input
  map with overlapping halos (`tiling.overlap_add_windows`); the windows' patches
  against the cotangent tiles give the kernel's. With `sparse_input` False
  the input's gradient is returned as None (the caller takes it densely).

  Written out rather than left to autodiff, whose transpose of the gathers
  is a scatter-add (of the cotangent into the tile slots, of every window
  into the input), which XLA:CPU runs element by element: the step was 12x
  slower than dense at width 64 when measured so.
  """
  n, gh, gw = tile_mask.shape
  flat = tile_mask.reshape(-1)

  def gradients(x_all, kernel_cond, cotangent):
    out_h, out_w, c_out = cotangent.shape[1:]
    bh, bw = out_h // gh, out_w // gw
    x_cond = x_all[..., cond_channels_from:]
    tile_ids = jnp.nonzero(flat, size=capacity, fill_value=0)[0]
    windows = tiling.gather_windows(x_cond, tile_ids, (gh, gw), (bh, bw),
                                    kernel_cond.shape[:2], strides)
    tiles = cotangent.reshape(n, gh, bh, gw, bw, c_out).transpose(
        0, 1, 3, 2, 4, 5).reshape(n * gh * gw, bh, bw, c_out)
    # Slots past the open tiles repeat tile 0: no cotangent from them.
    used = jnp.arange(capacity) < jnp.sum(flat.astype(jnp.int32))
    cotangent_tiles = jnp.where(used[:, None, None, None], tiles[tile_ids], 0)
    # As one matrix product over the windows' patches, whichever form the
    # forward used: the same product transposed inside the switch, where
    # XLA:CPU ran the convolution form's kernel gradient 100x slower than
    # outside it (27 s against 0.26 s, 1,280 tiles of 8x8, 48 -> 64
    # channels, when measured), and the product at 0.14 s. The windows'
    # gradient is the patches' gradient (cotangent times the transposed
    # kernel: the open tiles' share of the dense transposed convolution's
    # multiply-accumulates, no more) added back tap by tap.
    _, tiles_vjp = jax.vjp(
        lambda w, k: tiling.tile_convolution(w, k, strides, 'patches',
                                             precision=precision),
        windows, kernel_cond)
    dwindows, dkernel = tiles_vjp(cotangent_tiles.astype(windows.dtype))
    if not sparse_input:
      return None, dkernel
    dx_cond = tiling.overlap_add_windows(dwindows, tile_mask, x_cond.shape[1:3],
                                         (bh, bw), kernel_cond.shape[:2], strides)
    return dx_cond, dkernel
  return gradients


def _open_tiles_only(cotangent: Array, tile_mask: Array,
                     tile_hw: tuple[int, int]) -> Array:
  """`cotangent` with zeros at the closed tiles of `tile_mask`.

  The output is zero at closed tiles whatever the operands: no gradient from
  there (a caller's cotangent need not be zero there).
  """
  return jnp.where(tiling.tile_map(tile_mask, tile_hw)[..., None], cotangent, 0)


def _dense_gradients(tile_mask: Array, tile_hw: tuple[int, int],
                     strides: Sequence[int], cond_channels_from: int,
                     sparse_input: bool, formulation: str | None = None,
                     precision=None):
  """`gradients(x_all, kernel_cond, cotangent) -> (dx_cond, dkernel)` of the
  conditional output above the largest capacity: the dense convolution's,
  from the open tiles' cotangent only. With `sparse_input` False the input's
  gradient is returned as None (the caller takes it densely). `formulation`,
  `precision`: the forward convolution's (`ops.conv`), whose VJP this is."""
  conv = lambda x, k: ops.conv(x, k, strides, 'SAME', formulation, precision)

  def gradients(x_all, kernel_cond, cotangent):
    x_cond = x_all[..., cond_channels_from:]
    cotangent = _open_tiles_only(cotangent, tile_mask, tile_hw)
    if not sparse_input:
      return None, jax.vjp(lambda k: conv(x_cond, k),
                           kernel_cond)[1](cotangent)[0]
    return jax.vjp(conv, x_cond, kernel_cond)[1](cotangent)
  return gradients


def _dense_input_gradient(x_cond: Array, kernel_cond: Array,
                          cotangent: Array, strides: Sequence[int],
                          formulation: str | None = None,
                          precision=None) -> Array:
  return jax.vjp(lambda x: ops.conv(x, kernel_cond, strides, 'SAME',
                                    formulation, precision),
                 x_cond)[1](cotangent.astype(x_cond.dtype))[0]


def _conditional_with_vjp(strides: Sequence[int],
                          capacity_fractions: Sequence[float], tile_conv: str,
                          cond_channels_from: int, sparse_input: bool,
                          tile_hw: tuple[int, int], formulation: str | None,
                          precision):
  """`conditional(x_all, kernel_cond, tile_mask)` with its custom VJP:
  `conditional_at_open_tiles`'s switch over capacities, forward and back."""
  def switch_operands(tile_mask):
    """(branches, gradients, index): forward and backward of each capacity
    of this batch's (or shard's: its capacities count its own) tiles."""
    branches, index = sparse.conditional_branches(tile_mask, strides,
                                                  capacity_fractions, tile_conv,
                                                  cond_channels_from,
                                                  formulation, precision)
    caps = tiling.capacities(tile_mask.size, capacity_fractions)
    gradients = [_tiles_gradients(tile_mask, c, strides, cond_channels_from,
                                  sparse_input, precision)
                 for c in caps] + [_dense_gradients(tile_mask, tile_hw, strides,
                                                    cond_channels_from,
                                                    sparse_input, formulation,
                                                    precision)]
    return branches, gradients, index

  # The tile mask is an operand, not a closure, and the backward pass
  # rebuilds what it derives from it: under `per_batch_shard` the backward
  # is traced in the shard_map's transpose, where the forward trace's values
  # no longer exist.
  @jax.custom_vjp
  def conditional(x_all, kernel, tile_mask):
    branches, _, index = switch_operands(tile_mask)
    return jax.lax.switch(index, branches, x_all, kernel)

  def forward(x_all, kernel, tile_mask):
    return conditional(x_all, kernel, tile_mask), (x_all, kernel, tile_mask)

  def backward(residuals, cotangent):
    x_all, kernel, tile_mask = residuals
    _, gradients, index = switch_operands(tile_mask)
    dx_cond, dkernel = jax.lax.switch(index, gradients, x_all, kernel,
                                      cotangent)
    if dx_cond is None:
      # One transposed convolution over the whole map, the same for every
      # capacity, taken outside the switch (a convolution inside an XLA:CPU
      # conditional ran several times slower than the same one outside,
      # when measured).
      x_cond = x_all[..., cond_channels_from:]
      open_cotangent = _open_tiles_only(cotangent, tile_mask, tile_hw)
      dx_cond = _dense_input_gradient(x_cond, kernel, open_cotangent, strides,
                                      formulation, precision)
    dx_all = jnp.pad(dx_cond.astype(x_all.dtype),
                     ((0, 0),) * 3 + ((cond_channels_from, 0),))
    return dx_all, dkernel, None

  conditional.defvjp(forward, backward)
  return conditional


def conditional_at_open_tiles(x: Array, kernel_cond: Array, tile_mask: Array,
                              strides: Sequence[int] = (1, 1),
                              capacity_fractions: Sequence[float] =
                              tiling.DEFAULT_CAPACITIES,
                              tile_conv: str = 'auto',
                              cond_channels_from: int = 0,
                              sparse_input_gradient: bool = True,
                              formulation: str | None = None,
                              precision=None) -> Array:
  """The conditional output at the open tiles, zero at the closed ones,
  differentiable in `x` and `kernel_cond` (training).

  The forward pass is the executor's (`sparse.sparse_add_conditional` without the
  base path). The backward pass is a custom VJP (differentiating the
  `lax.switch` would keep every branch's residuals, zero-filled, and
  transpose the gathers into scatter-adds) under the forward's switch
  index: the kernel's and the input's gradients from the open tiles only
  (`_tiles_gradients`); above the largest capacity, the dense convolution's
  (`_dense_gradients`).
  Gradients reach `x` and `kernel_cond` from the open tiles only, as in the
  masked form `d * Y_cond` with d = 0 at the closed ones.

  Args: as `sparse.sparse_add_conditional`, without `y_base`, and
    sparse_input_gradient: False takes the input's gradient as one dense
      transposed convolution of the cotangent (zero at closed tiles) outside
      the switch: the same values, for comparison. Also used when a
      window reaches past the neighbouring tiles (kernels much larger than
      the tile).
    formulation, precision: of the convolutions (`ops.conv`), forward and
      backward (passed here, not taken from an enclosing
      `ops.conv_defaults` block: the backward pass is traced after it).

  Returns:
    (N, Ho, Wo, Co) in the dtype of `x` and `kernel_cond`.
  """
  n, gh, gw = tile_mask.shape
  out_shape = (n, -(-x.shape[1] // strides[0]), -(-x.shape[2] // strides[1]))
  sparse.check_operands(out_shape, x, kernel_cond, tile_mask, cond_channels_from)
  tile_hw = (out_shape[1] // gh, out_shape[2] // gw)
  sparse_input = sparse_input_gradient and tiling.windows_reach_neighbours_only(
      x.shape[1:3], tile_hw, kernel_cond.shape[:2], strides)

  conditional = _conditional_with_vjp(strides, capacity_fractions, tile_conv,
                                      cond_channels_from, sparse_input,
                                      tile_hw, formulation, precision)
  # Per device under a data-parallel mesh (`tiling.per_batch_shard`): the
  # custom VJP then runs on each shard, and the kernel's gradient is summed
  # over the devices by the shard_map's transpose.
  return tiling.per_batch_shard(conditional, (True, False, True))(
      x, kernel_cond, tile_mask)


def sample_closed_tiles(rng: Array, tile_mask: Array, capacity: int
                        ) -> tuple[Array, Array]:
  """A uniform sample of the closed tiles, without replacement.

  Args:
    rng: PRNG key.
    tile_mask: (N, gh, gw) booleans, True where a tile is open.
    capacity: at most this many tiles are drawn (static).

  Returns:
    (sampled, scale): (N, gh, gw) booleans, True at m = min(capacity,
    closed) closed tiles drawn uniformly without replacement, and the
    inverse inclusion probability closed / m (0 when none is closed), so
    that `scale * sum over sampled tiles` is an unbiased estimate of the sum
    over every closed tile.
  """
  closed = ~tile_mask.reshape(-1)
  # Open tiles sort after every closed one: the first `capacity` of the
  # order are closed tiles while any are left.
  keys = jnp.where(closed, jax.random.uniform(rng, closed.shape), 2.0)
  first = jnp.argsort(keys)[:capacity]
  sampled = jnp.zeros_like(closed).at[first].set(True) & closed
  num_closed = jnp.sum(closed.astype(jnp.float32))
  num_sampled = jnp.sum(sampled.astype(jnp.float32))
  scale = jnp.where(num_sampled > 0, num_closed / jnp.maximum(num_sampled, 1.0),
                    0.0)
  return sampled.reshape(tile_mask.shape), scale


# How a sparse train step gives the gate a task-loss gradient at closed tiles
# (`GatingSpec.closed_tile_gradient`).
CLOSED_TILE_GRADIENTS = ('none', 'sampled')


def _closed_tiles_estimate(x: Array, kernel_cond: Array, tile_mask: Array,
                           mask: Array, rng: Array, sample_fraction: float,
                           strides: Sequence[int], cond_channels_from: int,
                           formulation: str | None, precision) -> Array:
  """'sampled': `(d - stop_gradient(d)) * stop_gradient(Y_cond) * scale` at a
  uniform sample of the closed tiles (zero in the forward pass; its only
  gradient is the gate's, `sparse_train_gated_conv`)."""

  def sampled_tiles(x, kernel_cond, tile_mask, rng):
    # Per device under a data-parallel mesh, each device samples its own
    # closed tiles with a key of its own (a stratified sample: still
    # unbiased, each stratum scaled by its own inclusion probability).
    capacity = max(1, math.ceil(sample_fraction * tile_mask.size))
    sampled, scale = sample_closed_tiles(tiling.shard_key(rng), tile_mask,
                                         capacity)
    probe = sparse.tiles_branch(sampled, capacity, strides, 'auto',
                                cond_channels_from, formulation,
                                precision)(x, kernel_cond)
    return probe, jnp.full((tile_mask.shape[0], 1, 1, 1), scale)
  probe, scale = tiling.per_batch_shard(
      sampled_tiles, (True, False, True, False))(
          jax.lax.stop_gradient(x), jax.lax.stop_gradient(kernel_cond),
          tile_mask, rng)
  gate_only = mask - jax.lax.stop_gradient(mask)
  return (gate_only * scale).astype(probe.dtype) * probe


def sparse_train_gated_conv(
    x: Array, kernel: Array, threshold: Array, *, groups: int = 4,
    grouping: str = 'first', strides: Sequence[int] = (1, 1),
    block: Sequence[int] = (4, 4, 0), alpha: float = 2.0,
    epsilon: float = 1e-5, norm: str = 'batch', num_groups: int = 1,
    saliency_grad: bool = False, surrogate: str = 'sigmoid',
    closed_tile_gradient: str = 'none', sample_fraction: float = 0.0625,
    rng: Array | None = None,
    capacity_fractions: Sequence[float] = tiling.DEFAULT_CAPACITIES,
    formulation: str | None = None, precision=None
) -> tuple[Array, Array, tuple[Array, Array]]:
  """`ops.gated_conv` for training, the closed tiles' conditional path skipped.

  The same output, mask and statistics as `ops.gated_conv` with batch
  statistics (SAME padding only, which `cdg_jax.GatedConv` checks; `block`
  tile-structured, bc = 0 or C_out), and
  the same gradients for every parameter and the input except through the
  gate at closed tiles: `Y = Y_base + d * Y_cond` with `Y_cond` computed at
  the open tiles only (`conditional_at_open_tiles`), so the conditional
  weights and the input get exactly the masked form's gradient (d = 0
  contributes nothing at a closed tile), and the gate's straight-through
  gradient `dL/dd = <dL/dY, Y_cond>` is exact at open tiles. At closed tiles
  it needs `Y_cond`, which is not computed:

  * 'none': no task-loss gradient reaches a closed tile's gate (only the
    regulariser moves its threshold);
  * 'sampled': `Y_cond` is also computed, forward only, at a uniform sample
    of the closed tiles (`sample_closed_tiles`, at most `sample_fraction` of
    all tiles; of each device's tiles, with a key of its own, under a
    data-parallel mesh), and their gate gradient is scaled by the inverse
    inclusion probability: an unbiased estimate of the masked form's gate
    gradient.
    It adds `(d - stop_gradient(d)) * stop_gradient(Y_cond) * scale`, which
    is zero in the forward pass and reaches nothing but the gate.

  Args:
    x, kernel, threshold, groups, grouping, strides, block, alpha, epsilon,
    norm, num_groups, saliency_grad, surrogate: as `ops.gated_conv`.
    closed_tile_gradient: 'none' or 'sampled'.
    sample_fraction: 'sampled': the sample's static capacity, as a fraction
      of all tiles of the batch.
    rng: 'sampled': the key of the sample.
    capacity_fractions: the executor's static capacities.
    formulation, precision: of every convolution (`ops.conv`; None: XLA's
      convolution, default precision).

  Returns:
    (y, mask, (mean, var)) as `ops.gated_conv`.
  """
  if closed_tile_gradient not in CLOSED_TILE_GRADIENTS:
    raise ValueError(f'Unknown gating.closed_tile_gradient='
                     f'{closed_tile_gradient!r}; expected one of '
                     f'{CLOSED_TILE_GRADIENTS}.')
  tiling.check_tile_block(block, kernel.shape[-1])
  y_base = ops.base_conv(x, kernel, groups, grouping, strides, 'SAME',
                         formulation, precision)
  mask, tile_mask, stats = tiling.tile_gate(
      y_base, threshold, block[:2], alpha=alpha, epsilon=epsilon, norm=norm,
      num_groups=num_groups, saliency_grad=saliency_grad, surrogate=surrogate)
  _, kernel_cond = ops.conditional_operands(x, kernel, groups, grouping)
  offset = (ops.base_channels(x.shape[-1], groups)
            if grouping == 'first' else 0)
  cond = conditional_at_open_tiles(x, kernel_cond, tile_mask, strides,
                                   capacity_fractions,
                                   cond_channels_from=offset,
                                   formulation=formulation,
                                   precision=precision)
  y = y_base + mask.astype(cond.dtype) * cond
  if closed_tile_gradient == 'sampled':
    if rng is None:
      raise ValueError("closed_tile_gradient='sampled' needs an rng.")
    y = y + _closed_tiles_estimate(x, kernel_cond, tile_mask, mask, rng,
                                   sample_fraction, strides, offset,
                                   formulation, precision)
  return y, mask, stats
