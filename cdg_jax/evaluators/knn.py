"""The weighted kNN monitor of SSL training (InstDisc / solo-learn style).

  knn_predict   class ranking of queries against a feature bank
  knn_classify  its top-1/top-5 accuracy
  evaluate      the evaluator: bank = the train split, queries = the
                evaluation split, both from the context's shared features
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Defaults of `config.eval` (used when a config, e.g. an old run's, lacks it).
DEFAULT_KNN_K = 200


DEFAULT_KNN_TEMPERATURE = 0.1


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


def evaluate(context) -> dict[str, Any]:
  """kNN top-1/top-5 of the context's backbone: {'knn_top1', 'knn_top5'}.

  `context.eval_config` gives `knn_k` and `knn_temperature` (defaults
  `DEFAULT_KNN_K`, `DEFAULT_KNN_TEMPERATURE` when absent).
  """
  train, test = context.features('train'), context.features('test')
  eval_config = context.eval_config
  knn = knn_classify(train['features'], train['labels'], test['features'],
                     test['labels'], context.source.num_classes,
                     k=eval_config.get('knn_k', DEFAULT_KNN_K),
                     temperature=eval_config.get('knn_temperature',
                                                 DEFAULT_KNN_TEMPERATURE))
  return {'knn_top1': knn['top1'], 'knn_top5': knn['top5']}
