"""Test-set FLOPs: the backbone's cost at the gate densities it measured.

  test_set_flops  a `FlopsReport` at given mean densities
  evaluate        the evaluator: FLOPs, gate densities and each gated
                  layer's share, on the evaluation split's densities
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdg_jax.gating import flops


def test_set_flops(backbone: nn.Module, variables: Mapping[str, Any],
                   densities: Mapping[str, float],
                   image_size: int | Sequence[int]) -> flops.FlopsReport:
  """FLOPs report of `backbone` at the given mean gate densities.

  Args:
    backbone: the network.
    variables: its variables (only shapes are used).
    densities: {gated layer name: mean density}, e.g. `extract_features(...,
      'test', ...)['densities']`; empty for a dense backbone.
    image_size: input resolution S (square) or (H, W).

  Returns:
    `flops.FlopsReport`, per example; `.reduction` is dense / gated backbone
    MACs.
  """
  height, width = ((image_size, image_size) if isinstance(image_size, int)
                   else tuple(image_size))
  x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  costs = flops.layer_costs(backbone, variables, x, train=False)
  return flops.flops_report(costs, densities)


def evaluate(context) -> dict[str, Any]:
  """FLOPs of the context's backbone at its evaluation-split densities.

  Returns:
    {'flops_reduction', 'gate_density' (MAC-weighted over gated layers; 1.0
    for a dense backbone), 'gated_flops_fraction' (the gated layers'
    effective / dense MACs; 1.0 dense), 'layer_density': {name: density},
    'layer_flops_share': {gated layer: its share of the backbone's dense
    MACs}, 'flops': the full report (`FlopsReport.as_dict`)}, Python floats.
  """
  densities = context.features('test')['densities']
  report = test_set_flops(context.backbone, context.variables, densities,
                          context.source.image_shape[:2])
  gated = report.gated_density
  return {
      'flops_reduction': float(report.reduction),
      'gate_density': 1.0 if gated is None else float(gated),
      'gated_flops_fraction': (1.0 if report.gated_flops_fraction is None
                               else float(report.gated_flops_fraction)),
      'layer_density': {name: float(d) for name, d in densities.items()},
      'layer_flops_share': {name: share for name, share
                            in report.layer_flops_share.items()
                            if name in densities},
      'flops': report.as_dict(),
  }
