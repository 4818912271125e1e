"""Tests of the SSL losses, frameworks and the data-parallel train step."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.data import augment
from cdg_jax.gating import regularizers
from cdg_jax.run import config_lib
from cdg_jax.run import parallel
from cdg_jax.ssl import frameworks
from cdg_jax.ssl import losses
from cdg_jax.ssl import optimizers
from cdg_jax.ssl import pretraining

NUM_TRAIN = 256


def tiny_config(framework, batch_size=8, num_steps=32):
  config = config_lib.base_config()
  config.framework = framework
  config.model.name = 'resnet10'
  config.model.width = 8
  config.data.image_size = 16
  config.data.num_classes = 4
  config.ssl.projector_hidden_dims = (32,)
  config.ssl.projector_dim = 16
  if framework in ('byol', 'simsiam'):
    config.ssl.predictor_hidden_dims = (32,)
    config.ssl.predictor_dim = 16
  config.ssl.queue_size = 32
  if framework == 'mocov2':
    # A faster momentum encoder than MoCo's 0.99, so a 32-step run learns.
    config.ssl.temperature = 0.2
    config.ssl.base_tau = 0.9
    config.ssl.tau_schedule = 'constant'
  # The channel-gating threshold regulariser at its small lambda: these tests
  # check that a width-8 network learns within 32-64 steps, and the default
  # density regulariser (lambda 1.0, target 0.25) is a large part of such a
  # network's loss (MoCo then failed the learning check). The default form
  # is exercised by the end-to-end runs (test_train, test_run_grid).
  config.gating.regularizer = 'threshold'
  config.gating.weight = 1e-4
  config.optim.name = 'sgd'
  config.optim.base_learning_rate = 3.2   # peak 0.1 at batch 8
  config.optim.warmup_epochs = 0.0
  config.batch_size = batch_size
  config.num_steps = num_steps
  # Mild augmentation: the tests check that the step learns, in few steps.
  config.augment = augment.augment_preset('simclr_cifar', 16)
  for view in (config.augment.view1, config.augment.view2):
    view.crop_scale = (0.5, 1.0)
    view.jitter_prob = 0.0
    view.grayscale_prob = 0.0
  return config


def set_kind(config, kind):
  """Switches a `tiny_config` to gates of `kind`: its threshold regulariser
  is CDG's alone, and the other kinds refuse what they do not read."""
  config.gating.kind = kind
  if kind != 'cdg':
    config.gating.regularizer = 'density'
  if kind == 'none':
    config.gating.weight = 1.0
  return config


def fixed_batch(batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth random images (upsampled 4x4 noise), so crops of one image look alike.
  small = rng.integers(0, 256, (batch_size, 4, 4, 3)).astype(np.float32)
  images = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2).astype(np.uint8)
  return {'image': images,
          'label': rng.integers(0, 4, (batch_size,)).astype(np.int32)}


def settings_of(config, num_train=NUM_TRAIN):
  """The run's settings, read as an entry point reads them."""
  return pretraining.read_settings(config, config_lib.read_gating(config.gating),
                                   num_train)


def setup(config, num_devices=1):
  run = pretraining.assemble(settings_of(config))
  state = run.init_state(jax.random.key(0))
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(state, mesh)
  return run.networks, state, mesh, run.train_step


def jit_setup(config, num_devices=1):
  """`setup`, with the state initialised by one compiled program instead of
  op by op: the same values up to float32 rounding (the same random keys), in
  a fraction of the time on CPU."""
  run = pretraining.assemble(settings_of(config))
  state = jax.jit(run.init_state)(jax.random.key(0))
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(state, mesh)
  return run.networks, state, mesh, run.train_step


@pytest.fixture(scope='module')
def built():
  """`built(config, num_devices=1)` -> `(networks, state, mesh, step_fn,
  step)`, as `jit_setup` gives them plus the step jitted on the mesh
  (`jit_train_step`), built once per config and device count in this module:
  tests of one config share one initialisation and one compiled step. Each
  call gets its own copy of the initial state (the step donates its state)."""
  runs, steps = {}, {}

  def get(config, num_devices=1):
    key = config.to_json()
    if key not in runs:
      networks, state, _, step_fn = jit_setup(config)
      runs[key] = (networks, jax.device_get(state), step_fn)
    networks, initial, step_fn = runs[key]
    if (key, num_devices) not in steps:
      mesh = parallel.make_mesh(num_devices)
      steps[key, num_devices] = (mesh,
                                 pretraining.jit_train_step(step_fn, mesh))
    mesh, step = steps[key, num_devices]
    # From host memory: fresh device buffers for every call.
    return networks, parallel.replicate(initial, mesh), mesh, step_fn, step

  return get


def framework_config(framework):
  # MoCo learns more slowly (its keys come from a lagging encoder).
  return tiny_config(framework, num_steps=64 if framework == 'mocov2' else 32)


# ---------------------------------------------------------------- losses


def test_nt_xent_matches_hand_computation_for_two_pairs():
  z1 = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  z2 = jnp.array([[1.0, 1.0], [0.0, -1.0]])
  t = 0.5
  z = np.array([[1, 0], [0, 1], [1 / np.sqrt(2), 1 / np.sqrt(2)], [0, -1]])
  sim = z @ z.T / t
  expected = 0.0
  for i, pos in enumerate([2, 3, 0, 1]):
    others = [sim[i, k] for k in range(4) if k != i]
    expected += -(sim[i, pos] - np.log(np.sum(np.exp(others))))
  np.testing.assert_allclose(losses.nt_xent(z1, z2, t), expected / 4, rtol=1e-5)


def test_info_nce_matches_hand_computation():
  q = jnp.array([[3.0, 0.0]])
  k = jnp.array([[1.0, 1.0]])
  queue = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
  t = 0.2
  logits = np.array([1 / np.sqrt(2), 0.0, -1.0]) / t
  expected = -(logits[0] - np.log(np.sum(np.exp(logits))))
  np.testing.assert_allclose(losses.info_nce(q, k, queue, t), expected, rtol=1e-5)


def test_byol_and_simsiam_losses():
  p = jnp.array([[2.0, 0.0], [1.0, 1.0]])
  z = jnp.array([[0.0, 5.0], [3.0, 3.0]])
  np.testing.assert_allclose(losses.normalized_mse(p, z), [2.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(losses.negative_cosine(p, z), [0.0, -1.0], atol=1e-6)
  collapsed = jnp.ones((5, 4))
  assert float(losses.embedding_std(collapsed)) == 0.0


# ------------------------------------------------------------ schedules


def test_tau_and_learning_rate_schedules_follow_their_formulas():
  config = tiny_config('byol', num_steps=100)
  config.optim.warmup_epochs = 10.0        # 32 steps/epoch -> capped below 100
  tau = optimizers.tau_schedule(config.ssl, settings_of(config).total_steps)
  for step in [0, 25, 50, 100]:
    expected = 1 - (1 - 0.99) * (np.cos(np.pi * step / 100) + 1) / 2
    np.testing.assert_allclose(tau(step), expected, rtol=1e-6)
  config.ssl.tau_schedule = 'constant'
  np.testing.assert_allclose(optimizers.tau_schedule(config.ssl, 100)(50), 0.99)
  config.optim.warmup_epochs = 0.5         # 16 warm-up steps
  lr = settings_of(config).learning_rate_schedule()
  peak = 3.2 * 8 / 256
  np.testing.assert_allclose(lr(8), peak * 8 / 16, rtol=1e-6)
  np.testing.assert_allclose(
      lr(58), peak * 0.5 * (1 + np.cos(np.pi * 42 / 84)), rtol=1e-5)


def test_density_target_schedule_and_regulariser_forms():
  fixed = regularizers.density_target_schedule(
      regularizers.RegularizerSpec(density_target=0.25), 100)
  np.testing.assert_allclose([fixed(s) for s in (0, 50, 100)], 0.25)
  annealed = regularizers.density_target_schedule(
      regularizers.RegularizerSpec(density_target=0.25,
                                   target_anneal_fraction=0.4), 100)
  # 1.0 at step 0, linear to 0.25 at step 40, constant after.
  np.testing.assert_allclose([annealed(s) for s in (0, 10, 40, 90)],
                             [1.0, 0.8125, 0.25, 0.25], rtol=1e-6)
  params = {'a': {'threshold': jnp.array([0.0, 3.0])},
            'b': {'threshold': jnp.array([1.0])}}
  densities = {'a': jnp.array(0.5), 'b': jnp.array(0.25)}
  value = lambda **kw: float(regularizers.gate_regularizer(
      regularizers.RegularizerSpec(weight=2.0, **kw), params, densities,
      density_target=kw.get('density_target')))
  # (0-1)^2 + (3-1)^2 + 0 = 5, times lambda 2.
  np.testing.assert_allclose(value(regularizer='threshold_sum'), 10.0)
  # Per-layer means: 2.5 + 0.
  np.testing.assert_allclose(value(regularizer='threshold'), 5.0)
  # (0.5-0.25)^2 + 0, times 2; a scheduled target replaces the fixed one.
  np.testing.assert_allclose(value(density_target=0.25), 0.125)
  np.testing.assert_allclose(float(regularizers.gate_regularizer(
      regularizers.RegularizerSpec(weight=2.0), params, densities,
      density_target=0.5)),
      2 * 0.0625)


def test_ema_update_and_decay_mask():
  target = {'a': jnp.array([1.0, 2.0])}
  online = {'a': jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(frameworks.ema_update(target, online, 0.9)['a'],
                             [1.2, 2.4], rtol=1e-6)
  mask = optimizers.decay_mask({'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3),
                         'threshold': jnp.ones(3)})
  assert mask == {'kernel': True, 'bias': False, 'threshold': False}


# ------------------------------------------------------------- training


@pytest.mark.parametrize('framework', frameworks.FRAMEWORKS)
def test_each_framework_learns_and_moves_gates(built, framework):
  config = framework_config(framework)
  _, state, _, _, step = built(config)
  # Fixed synthetic data: 8 batches of 8 images, cycled. (MoCo's queue of 4
  # batches then never holds keys of the images being queried.)
  batches = [fixed_batch(seed=i) for i in range(8)]
  first_threshold = np.asarray(regularizers.thresholds(state.params)[0])
  first_kernel = np.asarray(
      state.params['backbone']['stage1_block0']['conv1']['kernel'])
  history = []
  for i in range(config.num_steps):
    state, metrics = step(state, batches[i % 8])
    history.append(jax.device_get(metrics))
  ssl_loss = [m['ssl_loss'] for m in history]
  assert np.all(np.isfinite(ssl_loss))
  # MoCo's loss rises while its random initial queue is replaced by real keys
  # (harder negatives); compare from the first step with a full queue.
  start = config.ssl.queue_size // config.batch_size if framework == 'mocov2' else 0
  assert np.mean(ssl_loss[-8:]) < np.mean(ssl_loss[start:start + 8]) - 0.02, ssl_loss
  threshold = np.asarray(regularizers.thresholds(state.params)[0])
  kernel = np.asarray(state.params['backbone']['stage1_block0']['conv1']['kernel'])
  assert np.abs(threshold - first_threshold).max() > 1e-4
  # The base path is the first quarter of the input channels.
  assert np.abs(kernel[:, :, :2] - first_kernel[:, :, :2]).max() > 1e-4
  last = history[-1]
  assert 0 < last['gate_density'] < 1
  assert last['flops_reduction'] > 1
  assert set(last['layer_density']) == {
      f'backbone/stage{i}_block0/conv{j}' for i in range(1, 5) for j in (1, 2)}
  assert int(state.step) == config.num_steps


def test_moco_queue_and_byol_ema_follow_their_formulas(built):
  batch = fixed_batch()
  # MoCo: the keys of this step's view 2 are written at the pointer. (The
  # configs and compiled steps of test_each_framework_learns_and_moves_gates:
  # neither formula depends on the run's length.)
  config = framework_config('mocov2')
  networks, state, _, _, step = built(config)
  old_keys = np.asarray(state.queue['keys'])

  @jax.jit
  def reference_keys(state, images):   # jitted: op by op takes far longer
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    _, view2 = augment.two_views(rng, images, config.augment)
    target_out, _ = networks.target.apply(
        {'params': state.target_params,
         'batch_stats': state.target_batch_stats},
        view2, train=True, mutable=['batch_stats'])
    return losses.l2_normalize(target_out['projection'])

  expected_keys = reference_keys(state, jnp.asarray(batch['image']))
  new_state, _ = step(state, batch)
  np.testing.assert_allclose(new_state.queue['keys'][:8], expected_keys,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(new_state.queue['keys'][8:], old_keys[8:])
  assert int(new_state.queue['pointer']) == 8

  # BYOL: target <- tau * target + (1 - tau) * new online, tau from the schedule.
  config = framework_config('byol')
  _, state, _, _, step = built(config)
  old_target = jax.tree.map(np.asarray, state.target_params)
  new_state, metrics = step(state, batch)
  tau = 1 - (1 - 0.99) * (np.cos(0.0) + 1) / 2
  np.testing.assert_allclose(metrics['tau'], tau, rtol=1e-6)
  online = frameworks.select_like(new_state.params, old_target)
  expected = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, old_target, online)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.target_params, expected)
  assert 'predictor' not in new_state.target_params
  assert regularizers.thresholds(new_state.target_params)  # the target is gated too


def test_online_only_gating_leaves_the_target_dense():
  config = tiny_config('byol')
  config.gating.branches = 'online'
  # The state's structure is all this needs: shapes, nothing computed.
  run = pretraining.assemble(settings_of(config))
  state = jax.eval_shape(run.init_state, jax.random.key(0))
  assert regularizers.thresholds(state.params) and not regularizers.thresholds(state.target_params)


@pytest.mark.parametrize('framework,kind', [
    # CDG with a target network (BYOL): the gates' batch statistics, the
    # online and the target encoder's BatchNorm, the EMA. (SimCLR's loss over
    # the sharded batch is the predictor cases' below.)
    ('byol', 'cdg'),
    # The baselines: per-sample top-k, and Gumbel noise drawn for the global
    # batch (the same values however the batch is sharded).
    ('simclr', 'channel_predictor'), ('simclr', 'spatial_predictor')])
def test_two_devices_match_one_device(built, framework, kind):
  assert len(jax.devices()) >= 2, 'conftest.py should give two CPU devices'
  config = set_kind(tiny_config(framework), kind)
  if kind == 'spatial_predictor':
    config.gating.weight = 1.0
  # A batch on which no ReLU input or Gumbel gate logit of the first step sits
  # within float32 rounding of zero: the smallest |value| is 1.1e-5 (CDG and
  # the channel predictor) and 7.3e-5 (spatial predictor), against the 1e-7
  # relative rounding that separates a sharded step from an unsharded one.
  # On seed 0's batch one ReLU input of the spatial-predictor network was
  # 3.8e-8; under the test flags (--xla_backend_optimization_level=0, Intel
  # Xeon) its sign differed between the two meshes, and the stem's and first
  # block's gradients with it (2.6e-3 relative): a legitimate difference that
  # this test is not about.
  batch = fixed_batch(seed=5)
  results = []
  for num_devices in (1, 2):
    # The same initial state on either mesh (BYOL's is shared with
    # test_each_framework_learns_and_moves_gates, whose config it is).
    _, state, mesh, step_fn, _ = built(config, num_devices)
    chex.clear_trace_counter()   # a new mesh is a legitimate new trace
    traced = chex.assert_max_traces(step_fn, n=1)
    step = pretraining.jit_train_step(traced, mesh)
    sharded = jax.device_put(batch, parallel.data_sharding(mesh))
    state, metrics = step(state, sharded)
    # Fetch before the next call donates this state's buffers.
    results.append(jax.device_get((state, metrics)))
    for _ in range(2):   # three calls in all, one trace
      state, _ = step(state, sharded)
  (state1, metrics1), (state2, metrics2) = results
  # One step from identical parameters. (Over several steps, float32
  # reduction-order differences can flip a hard gate whose saliency sits on
  # its threshold, and the runs then drift apart legitimately.)
  np.testing.assert_allclose(metrics1['loss'], metrics2['loss'], rtol=1e-5)
  # New parameters, momentum (the accumulated gradients), BN and saliency
  # statistics, target and probe: the whole state.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               state1, state2)


def test_bad_input_is_reported_clearly():
  config = tiny_config('simclr', batch_size=9)
  mesh = parallel.make_mesh(2)
  with pytest.raises(ValueError, match='batch_size=9 is not divisible by the 2 devices'):
    parallel.check_batch_divisible(config.batch_size, mesh)
  # The framework and the optimiser are checked once, with the config.
  config = tiny_config('swav')
  with pytest.raises(ValueError, match="framework='swav'"):
    config_lib.validate(config)
  config = tiny_config('simclr')
  config.optim.name = 'adamw'
  with pytest.raises(ValueError, match="optim.name='adamw'"):
    config_lib.validate(config)
  config = tiny_config('mocov2')
  config.ssl.queue_size = 30
  with pytest.raises(ValueError, match='queue_size=30 must be a positive '
                     'multiple of batch_size=8'):
    settings = settings_of(config)
    pretraining.create_train_state(settings, pretraining.build_networks(settings),
                                   jax.random.key(0))
