"""Tiles of a tile-gated convolution: geometry, gathers and the tile gate.

The pieces both sparse executors share (`cdg_jax.gating.sparse` at
inference, `cdg_jax.gating.sparse_training` in training): a gate decision
covering a tile of `bh x bw` output positions and every output channel
(`block = (bh, bw, 0)`) is taken per tile (`tile_gate`); the open tiles'
input windows, with the halo the kernel needs, are gathered into a dense
batch (`gather_windows`), convolved (`tile_convolution`), and put back on the
output grid (`assemble_tiles`), or, for the input gradient, added back with
their halos overlapping (`overlap_add_windows`). The static capacities
(`DEFAULT_CAPACITIES`) keep every shape fixed under `jit`. Under a
data-parallel mesh both executors run on each device's shard of the batch
(`per_batch_shard`), so that their gathers never cross devices.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

from cdg_jax.gating import ops

Array = jax.Array
P = jax.sharding.PartitionSpec

# The mesh axis a data-parallel step shards the batch over (the program's
# `cdg_jax.run.parallel.DATA_AXIS`, big_vision's name): the executors run
# per shard along it when traced under a mesh that has it.
BATCH_AXIS = 'data'

# Static capacities as fractions of all tiles: sixteenths up to a half (where
# trained CDG layers sit; a batch just past 1/4 open then computes 5/16 of
# the tiles, not 3/8), eighths above; 11 compiled branches per layer.
DEFAULT_CAPACITIES = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375,
                      0.5, 0.625, 0.75, 0.875)

TILE_CONVOLUTIONS = ('auto', 'conv', 'patches')
# 'auto' computes the open tiles as one matrix product over extracted patches
# when the conditional path has at least this many input channels, else as
# a convolution of the windows. On XLA:CPU (2-core Xeon, ResNet-18 width 64,
# batch 256; experiments/results/sparse_speed/2026-12-02-xeon.md) the product was
# 1.4-2x faster on the 8x8 and 4x4 maps (192 and 384 input channels) from a
# quarter of the tiles open, within 10% on the 32x32 map (48) and, on the
# 16x16 map (96), 1.1-1.2x faster above a quarter open but 1.4x slower at a
# tenth: the threshold keeps the convolution below 128.
PATCHES_MIN_CHANNELS = 128


def effective_tile(out_hw: Sequence[int], tile: Sequence[int]
                   ) -> tuple[int, int]:
  """The tile actually used on an (H, W) map: clamped to the map's size.

  A map smaller than the tile (the last stages of a CIFAR ResNet) is one
  tile. Otherwise the tile must divide the map.

  Raises:
    ValueError naming the tile and the map size if it does not divide it.
  """
  h, w = (int(s) for s in out_hw)
  bh, bw = min(int(tile[0]), h), min(int(tile[1]), w)
  if bh < 1 or bw < 1 or h % bh or w % bw:
    raise ValueError(f'Tile {tuple(tile[:2])} (clamped to {(bh, bw)}) does not '
                     f'tile a gated output of spatial size (H, W)=({h}, {w}).')
  return bh, bw


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's 'SAME' padding (before, after) of one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def tile_mask_of(mask: Array, tile: Sequence[int]) -> Array:
  """(N, H/bh, W/bw) booleans from an (N, H, W, C) tile-constant mask."""
  bh, bw = effective_tile(mask.shape[1:3], tile)
  return mask[:, ::bh, ::bw, 0] > 0


def tile_map(tile_mask: Array, tile_hw: Sequence[int]) -> Array:
  """(N, gh * bh, gw * bw) booleans: each tile's entry over its positions."""
  return jnp.repeat(jnp.repeat(tile_mask, tile_hw[0], axis=1), tile_hw[1],
                    axis=2)


def capacities(num_tiles: int,
               fractions: Sequence[float] = DEFAULT_CAPACITIES) -> list[int]:
  """Distinct static capacities (open tiles) below `num_tiles`, ascending."""
  return sorted({min(num_tiles, max(1, math.ceil(f * num_tiles)))
                 for f in fractions} - {num_tiles})


def per_batch_shard(fn, batched: Sequence[bool],
                    batch_axis: str | None = BATCH_AXIS):
  """`fn` run on each device's shard of the batch, or `fn` itself.

  Under a mesh with `batch_axis` of more than one device (the abstract mesh
  of the trace: `jax.set_mesh`, `jax.sharding.use_abstract_mesh`; the
  program traces its steps under theirs), `fn` becomes a `jax.shard_map`
  over that axis: the operands marked `batched` are split along their first
  axis, the others replicated, and the results are batched. An executor's
  open-tile lists, gathers and capacity decisions are then per device: on
  the whole sharded batch XLA turns every tile gather and window add-back
  into collectives (291 all-gathers and 327 all-reduces in the 2-device
  SimCLR step of a ResNet-10 width 8 with 4x4 tiles, against the dense
  step's 3 and 23), and
  each device's capacity is taken for its own open tiles. Elsewhere (no
  mesh, no such axis, one device on it, or the axis already manual) `fn` is
  returned unchanged.

  Replicated floating operands are made device-varying before `fn`
  (`jax.lax.pcast`): a custom VJP inside `fn` then gives per-device
  cotangents for them, which the shard_map's transpose sums over the axis
  (a kernel's gradient from each device's tiles).

  Args:
    fn: the function; every result must be batched.
    batched: per positional operand, whether it is split over the batch.
    batch_axis: the mesh axis name (None: never split).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if (batch_axis is None or mesh.empty or batch_axis not in mesh.axis_names
      or batch_axis in mesh.manual_axes or mesh.shape[batch_axis] == 1):
    return fn

  def on_shard(*operands):
    return fn(*(
        operand if split or not jnp.issubdtype(operand.dtype, jnp.floating)
        else jax.lax.pcast(operand, batch_axis, to='varying')
        for operand, split in zip(operands, batched)))
  return jax.shard_map(
      on_shard, in_specs=tuple(P(batch_axis) if split else P()
                               for split in batched),
      out_specs=P(batch_axis), axis_names={batch_axis})


def shard_key(rng: Array, batch_axis: str | None = BATCH_AXIS) -> Array:
  """`rng` folded with the device's index inside `per_batch_shard`'s
  shard_map (a key of its own per shard), unchanged outside it."""
  mesh = jax.sharding.get_abstract_mesh()
  if batch_axis is not None and batch_axis in mesh.manual_axes:
    return jax.random.fold_in(rng, jax.lax.axis_index(batch_axis))
  return rng


def gather_windows(x: Array, tile_ids: Array, grid: tuple[int, int],
                   tile_hw: tuple[int, int], kernel_hw: tuple[int, int],
                   strides: Sequence[int]) -> Array:
  """Input windows (with halo) of the output tiles `tile_ids`.

  Args:
    x: (N, H, W, C) input of the convolution (unpadded).
    tile_ids: (K,) flat ids n * gh * gw + i * gw + j of output tiles.
    grid: (gh, gw) output tiles per column and row.
    tile_hw: (bh, bw) output tile size.
    kernel_hw: (kh, kw).
    strides: (sh, sw).

  Returns:
    (K, (bh - 1) * sh + kh, (bw - 1) * sw + kw, C) windows of the SAME-padded
    input: a VALID convolution of window k gives output tile k exactly.
  """
  (gh, gw), (bh, bw), (kh, kw) = grid, tile_hw, kernel_hw
  sh, sw = strides
  n, h, w, c = x.shape
  out_h, out_w = gh * bh, gw * bw
  ph = same_padding(h, kh, sh)
  pw = same_padding(w, kw, sw)
  if -(-h // sh) != out_h or -(-w // sw) != out_w:
    raise ValueError(f'A {gh}x{gw} grid of {bh}x{bw} tiles does not match the '
                     f'output of a stride-{tuple(strides)} convolution of a '
                     f'{h}x{w} input.')
  padded = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  win_h, win_w = (bh - 1) * sh + kh, (bw - 1) * sw + kw
  sample, rest = jnp.divmod(tile_ids, gh * gw)
  row, col = jnp.divmod(rest, gw)

  def window(s, i, j):
    return jax.lax.dynamic_slice(padded, (s, i * bh * sh, j * bw * sw, 0),
                                 (1, win_h, win_w, c))[0]
  return jax.vmap(window)(sample, row, col)


def _tiles_on_grid(tiles: Array, tile_mask: Array) -> Array:
  """(N, gh, gw, ...) holding row k of `tiles` at the k-th open tile, zero at
  the closed ones (`tiles` in the order of `jnp.nonzero(tile_mask)`)."""
  n, gh, gw = tile_mask.shape
  capacity = tiles.shape[0]
  flat = tile_mask.reshape(-1)
  # Every tile of the grid reads its row of `tiles` (closed tiles: an
  # appended zero tile) instead of the open tiles being scattered into the
  # grid: XLA:CPU runs this gather of contiguous tiles as a copy, 1.3-1.5x
  # faster than the scatter-add it replaces (18 against 27 ms for 26% of the
  # 8x8 tiles of a 256 x 32 x 32 x 64 map, 2-core Xeon; a one-off
  # comparison, not part of experiments/benchmarks/benchmark_sparse.py).
  slot = jnp.where(flat, jnp.cumsum(flat.astype(jnp.int32)) - 1, capacity)
  padded = jnp.concatenate([tiles, jnp.zeros((1,) + tiles.shape[1:],
                                             tiles.dtype)])
  return padded[slot].reshape((n, gh, gw) + tiles.shape[1:])


def assemble_tiles(tiles: Array, tile_mask: Array) -> Array:
  """The (N, H, W, C) map holding `tiles` at the open tiles, zero elsewhere.

  Args:
    tiles: (K, bh, bw, C) values of the open tiles, in the order of
      `jnp.nonzero(tile_mask.reshape(-1))` (rows past the open tiles unused).
    tile_mask: (N, gh, gw) booleans; at most K are True.

  Returns:
    (N, gh * bh, gw * bw, C) in `tiles`' dtype.
  """
  n, gh, gw = tile_mask.shape
  _, bh, bw, c = tiles.shape
  blocks = _tiles_on_grid(tiles, tile_mask)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * bh, gw * bw, c)


def _add_into(target: Array, values: Array, grid_axis: int, grid_start: int,
              window_axis: int, window_start: int) -> Array:
  """`target` with `values` added into its block that starts at
  `grid_start` along `grid_axis` and `window_start` along `window_axis` (a
  slice, an add and an in-place update of that block only)."""
  start = [0] * target.ndim
  start[grid_axis], start[window_axis] = grid_start, window_start
  block = jax.lax.dynamic_slice(target, start, values.shape)
  return jax.lax.dynamic_update_slice(target, block + values, start)


def overlap_add_windows(window_values: Array, tile_mask: Array,
                        input_hw: Sequence[int], tile_hw: Sequence[int],
                        kernel_hw: Sequence[int],
                        strides: Sequence[int]) -> Array:
  """The (N, H, W, C) sum of per-tile input windows, each at its place.

  The transpose of `gather_windows` at the open tiles: window k, a value per
  position of the SAME-padded input window of the k-th open output tile
  (e.g. the gradient of that tile's convolution with respect to its window),
  is added to the input positions it covers; windows overlap by their halo,
  and positions in the padding are dropped.

  Written with gathers, slices and in-place slice updates only: a
  scatter-add of the windows into the map is what autodiff of
  `gather_windows` gives, and XLA:CPU runs it element by element. Instead
  every tile of the grid reads its window (closed tiles: a zero window);
  along each axis a window's middle is its own input tile, and its halo
  rows (or columns) before and after it are added into the neighbouring
  tiles' edges (an update of those edges only: the halo's share of the map,
  not the whole map).

  Args:
    window_values: (K, (bh - 1) * sh + kh, (bw - 1) * sw + kw, C) in the
      order of `jnp.nonzero(tile_mask.reshape(-1))` (rows past the open
      tiles unused).
    tile_mask: (N, gh, gw) booleans; at most K are True.
    input_hw: (H, W) of the unpadded input.
    tile_hw, kernel_hw, strides: (bh, bw), (kh, kw), (sh, sw).

  Returns:
    (N, H, W, C) in `window_values`' dtype.
  """
  if not windows_reach_neighbours_only(input_hw, tile_hw, kernel_hw, strides):
    raise ValueError(
        f'The input windows of {tuple(tile_hw)} output tiles of a '
        f'{tuple(kernel_hw)} kernel with strides {tuple(strides)} reach past '
        f'the neighbouring input tiles of an {tuple(input_hw)} map.')
  n, gh, gw = tile_mask.shape
  c = window_values.shape[-1]
  dense = _tiles_on_grid(window_values, tile_mask)
  # dense: (N, gh, gw, Lh, Lw, C). Along each axis a window starts `before`
  # positions ahead of its input tile of `size` = tile * stride positions.
  for axis, (size, length, before) in enumerate(zip(
      (tile_hw[0] * strides[0], tile_hw[1] * strides[1]),
      window_values.shape[1:3],
      (same_padding(input_hw[0], kernel_hw[0], strides[0])[0],
       same_padding(input_hw[1], kernel_hw[1], strides[1])[0]))):
    window_axis, grid_axis = 3 + axis, 1 + axis
    after = length - before - size
    own = jax.lax.slice_in_dim(dense, before, before + size, axis=window_axis)
    if before:
      # The rows before a window's own tile are the last `before` rows of
      # the previous tile: tile i gets them from tile i + 1's window.
      head = jax.lax.slice_in_dim(dense, 0, before, axis=window_axis)
      own = _add_into(own, jax.lax.slice_in_dim(head, 1, None, axis=grid_axis),
                      grid_axis, 0, window_axis, size - before)
    if after > 0:
      # The rows after it are the first `after` rows of the next tile.
      tail = jax.lax.slice_in_dim(dense, before + size, length,
                                  axis=window_axis)
      own = _add_into(own, jax.lax.slice_in_dim(tail, 0, -1, axis=grid_axis),
                      grid_axis, 1, window_axis, 0)
    dense = own
  size_h, size_w = dense.shape[3:5]
  full = dense.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * size_h,
                                                   gw * size_w, c)
  return full[:, :input_hw[0], :input_hw[1]]


def windows_reach_neighbours_only(input_hw: Sequence[int],
                                  tile_hw: Sequence[int],
                                  kernel_hw: Sequence[int],
                                  strides: Sequence[int]) -> bool:
  """Whether each input window of an output tile lies within its input tile
  and the two next to it along each axis (what `overlap_add_windows` adds)."""
  for size, tile, kernel, stride in zip(input_hw, tile_hw, kernel_hw, strides):
    before = same_padding(size, kernel, stride)[0]
    length = (tile - 1) * stride + kernel
    if before > tile * stride or length - before > 2 * tile * stride:
      return False
  return True


def tile_convolution(windows: Array, kernel: Array, strides: Sequence[int],
                     method: str = 'auto', formulation: str | None = None,
                     precision=None) -> Array:
  """The VALID convolution of each window: (K, bh, bw, C_out) output tiles.

  Args:
    windows: (K, (bh - 1) * sh + kh, (bw - 1) * sw + kw, C_in), as
      `gather_windows` gives them.
    kernel: (kh, kw, C_in, C_out).
    strides: (sh, sw).
    method: 'conv' (one convolution of the windows), 'patches' (the windows'
      patches, (K * bh * bw, kh * kw * C_in), times the kernel as one matrix
      product) or 'auto' ('patches' from `PATCHES_MIN_CHANNELS` input
      channels on). The same taps either way.
    formulation: the 'conv' method's `ops.conv` formulation (None: XLA's).
    precision: of the convolution or the matrix product (`ops.conv`'s).
  """
  if method not in TILE_CONVOLUTIONS:
    raise ValueError(f'Unknown tile convolution {method!r}; expected one of '
                     f'{TILE_CONVOLUTIONS}.')
  kh, kw, c_in, c_out = kernel.shape
  if method == 'auto':
    method = 'patches' if c_in >= PATCHES_MIN_CHANNELS else 'conv'
  if method == 'conv':
    return ops.conv(windows, kernel, strides, 'VALID', formulation, precision)
  sh, sw = strides
  k = windows.shape[0]
  bh = (windows.shape[1] - kh) // sh + 1
  bw = (windows.shape[2] - kw) // sw + 1
  # Tap-major patches, matching the kernel's (kh, kw, C_in) row order.
  patches = jnp.concatenate(
      [windows[:, dy:dy + (bh - 1) * sh + 1:sh, dx:dx + (bw - 1) * sw + 1:sw]
       for dy in range(kh) for dx in range(kw)], axis=-1)
  out = jnp.dot(patches.reshape(k * bh * bw, kh * kw * c_in),
                kernel.reshape(kh * kw * c_in, c_out), precision=precision)
  return out.reshape(k, bh, bw, c_out)


def tile_gate(y_base: Array, threshold: Array, tile: Sequence[int], *,
              alpha: float = 2.0, epsilon: float = 1e-5, norm: str = 'batch',
              num_groups: int = 1, saliency_grad: bool = False,
              surrogate: str = 'sigmoid', running_mean: Array | None = None,
              running_var: Array | None = None
              ) -> tuple[Array, Array, tuple[Array, Array]]:
  """`ops.saliency_gate` for gates of whole tiles, decided on the
  tile-pooled base output.

  A tile's gate (bh x bw positions, all channels) compares the mean over the
  tile of `saliency - threshold`, which is linear in `Y_base`: the mean over
  channels c of `(pool(Y_base)_c - mean_c) / sqrt(var_c + eps) - delta_c`,
  with `pool` the mean over the tile's positions. Deciding on the (N, gh,
  gw, C) pooled map instead of normalising the whole (N, H, W, C) output
  and averaging it back is the same decision (up to float summation order)
  and the same straight-through gradient, for a fraction of the
  element-wise work.

  Args:
    y_base, threshold, alpha, epsilon, norm, num_groups, saliency_grad,
    surrogate, running_mean, running_var: as `ops.saliency_gate`.
    tile: (bh, bw), clamped to the map (`effective_tile`).

  Returns:
    (mask, tile_mask, (mean, var)): the float32 0/1 mask of `y_base`'s
    shape (each tile's gate broadcast over it), the (N, gh, gw) booleans of
    the open tiles, and the float32 statistics used.
  """
  n, h, w, c = y_base.shape
  bh, bw = effective_tile((h, w), tile)
  mean, var = ops.saliency_statistics(
      y_base, norm=norm, num_groups=num_groups, saliency_grad=saliency_grad,
      running_mean=running_mean, running_var=running_var)
  # In float32 whatever the convolutions' dtype, as `ops.saliency_gate`.
  pooled = jnp.mean(y_base.astype(jnp.float32).reshape(
      n, h // bh, bh, w // bw, bw, c), axis=(2, 4))
  saliency = ops.normalize_saliency(pooled, mean, var, epsilon)
  gate = ops.hard_gate(
      jnp.mean(saliency - threshold.astype(jnp.float32), axis=-1), alpha,
      surrogate)
  mask = jnp.broadcast_to(gate[:, :, None, :, None, None],
                          (n, h // bh, bh, w // bw, bw, c)).reshape(y_base.shape)
  return mask, gate > 0, (mean, var)


def check_tile_block(block: Sequence[int], out_channels: int) -> None:
  """Raises ValueError unless `block` covers all output channels (bc 0 or C)."""
  if int(block[2]) not in (0, out_channels):
    raise ValueError(
        f'Block-sparse execution skips whole tiles of positions across all '
        f'output channels: it needs gating.block=(bh, bw, 0), got '
        f'{tuple(block)} for a layer of {out_channels} output channels.')
