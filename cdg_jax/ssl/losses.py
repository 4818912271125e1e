"""Pure SSL losses and embedding diagnostics.

All losses take the *global* batch: under `jax.jit` over a sharded batch the
arrays here are logically global, so SimCLR's negatives come from every device
without any collective written by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def l2_normalize(x: Array, axis: int = -1, epsilon: float = 1e-12) -> Array:
  """x / max(||x||, sqrt(eps)) along `axis`."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, epsilon))


def nt_xent(z1: Array, z2: Array, temperature: float = 0.5) -> Array:
  """SimCLR's normalised-temperature cross entropy over 2N embeddings.

  Each of the 2N embeddings has one positive (the other view of its image) and
  2N - 2 negatives (all other embeddings); the loss is the mean over all 2N
  anchors of `-log(exp(s_pos / T) / sum_{k != i} exp(s_ik / T))` with cosine
  similarities s.

  Args:
    z1, z2: (N, D) embeddings of the two views; row i of each is image i.
    temperature: T.

  Returns:
    Scalar loss.
  """
  n = z1.shape[0]
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, positives[:, None], axis=1))


def info_nce(query: Array, key: Array, queue: Array,
             temperature: float = 0.2) -> Array:
  """MoCo's InfoNCE: positive key against a queue of negatives.

  Args:
    query: (N, D) online embeddings.
    key: (N, D) momentum-encoder embeddings of the other view (no gradient
      flows into them; the caller stops it).
    queue: (K, D) l2-normalised negative keys from earlier batches.
    temperature: T.

  Returns:
    Scalar mean cross entropy with the positive at index 0.
  """
  q, k = l2_normalize(query), l2_normalize(key)
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  negatives = q @ queue.T
  logits = jnp.concatenate([positive, negatives], axis=1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def normalized_mse(prediction: Array, target: Array) -> Array:
  """BYOL's per-example loss ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), shape (N,)."""
  p, z = l2_normalize(prediction), l2_normalize(target)
  return jnp.sum(jnp.square(p - z), axis=-1)


def negative_cosine(prediction: Array, target: Array) -> Array:
  """SimSiam's per-example loss -cos(p, z), shape (N,)."""
  return -jnp.sum(l2_normalize(prediction) * l2_normalize(target), axis=-1)


def embedding_std(z: Array) -> Array:
  """Collapse indicator: mean over dimensions of the std of l2-normalised z.

  About 1/sqrt(D) for well-spread embeddings, 0 when they collapse to a point
  (SimSiam paper, section 4.1).
  """
  return jnp.mean(jnp.std(l2_normalize(z), axis=0))
