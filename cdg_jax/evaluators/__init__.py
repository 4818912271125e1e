"""Evaluation of a pretrained backbone behind one interface.

An evaluator is `evaluate(context) -> dict` (`base.EvalContext`: the network,
its data, settings and the features shared between evaluators), chosen by
name from `EVALUATORS`:

  'knn'               weighted kNN top-1/top-5 (knn.py; the SSL monitor)
  'linear_fast'       the fast linear probe on frozen features (linear.py)
  'linear_augmented'  the literature's linear probe on augmented images
  'flops'             test-set FLOPs and gate densities (gate_flops.py)

The training loop runs ('knn', 'flops') (`knn_eval`), `cdg_jax.linear_eval`
runs (f'linear_{linear_eval.protocol}', 'flops'); after a dense-partner run
both evaluate the run's dense network too, with the same evaluators
(`evaluate_dense_path`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.evaluators import gate_flops
from cdg_jax.evaluators import knn
from cdg_jax.evaluators import linear
from cdg_jax.evaluators.base import EvalContext
from cdg_jax.evaluators.base import Evaluator
from cdg_jax.ssl import models

EVALUATORS: dict[str, Evaluator] = {
    'knn': knn.evaluate,
    'linear_fast': linear.evaluate_fast,
    'linear_augmented': linear.evaluate_augmented,
    'flops': gate_flops.evaluate,
}
# The evaluators of a training run, during training and at its end.
KNN_EVALUATORS = ('knn', 'flops')
# What the training loop reports of its evaluators, in this order (the
# kNN monitor's metrics and summary).
KNN_EVAL_KEYS = ('knn_top1', 'knn_top5', 'flops_reduction', 'gate_density',
                 'gated_flops_fraction', 'layer_density', 'layer_flops_share')


def evaluate(names: Sequence[str], context: EvalContext) -> dict[str, Any]:
  """The named evaluators' results on one context, merged in order."""
  unknown = [name for name in names if name not in EVALUATORS]
  if unknown:
    raise ValueError(f'Unknown evaluator(s) {unknown}; known: '
                     f'{sorted(EVALUATORS)}.')
  results = {}
  for name in names:
    results.update(EVALUATORS[name](context))
  return results


def evaluate_dense_path(names: Sequence[str], context: EvalContext,
                        keys: Sequence[str]) -> dict[str, Any]:
  """`keys` of the named evaluators on a dense-partner run's dense network:
  the same weights with every gate open (`models.dense_path`)."""
  # `dense_path` keeps the inference form (block-sparse or not).
  results = evaluate(names,
                     context.with_backbone(models.dense_path(context.backbone)))
  return {key: results[key] for key in keys}


def context_for(backbone: nn.Module, variables: Mapping[str, Any],
                source: input_pipeline.Source,
                eval_config: Mapping[str, Any] | None,
                augment_config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh, **settings) -> EvalContext:
  """The context of a run's `eval` block: the inference backbone (sparse
  when `eval.sparse_inference`) and the eval batch rounded to the mesh."""
  eval_config = eval_config or {}
  batch_size = extraction.eval_batch_size(
      eval_config.get('batch_size', extraction.DEFAULT_EVAL_BATCH_SIZE), mesh)
  return EvalContext(
      backbone=extraction.inference_backbone(backbone, eval_config),
      variables=variables, source=source, mesh=mesh,
      augment_config=augment_config, eval_config=eval_config,
      batch_size=batch_size, **settings)


def knn_eval(backbone: nn.Module, variables: Mapping[str, Any],
             source: input_pipeline.Source, eval_config: Mapping[str, Any],
             augment_config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """kNN accuracy and test-set FLOPs of a backbone, for the training loop.

  The memory bank is the whole train split, the queries the whole test split,
  both without augmentation and in eval mode. FLOPs and densities are those
  of the test split.

  Args:
    backbone: the online backbone (no head).
    variables: its variables ('params', 'batch_stats').
    source: the data source.
    eval_config: the run's `eval` block: `knn_k`, `knn_temperature`,
      `batch_size` (defaults 200, 0.1, 500 when absent), `sparse_inference`
      (block-sparse execution of tile-gated layers; the same features).
    augment_config: the run's `augment` block (the evaluation preprocessing).
    mesh: device mesh with a 'data' axis.

  Returns:
    `KNN_EVAL_KEYS` of the 'knn' and 'flops' evaluators, Python floats.
  """
  context = context_for(backbone, variables, source, eval_config,
                        augment_config, mesh)
  results = evaluate(KNN_EVALUATORS, context)
  return {key: results[key] for key in KNN_EVAL_KEYS}


__all__ = ['EVALUATORS', 'EvalContext', 'Evaluator', 'KNN_EVALUATORS',
           'KNN_EVAL_KEYS',
           'context_for', 'evaluate', 'evaluate_dense_path', 'knn_eval']
