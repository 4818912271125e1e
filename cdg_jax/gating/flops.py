r"""Analytic FLOPs of (gated) networks from traced shapes and measured masks.

Dense multiply-accumulates (MACs) per example come from the shapes traced in a
forward pass. A convolution costs `C_in * C_out` times the number of
(output position, kernel tap) pairs that fall inside the input: taps on the
zero padding are not counted, which is what XLA's cost analysis counts (it
agrees with this module to 0.4% on CIFAR ResNet-18). The conventional count of
the literature, `kh * kw * C_in * C_out * H_out * W_out` (0.56 GMACs for CIFAR
ResNet-18), includes them; it is reported too as `padded_macs`. A dense layer
costs `C_in * C_out`. A CDG-gated convolution costs (docs/method.md [flops])

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
                 pad_before: int) -> int:
  """Number of (output index, kernel index) pairs that read a real input row."""
  out = np.arange(out_size)[:, None] * stride - pad_before + np.arange(kernel)
  return int(np.sum((out >= 0) & (out < in_size)))


def _conv_macs(input_shape, output_shape, kernel_size, strides, padding,
               feature_group_count=1) -> tuple[int, int]:
  """(MACs without padding taps, conventional MACs) of one example's conv."""
  in_spatial, in_channels = input_shape[1:-1], input_shape[-1]
  out_spatial, out_channels = output_shape[:-1], output_shape[-1]
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(in_spatial, kernel_size, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * len(kernel_size)
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  taps = 1
  for size, out, k, s, (before, _) in zip(in_spatial, out_spatial, kernel_size,
                                          strides, pads):
    taps *= _taps_inside(size, out, k, s, before)
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


def layer_costs(model: nn.Module, variables: Mapping[str, Any], x: jax.Array,
                **apply_kwargs) -> tuple[LayerCost, ...]:
  """Traces `model.apply(variables, x, **apply_kwargs)` and records layer costs.

  Only shapes are evaluated (`jax.eval_shape`); nothing is computed. Records
  every `GatedConv`, `nn.Conv` and `nn.Dense` call, in call order.

  Args:
    model: a Flax module.
    variables: its variables (arrays or `jax.ShapeDtypeStruct`s).
    x: an input batch (array or `jax.ShapeDtypeStruct`).
    **apply_kwargs: passed to `model.apply` (e.g. `train=False`).

  Returns:
    A tuple of `LayerCost`, per example.
  """
  records = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    module = context.module
    if not isinstance(module, (GatedConv, nn.Conv, nn.Dense)):
      return out
    name = '/'.join(module.path)
    inputs = args[0]
    per_example = tuple(out.shape[1:])
    if isinstance(module, GatedConv):
      macs, padded = _conv_macs(inputs.shape, per_example, module.kernel_size,
                                module.strides, 'SAME')
      # A layer with its gates forced open is a dense convolution.
      spec = module.gating if module.gate_mode != 'open' else None
      gating_kind = spec.kind if spec is not None else 'none'
      groups = spec.groups if gating_kind == 'cdg' else 0
      records.append(LayerCost(
          name, 'conv', 'backbone', macs, groups, per_example, padded,
          gating_kind, predictor_macs(gating_kind, inputs.shape[-1],
                                      per_example, spec)))
    elif isinstance(module, nn.Conv):
      kernel_size = tuple(module.kernel_size)
      strides = module.strides or 1
      strides = ((strides,) * len(kernel_size) if isinstance(strides, int)
                 else tuple(strides))
      macs, padded = _conv_macs(inputs.shape, per_example, kernel_size, strides,
                                module.padding, module.feature_group_count)
      records.append(LayerCost(name, 'conv', 'backbone', macs, 0, per_example,
                               padded))
    elif isinstance(module, nn.Dense):
      macs = int(inputs.shape[-1] * np.prod(per_example))
      records.append(LayerCost(name, 'dense', 'head', macs, 0, per_example,
                               macs))
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


def flops_report(costs: Sequence[LayerCost],
                 densities: Mapping[str, Any]) -> FlopsReport:
  """Builds the report from static costs and per-layer mean densities."""
  rows = []
  for c in costs:
    density = None
    if c.gated:
      if c.name not in densities:
        raise ValueError(f'No measured density for gated layer {c.name}; '
                         f'densities were given for {sorted(densities)}.')
      density = float(densities[c.name])
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
