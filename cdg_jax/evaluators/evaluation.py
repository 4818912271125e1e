"""Evaluation of a (gated) backbone: features, kNN monitor, test-set FLOPs.

Everything here runs the backbone in evaluation mode (`train=False`): BatchNorm
uses its running averages and CDG gates normalise the saliency with their
running statistics, so an image's features and mask do not depend on the other
images of its batch (lightly issue #1440 shows what goes wrong otherwise).
Every split is read whole: `Source.eval_batches` pads the last batch and masks
the padding, which is dropped here, so each example is counted exactly once.

  extract_features  backbone features, labels and mean gate densities of a split
  knn_predict       weighted kNN on l2-normalised features (the SSL monitor)
  knn_classify      its top-1/top-5 accuracy
  test_set_flops    FLOPs report from measured densities
  knn_eval          all of it for the training loop: bank = train split,
                    queries = test split, FLOPs measured on the test split
  open_gates        a CDG backbone's variables with every gate forced open
                    (the trained weights evaluated as a dense network)

Typical use, on an exported backbone:

  config, backbone, variables = checkpoints.load_backbone(workdir)
  source = input_pipeline.create_source(config.data)
  metrics = evaluation.knn_eval(backbone, variables, source, config.eval,
                                config.augment, parallel.make_mesh())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

# Defaults of `config.eval` (used when a config, e.g. an old run's, lacks it).
DEFAULT_KNN_K = 200
DEFAULT_KNN_TEMPERATURE = 0.1
DEFAULT_EVAL_BATCH_SIZE = 500


# ---------------------------------------------------------------------------
# Feature extraction.
# ---------------------------------------------------------------------------


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
  return jax.jit(forward,
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


# ---------------------------------------------------------------------------
# kNN monitor.
# ---------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'top'))
def _knn_chunk(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array,
               temperature: jax.Array, *, k: int, num_classes: int,
               top: int) -> jax.Array:
  """Top-`top` classes of (Q, D) queries against an (N, D) normalised bank."""
  queries = _l2_normalize(queries)
  # Full precision: on TPU the default f32 matmul uses bf16 passes, which
  # would reorder near-tied neighbours.
  sim = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)                    # (Q, k)
  top_labels = bank_labels[top_idx]                           # (Q, k)
  # exp(sim / T) up to a per-query factor exp(-max / T): same ranking of the
  # classes, but no overflow for small temperatures. (`max`, not the equal
  # `top_sim[:, :1]`: XLA:CPU ran the chunk 20x slower with the slice.)
  weights = jnp.exp(
      (top_sim - jnp.max(top_sim, axis=1, keepdims=True)) / temperature)
  rows = jnp.arange(queries.shape[0])[:, None]
  votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
  votes = votes.at[rows, top_labels].add(weights)             # (Q, C)
  return jax.lax.top_k(votes, top)[1]


def _check_features(features: np.ndarray, labels: np.ndarray,
                    name: str) -> None:
  if features.ndim != 2:
    raise ValueError(f'{name}_features must be (N, D), got shape '
                     f'{features.shape}.')
  if labels.shape != (features.shape[0],):
    raise ValueError(f'{name}_labels must have shape ({features.shape[0]},) to '
                     f'match {name}_features, got {labels.shape}.')
  if features.shape[0] == 0:
    raise ValueError(f'{name}_features is empty.')


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                test_features: np.ndarray, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk_size: int = 256) -> np.ndarray:
  """Weighted kNN class ranking, as in the SSL literature.

  InstDisc / solo-learn style: features are l2-normalised, a query's k
  nearest bank entries by cosine similarity each vote for their label with
  weight exp(sim / temperature), and classes are ranked by summed votes.
  Queries are processed in chunks of `chunk_size` (the last one padded), so
  memory is O(chunk_size * N_bank) however many queries there are.

  Args:
    train_features: (N, D) memory bank.
    train_labels: (N,) integer labels in [0, num_classes).
    test_features: (Q, D) queries.
    num_classes: C.
    k: neighbours; clipped to N when the bank is smaller.
    temperature: T > 0 of the vote weights.
    chunk_size: queries per jitted call.

  Returns:
    int32 (Q, min(5, C)): classes by decreasing vote, column 0 the prediction.
  """
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels)
  test_features = np.asarray(test_features, np.float32)
  _check_features(train_features, train_labels, 'train')
  if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1]:
    raise ValueError(f'test_features must be (Q, {train_features.shape[1]}) '
                     f'like the bank, got shape {test_features.shape}.')
  if num_classes < 1:
    raise ValueError(f'num_classes must be positive, got {num_classes}.')
  if not np.issubdtype(train_labels.dtype, np.integer):
    raise ValueError(f'train_labels must be integers, got {train_labels.dtype}.')
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f'train_labels lie in [{train_labels.min()}, '
                     f'{train_labels.max()}], outside [0, {num_classes}).')
  if k < 1:
    raise ValueError(f'knn k must be >= 1, got {k}.')
  if not temperature > 0:
    raise ValueError(f'knn temperature must be > 0, got {temperature}.')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')
  num_queries = test_features.shape[0]
  if num_queries == 0:
    return np.zeros((0, min(5, num_classes)), np.int32)

  k = min(k, train_features.shape[0])
  top = min(5, num_classes)
  chunk_size = min(chunk_size, num_queries)
  bank = _l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  temperature = jnp.float32(temperature)
  padded = math.ceil(num_queries / chunk_size) * chunk_size
  queries = np.zeros((padded, test_features.shape[1]), np.float32)
  queries[:num_queries] = test_features
  # Dispatch every chunk before fetching any (no host sync in the loop).
  outputs = [_knn_chunk(bank, bank_labels, queries[i:i + chunk_size],
                        temperature, k=k, num_classes=num_classes, top=top)
             for i in range(0, padded, chunk_size)]
  return np.concatenate(jax.device_get(outputs))[:num_queries].astype(np.int32)


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, k: int = DEFAULT_KNN_K,
                 temperature: float = DEFAULT_KNN_TEMPERATURE,
                 chunk_size: int = 256) -> dict[str, float]:
  """Top-1/top-5 accuracy of the weighted kNN classifier (see `knn_predict`).

  Args:
    train_features: (N, D) memory bank; train_labels: (N,).
    test_features: (Q, D) queries; test_labels: (Q,).
    num_classes: C. With C <= 5, top-5 is trivially 1.
    k, temperature, chunk_size: as in `knn_predict`.

  Returns:
    {'top1': float, 'top5': float}, fractions in [0, 1].
  """
  test_labels = np.asarray(test_labels)
  _check_features(np.asarray(test_features), test_labels, 'test')
  ranked = knn_predict(train_features, train_labels, test_features,
                       num_classes, k, temperature, chunk_size)
  hits = ranked == test_labels[:, None]
  return {'top1': float(np.mean(hits[:, 0])),
          'top5': float(np.mean(np.any(hits, axis=1)))}


# ---------------------------------------------------------------------------
# FLOPs and the combined evaluation.
# ---------------------------------------------------------------------------


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
    {'knn_top1', 'knn_top5', 'flops_reduction', 'gate_density' (MAC-weighted
    over gated layers; 1.0 for a dense backbone), 'gated_flops_fraction'
    (the gated layers' effective / dense MACs; 1.0 dense), 'layer_density':
    {name: density}, 'layer_flops_share': {gated layer: its share of the
    backbone's dense MACs}}, Python floats.
  """
  eval_config = eval_config or {}
  backbone = inference_backbone(backbone, eval_config)
  batch_size = eval_batch_size(
      eval_config.get('batch_size', DEFAULT_EVAL_BATCH_SIZE), mesh)
  train = extract_features(backbone, variables, source, 'train', batch_size,
                           augment_config, mesh)
  test = extract_features(backbone, variables, source, 'test', batch_size,
                          augment_config, mesh)
  knn = knn_classify(train['features'], train['labels'], test['features'],
                     test['labels'], source.num_classes,
                     k=eval_config.get('knn_k', DEFAULT_KNN_K),
                     temperature=eval_config.get('knn_temperature',
                                                 DEFAULT_KNN_TEMPERATURE))
  report = test_set_flops(backbone, variables, test['densities'],
                          source.image_shape[:2])
  gated = report.gated_density
  return {
      'knn_top1': knn['top1'],
      'knn_top5': knn['top5'],
      'flops_reduction': float(report.reduction),
      'gate_density': 1.0 if gated is None else float(gated),
      'gated_flops_fraction': (1.0 if report.gated_flops_fraction is None
                               else float(report.gated_flops_fraction)),
      'layer_density': dict(test['densities']),
      'layer_flops_share': {name: share for name, share
                            in report.layer_flops_share.items()
                            if name in test['densities']},
  }
