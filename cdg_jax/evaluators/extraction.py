"""Features of a whole split from a backbone in evaluation mode.

Everything here runs the backbone in evaluation mode (`train=False`): BatchNorm
uses its running averages and CDG gates normalise the saliency with their
running statistics, so an image's features and mask do not depend on the other
images of its batch (lightly issue #1440 shows what goes wrong otherwise).
Every split is read whole: `Source.eval_batches` pads the last batch and masks
the padding, which is dropped here, so each example is counted exactly once.

  extract_features    backbone features, labels and mean gate densities
  eval_batch_size     the eval batch rounded up to the devices
  inference_backbone  the backbone with block-sparse inference when asked
  open_gates          a CDG backbone's variables with every gate forced open
                      (the trained weights evaluated as a dense network)
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdg_jax.data import augment
from cdg_jax.data import batching
from cdg_jax.data import input_pipeline
from cdg_jax.gating import flops
from cdg_jax.gating.layers import DENSITY_COLLECTION
from cdg_jax.run import parallel
from cdg_jax.ssl import models

# Default of `config.eval.batch_size` (used when a config, e.g. an old run's,
# lacks it).
DEFAULT_EVAL_BATCH_SIZE = 500


@functools.lru_cache(maxsize=32)
def _eval_forward(backbone: nn.Module, mean: tuple[float, ...],
                  std: tuple[float, ...], mesh: jax.sharding.Mesh):
  """The jitted evaluation forward of one backbone over one mesh.

  Cached on (backbone, normalisation, mesh) -- all hashable -- so that repeated
  evaluations during training (train and test split, every eval period)
  reuse one compiled function: with the fixed batch shape of
  `eval_batches` it is traced once.
  """
  stats = ml_collections.ConfigDict({'mean': mean, 'std': std})

  def forward(variables, batch):
    images = augment.preprocess_eval(batch['image'], stats)
    features, state = backbone.apply(variables, images, train=False,
                                     mutable=[DENSITY_COLLECTION])
    mask = batch['mask']
    densities = flops.per_sample_densities(state.get(DENSITY_COLLECTION, {}))
    return {
        'features': features.astype(jnp.float32),
        'label': batch['label'],
        'mask': mask,
        # Sums over the real examples only; divided by their count on the host.
        'density_sums': {name: jnp.sum(d * mask)
                         for name, d in densities.items()},
    }

  # Outputs replicated: every process gets the whole global batch (features of
  # other processes' rows included), which is what the kNN bank needs.
  # Traced under the mesh: sparse inference's executor runs per device.
  return jax.jit(parallel.traced_under(mesh, forward),
                 in_shardings=(parallel.replicated(mesh),
                               parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def extract_features(backbone: nn.Module, variables: Mapping[str, Any],
                     source: input_pipeline.Source, split: str,
                     batch_size: int,
                     augment_config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Features, labels and gate densities of a whole split, in eval mode.

  The forward (uint8 -> `augment.preprocess_eval` -> backbone with
  `train=False`) is jitted once per (backbone, normalisation, mesh); batches
  are sharded over the mesh's 'data' axis. The padding of the last batch is
  dropped with the mask, so every example of the split appears exactly once,
  in the source's order.

  Args:
    backbone: a `models.ResNet` without head (returns pooled features).
    variables: its variables ('params', 'batch_stats'); replicated over the
      mesh here (a no-op when they already are).
    source: the data source.
    split: 'train' or 'test'.
    batch_size: global evaluation batch size; a multiple of the mesh size.
    augment_config: the `augment` block (its `mean` and `std` are used).
    mesh: device mesh with a 'data' axis.

  Returns:
    {'features': float32 (N, D), 'labels': int32 (N,), 'densities': {gated
    layer name: mean gate density over the N real examples}} as numpy / Python
    floats, N = `source.num_examples(split)`. `densities` is empty for a dense
    backbone.
  """
  parallel.check_batch_divisible(batch_size, mesh, 'eval batch_size')
  forward = _eval_forward(backbone, tuple(float(m) for m in augment_config.mean),
                          tuple(float(s) for s in augment_config.std), mesh)
  variables = parallel.replicate(variables, mesh)
  batches = batching.prefetch(
      (batching.shard_batch(b, mesh)
       for b in source.eval_batches(split, batch_size)), size=2)

  features, labels = [], []
  density_sums: dict[str, float] = {}
  count = 0.0

  def consume(out):
    nonlocal count
    out = jax.device_get(out)
    real = out['mask'] > 0
    features.append(out['features'][real])
    labels.append(out['label'][real])
    count += float(np.sum(out['mask']))
    for name, value in out['density_sums'].items():
      density_sums[name] = density_sums.get(name, 0.0) + float(value)

  # Fetch batch i only after dispatching batch i + 1, so that the device
  # computes while the host copies results back.
  pending = None
  for batch in batches:
    out = forward(variables, batch)
    if pending is not None:
      consume(pending)
    pending = out
  if pending is not None:
    consume(pending)
  if not features or count == 0:
    raise ValueError(f'The {split!r} split of the source is empty; nothing to '
                     f'evaluate.')

  result = {
      'features': np.concatenate(features).astype(np.float32),
      'labels': np.concatenate(labels).astype(np.int32),
      'densities': {name: s / count for name, s in density_sums.items()},
  }
  expected = source.num_examples(split)
  if len(result['labels']) != expected:
    # Sizes of streamed TFDS splits are declared, not counted; say so loudly.
    logging.warning('Read %d examples from the %s split, but the source '
                    'declares %d.', len(result['labels']), split, expected)
  return result


def eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh size.

  Evaluation pads and masks, so a larger batch changes nothing but the shape;
  rounding spares users a config edit when the device count changes.
  """
  if batch_size < 1:
    raise ValueError(f'eval.batch_size must be positive, got {batch_size}.')
  n = mesh.devices.size
  rounded = math.ceil(batch_size / n) * n
  if rounded != batch_size:
    logging.info('Evaluation batch size %d rounded up to %d, a multiple of the '
                 '%d devices.', batch_size, rounded, n)
  return rounded


# Far below any normalised saliency, yet finite: the gate's straight-through
# surrogate `sigmoid(alpha * (saliency - threshold))` must stay a number.
OPEN_GATE_THRESHOLD = -1e9


def open_gates(variables: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of a CDG backbone's variables with every gate forced open.

  Sets each gated layer's `threshold` to `OPEN_GATE_THRESHOLD`, so that the
  mask is 1 everywhere and each layer computes `Y_base + Y_cond`, the dense
  convolution with the trained kernel. Evaluating both tells whether an
  accuracy gap comes from the weights learned under gating or from the masks
  applied at test time.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a backbone with
      `gating.kind='cdg'`.

  Returns:
    The same structure; only the thresholds differ.

  Raises:
    ValueError: the params hold no `threshold` (a dense network or a
      predictor baseline, whose masks do not come from thresholds).
  """
  def is_threshold(path) -> bool:
    return getattr(path[-1], 'key', None) == 'threshold'

  paths = [path for path, _ in
           jax.tree_util.tree_flatten_with_path(variables['params'])[0]]
  if not any(map(is_threshold, paths)):
    raise ValueError('open_gates needs a CDG backbone (gating.kind=\'cdg\'); '
                     'its params hold no `threshold`.')
  params = jax.tree_util.tree_map_with_path(
      lambda path, value: (np.full(np.shape(value), OPEN_GATE_THRESHOLD,
                                   value.dtype)
                           if is_threshold(path) else value),
      variables['params'])
  return {**variables, 'params': params}


def config_problems(eval_config: Mapping[str, Any]) -> list[str]:
  """Every out-of-range value of an `eval` block, each naming its field."""
  checks = [
      (eval_config['batch_size'] > 0,
       f"eval.batch_size={eval_config['batch_size']} must be positive."),
      (eval_config['knn_k'] > 0,
       f"eval.knn_k={eval_config['knn_k']} must be positive."),
      (eval_config['knn_temperature'] > 0, f"eval.knn_temperature="
       f"{eval_config['knn_temperature']} must be positive."),
      (eval_config['every_steps'] >= 0, f"eval.every_steps="
       f"{eval_config['every_steps']} must be >= 0 (0: only at the end)."),
  ]
  return [message for ok, message in checks if not ok]


def inference_backbone(backbone: nn.Module,
                       eval_config: Mapping[str, Any]) -> nn.Module:
  """The backbone with block-sparse inference if `eval.sparse_inference`."""
  if eval_config.get('sparse_inference', False):
    return models.with_sparse_inference(backbone)
  return backbone
