"""The gate regularisers of the train step, their schedules and the FLOPs budget.

One home for "what pulls the gates shut": a new CDG regulariser is one
function of `GateTerms` below and one entry of `CDG_REGULARIZERS` (its name
is also the value of `gating.regularizer`, `layers.REGULARIZERS`, which a
test holds equal to this table's keys); the predictor baselines' losses are
`KIND_REGULARIZERS`, chosen by `gating.kind`. The pure math of each form
lives in `cdg_jax.gating` (and `cdg_jax.gating.predictors`); this module reads the
step's inputs (parameters, densities, the network's layer costs, the
schedules) and picks the form from the spec. docs/method.md [regulariser]
describes the forms and where each comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from cdg_jax.gating import flops
from cdg_jax.gating import ops
from cdg_jax.gating import predictors
from cdg_jax.gating.layers import GatingSpec


def thresholds(params) -> list[jax.Array]:
  """All gate thresholds in a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return [v for k, v in sorted(flat.items()) if k[-1] == 'threshold']


def density_target_schedule(spec: GatingSpec, num_steps: int
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


def budget_schedule(spec: GatingSpec, num_steps: int
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
    tightness = (ops.bound_tightness(jnp.maximum(since_start, 0.0) / relax)
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


def budget_summary(spec: GatingSpec, costs: Sequence[flops.LayerCost]
                   ) -> dict[str, float] | None:
  """The FLOPs budget in the numbers a user reads (None without one).

  Returns {'density': the gated layers' MAC-weighted density target,
  'gated_flops_fraction': the fraction of their dense MACs it leaves,
  'flops_reduction': the backbone's dense / effective MACs at it}.
  """
  if not (spec.kind == 'cdg' and spec.regularizer == 'flops'):
    return None
  at_target = {c.name: spec.density_target for c in costs if c.gated}
  return {'density': spec.density_target,
          'gated_flops_fraction': float(budget_fraction(
              costs, spec.density_target)),
          'flops_reduction': float(flops.flops_reduction(costs, at_target))}


def describe_budget(spec: GatingSpec, costs: Sequence[flops.LayerCost]
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


def _threshold(spec: GatingSpec, terms: GateTerms) -> jax.Array:
  return ops.threshold_regularizer(thresholds(terms.params),
                                   spec.threshold_target)


def _threshold_sum(spec: GatingSpec, terms: GateTerms) -> jax.Array:
  return ops.threshold_sum_regularizer(thresholds(terms.params),
                                       spec.threshold_target)


def _density(spec: GatingSpec, terms: GateTerms) -> jax.Array:
  del spec
  return ops.density_regularizer(list(terms.densities.values()),
                                 terms.density_target)


def _flops_budget(spec: GatingSpec, terms: GateTerms) -> jax.Array:
  if not any(c.gated for c in terms.costs):
    raise ValueError("gating.regularizer='flops' needs the network's layer "
                     'costs (flops.layer_costs) with its gated layers.')
  dense, effective = flops.gated_macs(terms.costs, terms.densities)
  value = ops.flops_budget_regularizer(
      effective / dense, budget_fraction(terms.costs, terms.density_target))
  if spec.budget_bounds_fraction > 0:
    lower, upper = ops.layer_bounds(terms.density_target,
                                    terms.budget['tightness'])
    value = value + ops.bound_regularizer(list(terms.densities.values()),
                                          lower, upper)
  return terms.budget['scale'] * value


def _saliency_l1(spec: GatingSpec, terms: GateTerms) -> jax.Array:
  del spec
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(terms.aux))
  values = [jnp.concatenate([jnp.reshape(v, (-1,)) for v in
                             (vs if isinstance(vs, tuple) else (vs,))])
            for k, vs in sorted(flat.items()) if k[-1] == 'saliency_l1']
  return predictors.saliency_l1_regularizer(values)


Regularizer = Callable[[GatingSpec, GateTerms], jax.Array]

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


def gate_regularizer(spec: GatingSpec, params, densities: Mapping[str, Any],
                     aux: Mapping[str, Any] | None = None,
                     density_target: jax.Array | float | None = None,
                     costs: Sequence[flops.LayerCost] = (),
                     budget: Mapping[str, Any] | None = None):
  """The gates' auxiliary loss, times lambda = `spec.weight` (0 without gates).

  Args:
    spec: the gating spec; `kind` and `regularizer` pick the form
      (`KIND_REGULARIZERS`, `CDG_REGULARIZERS`).
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
  if not spec.enabled:
    return jnp.zeros(())
  form = KIND_REGULARIZERS.get(spec.kind) or CDG_REGULARIZERS[spec.regularizer]
  terms = GateTerms(
      params=params, densities=densities, aux=aux or {},
      density_target=(spec.density_target if density_target is None
                      else density_target),
      costs=costs, budget=budget or {'scale': 1.0, 'tightness': 0.0})
  return spec.weight * form(spec, terms)
