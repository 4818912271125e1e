"""The gated layer's spec and the Flax layer that holds a gated convolution.

`GatingSpec` is the validated, hashable description of what a gated layer
computes: every field is read by `GatedConv` (where in a network the gated
layers sit is the network's business: the ResNet's is
`cdg_jax.ssl.models.ResNetGating`). `GatedConv` takes `flax.linen.Conv`'s
options (padding, bias, dtypes, precision) and holds the kernel, the
thresholds and the saliency running statistics, calling the pure ops in
`cdg_jax.gating.ops`; with gating off (or every gate open) it computes what
`nn.Conv` with the same options computes, with the same kernel parameter, so
dense and gated networks share one parameter tree (minus the gate
parameters).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
from flax.linen import linear as flax_linear
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
SALIENCY_NORMS = ('batch', 'sample')
# How a gated layer executes (`GatedConv.gate_mode`): 'gated' (the masks as
# learned), 'open' (every gate open: the dense network with the same weights)
# or 'partner' (the training program's dense-partner forward: the first half
# of the batch gated, the second half with every gate open).
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
  saliency and how it executes. Every field is read by `GatedConv` (for the
  kinds named with it); where a network's gated layers sit is the network's
  own setting (the program's ResNet: `cdg_jax.ssl.models.ResNetGating`, a
  GatingSpec plus `layers` and `stage_blocks`). The program makes it from
  the config's `gating` block with `config_lib.read_gating` (the fields are
  the config's of the same names; `execution` is read from
  `gating.sparse_training` and `eval.sparse_inference`); the gates' loss is
  `regularizers.RegularizerSpec`, the wiring of the SSL branches
  `pretraining.BranchSpec`. Every numeric field is range-checked (NaN
  included).

  Attributes:
    kind: 'none' (dense network), 'cdg', or a predictor baseline:
      'channel_predictor' (global pool -> MLP -> top-k channels, FBS-style) or
      'spatial_predictor' (pooled input -> 3x3 conv -> Gumbel-sigmoid block
      mask, dual-gating-style). For the predictor kinds only `block` (bh, bw;
      spatial), `gumbel_temperature` (spatial), `predictor_saliency` and
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
      map is clamped to the map (see `gating.effective_block`); otherwise it
      must divide the layer's output map (whose size the layer's padding
      and strides set).
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
      'masked' needs CDG with tile-structured gates (`block` (bh, bw, 0),
      and so every block a network uses) and SAME padding (the tiles'
      windows are cut from the SAME-padded input). The outputs, masks and
      every gradient but the gate's at closed tiles are the masked form's.
    closed_tile_gradient: under sparse training, the gate's task-loss
      gradient at closed tiles: 'none' (only the regulariser moves their
      thresholds) or 'sampled' (the conditional path also computed, forward
      only, on a uniform sample of the closed tiles, their gate gradient
      scaled by the inverse sampling rate: an unbiased estimate; random
      stream `CLOSED_TILE_RNG`).
    closed_tile_sample: the 'sampled' form's sample, as a fraction of all
      tiles of the batch (its static capacity; the extra forward cost).
    threshold_init: initial value of every threshold delta.
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
  alpha: float = 2.0
  surrogate: str = 'sigmoid'
  threshold_init: float = 0.0
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
    self._check_placement()
    for name, allowed, ok, read in _RANGES:
      value = getattr(self, name)
      if read(self) and not ok(value):
        raise ValueError(f'gating.{name} must be {allowed}, got {value!r}.')
    if self.kind != 'none':
      for name, block in self._named_blocks():
        ops.check_block_shape(block, f'gating.{name}')
    if self.execution != 'masked' and (
        self.kind != 'cdg' or any(int(b[2]) != 0 for b in self.blocks)):
      what = ('gating.sparse_training' if self.sparse_training
              else 'Sparse inference')
      raise ValueError(
          f"{what} skips closed tiles of CDG gates, which needs "
          f"gating.kind='cdg' and gating.block=(bh, bw, 0)"
          f"{self._blocks_described()}.")

  # What a network's spec adds (`cdg_jax.ssl.models.ResNetGating`): its own
  # fields' checks, the blocks they set, and how an error names them.
  def _check_placement(self) -> None:
    """Checks of the fields a subclass adds; none here."""

  def _named_blocks(self) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """Every gate granularity this spec sets, with its config field."""
    return (('block', self.block),)

  def _blocks_described(self) -> str:
    """The end of the tile-execution error: what is needed and what is set."""
    return f'; got gating.kind={self.kind!r}, gating.block={self.block}'

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
    """Every gate granularity the gated layers use: `block`."""
    return (self.block,)

  @property
  def layer_spec(self) -> 'GatingSpec':
    """What one `GatedConv` reads: this spec, without any field a subclass
    adds (a network's placement of its gated layers)."""
    if type(self) is GatingSpec:
      return self
    return GatingSpec(**{f.name: getattr(self, f.name)
                         for f in dataclasses.fields(GatingSpec)})


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


# Paddings of nn.Conv that pad with the input's own values (applied to the
# input first, then a VALID convolution, as nn.Conv does) and the jnp.pad
# mode of each.
WRAPPING_PADDINGS = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}
_PADDINGS_TAKEN = ("'SAME', 'VALID', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', an "
                   "int, or one int or (low, high) pair per spatial "
                   "dimension")
_NOT_IMPLEMENTED = ('the gated convolution (its base and conditional paths, '
                    "its formulations 'patches' and 'shifted_dots' and the "
                    "block-sparse executors' tile windows, "
                    'cdg_jax.gating.tiling)')
# nn.Conv's options that GatedConv takes at their defaults only: (default,
# whether a value is the default, why another is refused).
_REFUSED_OPTIONS = {
    'input_dilation': (1, lambda v: _all_ones(v), (
        f'an input dilation (a transposed convolution) is not implemented '
        f'by {_NOT_IMPLEMENTED}')),
    'kernel_dilation': (1, lambda v: _all_ones(v), (
        f'a dilated kernel is not implemented by {_NOT_IMPLEMENTED}')),
    'feature_group_count': (1, lambda v: v == 1, (
        'the gated convolution splits the input channels into '
        'gating.groups for its base and conditional paths; a grouped '
        "convolution's own channel groups are not implemented")),
    'mask': (None, lambda v: v is None, (
        'a fixed mask on the kernel is not implemented; give the kernel its '
        'zeros through kernel_init and keep them out of training')),
}


def _all_ones(value: Any) -> bool:
  """Whether a dilation (None, an int or one per dimension) is 1 everywhere."""
  if value is None:
    return True
  if isinstance(value, numbers.Integral):
    return int(value) == 1
  return all(isinstance(v, numbers.Integral) and int(v) == 1 for v in value)


class GatedConv(nn.Module):
  """`flax.linen.Conv` (2-D, NHWC), CDG-gated when `gating` is given.

  A peer of `nn.Conv`: with `gating=None`, or with every CDG gate open
  (`gate_mode='open'`), it computes what `nn.Conv` with the same options
  and the same parameters computes, bit for bit under the default
  `formulation` (XLA's convolution). It takes nn.Conv's `padding`,
  `use_bias`/`bias_init`, `dtype`, `param_dtype` and `precision`, and
  refuses, with the reason, `input_dilation`, `kernel_dilation` and
  `feature_group_count` other than 1 and a `mask`. Differences from nn.Conv:
  `gating` is the fourth positional field (pass `padding` by name);
  `use_bias` defaults to False (the ResNet convention: a BatchNorm follows)
  and `kernel_init` to Kaiming-normal fan-out; `dtype` defaults to float32
  (None infers it from the input and parameters, as nn.Conv); the kernel
  must be 2-D, as (kh, kw) (nn.Conv reads an int as a 1-D kernel), and the
  input one batch axis (N, H, W, C).

  Gated (see `GatingSpec`): Y = Y_base + d * Y_cond (+ bias), both paths
  convolved with the layer's padding, strides, formulation and precision.
  The bias is added to the gated output, never gated: a closed gate leaves
  Y_base + bias, and the saliency (hence the gate and the running
  statistics) is computed from Y_base without it, so the decision does not
  depend on the bias (a per-channel constant the normalisation would remove
  anyway, up to rounding; the running mean would also have to track it).
  The predictor baselines multiply the convolution's output, bias
  included, by their mask: the spatial predictor gives (conv + bias) *
  mask; the channel predictor adds the bias before `norm`, which it applies
  before scaling the channels (FBS order). Block-sparse execution
  (`GatingSpec.execution` other than 'masked') needs SAME padding, or pads
  equal to SAME's for the input (its tile windows are cut from the
  SAME-padded input); any other padding is refused with it.

  Parameters: `kernel` (kh, kw, C_in, C_out) always and `bias` (C_out,)
  with `use_bias`, both in `param_dtype`; `threshold` (C_out,) when
  CDG-gated. Batch stats (CDG, 'batch' saliency norm): `saliency_mean`,
  `saliency_var` (C_out,). Predictor baselines (see `GatingSpec.kind`) add,
  next to the shared `kernel`: 'channel_predictor' `predictor_w1` (C_in,
  hidden), `predictor_b1` (hidden,), `predictor_w2` (hidden, C_out),
  `predictor_b2` (C_out,), hidden = C_in // 4; 'spatial_predictor'
  `predictor_kernel` (3, 3, C_in, 1), `predictor_bias` (1,). The gate's own
  parameters and statistics are float32 whatever `param_dtype` (the gate
  decision is taken in float32). The spatial predictor needs the 'gumbel'
  RNG stream when `train` is True. Sows each sample's gate density
  (fraction of open (position, channel) gates, shape (N,)) into the
  'gating' collection, and the mask itself into 'gate_masks' when that
  collection is mutable.

  Attributes:
    features: C_out.
    kernel_size: (kh, kw).
    strides: (sh, sw), or an int s for (s, s), as for nn.Conv (None: 1).
    gating: what the gate computes (`GatingSpec`, whose every field this
      layer reads); None: the plain convolution.
    kernel_init: the kernel's initialiser.
    dtype: the compute dtype of the convolutions (None: inferred from the
      input and parameters, as nn.Conv); the gate decision is float32
      whatever this is (`ops.saliency_gate`).
    gate_mode: the training program's switch ('gated', the default, for
      every other use): 'open' (every CDG gate open: Y_base + Y_cond
      computed as the one dense convolution) or 'partner' (the program's
      dense-partner forward: first half of the batch gated, second half
      open); see GATE_MODES. The parameters and statistics are the same in
      every mode.
    padding: as nn.Conv's: 'SAME' (default), 'VALID', 'SAME_LOWER',
      'CIRCULAR', 'REFLECT', an int, or one int or (low, high) pair per
      spatial dimension (pads >= 0).
    use_bias: add a (C_out,) bias (see above for where).
    bias_init: the bias's initialiser (zeros, as nn.Conv).
    param_dtype: dtype of the kernel and the bias (float32).
    precision: `jax.lax.Precision`-like, of every convolution of the layer
      (and of the matrix products that compute them under 'patches' or
      'shifted_dots').
    formulation: how the convolutions are computed (`ops.conv`): None (the
      default) is XLA's convolution, what nn.Conv computes; 'xla',
      'patches' (im2col), 'shifted_dots', or 'auto' (`ops.auto_formulation`'s
      per-shape choice: 'patches' for some shapes on CPU, where it was
      faster; XLA's elsewhere). They differ in float rounding only. The
      training program's ResNet passes `ops.program_formulation()`.
    input_dilation, kernel_dilation, feature_group_count, mask: nn.Conv's;
      taken at their defaults only (1, 1, 1, None), anything else refused
      with the reason.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  # An int s means (s, s), as for nn.Conv (`pair_strides`).
  strides: tuple[int, int] | int = (1, 1)
  gating: GatingSpec | None = None
  kernel_init: Any = dataclasses.field(default_factory=he_normal_fan_out)
  dtype: Any = jnp.float32
  gate_mode: str = 'gated'
  padding: Any = 'SAME'
  use_bias: bool = False
  bias_init: Any = nn.initializers.zeros_init()
  param_dtype: Any = jnp.float32
  precision: Any = None
  formulation: str | None = None
  input_dilation: Any = 1
  kernel_dilation: Any = 1
  feature_group_count: int = 1
  mask: Any = None

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
      stat_groups: the training program's: number of equal consecutive
        groups of the batch (e.g. the two views) that get separate saliency
        statistics in training (1: the whole batch).
      norm: the training program's: the BatchNorm (owned by the caller) that
        follows this convolution. Applied to the output, except for
        'channel_predictor', which applies it to the dense convolution and
        scales the channels after it (FBS order; see
        `predictors.channel_predictor_conv`). None: the layer's output as
        it is (call your normalisation after the layer).

    Returns:
      (N, H_out, W_out, features) output.
    """
    self._check_input(x)
    self._check_options()
    input_shape = x.shape
    x, padding = self._padded(x)
    self._check_execution(input_shape, padding)
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    dtype = nn.dtypes.canonicalize_dtype(x, kernel, bias, dtype=self.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if bias is not None:
      bias = bias.astype(dtype)
    conv = dict(strides=self.pair_strides, padding=padding,
                formulation=self.formulation, precision=self.precision)
    kind = 'none' if self.gating is None else self.gating.kind
    forward = getattr(self, FORWARD_OF_KIND[kind])
    return forward(x, kernel, bias, conv, train, stat_groups, norm)

  @property
  def pair_strides(self) -> tuple[int, int]:
    """`strides` as an (sh, sw) pair; an int s is (s, s), as in nn.Conv."""
    if self.strides is None:
      return (1, 1)
    if isinstance(self.strides, numbers.Integral):
      return (int(self.strides),) * 2
    return tuple(self.strides)

  def _named(self) -> str:
    return f'{type(self).__name__}' + (f' {self.name!r}' if self.name else '')

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
               or self.strides is None else tuple(self.strides))
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

  def _check_options(self) -> None:
    """ValueError (TypeError for a `gating` that is no spec) naming an
    option this layer does not take, and why, before any op."""
    for option, (default, is_default, why) in _REFUSED_OPTIONS.items():
      value = getattr(self, option)
      if not is_default(value):
        shown = (f'<array of shape {tuple(value.shape)}>'
                 if hasattr(value, 'shape') else repr(value))
        raise ValueError(
            f'{self._named()}: {option}={shown} is not supported: {why}. '
            f'Leave {option} at {default!r}, or use flax.linen.Conv for an '
            f'ungated convolution with it.')
    ops.check_formulation(self.formulation, f'{self._named()}.formulation')
    spec = self.gating
    if spec is None:
      return
    if not isinstance(spec, GatingSpec):
      raise TypeError(
          f'{self._named()}: gating must be a GatingSpec or None, got '
          f'{type(spec).__name__}.')
    extra = [f.name for f in dataclasses.fields(spec)
             if f.name not in _SPEC_FIELDS]
    if extra:
      raise ValueError(
          f'{self._named()} reads a GatingSpec; this '
          f'{type(spec).__name__} also sets {", ".join(extra)}, which place '
          f'gated layers in a network and which one layer would ignore. '
          f'Pass its layer_spec (the fields a layer reads), e.g. '
          f'gating=spec.layer_spec.')
    check_gate_mode(self.gate_mode, spec)

  def _padded(self, x: jax.Array
              ) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """(input, zero padding): the input padded with its own values first for
    'CIRCULAR' and 'REFLECT' (then no zero padding), as nn.Conv does, and
    the (low, high) zero padding of H and W, 'SAME'/'VALID' resolved as
    XLA resolves them."""
    padding = self.padding
    if isinstance(padding, str) and padding in WRAPPING_PADDINGS:
      pads = [((k - 1) // 2, k // 2) for k in self.kernel_size]
      x = jnp.pad(x, [(0, 0), *pads, (0, 0)],
                  mode=WRAPPING_PADDINGS[padding])
      return x, ((0, 0), (0, 0))
    if isinstance(padding, str):
      if padding.upper() not in ('SAME', 'VALID', 'SAME_LOWER'):
        causal = ("'CAUSAL' is nn.Conv's padding of 1-D convolutions; "
                  if padding == 'CAUSAL' else '')
        raise ValueError(
            f'{self._named()}: padding={padding!r} is not a padding of a '
            f'2-D convolution ({causal}it takes {_PADDINGS_TAKEN}).')
      pads = jax.lax.padtype_to_pads(x.shape[1:3], self.kernel_size,
                                     self.pair_strides, padding)
    else:
      try:
        pads = flax_linear.canonicalize_padding(padding, 2)
      except ValueError:
        pads = None
      if pads is None or not all(
          isinstance(q, numbers.Integral) for pair in pads for q in pair):
        raise ValueError(
            f'{self._named()}: padding={padding!r} is not a padding of a '
            f'2-D convolution (it takes {_PADDINGS_TAKEN}).') from None
    pads = tuple((int(low), int(high)) for low, high in pads)
    if any(q < 0 for pair in pads for q in pair):
      raise ValueError(
          f'{self._named()}: padding={padding!r} has a negative pad, which '
          f'crops the input; the gated convolution pads only (pads >= 0): '
          f'crop the input before the layer.')
    return x, pads

  def _check_execution(self, input_shape: tuple[int, ...],
                       padding: tuple[tuple[int, int], ...]) -> None:
    """ValueError unless block-sparse execution, if asked for, can honour
    the padding of an input of `input_shape` (before any padding): its tile
    windows are cut from the SAME-padded input."""
    spec = self.gating
    if spec is None or not spec.enabled or spec.execution == 'masked':
      return
    same = tuple(tuple(p) for p in jax.lax.padtype_to_pads(
        input_shape[1:3], self.kernel_size, self.pair_strides, 'SAME'))
    wrapping = isinstance(self.padding, str) and (
        self.padding in WRAPPING_PADDINGS)
    if padding == same and not wrapping:
      return
    detail = ("it pads with the input's own values, the windows with zeros"
              if wrapping else
              f'it pads (H, W) by {padding}, SAME by {same}')
    raise ValueError(
        f'{self._named()}: gating.execution={spec.execution!r} skips closed '
        f'tiles by convolving windows of the SAME-padded input '
        f'(cdg_jax.gating.tiling), which cannot honour padding='
        f'{self.padding!r}: {detail} for this {input_shape[1]}x'
        f'{input_shape[2]} input. Use padding=\'SAME\' (or pads equal to it) or '
        f'gating.execution=\'masked\'.')

  @staticmethod
  def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """y + bias over the channels, as nn.Conv adds it."""
    if bias is None:
      return y
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)

  def _plain(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
             conv: dict[str, Any], train: bool, stat_groups: int,
             norm: Callable[[jax.Array], jax.Array] | None) -> jax.Array:
    del train, stat_groups   # nothing gated
    y = self._add_bias(ops.conv(x, kernel, **conv), bias)
    return y if norm is None else norm(y)

  def _cdg_in_mode(self, x: jax.Array, kernel: jax.Array,
                   bias: jax.Array | None, conv: dict[str, Any], train: bool,
                   stat_groups: int,
                   norm: Callable[[jax.Array], jax.Array] | None
                   ) -> jax.Array:
    """CDG in `gate_mode`: gated, every gate open, or the partner halves."""
    if self.gate_mode == 'gated' or self.is_initializing():
      y = self._cdg(x, kernel, conv, train, stat_groups)
    elif self.gate_mode == 'open':
      y = ops.conv(x, kernel, **conv)
    else:
      n = x.shape[0] // 2
      if x.shape[0] != 2 * n:
        raise ValueError(f"gate_mode='partner' needs a batch of two equal "
                         f"halves (gated, open), got {x.shape[0]} samples.")
      # The gated half is one branch: its saliency statistics (and their
      # running averages) come from its own samples only, never from the
      # dense path's.
      gated = self._cdg(x[:n], kernel, conv, train, 1)
      y = jnp.concatenate([gated, ops.conv(x[n:], kernel, **conv)])
    # After the gate: a closed gate leaves Y_base + bias (see the class).
    y = self._add_bias(y, bias)
    return y if norm is None else norm(y)

  def _cdg(self, x: jax.Array, kernel: jax.Array, conv: dict[str, Any],
           train: bool, stat_groups: int) -> jax.Array:
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
    # The sparse executors pad as SAME, which `_check_execution` made sure
    # the layer's padding is.
    tiles_conv = dict(strides=conv['strides'],
                      formulation=conv['formulation'],
                      precision=conv['precision'])
    if spec.sparse_inference and not train and not self.is_initializing():
      y, mask, _ = sparse.sparse_gated_conv(
          x, kernel, threshold, groups=spec.groups, grouping=spec.grouping,
          block=spec.block, epsilon=spec.epsilon, norm=spec.saliency_norm,
          running_mean=running_mean.value if use_running else None,
          running_var=running_var.value if use_running else None,
          **tiles_conv)
      self._sow(mask)
      return y
    if spec.sparse_training and train and not self.is_initializing():
      y, mask, (mean, var) = sparse_training.sparse_train_gated_conv(
          x, kernel, threshold, groups=spec.groups, grouping=spec.grouping,
          block=spec.block, alpha=spec.alpha,
          epsilon=spec.epsilon, norm=spec.saliency_norm,
          num_groups=stat_groups, saliency_grad=spec.saliency_grad,
          surrogate=spec.surrogate,
          closed_tile_gradient=spec.closed_tile_gradient,
          sample_fraction=spec.closed_tile_sample,
          rng=self._closed_tile_rng(), **tiles_conv)
    else:
      y, mask, (mean, var) = ops.gated_conv(
          x, kernel, threshold, groups=spec.groups,
          block=spec.block, alpha=spec.alpha, epsilon=spec.epsilon,
          norm=spec.saliency_norm, num_groups=stat_groups,
          grouping=spec.grouping, saliency_grad=spec.saliency_grad,
          surrogate=spec.surrogate,
          running_mean=running_mean.value if use_running else None,
          running_var=running_var.value if use_running else None, **conv)
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

  def _channel_predictor(self, x: jax.Array, kernel: jax.Array,
                         bias: jax.Array | None, conv: dict[str, Any],
                         train: bool, stat_groups: int,
                         norm: Callable[[jax.Array], jax.Array] | None
                         ) -> jax.Array:
    """FBS-style: dense conv times (top-k mask * saliency) per channel.

    The norm goes between the convolution and the channel scaling (FBS
    order; see `predictors.channel_predictor_conv`); the bias before the
    norm.
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
    normalize = norm
    if bias is not None:
      def normalize(y):
        y = self._add_bias(y, bias)
        return y if norm is None else norm(y)
    # The predictor's ops take no formulation or precision: given here.
    with ops.conv_defaults(conv['formulation'], conv['precision']):
      y, mask, saliency = predictors.channel_predictor_conv(
          x, kernel, w1, b1, w2, b2, k=k, strides=conv['strides'],
          padding=conv['padding'], normalize=normalize,
          saliency_form=spec.predictor_saliency)
    self._sow(mask)
    if not self.is_initializing():
      self.sow(AUX_COLLECTION, 'saliency_l1',
               jnp.sum(jnp.abs(saliency), axis=-1))
    return y

  def _spatial_predictor(self, x: jax.Array, kernel: jax.Array,
                         bias: jax.Array | None, conv: dict[str, Any],
                         train: bool, stat_groups: int,
                         norm: Callable[[jax.Array], jax.Array] | None
                         ) -> jax.Array:
    """Dual-gating-style: dense conv (+ bias) times a Gumbel-sigmoid block
    mask."""
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
    # The predictor's ops take no formulation or precision: given here.
    with ops.conv_defaults(conv['formulation'], conv['precision']):
      y, mask, _ = predictors.spatial_predictor_conv(
          x, kernel, pred_kernel, pred_bias, block=spec.block,
          temperature=spec.gumbel_temperature, rng=rng,
          strides=conv['strides'], padding=conv['padding'])
    if bias is not None:
      # (conv + bias) * mask, the mask being 0 or 1.
      y = y + bias * mask.astype(y.dtype)
    self._sow(mask)
    return y if norm is None else norm(y)


# The fields a `GatedConv` reads: a spec with more (a network's placement of
# its gated layers) is refused by the layer.
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(GatingSpec))
