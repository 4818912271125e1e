"""The gating library: CDG's gated convolutions for any Flax network.

  ops               pure functions: saliency, gates, the gated convolution
  layers            `GatingSpec` (what a gated layer computes) and `GatedConv`
  predictors        the predictor baselines' pure ops (channel, spatial)
  flops             per-layer MACs of any Flax model, reports at densities
  regularizers      `RegularizerSpec` and the gates' auxiliary losses, the
                    FLOPs budget schedule
  tiling            tiles of tile-gated convolutions: geometry, gathers
  sparse            block-sparse inference: the closed tiles skipped
  sparse_training   the sparse train step's gated convolution (custom VJP)

It needs JAX and Flax only: importing it loads neither optax, orbax,
TensorFlow nor the training program (`cdg_jax.ssl`, `cdg_jax.run`, ...).
"""

from cdg_jax.gating.flops import FlopsReport
from cdg_jax.gating.flops import flops_report
from cdg_jax.gating.flops import layer_costs
from cdg_jax.gating.flops import mean_densities
from cdg_jax.gating.layers import DENSITY_COLLECTION
from cdg_jax.gating.layers import GatedConv
from cdg_jax.gating.layers import GatingSpec
from cdg_jax.gating.layers import MASK_COLLECTION
from cdg_jax.gating.ops import gated_conv
from cdg_jax.gating.regularizers import RegularizerSpec
from cdg_jax.gating.regularizers import budget_schedule
from cdg_jax.gating.regularizers import gate_regularizer

__all__ = ['DENSITY_COLLECTION', 'FlopsReport', 'GatedConv', 'GatingSpec',
           'MASK_COLLECTION', 'RegularizerSpec', 'budget_schedule',
           'flops_report', 'gate_regularizer', 'gated_conv', 'layer_costs',
           'mean_densities']
