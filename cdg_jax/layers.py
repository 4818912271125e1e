"""The gating configuration and the Flax layer that holds a gated convolution.

`GatingSpec` is the validated, hashable form of the config's `gating` block --
the one place gating is configured. `GatedConv` holds the kernel, the
thresholds and the saliency running statistics and calls the pure ops in
`cdg_jax.gating`; with gating off it is a plain bias-free convolution with the
same kernel parameter, so dense and gated networks share one parameter tree
(minus the gate parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdg_jax import gating

# Gating kinds implemented so far. The predictor baselines of DESIGN.md
# ('channel_predictor', 'spatial_predictor') will join this list.
GATING_KINDS = ('none', 'cdg')
# Roles of the convolutions of a ResNet; `gating.layers` selects among them.
LAYER_ROLES = ('stem', 'block_3x3', 'block_1x1', 'shortcut')
SALIENCY_NORMS = ('batch', 'sample')
SALIENCY_STATS = ('per_branch', 'joint')
BRANCHES = ('both', 'online')
REGULARIZERS = ('threshold', 'density')

# Collections written by gated layers during `apply`.
DENSITY_COLLECTION = 'gating'      # per-sample gate density of each gated layer
MASK_COLLECTION = 'gate_masks'     # full masks, only when asked for (mutable)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'Unknown gating.{name}={value!r}; expected one of '
                     f'{", ".join(map(repr, allowed))}.')


@dataclasses.dataclass(frozen=True)
class GatingSpec:
  """Validated gating configuration (see `configs/default.py` for defaults).

  Attributes:
    kind: 'none' (dense network) or 'cdg'.
    groups: G, input-channel groups; the base path convolves 1/G of them.
    block: (bh, bw, bc) decision granularity; (1, 1, 1) is unstructured.
    alpha: steepness of the sigmoid surrogate of the straight-through gate.
    threshold_init: initial value of every threshold delta.
    layers: which convolution roles are gated, a subset of `LAYER_ROLES`.
    saliency_norm: 'batch' (BatchNorm-style statistics, running averages at
      evaluation) or 'sample' (per-sample spatial statistics).
    saliency_momentum: decay of the saliency running averages.
    epsilon: added to the saliency variance.
    saliency_stats: 'per_branch' or 'joint' batch statistics (train step).
    branches: 'both' gates the target encoder too, 'online' leaves it dense.
    regularizer: 'threshold' or 'density' form of the gate regulariser.
    weight: regulariser weight lambda.
    threshold_target: target of the threshold regulariser.
    density_target: target of the density regulariser.
  """
  kind: str = 'cdg'
  groups: int = 4
  block: tuple[int, int, int] = (1, 1, 1)
  alpha: float = 2.0
  threshold_init: float = 0.0
  layers: tuple[str, ...] = ('block_3x3',)
  saliency_norm: str = 'batch'
  saliency_momentum: float = 0.9
  epsilon: float = 1e-5
  saliency_stats: str = 'per_branch'
  branches: str = 'both'
  regularizer: str = 'threshold'
  weight: float = 1e-4
  threshold_target: float = 1.0
  density_target: float = 0.5

  def __post_init__(self):
    _one_of('kind', self.kind, GATING_KINDS)
    _one_of('saliency_norm', self.saliency_norm, SALIENCY_NORMS)
    _one_of('saliency_stats', self.saliency_stats, SALIENCY_STATS)
    _one_of('branches', self.branches, BRANCHES)
    _one_of('regularizer', self.regularizer, REGULARIZERS)
    for role in self.layers:
      _one_of('layers entry', role, LAYER_ROLES)
    if self.kind != 'none':
      if self.groups < 2:
        raise ValueError(f'gating.groups must be at least 2, got {self.groups}.')
      if len(self.block) != 3 or any(int(b) < 1 for b in self.block):
        raise ValueError(f'gating.block must be three positive ints '
                         f'(bh, bw, bc), got {self.block}.')
      if self.alpha <= 0:
        raise ValueError(f'gating.alpha must be positive, got {self.alpha}.')
      if not 0.0 <= self.saliency_momentum < 1.0:
        raise ValueError(f'gating.saliency_momentum must be in [0, 1), got '
                         f'{self.saliency_momentum}.')

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None) -> 'GatingSpec':
    """Builds a spec from the config's `gating` block; unknown fields are errors."""
    if config is None:
      return cls(kind='none')
    values = dict(config.items()) if hasattr(config, 'items') else dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown gating config field(s) {unknown}; known fields: '
                       f'{sorted(known)}.')
    if 'block' in values:
      values['block'] = tuple(int(b) for b in values['block'])
    if 'layers' in values:
      layers = values['layers']
      if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(',') if s.strip()]
      values['layers'] = tuple(layers)
    return cls(**values)

  @property
  def enabled(self) -> bool:
    return self.kind != 'none'

  def gates(self, role: str) -> bool:
    """Whether a convolution of this role is gated."""
    return self.enabled and role in self.layers


def he_normal_fan_out():
  """Kaiming-normal (fan-out) init, the torchvision ResNet convention."""
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class GatedConv(nn.Module):
  """A bias-free convolution, CDG-gated when `gating` is given.

  Parameters: `kernel` (kh, kw, C_in, C_out) always; `threshold` (C_out,) when
  gated. Batch stats (gated, 'batch' saliency norm): `saliency_mean`,
  `saliency_var` (C_out,). Sows each sample's gate density (fraction of open
  (position, channel) gates, shape (N,)) into the 'gating' collection, and the
  mask itself into 'gate_masks' when that collection is mutable.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  gating: GatingSpec | None = None
  kernel_init: Any = dataclasses.field(default_factory=he_normal_fan_out)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               stat_groups: int = 1) -> jax.Array:
    """Applies the convolution.

    Args:
      x: (N, H, W, C_in) input.
      train: batch statistics for the saliency (and update of their running
        averages) when True; running averages when False.
      stat_groups: number of equal consecutive groups of the batch (e.g. the
        two views) that get separate saliency statistics in training.

    Returns:
      (N, H_out, W_out, features) output.
    """
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    if self.gating is None:
      return gating.conv(x, kernel, self.strides)
    spec = self.gating
    if spec.kind != 'cdg':
      raise NotImplementedError(f'gating.kind={spec.kind!r} has no layer yet.')
    threshold = self.param('threshold',
                           nn.initializers.constant(spec.threshold_init),
                           (self.features,))
    use_running = spec.saliency_norm == 'batch' and not train
    if spec.saliency_norm == 'batch':
      running_mean = self.variable('batch_stats', 'saliency_mean', jnp.zeros,
                                   (self.features,))
      running_var = self.variable('batch_stats', 'saliency_var', jnp.ones,
                                  (self.features,))
    y, mask, (mean, var) = gating.gated_conv(
        x, kernel, threshold, groups=spec.groups, strides=self.strides,
        block=spec.block, alpha=spec.alpha, epsilon=spec.epsilon,
        norm=spec.saliency_norm, num_groups=stat_groups,
        running_mean=running_mean.value if use_running else None,
        running_var=running_var.value if use_running else None)
    if (spec.saliency_norm == 'batch' and train
        and not self.is_initializing()):
      m = spec.saliency_momentum
      # Statistics are equal across the samples of a group and the groups have
      # equal size, so the mean over samples is the mean over groups.
      batch_mean = jnp.mean(mean, axis=(0, 1, 2))
      batch_var = jnp.mean(var, axis=(0, 1, 2))
      running_mean.value = m * running_mean.value + (1 - m) * batch_mean
      running_var.value = m * running_var.value + (1 - m) * batch_var
    if not self.is_initializing():  # keep sown values out of `init`'s variables
      self.sow(DENSITY_COLLECTION, 'density', jnp.mean(mask, axis=(1, 2, 3)))
      self.sow(MASK_COLLECTION, 'mask', mask)
    return y
