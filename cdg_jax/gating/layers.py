"""The gated layer's spec and the Flax layer that holds a gated convolution.

`GatingSpec` is the validated, hashable description of what a gated layer
computes. `GatedConv` holds the kernel, the
thresholds and the saliency running statistics and calls the pure ops in
`cdg_jax.gating.ops`; with gating off it is a plain bias-free convolution with the
same kernel parameter, so dense and gated networks share one parameter tree
(minus the gate parameters).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdg_jax.gating import ops
from cdg_jax.gating import predictors
from cdg_jax.gating import sparse
from cdg_jax.gating import sparse_training

# Gating kinds -> the `GatedConv` method computing each (with its norm): dense,
# CDG, and the predictor baselines of docs/method.md [baselines] (a
# feature-boosting-style channel predictor and a dual-gating-style spatial
# predictor). A new kind is one method and one entry.
FORWARD_OF_KIND = {
    'none': '_plain',
    'cdg': '_cdg_in_mode',
    'channel_predictor': '_channel_predictor',
    'spatial_predictor': '_spatial_predictor',
}
GATING_KINDS = tuple(FORWARD_OF_KIND)
PREDICTOR_KINDS = ('channel_predictor', 'spatial_predictor')
# Roles of the convolutions of a ResNet; `gating.layers` selects among them.
LAYER_ROLES = ('stem', 'block_3x3', 'block_1x1', 'shortcut')
SALIENCY_NORMS = ('batch', 'sample')
# How a gated layer executes (`GatedConv.gate_mode`): 'gated' (the masks as
# learned), 'open' (every gate open: the dense network with the same weights)
# or 'partner' (the dense-partner training forward: the first half of the
# batch gated, the second half with every gate open).
GATE_MODES = ('gated', 'open', 'partner')
# How a CDG layer with tile gates executes (`GatingSpec.execution`): the
# masked form everywhere, or the closed tiles skipped in training (the
# config's `gating.sparse_training`), at inference (`eval.sparse_inference`,
# `models.with_sparse_inference`), or both.
EXECUTIONS = ('masked', 'sparse_training', 'sparse_inference', 'sparse')

# Collections written by gated layers during `apply`.
DENSITY_COLLECTION = 'gating'      # per-sample gate density of each gated layer
MASK_COLLECTION = 'gate_masks'     # full masks, only when asked for (mutable)
# Per-sample auxiliary-loss terms of the predictor baselines, only when asked
# for (mutable): 'saliency_l1' (N,) of channel-predictor layers.
AUX_COLLECTION = 'gate_aux'
# RNG stream of the spatial predictor's Gumbel noise (training only):
# `model.apply(..., rngs={GUMBEL_RNG: key})`.
GUMBEL_RNG = 'gumbel'
# RNG stream of the sparse train step's sample of closed tiles
# (`GatingSpec.closed_tile_gradient='sampled'`, training only).
CLOSED_TILE_RNG = 'closed_tiles'


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'Unknown gating.{name}={value!r}; expected one of '
                     f'{", ".join(map(repr, allowed))}.')


@dataclasses.dataclass(frozen=True)
class GatingSpec:
  """What a gated layer computes: the gate kind, its granularity, its
  saliency and how it executes. Made from the config's `gating` block by
  `config_lib.read_gating` (the fields are the config's of the same names;
  `execution` is read from `gating.sparse_training` and
  `eval.sparse_inference`); the gates' loss is `regularizers.
  RegularizerSpec`, the wiring of the SSL branches `pretraining.BranchSpec`.
  Every numeric field is range-checked (NaN included).

  Attributes:
    kind: 'none' (dense network), 'cdg', or a predictor baseline:
      'channel_predictor' (global pool -> MLP -> top-k channels, FBS-style) or
      'spatial_predictor' (pooled input -> 3x3 conv -> Gumbel-sigmoid block
      mask, dual-gating-style). For the predictor kinds only `block` (bh, bw;
      spatial), `gumbel_temperature` (spatial), `layers` and
      `density_target` (channel) apply; their loss is
      `regularizers.RegularizerSpec`'s. The channel predictor keeps
      ceil(density_target * C_out) channels per sample.
    groups: G, input-channel groups; the base path convolves 1/G of them.
    grouping: which input group each output channel's base path convolves:
      'first' (the first group, for every output channel) or 'diagonal'
      (output-channel group i takes input group i, CGNet's block-diagonal
      grouping; G must then divide C_out too). Same FLOPs.
    block: (bh, bw, bc) decision granularity; (1, 1, 1) is unstructured;
      bc = 0 covers all output channels: a tile of bh x bw positions, which
      `cdg_jax.gating.sparse` can skip at inference. A block larger than a feature
      map is clamped to the map (see `gating.effective_block`).
    stage_blocks: CDG only: one (bh, bw, bc) per stage of the ResNet, used
      instead of `block` by that stage's gated layers (the stem, if gated,
      keeps `block`); empty: `block` everywhere. Lets block-sparse inference
      use larger tiles on the large early maps, where a tile's halo costs
      most (8x8 tiles read 10x10 windows, 1.56x their area; 4x4 tiles 6x6,
      2.25x), and smaller ones on the small late maps. Training uses the
      same granularity.
    alpha: steepness of the surrogate of the straight-through gate.
    surrogate: derivative used by the straight-through gate: 'sigmoid'
      (alpha s (1 - s), CGNet) or 'hard_sigmoid' (of clip(alpha z / 4 + 1/2,
      0, 1), the first author's channel-gating scripts).
    gumbel_temperature: temperature of the spatial predictor's Gumbel-sigmoid
      (its straight-through gradient is that of sigmoid(z / temperature)).
    execution: 'masked' (every position computed, the closed ones zeroed),
      'sparse_training' (ours: training computes the conditional path at
      the open tiles only, forward and backward,
      `sparse_training.sparse_train_gated_conv`; set by the config's
      `gating.sparse_training`), 'sparse_inference' (inference skips the
      closed tiles, `sparse.sparse_gated_conv`; `eval.sparse_inference`,
      `models.with_sparse_inference`) or 'sparse' (both). Anything but
      'masked' needs CDG with tile-structured gates (`block` and every
      `stage_blocks` entry (bh, bw, 0)). The outputs, masks and every
      gradient but the gate's at closed tiles are the masked form's.
    closed_tile_gradient: under sparse training, the gate's task-loss
      gradient at closed tiles: 'none' (only the regulariser moves their
      thresholds) or 'sampled' (the conditional path also computed, forward
      only, on a uniform sample of the closed tiles, their gate gradient
      scaled by the inverse sampling rate: an unbiased estimate; random
      stream `CLOSED_TILE_RNG`).
    closed_tile_sample: the 'sampled' form's sample, as a fraction of all
      tiles of the batch (its static capacity; the extra forward cost).
    threshold_init: initial value of every threshold delta.
    layers: which convolution roles are gated, a subset of `LAYER_ROLES`.
    saliency_norm: 'batch' (BatchNorm-style statistics, running averages at
      evaluation) or 'sample' (per-sample spatial statistics).
    saliency_grad: differentiate through the saliency statistics (the
      lineage: an instance norm with 'sample', a non-affine BatchNorm with
      'batch') or treat them as constants (False, our first reading).
    saliency_momentum: decay of the saliency running averages.
    epsilon: added to the saliency variance.
    predictor_saliency: the channel predictor's saliency, 'bounded'
      (2 * sigmoid, ours, the default) or 'relu' (FBS as published,
      unbounded); see `predictors.channel_saliency`.
    density_target: the channel predictor's kept fraction of channels, in
      (0, 1] (the regulariser's target is `RegularizerSpec.density_target`,
      the same config field).
  """
  kind: str = 'cdg'
  groups: int = 4
  grouping: str = 'first'
  block: tuple[int, int, int] = (1, 1, 1)
  stage_blocks: tuple[tuple[int, int, int], ...] = ()
  alpha: float = 2.0
  surrogate: str = 'sigmoid'
  threshold_init: float = 0.0
  layers: tuple[str, ...] = ('block_3x3',)
  saliency_norm: str = 'batch'
  saliency_grad: bool = False
  saliency_momentum: float = 0.9
  epsilon: float = 1e-5
  predictor_saliency: str = 'bounded'
  density_target: float = 0.25
  gumbel_temperature: float = 1.0
  execution: str = 'masked'
  closed_tile_gradient: str = 'none'
  closed_tile_sample: float = 0.0625

  def __post_init__(self):
    _one_of('kind', self.kind, GATING_KINDS)
    _one_of('execution', self.execution, EXECUTIONS)
    _one_of('saliency_norm', self.saliency_norm, SALIENCY_NORMS)
    _one_of('predictor_saliency', self.predictor_saliency,
            predictors.PREDICTOR_SALIENCIES)
    _one_of('grouping', self.grouping, ops.GROUPINGS)
    _one_of('surrogate', self.surrogate, ops.SURROGATES)
    _one_of('closed_tile_gradient', self.closed_tile_gradient,
            sparse_training.CLOSED_TILE_GRADIENTS)
    if isinstance(self.layers, (str, bytes)):
      # A string would be read letter by letter ("entry='b'"), and
      # `gates(role)` would test substrings.
      names = self.layers if isinstance(self.layers, str) else (
          self.layers.decode())
      meant = tuple(n.strip() for n in names.split(',') if n.strip())
      raise ValueError(
          f'gating.layers={self.layers!r} must be a tuple of role names, '
          f'e.g. {meant}, not a string; the roles are '
          f'{", ".join(map(repr, LAYER_ROLES))}.')
    for role in self.layers:
      _one_of('layers entry', role, LAYER_ROLES)
    for name, allowed, ok, read in _RANGES:
      value = getattr(self, name)
      if read(self) and not ok(value):
        raise ValueError(f'gating.{name} must be {allowed}, got {value!r}.')
    if self.kind != 'none':
      for name, block in (('block', self.block),
                          *((f'stage_blocks[{i}]', b)
                            for i, b in enumerate(self.stage_blocks))):
        ops.check_block_shape(block, f'gating.{name}')
    if self.execution != 'masked' and (
        self.kind != 'cdg' or any(int(b[2]) != 0 for b in self.blocks)):
      stages = (f', gating.stage_blocks={self.stage_blocks}'
                if self.stage_blocks else '')
      what = ('gating.sparse_training' if self.sparse_training
              else 'Sparse inference')
      raise ValueError(
          f"{what} skips closed tiles of CDG gates, which needs "
          f"gating.kind='cdg' and gating.block=(bh, bw, 0) (and every entry "
          f"of gating.stage_blocks so); got gating.kind={self.kind!r}, "
          f"gating.block={self.block}{stages}.")

  @property
  def enabled(self) -> bool:
    return self.kind != 'none'

  @property
  def sparse_training(self) -> bool:
    """Whether training skips the closed tiles (`execution`)."""
    return self.execution in ('sparse_training', 'sparse')

  @property
  def sparse_inference(self) -> bool:
    """Whether inference skips the closed tiles (`execution`)."""
    return self.execution in ('sparse_inference', 'sparse')

  def with_sparse_inference(self) -> 'GatingSpec':
    """This spec with inference skipping the closed tiles too.

    Raises:
      ValueError: unless CDG with tile-structured gates.
    """
    return dataclasses.replace(
        self, execution='sparse' if self.sparse_training
        else 'sparse_inference')

  @property
  def blocks(self) -> tuple[tuple[int, int, int], ...]:
    """Every gate granularity the gated layers use.

    `block` alone without `stage_blocks`; with them, `stage_blocks`, and
    `block` too when the stem (which belongs to no stage) is gated.
    """
    if not self.stage_blocks:
      return (self.block,)
    return ((self.block,) if self.gates('stem') else ()) + self.stage_blocks

  def for_stage(self, stage: int, num_stages: int) -> 'GatingSpec':
    """The spec of stage `stage`'s layers: its entry of `stage_blocks`.

    Raises:
      ValueError: if `stage_blocks` is set without one entry per stage.
    """
    if not self.stage_blocks:
      return self
    if len(self.stage_blocks) != num_stages:
      raise ValueError(
          f'gating.stage_blocks has {len(self.stage_blocks)} entries for a '
          f'ResNet of {num_stages} stages: give one (bh, bw, bc) per stage, '
          f'got {self.stage_blocks}.')
    return dataclasses.replace(self, block=self.stage_blocks[stage],
                               stage_blocks=())

  def gates(self, role: str) -> bool:
    """Whether a convolution of this role is gated."""
    return self.enabled and role in self.layers


def _finite(value: Any) -> bool:
  return isinstance(value, numbers.Real) and math.isfinite(value)


def _cdg(spec: GatingSpec) -> bool:
  return spec.kind == 'cdg'


# The numeric fields' ranges, each (field, allowed in words, test, when the
# field is read): a value outside them (NaN included) is refused before any
# work.
_RANGES = (
    ('groups', 'an integer >= 2', lambda v: isinstance(v, numbers.Integral)
     and v >= 2, _cdg),
    ('alpha', 'finite and > 0', lambda v: _finite(v) and v > 0, _cdg),
    ('epsilon', 'finite and > 0 (it keeps the saliency variance away from '
     '0)', lambda v: _finite(v) and v > 0, _cdg),
    ('saliency_momentum', 'in [0, 1)', lambda v: _finite(v) and 0 <= v < 1,
     _cdg),
    ('threshold_init', 'finite', _finite, _cdg),
    ('density_target', 'in (0, 1]', lambda v: _finite(v) and 0 < v <= 1,
     lambda s: s.kind == 'channel_predictor'),
    ('gumbel_temperature', 'finite and > 0', lambda v: _finite(v) and v > 0,
     lambda s: s.kind == 'spatial_predictor'),
    ('closed_tile_sample', 'in (0, 1] (a fraction of the tiles)',
     lambda v: _finite(v) and 0 < v <= 1, lambda s: True),
)


def check_gate_mode(gate_mode: str, spec: GatingSpec | None) -> None:
  """ValueError unless `gate_mode` is one of GATE_MODES and fits `spec`."""
  _one_of('gate_mode', gate_mode, GATE_MODES)
  if gate_mode != 'gated' and spec is not None and spec.enabled and (
      spec.kind != 'cdg'):
    raise ValueError(f'gate_mode={gate_mode!r} opens CDG gates; gating.kind='
                     f'{spec.kind!r} has none.')


def he_normal_fan_out():
  """Kaiming-normal (fan-out) init, the torchvision ResNet convention."""
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class GatedConv(nn.Module):
  """A bias-free convolution, CDG-gated when `gating` is given.

  Parameters: `kernel` (kh, kw, C_in, C_out) always; `threshold` (C_out,) when
  CDG-gated. Batch stats (CDG, 'batch' saliency norm): `saliency_mean`,
  `saliency_var` (C_out,). Predictor baselines (see `GatingSpec.kind`) add,
  next to the shared `kernel`: 'channel_predictor' `predictor_w1` (C_in,
  hidden), `predictor_b1` (hidden,), `predictor_w2` (hidden, C_out),
  `predictor_b2` (C_out,), hidden = C_in // 4; 'spatial_predictor'
  `predictor_kernel` (3, 3, C_in, 1), `predictor_bias` (1,). The spatial
  predictor needs the 'gumbel' RNG stream when `train` is True. Sows each sample's gate density (fraction of open
  (position, channel) gates, shape (N,)) into the 'gating' collection, and the
  mask itself into 'gate_masks' when that collection is mutable.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  # An int s means (s, s), as for nn.Conv (`pair_strides`).
  strides: tuple[int, int] | int = (1, 1)
  gating: GatingSpec | None = None
  kernel_init: Any = dataclasses.field(default_factory=he_normal_fan_out)
  # Compute dtype of the convolutions; parameters are float32 and are cast
  # per call. The gate decision is float32 whatever this is (gated_conv).
  dtype: Any = jnp.float32
  # 'gated', 'open' (every gate open: Y_base + Y_cond, the dense conv) or
  # 'partner' (first half of the batch gated, second half open); see
  # GATE_MODES. The parameters and statistics are the same in every mode.
  gate_mode: str = 'gated'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               stat_groups: int = 1,
               norm: Callable[[jax.Array], jax.Array] | None = None
               ) -> jax.Array:
    """Applies the convolution, and the normalisation after it if given.

    Args:
      x: (N, H, W, C_in) input.
      train: batch statistics for the saliency (and update of their running
        averages) when True; running averages when False.
      stat_groups: number of equal consecutive groups of the batch (e.g. the
        two views) that get separate saliency statistics in training.
      norm: the BatchNorm (owned by the caller) that follows this convolution.
        Applied to the output, except for 'channel_predictor', which applies
        it to the dense convolution and scales the channels after it (FBS
        order; see `predictors.channel_predictor_conv`).

    Returns:
      (N, H_out, W_out, features) output.
    """
    self._check_input(x)
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    kind = 'none' if self.gating is None else self.gating.kind
    forward = getattr(self, FORWARD_OF_KIND[kind])
    return forward(x, kernel, train, stat_groups, norm)

  @property
  def pair_strides(self) -> tuple[int, int]:
    """`strides` as an (sh, sw) pair; an int s is (s, s), as in nn.Conv."""
    if isinstance(self.strides, numbers.Integral):
      return (int(self.strides),) * 2
    return tuple(self.strides)

  def _check_input(self, x: jax.Array) -> None:
    """ValueError naming what a gated convolution takes, before any op."""
    if isinstance(self.kernel_size, numbers.Integral):
      # nn.Conv reads an int kernel_size k as a 1-D kernel (k,), which a 2-D
      # convolution cannot take; guessing (k, k) would differ from nn.Conv.
      k = int(self.kernel_size)
      raise ValueError(
          f'{type(self).__name__} is a 2-D convolution: kernel_size must be '
          f'a (height, width) pair, got the int kernel_size={k} (nn.Conv '
          f'reads an int as a 1-D kernel ({k},)); pass kernel_size=({k}, '
          f'{k}).')
    strides = (self.strides if isinstance(self.strides, numbers.Integral)
               else tuple(self.strides))
    if len(self.kernel_size) != 2 or len(self.pair_strides) != 2:
      raise ValueError(
          f'{type(self).__name__} is a 2-D convolution: kernel_size and '
          f'strides must be (height, width) pairs, got kernel_size='
          f'{tuple(self.kernel_size)}, strides={strides}.')
    if x.ndim != 4:
      raise ValueError(
          f'{type(self).__name__} takes a batch of images in NHWC layout, '
          f'(N, H, W, C), got an input of shape {tuple(x.shape)}; add the '
          f'missing axes (e.g. x[None] for one image, x[..., None] for one '
          f'channel).')
    if self.has_variable('params', 'kernel'):
      channels = self.get_variable('params', 'kernel').shape[2]
      if x.shape[-1] != channels:
        named = f' {self.name!r}' if self.name else ''
        raise ValueError(
            f'{type(self).__name__}{named} was initialised for {channels} '
            f'input channels, got an input of shape {tuple(x.shape)} '
            f'({x.shape[-1]} channels).')

  def _plain(self, x: jax.Array, kernel: jax.Array, train: bool,
             stat_groups: int, norm: Callable[[jax.Array], jax.Array] | None
             ) -> jax.Array:
    del train, stat_groups   # nothing gated
    y = ops.conv(x, kernel, self.pair_strides)
    return y if norm is None else norm(y)

  def _cdg_in_mode(self, x: jax.Array, kernel: jax.Array, train: bool,
                   stat_groups: int,
                   norm: Callable[[jax.Array], jax.Array] | None
                   ) -> jax.Array:
    """CDG in `gate_mode`: gated, every gate open, or the partner halves."""
    spec = self.gating
    check_gate_mode(self.gate_mode, spec)
    if self.gate_mode == 'gated' or self.is_initializing():
      y = self._cdg(x, kernel, train, stat_groups)
    elif self.gate_mode == 'open':
      y = ops.conv(x, kernel, self.pair_strides)
    else:
      n = x.shape[0] // 2
      if x.shape[0] != 2 * n:
        raise ValueError(f"gate_mode='partner' needs a batch of two equal "
                         f"halves (gated, open), got {x.shape[0]} samples.")
      # The gated half is one branch: its saliency statistics (and their
      # running averages) come from its own samples only, never from the
      # dense path's.
      gated = self._cdg(x[:n], kernel, train, 1)
      y = jnp.concatenate(
          [gated, ops.conv(x[n:], kernel, self.pair_strides)])
    return y if norm is None else norm(y)

  def _cdg(self, x: jax.Array, kernel: jax.Array, train: bool,
           stat_groups: int) -> jax.Array:
    """The CDG gated convolution (parameters, statistics, sown masks)."""
    spec = self.gating
    threshold = self.param('threshold',
                           nn.initializers.constant(spec.threshold_init),
                           (self.features,))
    use_running = spec.saliency_norm == 'batch' and not train
    if spec.saliency_norm == 'batch':
      running_mean = self.variable('batch_stats', 'saliency_mean', jnp.zeros,
                                   (self.features,))
      running_var = self.variable('batch_stats', 'saliency_var', jnp.ones,
                                  (self.features,))
    if spec.sparse_inference and not train and not self.is_initializing():
      y, mask, _ = sparse.sparse_gated_conv(
          x, kernel, threshold, groups=spec.groups, grouping=spec.grouping,
          strides=self.pair_strides, block=spec.block,
          epsilon=spec.epsilon, norm=spec.saliency_norm,
          running_mean=running_mean.value if use_running else None,
          running_var=running_var.value if use_running else None)
      self._sow(mask)
      return y
    if spec.sparse_training and train and not self.is_initializing():
      y, mask, (mean, var) = sparse_training.sparse_train_gated_conv(
          x, kernel, threshold, groups=spec.groups, grouping=spec.grouping,
          strides=self.pair_strides, block=spec.block, alpha=spec.alpha,
          epsilon=spec.epsilon, norm=spec.saliency_norm,
          num_groups=stat_groups, saliency_grad=spec.saliency_grad,
          surrogate=spec.surrogate,
          closed_tile_gradient=spec.closed_tile_gradient,
          sample_fraction=spec.closed_tile_sample,
          rng=self._closed_tile_rng())
    else:
      y, mask, (mean, var) = ops.gated_conv(
          x, kernel, threshold, groups=spec.groups, strides=self.pair_strides,
          block=spec.block, alpha=spec.alpha, epsilon=spec.epsilon,
          norm=spec.saliency_norm, num_groups=stat_groups,
          grouping=spec.grouping, saliency_grad=spec.saliency_grad,
          surrogate=spec.surrogate,
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
    self._sow(mask)
    return y

  def _closed_tile_rng(self) -> jax.Array | None:
    if self.gating.closed_tile_gradient != 'sampled':
      return None
    if not self.has_rng(CLOSED_TILE_RNG):
      raise ValueError(
          f"gating.closed_tile_gradient='sampled' samples closed tiles in "
          f"training: pass rngs={{'{CLOSED_TILE_RNG}': key}} to apply.")
    return self.make_rng(CLOSED_TILE_RNG)

  def _sow(self, mask: jax.Array) -> None:
    if not self.is_initializing():  # keep sown values out of `init`'s variables
      self.sow(DENSITY_COLLECTION, 'density', jnp.mean(mask, axis=(1, 2, 3)))
      self.sow(MASK_COLLECTION, 'mask', mask)

  def _channel_predictor(self, x: jax.Array, kernel: jax.Array, train: bool,
                         stat_groups: int,
                         norm: Callable[[jax.Array], jax.Array] | None
                         ) -> jax.Array:
    """FBS-style: dense conv times (top-k mask * saliency) per channel.

    The norm goes between the convolution and the channel scaling (FBS
    order; see `predictors.channel_predictor_conv`).
    """
    del train, stat_groups   # the same computation in both modes
    spec = self.gating
    c_in, c_out = x.shape[-1], self.features
    hidden = predictors.predictor_hidden(c_in)
    dense_init = nn.initializers.lecun_normal()
    w1 = self.param('predictor_w1', dense_init, (c_in, hidden))
    b1 = self.param('predictor_b1', nn.initializers.zeros, (hidden,))
    w2 = self.param('predictor_w2', dense_init, (hidden, c_out))
    # Both saliency forms start near 1 (2 * sigmoid(0); relu(1 + small)): the
    # layer starts as a masked dense convolution, and the two forms differ
    # only in their bound.
    b2_init = (nn.initializers.zeros if spec.predictor_saliency == 'bounded'
               else nn.initializers.ones)
    b2 = self.param('predictor_b2', b2_init, (c_out,))
    k = predictors.num_kept_channels(c_out, spec.density_target)
    y, mask, saliency = predictors.channel_predictor_conv(
        x, kernel, w1, b1, w2, b2, k=k, strides=self.pair_strides,
        normalize=norm, saliency_form=spec.predictor_saliency)
    self._sow(mask)
    if not self.is_initializing():
      self.sow(AUX_COLLECTION, 'saliency_l1',
               jnp.sum(jnp.abs(saliency), axis=-1))
    return y

  def _spatial_predictor(self, x: jax.Array, kernel: jax.Array, train: bool,
                         stat_groups: int,
                         norm: Callable[[jax.Array], jax.Array] | None
                         ) -> jax.Array:
    """Dual-gating-style: dense conv times a Gumbel-sigmoid block mask."""
    del stat_groups   # the mask is per sample
    spec = self.gating
    pred_kernel = self.param('predictor_kernel', nn.initializers.lecun_normal(),
                             (3, 3, x.shape[-1], 1))
    pred_bias = self.param('predictor_bias', nn.initializers.zeros, (1,))
    rng = None
    if train and not self.is_initializing():
      if not self.has_rng(GUMBEL_RNG):
        raise ValueError(
            f"gating.kind='spatial_predictor' samples Gumbel noise in training: "
            f"pass rngs={{'{GUMBEL_RNG}': key}} to apply (or train=False for "
            f"the deterministic gate).")
      rng = self.make_rng(GUMBEL_RNG)
    y, mask, _ = predictors.spatial_predictor_conv(
        x, kernel, pred_kernel, pred_bias, block=spec.block,
        temperature=spec.gumbel_temperature, rng=rng,
        strides=self.pair_strides)
    self._sow(mask)
    return y if norm is None else norm(y)

