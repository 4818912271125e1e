"""Device set-up: host CPU splitting, multi-host initialisation, the data mesh.

Data parallelism is `jax.jit` over a one-axis `Mesh` named 'data': the batch is
sharded over it, the train state replicated (DESIGN.md section 3). No `pmap`.
"""

from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
_HOST_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def split_host_into_devices(count: int = 0) -> int | None:
  """Makes XLA expose `count` CPU devices (0: one per core); call before JAX starts.

  XLA's CPU backend runs a convolution on about one core per device, so on a
  CPU-only machine sharding the batch over one device per core nearly doubled
  throughput on 2 cores in our measurement. The flag only affects the CPU
  platform: on GPU/TPU machines it is harmless. An explicit
  `--xla_force_host_platform_device_count` in `XLA_FLAGS` wins.

  Args:
    count: number of CPU devices; 0 means `os.cpu_count()`; 1 leaves XLA alone.

  Returns:
    The device count requested, or None if nothing was changed (flag already
    set, count 1, or JAX's backends already initialised).
  """
  if count < 0:
    raise ValueError(f'cpu_devices must be >= 0, got {count}.')
  count = count or os.cpu_count() or 1
  flags = os.environ.get('XLA_FLAGS', '')
  if count == 1 or _HOST_DEVICE_FLAG in flags:
    return None
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return None
  os.environ['XLA_FLAGS'] = f'{flags} {_HOST_DEVICE_FLAG}={count}'.strip()
  return count


def initialize_distributed() -> None:
  """Joins a multi-host cluster when one is detected (TPU pod, SLURM, ...).

  `jax.distributed.initialize()` auto-detects the cluster; on a single machine
  there is nothing to join and it is skipped.
  """
  cluster_env = ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'JAX_COORDINATOR_ADDRESS',
                 'OMPI_COMM_WORLD_SIZE')
  if any(os.environ.get(v) for v in cluster_env):
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over the first `num_devices` devices (default all)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'Asked for {n} devices but only {len(devices)} exist.')
  return jax.sharding.Mesh(devices[:n], (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places a pytree (e.g. the train state) replicated on every mesh device.

  The jitted step expects its state with this sharding: a state on a single
  device would be accepted but trigger a second trace and compilation.
  """
  return jax.device_put(tree, replicated(mesh))


def check_batch_divisible(batch_size: int, mesh: jax.sharding.Mesh,
                          what: str = 'batch_size') -> None:
  """Raises a clear error when a global batch cannot be split evenly."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is not divisible by the {n} devices '
                     f'of the mesh; choose a multiple of {n}.')
  if batch_size % jax.process_count():
    raise ValueError(f'{what}={batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')
