"""Tests of the FLOPs-budget gate regulariser (`gating.regularizer='flops'`).

Values and gradients against hand computations, the schedules at their end
points. The program's step with the budget: tests/test_budget_training.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import regularizers
from cdg_jax.gating.regularizers import RegularizerSpec


# Two gated layers (G = 4) of 1,000 and 3,000 MACs, an ungated one, a head.
COSTS = (
    flops.LayerCost('a', 'conv', 'backbone', 1000, 4, (2, 2, 8), 1200),
    flops.LayerCost('b', 'conv', 'backbone', 3000, 4, (2, 2, 8), 3400),
    flops.LayerCost('c', 'conv', 'backbone', 500, 0, (2, 2, 8), 600),
    flops.LayerCost('h', 'dense', 'head', 50, 0, (5,), 50),
)
DENSITIES = {'a': 0.5, 'b': 0.1}


def flops_spec(**kwargs):
  return RegularizerSpec(regularizer='flops', weight=2.0, density_target=0.25,
                         **kwargs)


def test_the_spec_accepts_the_forms_of_the_table():
  # A new form is one function and one entry of regularizers.CDG_REGULARIZERS,
  # the one list of their names.
  for name in regularizers.CDG_REGULARIZERS:
    RegularizerSpec(regularizer=name)
  with pytest.raises(ValueError, match="regularizer='l1'"):
    RegularizerSpec(regularizer='l1')


def test_gated_macs_and_budget_fraction_by_hand():
  dense, effective = flops.gated_macs(COSTS, DENSITIES)
  # 1000 (1/4 + 3/4 0.5) + 3000 (1/4 + 3/4 0.1) = 625 + 975.
  assert dense == 4000
  np.testing.assert_allclose(effective, 1600.0)
  # Every gated layer at 0.25: 1/4 + 3/4 * 1/4.
  np.testing.assert_allclose(regularizers.budget_fraction(COSTS, 0.25), 0.4375)


def test_flops_regulariser_value_and_gradient_by_hand():
  spec = flops_spec()

  def loss(d):
    return regularizers.gate_regularizer(spec, {}, {'a': d[0], 'b': d[1]}, costs=COSTS)
  d = jnp.array([DENSITIES['a'], DENSITIES['b']])
  # lambda (1600/4000 - 0.4375)^2 = 2 * 0.0375^2.
  np.testing.assert_allclose(loss(d), 2 * 0.0375 ** 2, rtol=1e-6)
  # d/dd_l = 2 lambda (F - t) * 3/4 * macs_l / 4000: each layer in proportion
  # to its MACs (the budget is shared, not per layer).
  np.testing.assert_allclose(
      jax.grad(loss)(d), [2 * 2 * -0.0375 * 0.75 * 1000 / 4000,
                          2 * 2 * -0.0375 * 0.75 * 3000 / 4000], rtol=1e-5)


def test_bounds_hold_every_layer_at_the_target_then_relax():
  np.testing.assert_allclose(
      [regularizers.bound_tightness(p) for p in (-1.0, 0.0, 0.5, 1.0, 2.0)],
      [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(regularizers.layer_bounds(0.25, 1.0), (0.25, 0.25))
  np.testing.assert_allclose(regularizers.layer_bounds(0.25, 0.0), (0.0, 1.0))
  np.testing.assert_allclose(regularizers.layer_bounds(0.25, 0.5), (0.125, 0.625))
  # One above the upper bound by 0.1, one below the lower by 0.1: mean of 2.
  np.testing.assert_allclose(
      regularizers.bound_regularizer([jnp.array(0.5), jnp.array(0.1)], 0.2, 0.4),
      0.01, rtol=1e-6)
  assert float(regularizers.bound_regularizer([jnp.array(0.3)], 0.2, 0.4)) == 0.0

  spec = flops_spec(budget_bounds_fraction=0.3)
  schedule = regularizers.budget_schedule(spec, 100)
  value = lambda step: float(regularizers.gate_regularizer(
      spec, {}, DENSITIES, costs=COSTS, budget=schedule(step)))
  budget_only = 2 * 0.0375 ** 2
  # Step 0: both bounds at 0.25: (0.5 - 0.25)^2 and (0.25 - 0.1)^2, mean.
  np.testing.assert_allclose(value(0), budget_only + 2 * (0.0625 + 0.0225) / 2,
                             rtol=1e-5)
  # Relaxed by step 30 = 0.3 of training: the budget alone.
  np.testing.assert_allclose(value(30), budget_only, rtol=1e-5)
  np.testing.assert_allclose(value(99), budget_only, rtol=1e-5)


def test_late_start_ramps_in_and_starts_the_bounds_with_it():
  spec = flops_spec(budget_start_fraction=0.25, budget_ramp_fraction=0.1,
                    budget_bounds_fraction=0.2)
  schedule = regularizers.budget_schedule(spec, 100)
  at = lambda step, key: float(schedule(step)[key])
  np.testing.assert_allclose([at(s, 'scale') for s in (0, 24, 25, 30, 35, 99)],
                             [0, 0, 0, 0.5, 1, 1], atol=1e-6)
  # The bounds relax over 20 steps from the start at 25.
  np.testing.assert_allclose(
      [at(s, 'tightness') for s in (0, 25, 35, 45, 99)],
      [1, 1, 0.5, 0, 0], atol=1e-6)
  assert float(regularizers.gate_regularizer(spec, {}, DENSITIES, costs=COSTS,
                                    budget=schedule(10))) == 0.0
  # No ramp: full weight from the start step on.
  sharp = regularizers.budget_schedule(flops_spec(budget_start_fraction=0.5), 10)
  np.testing.assert_allclose([float(sharp(s)['scale']) for s in (4, 5, 9)],
                             [0, 1, 1])
  # Without bounds the tightness is 0 throughout.
  assert float(sharp(0)['tightness']) == 0.0


