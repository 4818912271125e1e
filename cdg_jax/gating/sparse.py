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
may differ). Under a data-parallel mesh all of this runs on each device's
shard of the batch (`tiling.per_batch_shard`): each device lists, gathers
and counts its own open tiles, and nothing crosses devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cdg_jax.gating import ops
from cdg_jax.gating import tiling

Array = jax.Array


def check_operands(out_shape: Sequence[int], x: Array, kernel_cond: Array,
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


def tiles_branch(tile_mask: Array, capacity: int, strides: Sequence[int],
                 tile_conv: str, cond_channels_from: int,
                 formulation: str | None = None, precision=None):
  """`branch(x_all, kernel_cond)`: the conditional output at the tiles of
  `tile_mask` (at most `capacity` of them), zero elsewhere (`formulation`,
  `precision`: of the tiles' convolution, `tiling.tile_convolution`)."""
  n, gh, gw = tile_mask.shape
  flat = tile_mask.reshape(-1)

  def run(x_all, kernel_cond):
    out_h = -(-x_all.shape[1] // strides[0])
    out_w = -(-x_all.shape[2] // strides[1])
    tile_ids = jnp.nonzero(flat, size=capacity, fill_value=0)[0]
    windows = tiling.gather_windows(x_all[..., cond_channels_from:], tile_ids,
                                    (gh, gw), (out_h // gh, out_w // gw),
                                    kernel_cond.shape[:2], strides)
    cond = tiling.tile_convolution(windows, kernel_cond, strides, tile_conv,
                                   formulation, precision)
    # Slots past the open tiles (tile 0 again) are never read back.
    return tiling.assemble_tiles(cond, tile_mask)
  return run


def conditional_branches(tile_mask: Array, strides: Sequence[int],
                         capacity_fractions: Sequence[float], tile_conv: str,
                         cond_channels_from: int,
                         formulation: str | None = None, precision=None):
  """(branches, index): the executor's `lax.switch` operands.

  Each branch maps (x_all, kernel_cond) to the conditional output at the
  open tiles, zero at the closed ones: one branch per static capacity and
  the masked dense convolution last; `index` picks the smallest that holds
  this batch's open tiles. `formulation`, `precision`: of every
  convolution (`ops.conv`).
  """
  n, gh, gw = tile_mask.shape
  flat = tile_mask.reshape(-1)
  num_tiles = flat.shape[0]
  caps = tiling.capacities(num_tiles, capacity_fractions)

  def dense_branch(x_all, kernel_cond):
    cond = ops.conv(x_all[..., cond_channels_from:], kernel_cond, strides,
                    'SAME', formulation, precision)
    bh, bw = cond.shape[1] // gh, cond.shape[2] // gw
    return tiling.tile_map(tile_mask, (bh, bw))[..., None].astype(cond.dtype) * cond

  branches = [tiles_branch(tile_mask, c, strides, tile_conv,
                           cond_channels_from, formulation, precision)
              for c in caps] + [dense_branch]
  num_open = jnp.sum(flat.astype(jnp.int32))
  index = jnp.searchsorted(jnp.asarray(caps + [num_tiles]), num_open)
  return branches, index


def sparse_add_conditional(y_base: Array, x: Array, kernel_cond: Array,
                           tile_mask: Array, strides: Sequence[int] = (1, 1),
                           capacity_fractions: Sequence[float] =
                           tiling.DEFAULT_CAPACITIES,
                           tile_conv: str = 'auto',
                           cond_channels_from: int = 0,
                           formulation: str | None = None,
                           precision=None) -> Array:
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
    tile_conv: how the open tiles are convolved (see `tiling.tile_convolution`).
    cond_channels_from: first channel of `x` that the conditional path
      reads. Pass the whole input and this offset rather than a slice of it:
      the slice is then taken inside the compiled branches, where XLA can
      fuse it into the gather, instead of being copied whole before the
      `lax.switch` (with the base path added after the switch: 3-10% faster
      per layer on the 2-core Xeon, ResNet-18 width 64 at 32x32; a one-off
      comparison, not part of experiments/benchmarks/benchmark_sparse.py).
    formulation, precision: of every convolution (`ops.conv`; None: XLA's
      convolution, default precision).

  Returns:
    (N, Ho, Wo, Co) in y_base's dtype.
  """
  check_operands(y_base.shape, x, kernel_cond, tile_mask, cond_channels_from)

  def add_conditional(y_base, x, kernel_cond, tile_mask):
    # Each branch gives the conditional path's contribution, and the base
    # path is added after the switch: operands and results of a
    # `lax.switch` are whole buffers on XLA:CPU, so the branches take and
    # give as little as they can.
    branches, index = conditional_branches(tile_mask, strides,
                                           capacity_fractions, tile_conv,
                                           cond_channels_from, formulation,
                                           precision)
    return y_base + jax.lax.switch(index, branches, x,
                                   kernel_cond).astype(y_base.dtype)
  return tiling.per_batch_shard(add_conditional, (True, True, False, True))(
      y_base, x, kernel_cond, tile_mask)


def sparse_gated_conv(x: Array, kernel: Array, threshold: Array, *,
                      groups: int = 4, grouping: str = 'first',
                      strides: Sequence[int] = (1, 1),
                      block: Sequence[int] = (4, 4, 0), epsilon: float = 1e-5,
                      norm: str = 'batch', running_mean: Array | None = None,
                      running_var: Array | None = None,
                      capacity_fractions: Sequence[float] = tiling.DEFAULT_CAPACITIES,
                      formulation: str | None = None, precision=None
                      ) -> tuple[Array, Array, tuple[Array, Array]]:
  """`ops.gated_conv` at inference, with the closed tiles skipped.

  Same arguments and results as `ops.gated_conv` (forward only: the mask is
  the hard gate); `block` must be tile-structured (bc = 0 or C_out). SAME
  padding only: the open tiles' windows are cut from the SAME-padded input
  (`tiling.gather_windows`), so `cdg_jax.GatedConv` refuses sparse
  execution with any other padding.
  """
  tiling.check_tile_block(block, kernel.shape[-1])
  y_base = ops.base_conv(x, kernel, groups, grouping, strides, 'SAME',
                         formulation, precision)
  mask, tile_mask, stats = tiling.tile_gate(
      y_base, threshold, block[:2], epsilon=epsilon, norm=norm,
      running_mean=running_mean, running_var=running_var)
  _, k_cond = ops.conditional_operands(x, kernel, groups, grouping)
  # 'first': the conditional input is x's last (G-1)/G channels, sliced
  # inside the executor's branches; 'diagonal': all of x.
  offset = (ops.base_channels(x.shape[-1], groups)
            if grouping == 'first' else 0)
  y = sparse_add_conditional(y_base, x, k_cond, tile_mask, strides,
                             capacity_fractions, cond_channels_from=offset,
                             formulation=formulation, precision=precision)
  return y, mask, stats
