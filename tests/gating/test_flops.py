"""The library's FLOPs counting: the effective-MACs formula, the traced
reduction and density means (the ResNets' counts against hand counts and
XLA's cost analysis: tests/test_flops_resnet.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops


def test_effective_macs_formula_and_traced_reduction():
  gated = flops.LayerCost('a', 'conv', 'backbone', 1000, 4, (2, 2, 8), 1200)
  dense = flops.LayerCost('b', 'conv', 'backbone', 600, 0, (2, 2, 8), 700)
  head = flops.LayerCost('h', 'dense', 'head', 50, 0, (5,), 50)
  assert gated.effective_macs(0.2) == pytest.approx(1000 * (0.25 + 0.75 * 0.2))
  assert dense.effective_macs(None) == 600
  costs = (gated, dense, head)
  fn = jax.jit(lambda d: flops.flops_reduction(costs, {'a': d}))
  np.testing.assert_allclose(fn(jnp.float32(0.2)), 1600 / 1000, rtol=1e-6)
  np.testing.assert_allclose(fn(jnp.float32(1.0)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='No measured density for gated layer a'):
    flops.flops_report(costs, {})


def test_weighted_mean_densities_ignore_padding():
  collection = {'layer': {'density': (jnp.array([0.2, 0.4, 0.9]),)}}
  dens = flops.mean_densities(collection, weights=jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(dens['layer'], 0.3, rtol=1e-6)


