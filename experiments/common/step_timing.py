"""Train-step timing shared by the step benchmarks (`benchmark_step.py`,
`benchmark_levers.py`, `benchmark_processes.py`, `profile_step.py`) and
`accelerator_protocol.py`."""

import statistics
import time


def build_step(config, num_train: int = 50_000):
  """`config`'s jitted train step (donating its state, as training does),
  its replicated initial state and one sharded batch of synthetic uint8
  images: `(step, state, batch)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import parallel
  from cdg_jax.ssl import pretraining

  settings = pretraining.read_settings(config, config_lib.validate(config),
                                       num_train)
  run = pretraining.assemble(settings)
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.batch_size, mesh)
  state = parallel.replicate(run.init_state(jax.random.key(0)), mesh)
  step = pretraining.jit_train_step(run.train_step, mesh)
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {'image': rng.integers(0, 256, (config.batch_size, size, size, 3),
                             np.uint8),
       'label': rng.integers(0, config.data.num_classes,
                             (config.batch_size,)).astype(np.int32)},
      parallel.data_sharding(mesh))
  return step, state, batch


def time_step(config, steps: int, num_train: int = 50_000) -> dict:
  """Compiles `config`'s train step and times it on synthetic uint8 images.

  Args:
    config: a run config (framework, model, gating, batch size, dtype).
    steps: timed steps after the first (compilation) step.
    num_train: training-set size the schedules assume.

  Returns:
    {'gating', 'dtype', 'devices', 'median_step_s', 'images_per_s',
     'first_step_s' (compilation included), 'flops_reduction', 'loss',
     'minor_faults_per_step' (this process's, median)}.
  """
  import resource  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  step, state, batch = build_step(config, num_train)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_and_first = time.perf_counter() - start
  times, faults = [], []
  for _ in range(steps):
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                  - faults_before)
  median = statistics.median(times)
  return {'gating': config.gating.kind, 'dtype': config.model.dtype,
          'devices': len(jax.devices()), 'median_step_s': median,
          'images_per_s': config.batch_size / median,
          'first_step_s': compile_and_first,
          'flops_reduction': float(metrics['flops_reduction']),
          # After the timed steps from one state and batch: equal losses
          # across XLA options mean equal numerics.
          'loss': float(metrics['loss']),
          # Fresh memory the step maps (see benchmark_peer.py).
          'minor_faults_per_step': statistics.median(faults) if faults
                                   else None}
