"""The gate regularisers of the train step, their schedules and the FLOPs budget.

One home for "what pulls the gates shut": `RegularizerSpec` says which form,
its weight and its targets; a new CDG regulariser is one function of
`GateTerms` below and one entry of `CDG_REGULARIZERS` (its keys are the
values `gating.regularizer` may take); the predictor baselines' losses are
`KIND_REGULARIZERS`, chosen by the gate kind. The pure math of each form
(functions of arrays) comes first; the rest reads the step's inputs
(parameters, densities, the network's layer costs, the schedules) and picks
the form from the spec. docs/method.md
[regulariser] describes the forms and where each comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import numbers
from typing import Any

import flax
import jax
import jax.numpy as jnp

from cdg_jax.gating import flops
from cdg_jax.gating.ops import Array
from cdg_jax.gating.layers import AUX_COLLECTION
from cdg_jax.gating.layers import DENSITY_COLLECTION


def _finite(value: Any) -> bool:
  return isinstance(value, numbers.Real) and math.isfinite(value)


def _fraction(value: Any) -> bool:
  return _finite(value) and 0 <= value <= 1


# Each numeric field's range (field, allowed in words, test): a value outside
# (NaN included) is refused when the spec is made.
_RANGES = (
    ('weight', 'finite and >= 0 (a negative weight rewards leaving the '
     'target)', lambda v: _finite(v) and v >= 0),
    ('threshold_target', 'finite', _finite),
    ('density_target', 'in (0, 1]', lambda v: _finite(v) and 0 < v <= 1),
    ('target_anneal_fraction', 'in [0, 1]', _fraction),
    ('budget_bounds_fraction', 'in [0, 1] (a fraction of training)',
     _fraction),
    ('budget_start_fraction', 'in [0, 1] (a fraction of training)',
     _fraction),
    ('budget_ramp_fraction', 'in [0, 1] (a fraction of training)', _fraction),
)


@dataclasses.dataclass(frozen=True)
class RegularizerSpec:
  """The gates' auxiliary loss; the fields are the config's `gating` fields
  of the same names (`config_lib.read_gating` makes it).

  Attributes:
    kind: the gate kind regularised: 'cdg' (the form is `regularizer`), or a
      predictor baseline, whose loss is fixed by the kind
      (`KIND_REGULARIZERS`): the L1 norm of the saliencies
      ('channel_predictor') or `(density - density_target)^2` per layer
      ('spatial_predictor'), times `weight`.
    regularizer: form of the CDG gate regulariser, times `weight`:
      'density' -- sum_layers (density - density_target)^2, density the mean
      of the straight-through mask (sets the FLOPs operating point);
      'threshold' -- sum_layers mean_channels (delta - threshold_target)^2;
      'threshold_sum' -- sum over every threshold (delta -
      threshold_target)^2, channel gating's form (lambda 1e-4, target 1.0);
      'flops' -- one FLOPs budget for the network (ours to add; the form of
      DynConv, DGNet and Krishna et al., not known to be the paper's):
      (F_gated / F_dense - t)^2 over the gated layers' MACs as
      `cdg_jax.gating.flops` counts them, t the fraction those layers run
      when their MAC-weighted mean density is `density_target`; the layers
      share the budget (one may stay open if others close more), optionally
      with per-layer bounds (`budget_bounds_fraction`) and a late start
      (`budget_start_fraction`).
    weight: regulariser weight lambda.
    threshold_target: target of the threshold regularisers.
    density_target: target of the density regulariser, in (0, 1]; of the
      'flops' form, the gated layers' MAC-weighted mean density (the
      `gate_density` a run reports), so both forms at the same target cost
      about the same FLOPs.
    target_anneal_fraction: ours, not the paper's: over this fraction of the
      training steps the density regulariser's target falls linearly from
      1.0 (every gate open) to `density_target`; 0 keeps it fixed. Density
      form (and the spatial predictor) only.
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
  """
  kind: str = 'cdg'
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

  def __post_init__(self):
    kinds = ('cdg', *KIND_REGULARIZERS)
    if self.kind not in kinds:
      raise ValueError(f'A gate regulariser is for gating.kind in {kinds}, '
                       f'got gating.kind={self.kind!r}.')
    if self.regularizer not in CDG_REGULARIZERS:
      raise ValueError(f'Unknown gating.regularizer={self.regularizer!r}; '
                       f'expected one of '
                       f'{", ".join(map(repr, CDG_REGULARIZERS))}.')
    for name, allowed, ok in _RANGES:
      value = getattr(self, name)
      if not ok(value):
        raise ValueError(f'gating.{name} must be {allowed}, got {value!r}.')
    if self.budget_start_fraction + self.budget_ramp_fraction > 1.0:
      raise ValueError(
          f'gating.budget_start_fraction + gating.budget_ramp_fraction = '
          f'{self.budget_start_fraction} + {self.budget_ramp_fraction} > 1: '
          f'the budget would never reach full weight.')

  @property
  def is_budget(self) -> bool:
    """Whether this is the FLOPs budget (CDG, `regularizer='flops'`)."""
    return self.kind == 'cdg' and self.regularizer == 'flops'


# The forms' math, pure functions of arrays.


def threshold_regularizer(thresholds: Sequence[Array], target: float = 1.0
                          ) -> Array:
  """Per-layer mean form `sum_layers mean_channels((delta - target)^2)`.

  Multiply by the regularisation weight lambda in the loss. Pushing the
  thresholds towards a positive target closes gates where saliency is low.
  Each layer counts once whatever its width; the channel-gating form is
  `threshold_sum_regularizer`, C_out times stronger per layer.
  """
  if not thresholds:
    return jnp.zeros(())
  return sum(jnp.mean(jnp.square(t - target)) for t in thresholds)


def threshold_sum_regularizer(thresholds: Sequence[Array],
                              target: float = 1.0) -> Array:
  """Channel gating's form `sum over every threshold of (delta - target)^2`.

  Summed over the thresholds of every gated layer (CGNet uses lambda 1e-4,
  target 1.0), so wide layers weigh more, one term per output channel.
  """
  if not thresholds:
    return jnp.zeros(())
  return sum(jnp.sum(jnp.square(t - target)) for t in thresholds)


def density_regularizer(densities: Sequence[Array], target: float = 0.5
                        ) -> Array:
  """Density-target regulariser `sum_layers (density - target)^2`.

  `densities` should be means of the straight-through masks so that the
  gradient (through the sigmoid surrogate) reaches the thresholds.
  """
  if not densities:
    return jnp.zeros(())
  return sum(jnp.square(d - target) for d in densities)


def flops_budget_regularizer(gated_flops_fraction: Array,
                             target_fraction: Array | float) -> Array:
  """One FLOPs budget for the network: `(F_gated / F_dense - target)^2`.

  Args:
    gated_flops_fraction: the gated layers' effective MACs over their dense
      MACs (`cdg_jax.gating.flops.gated_macs`), computed from the
      straight-through masks' densities so the gradient reaches every
      threshold, each layer in proportion to its share of the MACs.
    target_fraction: the budget, as the same fraction.

  Returns:
    The squared gap (multiply by lambda). The layers share the budget: a layer
    may stay open if others close more.
  """
  return jnp.square(gated_flops_fraction - target_fraction)


def bound_tightness(progress: Array | float) -> Array:
  """How tight the per-layer bounds are at `progress` in [0, 1] of relaxation.

  DynConv's schedule, `cos^2(pi/2 * progress)`: 1 (both bounds at the target)
  at 0, falling smoothly to 0 (bounds [0, 1], no constraint) at 1; clipped
  outside [0, 1].
  """
  progress = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  return jnp.square(jnp.cos(0.5 * math.pi * progress))


def layer_bounds(target_density: Array | float, tightness: Array | float
                 ) -> tuple[Array, Array]:
  """(lower, upper) bounds on each layer's density at a bound tightness.

  `lower = tightness * target`, `upper = 1 - tightness * (1 - target)`: at
  tightness 1 every layer is held at the target (the uniform per-layer
  regulariser), at 0 the bounds are [0, 1] and only the budget remains.
  """
  target = jnp.asarray(target_density, jnp.float32)
  return tightness * target, 1.0 - tightness * (1.0 - target)


def bound_regularizer(densities: Sequence[Array], lower: Array | float,
                      upper: Array | float) -> Array:
  """`mean_layers relu(d - upper)^2 + relu(lower - d)^2` (0 inside the bounds).

  The mean (not the sum) over layers, as DynConv: the bounds' weight does not
  grow with depth. `densities` are straight-through mask means.
  """
  if not densities:
    return jnp.zeros(())
  return sum(jnp.square(jax.nn.relu(d - upper)) +
             jnp.square(jax.nn.relu(lower - d)) for d in densities
             ) / len(densities)


def saliency_l1_regularizer(saliency_l1: Sequence[Array]) -> Array:
  """FBS's auxiliary loss `sum_layers mean_samples ||s||_1`.

  Args:
    saliency_l1: per layer, the (N,) L1 norms of the samples' saliencies.
  """
  if not saliency_l1:
    return jnp.zeros(())
  return sum(jnp.mean(s) for s in saliency_l1)


def thresholds(params) -> list[jax.Array]:
  """All gate thresholds in a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return [v for k, v in sorted(flat.items()) if k[-1] == 'threshold']


def density_target_schedule(spec: RegularizerSpec, num_steps: int
                            ) -> Callable[[jax.Array], jax.Array]:
  """The density regulariser's target at a step.

  `spec.density_target` throughout, or, with `spec.target_anneal_fraction`
  f > 0 (our option, not the paper's), a linear fall from 1.0 (no gate
  closed) at step 0 to `density_target` at step f * num_steps, constant after.
  """
  target = spec.density_target
  anneal_steps = spec.target_anneal_fraction * num_steps
  if anneal_steps <= 0:
    return lambda step: jnp.asarray(target, jnp.float32)

  def schedule(step):
    progress = jnp.minimum(step / anneal_steps, 1.0)
    return (1.0 - progress * (1.0 - target)).astype(jnp.float32)
  return schedule


def budget_schedule(spec: RegularizerSpec, num_steps: int
                    ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """The FLOPs budget's weight scale and per-layer bound tightness at a step.

  Returns `schedule(step) -> {'scale', 'tightness'}`: `scale` is 0 before
  `spec.budget_start_fraction` of `num_steps`, then rises linearly to 1 over
  `spec.budget_ramp_fraction` (at once if 0); `tightness`
  (`gating.bound_tightness`) falls from 1 at the budget's start to 0 after
  `spec.budget_bounds_fraction` of training; always 0 without bounds.
  """
  start = spec.budget_start_fraction * num_steps
  ramp = spec.budget_ramp_fraction * num_steps
  relax = spec.budget_bounds_fraction * num_steps

  def schedule(step):
    since_start = jnp.asarray(step, jnp.float32) - start
    if ramp > 0:
      scale = jnp.clip(since_start / ramp, 0.0, 1.0)
    else:
      scale = (since_start >= 0).astype(jnp.float32)
    tightness = (bound_tightness(jnp.maximum(since_start, 0.0) / relax)
                 if relax > 0 else jnp.zeros((), jnp.float32))
    return {'scale': scale, 'tightness': tightness}
  return schedule


def budget_fraction(costs: Sequence[flops.LayerCost],
                    density: jax.Array | float) -> jax.Array:
  """The gated layers' FLOPs fraction when every one is at `density`.

  The FLOPs budget's target, from the density a user states: the same
  `flops.gated_macs` computation the regulariser and the report use.
  """
  dense, effective = flops.gated_macs(
      costs, {c.name: density for c in costs if c.gated})
  return effective / dense


def budget_summary(spec: RegularizerSpec, costs: Sequence[flops.LayerCost]
                   ) -> dict[str, float] | None:
  """The FLOPs budget in the numbers a user reads (None without one).

  Returns {'density': the gated layers' MAC-weighted density target,
  'gated_flops_fraction': the fraction of their dense MACs it leaves,
  'flops_reduction': the backbone's dense / effective MACs at it}.
  """
  if spec is None or not spec.is_budget:
    return None
  at_target = {c.name: spec.density_target for c in costs if c.gated}
  return {'density': spec.density_target,
          'gated_flops_fraction': float(budget_fraction(
              costs, spec.density_target)),
          'flops_reduction': float(flops.flops_reduction(costs, at_target))}


def describe_budget(spec: RegularizerSpec, costs: Sequence[flops.LayerCost]
                    ) -> str | None:
  """One line saying what the FLOPs budget asks for (None without one)."""
  budget = budget_summary(spec, costs)
  if budget is None:
    return None
  parts = [f"Gate regulariser: one FLOPs budget (gating.regularizer='flops', "
           f"lambda {spec.weight:g}): the gated layers' MAC-weighted density "
           f"{budget['density']:.3f}, i.e. "
           f"{100 * budget['gated_flops_fraction']:.1f}% of their dense MACs; "
           f"backbone FLOPs reduction {budget['flops_reduction']:.2f}x at the "
           f'budget.']
  if spec.budget_bounds_fraction > 0:
    parts.append(f'Per-layer bounds start at the target and relax to [0, 1] '
                 f'over {100 * spec.budget_bounds_fraction:.0f}% of training.')
  if spec.budget_start_fraction > 0:
    parts.append(f'The budget is off for the first '
                 f'{100 * spec.budget_start_fraction:.0f}% of training'
                 + (f', then ramps in over '
                    f'{100 * spec.budget_ramp_fraction:.0f}%.'
                    if spec.budget_ramp_fraction > 0 else '.'))
  return ' '.join(parts)


@dataclasses.dataclass(frozen=True)
class GateTerms:
  """What a regulariser form may read at one step.

  Attributes:
    params: online parameters (CDG thresholds; predictor weights).
    densities: {layer: mean density} from this step's straight-through masks.
    aux: the 'gate_aux' collection sown in the same forward pass (channel
      predictor: per-sample saliency L1 norms).
    density_target: this step's density target (`density_target_schedule`).
    costs: the online network's `flops.LayerCost`s (names as in
      `densities`), for the FLOPs budget.
    budget: this step's `budget_schedule` values {'scale', 'tightness'}.
  """
  params: Any
  densities: Mapping[str, Any]
  aux: Mapping[str, Any]
  density_target: jax.Array | float
  costs: Sequence[flops.LayerCost]
  budget: Mapping[str, Any]


def _threshold(spec: RegularizerSpec, terms: GateTerms) -> jax.Array:
  return threshold_regularizer(thresholds(terms.params),
                                   spec.threshold_target)


def _threshold_sum(spec: RegularizerSpec, terms: GateTerms) -> jax.Array:
  return threshold_sum_regularizer(thresholds(terms.params),
                                       spec.threshold_target)


def _density(spec: RegularizerSpec, terms: GateTerms) -> jax.Array:
  del spec
  return density_regularizer(list(terms.densities.values()),
                                 terms.density_target)


def _flops_budget(spec: RegularizerSpec, terms: GateTerms) -> jax.Array:
  if not any(c.gated for c in terms.costs):
    raise ValueError("gating.regularizer='flops' needs the network's layer "
                     'costs (flops.layer_costs) with its gated layers.')
  dense, effective = flops.gated_macs(terms.costs, terms.densities)
  value = flops_budget_regularizer(
      effective / dense, budget_fraction(terms.costs, terms.density_target))
  if spec.budget_bounds_fraction > 0:
    lower, upper = layer_bounds(terms.density_target,
                                    terms.budget['tightness'])
    value = value + bound_regularizer(list(terms.densities.values()),
                                          lower, upper)
  return terms.budget['scale'] * value


def _saliency_l1(spec: RegularizerSpec, terms: GateTerms) -> jax.Array:
  del spec
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(terms.aux))
  values = [jnp.concatenate([jnp.reshape(v, (-1,)) for v in
                             (vs if isinstance(vs, tuple) else (vs,))])
            for k, vs in sorted(flat.items()) if k[-1] == 'saliency_l1']
  return saliency_l1_regularizer(values)


Regularizer = Callable[[RegularizerSpec, GateTerms], jax.Array]

# CDG's forms, by `gating.regularizer` (each unweighted; `gate_regularizer`
# multiplies by lambda). A new form is one function and one entry here.
CDG_REGULARIZERS: dict[str, Regularizer] = {
    # sum_layers mean_channels (delta - threshold_target)^2
    'threshold': _threshold,
    # sum over every threshold (delta - threshold_target)^2 (channel gating)
    'threshold_sum': _threshold_sum,
    # sum_layers (density - density_target)^2 (the default)
    'density': _density,
    # scale * [(F_gated / F_dense - t_F)^2 + the per-layer bounds' penalty]
    'flops': _flops_budget,
}
# The predictor baselines' losses, by `gating.kind` (`regularizer` ignored):
# FBS's saliency L1, and the spatial predictor's density target, its density
# the mean of the straight-through hard masks so the gradient reaches the
# predictors.
KIND_REGULARIZERS: dict[str, Regularizer] = {
    'channel_predictor': _saliency_l1,
    'spatial_predictor': _density,
}


# The parameter that marks a gated layer of each kind in a parameter tree
# (its module path is the layer's name, as in the sown collections).
_GATE_PARAMETER = {'cdg': 'threshold', 'channel_predictor': 'predictor_w1',
                   'spatial_predictor': 'predictor_kernel'}


def _gated_layers(spec: RegularizerSpec, params,
                  costs: Sequence[flops.LayerCost]) -> list[str]:
  """Names of the gated layers: from `costs` when given, else the module
  paths in `params` that hold the kind's gate parameter."""
  if any(c.gated for c in costs):
    return [c.name for c in costs if c.gated]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params or {}))
  marker = _GATE_PARAMETER[spec.kind]
  return sorted({'/'.join(k[:-1]) for k in flat if k[-1] == marker})


def _layer_list(names: Sequence[str]) -> str:
  shown = ', '.join(repr(n) if n else '(the top-level module)'
                    for n in names[:4])
  return shown + (f' and {len(names) - 4} more' if len(names) > 4 else '')


def _check_sown_inputs(spec: RegularizerSpec, form: Regularizer, params,
                       densities: Mapping[str, Any], aux: Mapping[str, Any],
                       costs: Sequence[flops.LayerCost]) -> None:
  """ValueError if the form reads sown values that some gated layer lacks.

  A forward pass whose `mutable` misses the collection a gated layer sows
  into returns none of its values; the loss would then be 0 (the gates never
  regularised) or fail later on a bare missing key. With `costs` the layers
  are known by name, so one missing layer is caught; without, from the
  parameters, only a collection missing entirely (names in `params` may
  carry a prefix that the sown values lack).
  """
  if form in (_density, _flops_budget):
    given, collection, what = densities, DENSITY_COLLECTION, 'densities'
    fix = (f"and pass flops.mean_densities(state['{DENSITY_COLLECTION}']) "
           f'as densities')
  elif form is _saliency_l1:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(aux))
    given = {'/'.join(k[:-1]) for k in flat if k[-1] == 'saliency_l1'}
    collection, what = AUX_COLLECTION, 'saliency L1 norms'
    fix = f"and pass state['{AUX_COLLECTION}'] as aux"
  else:
    return   # the threshold forms read the parameters only
  expected = _gated_layers(spec, params, costs)
  by_name = any(c.gated for c in costs)
  missing = [n for n in expected if n not in given]
  if not missing or (not by_name and given):
    return
  form_name = (f'gating.regularizer={spec.regularizer!r}'
               if spec.kind == 'cdg' else f'gating.kind={spec.kind!r}')
  raise ValueError(
      f'The gate regulariser ({form_name}) has no {what} for '
      f'{len(missing)} of the {len(expected)} gated layers '
      f'({_layer_list(missing)}): '
      + (f'the forward pass did not collect the {collection!r} collection '
         f'they sow into' if len(missing) == len(expected) else
         f'they are not in the {collection!r} values given (for '
         f'{_layer_list(sorted(given))})')
      + f". Apply the network with mutable=['{collection}', ...] {fix}.")


def gate_regularizer(spec: RegularizerSpec | None, params, densities: Mapping[str, Any],
                     aux: Mapping[str, Any] | None = None,
                     density_target: jax.Array | float | None = None,
                     costs: Sequence[flops.LayerCost] = (),
                     budget: Mapping[str, Any] | None = None):
  """The gates' auxiliary loss, times lambda = `spec.weight` (0 without gates).

  Args:
    spec: the regulariser's spec (None: no gates, a loss of 0); `kind` and
      `regularizer` pick the form (`KIND_REGULARIZERS`, `CDG_REGULARIZERS`).
    params: online parameters (CDG thresholds).
    densities: {layer: mean density} from this step's straight-through masks.
    aux: the 'gate_aux' collection sown in the same forward pass (channel
      predictor: per-sample saliency L1 norms).
    density_target: this step's density target (`density_target_schedule`);
      None: `spec.density_target`.
    costs: the online network's `flops.LayerCost`s (names as in
      `densities`); the 'flops' form needs them.
    budget: this step's `budget_schedule` values; None: full weight, no
      bounds.

  Returns:
    lambda times the form's value, e.g. lambda * sum_layers (density -
    target)^2 for 'density' or lambda * scale * [(F_gated / F_dense - t_F)^2
    + mean_layers relu(d - upper)^2 + relu(lower - d)^2] for 'flops'
    (t_F = `budget_fraction` at the target).
  """
  if spec is None:
    return jnp.zeros(())
  form = KIND_REGULARIZERS.get(spec.kind) or CDG_REGULARIZERS[spec.regularizer]
  _check_sown_inputs(spec, form, params, densities, aux or {}, costs)
  terms = GateTerms(
      params=params, densities=densities, aux=aux or {},
      density_target=(spec.density_target if density_target is None
                      else density_target),
      costs=costs, budget=budget or {'scale': 1.0, 'tightness': 0.0})
  return spec.weight * form(spec, terms)
