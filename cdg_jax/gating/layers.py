"""The gating configuration and the Flax layer that holds a gated convolution.

`GatingSpec` is the validated, hashable form of the config's `gating` block --
the one place gating is configured. `GatedConv` holds the kernel, the
thresholds and the saliency running statistics and calls the pure ops in
`cdg_jax.gating`; with gating off it is a plain bias-free convolution with the
same kernel parameter, so dense and gated networks share one parameter tree
(minus the gate parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
SALIENCY_STATS = ('per_branch', 'joint')
BRANCHES = ('both', 'online', 'dense_partner')
# BatchNorm of the dense partner path (`GatingSpec.partner_norm`).
PARTNER_NORMS = ('shared', 'separate')
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
REGULARIZERS = ('threshold', 'threshold_sum', 'density', 'flops')

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


def _block_value(field: str, value: Any) -> tuple[int, int, int]:
  """A config's (bh, bw, bc) as ints, or ValueError naming `field`."""
  if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
      or len(value) != 3 or not all(isinstance(b, numbers.Integral)
                                    and not isinstance(b, bool) for b in value)):
    raise ValueError(f'{field}={value!r} must be three ints (bh, bw, bc), e.g. '
                     f'(4, 4, 0): a block of bh x bw positions and bc channels '
                     f'(0: all channels).')
  return tuple(int(b) for b in value)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'Unknown gating.{name}={value!r}; expected one of '
                     f'{", ".join(map(repr, allowed))}.')


@dataclasses.dataclass(frozen=True)
class GatingSpec:
  """Validated gating configuration; its defaults are the config's
  (`config_lib.gating_config()` is built from them).

  Every numeric field is range-checked (NaN included), and a field set away
  from its default where the chosen kind, regulariser form or execution
  does not read it is refused rather than ignored (`FIELD_READ_WHEN` states
  where each field is read).

  Attributes:
    kind: 'none' (dense network), 'cdg', or a predictor baseline:
      'channel_predictor' (global pool -> MLP -> top-k channels, FBS-style) or
      'spatial_predictor' (pooled input -> 3x3 conv -> Gumbel-sigmoid block
      mask, dual-gating-style). For the predictor kinds only `block` (bh, bw;
      spatial), `gumbel_temperature` (spatial), `layers`, `branches`,
      `weight` and `density_target` apply; their auxiliary loss is fixed by
      the kind (`regularizer` is not read): the L1 norm of the saliencies
      (channel) or `(density - density_target)^2` per layer (spatial), times
      `weight`. The channel predictor keeps ceil(density_target * C_out)
      channels per sample.
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
    saliency_stats: 'per_branch' or 'joint' batch statistics (train step).
    branches: which contrastive branches are gated.
      'both': every branch (the CDG paper: dual gating).
      'online': MoCo v2 and BYOL only: the online encoder is gated, the
      momentum/EMA target encoder is the dense network.
      'dense_partner': ours, after Krishna et al. (BMVC 2023, "Unifying
      Synergies between Self-supervised Learning and Dynamic
      Computation"), not the CDG paper's; SimCLR and SimSiam, CDG only. The
      encoder's weights are shared by two paths: view 1 goes through the
      gated encoder, view 2 through the same parameters with every gate
      open (the dense network), and the SSL loss is taken between the two
      (both directions, so gradients reach the weights through both paths).
      The gate regulariser, the gate densities and the FLOPs metric see the
      gated path only. Views are i.i.d. draws of the same augmentation, so
      the fixed assignment (view 1 gated) loses nothing. One training gives
      a gated and a dense network; both are evaluated. The dense-partner
      form of MoCo v2 and BYOL is 'online' (their dense target plays the
      partner's part).
    partner_norm: BatchNorm of the dense path under 'dense_partner':
      'shared' (one BatchNorm per layer, its batch statistics over both
      paths' samples) or 'separate' (the dense path has its own BatchNorm
      layers, statistics and affine parameters, in every residual block, and
      at the stem when the stem is gated; Krishna et al.'s separate_bn).
    predictor_saliency: the channel predictor's saliency, 'bounded'
      (2 * sigmoid, ours, the default) or 'relu' (FBS as published,
      unbounded); see `predictors.channel_saliency`.
    regularizer: form of the CDG gate regulariser, times `weight`:
      'density' -- sum_layers (density - density_target)^2, density the mean
      of the straight-through mask (sets the FLOPs operating point);
      'threshold' -- sum_layers mean_channels (delta - threshold_target)^2;
      'threshold_sum' -- sum over every threshold (delta -
      threshold_target)^2, channel gating's form (lambda 1e-4, target 1.0);
      'flops' -- one FLOPs budget for the network (ours to add; the form of
      DynConv, DGNet and Krishna et al., not known to be the paper's):
      (F_gated / F_dense - t)^2 over the gated layers' MACs as
      `cdg_jax.gating.flops` counts them, t the fraction those layers run when
      their MAC-weighted mean density is `density_target`; the layers share
      the budget (one may stay open if others close more), optionally with
      per-layer bounds (`budget_bounds_fraction`) and a late start
      (`budget_start_fraction`).
    weight: regulariser weight lambda.
    threshold_target: target of the threshold regularisers.
    density_target: target of the density regulariser, in (0, 1]; of the
      'flops' form, the gated layers' MAC-weighted mean density (the
      `gate_density` a run reports), so both forms at the same target cost
      about the same FLOPs.
    budget_bounds_fraction: 'flops' form: per-layer density bounds
      [p t, 1 - p (1 - t)] with p = cos^2(pi/2 * s / (f T)) at step s of T
      (DynConv): every layer held at the target at the start, the bounds
      relaxed to [0, 1] by this fraction f of training (counted from the
      budget's start); 0: no bounds. DynConv uses 1/3.
    budget_start_fraction: 'flops' form: the regulariser is off for this
      fraction of training (Learning Dynamic Routing starts its budget late),
      then ramps in over `budget_ramp_fraction`; 0: on from the first step.
    budget_ramp_fraction: 'flops' form: the regulariser's weight rises
      linearly from 0 to lambda over this fraction of training after its
      start; 0: at full weight at once.
    target_anneal_fraction: ours, not the paper's: over this fraction of the
      training steps the density regulariser's target falls linearly from
      1.0 (every gate open) to `density_target`; 0 keeps it fixed. Density
      form (and the spatial predictor) only.
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
  saliency_stats: str = 'per_branch'
  branches: str = 'both'
  partner_norm: str = 'shared'
  predictor_saliency: str = 'bounded'
  # The density-target form lands on the FLOPs it is given (0.25: about
  # 2.2x on CIFAR ResNet-18) at any run length; channel gating's threshold
  # form (lambda ~1e-4 toward 1.0) barely moves thresholds in a short run and
  # gave the same accuracy-vs-FLOPs curve at lambda 0.1 in our CIFAR runs;
  # the FLOPs budget scored below it on validation (experiments/README.md).
  regularizer: str = 'density'
  weight: float = 1.0
  threshold_target: float = 1.0
  density_target: float = 0.25
  target_anneal_fraction: float = 0.0
  budget_bounds_fraction: float = 0.0
  budget_start_fraction: float = 0.0
  budget_ramp_fraction: float = 0.0
  gumbel_temperature: float = 1.0
  execution: str = 'masked'
  closed_tile_gradient: str = 'none'
  closed_tile_sample: float = 0.0625

  def __post_init__(self):
    _one_of('kind', self.kind, GATING_KINDS)
    _one_of('execution', self.execution, EXECUTIONS)
    _one_of('saliency_norm', self.saliency_norm, SALIENCY_NORMS)
    _one_of('saliency_stats', self.saliency_stats, SALIENCY_STATS)
    _one_of('branches', self.branches, BRANCHES)
    _one_of('partner_norm', self.partner_norm, PARTNER_NORMS)
    _one_of('predictor_saliency', self.predictor_saliency,
            predictors.PREDICTOR_SALIENCIES)
    _one_of('regularizer', self.regularizer, REGULARIZERS)
    _one_of('grouping', self.grouping, ops.GROUPINGS)
    _one_of('surrogate', self.surrogate, ops.SURROGATES)
    _one_of('closed_tile_gradient', self.closed_tile_gradient,
            sparse_training.CLOSED_TILE_GRADIENTS)
    for role in self.layers:
      _one_of('layers entry', role, LAYER_ROLES)
    _check_ranges(self)
    _check_read(self)
    if self.branches == 'dense_partner' and self.kind != 'cdg':
      raise ValueError(
          f"gating.branches='dense_partner' is implemented for "
          f"gating.kind='cdg', got gating.kind={self.kind!r}.")
    if self.budget_start_fraction + self.budget_ramp_fraction > 1.0:
      raise ValueError(
          f'gating.budget_start_fraction + gating.budget_ramp_fraction = '
          f'{self.budget_start_fraction} + {self.budget_ramp_fraction} > 1: '
          f'the budget would never reach full weight.')
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

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None) -> 'GatingSpec':
    """Builds a spec from the config's `gating` block; unknown fields are errors."""
    if config is None:
      return cls(kind='none')
    values = dict(config.items()) if hasattr(config, 'items') else dict(config)
    # The config names the execution by its training half; inference is
    # the evaluation's choice (`with_sparse_inference`).
    known = {f.name for f in dataclasses.fields(cls)} - {'execution'} | {
        'sparse_training'}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown gating config field(s) {unknown}; known fields: '
                       f'{sorted(known)}.')
    if 'block' in values:
      values['block'] = _block_value('gating.block', values['block'])
    if 'stage_blocks' in values:
      stage_blocks = values['stage_blocks']
      if isinstance(stage_blocks, (str, bytes)) or not isinstance(
          stage_blocks, Sequence):
        raise ValueError(
            f'gating.stage_blocks={stage_blocks!r} must be a tuple of one '
            f'(bh, bw, bc) per ResNet stage, e.g. ((8, 8, 0), (8, 8, 0), '
            f'(4, 4, 0), (4, 4, 0)), or () to use gating.block everywhere.')
      values['stage_blocks'] = tuple(
          _block_value(f'gating.stage_blocks[{i}]', block)
          for i, block in enumerate(stage_blocks))
    if 'layers' in values:
      layers = values['layers']
      if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(',') if s.strip()]
      values['layers'] = tuple(layers)
    if values.pop('sparse_training', False):
      values['execution'] = 'sparse_training'
    return cls(**values)

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

  @property
  def has_dense_partner(self) -> bool:
    """Whether training runs a dense partner path (`branches`), so one run
    gives a gated and a dense network, both evaluated."""
    return self.branches == 'dense_partner'

  @property
  def separate_partner_norm(self) -> bool:
    """Whether the dense partner path has BatchNorm layers of its own."""
    return self.branches == 'dense_partner' and self.partner_norm == 'separate'


def _finite(value: Any) -> bool:
  return isinstance(value, numbers.Real) and math.isfinite(value)


def _uses_density_target(spec: GatingSpec) -> bool:
  return spec.kind in PREDICTOR_KINDS or (
      spec.kind == 'cdg' and spec.regularizer in ('density', 'flops'))


# The numeric fields' ranges, each (field, allowed in words, test, when the
# field is read): a value outside them (NaN included) is refused before any
# work. Fields not read by the spec's kind or form are not range-checked
# here; `_check_read` refuses them when they are set at all.
_RANGES = (
    ('groups', 'an integer >= 2', lambda v: isinstance(v, numbers.Integral)
     and v >= 2, lambda s: s.kind == 'cdg'),
    ('alpha', 'finite and > 0', lambda v: _finite(v) and v > 0,
     lambda s: s.kind == 'cdg'),
    ('epsilon', 'finite and > 0 (it keeps the saliency variance away from '
     '0)', lambda v: _finite(v) and v > 0, lambda s: s.kind == 'cdg'),
    ('saliency_momentum', 'in [0, 1)', lambda v: _finite(v) and 0 <= v < 1,
     lambda s: s.kind == 'cdg'),
    ('threshold_init', 'finite', _finite, lambda s: s.kind == 'cdg'),
    ('weight', 'finite and >= 0 (a negative weight rewards leaving the '
     'target)', lambda v: _finite(v) and v >= 0, lambda s: s.enabled),
    ('threshold_target', 'finite', _finite, lambda s: s.kind == 'cdg'),
    ('density_target', 'in (0, 1]', lambda v: _finite(v) and 0 < v <= 1,
     _uses_density_target),
    ('target_anneal_fraction', 'in [0, 1]', lambda v: _finite(v)
     and 0 <= v <= 1, lambda s: True),
    ('budget_bounds_fraction', 'in [0, 1] (a fraction of training)',
     lambda v: _finite(v) and 0 <= v <= 1, lambda s: True),
    ('budget_start_fraction', 'in [0, 1] (a fraction of training)',
     lambda v: _finite(v) and 0 <= v <= 1, lambda s: True),
    ('budget_ramp_fraction', 'in [0, 1] (a fraction of training)',
     lambda v: _finite(v) and 0 <= v <= 1, lambda s: True),
    ('gumbel_temperature', 'finite and > 0', lambda v: _finite(v) and v > 0,
     lambda s: s.kind == 'spatial_predictor'),
    ('closed_tile_sample', 'in (0, 1] (a fraction of the tiles)',
     lambda v: _finite(v) and 0 < v <= 1, lambda s: True),
)


def _check_ranges(spec: GatingSpec) -> None:
  for name, allowed, ok, read in _RANGES:
    value = getattr(spec, name)
    if read(spec) and not ok(value):
      raise ValueError(f'gating.{name} must be {allowed}, got {value!r}.')


# Where each gating field is read -- the rule stated once, here: (the
# fields the condition depends on, the condition in words, the condition).
# A field set away from its default where nothing reads it would be
# silently ignored, so it is refused before any work, naming the field, the
# value and what to change. Fields without an entry are read whenever
# gates are ('kind' itself, 'execution' with its own tile rule).
_CDG = (('kind',), "gating.kind='cdg'", lambda s: s.kind == 'cdg')
_GATED = (('kind',), "a gated kind (gating.kind other than 'none')",
          lambda s: s.enabled)
_DENSITY = (('kind', 'regularizer'), "gating.kind='channel_predictor' or "
            "'spatial_predictor', or gating.kind='cdg' with gating."
            "regularizer='density' or 'flops'", _uses_density_target)
_ANNEALED = (('kind', 'regularizer'), "gating.kind='spatial_predictor', or "
             "gating.kind='cdg' with gating.regularizer='density' or 'flops' "
             "(a density target to anneal)",
             lambda s: s.kind == 'spatial_predictor' or (
                 s.kind == 'cdg' and s.regularizer in ('density', 'flops')))
_BUDGET = (('kind', 'regularizer'), "the FLOPs budget (gating.kind='cdg' "
           "with gating.regularizer='flops')",
           lambda s: s.kind == 'cdg' and s.regularizer == 'flops')
FIELD_READ_WHEN = {
    'groups': _CDG, 'grouping': _CDG, 'stage_blocks': _CDG, 'alpha': _CDG,
    'surrogate': _CDG, 'threshold_init': _CDG, 'saliency_norm': _CDG,
    'saliency_grad': _CDG, 'saliency_momentum': _CDG, 'epsilon': _CDG,
    'saliency_stats': _CDG,
    # The predictor kinds' auxiliary loss is fixed by the kind.
    'regularizer': _CDG,
    'block': (('kind',), "gating.kind='cdg' or 'spatial_predictor' (the "
              "channel predictor gates whole channels)",
              lambda s: s.kind in ('cdg', 'spatial_predictor')),
    'layers': _GATED, 'branches': _GATED, 'weight': _GATED,
    'partner_norm': (('branches',), "gating.branches='dense_partner'",
                     lambda s: s.branches == 'dense_partner'),
    'predictor_saliency': (('kind',), "gating.kind='channel_predictor'",
                           lambda s: s.kind == 'channel_predictor'),
    'threshold_target': (('kind', 'regularizer'), "gating.kind='cdg' with "
                         "gating.regularizer='threshold' or 'threshold_sum'",
                         lambda s: s.kind == 'cdg' and s.regularizer in (
                             'threshold', 'threshold_sum')),
    'density_target': _DENSITY,
    'target_anneal_fraction': _ANNEALED,
    'budget_bounds_fraction': _BUDGET, 'budget_start_fraction': _BUDGET,
    'budget_ramp_fraction': _BUDGET,
    'gumbel_temperature': (('kind',), "gating.kind='spatial_predictor'",
                           lambda s: s.kind == 'spatial_predictor'),
    'closed_tile_gradient': (('sparse_training',), 'the sparse train step '
                             '(gating.sparse_training=True)',
                             lambda s: s.sparse_training),
    'closed_tile_sample': (('closed_tile_gradient',),
                           "gating.closed_tile_gradient='sampled'",
                           lambda s: s.closed_tile_gradient == 'sampled'),
}


def _check_read(spec: GatingSpec) -> None:
  """ValueError for a field set away from its default where it is not read."""
  defaults = {f.name: f.default for f in dataclasses.fields(GatingSpec)}
  for name, (depends, where, read) in FIELD_READ_WHEN.items():
    value = getattr(spec, name)
    if value == defaults[name] or read(spec):
      continue
    given = ', '.join(f'gating.{d}={getattr(spec, d)!r}' for d in depends)
    raise ValueError(
        f'gating.{name}={value!r} would be ignored: it is read only with '
        f'{where}, and this config has {given}. Remove the override (the '
        f'default is {defaults[name]!r}) or change '
        f'{" or ".join(f"gating.{d}" for d in depends)}.')


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
  strides: tuple[int, int] = (1, 1)
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

  def _check_input(self, x: jax.Array) -> None:
    """ValueError naming what a gated convolution takes, before any op."""
    if len(self.kernel_size) != 2 or len(self.strides) != 2:
      raise ValueError(
          f'{type(self).__name__} is a 2-D convolution: kernel_size and '
          f'strides must be (height, width) pairs, got kernel_size='
          f'{tuple(self.kernel_size)}, strides={tuple(self.strides)}.')
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
    y = ops.conv(x, kernel, self.strides)
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
      y = ops.conv(x, kernel, self.strides)
    else:
      n = x.shape[0] // 2
      if x.shape[0] != 2 * n:
        raise ValueError(f"gate_mode='partner' needs a batch of two equal "
                         f"halves (gated, open), got {x.shape[0]} samples.")
      # The gated half is one branch: its saliency statistics (and their
      # running averages) come from its own samples only, never from the
      # dense path's.
      gated = self._cdg(x[:n], kernel, train, 1)
      y = jnp.concatenate([gated, ops.conv(x[n:], kernel, self.strides)])
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
          strides=self.strides, block=spec.block, epsilon=spec.epsilon,
          norm=spec.saliency_norm,
          running_mean=running_mean.value if use_running else None,
          running_var=running_var.value if use_running else None)
      self._sow(mask)
      return y
    if spec.sparse_training and train and not self.is_initializing():
      y, mask, (mean, var) = sparse_training.sparse_train_gated_conv(
          x, kernel, threshold, groups=spec.groups, grouping=spec.grouping,
          strides=self.strides, block=spec.block, alpha=spec.alpha,
          epsilon=spec.epsilon, norm=spec.saliency_norm,
          num_groups=stat_groups, saliency_grad=spec.saliency_grad,
          surrogate=spec.surrogate,
          closed_tile_gradient=spec.closed_tile_gradient,
          sample_fraction=spec.closed_tile_sample,
          rng=self._closed_tile_rng())
    else:
      y, mask, (mean, var) = ops.gated_conv(
          x, kernel, threshold, groups=spec.groups, strides=self.strides,
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
        x, kernel, w1, b1, w2, b2, k=k, strides=self.strides, normalize=norm,
        saliency_form=spec.predictor_saliency)
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
        temperature=spec.gumbel_temperature, rng=rng, strides=self.strides)
    self._sow(mask)
    return y if norm is None else norm(y)

