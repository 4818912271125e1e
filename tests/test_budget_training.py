"""The FLOPs budget in the program: the train step minimises it and reports its
schedule, and its config fields are checked."""

import dataclasses

import jax
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import regularizers
from cdg_jax.gating.regularizers import RegularizerSpec
from cdg_jax.run import config_lib
from cdg_jax.ssl import pretraining

import test_pretraining

# tests/gating/test_budget.py's budget, as the program's step uses it.
FLOPS_SPEC = RegularizerSpec(regularizer='flops', weight=2.0,
                             density_target=0.25)


def test_regulariser_and_report_are_one_computation():
  config = test_pretraining.tiny_config('simclr')
  costs = pretraining.assemble(test_pretraining.settings_of(config)).costs
  gated = [c.name for c in costs if c.gated]
  assert len(gated) == 8
  densities = dict(zip(gated, np.random.default_rng(0).uniform(0, 1, 8)))
  report = flops.flops_report(costs, densities)
  spec = FLOPS_SPEC
  target = regularizers.budget_fraction(costs, 0.25)
  np.testing.assert_allclose(
      regularizers.gate_regularizer(spec, {}, densities, costs=costs),
      2 * (report.gated_flops_fraction - target) ** 2, rtol=1e-6)
  summary = regularizers.budget_summary(spec, costs)
  np.testing.assert_allclose(summary['flops_reduction'], flops.flops_report(
      costs, {name: 0.25 for name in gated}).reduction, rtol=1e-6)
  np.testing.assert_allclose(summary['gated_flops_fraction'], 0.4375)
  # Each layer's share of the backbone's dense MACs sums to 1 with the
  # ungated layers.
  np.testing.assert_allclose(sum(report.layer_flops_share.values()), 1.0)
  assert regularizers.budget_summary(RegularizerSpec(), costs) is None
  assert regularizers.budget_summary(None, costs) is None
  line = regularizers.describe_budget(
      dataclasses.replace(FLOPS_SPEC, budget_bounds_fraction=1 / 3), costs)
  assert '43.8% of their dense MACs' in line and 'over 33% of training' in line


def test_train_step_minimises_the_budget_and_reports_its_schedule():
  config = test_pretraining.tiny_config('simclr', num_steps=4)
  config.gating.regularizer = 'flops'
  config.gating.weight = 3.0
  config.gating.budget_bounds_fraction = 0.5
  networks, state, mesh, step_fn = test_pretraining.setup(config)
  costs = pretraining.online_costs(networks, config.data.image_size)
  step = pretraining.jit_train_step(step_fn, mesh)
  state, metrics = step(state, test_pretraining.fixed_batch())
  metrics = jax.device_get(metrics)
  assert metrics['budget_scale'] == 1.0 and metrics['bound_tightness'] == 1.0
  densities = metrics['layer_density']
  dense, effective = flops.gated_macs(costs, densities)
  bounds = np.mean([(d - 0.25) ** 2 for d in densities.values()])
  np.testing.assert_allclose(
      metrics['gate_loss'], 3.0 * ((effective / dense - 0.4375) ** 2 + bounds),
      rtol=1e-5)


@pytest.mark.parametrize('fields,words', [
    (dict(budget_bounds_fraction=0.3), "gating.budget_bounds_fraction=0.3 "
     "would be ignored: it is read only with the FLOPs budget"),
    (dict(regularizer='flops', budget_start_fraction=1.5),
     'gating.budget_start_fraction must be in [0, 1]'),
    (dict(regularizer='flops', budget_start_fraction=0.8,
          budget_ramp_fraction=0.4), 'would never reach full weight'),
    (dict(regularizer='flops', density_target=0.0),
     'gating.density_target must be in (0, 1]'),
])
def test_budget_fields_are_checked(fields, words):
  with pytest.raises(ValueError, match=words.replace('(', r'\(').replace(
      ')', r'\)').replace('[', r'\[').replace(']', r'\]')):
    config_lib.read_gating(fields)
