"""Block-sparse execution of tile-gated convolutions: skip the closed tiles.

The masked form `Y = Y_base + d * Y_cond` computes `Y_cond` everywhere and
multiplies the closed part by zero, so it saves no time. When one gate
decision covers a whole tile of `bh x bw` output positions and all output
channels (`gating.block = (bh, bw, 0)`), the conditional path can be
computed for the open tiles only, as SBNet did for detection:

  1. reduce the mask to the list of open tiles (per layer and batch);
  2. gather each open tile's input window, with the halo the kernel needs
     (stride handled), into a dense batch of windows;
  3. convolve that batch of windows (VALID; a convolution, or one matrix
     product over their patches for wide layers, see `tile_convolution`);
  4. add the results to the base path's output at their tiles.

Shapes are static under `jit`: the list of open tiles is padded to one of a
few capacities (`DEFAULT_CAPACITIES`: sixteenths up to 1/2, eighths to 7/8); a
`lax.switch` inside the compiled function picks the smallest capacity that
holds this batch's open tiles, and falls back to the masked dense form when
more than the largest capacity are open. Every branch gives the masked
output `Y_base + d * Y_cond` (exactly the same taps; float summation order
may differ).
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

from cdg_jax import gating

Array = jax.Array

# Static capacities as fractions of all tiles: sixteenths up to a half (where
# trained CDG layers sit; a batch just past 1/4 open then computes 5/16 of
# the tiles, not 3/8), eighths above; 11 compiled branches per layer.
DEFAULT_CAPACITIES = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375,
                      0.5, 0.625, 0.75, 0.875)

TILE_CONVOLUTIONS = ('auto', 'conv', 'patches')
# 'auto' computes the open tiles as one matrix product over extracted patches
# when the conditional path has at least this many input channels, else as
# a convolution of the windows. On XLA:CPU (2-core Xeon, ResNet-18 width 64,
# batch 256; experiments/results/sparse/sparse_speed.md) the product was
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
  # comparison, not part of experiments/benchmark_sparse.py).
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

  Written with gathers, pads and slices only: a scatter-add of the windows
  into the map is what autodiff of `gather_windows` gives, and XLA:CPU runs
  it element by element. Instead every tile of the grid reads its window
  (closed tiles: a zero window), each window is cut into the parts that
  fall on the previous, its own and the next input tile along each axis,
  and the parts are summed tile by tile.

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
  if not _windows_reach_neighbours_only(input_hw, tile_hw, kernel_hw, strides):
    raise ValueError(
        f'The input windows of {tuple(tile_hw)} output tiles of a '
        f'{tuple(kernel_hw)} kernel with strides {tuple(strides)} reach past '
        f'the neighbouring input tiles of an {tuple(input_hw)} map.')
  n, gh, gw = tile_mask.shape
  c = window_values.shape[-1]
  dense = _tiles_on_grid(window_values, tile_mask)
  # dense: (N, gh, gw, Lh, Lw, C). Along each axis a window starts `before`
  # positions ahead of its input tile of `size` = tile * stride positions.
  for axis, (grid, size, length, before) in enumerate(zip(
      (gh, gw), (tile_hw[0] * strides[0], tile_hw[1] * strides[1]),
      window_values.shape[1:3],
      (same_padding(input_hw[0], kernel_hw[0], strides[0])[0],
       same_padding(input_hw[1], kernel_hw[1], strides[1])[0]))):
    window_axis, grid_axis = 3 + axis, 1 + axis
    # Cover [-size, 2 * size) around the tile: previous, own, next tile.
    pad = [(0, 0)] * dense.ndim
    pad[window_axis] = (size - before, 2 * size - (length - before))
    padded = jnp.pad(dense, pad)
    parts = padded.reshape(padded.shape[:window_axis] + (3, size)
                           + padded.shape[window_axis + 1:])
    previous, own, following = (
        jax.lax.index_in_dim(parts, i, axis=window_axis, keepdims=False)
        for i in range(3))
    # Tile i gets its own part, the previous-part of tile i + 1 and the
    # next-part of tile i - 1 (zero beyond the map's edges).
    shift_up = [(0, 0)] * own.ndim
    shift_up[grid_axis] = (0, 1)
    shift_down = [(0, 0)] * own.ndim
    shift_down[grid_axis] = (1, 0)
    dense = (own
             + jax.lax.slice_in_dim(jnp.pad(previous, shift_up), 1, grid + 1,
                                    axis=grid_axis)
             + jax.lax.slice_in_dim(jnp.pad(following, shift_down), 0, grid,
                                    axis=grid_axis))
  size_h, size_w = dense.shape[3:5]
  full = dense.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * size_h,
                                                   gw * size_w, c)
  return full[:, :input_hw[0], :input_hw[1]]


def tile_convolution(windows: Array, kernel: Array, strides: Sequence[int],
                     method: str = 'auto') -> Array:
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
  """
  if method not in TILE_CONVOLUTIONS:
    raise ValueError(f'Unknown tile convolution {method!r}; expected one of '
                     f'{TILE_CONVOLUTIONS}.')
  kh, kw, c_in, c_out = kernel.shape
  if method == 'auto':
    method = 'patches' if c_in >= PATCHES_MIN_CHANNELS else 'conv'
  if method == 'conv':
    return gating.conv(windows, kernel, strides, 'VALID')
  sh, sw = strides
  k = windows.shape[0]
  bh = (windows.shape[1] - kh) // sh + 1
  bw = (windows.shape[2] - kw) // sw + 1
  # Tap-major patches, matching the kernel's (kh, kw, C_in) row order.
  patches = jnp.concatenate(
      [windows[:, dy:dy + (bh - 1) * sh + 1:sh, dx:dx + (bw - 1) * sw + 1:sw]
       for dy in range(kh) for dx in range(kw)], axis=-1)
  out = jnp.dot(patches.reshape(k * bh * bw, kh * kw * c_in),
                kernel.reshape(kh * kw * c_in, c_out))
  return out.reshape(k, bh, bw, c_out)


def _check_operands(out_shape: Sequence[int], x: Array, kernel_cond: Array,
                    tile_mask: Array, cond_channels_from: int) -> None:
  n, out_h, out_w = out_shape[:3]
  gh, gw = tile_mask.shape[1:]
  if out_h % gh or out_w % gw or tile_mask.shape[0] != n:
    raise ValueError(f'Tile mask of shape {tile_mask.shape} does not fit an '
                     f'output of shape {tuple(out_shape)}.')
  if x.shape[-1] - cond_channels_from != kernel_cond.shape[2]:
    raise ValueError(
        f'The conditional input has {x.shape[-1]} - '
        f'{cond_channels_from} channels; the kernel expects '
        f'{kernel_cond.shape[2]} (kernel shape {kernel_cond.shape}).')


def _tiles_branch(tile_mask: Array, capacity: int, strides: Sequence[int],
                  tile_conv: str, cond_channels_from: int):
  """`branch(x_all, kernel_cond)`: the conditional output at the tiles of
  `tile_mask` (at most `capacity` of them), zero elsewhere."""
  n, gh, gw = tile_mask.shape
  flat = tile_mask.reshape(-1)

  def run(x_all, kernel_cond):
    out_h = -(-x_all.shape[1] // strides[0])
    out_w = -(-x_all.shape[2] // strides[1])
    tile_ids = jnp.nonzero(flat, size=capacity, fill_value=0)[0]
    windows = gather_windows(x_all[..., cond_channels_from:], tile_ids,
                             (gh, gw), (out_h // gh, out_w // gw),
                             kernel_cond.shape[:2], strides)
    cond = tile_convolution(windows, kernel_cond, strides, tile_conv)
    # Slots past the open tiles (tile 0 again) are never read back.
    return assemble_tiles(cond, tile_mask)
  return run


def _conditional_branches(tile_mask: Array, strides: Sequence[int],
                          capacity_fractions: Sequence[float], tile_conv: str,
                          cond_channels_from: int):
  """(branches, index): the executor's `lax.switch` operands.

  Each branch maps (x_all, kernel_cond) to the conditional output at the
  open tiles, zero at the closed ones: one branch per static capacity and
  the masked dense convolution last; `index` picks the smallest that holds
  this batch's open tiles.
  """
  n, gh, gw = tile_mask.shape
  flat = tile_mask.reshape(-1)
  num_tiles = flat.shape[0]
  caps = capacities(num_tiles, capacity_fractions)

  def dense_branch(x_all, kernel_cond):
    cond = gating.conv(x_all[..., cond_channels_from:], kernel_cond, strides)
    bh, bw = cond.shape[1] // gh, cond.shape[2] // gw
    return tile_map(tile_mask, (bh, bw))[..., None].astype(cond.dtype) * cond

  branches = [_tiles_branch(tile_mask, c, strides, tile_conv,
                            cond_channels_from) for c in caps] + [dense_branch]
  num_open = jnp.sum(flat.astype(jnp.int32))
  index = jnp.searchsorted(jnp.asarray(caps + [num_tiles]), num_open)
  return branches, index


def sparse_add_conditional(y_base: Array, x: Array, kernel_cond: Array,
                           tile_mask: Array, strides: Sequence[int] = (1, 1),
                           capacity_fractions: Sequence[float] =
                           DEFAULT_CAPACITIES,
                           tile_conv: str = 'auto',
                           cond_channels_from: int = 0) -> Array:
  """`y_base + d * conv(x[..., cond_channels_from:], kernel_cond)`, open tiles only.

  Args:
    y_base: (N, Ho, Wo, Co) base-path output (SAME convolution).
    x: (N, H, W, C) input whose channels from `cond_channels_from` on,
      (N, H, W, Ci), are the conditional input.
    kernel_cond: (kh, kw, Ci, Co) conditional kernel.
    tile_mask: (N, gh, gw) booleans, True where the tile's gate is open;
      gh = Ho / bh, gw = Wo / bw.
    strides: convolution strides.
    capacity_fractions: static capacities, as fractions of all tiles; above
      the largest, the masked dense convolution is used.
    tile_conv: how the open tiles are convolved (see `tile_convolution`).
    cond_channels_from: first channel of `x` that the conditional path
      reads. Pass the whole input and this offset rather than a slice of it:
      the slice is then taken inside the compiled branches, where XLA can
      fuse it into the gather, instead of being copied whole before the
      `lax.switch` (with the base path added after the switch: 3-10% faster
      per layer on the 2-core Xeon, ResNet-18 width 64 at 32x32; a one-off
      comparison, not part of experiments/benchmark_sparse.py).

  Returns:
    (N, Ho, Wo, Co) in y_base's dtype.
  """
  _check_operands(y_base.shape, x, kernel_cond, tile_mask, cond_channels_from)
  # Each branch gives the conditional path's contribution, and the base path
  # is added after the switch: operands and results of a `lax.switch` are
  # whole buffers on XLA:CPU, so the branches take and give as little as
  # they can.
  branches, index = _conditional_branches(tile_mask, strides,
                                          capacity_fractions, tile_conv,
                                          cond_channels_from)
  return y_base + jax.lax.switch(index, branches, x,
                                 kernel_cond).astype(y_base.dtype)


def _windows_reach_neighbours_only(input_hw: Sequence[int],
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


def _tiles_gradients(tile_mask: Array, capacity: int, strides: Sequence[int],
                     cond_channels_from: int, sparse_input: bool):
  """`gradients(x_all, kernel_cond, cotangent) -> (dx_cond, dkernel)` of the
  conditional output at the tiles of `tile_mask` (at most `capacity`).

  Both from the open tiles only: their gathered cotangent tiles times the
  transposed kernel give their windows' gradient, added back into the input
  map with overlapping halos (`overlap_add_windows`); the windows' patches
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
    windows = gather_windows(x_cond, tile_ids, (gh, gw), (bh, bw),
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
        lambda w, k: tile_convolution(w, k, strides, 'patches'),
        windows, kernel_cond)
    dwindows, dkernel = tiles_vjp(cotangent_tiles.astype(windows.dtype))
    if not sparse_input:
      return None, dkernel
    dx_cond = overlap_add_windows(dwindows, tile_mask, x_cond.shape[1:3],
                                  (bh, bw), kernel_cond.shape[:2], strides)
    return dx_cond, dkernel
  return gradients


def _dense_input_gradient(x_cond: Array, kernel_cond: Array,
                          cotangent: Array, strides: Sequence[int]) -> Array:
  return jax.vjp(lambda x: gating.conv(x, kernel_cond, strides),
                 x_cond)[1](cotangent.astype(x_cond.dtype))[0]


def conditional_at_open_tiles(x: Array, kernel_cond: Array, tile_mask: Array,
                              strides: Sequence[int] = (1, 1),
                              capacity_fractions: Sequence[float] =
                              DEFAULT_CAPACITIES,
                              tile_conv: str = 'auto',
                              cond_channels_from: int = 0,
                              sparse_input_gradient: bool = True) -> Array:
  """The conditional output at the open tiles, zero at the closed ones,
  differentiable in `x` and `kernel_cond` (training).

  The forward pass is the executor's (`sparse_add_conditional` without the
  base path). The backward pass is a custom VJP (differentiating the
  `lax.switch` would keep every branch's residuals, zero-filled, and
  transpose the gathers into scatter-adds) under the forward's switch
  index: the kernel's and the input's gradients from the open tiles only
  (`_tiles_gradients`); above the largest capacity, the dense convolution's.
  Gradients reach `x` and `kernel_cond` from the open tiles only, as in the
  masked form `d * Y_cond` with d = 0 at the closed ones.

  Args: as `sparse_add_conditional`, without `y_base`, and
    sparse_input_gradient: False takes the input's gradient as one dense
      transposed convolution of the cotangent (zero at closed tiles) outside
      the switch: the same values, for comparison. Also used when a
      window reaches past the neighbouring tiles (kernels much larger than
      the tile).

  Returns:
    (N, Ho, Wo, Co) in the dtype of `x` and `kernel_cond`.
  """
  n, gh, gw = tile_mask.shape
  out_shape = (n, -(-x.shape[1] // strides[0]), -(-x.shape[2] // strides[1]))
  _check_operands(out_shape, x, kernel_cond, tile_mask, cond_channels_from)
  branches, index = _conditional_branches(tile_mask, strides,
                                          capacity_fractions, tile_conv,
                                          cond_channels_from)
  caps = capacities(tile_mask.size, capacity_fractions)
  tile_hw = (out_shape[1] // gh, out_shape[2] // gw)
  sparse_input = sparse_input_gradient and _windows_reach_neighbours_only(
      x.shape[1:3], tile_hw, kernel_cond.shape[:2], strides)

  def open_only(cotangent):
    # The output is zero at closed tiles whatever the operands: no gradient
    # from there (a caller's cotangent need not be zero there).
    return jnp.where(tile_map(tile_mask, tile_hw)[..., None], cotangent, 0)

  def dense_gradients(x_all, kernel_cond, cotangent):
    x_cond = x_all[..., cond_channels_from:]
    cotangent = open_only(cotangent)
    if not sparse_input:
      return None, jax.vjp(lambda k: gating.conv(x_cond, k, strides),
                           kernel_cond)[1](cotangent)[0]
    return jax.vjp(lambda x, k: gating.conv(x, k, strides),
                   x_cond, kernel_cond)[1](cotangent)

  gradients = [_tiles_gradients(tile_mask, c, strides, cond_channels_from,
                                sparse_input)
               for c in caps] + [dense_gradients]

  @jax.custom_vjp
  def conditional(x_all, kernel):
    return jax.lax.switch(index, branches, x_all, kernel)

  def forward(x_all, kernel):
    return conditional(x_all, kernel), (x_all, kernel)

  def backward(residuals, cotangent):
    x_all, kernel = residuals
    dx_cond, dkernel = jax.lax.switch(index, gradients, x_all, kernel,
                                      cotangent)
    if dx_cond is None:
      # One transposed convolution over the whole map, the same for every
      # capacity, taken outside the switch (a convolution inside an XLA:CPU
      # conditional ran several times slower than the same one outside,
      # when measured).
      dx_cond = _dense_input_gradient(x_all[..., cond_channels_from:],
                                      kernel, open_only(cotangent), strides)
    dx_all = jnp.pad(dx_cond.astype(x_all.dtype),
                     ((0, 0),) * 3 + ((cond_channels_from, 0),))
    return dx_all, dkernel

  conditional.defvjp(forward, backward)
  return conditional(x, kernel_cond)


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


def tile_gate(y_base: Array, threshold: Array, tile: Sequence[int], *,
              alpha: float = 2.0, epsilon: float = 1e-5, norm: str = 'batch',
              num_groups: int = 1, saliency_grad: bool = False,
              surrogate: str = 'sigmoid', running_mean: Array | None = None,
              running_var: Array | None = None
              ) -> tuple[Array, Array, tuple[Array, Array]]:
  """`gating.saliency_gate` for gates of whole tiles, decided on the
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
    surrogate, running_mean, running_var: as `gating.saliency_gate`.
    tile: (bh, bw), clamped to the map (`effective_tile`).

  Returns:
    (mask, tile_mask, (mean, var)): the float32 0/1 mask of `y_base`'s
    shape (each tile's gate broadcast over it), the (N, gh, gw) booleans of
    the open tiles, and the float32 statistics used.
  """
  n, h, w, c = y_base.shape
  bh, bw = effective_tile((h, w), tile)
  mean, var = gating.saliency_statistics(
      y_base, norm=norm, num_groups=num_groups, saliency_grad=saliency_grad,
      running_mean=running_mean, running_var=running_var)
  # In float32 whatever the convolutions' dtype, as `gating.saliency_gate`.
  pooled = jnp.mean(y_base.astype(jnp.float32).reshape(
      n, h // bh, bh, w // bw, bw, c), axis=(2, 4))
  saliency = gating.normalize_saliency(pooled, mean, var, epsilon)
  gate = gating.hard_gate(
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


def sparse_gated_conv(x: Array, kernel: Array, threshold: Array, *,
                      groups: int = 4, grouping: str = 'first',
                      strides: Sequence[int] = (1, 1),
                      block: Sequence[int] = (4, 4, 0), epsilon: float = 1e-5,
                      norm: str = 'batch', running_mean: Array | None = None,
                      running_var: Array | None = None,
                      capacity_fractions: Sequence[float] = DEFAULT_CAPACITIES
                      ) -> tuple[Array, Array, tuple[Array, Array]]:
  """`gating.gated_conv` at inference, with the closed tiles skipped.

  Same arguments and results as `gating.gated_conv` (SAME padding, forward
  only: the mask is the hard gate); `block` must be tile-structured
  (bc = 0 or C_out).
  """
  check_tile_block(block, kernel.shape[-1])
  y_base = gating.base_conv(x, kernel, groups, grouping, strides)
  mask, tile_mask, stats = tile_gate(
      y_base, threshold, block[:2], epsilon=epsilon, norm=norm,
      running_mean=running_mean, running_var=running_var)
  _, k_cond = gating.conditional_operands(x, kernel, groups, grouping)
  # 'first': the conditional input is x's last (G-1)/G channels, sliced
  # inside the executor's branches; 'diagonal': all of x.
  offset = (gating.base_channels(x.shape[-1], groups)
            if grouping == 'first' else 0)
  y = sparse_add_conditional(y_base, x, k_cond, tile_mask, strides,
                             capacity_fractions, cond_channels_from=offset)
  return y, mask, stats


# How a sparse train step gives the gate a task-loss gradient at closed tiles
# (`GatingSpec.closed_tile_gradient`).
CLOSED_TILE_GRADIENTS = ('none', 'sampled')


def sparse_train_gated_conv(
    x: Array, kernel: Array, threshold: Array, *, groups: int = 4,
    grouping: str = 'first', strides: Sequence[int] = (1, 1),
    block: Sequence[int] = (4, 4, 0), alpha: float = 2.0,
    epsilon: float = 1e-5, norm: str = 'batch', num_groups: int = 1,
    saliency_grad: bool = False, surrogate: str = 'sigmoid',
    closed_tile_gradient: str = 'none', sample_fraction: float = 0.0625,
    rng: Array | None = None,
    capacity_fractions: Sequence[float] = DEFAULT_CAPACITIES
) -> tuple[Array, Array, tuple[Array, Array]]:
  """`gating.gated_conv` for training, the closed tiles' conditional path skipped.

  The same output, mask and statistics as `gating.gated_conv` with batch
  statistics (SAME padding; `block` tile-structured, bc = 0 or C_out), and
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
    all tiles), and their gate gradient is scaled by the inverse inclusion
    probability: an unbiased estimate of the masked form's gate gradient.
    It adds `(d - stop_gradient(d)) * stop_gradient(Y_cond) * scale`, which
    is zero in the forward pass and reaches nothing but the gate.

  Args:
    x, kernel, threshold, groups, grouping, strides, block, alpha, epsilon,
    norm, num_groups, saliency_grad, surrogate: as `gating.gated_conv`.
    closed_tile_gradient: 'none' or 'sampled'.
    sample_fraction: 'sampled': the sample's static capacity, as a fraction
      of all tiles of the batch.
    rng: 'sampled': the key of the sample.
    capacity_fractions: the executor's static capacities.

  Returns:
    (y, mask, (mean, var)) as `gating.gated_conv`.
  """
  if closed_tile_gradient not in CLOSED_TILE_GRADIENTS:
    raise ValueError(f'Unknown gating.closed_tile_gradient='
                     f'{closed_tile_gradient!r}; expected one of '
                     f'{CLOSED_TILE_GRADIENTS}.')
  check_tile_block(block, kernel.shape[-1])
  y_base = gating.base_conv(x, kernel, groups, grouping, strides)
  mask, tile_mask, stats = tile_gate(
      y_base, threshold, block[:2], alpha=alpha, epsilon=epsilon, norm=norm,
      num_groups=num_groups, saliency_grad=saliency_grad, surrogate=surrogate)
  _, kernel_cond = gating.conditional_operands(x, kernel, groups, grouping)
  offset = (gating.base_channels(x.shape[-1], groups)
            if grouping == 'first' else 0)
  cond = conditional_at_open_tiles(x, kernel_cond, tile_mask, strides,
                                   capacity_fractions,
                                   cond_channels_from=offset)
  y = y_base + mask.astype(cond.dtype) * cond
  if closed_tile_gradient == 'sampled':
    if rng is None:
      raise ValueError("closed_tile_gradient='sampled' needs an rng.")
    capacity = max(1, math.ceil(sample_fraction * tile_mask.size))
    sampled, scale = sample_closed_tiles(rng, tile_mask, capacity)
    probe = jax.lax.stop_gradient(_tiles_branch(
        sampled, capacity, strides, 'auto', offset)(x, kernel_cond))
    # Zero in the forward pass; its only gradient is the gate's.
    gate_only = mask - jax.lax.stop_gradient(mask)
    y = y + (gate_only * scale).astype(probe.dtype) * probe
  return y, mask, stats
