"""SSL frameworks with dual gating, the train state and the one train step.

Frameworks (`config.framework`), all with the gated encoder in both branches:

* 'simclr'  -- NT-Xent over the global batch, projector MLP.
* 'mocov2'  -- momentum encoder + queue of negative keys, InfoNCE (the
  original asymmetric form: queries from view 1, keys from view 2).
* 'byol'    -- projector + predictor, EMA target with tau following a cosine
  from `ssl.base_tau` to 1, symmetric normalised-MSE loss.
* 'simsiam' -- projector + predictor, stop-gradient, no target network.

For MoCo and BYOL the target encoder's thresholds (or, for the predictor
baselines, predictor parameters) follow the online ones by the same EMA as
every other parameter; with `gating.branches='online'` the target is the dense
network. With `gating.branches='dense_partner'` (SimCLR, SimSiam; ours, after
Krishna et al.) view 1 goes through the gated encoder and view 2 through the
same parameters with every gate open (`GatingSpec.branches`).
Spatial-predictor gates draw Gumbel noise from the 'gumbel' RNG
stream, derived from the step's key. The step (`make_train_step`) composes
augmentation, both branches, the SSL loss, the gate regulariser, the optax
update, EMA/queue updates, an online linear probe on stop-gradient features and
the metrics (gate densities and FLOPs reduction from this step's masks) in one
jitted function over a device mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cdg_jax import augment
from cdg_jax import flops
from cdg_jax import gating
from cdg_jax import input_pipeline
from cdg_jax import losses
from cdg_jax import models
from cdg_jax import parallel
from cdg_jax import predictors
from cdg_jax.layers import AUX_COLLECTION
from cdg_jax.layers import DENSITY_COLLECTION
from cdg_jax.layers import GatingSpec
from cdg_jax.layers import GUMBEL_RNG

OPTIMIZERS = ('lars', 'sgd')
_GUMBEL_SALT = 0x67756D62   # 'gumb': folds the Gumbel key out of the step key


class MLP(nn.Module):
  """Projector/predictor: [Dense -> BN -> ReLU] x hidden, Dense, optional BN.

  Matmuls in `dtype` (bfloat16 under mixed precision); parameters and
  BatchNorm statistics float32; the output float32, for the losses.
  """
  hidden_dims: tuple[int, ...]
  out_dim: int
  last_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.hidden_dims):
      x = nn.Dense(width, use_bias=False, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name='out')(x)
    if self.last_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       use_scale=False, use_bias=False, dtype=self.dtype,
                       name='out_bn')(x)
    return x.astype(jnp.float32)


class SSLNetwork(nn.Module):
  """Backbone + projector (+ predictor). Returns a dict of outputs."""
  backbone: models.ResNet
  projector: MLP
  predictor: MLP | None = None

  def __call__(self, x, train: bool = False, stat_groups: int = 1):
    features = self.backbone(x, train, stat_groups)
    projection = self.projector(features, train)
    out = {'features': features, 'projection': projection}
    if self.predictor is not None:
      out['prediction'] = self.predictor(projection, train)
    return out


@dataclasses.dataclass(frozen=True)
class Networks:
  """The Flax modules of a run: online (and target) encoder, linear probe."""
  online: SSLNetwork
  target: SSLNetwork | None
  probe: nn.Dense


def _check_framework(config) -> None:
  if config.framework not in FRAMEWORKS:
    raise ValueError(f'Unknown framework={config.framework!r}; expected one of '
                     f'{", ".join(FRAMEWORKS)}.')


def check_branches(framework: str, spec: GatingSpec) -> None:
  """ValueError when `gating.branches` has no meaning for the framework."""
  has_target = FRAMEWORK_TABLE[framework].target
  if spec.branches == 'dense_partner' and has_target:
    raise ValueError(
        f"gating.branches='dense_partner' is for the shared-encoder "
        f"frameworks (simclr, simsiam); framework={framework!r} has a "
        f"target encoder, and its dense-partner form is "
        f"gating.branches='online' (the target left dense).")
  if spec.branches == 'online' and spec.enabled and (
      not has_target):
    raise ValueError(
        f"gating.branches='online' leaves a target encoder dense; "
        f"framework={framework!r} has none (its dense-partner form is "
        f"gating.branches='dense_partner').")


def build_networks(config) -> Networks:
  """Builds the online/target encoders and the probe from the config."""
  _check_framework(config)
  ssl = config.ssl
  dtype = models.compute_dtype(config.model.get('dtype', 'float32'))
  projector = MLP(tuple(ssl.projector_hidden_dims), ssl.projector_dim,
                  ssl.projector_last_bn, dtype)
  predictor = None
  framework = FRAMEWORK_TABLE[config.framework]
  if framework.predictor:
    if ssl.predictor_dim <= 0:
      raise ValueError(f'framework={config.framework!r} needs a predictor: set '
                       f'ssl.predictor_dim > 0 (got {ssl.predictor_dim}).')
    predictor = MLP(tuple(ssl.predictor_hidden_dims), ssl.predictor_dim,
                    dtype=dtype)
  spec = GatingSpec.from_config(config.gating)
  check_branches(config.framework, spec)
  # Under the dense partner the online encoder's batch is [view 1 gated;
  # view 2 with every gate open].
  gate_mode = 'partner' if spec.branches == 'dense_partner' else 'gated'
  online = SSLNetwork(
      models.create_resnet(config.model, config.gating, gate_mode=gate_mode),
      projector, predictor)
  target = None
  if framework.target:
    target_gating = config.gating if spec.branches == 'both' else None
    target = SSLNetwork(models.create_resnet(config.model, target_gating),
                        projector)
  return Networks(online, target, nn.Dense(config.data.num_classes))


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Absent parts (no target network, no queue) are empty dicts.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any
  target_batch_stats: Any
  queue: Any            # MoCo: {'keys': (K, D), 'pointer': ()}
  probe_params: Any
  probe_opt_state: Any
  rng: jax.Array        # raw uint32 key data (checkpointable), not a typed key


# ------------------------------------------------------------------ schedules


def total_steps(config, num_train: int) -> int:
  """Training length in steps: `num_steps` if > 0, else epochs x steps/epoch."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(1, int(config.num_epochs * steps_per_epoch(config, num_train)))


def steps_per_epoch(config, num_train: int) -> int:
  """Full batches per epoch (`input_pipeline.steps_per_epoch`)."""
  return input_pipeline.steps_per_epoch(
      num_train, config.batch_size, config.data.get('validation_size', 0))


def learning_rate_schedule(config, num_train: int) -> optax.Schedule:
  """Linear warm-up to base_lr * batch/256, then cosine decay to 0."""
  steps = total_steps(config, num_train)
  warmup = int(config.optim.warmup_epochs * steps_per_epoch(config, num_train))
  warmup = min(warmup, steps - 1) if steps > 1 else 0
  peak = config.optim.base_learning_rate * config.batch_size / 256
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, 0.0)


def tau_schedule(config, num_train: int) -> optax.Schedule:
  """EMA decay of the target: BYOL's cosine from base_tau to 1, or constant."""
  base_tau = config.ssl.base_tau
  if config.ssl.tau_schedule == 'constant':
    return lambda step: jnp.asarray(base_tau, jnp.float32)
  if config.ssl.tau_schedule != 'cosine':
    raise ValueError(f"Unknown ssl.tau_schedule={config.ssl.tau_schedule!r}; "
                     f"expected 'cosine' or 'constant'.")
  steps = total_steps(config, num_train)

  def schedule(step):
    progress = jnp.minimum(step / steps, 1.0)
    return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
  return schedule


def decay_mask(params):
  """Weight decay and LARS adaptation only for kernels: biases, norm params
  and gate thresholds are 1-D and excluded (docs/method.md [training]: by ndim, not name)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, num_train: int) -> optax.GradientTransformation:
  """LARS or SGD with momentum, warm-up + cosine, masked weight decay."""
  optim = config.optim
  schedule = learning_rate_schedule(config, num_train)
  if optim.name == 'lars':
    return optax.lars(schedule, weight_decay=optim.weight_decay,
                      weight_decay_mask=decay_mask,
                      trust_coefficient=optim.trust_coefficient,
                      trust_ratio_mask=decay_mask, momentum=optim.momentum)
  if optim.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim.momentum))
  raise ValueError(f"Unknown optim.name={optim.name!r}; expected one of "
                   f"{', '.join(OPTIMIZERS)}.")


# --------------------------------------------------------------- tree helpers


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


def thresholds(params) -> list[jax.Array]:
  """All gate thresholds in a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return [v for k, v in sorted(flat.items()) if k[-1] == 'threshold']


# ------------------------------------------------------------------ the state


def create_train_state(config, networks: Networks, num_train: int,
                       rng: jax.Array) -> TrainState:
  """Initialises parameters, optimiser, target, queue and probe."""
  _check_framework(config)
  size = config.data.image_size
  x = jnp.zeros((2, size, size, 3), jnp.float32)
  init_rng, probe_rng, state_rng = jax.random.split(rng, 3)
  variables = networks.online.init(init_rng, x, train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  target_params, target_stats, queue = {}, {}, {}
  if networks.target is not None:
    # The target starts as a copy of the online encoder (minus the predictor,
    # and minus gate parameters when it is dense).
    shapes = jax.eval_shape(lambda: networks.target.init(init_rng, x))
    # Copies, not views: the state is donated to the step, and one buffer
    # cannot be donated twice.
    target_params = jax.tree.map(jnp.copy, select_like(params, shapes['params']))
    target_stats = jax.tree.map(
        jnp.copy, select_like(batch_stats, shapes.get('batch_stats', {})))
  if FRAMEWORK_TABLE[config.framework].queue:
    queue_size = config.ssl.queue_size
    if queue_size % config.batch_size:
      raise ValueError(f'ssl.queue_size={queue_size} is not divisible by '
                       f'batch_size={config.batch_size}; the queue is updated '
                       f'a whole batch at a time.')
    keys = jax.random.normal(state_rng, (queue_size, config.ssl.projector_dim))
    queue = {'keys': losses.l2_normalize(keys),
             'pointer': jnp.zeros((), jnp.int32)}
  feature_dim = models.feature_dim(config.model.name, config.model.width)
  probe_params = networks.probe.init(
      probe_rng, jnp.zeros((1, feature_dim)))['params']
  tx = make_optimizer(config, num_train)
  probe_tx = optax.adam(config.probe.learning_rate)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), target_params=target_params,
      target_batch_stats=target_stats, queue=queue, probe_params=probe_params,
      probe_opt_state=probe_tx.init(probe_params),
      rng=jax.random.key_data(state_rng))


# ------------------------------------------------------------------- the step


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


def density_target_schedule(spec: GatingSpec, num_steps: int
                            ) -> Callable[[jax.Array], jax.Array]:
  """The density regulariser's target at a step.

  `spec.density_target` throughout, or, with `spec.target_anneal_fraction`
  f > 0 (our option, not the paper's), a linear fall from 1.0 (no gate
  closed) at step 0 to `density_target` at step f * num_steps, constant after.
  """
  target = spec.density_target
  anneal_steps = spec.target_anneal_fraction * num_steps
  if anneal_steps <= 0:
    return lambda step: jnp.asarray(target, jnp.float32)

  def schedule(step):
    progress = jnp.minimum(step / anneal_steps, 1.0)
    return (1.0 - progress * (1.0 - target)).astype(jnp.float32)
  return schedule


def budget_schedule(spec: GatingSpec, num_steps: int
                    ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """The FLOPs budget's weight scale and per-layer bound tightness at a step.

  Returns `schedule(step) -> {'scale', 'tightness'}`: `scale` is 0 before
  `spec.budget_start_fraction` of `num_steps`, then rises linearly to 1 over
  `spec.budget_ramp_fraction` (at once if 0); `tightness`
  (`gating.bound_tightness`) falls from 1 at the budget's start to 0 after
  `spec.budget_bounds_fraction` of training; always 0 without bounds.
  """
  start = spec.budget_start_fraction * num_steps
  ramp = spec.budget_ramp_fraction * num_steps
  relax = spec.budget_bounds_fraction * num_steps

  def schedule(step):
    since_start = jnp.asarray(step, jnp.float32) - start
    if ramp > 0:
      scale = jnp.clip(since_start / ramp, 0.0, 1.0)
    else:
      scale = (since_start >= 0).astype(jnp.float32)
    tightness = (gating.bound_tightness(jnp.maximum(since_start, 0.0) / relax)
                 if relax > 0 else jnp.zeros((), jnp.float32))
    return {'scale': scale, 'tightness': tightness}
  return schedule


def budget_fraction(costs: Sequence[flops.LayerCost],
                    density: jax.Array | float) -> jax.Array:
  """The gated layers' FLOPs fraction when every one is at `density`.

  The FLOPs budget's target, from the density a user states: the same
  `flops.gated_macs` computation the regulariser and the report use.
  """
  dense, effective = flops.gated_macs(
      costs, {c.name: density for c in costs if c.gated})
  return effective / dense


def budget_summary(spec: GatingSpec, costs: Sequence[flops.LayerCost]
                   ) -> dict[str, float] | None:
  """The FLOPs budget in the numbers a user reads (None without one).

  Returns {'density': the gated layers' MAC-weighted density target,
  'gated_flops_fraction': the fraction of their dense MACs it leaves,
  'flops_reduction': the backbone's dense / effective MACs at it}.
  """
  if not (spec.kind == 'cdg' and spec.regularizer == 'flops'):
    return None
  at_target = {c.name: spec.density_target for c in costs if c.gated}
  return {'density': spec.density_target,
          'gated_flops_fraction': float(budget_fraction(
              costs, spec.density_target)),
          'flops_reduction': float(flops.flops_reduction(costs, at_target))}


def describe_budget(spec: GatingSpec, costs: Sequence[flops.LayerCost]
                    ) -> str | None:
  """One line saying what the FLOPs budget asks for (None without one)."""
  budget = budget_summary(spec, costs)
  if budget is None:
    return None
  parts = [f"Gate regulariser: one FLOPs budget (gating.regularizer='flops', "
           f"lambda {spec.weight:g}): the gated layers' MAC-weighted density "
           f"{budget['density']:.3f}, i.e. "
           f"{100 * budget['gated_flops_fraction']:.1f}% of their dense MACs; "
           f"backbone FLOPs reduction {budget['flops_reduction']:.2f}x at the "
           f'budget.']
  if spec.budget_bounds_fraction > 0:
    parts.append(f'Per-layer bounds start at the target and relax to [0, 1] '
                 f'over {100 * spec.budget_bounds_fraction:.0f}% of training.')
  if spec.budget_start_fraction > 0:
    parts.append(f'The budget is off for the first '
                 f'{100 * spec.budget_start_fraction:.0f}% of training'
                 + (f', then ramps in over '
                    f'{100 * spec.budget_ramp_fraction:.0f}%.'
                    if spec.budget_ramp_fraction > 0 else '.'))
  return ' '.join(parts)


def gate_regularizer(spec: GatingSpec, params, densities: Mapping[str, Any],
                     aux: Mapping[str, Any] | None = None,
                     density_target: jax.Array | float | None = None,
                     costs: Sequence[flops.LayerCost] = (),
                     budget: Mapping[str, Any] | None = None):
  """The gates' auxiliary loss, times lambda = `spec.weight` (0 without gates).

  Args:
    spec: the gating spec.
    params: online parameters (CDG thresholds).
    densities: {layer: mean density} from this step's straight-through masks.
    aux: the 'gate_aux' collection sown in the same forward pass (channel
      predictor: per-sample saliency L1 norms).
    density_target: this step's density target (`density_target_schedule`);
      None: `spec.density_target`.
    costs: the online network's `flops.LayerCost`s (names as in
      `densities`); the 'flops' form needs them.
    budget: this step's `budget_schedule` values; None: full weight, no
      bounds.

  Returns:
    CDG: lambda * sum_layers mean((delta - target)^2) ('threshold'),
    lambda * sum over all thresholds (delta - target)^2 ('threshold_sum'),
    lambda * sum_layers (density - target)^2 ('density'), or
    lambda * scale * [(F_gated / F_dense - t_F)^2 + mean_layers
    relu(d - upper)^2 + relu(lower - d)^2] ('flops', `budget_schedule` gives
    scale and the bounds' tightness; t_F = `budget_fraction` at the target).
    'channel_predictor': FBS's lambda * sum_layers mean_samples ||s||_1.
    'spatial_predictor': lambda * sum_layers (density - density_target)^2,
    the density being the mean of the straight-through hard masks, so the
    gradient reaches the predictors.
  """
  if not spec.enabled:
    return jnp.zeros(())
  if density_target is None:
    density_target = spec.density_target
  if spec.kind == 'channel_predictor':
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(aux or {}))
    values = [jnp.concatenate([jnp.reshape(v, (-1,)) for v in
                               (vs if isinstance(vs, tuple) else (vs,))])
              for k, vs in sorted(flat.items()) if k[-1] == 'saliency_l1']
    return spec.weight * predictors.saliency_l1_regularizer(values)
  if spec.kind == 'cdg' and spec.regularizer == 'flops':
    if not any(c.gated for c in costs):
      raise ValueError("gating.regularizer='flops' needs the network's layer "
                       'costs (flops.layer_costs) with its gated layers.')
    budget = budget or {'scale': 1.0, 'tightness': 0.0}
    dense, effective = flops.gated_macs(costs, densities)
    value = gating.flops_budget_regularizer(
        effective / dense, budget_fraction(costs, density_target))
    if spec.budget_bounds_fraction > 0:
      lower, upper = gating.layer_bounds(density_target, budget['tightness'])
      value = value + gating.bound_regularizer(list(densities.values()),
                                               lower, upper)
    return spec.weight * budget['scale'] * value
  if spec.kind == 'spatial_predictor' or spec.regularizer == 'density':
    return spec.weight * gating.density_regularizer(list(densities.values()),
                                                    density_target)
  regularizer = {'threshold': gating.threshold_regularizer,
                 'threshold_sum': gating.threshold_sum_regularizer
                 }[spec.regularizer]
  return spec.weight * regularizer(thresholds(params), spec.threshold_target)


def _branch_inputs(framework: Framework, view1, view2, stat_groups: int):
  """(online input, its statistics groups, target input, its groups).

  Asymmetric frameworks (MoCo v2: queries from view 1, keys from view 2) give
  each branch one view, so its statistics are per branch by construction;
  the others give every network [view 1; view 2].
  """
  if framework.asymmetric_views:
    return view1, 1, view2, 1
  both = jnp.concatenate([view1, view2], axis=0)
  return both, stat_groups, both, stat_groups


def _gumbel_rngs(spec: GatingSpec, rng):
  """(online, target) RNG streams of spatial-predictor gates, else Nones.

  Folded out of the step key, so the augmentation keys are unchanged; other
  kinds get no extra RNG or collection (the same computation as without).
  """
  if spec.kind != 'spatial_predictor':
    return None, None
  online_gumbel, target_gumbel = jax.random.split(
      jax.random.fold_in(rng, _GUMBEL_SALT))
  return {GUMBEL_RNG: online_gumbel}, {GUMBEL_RNG: target_gumbel}


def _updated_queue(queue, target_projection):
  """MoCo's queue with this batch's keys written at the pointer."""
  keys = losses.l2_normalize(target_projection)
  return {'keys': jax.lax.dynamic_update_slice(
              queue['keys'], keys, (queue['pointer'], 0)),
          'pointer': (queue['pointer'] + keys.shape[0])
                     % queue['keys'].shape[0]}


def _probe_step(probe: nn.Module, probe_tx, state: TrainState, features,
                labels):
  """One step of the online linear probe: (params, opt state, loss, logits).

  On stop-gradient features: no label information reaches the encoder.
  """
  features = jax.lax.stop_gradient(features)

  def probe_loss_fn(probe_params):
    logits = probe.apply({'params': probe_params}, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(loss), logits
  (probe_loss, logits), probe_grads = jax.value_and_grad(
      probe_loss_fn, has_aux=True)(state.probe_params)
  probe_updates, probe_opt_state = probe_tx.update(
      probe_grads, state.probe_opt_state, state.probe_params)
  return (optax.apply_updates(state.probe_params, probe_updates),
          probe_opt_state, probe_loss, logits)


def make_train_step(config, networks: Networks, num_train: int,
                    costs: tuple[flops.LayerCost, ...]) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    config: the run config.
    networks: from `build_networks`.
    num_train: training-set size (for the schedules).
    costs: `flops.layer_costs` of the online network (names prefixed
      'backbone/'), for the FLOPs reduction metric.

  The batch is {'image': uint8 (B, H, W, 3), 'label': int (B,)}; both views
  are augmented inside the step from per-image keys. The step: views ->
  target branch -> online loss and gradient (SSL loss + gate regulariser)
  -> optimiser -> EMA target and queue -> online probe -> metrics.
  """
  framework = FRAMEWORK_TABLE[config.framework]
  spec = GatingSpec.from_config(config.gating)
  stat_groups = 2 if spec.saliency_stats == 'per_branch' else 1
  if spec.branches == 'dense_partner':
    # Only view 1 is gated (`GatedConv` in 'partner' mode): one branch.
    stat_groups = 1
  tx = make_optimizer(config, num_train)
  probe_tx = optax.adam(config.probe.learning_rate)
  lr_schedule = learning_rate_schedule(config, num_train)
  tau_fn = tau_schedule(config, num_train)
  target_fn = density_target_schedule(spec, total_steps(config, num_train))
  budget_fn = budget_schedule(spec, total_steps(config, num_train))
  augment_config = config.augment
  temperature = config.ssl.temperature
  gated_costs = [c for c in costs if c.gated]
  online_mutable = ['batch_stats', DENSITY_COLLECTION]
  if spec.kind == 'channel_predictor':
    online_mutable.append(AUX_COLLECTION)   # FBS's saliency L1 terms
  gated_macs = sum(c.macs for c in gated_costs)

  def target_branch(state, target_input, target_groups, target_rngs):
    """The target's outputs (gradient stopped) and new statistics."""
    if networks.target is None:
      return None, state.target_batch_stats
    target_out, target_vars = networks.target.apply(
        {'params': state.target_params,
         'batch_stats': state.target_batch_stats},
        target_input, train=True, stat_groups=target_groups,
        rngs=target_rngs, mutable=['batch_stats'])
    return jax.lax.stop_gradient(target_out), target_vars['batch_stats']

  def online_loss(params, state, online_input, online_groups, online_rngs,
                  target_out, queue_keys):
    """SSL loss + gate regulariser of the online branch, and its outputs."""
    out, new_vars = networks.online.apply(
        {'params': params, 'batch_stats': state.batch_stats}, online_input,
        train=True, stat_groups=online_groups,
        rngs=online_rngs, mutable=online_mutable)
    loss, embeddings = ssl_loss(config.framework, out, target_out, queue_keys,
                                temperature)
    densities = flops.mean_densities(new_vars.get(DENSITY_COLLECTION, {}))
    gate_loss = gate_regularizer(spec, params, densities,
                                 new_vars.get(AUX_COLLECTION, {}),
                                 target_fn(state.step), costs,
                                 budget_fn(state.step))
    aux = dict(batch_stats=new_vars['batch_stats'], densities=densities,
               embeddings=embeddings, features=out['features'], ssl_loss=loss,
               gate_loss=gate_loss)
    return loss + gate_loss, aux

  def step_metrics(state, total_loss, aux, tau, probe_loss, logits, labels):
    densities = aux['densities']
    metrics = {
        'loss': total_loss, 'ssl_loss': aux['ssl_loss'],
        'gate_loss': aux['gate_loss'], 'learning_rate': lr_schedule(state.step),
        'tau': tau, 'probe_loss': probe_loss,
        'probe_accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
        'embedding_std': losses.embedding_std(aux['embeddings']),
        'flops_reduction': flops.flops_reduction(costs, densities),
    }
    if spec.target_anneal_fraction > 0:
      metrics['density_target'] = target_fn(state.step)
    if spec.regularizer == 'flops' and spec.kind == 'cdg':
      budget = budget_fn(state.step)
      metrics['budget_scale'] = budget['scale']
      if spec.budget_bounds_fraction > 0:
        metrics['bound_tightness'] = budget['tightness']
    if gated_costs:
      metrics['gate_density'] = sum(
          c.macs * densities[c.name] for c in gated_costs) / gated_macs
      metrics['layer_density'] = dict(densities)
    return metrics

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    view1, view2 = augment.two_views(rng, batch['image'], augment_config)
    online_rngs, target_rngs = _gumbel_rngs(spec, rng)
    online_input, online_groups, target_input, target_groups = _branch_inputs(
        framework, view1, view2, stat_groups)
    target_out, target_stats = target_branch(state, target_input,
                                             target_groups, target_rngs)
    queue_keys = state.queue['keys'] if framework.queue else None

    (total_loss, aux), grads = jax.value_and_grad(online_loss, has_aux=True)(
        state.params, state, online_input, online_groups, online_rngs,
        target_out, queue_keys)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    tau = tau_fn(state.step)
    target_params = state.target_params
    if networks.target is not None:
      target_params = ema_update(
          state.target_params, select_like(params, state.target_params), tau)
    queue = state.queue
    if framework.queue:
      queue = _updated_queue(state.queue, target_out['projection'])

    # The probe reads the first view's features.
    labels = batch['label']
    probe_params, probe_opt_state, probe_loss, logits = _probe_step(
        networks.probe, probe_tx, state, aux['features'][:view1.shape[0]],
        labels)
    metrics = step_metrics(state, total_loss, aux, tau, probe_loss, logits,
                           labels)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
        opt_state=opt_state, target_params=target_params,
        target_batch_stats=target_stats, queue=queue,
        probe_params=probe_params, probe_opt_state=probe_opt_state)
    return new_state, metrics

  return train_step


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """A run's networks, layer costs, state initialiser and train step.

  Attributes:
    networks: from `build_networks`.
    costs: `online_costs` of the online network.
    init_state: `init_state(rng) -> TrainState` (`create_train_state`).
    train_step: `make_train_step`'s function, not yet jitted
      (`jit_train_step` places it on a mesh).
  """
  networks: Networks
  costs: tuple[flops.LayerCost, ...]
  init_state: Callable[[jax.Array], TrainState]
  train_step: Callable


def assemble(config, num_train: int) -> Pretraining:
  """Builds everything a train step needs, in one place: training, the
  abstract shape check and the step-timing benchmark all call this."""
  networks = build_networks(config)
  costs = online_costs(config, networks)
  return Pretraining(
      networks=networks, costs=costs,
      init_state=functools.partial(create_train_state, config, networks,
                                   num_train),
      train_step=make_train_step(config, networks, num_train, costs))


def online_costs(config, networks: Networks) -> tuple[flops.LayerCost, ...]:
  """Per-example layer costs of the online network (backbone + heads)."""
  size = config.data.image_size
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: networks.online.init(jax.random.key(0), jnp.zeros(x.shape)))
  return flops.layer_costs(networks.online, variables, x, train=False)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """jit over the mesh: batch sharded over 'data', state replicated, donated."""
  return jax.jit(train_step,
                 in_shardings=(parallel.replicated(mesh),
                               parallel.data_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh),
                                parallel.replicated(mesh)),
                 donate_argnums=(0,))
