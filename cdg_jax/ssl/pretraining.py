"""Pretraining with dual gating: the settings, the train state and the one
train step (the frameworks' table: `frameworks`; optimisers and schedules:
`optimizers`).

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
same parameters with every gate open (`BranchSpec.branches`).
Spatial-predictor gates draw Gumbel noise from the 'gumbel' RNG
stream, derived from the step's key. The step (`pretraining_step`, bound to a
run by `make_train_step`) composes augmentation, both branches, the SSL loss,
the gate regulariser, the optax update, EMA/queue updates, an online linear
probe on stop-gradient features and the metrics (gate densities and FLOPs
reduction from this step's masks) in one jitted function over a device mesh.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math
import numbers
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cdg_jax.data import augment
from cdg_jax.data import input_pipeline
from cdg_jax.gating import flops
from cdg_jax.gating import regularizers
from cdg_jax.gating.layers import AUX_COLLECTION
from cdg_jax.gating.layers import CLOSED_TILE_RNG
from cdg_jax.gating.layers import DENSITY_COLLECTION
from cdg_jax.gating.layers import GatingSpec
from cdg_jax.gating.layers import GUMBEL_RNG
from cdg_jax.run import parallel
from cdg_jax.ssl import frameworks
from cdg_jax.ssl import losses
from cdg_jax.ssl import models
from cdg_jax.ssl import optimizers

_GUMBEL_SALT = 0x67756D62   # 'gumb': folds the Gumbel key out of the step key
_CLOSED_TILE_SALT = 0x74696C65   # 'tile': the closed-tile sample's key


# Which contrastive branches are gated (`BranchSpec.branches`), how the
# saliency statistics are grouped, and the dense partner path's BatchNorm.
BRANCHES = ('both', 'online', 'dense_partner')
SALIENCY_STATS = ('per_branch', 'joint')
PARTNER_NORMS = ('shared', 'separate')


@dataclasses.dataclass(frozen=True)
class BranchSpec:
  """How the SSL branches are wired to the gates; the fields are the config's
  `gating` fields of the same names (`config_lib.read_gating` makes it).

  Attributes:
    branches: which contrastive branches are gated.
      'both': every branch (the CDG paper: dual gating).
      'online': MoCo v2 and BYOL only: the online encoder is gated, the
      momentum/EMA target encoder is the dense network.
      'dense_partner': ours, after Krishna et al. (BMVC 2023, "Unifying
      Synergies between Self-supervised Learning and Dynamic
      Computation"), not the CDG paper's; SimCLR and SimSiam, CDG only. The
      encoder's weights are shared by two paths: view 1 goes through the
      gated encoder, view 2 through the same parameters with every gate
      open (the dense network), and the SSL loss is taken between the two
      (both directions, so gradients reach the weights through both paths).
      The gate regulariser, the gate densities and the FLOPs metric see the
      gated path only. Views are i.i.d. draws of the same augmentation, so
      the fixed assignment (view 1 gated) loses nothing. One training gives
      a gated and a dense network; both are evaluated. The dense-partner
      form of MoCo v2 and BYOL is 'online' (their dense target plays the
      partner's part).
    partner_norm: BatchNorm of the dense path under 'dense_partner':
      'shared' (one BatchNorm per layer, its batch statistics over both
      paths' samples) or 'separate' (the dense path has its own BatchNorm
      layers, statistics and affine parameters, in every residual block, and
      at the stem when the stem is gated; Krishna et al.'s separate_bn).
    saliency_stats: 'per_branch' or 'joint' batch statistics of the CDG
      saliency over the two views in the train step.
  """
  branches: str = 'both'
  partner_norm: str = 'shared'
  saliency_stats: str = 'per_branch'

  def __post_init__(self):
    for name, allowed in (('branches', BRANCHES),
                          ('partner_norm', PARTNER_NORMS),
                          ('saliency_stats', SALIENCY_STATS)):
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(f'Unknown gating.{name}={value!r}; expected one of '
                         f'{", ".join(map(repr, allowed))}.')

  @property
  def has_dense_partner(self) -> bool:
    """Whether training runs a dense partner path (`branches`), so one run
    gives a gated and a dense network, both evaluated."""
    return self.branches == 'dense_partner'

  @property
  def separate_partner_norm(self) -> bool:
    """Whether the dense partner path has BatchNorm layers of its own."""
    return self.has_dense_partner and self.partner_norm == 'separate'


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


@dataclasses.dataclass(frozen=True)
class Settings:
  """What pretraining reads from a run's config, read once (`read_settings`).

  The entry points (training, the step-timing script) read the config once
  into this record and pass it down; the functions of this module take it
  (or the part they use), never the config. The blocks are the config's own
  (`model`, `ssl`, `optim`, `augment`), read by field name.

  Attributes:
    framework: one of frameworks.FRAMEWORKS.
    gating: the online encoder's gating spec (parsed once, by the caller).
    loss: the gates' regulariser (None without gates).
    branches: how the SSL branches are wired to the gates.
    model: the `model` block (name, width, stem, dtype).
    ssl: the `ssl` block (projector, predictor, temperature, tau, queue).
    optim: the `optim` block (name, learning rate, warm-up, weight decay).
    augment: the `augment` block (`view1`, `view2`).
    probe_learning_rate: the online probe's Adam learning rate.
    image_size: side of the (square) training images.
    num_classes: classes of the online probe.
    batch_size: global batch size.
    steps_per_epoch: full batches per epoch (`input_pipeline.steps_per_epoch`).
    total_steps: training length in steps: `num_steps` if > 0, else epochs x
      steps per epoch.
  """
  framework: str
  gating: GatingSpec
  loss: regularizers.RegularizerSpec | None
  branches: BranchSpec
  model: Any
  ssl: Any
  optim: Any
  augment: Any
  probe_learning_rate: float
  image_size: int
  num_classes: int
  batch_size: int
  steps_per_epoch: int
  total_steps: int

  @property
  def framework_record(self) -> frameworks.Framework:
    return frameworks.FRAMEWORK_TABLE[self.framework]

  def learning_rate_schedule(self) -> optax.Schedule:
    """The run's learning rate (`optimizers.learning_rate_schedule`)."""
    return optimizers.learning_rate_schedule(
        self.optim, self.batch_size, self.total_steps, self.steps_per_epoch)


def config_problems(config) -> list[str]:
  """Every out-of-range value of the fields pretraining reads (the training
  length, the framework, the `optim` block), each naming its field;
  `config_lib.validate` collects them."""
  checks = [
      (config.batch_size > 0, f'batch_size={config.batch_size} must be a '
       f'positive number of images.'),
      (config.num_steps == -1 or config.num_steps > 0,
       f'num_steps={config.num_steps} must be positive, or -1 to train '
       f'num_epochs={config.num_epochs} epochs.'),
      (config.num_steps != -1 or config.num_epochs > 0,
       f'num_epochs={config.num_epochs} must be positive (or set num_steps '
       f'> 0).'),
      (config.framework in frameworks.FRAMEWORKS,
       f'framework={config.framework!r} must be one of '
       f'{frameworks.FRAMEWORKS}.'),
      (config.optim.name in optimizers.OPTIMIZERS,
       f'optim.name={config.optim.name!r} must be one of '
       f'{optimizers.OPTIMIZERS}.'),
      (_finite(config.optim.base_learning_rate)
       and config.optim.base_learning_rate >= 0, f'optim.base_learning_rate='
       f'{config.optim.base_learning_rate} must be finite and >= 0.'),
      (_finite(config.optim.warmup_epochs) and config.optim.warmup_epochs >= 0,
       f'optim.warmup_epochs={config.optim.warmup_epochs} must be >= 0.'),
      (_finite(config.optim.weight_decay) and config.optim.weight_decay >= 0,
       f'optim.weight_decay={config.optim.weight_decay} must be finite and '
       f'>= 0.'),
      (_finite(config.optim.momentum) and 0 <= config.optim.momentum < 1,
       f'optim.momentum={config.optim.momentum} must be in [0, 1).'),
      (config.optim.name != 'lars' or (
          _finite(config.optim.trust_coefficient)
          and config.optim.trust_coefficient > 0),
       f'optim.trust_coefficient={config.optim.trust_coefficient} must be '
       f'finite and > 0 (LARS).'),
      (_finite(config.probe.learning_rate) and config.probe.learning_rate > 0,
       f'probe.learning_rate={config.probe.learning_rate} must be finite and '
       f'> 0.'),
  ]
  return ([message for ok, message in checks if not ok]
          + ssl_problems(config.ssl, config.framework, config.batch_size))


def _finite(value) -> bool:
  return isinstance(value, numbers.Real) and math.isfinite(value)


def ssl_problems(ssl, framework: str, batch_size: int) -> list[str]:
  """Every out-of-range value of an `ssl` block for `framework`, each naming
  its field (the queue's divisibility included: checked once, here)."""
  record = frameworks.FRAMEWORK_TABLE.get(framework)
  checks = [
      (_finite(ssl.temperature) and ssl.temperature > 0,
       f'ssl.temperature={ssl.temperature} must be finite and > 0 (the '
       f'contrastive losses divide the similarities by it; a negative one '
       f'inverts the loss).'),
      (_finite(ssl.base_tau) and 0 <= ssl.base_tau <= 1,
       f'ssl.base_tau={ssl.base_tau} must be in [0, 1] (the EMA decay of the '
       f'target encoder).'),
      (ssl.tau_schedule in optimizers.TAU_SCHEDULES, f'ssl.tau_schedule='
       f'{ssl.tau_schedule!r} must be one of '
       f'{list(optimizers.TAU_SCHEDULES)}.'),
      (ssl.projector_dim > 0 and all(d > 0 for d in ssl.projector_hidden_dims),
       f'ssl.projector_dim={ssl.projector_dim} and ssl.projector_hidden_dims='
       f'{tuple(ssl.projector_hidden_dims)} must be positive.'),
      (all(d > 0 for d in ssl.predictor_hidden_dims),
       f'ssl.predictor_hidden_dims={tuple(ssl.predictor_hidden_dims)} must be '
       f'positive.'),
  ]
  if record is not None and record.predictor:
    checks.append((ssl.predictor_dim > 0, f'framework={framework!r} needs a '
                   f'predictor: set ssl.predictor_dim > 0 (got '
                   f'{ssl.predictor_dim}).'))
  if record is not None and record.queue:
    checks.append((ssl.queue_size > 0 and batch_size > 0
                   and ssl.queue_size % batch_size == 0,
                   f'ssl.queue_size={ssl.queue_size} must be a positive '
                   f'multiple of batch_size={batch_size}: the queue is '
                   f'updated a whole batch at a time.'))
  return [message for ok, message in checks if not ok]


def read_settings(config, gating, num_train: int) -> Settings:
  """The pretraining settings of a run's config, for a training set size.

  Args:
    config: the run config (already validated: `config_lib.validate`).
    gating: its `gating` block, parsed once by the caller
      (`config_lib.GatingConfig`: `layer`, `loss`, `branches`).
    num_train: training-set size (for the epochs and schedules).
  """
  per_epoch = input_pipeline.steps_per_epoch(
      num_train, config.batch_size, config.data.get('validation_size', 0))
  if config.num_steps > 0:
    steps = int(config.num_steps)
  else:
    steps = max(1, int(config.num_epochs * per_epoch))
  return Settings(
      framework=config.framework, gating=gating.layer, loss=gating.loss,
      branches=gating.branches, model=config.model,
      ssl=config.ssl, optim=config.optim, augment=config.augment,
      probe_learning_rate=config.probe.learning_rate,
      image_size=config.data.image_size, num_classes=config.data.num_classes,
      batch_size=config.batch_size, steps_per_epoch=per_epoch,
      total_steps=steps)


def check_branches(framework: str, spec: GatingSpec,
                   branches: BranchSpec) -> None:
  """ValueError when the branch wiring has no meaning for the framework."""
  has_target = frameworks.FRAMEWORK_TABLE[framework].target
  if branches.has_dense_partner and has_target:
    raise ValueError(
        f"gating.branches='dense_partner' is for the shared-encoder "
        f"frameworks (simclr, simsiam); framework={framework!r} has a "
        f"target encoder, and its dense-partner form is "
        f"gating.branches='online' (the target left dense).")
  if branches.branches == 'online' and spec.enabled and not has_target:
    raise ValueError(
        f"gating.branches='online' leaves a target encoder dense; "
        f"framework={framework!r} has none (its dense-partner form is "
        f"gating.branches='dense_partner').")


def build_networks(settings: Settings) -> Networks:
  """Builds the online/target encoders and the probe."""
  ssl = settings.ssl
  dtype = models.compute_dtype(settings.model.get('dtype', 'float32'))
  projector = MLP(tuple(ssl.projector_hidden_dims), ssl.projector_dim,
                  ssl.projector_last_bn, dtype)
  predictor = None
  framework = settings.framework_record
  problems = ssl_problems(ssl, settings.framework, settings.batch_size)
  if problems:
    raise ValueError('Invalid ssl settings:\n  ' + '\n  '.join(problems))
  if framework.predictor:
    predictor = MLP(tuple(ssl.predictor_hidden_dims), ssl.predictor_dim,
                    dtype=dtype)
  spec, branches = settings.gating, settings.branches
  # Under the dense partner the online encoder's batch is [view 1 gated;
  # view 2 with every gate open].
  gate_mode = 'partner' if branches.has_dense_partner else 'gated'
  online = SSLNetwork(
      models.create_resnet(
          settings.model, spec, gate_mode=gate_mode,
          separate_partner_norm=branches.separate_partner_norm),
      projector, predictor)
  target = None
  if framework.target:
    target_gating = spec if branches.branches == 'both' else None
    target = SSLNetwork(models.create_resnet(settings.model, target_gating),
                        projector)
  return Networks(online, target, nn.Dense(settings.num_classes))


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


# ------------------------------------------------------------------ the state


def create_train_state(settings: Settings, networks: Networks,
                       rng: jax.Array) -> TrainState:
  """Initialises parameters, optimiser, target, queue and probe."""
  size = settings.image_size
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
    target_params = jax.tree.map(
        jnp.copy, frameworks.select_like(params, shapes['params']))
    target_stats = jax.tree.map(jnp.copy, frameworks.select_like(
        batch_stats, shapes.get('batch_stats', {})))
  if settings.framework_record.queue:
    # ssl_problems checked the queue's size (build_networks).
    queue_size = settings.ssl.queue_size
    keys = jax.random.normal(state_rng,
                             (queue_size, settings.ssl.projector_dim))
    queue = {'keys': losses.l2_normalize(keys),
             'pointer': jnp.zeros((), jnp.int32)}
  feature_dim = models.feature_dim(settings.model.name, settings.model.width)
  probe_params = networks.probe.init(
      probe_rng, jnp.zeros((1, feature_dim)))['params']
  tx = optimizers.make_optimizer(settings.optim,
                                 settings.learning_rate_schedule())
  probe_tx = optax.adam(settings.probe_learning_rate)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), target_params=target_params,
      target_batch_stats=target_stats, queue=queue, probe_params=probe_params,
      probe_opt_state=probe_tx.init(probe_params),
      rng=jax.random.key_data(state_rng))


# ------------------------------------------------------------------- the step


def _branch_inputs(framework: frameworks.Framework, view1, view2,
                   stat_groups: int):
  """(online input, its statistics groups, target input, its groups).

  Asymmetric frameworks (MoCo v2: queries from view 1, keys from view 2) give
  each branch one view, so its statistics are per branch by construction;
  the others give every network [view 1; view 2].
  """
  if framework.asymmetric_views:
    return view1, 1, view2, 1
  both = jnp.concatenate([view1, view2], axis=0)
  return both, stat_groups, both, stat_groups


def _gate_rngs(spec: GatingSpec, rng):
  """(online, target) RNG streams of the gates, or Nones when none draws.

  Spatial-predictor gates draw Gumbel noise; the sparse train step's
  'sampled' closed-tile gradient draws its sample of closed tiles. Folded
  out of the step key, so the augmentation keys are unchanged; other gates
  get no extra RNG (the same computation as without).
  """
  if spec.kind == 'spatial_predictor':
    stream, salt = GUMBEL_RNG, _GUMBEL_SALT
  elif spec.sparse_training and spec.closed_tile_gradient == 'sampled':
    stream, salt = CLOSED_TILE_RNG, _CLOSED_TILE_SALT
  else:
    return None, None
  online_key, target_key = jax.random.split(jax.random.fold_in(rng, salt))
  return {stream: online_key}, {stream: target_key}


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


def _stat_groups(branches: BranchSpec) -> int:
  """Batch-statistics groups of a [view 1; view 2] batch (`stat_groups`)."""
  if branches.has_dense_partner:
    # Only view 1 is gated (`GatedConv` in 'partner' mode): one branch.
    return 1
  return 2 if branches.saliency_stats == 'per_branch' else 1


def _online_mutable(spec: GatingSpec) -> list[str]:
  """The collections the online network writes in a train step."""
  mutable = ['batch_stats', DENSITY_COLLECTION]
  if spec.kind == 'channel_predictor':
    mutable.append(AUX_COLLECTION)   # FBS's saliency L1 terms
  return mutable


def target_branch(networks: Networks, state: TrainState, target_input,
                  target_groups: int, target_rngs):
  """The target's outputs (gradient stopped) and new statistics."""
  if networks.target is None:
    return None, state.target_batch_stats
  target_out, target_vars = networks.target.apply(
      {'params': state.target_params,
       'batch_stats': state.target_batch_stats},
      target_input, train=True, stat_groups=target_groups,
      rngs=target_rngs, mutable=['batch_stats'])
  return jax.lax.stop_gradient(target_out), target_vars['batch_stats']


def _gate_loss(settings: Settings, params, densities, aux,
               costs: tuple[flops.LayerCost, ...], step) -> jax.Array:
  """The gate regulariser at `step`, with its schedules (0 without gates)."""
  spec = settings.loss
  if spec is None:
    return jnp.zeros(())
  target_fn = regularizers.density_target_schedule(spec, settings.total_steps)
  budget_fn = regularizers.budget_schedule(spec, settings.total_steps)
  return regularizers.gate_regularizer(spec, params, densities, aux,
                                       target_fn(step), costs, budget_fn(step))


def online_loss(params, settings: Settings, networks: Networks,
                costs: tuple[flops.LayerCost, ...], state: TrainState,
                online_input, online_groups: int, online_rngs, target_out,
                queue_keys):
  """SSL loss + gate regulariser of the online branch, and its outputs.

  Returns `(loss, aux)`, aux holding the new batch statistics, the gate
  densities, the embeddings, the features and both loss terms; `params` is
  first, the argument `jax.value_and_grad` differentiates.
  """
  out, new_vars = networks.online.apply(
      {'params': params, 'batch_stats': state.batch_stats}, online_input,
      train=True, stat_groups=online_groups,
      rngs=online_rngs, mutable=_online_mutable(settings.gating))
  with jax.named_scope('ssl_loss'):
    loss, embeddings = frameworks.ssl_loss(settings.framework, out, target_out,
                                queue_keys, settings.ssl.temperature)
  with jax.named_scope('gate_regularizer'):
    densities = flops.mean_densities(new_vars.get(DENSITY_COLLECTION, {}))
    gate_loss = _gate_loss(settings, params, densities,
                           new_vars.get(AUX_COLLECTION, {}), costs,
                           state.step)
  aux = dict(batch_stats=new_vars['batch_stats'], densities=densities,
             embeddings=embeddings, features=out['features'], ssl_loss=loss,
             gate_loss=gate_loss)
  return loss + gate_loss, aux


def step_metrics(settings: Settings, costs: tuple[flops.LayerCost, ...],
                 state: TrainState, total_loss, aux, tau, probe_loss, logits,
                 labels) -> dict[str, Any]:
  """The step's metrics: losses, schedules, probe, collapse and gating."""
  spec = settings.loss
  gated_costs = [c for c in costs if c.gated]
  densities = aux['densities']
  metrics = {
      'loss': total_loss, 'ssl_loss': aux['ssl_loss'],
      'gate_loss': aux['gate_loss'],
      'learning_rate': settings.learning_rate_schedule()(state.step),
      'tau': tau, 'probe_loss': probe_loss,
      'probe_accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'embedding_std': losses.embedding_std(aux['embeddings']),
      'flops_reduction': flops.flops_reduction(costs, densities),
  }
  if spec is not None and spec.target_anneal_fraction > 0:
    metrics['density_target'] = regularizers.density_target_schedule(
        spec, settings.total_steps)(state.step)
  if spec is not None and spec.is_budget:
    budget = regularizers.budget_schedule(spec, settings.total_steps)(
        state.step)
    metrics['budget_scale'] = budget['scale']
    if spec.budget_bounds_fraction > 0:
      metrics['bound_tightness'] = budget['tightness']
  if gated_costs:
    gated_macs = sum(c.macs for c in gated_costs)
    metrics['gate_density'] = sum(
        c.macs * densities[c.name] for c in gated_costs) / gated_macs
    metrics['layer_density'] = dict(densities)
  return metrics


def pretraining_step(settings: Settings, networks: Networks,
                     costs: tuple[flops.LayerCost, ...], state: TrainState,
                     batch) -> tuple[TrainState, dict[str, Any]]:
  """One pretraining step: `(new state, metrics)` (not jitted).

  Args:
    settings: the run's settings (`read_settings`).
    networks: from `build_networks`.
    costs: `flops.layer_costs` of the online network (names prefixed
      'backbone/'), for the gate regulariser and the FLOPs reduction metric.
    state: the `TrainState` before the step.
    batch: {'image': uint8 (B, H, W, 3), 'label': int (B,)}; both views are
      augmented inside the step from per-image keys.

  The step: views -> target branch -> online loss and gradient (SSL loss +
  gate regulariser) -> optimiser -> EMA target and queue -> online probe ->
  metrics.
  """
  framework = settings.framework_record
  spec = settings.gating
  tx = optimizers.make_optimizer(settings.optim,
                                 settings.learning_rate_schedule())
  probe_tx = optax.adam(settings.probe_learning_rate)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  # The named scopes label the compiled program's ops for profiles
  # (experiments/benchmarks/profile_step.py); they change no numerics.
  with jax.named_scope('augment'):
    view1, view2 = augment.two_views(rng, batch['image'], settings.augment)
  online_rngs, target_rngs = _gate_rngs(spec, rng)
  online_input, online_groups, target_input, target_groups = _branch_inputs(
      framework, view1, view2, _stat_groups(settings.branches))
  with jax.named_scope('target_branch'):
    target_out, target_stats = target_branch(
        networks, state, target_input, target_groups, target_rngs)
  queue_keys = state.queue['keys'] if framework.queue else None

  (total_loss, aux), grads = jax.value_and_grad(online_loss, has_aux=True)(
      state.params, settings, networks, costs, state, online_input,
      online_groups, online_rngs, target_out, queue_keys)
  with jax.named_scope('optimizer'):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tau = optimizers.tau_schedule(settings.ssl,
                                  settings.total_steps)(state.step)
    target_params = state.target_params
    if networks.target is not None:
      target_params = frameworks.ema_update(
          state.target_params,
          frameworks.select_like(params, state.target_params), tau)
    queue = state.queue
    if framework.queue:
      queue = frameworks.updated_queue(state.queue, target_out['projection'])

  # The probe reads the first view's features.
  labels = batch['label']
  with jax.named_scope('probe'):
    probe_params, probe_opt_state, probe_loss, logits = _probe_step(
        networks.probe, probe_tx, state, aux['features'][:view1.shape[0]],
        labels)
  with jax.named_scope('metrics'):
    metrics = step_metrics(settings, costs, state, total_loss, aux, tau,
                           probe_loss, logits, labels)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
      opt_state=opt_state, target_params=target_params,
      target_batch_stats=target_stats, queue=queue,
      probe_params=probe_params, probe_opt_state=probe_opt_state)
  return new_state, metrics


def make_train_step(settings: Settings, networks: Networks,
                    costs: tuple[flops.LayerCost, ...]) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted):
  `pretraining_step` with the run's settings, networks and layer costs bound
  (see it for the arguments)."""
  # A function, not a functools.partial: callers inspect it (chex's trace
  # counter reads its source file).
  def train_step(state: TrainState, batch):
    return pretraining_step(settings, networks, costs, state, batch)
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


def assemble(settings: Settings) -> Pretraining:
  """Builds everything a train step needs, in one place: training, the
  abstract shape check and the step-timing benchmark all call this."""
  networks = build_networks(settings)
  costs = online_costs(networks, settings.image_size)
  return Pretraining(
      networks=networks, costs=costs,
      init_state=functools.partial(create_train_state, settings, networks),
      train_step=make_train_step(settings, networks, costs))


def online_costs(networks: Networks, image_size: int
                 ) -> tuple[flops.LayerCost, ...]:
  """Per-example layer costs of the online network (backbone + heads)."""
  size = image_size
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: networks.online.init(jax.random.key(0), jnp.zeros(x.shape)))
  return flops.layer_costs(networks.online, variables, x, train=False)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh,
                   donate: bool = True) -> Callable:
  """jit over the mesh: batch sharded over 'data', state replicated, donated.

  Traced under the mesh (`parallel.traced_under`), so that the sparse train
  step's executor runs per device. `donate`: False keeps the state passed in
  (benchmarks time every call from the same state).
  """
  return jax.jit(parallel.traced_under(mesh, train_step),
                 in_shardings=(parallel.replicated(mesh),
                               parallel.data_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh),
                                parallel.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())
