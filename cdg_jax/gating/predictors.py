"""Pure-function ops of the predictor baselines (docs/method.md [baselines]).

Both baselines compute the full dense convolution and multiply its output by
a mask chosen by a small auxiliary predictor that looks at the layer's input;
the saving is accounted analytically (`cdg_jax.gating.flops`) as
dense_macs * density + the predictor's MACs:

  channel_predictor_conv  FBS-style (Gao et al., ICLR 2019): top-k channels of
                          a saliency from an MLP on the globally pooled input,
                          the kept channels scaled by it.
  spatial_predictor_conv  dual-gating-style: a Gumbel-sigmoid block mask from
                          a 3x3 conv on the input pooled to the output's block
                          grid.

Like `cdg_jax.gating` (CDG's ops, which need no predictor), every function
takes arrays and returns arrays; `cdg_jax.gating.layers.GatedConv` holds the
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp

from cdg_jax.gating.ops import Array
from cdg_jax.gating.ops import conv
from cdg_jax.gating.ops import hard_gate

PREDICTOR_REDUCTION = 4


def predictor_hidden(in_channels: int, reduction: int = PREDICTOR_REDUCTION
                     ) -> int:
  """Hidden width of the channel predictor's MLP: max(1, C_in // reduction)."""
  return max(1, in_channels // reduction)


def num_kept_channels(out_channels: int, density: float) -> int:
  """k = ceil(density * C_out), clipped to [1, C_out] (winner-take-all size).

  A small tolerance keeps float products such as 0.3 * 10 = 3.0000000000000004
  from rounding up.
  """
  k = math.ceil(density * out_channels - 1e-6)
  return int(min(out_channels, max(1, k)))


# Output nonlinearity of the channel predictor's saliency (`channel_saliency`).
PREDICTOR_SALIENCIES = ('bounded', 'relu')


def channel_saliency(x: Array, w1: Array, b1: Array, w2: Array, b2: Array,
                     form: str = 'bounded') -> Array:
  """Feature-boosting channel saliency from the layer input.

    hidden = relu(gap(x) @ w1 + b1)
    'bounded': s = 2 * sigmoid(hidden @ w2 + b2), in (0, 2) (our default);
    'relu':    s = relu(hidden @ w2 + b2), unbounded (FBS as published:
               Gao et al., ICLR 2019, h(x) = (ss(x) W + b)_+).

  FBS's subsampling `ss(x)` is the spatial mean of |x|; our gated layers'
  inputs are post-ReLU (non-negative), so it is the global average pool.
  FBS's predictor is one linear layer; ours has the dual-gating channel
  gate's two (C_in -> C_in/4 -> C_out), for both forms.

  Why 'bounded' is the default: trained from scratch with the scale after
  BatchNorm (see `channel_predictor_conv`), an unbounded saliency scales the
  residual stream, which is the next layer's predictor input: the scales
  compound over the blocks, and the loss overflowed within 6 steps on real
  CIFAR (LARS, learning rate 1). The bounded form keeps FBS's non-negative,
  per-sample channel boosting (the top-k choice is unchanged by the monotone
  squashing) with at most a 2x gain per layer, like a BatchNorm scale.
  `experiments/README.md` reports how the published form trains.

  Args:
    x: (N, H, W, C_in) layer input.
    w1: (C_in, hidden) and b1: (hidden,) first layer (a 1x1 conv on the pooled
      input).
    w2: (hidden, C_out) and b2: (C_out,) second layer.
    form: 'bounded' or 'relu' (see above).

  Returns:
    (N, C_out) saliencies.
  """
  pooled = jnp.mean(x.astype(w1.dtype), axis=(1, 2))
  hidden = jax.nn.relu(pooled @ w1 + b1)
  logits = hidden @ w2 + b2
  if form == 'bounded':
    return 2.0 * jax.nn.sigmoid(logits)
  if form == 'relu':
    return jax.nn.relu(logits)
  raise ValueError(f'Unknown gating.predictor_saliency={form!r}; expected one '
                   f'of {PREDICTOR_SALIENCIES}.')


def top_k_mask(saliency: Array, k: int) -> Array:
  """Hard winner-take-all mask: exactly `k` ones per row, at the top saliencies.

  Args:
    saliency: (N, C) saliencies.
    k: channels kept per sample, 1 <= k <= C. Ties are broken by the lower
      channel index (`jax.lax.top_k`).

  Returns:
    (N, C) mask with values in {0, 1} and no gradient (it is piecewise
    constant; the gradient reaches the predictor through the saliency that
    scales the kept channels).
  """
  c = saliency.shape[-1]
  if not 1 <= k <= c:
    raise ValueError(f'Cannot keep k={k} of {c} channels.')
  _, index = jax.lax.top_k(jax.lax.stop_gradient(saliency), k)
  mask = jnp.sum(jax.nn.one_hot(index, c, dtype=saliency.dtype), axis=-2)
  return jax.lax.stop_gradient(mask)


def channel_predictor_conv(x: Array, kernel: Array, w1: Array, b1: Array,
                           w2: Array, b2: Array, *, k: int,
                           strides: Sequence[int] = (1, 1), padding='SAME',
                           normalize: Callable[[Array], Array] | None = None,
                           saliency_form: str = 'bounded'
                           ) -> tuple[Array, Array, Array]:
  """Feature-boosting (FBS-style) channel-gated convolution.

    s = channel_saliency(x)                    # (N, C_out)
    m = top_k_mask(s, k)                       # exactly k ones per sample
    Y = normalize(conv(x, W)) * (m * s)        # broadcast over positions

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out) dense kernel.
    w1, b1, w2, b2: predictor MLP (see `channel_saliency`).
    k: channels kept per sample.
    strides, padding: as for `conv`.
    normalize: the normalisation that follows the convolution (BatchNorm),
      applied before the channel scale as in FBS, so that its statistics see
      every channel's dense output. Scaling first leaves channels that few
      samples keep with a near-zero running variance, and evaluation then
      divides their rare activations by sqrt(epsilon): on real CIFAR the
      features reached 3e14. None: no normalisation.
    saliency_form: 'bounded' or 'relu' (FBS's), see `channel_saliency`.

  Returns:
    (y, mask, saliency): (N, H_out, W_out, C_out) output, its 0/1 mask
    broadcast to the output's shape, and the (N, C_out) saliencies.
  """
  y_dense = conv(x, kernel, strides, padding)
  if normalize is not None:
    y_dense = normalize(y_dense)
  saliency = channel_saliency(x, w1, b1, w2, b2, saliency_form)
  keep = top_k_mask(saliency, k)
  y = y_dense * (keep * saliency)[:, None, None, :].astype(y_dense.dtype)
  mask = jnp.broadcast_to(keep[:, None, None, :], y.shape)
  return y, mask, saliency


def block_grid(out_hw: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
  """(H_out / bh, W_out / bw): the grid of spatial decisions.

  Raises:
    ValueError: if (bh, bw) do not tile (H_out, W_out).
  """
  h, w = (int(s) for s in out_hw)
  bh, bw = int(block[0]), int(block[1])
  if bh < 1 or bw < 1 or h % bh or w % bw:
    raise ValueError(f'gating.block={tuple(block)} does not tile a gated '
                     f'output of spatial size (H, W)=({h}, {w}): (bh, bw) must '
                     f'divide it.')
  return h // bh, w // bw


def pool_to_grid(x: Array, grid: Sequence[int]) -> Array:
  """Average-pools (N, H, W, C) to (N, gh, gw, C) over equal windows.

  Raises:
    ValueError: if gh, gw do not divide H, W.
  """
  n, h, w, c = x.shape
  gh, gw = (int(g) for g in grid)
  if h % gh or w % gw:
    raise ValueError(f'Cannot average-pool an input of spatial size ({h}, {w}) '
                     f'to the ({gh}, {gw}) decision grid of the output: the '
                     f'grid must divide the input size.')
  return jnp.mean(x.reshape(n, gh, h // gh, gw, w // gw, c), axis=(2, 4))


def gumbel_sigmoid_gate(logits: Array, temperature: float,
                        rng: jax.Array | None = None) -> Array:
  """Hard Gumbel-sigmoid gate with a straight-through gradient.

  Training (`rng` given): d = 1[logits + L > 0] with L = G1 - G2 ~ Logistic(0,
  1) (the difference of two Gumbel samples); the backward pass is that of the
  soft relaxation sigmoid((logits + L) / temperature). Evaluation (`rng`
  None): the deterministic d = 1[logits > 0] (sigmoid(logits) > 0.5).

  Args:
    logits: predictor output, any shape.
    temperature: relaxation temperature tau > 0.
    rng: PRNG key for the noise, or None for the deterministic gate.

  Returns:
    Array of `logits`' shape with values in {0, 1}.
  """
  z = logits
  if rng is not None:
    z = z + jax.random.logistic(rng, logits.shape, logits.dtype)
  return hard_gate(z, 1.0 / temperature, 'sigmoid')


def spatial_predictor_conv(x: Array, kernel: Array, pred_kernel: Array,
                           pred_bias: Array, *, block: Sequence[int] = (1, 1, 1),
                           temperature: float = 1.0,
                           rng: jax.Array | None = None,
                           strides: Sequence[int] = (1, 1), padding='SAME'
                           ) -> tuple[Array, Array, Array]:
  """Dual-gating-style spatially gated convolution.

    P = avgpool(x) to the (H_out/bh, W_out/bw) grid   # (N, gh, gw, C_in)
    l = conv3x3(P, W_p) + b_p                          # (N, gh, gw, 1)
    d = gumbel_sigmoid_gate(l)                         # hard 0/1, STE
    Y = conv(x, W) * upsample(d)                       # all channels of a block

  Args:
    x: (N, H, W, C_in) input.
    kernel: (kh, kw, C_in, C_out) dense kernel.
    pred_kernel: (3, 3, C_in, 1) predictor kernel; pred_bias: (1,).
    block: (bh, bw, bc); bc is ignored (the mask covers all channels).
    temperature: Gumbel-sigmoid temperature.
    rng: noise key in training, None for the deterministic eval gate.
    strides, padding: as for `conv`.

  Returns:
    (y, mask, logits): (N, H_out, W_out, C_out) output, its 0/1 mask at the
    output's shape (constant within blocks and across channels), and the
    (N, gh, gw, 1) predictor logits.
  """
  y_dense = conv(x, kernel, strides, padding)
  bh, bw = int(block[0]), int(block[1])
  grid = block_grid(y_dense.shape[1:3], block)
  # The predictor (tiny) and its decision run in float32 under mixed precision.
  pooled = pool_to_grid(x, grid).astype(pred_kernel.dtype)
  logits = conv(pooled, pred_kernel) + pred_bias
  gate = gumbel_sigmoid_gate(logits, temperature, rng)
  gate = jnp.repeat(jnp.repeat(gate, bh, axis=1), bw, axis=2)
  y = y_dense * gate.astype(y_dense.dtype)
  return y, jnp.broadcast_to(gate, y.shape), logits
