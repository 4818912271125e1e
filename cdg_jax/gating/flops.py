r"""Analytic FLOPs of (gated) networks from traced shapes and measured masks.

Dense multiply-accumulates (MACs) per example come from the shapes traced in a
forward pass. A convolution costs `C_in * C_out` times the number of
(output position, kernel tap) pairs that fall inside the input: taps on the
zero padding are not counted, which is what XLA's cost analysis counts (it
agrees with this module to 0.4% on CIFAR ResNet-18). The conventional count of
the literature, `kh * kw * C_in * C_out * H_out * W_out` (0.56 GMACs for CIFAR
ResNet-18), includes them; it is reported too as `padded_macs`. The same
rule holds for dilated convolutions: a kernel dilation spreads the taps (more
of them land on the padding), an input dilation's inserted zeros are not
counted either; a 'CIRCULAR' or 'REFLECT' padding reads real (wrapped or
mirrored) values, so every tap counts. A dense layer costs `C_in * C_out`.
A CDG-gated convolution costs (docs/method.md [flops])

    dense_macs * (1/G + (G - 1)/G * density)

where `density` is the fraction of open (position, channel) gates measured from
the masks of a forward pass (the 'gating' collection sown by gated layers).
A predictor-gated convolution (the baselines 'channel_predictor' and
'spatial_predictor') computes only its open outputs plus its predictor:

    dense_macs * density + predictor_macs

with predictor_macs = C_in * hidden + hidden * C_out for the channel
predictor's two-layer MLP on the pooled input (hidden = C_in // 4), and the
3x3 conv C_in -> 1 on the (H_out/bh, W_out/bw) pooled grid for the spatial
predictor (padding taps excluded, as for every conv here). Pooling (additions)
and biases are not counted.
Convolutions form the backbone; dense layers are heads, reported separately.
The reduction is backbone dense MACs over backbone effective MACs.

The command line that prints these tables (for a config's random network or
a trained run's backbone) is `cdg_jax.flops_table`; this module is the pure
counting and imports no evaluation code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdg_jax.gating import predictors
from cdg_jax.gating.layers import CLOSED_TILE_RNG
from cdg_jax.gating.layers import DENSITY_COLLECTION
from cdg_jax.gating.layers import GatedConv
from cdg_jax.gating.layers import GUMBEL_RNG


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Static cost of one layer, per example.

  Attributes:
    name: module path, e.g. 'stage1_block0/conv1'.
    kind: 'conv' or 'dense'.
    part: 'backbone' (convolutions) or 'head' (dense layers).
    macs: dense multiply-accumulates per example, padding taps excluded.
    groups: G of a CDG-gated layer; 0 otherwise.
    output_shape: per-example output shape.
    padded_macs: the conventional count, padding taps included.
    gating_kind: 'none', 'cdg', 'channel_predictor' or 'spatial_predictor';
      '' (the default) means 'cdg' when groups > 0, else 'none'.
    predictor_macs: MACs of a predictor baseline's own predictor.
  """
  name: str
  kind: str
  part: str
  macs: int
  groups: int
  output_shape: tuple[int, ...]
  padded_macs: int
  gating_kind: str = ''
  predictor_macs: int = 0

  def __post_init__(self):
    if not self.gating_kind:
      object.__setattr__(self, 'gating_kind',
                         'cdg' if self.groups > 0 else 'none')

  @property
  def gated(self) -> bool:
    return self.gating_kind != 'none'

  def effective_macs(self, density=None):
    """MACs given the layer's gate density (ignored for ungated layers)."""
    if not self.gated:
      return self.macs
    if density is None:
      raise ValueError(f'Layer {self.name} is gated but no density was given.')
    if self.gating_kind == 'cdg':
      g = self.groups
      return self.macs * (1.0 / g + (g - 1.0) / g * density)
    return self.macs * density + self.predictor_macs


def _taps_inside(in_size: int, out_size: int, kernel: int, stride: int,
                 pad_before: int, kernel_dilation: int = 1,
                 input_dilation: int = 1) -> int:
  """Number of (output index, kernel index) pairs that read a real input row.

  Tap `r` of output `o` reads row `o * stride - pad_before + r *
  kernel_dilation` of the input dilated by `input_dilation` (its rows at the
  multiples of it, zeros between): a pair counts when that row is a real
  one, neither zero padding nor an inserted zero.
  """
  rows = (np.arange(out_size)[:, None] * stride - pad_before
          + np.arange(kernel) * kernel_dilation)
  dilated_size = (in_size - 1) * input_dilation + 1
  inside = (rows >= 0) & (rows < dilated_size) & (rows % input_dilation == 0)
  return int(np.sum(inside))


# Paddings of `nn.Conv` that read real input values (the input wrapped
# around or mirrored), not zeros: every tap counts.
_WRAPPING_PADDINGS = ('CIRCULAR', 'REFLECT')
# The string paddings `jax.lax.padtype_to_pads` resolves to zero padding.
_ZERO_PADDINGS = ('SAME', 'SAME_LOWER', 'VALID')


def _as_tuple(value, rank: int, name: str) -> tuple[int, ...]:
  """An int or None (1) broadcast to `rank` dimensions, as nn.Conv does."""
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * rank
  value = tuple(value)
  if len(value) != rank:
    raise ValueError(f'{name}={value} has {len(value)} entries for a '
                     f'{rank}-D convolution; give one per spatial dimension '
                     f'(or one int for all).')
  return value


def _zero_pads(padding, in_spatial: Sequence[int], kernel_size, strides,
               kernel_dilation, input_dilation, layer: str
               ) -> list[tuple[int, int]] | None:
  """The (before, after) zero padding of each spatial dimension, as nn.Conv
  applies it; None for a padding that reads real values (every tap counts).

  Raises:
    ValueError naming the layer and the padding if it is none of nn.Conv's.
  """
  rank = len(kernel_size)
  if isinstance(padding, str):
    if padding in _WRAPPING_PADDINGS and all(d == 1 for d in input_dilation):
      return None
    if padding == 'CAUSAL' and rank == 1:
      return [(kernel_dilation[0] * (kernel_size[0] - 1), 0)]
    # lax reads these in any case ('same' too); nn.Conv's own in capitals.
    if (padding.upper() in _ZERO_PADDINGS
        and all(d == 1 for d in input_dilation)):
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
      return list(jax.lax.padtype_to_pads(in_spatial, dilated, strides,
                                          padding))
  elif isinstance(padding, int):
    return [(padding, padding)] * rank
  elif isinstance(padding, Sequence) and len(padding) == rank:
    pads = []
    for p in padding:
      if isinstance(p, int):
        pads.append((p, p))
      elif (isinstance(p, Sequence) and len(p) == 2
            and all(isinstance(q, int) for q in p)):
        pads.append((p[0], p[1]))
    if len(pads) == rank:
      return pads
  if isinstance(padding, str) and (padding.upper() in _ZERO_PADDINGS
                                   or padding in _WRAPPING_PADDINGS):
    raise ValueError(
        f'layer_costs cannot count {layer}: nn.Conv cannot apply '
        f'padding={padding!r} with input_dilation={tuple(input_dilation)} '
        f'(lax takes a string padding only without input dilation); give '
        f'explicit (low, high) pairs, one per spatial dimension.')
  names = ', '.join(map(repr, _ZERO_PADDINGS + _WRAPPING_PADDINGS
                        + (('CAUSAL',) if rank == 1 else ())))
  raise ValueError(
      f'layer_costs cannot count {layer}: padding={padding!r} is not a '
      f'padding nn.Conv applies to a {rank}-D convolution; give one of '
      f'{names}, an int, or one int or (low, high) pair per spatial '
      f'dimension.')


def _conv_macs(input_shape, output_shape, kernel_size, strides, padding,
               feature_group_count=1, kernel_dilation=None,
               input_dilation=None, layer: str = 'the convolution'
               ) -> tuple[int, int]:
  """(MACs without padding taps, conventional MACs) of one example's conv.

  `input_shape` is the batched input (N, *spatial, C_in), `output_shape` one
  example's output (*spatial, C_out); dilations as nn.Conv takes them.
  """
  in_spatial, in_channels = input_shape[1:-1], input_shape[-1]
  out_spatial, out_channels = output_shape[:-1], output_shape[-1]
  rank = len(kernel_size)
  kernel_dilation = _as_tuple(kernel_dilation, rank, 'kernel_dilation')
  input_dilation = _as_tuple(input_dilation, rank, 'input_dilation')
  pads = _zero_pads(padding, in_spatial, kernel_size, strides,
                    kernel_dilation, input_dilation, layer)
  taps = 1
  if pads is None:
    taps = int(np.prod(kernel_size)) * int(np.prod(out_spatial))
  else:
    for size, out, k, s, (before, _), kd, ind in zip(
        in_spatial, out_spatial, kernel_size, strides, pads, kernel_dilation,
        input_dilation):
      taps *= _taps_inside(size, out, k, s, before, kd, ind)
  per_tap = (in_channels // feature_group_count) * out_channels
  padded = int(np.prod(kernel_size)) * int(np.prod(out_spatial)) * per_tap
  return taps * per_tap, padded


def predictor_macs(gating_kind: str, in_channels: int,
                   output_shape: Sequence[int], spec=None) -> int:
  """Per-example MACs of a predictor baseline's predictor (0 otherwise).

  Args:
    gating_kind: the layer's gating kind.
    in_channels: C_in of the gated convolution.
    output_shape: its per-example output shape (H_out, W_out, C_out).
    spec: its `GatingSpec` (for the spatial predictor's block).
  """
  h_out, w_out, c_out = (int(s) for s in output_shape)
  if gating_kind == 'channel_predictor':
    hidden = predictors.predictor_hidden(in_channels)
    return in_channels * hidden + hidden * c_out
  if gating_kind == 'spatial_predictor':
    gh, gw = predictors.block_grid((h_out, w_out), spec.block)
    macs, _ = _conv_macs((1, gh, gw, in_channels), (gh, gw, 1), (3, 3),
                         (1, 1), 'SAME')
    return macs
  return 0


def _conv_geometry(module: nn.Conv, inputs, name: str):
  """(kernel_size, strides, the padding and dilation arguments, batch dims)
  of an nn.Conv call on `inputs`, read as nn.Conv reads them; a padding this
  module cannot count is refused here, with its own message rather than the
  library's."""
  # nn.Conv reads an int kernel_size as a 1-D kernel (k,), and an int
  # stride or dilation as the same value in every spatial dimension.
  kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                 else tuple(module.kernel_size))
  rank = len(kernel_size)
  strides = _as_tuple(module.strides, rank, 'strides')
  conv_args = dict(padding=module.padding,
                   feature_group_count=module.feature_group_count,
                   kernel_dilation=module.kernel_dilation,
                   input_dilation=module.input_dilation)
  # nn.Conv takes any number of batch dimensions (0: one example).
  batch_dims = inputs.ndim - rank - 1
  _zero_pads(module.padding, inputs.shape[batch_dims:-1], kernel_size,
             strides, _as_tuple(module.kernel_dilation, rank,
                                'kernel_dilation'),
             _as_tuple(module.input_dilation, rank, 'input_dilation'),
             name or f'the top-level {type(module).__name__}')
  return kernel_size, strides, conv_args, batch_dims


def layer_costs(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
                **apply_kwargs) -> tuple[LayerCost, ...]:
  """Traces `model.apply(variables, x, **apply_kwargs)` and records layer costs.

  Only shapes are evaluated (`jax.eval_shape`); nothing is computed. Records
  every `GatedConv`, `nn.Conv` and `nn.Dense` call, in call order. A
  convolution's `macs` count only the taps that read a real input value
  (strides, kernel and input dilations and zero padding resolved as nn.Conv
  resolves them); `padded_macs` is the conventional `prod(kernel) * C_in /
  groups * C_out * prod(output spatial)`.

  Args:
    model: a Flax module.
    variables: its variables (arrays or `jax.ShapeDtypeStruct`s).
    x: an input batch (array or `jax.ShapeDtypeStruct`).
    **apply_kwargs: passed to `model.apply` (e.g. `train=False`).

  Returns:
    A tuple of `LayerCost`, per example.

  Raises:
    ValueError naming the layer and its padding if an nn.Conv's padding is
    none that nn.Conv applies (e.g. a string padding with input_dilation).
  """
  records = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__'
        or not isinstance(module, (GatedConv, nn.Conv, nn.Dense))):
      return next_fun(*args, **kwargs)
    name = '/'.join(module.path)
    inputs = args[0]
    if isinstance(module, nn.Dense):
      out = next_fun(*args, **kwargs)
      per_example = tuple(out.shape[1:])
      macs = int(inputs.shape[-1] * np.prod(per_example))
      records.append(LayerCost(name, 'dense', 'head', macs, 0, per_example,
                               macs))
      return out
    if isinstance(module, GatedConv):
      out = next_fun(*args, **kwargs)   # checks its own arguments first
      kernel_size, strides = module.kernel_size, module.pair_strides
      # nn.Conv's paddings, resolved as nn.Conv resolves them (GatedConv
      # takes no dilation or feature groups).
      conv_args = dict(padding=module.padding)
      batch_dims = 1
    else:
      kernel_size, strides, conv_args, batch_dims = _conv_geometry(
          module, inputs, name)
      out = next_fun(*args, **kwargs)
    example_input = (1, *inputs.shape[batch_dims:])
    per_example = tuple(out.shape[batch_dims:])
    macs, padded = _conv_macs(example_input, per_example, kernel_size,
                              strides, layer=name, **conv_args)
    if isinstance(module, GatedConv):
      # A layer with its gates forced open is a dense convolution.
      spec = module.gating if module.gate_mode != 'open' else None
      gating_kind = spec.kind if spec is not None else 'none'
      groups = spec.groups if gating_kind == 'cdg' else 0
      records.append(LayerCost(
          name, 'conv', 'backbone', macs, groups, per_example, padded,
          gating_kind, predictor_macs(gating_kind, inputs.shape[-1],
                                      per_example, spec)))
    else:
      records.append(LayerCost(name, 'conv', 'backbone', macs, 0, per_example,
                               padded))
    return out

  def apply(variables, x):
    return model.apply(variables, x, **apply_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(apply, variables, x)
  return tuple(records)


def per_sample_densities(gating_collection: Mapping[str, Any]
                         ) -> dict[str, jax.Array]:
  """Per-layer, per-sample densities from the sown 'gating' collection.

  Args:
    gating_collection: `state['gating']` from `model.apply(...,
      mutable=['gating', ...])`.

  Returns:
    {layer name: (N,) densities}, names as in `LayerCost.name`.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(gating_collection))
  densities = {}
  for key, values in flat.items():
    if key[-1] != 'density':
      continue
    values = values if isinstance(values, tuple) else (values,)
    densities['/'.join(key[:-1])] = jnp.concatenate(
        [jnp.reshape(v, (-1,)) for v in values])
  return densities


def mean_densities(gating_collection: Mapping[str, Any],
                   weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer density averaged over samples (weighted, e.g. to drop padding)."""
  result = {}
  for name, d in per_sample_densities(gating_collection).items():
    if weights is None:
      result[name] = jnp.mean(d)
    else:
      result[name] = jnp.sum(d * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return result


def backbone_macs(costs: Sequence[LayerCost],
                  densities: Mapping[str, Any]) -> tuple[int, Any]:
  """(dense, effective) backbone MACs per example; works on traced densities."""
  dense = sum(c.macs for c in costs if c.part == 'backbone')
  effective = sum(c.effective_macs(densities.get(c.name))
                  for c in costs if c.part == 'backbone')
  return dense, effective


def gated_macs(costs: Sequence[LayerCost],
               densities: Mapping[str, Any]) -> tuple[int, Any]:
  """(dense, effective) MACs per example of the gated backbone layers only.

  The one computation behind the FLOPs-budget regulariser (on the traced
  densities of a train step) and the report's `gated_flops_fraction` (on
  measured ones): their ratio is what the budget constrains.
  """
  gated = [c for c in costs if c.gated and c.part == 'backbone']
  dense = sum(c.macs for c in gated)
  effective = sum(c.effective_macs(densities[c.name]) for c in gated)
  return dense, effective


def flops_reduction(costs: Sequence[LayerCost],
                    densities: Mapping[str, Any]) -> Any:
  """Backbone dense MACs / effective MACs (1.0 for a dense network)."""
  dense, effective = backbone_macs(costs, densities)
  return dense / effective


@dataclasses.dataclass(frozen=True)
class LayerRow:
  name: str
  part: str
  dense_macs: int
  density: float | None
  effective_macs: float


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Per-layer MACs and totals, per example. FLOPs = 2 x MACs."""
  rows: tuple[LayerRow, ...]
  backbone_dense_macs: int
  backbone_effective_macs: float
  head_macs: int
  backbone_padded_macs: int
  # (dense, effective) MACs of the gated layers (`gated_macs`).
  gated_macs: tuple[int, float] = (0, 0.0)

  @property
  def reduction(self) -> float:
    return self.backbone_dense_macs / self.backbone_effective_macs

  @property
  def gated_density(self) -> float | None:
    """MAC-weighted mean density over gated layers (None without gates)."""
    gated = [r for r in self.rows if r.density is not None]
    if not gated:
      return None
    total = sum(r.dense_macs for r in gated)
    return sum(r.dense_macs * r.density for r in gated) / total

  @property
  def gated_flops_fraction(self) -> float | None:
    """Effective over dense MACs of the gated layers (None without gates).

    The quantity the FLOPs-budget regulariser (`gating.regularizer='flops'`)
    holds at its target.
    """
    dense, effective = self.gated_macs
    return None if not dense else effective / dense

  @property
  def layer_flops_share(self) -> dict[str, float]:
    """Each backbone layer's share of the backbone's dense MACs."""
    return {r.name: r.dense_macs / self.backbone_dense_macs
            for r in self.rows if r.part == 'backbone'}

  def as_dict(self) -> dict[str, Any]:
    return {
        'backbone_dense_macs': self.backbone_dense_macs,
        'backbone_effective_macs': self.backbone_effective_macs,
        'head_macs': self.head_macs,
        'backbone_padded_macs': self.backbone_padded_macs,
        'flops_reduction': self.reduction,
        'gated_density': self.gated_density,
        'gated_flops_fraction': self.gated_flops_fraction,
        'layers': [dataclasses.asdict(r) for r in self.rows],
    }

  def format_table(self) -> str:
    """A plain-text table: one row per layer, then totals.

    'share' is the layer's part of the backbone's dense MACs, so a reader sees
    which layers a budget closed and what that bought.
    """
    width = max([len(r.name) for r in self.rows] + [5])
    share = self.layer_flops_share
    lines = [f'{"layer":<{width}}  {"part":<8}  {"dense MMACs":>11}  '
             f'{"share":>6}  {"density":>7}  {"MMACs":>9}']
    for r in self.rows:
      density = '-' if r.density is None else f'{r.density:.3f}'
      layer_share = (f'{100 * share[r.name]:.1f}%' if r.name in share
                     else '-')
      lines.append(f'{r.name:<{width}}  {r.part:<8}  {r.dense_macs / 1e6:>11.3f}'
                   f'  {layer_share:>6}  {density:>7}'
                   f'  {r.effective_macs / 1e6:>9.3f}')
    lines.append(f'backbone: {self.backbone_dense_macs / 1e6:.2f} MMACs dense, '
                 f'{self.backbone_effective_macs / 1e6:.2f} MMACs gated, '
                 f'reduction {self.reduction:.3f}x'
                 + ('' if self.gated_density is None else
                    f', gated-layer density {self.gated_density:.3f} '
                    f'(the gated layers run '
                    f'{100 * self.gated_flops_fraction:.1f}% of their dense '
                    f'MACs)'))
    heads = (f'heads: {self.head_macs / 1e6:.3f} MMACs (not in the '
             f'reduction).' if any(r.part == 'head' for r in self.rows) else
             'heads: not traced (the backbone alone was measured; heads are '
             'not in the reduction).')
    lines.append(f'{heads} All figures per example; FLOPs = 2 x MACs; '
                 f'padding taps excluded (conventional dense backbone count '
                 f'with them: {self.backbone_padded_macs / 1e6:.2f} MMACs).')
    return '\n'.join(lines)


def _measured_density(layer: str, value: Any) -> float:
  """A gated layer's mean density as a float in [0, 1].

  Raises:
    ValueError naming the layer, the value and what is expected: a density
    outside [0, 1] or NaN (a percentage, a sign error) would give a report
    that reads like a result (a reduction below 1, a negative one); a
    vector or a nested collection is what `mean_densities` averages.
  """
  if isinstance(value, (Mapping, tuple, list)):
    raise ValueError(
        f'The density of gated layer {layer!r} is a {type(value).__name__}, '
        f'not one number: pass one mean density in [0, 1] per layer, e.g. '
        f"flops.mean_densities(state['{DENSITY_COLLECTION}']), not the sown "
        f"'{DENSITY_COLLECTION}' collection itself.")
  shape = np.shape(value)
  if shape != ():
    raise ValueError(
        f'The density of gated layer {layer!r} has shape {shape}: pass one '
        f'mean density in [0, 1] per layer (a scalar); per-sample densities '
        f'are averaged by flops.mean_densities.')
  density = float(value)
  if not 0.0 <= density <= 1.0:   # False for NaN too
    raise ValueError(
        f'The density of gated layer {layer!r} is {density}: a density is '
        f'the fraction of open gates, in [0, 1]'
        + (f' (give {density / 100:g} for {density:g}%)'
           if 1.0 < density <= 100.0 else '') + '.')
  return density


def flops_report(costs: Sequence[LayerCost],
                 densities: Mapping[str, Any]) -> FlopsReport:
  """Builds the report from static costs and per-layer mean densities.

  Args:
    costs: `layer_costs` of the network.
    densities: {gated layer name: its mean density}, one number in [0, 1]
      per gated layer (e.g. `mean_densities` of the sown collection).

  Raises:
    ValueError naming the layer and the value if a gated layer has no
    density, or one that is not a number in [0, 1] (`_measured_density`).
  """
  nested = [k for k, v in densities.items() if isinstance(v, Mapping)]
  if nested:
    # The sown collection is keyed by module scope ({'stage1_block0':
    # {'conv1': {'density': (array,)}}}), not by layer name.
    raise ValueError(
        f'flops_report takes {{gated layer name: mean density}}, got a '
        f'nested mapping under {nested[0]!r} (the sown '
        f"'{DENSITY_COLLECTION}' collection?): pass "
        f"flops.mean_densities(state['{DENSITY_COLLECTION}']).")
  rows = []
  for c in costs:
    density = None
    if c.gated:
      if c.name not in densities:
        raise ValueError(f'No measured density for gated layer {c.name}; '
                         f'densities were given for {sorted(densities)}: '
                         f'give one mean density per gated layer (e.g. '
                         f"flops.mean_densities(state['{DENSITY_COLLECTION}'"
                         f'])).')
      density = _measured_density(c.name, densities[c.name])
    rows.append(LayerRow(c.name, c.part, c.macs, density,
                         float(c.effective_macs(density))))
  measured = {r.name: r.density for r in rows}
  dense, effective = backbone_macs(costs, measured)
  head = sum(c.macs for c in costs if c.part == 'head')
  padded = sum(c.padded_macs for c in costs if c.part == 'backbone')
  gated_dense, gated_effective = gated_macs(costs, measured)
  return FlopsReport(tuple(rows), dense, float(effective), head, padded,
                     (gated_dense, float(gated_effective)))


def measure(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
            train: bool = False) -> FlopsReport:
  """Runs `model` on `x` and reports MACs from the masks it traced.

  Args:
    model: a network built by `cdg_jax.ssl.models.create_resnet`.
    variables: its variables.
    x: (N, H, W, C) batch.
    train: gate with batch statistics (True) or running averages (False).
  """
  costs = layer_costs(model, variables, x, train=False)
  mutable = [DENSITY_COLLECTION] + (['batch_stats'] if train else [])
  # Gumbel noise of spatial-predictor gates and the sparse train step's
  # sample of closed tiles, in training mode (unused otherwise).
  rngs = ({GUMBEL_RNG: jax.random.key(0), CLOSED_TILE_RNG: jax.random.key(1)}
          if train else None)
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=train, rngs=rngs,
                                               mutable=mutable))(variables, x)
  densities = mean_densities(state.get(DENSITY_COLLECTION, {}))
  return flops_report(costs, jax.device_get(densities))
