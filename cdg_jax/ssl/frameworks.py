"""The SSL frameworks: what each adds to the shared encoder and its loss.

`config.framework` picks an entry of `FRAMEWORK_TABLE`; a new framework is
one entry and its loss. Also the target's helpers (the online parameters at
the target's paths, the EMA update) and MoCo's queue update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from cdg_jax.ssl import losses


def _simclr_loss(online, target, queue, temperature):
  del target, queue
  z1, z2 = jnp.split(online['projection'], 2)
  return losses.nt_xent(z1, z2, temperature)


def _mocov2_loss(online, target, queue, temperature):
  return losses.info_nce(online['projection'], target['projection'], queue,
                         temperature)


def _byol_loss(online, target, queue, temperature):
  del queue, temperature
  p1, p2 = jnp.split(online['prediction'], 2)
  z1, z2 = jnp.split(target['projection'], 2)
  return jnp.mean(losses.normalized_mse(p1, z2) + losses.normalized_mse(p2, z1))


def _simsiam_loss(online, target, queue, temperature):
  del target, queue, temperature
  p1, p2 = jnp.split(online['prediction'], 2)
  # The stop-gradient on the projections is what prevents collapse.
  z1, z2 = jnp.split(jax.lax.stop_gradient(online['projection']), 2)
  return 0.5 * jnp.mean(losses.negative_cosine(p1, z2)
                        + losses.negative_cosine(p2, z1))


@dataclasses.dataclass(frozen=True)
class Framework:
  """What an SSL framework adds to the shared encoder and train step.

  Attributes:
    target: a momentum/EMA target encoder (`ssl.base_tau`, `tau_schedule`).
    predictor: a predictor head on the online branch (`ssl.predictor_*`).
    queue: a queue of negative keys (`ssl.queue_size`), refreshed with the
      target's keys of each batch.
    asymmetric_views: the online encoder sees view 1 only and the target
      view 2 (each branch then has its own statistics by construction);
      otherwise every network sees [view 1; view 2].
    loss: `loss(online_out, target_out, queue_keys, temperature)`, the
      outputs being dicts with 'projection' (and 'prediction'); the target's
      gradient already stopped.
  """
  target: bool
  predictor: bool
  queue: bool
  asymmetric_views: bool
  loss: Callable[..., jax.Array]


# The frameworks (`config.framework`). A new one is one entry and its loss.
FRAMEWORK_TABLE = {
    'simclr': Framework(target=False, predictor=False, queue=False,
                        asymmetric_views=False, loss=_simclr_loss),
    'mocov2': Framework(target=True, predictor=False, queue=True,
                        asymmetric_views=True, loss=_mocov2_loss),
    'byol': Framework(target=True, predictor=True, queue=False,
                      asymmetric_views=False, loss=_byol_loss),
    'simsiam': Framework(target=False, predictor=True, queue=False,
                         asymmetric_views=False, loss=_simsiam_loss),
}


FRAMEWORKS = tuple(FRAMEWORK_TABLE)


def ssl_loss(framework: str, online: dict, target: dict | None, queue,
             temperature: float) -> tuple[jax.Array, jax.Array]:
  """The framework's loss and the embeddings used for the collapse metric.

  Args:
    framework: one of FRAMEWORKS.
    online: outputs of the online network on [view1; view2] (on view1 only
      for asymmetric views, MoCo).
    target: outputs of the target network on [view1; view2] (view2 only for
      asymmetric views), gradient already stopped; None without a target.
    queue: MoCo's (K, D) negative keys.
    temperature: SimCLR/MoCo temperature.
  """
  loss = FRAMEWORK_TABLE[framework].loss(online, target, queue, temperature)
  return loss, online['projection']


def select_like(tree: Mapping[str, Any], like: Mapping[str, Any]):
  """The leaves of `tree` at the paths of `like` (e.g. online -> target)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  paths = flax.traverse_util.flatten_dict(flax.core.unfreeze(like))
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ValueError(f'Paths missing from the source tree: {missing[:5]}')
  return flax.traverse_util.unflatten_dict({p: flat[p] for p in paths})


def ema_update(target, online, tau):
  """target <- tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


def updated_queue(queue, target_projection):
  """MoCo's queue with this batch's keys written at the pointer."""
  keys = losses.l2_normalize(target_projection)
  return {'keys': jax.lax.dynamic_update_slice(
              queue['keys'], keys, (queue['pointer'], 0)),
          'pointer': (queue['pointer'] + keys.shape[0])
                     % queue['keys'].shape[0]}
