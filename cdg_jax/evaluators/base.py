"""What every evaluator reads: `EvalContext`, one network and its data.

An evaluator is a function `evaluate(context) -> dict` of scalars (and a few
small dicts: per-layer densities, a FLOPs report). Evaluators of one network
share the context, so the features of each split are extracted once
however many evaluators read them (kNN, the fast linear probe and the FLOPs
all read the same eval-mode features).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction


@dataclasses.dataclass
class EvalContext:
  """One network to evaluate, its data and settings.

  Attributes:
    backbone: the backbone (no head), already in its inference form
      (`extraction.inference_backbone`: block-sparse when asked).
    variables: its variables ('params', 'batch_stats').
    source: the data source; 'test' is the evaluation split (the held-out
      validation rows when `data.validation_size` is set).
    mesh: device mesh with a 'data' axis.
    augment_config: the run's `augment` block (evaluation normalisation).
    eval_config: the run's `eval` block (kNN settings).
    batch_size: the evaluation batch, a multiple of the mesh size.
    seed: seed of any training an evaluator does (linear probes).
    linear_settings: the `linear_eval` block as plain values
      (`cdg_jax.linear_eval.linear_settings`); None where unused.
  """
  backbone: nn.Module
  variables: Mapping[str, Any]
  source: input_pipeline.Source
  mesh: jax.sharding.Mesh
  augment_config: ml_collections.ConfigDict
  eval_config: Mapping[str, Any]
  batch_size: int
  seed: int = 0
  linear_settings: Mapping[str, Any] | None = None
  _features: dict[str, dict[str, Any]] = dataclasses.field(
      default_factory=dict, repr=False)

  def features(self, split: str) -> dict[str, Any]:
    """`extraction.extract_features` of `split`, extracted once per context."""
    if split not in self._features:
      self._features[split] = extraction.extract_features(
          self.backbone, self.variables, self.source, split, self.batch_size,
          self.augment_config, self.mesh)
    return self._features[split]

  def with_backbone(self, backbone: nn.Module) -> 'EvalContext':
    """The same data and settings for another network (fresh features)."""
    return dataclasses.replace(self, backbone=backbone, _features={})


Evaluator = Callable[[EvalContext], dict[str, Any]]
