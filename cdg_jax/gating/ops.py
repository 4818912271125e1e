"""Pure-function ops of the Contrastive Dual Gating (CDG) convolution.

Every function here takes arrays (and plain Python configuration) and returns
arrays: no Flax, no hidden state. They are jittable, vmappable and
differentiable; the Flax layer in `cdg_jax.gating.layers` only holds the parameters
and statistics and calls them. Shapes use NHWC for activations and HWIO for
kernels, as `flax.linen.Conv` does. Every convolution is `conv`, in the
formulation and precision its caller passes (by default XLA's convolution,
what `flax.linen.Conv` computes); nothing here reads the environment
(`program_formulation` is the training program's choice, made when it
builds its network).

The gated convolution (docs/method.md [gated convolution]), for kernel `W` (k, k, C_in, C_out)
split into `G` input-channel groups:

    Y_base = conv(X[..., :C_in/G], W[:, :, :C_in/G])          # always computed
    S      = normalize(Y_base)                                  # per output channel
    d      = 1[block_mean(S - delta) > 0]                       # hard 0/1 gate, STE
    Y      = Y_base + d * conv(X[..., C_in/G:], W[:, :, C_in/G:])

Options where CDG's public lineage (channel gating / CGNet; docs/method.md
[what is whose]) reads differently, each kept next to our first reading:

  grouping   'first': every output's base path sees the first C_in/G input
             channels (above); 'diagonal': output-channel group i's base path
             sees input-channel group i (block-diagonal, as CGNet). Same FLOPs.
  saliency gradient through the normalisation statistics, or not.
  surrogate  'sigmoid' or 'hard_sigmoid' derivative for the straight-through
             gate.
  regulariser per-layer mean of (delta - target)^2, its sum over every
             threshold (channel gating's form), or a density target.

The network-level FLOPs budget (ours to add: the form of DynConv, DGNet and
Krishna et al., not known to be CDG's) is `flops_budget_regularizer` plus the
per-layer bounds of `layer_bounds` / `bound_regularizer`. Which form a run
uses, with its schedules, is chosen in `cdg_jax.gating.regularizers`.

The predictor baselines' ops (FBS-style channel predictor, dual-gating-style
spatial predictor) are in `cdg_jax.gating.predictors`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
import functools
import os

import jax
import jax.numpy as jnp

Array = jax.Array

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def base_channels(in_channels: int, groups: int) -> int:
  """Number of input channels the always-on base path convolves.

  Args:
    in_channels: C_in of the convolution.
    groups: G, the number of input-channel groups; the base path takes the
      first group, the conditional path the other G - 1.

  Returns:
    C_in / G.

  Raises:
    ValueError: if `groups` < 2 or does not divide `in_channels`.
  """
  if groups < 2:
    raise ValueError(
        f'gating.groups must be at least 2 (one base and one conditional group), '
        f'got {groups}.')
  if in_channels % groups:
    raise ValueError(
        f'gating.groups={groups} does not divide the {in_channels} input channels '
        f'of a gated convolution; choose groups that divide every gated layer\'s '
        f'input channels.')
  return in_channels // groups


def split_channels(x: Array, kernel: Array, groups: int
                   ) -> tuple[Array, Array, Array, Array]:
  """Splits input and kernel into the base group and the conditional groups.

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out) kernel.
    groups: G; must divide C_in.

  Returns:
    (x_base, kernel_base, x_cond, kernel_cond) with C_in/G and C_in*(G-1)/G
    input channels respectively.
  """
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'Input has {x.shape[-1]} channels but the kernel expects '
                     f'{kernel.shape[2]} (kernel shape {kernel.shape}).')
  n_base = base_channels(x.shape[-1], groups)
  return (x[..., :n_base], kernel[:, :, :n_base],
          x[..., n_base:], kernel[:, :, n_base:])


GROUPINGS = ('first', 'diagonal')


def diagonal_mask(c_in: int, c_out: int, groups: int, dtype=jnp.float32
                  ) -> Array:
  """(C_in, C_out) 0/1 mask, 1 on the block-diagonal (base-path) entries."""
  ci, co = c_in // groups, c_out // groups
  return jnp.kron(jnp.eye(groups, dtype=dtype), jnp.ones((ci, co), dtype))


def conditional_operands(x: Array, kernel: Array, groups: int,
                         grouping: str = 'first') -> tuple[Array, Array]:
  """(input, kernel) of the conditional path: conv of them is Y_cond.

  'first': the last (G-1)/G input channels and their kernel rows.
  'diagonal': every input channel, with the kernel's block-diagonal (base)
  blocks zeroed: one convolution over all input channels (in training this
  costs (G+1)/G of a dense conv; the FLOPs count is unchanged, as for
  'first', because the saving is accounted from the masks).
  """
  if grouping == 'first':
    return split_channels(x, kernel, groups)[2:]
  _check_diagonal(x, kernel, groups, grouping)
  off_diagonal = 1.0 - diagonal_mask(kernel.shape[2], kernel.shape[3], groups,
                                     kernel.dtype)
  return x, kernel * off_diagonal


def _check_diagonal(x: Array, kernel: Array, groups: int, grouping: str):
  if grouping != 'diagonal':
    raise ValueError(f'Unknown gating.grouping={grouping!r}; expected one of '
                     f'{GROUPINGS}.')
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'Input has {x.shape[-1]} channels but the kernel expects '
                     f'{kernel.shape[2]} (kernel shape {kernel.shape}).')
  base_channels(kernel.shape[2], groups)
  if kernel.shape[3] % groups:
    raise ValueError(
        f"gating.grouping='diagonal' with gating.groups={groups} needs groups "
        f"to divide the {kernel.shape[3]} output channels of every gated "
        f"convolution.")


def base_conv(x: Array, kernel: Array, groups: int, grouping: str = 'first',
              strides: Sequence[int] = (1, 1),
              padding: str | Sequence[tuple[int, int]] = 'SAME',
              formulation: str | None = None, precision=None) -> Array:
  """Y_base, the always-computed path (1/G of the dense MACs).

  'first': every output channel convolves the first C_in/G input channels.
  'diagonal': output group i convolves input group i. `strides`, `padding`,
  `formulation`, `precision`: as for `conv`.
  """
  if grouping == 'first':
    x_base, k_base = split_channels(x, kernel, groups)[:2]
    return conv(x_base, k_base, strides, padding, formulation, precision)
  _check_diagonal(x, kernel, groups, grouping)
  ci, co = kernel.shape[2] // groups, kernel.shape[3] // groups
  # One convolution per group rather than a grouped convolution
  # (`feature_group_count`): XLA's CPU backend ran the grouped form about 10x
  # slower forward and backward (CIFAR ResNet-18 layer at width 16, 2 cores).
  return jnp.concatenate(
      [conv(x[..., i * ci:(i + 1) * ci],
            kernel[:, :, i * ci:(i + 1) * ci, i * co:(i + 1) * co],
            strides, padding, formulation, precision)
       for i in range(groups)], axis=-1)


def base_and_conditional(x: Array, kernel: Array, groups: int,
                         grouping: str = 'first',
                         strides: Sequence[int] = (1, 1),
                         padding: str | Sequence[tuple[int, int]] = 'SAME',
                         formulation: str | None = None, precision=None
                         ) -> tuple[Array, Array]:
  """(Y_base, Y_cond): the two paths of a gated convolution, Y_base + Y_cond = conv(x, W).

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out).
    groups: G.
    grouping: 'first' -- the base path of every output channel convolves the
      first C_in/G input channels and the conditional path the rest;
      'diagonal' -- output group i's base path convolves input group i and
      the conditional path every other input group. Both cost (1/G) of the
      dense MACs on the base path.
    strides, padding, formulation, precision: as for `conv`.
  """
  x_cond, k_cond = conditional_operands(x, kernel, groups, grouping)
  return (base_conv(x, kernel, groups, grouping, strides, padding,
                    formulation, precision),
          conv(x_cond, k_cond, strides, padding, formulation, precision))


CONV_FORMULATIONS = ('xla', 'patches', 'shifted_dots')
# What `conv` and `GatedConv.formulation` take: a formulation, or 'auto' for
# `auto_formulation`'s per-shape choice.
FORMULATION_CHOICES = (*CONV_FORMULATIONS, 'auto')
# The formulation where none is given: XLA's convolution, what
# `flax.linen.Conv` computes.
DEFAULT_FORMULATION = 'xla'
# The training program's formulation (`program_formulation`): the per-shape
# choice measured on CPU (XLA's convolution off CPU).
PROGRAM_FORMULATION = 'auto'
# Overrides the training program's formulation for a whole run, e.g.
# CDG_JAX_CONV_FORMULATION=xla to use XLA's convolution everywhere. Read by
# `program_formulation` only (when the program builds its network), never
# by `conv` or the layers.
CONV_FORMULATION_VARIABLE = 'CDG_JAX_CONV_FORMULATION'

# The formulation and precision of `conv` calls that give none, inside a
# `conv_defaults` block; (None, None) outside any.
_CONV_DEFAULTS = contextvars.ContextVar('cdg_jax_conv_defaults',
                                        default=(None, None))


def check_formulation(formulation: str | None, field: str = 'formulation'
                      ) -> None:
  """ValueError naming `field` unless `formulation` is None or one of
  `FORMULATION_CHOICES`."""
  if formulation is not None and formulation not in FORMULATION_CHOICES:
    raise ValueError(
        f'Unknown convolution formulation {field}={formulation!r}; expected '
        f'None (XLA\'s convolution, as nn.Conv) or one of '
        f'{", ".join(map(repr, FORMULATION_CHOICES))}.')


def program_formulation() -> str:
  """The convolution formulation of the training program's networks.

  `PROGRAM_FORMULATION` ('auto': `auto_formulation`'s per-shape choice on
  CPU, XLA's convolution elsewhere), unless the environment variable
  CDG_JAX_CONV_FORMULATION names another (an override for a whole run, e.g.
  'xla'). Read once, when `cdg_jax.ssl.models.create_resnet` builds a
  network (its `conv_formulation` then shows the choice); the library's
  layers and ops never read the environment.

  Raises:
    ValueError naming the variable if it holds no formulation.
  """
  value = os.environ.get(CONV_FORMULATION_VARIABLE)
  if value is None:
    return PROGRAM_FORMULATION
  if value not in FORMULATION_CHOICES:
    raise ValueError(
        f'{CONV_FORMULATION_VARIABLE}={value!r} names no convolution '
        f'formulation; expected one of '
        f'{", ".join(map(repr, FORMULATION_CHOICES))}, or leave it unset '
        f'(the program\'s {PROGRAM_FORMULATION!r}).')
  return value


@contextlib.contextmanager
def conv_defaults(formulation: str | None = None, precision=None
                  ) -> Iterator[None]:
  """Inside the block, `conv` calls that give no `formulation` (or
  `precision`) use these.

  For ops that take neither argument (the predictor baselines' ops in
  `cdg_jax.gating.predictors`): `GatedConv` calls them inside this block
  with its own `formulation` and `precision`. Arguments given to `conv`
  win. A trace-time setting: a function traced later (a custom VJP's
  backward pass) does not see it, so the ops of this package pass both
  arguments explicitly.
  """
  check_formulation(formulation)
  token = _CONV_DEFAULTS.set((formulation, precision))
  try:
    yield
  finally:
    _CONV_DEFAULTS.reset(token)


def conv(x: Array, kernel: Array, strides: Sequence[int] = (1, 1),
         padding: str | Sequence[tuple[int, int]] = 'SAME',
         formulation: str | None = None, precision=None) -> Array:
  """Plain NHWC/HWIO convolution, the one used by both paths and by dense layers.

  `formulation` says how it is computed; every one computes the same sum
  (they differ in summation order only, i.e. in float rounding):

    'xla'           `jax.lax.conv_general_dilated`, what `flax.linen.Conv`
                    computes (the default);
    'patches'       the kernel's kh*kw shifted windows of the padded input
                    side by side, then one matrix product with the kernel
                    (im2col); the windows are recomputed for the backward
                    pass rather than kept (they are kh*kw times the input);
    'shifted_dots'  one matrix product per kernel tap, summed;
    'auto'          `auto_formulation`'s choice for these shapes.

  None (the default) is 'xla', or the formulation of an enclosing
  `conv_defaults` block. The environment is never read here (the training
  program's choice is `program_formulation`, made when it builds its
  network). `precision` is `jax.lax.Precision`-like, passed to the
  convolution or the matrix products (None: the default, or an enclosing
  `conv_defaults` block's).
  """
  scoped_formulation, scoped_precision = _CONV_DEFAULTS.get()
  if formulation is None:
    formulation = scoped_formulation or DEFAULT_FORMULATION
  if precision is None:
    precision = scoped_precision
  check_formulation(formulation)
  if formulation == 'auto':
    formulation = auto_formulation(x.shape, kernel.shape, strides, padding)
  if formulation == 'xla':
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=padding,
        dimension_numbers=DIMENSION_NUMBERS, precision=precision)
  kh, kw, c_in, c_out = kernel.shape
  if formulation == 'patches':
    @jax.checkpoint
    def patches_conv(x, kernel):
      windows = _shifted_windows(x, (kh, kw), strides, padding)
      patches = windows[0] if len(windows) == 1 else jnp.concatenate(
          windows, axis=-1)
      return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out),
                     precision=precision)
    return patches_conv(x, kernel)
  windows = _shifted_windows(x, (kh, kw), strides, padding)
  taps = kernel.reshape(kh * kw, c_in, c_out)
  return sum(jnp.dot(window, taps[i], precision=precision)
             for i, window in enumerate(windows))


def auto_formulation(x_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]]) -> str:
  """The fastest formulation of `conv` we measured for these shapes.

  Off CPU: 'xla'. On XLA:CPU (experiments/results/levers/): 'patches' for
  strided convolutions and for output maps of 2x2 or less, XLA's
  convolution elsewhere. With YNNPACK's kernels (XLA:CPU's default) XLA's
  strided convolutions were 1.2-6.6x slower than 'patches' forward and
  backward, its 2x2 maps up to 13x (experiments/results/conv_forms/2026-12-04T23-27-54-xeon.md). With XLA's own
  kernels (`cdg_jax.run.parallel.configure_cpu`, the project's default)
  'patches' still wins the strided 1x1 convolutions (1.3-2.1x) and the 2x2
  maps (6-15x) but not every strided 3x3 one in isolation (0.84-1.14x,
  conv_forms.md); in the whole width-64 train step, though, XLA computed
  the input gradient of the 32x32 strided convolution over a zero-dilated
  gradient in 0.8 of the step's 4.5 s (profile/profile_strided_xla.md),
  and the step with 'patches' for every strided convolution took 4.25 s
  (experiments/results/levers/2026-12-05T04-34-xeon.md).
  """
  if jax.default_backend() != 'cpu':
    return 'xla'
  if any(s > 1 for s in strides):
    return 'patches'
  padding = _explicit_padding(x_shape, kernel_shape[:2], strides, padding)
  out = [x_shape[1 + d] + sum(padding[d]) - kernel_shape[d] + 1
         for d in (0, 1)]
  if kernel_shape[0] * kernel_shape[1] > 1 and min(out) <= 2:
    return 'patches'
  return 'xla'


def _explicit_padding(x_shape: Sequence[int], window: Sequence[int],
                      strides: Sequence[int],
                      padding: str | Sequence[tuple[int, int]]
                      ) -> Sequence[tuple[int, int]]:
  """(low, high) padding of H and W, 'SAME'/'VALID' resolved as XLA does."""
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(x_shape[1:3], tuple(window),
                                   tuple(strides), padding)
  return padding


def _shifted_windows(x: Array, window: tuple[int, int], strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]]) -> list[Array]:
  """The input under each kernel tap, (N, H_out, W_out, C) each, in the
  kernel's (row, column) order."""
  padding = _explicit_padding(x.shape, window, strides, padding)
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out = [(x.shape[1 + d] - window[d]) // strides[d] + 1 for d in (0, 1)]
  return [jax.lax.slice(
      x, (0, i, j, 0),
      (x.shape[0], i + (out[0] - 1) * strides[0] + 1,
       j + (out[1] - 1) * strides[1] + 1, x.shape[3]),
      (1, strides[0], strides[1], 1))
          for i in range(window[0]) for j in range(window[1])]


def saliency_moments(y_base: Array, norm: str = 'batch', num_groups: int = 1
                     ) -> tuple[Array, Array]:
  """Mean and variance of the base-path output used to normalise saliency.

  Args:
    y_base: (N, H, W, C_out) base-path output.
    norm: 'batch' -- statistics per output channel over (N, H, W), as
      BatchNorm does in training (at evaluation the layer uses running
      averages instead, so a sample's mask does not depend on its batch);
      'sample' -- statistics per sample and channel over (H, W), which never
      mix samples.
    num_groups: for 'batch', the batch axis is split into this many equal
      consecutive groups (e.g. the two augmented views of a contrastive pair)
      and statistics are computed per group ("per-branch" statistics,
      docs/method.md [dual gating]). 1 pools the whole batch ("joint").

  Returns:
    (mean, var), each broadcastable against `y_base`: shape
    (N, 1, 1, C_out) in every case (the group statistics repeated for each
    sample of the group).
  """
  n, h, w, c = y_base.shape
  if norm == 'sample':
    return (jnp.mean(y_base, axis=(1, 2), keepdims=True),
            jnp.var(y_base, axis=(1, 2), keepdims=True))
  if norm != 'batch':
    raise ValueError(f"Unknown gating.saliency_norm={norm!r}; expected 'batch' "
                     f"or 'sample'.")
  if num_groups < 1 or n % num_groups:
    raise ValueError(f'Cannot split a batch of {n} into {num_groups} equal '
                     f'saliency-statistics groups.')
  grouped = y_base.reshape(num_groups, n // num_groups, h, w, c)
  mean = jnp.mean(grouped, axis=(1, 2, 3), keepdims=True)
  # Two-pass variance: the one-pass E[x^2]-E[x]^2 loses precision in float32
  # when the mean is large relative to the spread.
  var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 3), keepdims=True)
  expand = lambda t: jnp.broadcast_to(t, (num_groups, n // num_groups, 1, 1, c)
                                     ).reshape(n, 1, 1, c)
  return expand(mean), expand(var)


def normalize_saliency(y_base: Array, mean: Array, var: Array,
                       epsilon: float = 1e-5) -> Array:
  """Saliency S = (Y_base - mean) / sqrt(var + eps), per output channel."""
  return (y_base - mean) * jax.lax.rsqrt(var + epsilon)


class BlockTilingError(ValueError):
  """A gate block that does not tile a gated feature map.

  `field` is the config field the block came from: 'gating.block', or
  'gating.stage_blocks[i]' once the ResNet stage that uses it re-raises it
  (`for_field`), so that the message names the value the user set.
  """

  def __init__(self, block: Sequence[int], shape: Sequence[int],
               dimension: str, size: int, block_size: int,
               field: str = 'gating.block'):
    self.block, self.shape = tuple(int(b) for b in block), tuple(shape)
    self.dimension, self.size, self.block_size = dimension, size, block_size
    self.field = field
    _, h, w, c = self.shape
    super().__init__(
        f'{field}={self.block} does not tile a gated feature map of shape '
        f'(H, W, C)=({h}, {w}, {c}): block {dimension} {block_size} does not '
        f'divide {size}. Choose a {dimension} that divides {size} (or one at '
        f'least {size}, which covers the whole map).'
        if dimension != 'channels' else
        f'{field}={self.block} does not tile a gated feature map of shape '
        f'(H, W, C)=({h}, {w}, {c}): block channels {block_size} does not '
        f'divide {size}. Choose bc dividing every gated layer\'s channels, '
        f'or 0 (all channels).')

  def for_field(self, field: str) -> 'BlockTilingError':
    """The same error, naming `field` as the block's origin."""
    return BlockTilingError(self.block, self.shape, self.dimension, self.size,
                            self.block_size, field)


def check_block_shape(block: Sequence[int], field: str = 'gating.block'
                      ) -> None:
  """ValueError naming `field` unless `block` is (bh, bw, bc) with bh, bw >= 1
  and bc >= 0 (0: all channels)."""
  if (len(block) != 3 or any(int(b) < 1 for b in block[:2])
      or int(block[2]) < 0):
    raise ValueError(f'{field} must be three ints (bh, bw, bc) with bh, '
                     f'bw >= 1 and bc >= 0 (0: all channels), got '
                     f'{tuple(block)}.')


def effective_block(shape: Sequence[int], block: Sequence[int]
                    ) -> tuple[int, int, int]:
  """The (bh, bw, bc) decision block used on a gated output of `shape`.

  `bc = 0` means all output channels (a tile of positions: what block-sparse
  execution can skip, `cdg_jax.gating.sparse`). A block taller or wider than the
  map is clamped to it (the map is then one block in that dimension: the
  last stages of a CIFAR ResNet are smaller than an 8x8 tile). Otherwise the
  block must divide the map.

  Args:
    shape: (N, H, W, C) of the gated layer's output.
    block: (bh, bw, bc) block of positions and channels sharing one decision.

  Raises:
    ValueError naming the bad value if `block` is malformed;
    BlockTilingError (a ValueError) if it does not tile `shape`.
  """
  check_block_shape(block)
  _, h, w, c = shape
  bh, bw, bc = (int(b) for b in block)
  effective = (min(bh, h), min(bw, w), c if bc == 0 else bc)
  for name, size, b in (('height', h, effective[0]), ('width', w, effective[1]),
                        ('channels', c, effective[2])):
    if size % b:
      raise BlockTilingError(block, shape, name, size, b)
  return effective


def check_block(shape: Sequence[int], block: Sequence[int]) -> None:
  """Raises ValueError naming the bad value if `block` does not tile `shape`."""
  effective_block(shape, block)


def block_mean(z: Array, block: Sequence[int]) -> Array:
  """Averages `z` over (bh, bw, bc) blocks and broadcasts the mean back.

  Args:
    z: (N, H, W, C) array.
    block: (bh, bw, bc), see `effective_block` (bc = 0: all channels; blocks
      larger than the map are clamped to it).

  Returns:
    Array of the shape of `z`, constant within each block.
  """
  if tuple(int(b) for b in block) == (1, 1, 1):
    return z
  bh, bw, bc = effective_block(z.shape, block)
  n, h, w, c = z.shape
  blocks = z.reshape(n, h // bh, bh, w // bw, bw, c // bc, bc)
  means = jnp.mean(blocks, axis=(2, 4, 6), keepdims=True)
  return jnp.broadcast_to(means, blocks.shape).reshape(z.shape)


SURROGATES = ('sigmoid', 'hard_sigmoid')


def surrogate_slope(z: Array, alpha: float, surrogate: str = 'sigmoid'
                    ) -> Array:
  """Derivative of the gate's smooth surrogate at `z`.

  'sigmoid': d/dz sigmoid(alpha z) = alpha s (1 - s) (CGNet, our default).
  'hard_sigmoid': d/dz clip(0.25 alpha z + 0.5, 0, 1) = 0.25 alpha where
  |z| < 2 / alpha, else 0 (the first author's channel-gating scripts). Both
  have slope alpha / 4 at z = 0.
  """
  if surrogate == 'sigmoid':
    s = jax.nn.sigmoid(alpha * z)
    return alpha * s * (1.0 - s)
  if surrogate == 'hard_sigmoid':
    inside = jnp.abs(z) < 2.0 / alpha
    return jnp.where(inside, 0.25 * alpha, 0.0).astype(z.dtype)
  raise ValueError(f'Unknown gating.surrogate={surrogate!r}; expected one of '
                   f'{SURROGATES}.')


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def hard_gate(z: Array, alpha: float, surrogate: str = 'sigmoid') -> Array:
  """Hard 0/1 gate `1[z > 0]` with a straight-through surrogate gradient.

  The forward value is exactly 0 or 1 (a custom JVP, not the `soft +
  stop_gradient(hard - soft)` trick, whose forward value can be off by one
  ulp). The derivative is that of the surrogate (`surrogate_slope`), so the
  gradient reaches the threshold and, through the saliency, the base-path
  weights.

  Args:
    z: gate pre-activation, saliency minus threshold, any shape.
    alpha: steepness of the surrogate.
    surrogate: 'sigmoid' or 'hard_sigmoid' (see `surrogate_slope`).

  Returns:
    Array of `z`'s shape and dtype with values in {0, 1}.
  """
  del alpha, surrogate  # Only the derivative uses them.
  return (z > 0).astype(z.dtype)


@hard_gate.defjvp
def _hard_gate_jvp(alpha, surrogate, primals, tangents):
  (z,), (z_dot,) = primals, tangents
  return (hard_gate(z, alpha, surrogate),
          surrogate_slope(z, alpha, surrogate) * z_dot)


def gate_mask(saliency: Array, threshold: Array, block: Sequence[int] = (1, 1, 1),
              alpha: float = 2.0, surrogate: str = 'sigmoid') -> Array:
  """The CDG gate `d`: 1 where the (block-mean) saliency exceeds the threshold.

  Args:
    saliency: (N, H, W, C) normalised base-path output.
    threshold: (C,) learnable per-output-channel threshold delta.
    block: (bh, bw, bc) decision granularity; (1, 1, 1) is unstructured. For
      structured gating the decision is taken on the block mean of
      `saliency - threshold`, i.e. mean saliency against mean threshold.
    alpha: surrogate steepness for the straight-through gradient.
    surrogate: 'sigmoid' or 'hard_sigmoid' (see `surrogate_slope`).

  Returns:
    (N, H, W, C) mask with values in {0, 1}, constant within each block.
  """
  return hard_gate(block_mean(saliency - threshold, block), alpha, surrogate)


def masked_combine(y_base: Array, y_cond: Array, mask: Array) -> Array:
  """The gated output Y = Y_base + d * Y_cond, in the dtype of the paths."""
  return y_base + mask.astype(y_cond.dtype) * y_cond


def saliency_statistics(y_base: Array, *, norm: str = 'batch',
                        num_groups: int = 1, saliency_grad: bool = False,
                        running_mean: Array | None = None,
                        running_var: Array | None = None
                        ) -> tuple[Array, Array]:
  """The float32 (mean, var) a gate normalises its saliency with: the
  running statistics when given (evaluation), else `saliency_moments` of
  `y_base`. Args: see `gated_conv`."""
  if (running_mean is None) != (running_var is None):
    raise ValueError('Give both running_mean and running_var, or neither.')
  if running_mean is not None:
    return running_mean, running_var
  # By default the statistics only set the operating point of the gate and
  # no gradient is taken through them (the straight-through gradient still
  # reaches the base-path weights through Y_base in the saliency); that is
  # about 10% cheaper in a gated layer's backward pass on CPU. The lineage
  # (an instance norm in the first author's code) differentiates them.
  stats_input = y_base if saliency_grad else jax.lax.stop_gradient(y_base)
  return saliency_moments(stats_input.astype(jnp.float32), norm, num_groups)


def saliency_gate(y_base: Array, threshold: Array, *,
                  block: Sequence[int] = (1, 1, 1), alpha: float = 2.0,
                  epsilon: float = 1e-5, norm: str = 'batch',
                  num_groups: int = 1, saliency_grad: bool = False,
                  surrogate: str = 'sigmoid',
                  running_mean: Array | None = None,
                  running_var: Array | None = None
                  ) -> tuple[Array, tuple[Array, Array]]:
  """The gate `d` of a gated convolution from its base-path output.

  Args: see `gated_conv`.

  Returns:
    (mask, (mean, var)): the float32 0/1 mask of `y_base`'s shape and the
    float32 saliency statistics used.
  """
  check_threshold_shape(threshold, y_base.shape[-1])
  mean, var = saliency_statistics(
      y_base, norm=norm, num_groups=num_groups, saliency_grad=saliency_grad,
      running_mean=running_mean, running_var=running_var)
  # The gate decision is taken in float32 even when the convolutions run in
  # bfloat16 (mixed precision): normalising and thresholding in bfloat16
  # would flip gates near the threshold through rounding alone.
  saliency = normalize_saliency(y_base.astype(jnp.float32), mean, var, epsilon)
  mask = gate_mask(saliency, threshold.astype(jnp.float32), block, alpha,
                   surrogate)
  return mask, (mean, var)


def check_threshold_shape(threshold: Array, c_out: int,
                          kernel_shape: Sequence[int] | None = None) -> None:
  """ValueError unless `threshold` is (C_out,), one delta per output channel.

  A scalar or a (1,) threshold would broadcast silently (one delta shared
  by every channel), a longer one fail on a bare broadcasting error.
  """
  shape = tuple(jnp.shape(threshold))
  if shape != (c_out,):
    of = (f'the kernel {tuple(kernel_shape)} (kh, kw, C_in, C_out)'
          if kernel_shape is not None else 'the gated convolution')
    raise ValueError(
        f'threshold must have shape (C_out,) = ({c_out},), one threshold per '
        f'output channel of {of}; got shape {shape}.')


def gated_conv(x: Array, kernel: Array, threshold: Array, *, groups: int = 4,
               strides: Sequence[int] = (1, 1), padding='SAME',
               block: Sequence[int] = (1, 1, 1), alpha: float = 2.0,
               epsilon: float = 1e-5, norm: str = 'batch', num_groups: int = 1,
               grouping: str = 'first', saliency_grad: bool = False,
               surrogate: str = 'sigmoid',
               running_mean: Array | None = None,
               running_var: Array | None = None,
               formulation: str | None = None, precision=None
               ) -> tuple[Array, Array, tuple[Array, Array]]:
  """The CDG gated convolution Y = Y_base + d * Y_cond.

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out) kernel, the same array a dense conv uses.
    threshold: (C_out,) thresholds delta (any other shape is refused).
    groups: G, number of input-channel groups.
    strides, padding: as for `conv`.
    block: (bh, bw, bc) gate granularity (see `effective_block`).
    alpha: surrogate steepness.
    epsilon: added to the saliency variance.
    norm, num_groups: how saliency statistics are computed from Y_base when no
      running statistics are given (see `saliency_moments`).
    grouping: 'first' or 'diagonal' base path (see `base_and_conditional`).
    saliency_grad: differentiate through the saliency statistics (mean and
      variance of Y_base), as an instance norm or BatchNorm does; False
      treats them as constants.
    surrogate: 'sigmoid' or 'hard_sigmoid' straight-through derivative.
    running_mean, running_var: (C_out,) statistics to normalise with instead
      (evaluation with 'batch' norm); then no sample influences another.
    formulation, precision: how both paths' convolutions are computed (see
      `conv`; None: XLA's convolution, default precision).

  Returns:
    (y, mask, (mean, var)): the (N, H_out, W_out, C_out) gated output in the
    dtype of `x` and `kernel`, its float32 0/1 mask, and the float32 saliency
    statistics used (callers update running averages from them).
  """
  check_threshold_shape(threshold, kernel.shape[-1], tuple(kernel.shape))
  y_base, y_cond = base_and_conditional(x, kernel, groups, grouping, strides,
                                        padding, formulation, precision)
  # Y_cond is computed densely and masked: XLA cannot skip work per position.
  # The saliency is accounted analytically (cdg_jax.gating.flops) from the masks;
  # tile-structured gates can skip it at inference (cdg_jax.gating.sparse).
  mask, stats = saliency_gate(
      y_base, threshold, block=block, alpha=alpha, epsilon=epsilon, norm=norm,
      num_groups=num_groups, saliency_grad=saliency_grad, surrogate=surrogate,
      running_mean=running_mean, running_var=running_var)
  return masked_combine(y_base, y_cond, mask), mask, stats
