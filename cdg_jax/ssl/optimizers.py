"""Optimisers and schedules of pretraining: the learning rate, the target's
EMA decay, LARS/SGD with weight decay on kernels only.

`optim.name` picks an entry of `OPTIMIZER_TABLE`; `ssl.tau_schedule` one of
`TAU_SCHEDULES`. The linear evaluators use `decay_mask` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


# The target encoder's EMA decay over training (`ssl.tau_schedule`).
TAU_SCHEDULES = ('cosine', 'constant')


def learning_rate_schedule(optim, batch_size: int, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up to base_lr * batch/256, then cosine decay to 0.

  Args:
    optim: the `optim` block (`base_learning_rate`, `warmup_epochs`).
    batch_size: the global batch size.
    total_steps: the training length in steps.
    steps_per_epoch: full batches per epoch.
  """
  steps = total_steps
  warmup = int(optim.warmup_epochs * steps_per_epoch)
  warmup = min(warmup, steps - 1) if steps > 1 else 0
  peak = optim.base_learning_rate * batch_size / 256
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, 0.0)


def tau_schedule(ssl_config, num_steps: int) -> optax.Schedule:
  """EMA decay of the target: BYOL's cosine from base_tau to 1, or constant.

  Args:
    ssl_config: the `ssl` block (`base_tau`, `tau_schedule`).
    num_steps: the training length.

  `tau_schedule` is checked with the config (`ssl_problems`).
  """
  base_tau = ssl_config.base_tau
  if ssl_config.tau_schedule == 'constant':
    return lambda step: jnp.asarray(base_tau, jnp.float32)
  steps = num_steps

  def schedule(step):
    progress = jnp.minimum(step / steps, 1.0)
    return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
  return schedule


def decay_mask(params):
  """Weight decay and LARS adaptation only for kernels: biases, norm params
  and gate thresholds are 1-D and excluded (docs/method.md [training]: by
  ndim, not name)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _lars(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.lars(schedule, weight_decay=optim.weight_decay,
                    weight_decay_mask=decay_mask,
                    trust_coefficient=optim.trust_coefficient,
                    trust_ratio_mask=decay_mask, momentum=optim.momentum)


def _sgd(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=optim.momentum))


# `optim.name` -> the optimiser, built from the `optim` block and the
# learning-rate schedule; a new optimiser is one entry.
OPTIMIZER_TABLE = {'lars': _lars, 'sgd': _sgd}


OPTIMIZERS = tuple(OPTIMIZER_TABLE)


def make_optimizer(optim, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """LARS or SGD with momentum, masked weight decay (`OPTIMIZER_TABLE`).

  Args:
    optim: the `optim` block (name, weight_decay, momentum,
      trust_coefficient).
    schedule: the learning rate (`learning_rate_schedule`).
  """
  # optim.name is checked with the config (`config_problems`).
  return OPTIMIZER_TABLE[optim.name](optim, schedule)
