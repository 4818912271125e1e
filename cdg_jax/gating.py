"""Pure-function ops of the Contrastive Dual Gating (CDG) convolution.

Every function here takes arrays (and plain Python configuration) and returns
arrays: no Flax, no hidden state. They are jittable, vmappable and
differentiable; the Flax layer in `cdg_jax.layers` only holds the parameters
and statistics and calls them. Shapes use NHWC for activations and HWIO for
kernels, as `flax.linen.Conv` does.

The gated convolution (DESIGN.md section 2), for kernel `W` (k, k, C_in, C_out)
split into `G` input-channel groups:

    Y_base = conv(X[..., :C_in/G], W[:, :, :C_in/G])          # always computed
    S      = normalize(Y_base)                                  # per output channel
    d      = 1[block_mean(S - delta) > 0]                       # hard 0/1 gate, STE
    Y      = Y_base + d * conv(X[..., C_in/G:], W[:, :, C_in/G:])
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

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


def conv(x: Array, kernel: Array, strides: Sequence[int] = (1, 1),
         padding: str | Sequence[tuple[int, int]] = 'SAME') -> Array:
  """Plain NHWC/HWIO convolution, the one used by both paths and by dense layers."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=DIMENSION_NUMBERS)


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
      DESIGN.md section 2.7). 1 pools the whole batch ("joint").

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


def check_block(shape: Sequence[int], block: Sequence[int]) -> None:
  """Raises ValueError naming the bad value if `block` does not tile `shape`.

  Args:
    shape: (N, H, W, C) of the gated layer's output.
    block: (bh, bw, bc) block of positions and channels sharing one decision.
  """
  if len(block) != 3 or any(int(b) < 1 for b in block):
    raise ValueError(f'gating.block must be three positive ints (bh, bw, bc), '
                     f'got {tuple(block)}.')
  _, h, w, c = shape
  for name, size, b in (('height', h, block[0]), ('width', w, block[1]),
                        ('channels', c, block[2])):
    if size % b:
      raise ValueError(
          f'gating.block={tuple(block)} does not tile a gated feature map of '
          f'shape (H, W, C)=({h}, {w}, {c}): block {name} {b} does not divide '
          f'{size}.')


def block_mean(z: Array, block: Sequence[int]) -> Array:
  """Averages `z` over (bh, bw, bc) blocks and broadcasts the mean back.

  Args:
    z: (N, H, W, C) array.
    block: (bh, bw, bc), each dividing the corresponding dimension.

  Returns:
    Array of the shape of `z`, constant within each block.
  """
  bh, bw, bc = (int(b) for b in block)
  if (bh, bw, bc) == (1, 1, 1):
    return z
  check_block(z.shape, block)
  n, h, w, c = z.shape
  blocks = z.reshape(n, h // bh, bh, w // bw, bw, c // bc, bc)
  means = jnp.mean(blocks, axis=(2, 4, 6), keepdims=True)
  return jnp.broadcast_to(means, blocks.shape).reshape(z.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def hard_gate(z: Array, alpha: float) -> Array:
  """Hard 0/1 gate `1[z > 0]` with a sigmoid straight-through gradient.

  The forward value is exactly 0 or 1 (a custom JVP, not the `soft +
  stop_gradient(hard - soft)` trick, whose forward value can be off by one
  ulp). The derivative is that of the surrogate `sigmoid(alpha * z)`, so the
  gradient reaches the threshold and, through the saliency, the base-path
  weights.

  Args:
    z: gate pre-activation, saliency minus threshold, any shape.
    alpha: steepness of the sigmoid surrogate.

  Returns:
    Array of `z`'s shape and dtype with values in {0, 1}.
  """
  return (z > 0).astype(z.dtype)


@hard_gate.defjvp
def _hard_gate_jvp(alpha, primals, tangents):
  (z,), (z_dot,) = primals, tangents
  surrogate = jax.nn.sigmoid(alpha * z)
  slope = alpha * surrogate * (1.0 - surrogate)
  return hard_gate(z, alpha), slope * z_dot


def gate_mask(saliency: Array, threshold: Array, block: Sequence[int] = (1, 1, 1),
              alpha: float = 2.0) -> Array:
  """The CDG gate `d`: 1 where the (block-mean) saliency exceeds the threshold.

  Args:
    saliency: (N, H, W, C) normalised base-path output.
    threshold: (C,) learnable per-output-channel threshold delta.
    block: (bh, bw, bc) decision granularity; (1, 1, 1) is unstructured. For
      structured gating the decision is taken on the block mean of
      `saliency - threshold`, i.e. mean saliency against mean threshold.
    alpha: surrogate steepness for the straight-through gradient.

  Returns:
    (N, H, W, C) mask with values in {0, 1}, constant within each block.
  """
  return hard_gate(block_mean(saliency - threshold, block), alpha)


def masked_combine(y_base: Array, y_cond: Array, mask: Array) -> Array:
  """The gated output Y = Y_base + d * Y_cond."""
  return y_base + mask * y_cond


def gated_conv(x: Array, kernel: Array, threshold: Array, *, groups: int = 4,
               strides: Sequence[int] = (1, 1), padding='SAME',
               block: Sequence[int] = (1, 1, 1), alpha: float = 2.0,
               epsilon: float = 1e-5, norm: str = 'batch', num_groups: int = 1,
               running_mean: Array | None = None,
               running_var: Array | None = None
               ) -> tuple[Array, Array, tuple[Array, Array]]:
  """The CDG gated convolution Y = Y_base + d * Y_cond.

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out) kernel, the same array a dense conv uses.
    threshold: (C_out,) thresholds delta.
    groups: G, number of input-channel groups.
    strides, padding: as for `conv`.
    block: (bh, bw, bc) gate granularity.
    alpha: surrogate steepness.
    epsilon: added to the saliency variance.
    norm, num_groups: how saliency statistics are computed from Y_base when no
      running statistics are given (see `saliency_moments`).
    running_mean, running_var: (C_out,) statistics to normalise with instead
      (evaluation with 'batch' norm); then no sample influences another.

  Returns:
    (y, mask, (mean, var)): the (N, H_out, W_out, C_out) gated output, its 0/1
    mask, and the saliency statistics used (callers update running averages
    from them).
  """
  x_base, k_base, x_cond, k_cond = split_channels(x, kernel, groups)
  y_base = conv(x_base, k_base, strides, padding)
  # Y_cond is computed densely and masked: XLA cannot skip work per position,
  # so the saving is accounted analytically (cdg_jax.flops) from the masks.
  y_cond = conv(x_cond, k_cond, strides, padding)
  if (running_mean is None) != (running_var is None):
    raise ValueError('Give both running_mean and running_var, or neither.')
  if running_mean is None:
    # The statistics only set the operating point of the gate; no gradient is
    # taken through them (the straight-through gradient still reaches the
    # base-path weights through Y_base in the saliency). Differentiating the
    # batch mean and variance too would be a correction to a surrogate
    # gradient and cost about 10% of a gated layer's backward pass on CPU.
    mean, var = saliency_moments(jax.lax.stop_gradient(y_base), norm,
                                 num_groups)
  else:
    mean, var = running_mean, running_var
  saliency = normalize_saliency(y_base, mean, var, epsilon)
  mask = gate_mask(saliency, threshold, block, alpha)
  return masked_combine(y_base, y_cond, mask), mask, (mean, var)


def threshold_regularizer(thresholds: Sequence[Array], target: float = 1.0
                          ) -> Array:
  """Channel-gating regulariser `sum_layers mean((delta - target)^2)`.

  Multiply by the regularisation weight lambda in the loss. Pushing the
  thresholds towards a positive target closes gates where saliency is low.
  """
  if not thresholds:
    return jnp.zeros(())
  return sum(jnp.mean(jnp.square(t - target)) for t in thresholds)


def density_regularizer(densities: Sequence[Array], target: float = 0.5
                        ) -> Array:
  """Density-target regulariser `sum_layers (density - target)^2`.

  `densities` should be means of the straight-through masks so that the
  gradient (through the sigmoid surrogate) reaches the thresholds.
  """
  if not densities:
    return jnp.zeros(())
  return sum(jnp.square(d - target) for d in densities)
