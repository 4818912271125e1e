"""cdg_jax: Contrastive Dual Gating (dynamic spatial pruning learned during
contrastive self-supervised learning) in JAX and Flax.

The public API, for gating your own Flax network (README, "Gate your own Flax
network"):

  GatingSpec          what a gated layer computes (kind, groups, block, ...)
  RegularizerSpec     the gates' loss (form, lambda, density target, budget)
  GatedConv           flax.linen.Conv gated by CDG (or plain, spec None),
                      with nn.Conv's padding, bias, dtypes and precision
  gated_conv          the same as a pure function of arrays
  DENSITY_COLLECTION  the collection where gated layers sow their densities
  MASK_COLLECTION     ... and, when mutable, their masks
  mean_densities      {layer: mean density} from the sown collection
  gate_regularizer    the gates' auxiliary loss (per-layer target, FLOPs
                      budget, threshold forms), times lambda
  budget_schedule     the FLOPs budget's start/ramp and bound schedule
  layer_costs         per-layer MACs of any Flax model, from traced shapes
  flops_report        per-layer and total MACs at given densities
  FlopsReport         its result (`.reduction`, `.format_table()`, ...)
  create_resnet       the gated ResNets of this project
  ResNetGating        their gating: a GatingSpec plus where the gated
                      layers sit (`layers` roles, `stage_blocks`)
  configure_cpu       XLA:CPU's flags as this project measured them (one
                      device per core, XLA's own convolution kernels); call
                      before JAX starts, as cdg_jax.main does

The package has two halves:

  cdg_jax.gating      the library: gated Flax layers and their pure ops,
                      predictors, FLOPs counting, regularisers, the sparse
                      executors. Imports neither optax, orbax nor TensorFlow.
  the program         cdg_jax.ssl (ResNets, SSL frameworks, the train step),
                      cdg_jax.data (sources, batches, augmentation),
                      cdg_jax.evaluators (kNN, linear, FLOPs), cdg_jax.run
                      (config parse, checkpoints, logging, processes) and the
                      commands cdg_jax.main, cdg_jax.linear_eval,
                      cdg_jax.flops_table around cdg_jax.train.

These names are stable; everything else is reachable through its module
and may change. They are imported
on first use, so `import cdg_jax` stays light and `python -m cdg_jax.<module>`
runs each module once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = '0.1.0'

# Public name -> the module that defines it.
_EXPORTS = {
    'GatingSpec': 'cdg_jax.gating.layers',
    'GatedConv': 'cdg_jax.gating.layers',
    'DENSITY_COLLECTION': 'cdg_jax.gating.layers',
    'MASK_COLLECTION': 'cdg_jax.gating.layers',
    'gated_conv': 'cdg_jax.gating.ops',
    'mean_densities': 'cdg_jax.gating.flops',
    'layer_costs': 'cdg_jax.gating.flops',
    'flops_report': 'cdg_jax.gating.flops',
    'FlopsReport': 'cdg_jax.gating.flops',
    'gate_regularizer': 'cdg_jax.gating.regularizers',
    'RegularizerSpec': 'cdg_jax.gating.regularizers',
    'budget_schedule': 'cdg_jax.gating.regularizers',
    'create_resnet': 'cdg_jax.ssl.models',
    'ResNetGating': 'cdg_jax.ssl.models',
    'configure_cpu': 'cdg_jax.run.parallel',
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from cdg_jax.gating.flops import FlopsReport, flops_report, layer_costs, mean_densities  # pylint: disable=g-multiple-import
  from cdg_jax.gating.layers import DENSITY_COLLECTION, MASK_COLLECTION, GatedConv, GatingSpec  # pylint: disable=g-multiple-import
  from cdg_jax.gating.ops import gated_conv
  from cdg_jax.gating.regularizers import RegularizerSpec, budget_schedule, gate_regularizer  # pylint: disable=g-multiple-import
  from cdg_jax.run.parallel import configure_cpu
  from cdg_jax.ssl.models import ResNetGating, create_resnet  # pylint: disable=g-multiple-import


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value   # later lookups skip this function
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
