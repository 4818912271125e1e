"""Device set-up: host CPU splitting, multi-host initialisation, the data mesh.

Data parallelism is `jax.jit` over a one-axis `Mesh` named 'data': the batch is
sharded over it, the train state replicated (docs/method.md [training]). No `pmap`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import socket
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'
_HOST_DEVICE_FLAG = '--xla_force_host_platform_device_count'


# XLA:CPU hands convolutions to YNNPACK by default. Its kernels ran our
# ResNet convolutions (forward and both gradients) 1.3-2.6x slower than XLA's
# own (Eigen) kernels on a 2-core Xeon (experiments/results/levers/), and the
# whole width-64 dense train step 1.6x slower. The flag names an XLA:CPU
# option only: GPU and TPU backends ignore it.
CPU_CONVOLUTION_FLAG = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution')


def configure_cpu(cpu_devices: int = 0) -> dict[str, str]:
  """Sets this project's XLA:CPU flags; call before JAX starts its backends.

  1. One XLA device per core (`cpu_devices`; 0: one per core; 1: leave XLA
     alone). XLA's CPU backend runs a convolution on about one core per
     device, so on a CPU-only machine sharding the batch over one device per
     core nearly doubled throughput on 2 cores in our measurement.
  2. Convolutions on XLA's own kernels rather than YNNPACK's
     (`CPU_CONVOLUTION_FLAG`); `cdg_jax.gating.ops.auto_formulation`'s
     per-shape choices were measured with them.

  Both flags act on the CPU platform only; on GPU/TPU machines they are
  harmless. A flag the user already put in `XLA_FLAGS` (the same option, any
  value) wins, and nothing is changed once JAX's backends are initialised
  (XLA read its flags then).

  Args:
    cpu_devices: number of CPU devices; 0 means `os.cpu_count()`.

  Returns:
    The flags added, by option name ({} when nothing was changed).
  """
  if cpu_devices < 0:
    raise ValueError(f'cpu_devices must be >= 0, got {cpu_devices}.')
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return {}
  count = cpu_devices or os.cpu_count() or 1
  wanted = [CPU_CONVOLUTION_FLAG]
  if count > 1:
    wanted.append(f'{_HOST_DEVICE_FLAG}={count}')
  flags = os.environ.get('XLA_FLAGS', '')
  added = {}
  for flag in wanted:
    option = flag.split('=', 1)[0]
    if option not in flags:
      added[option] = flag
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *added.values()]).strip()
  return added


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           initialization_timeout: int = 120,
                           heartbeat_timeout_seconds: int = 60) -> None:
  """Joins the processes of one run into JAX's distributed runtime.

  With `coordinator_address`, `num_processes` and `process_id` (the names of
  `jax.distributed.initialize`'s arguments), those processes are joined,
  on one machine or several. Without them, JAX's own cluster detection
  (Cloud TPU, SLURM, Open MPI) runs where such a cluster is detected, and a
  single process on its own joins nothing. Cross-process collectives on CPU
  use gloo.

  Args:
    coordinator_address: 'host:port' of process 0, which serves the
      coordination service there.
    num_processes: processes of the run.
    process_id: this process, in [0, num_processes).
    local_device_ids: this process's local accelerators (default: all).
    initialization_timeout: seconds to wait for every process to join; a
      coordinator that cannot be reached fails after it.
    heartbeat_timeout_seconds: a process silent this long (killed, its host
      gone) is declared dead by the coordination service, which then stops
      the others.

  Raises:
    ValueError: some but not all of the three launch values are given, or
      process_id is outside [0, num_processes).
    RuntimeError: the processes could not be joined within
      `initialization_timeout`.
  """
  given = {'coordinator_address': coordinator_address,
           'num_processes': num_processes, 'process_id': process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
          f'--{" --".join(missing)} missing: several processes are started '
          f'with all three of --coordinator_address, --num_processes and '
          f'--process_id (got {given}).')
    if num_processes < 1:
      raise ValueError(f'--num_processes={num_processes} must be at least 1 '
                       f'(the number of processes of the run).')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, '
                       f'--num_processes={num_processes}).')
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address={coordinator_address!r} must '
                       f'be host:port, e.g. 127.0.0.1:1234.')
  else:
    cluster_env = ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
                   'JAX_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE')
    if not any(os.environ.get(v) for v in cluster_env):
      return
  if coordinator_address is not None and process_id != 0:
    # The runtime's client aborts the process (status 134) when it cannot
    # reach the coordinator; find that out here, with a message.
    _wait_for_coordinator(coordinator_address, process_id,
                          initialization_timeout)
  # CPU processes exchange collectives through gloo (no effect on GPU/TPU).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except Exception as e:  # pylint: disable=broad-except
    # The runtime's own messages ("DEADLINE_EXCEEDED ...") do not say what
    # was being waited for.
    raise RuntimeError(
        f'Could not join the distributed runtime as process {process_id} of '
        f'{num_processes} at {coordinator_address or "the detected cluster"}'
        f' within {initialization_timeout} s: {str(e).splitlines()[0]}. Is '
        f'process 0 running there, reachable, and were all processes started '
        f'with the same --num_processes?') from e


def _wait_for_coordinator(address: str, process_id: int,
                          timeout_s: float) -> None:
  """Returns once `address` accepts TCP connections; RuntimeError after
  `timeout_s` seconds."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f'Process {process_id} could not reach the coordinator at '
            f'{address} within {timeout_s:.0f} s ({e}). Start process 0 with '
            f'the same --coordinator_address (it serves it), check that this '
            f'host can reach that address and port, or raise '
            f'--initialization_timeout.') from e
      time.sleep(0.5)


def lost_processes(timeout_s: float = 0.0) -> list[int]:
  """Processes of this run that the coordination service reports dead.

  Asks the distributed runtime's client which processes still send
  heartbeats, for up to `timeout_s` seconds (a process killed a moment ago
  is declared dead only after the heartbeat timeout). Empty on a single
  process, or where this JAX's client cannot tell.
  """
  if jax.process_count() == 1:
    return []
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  everyone = list(range(jax.process_count()))
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      live = set(client.get_live_nodes(everyone))
    except Exception:  # pylint: disable=broad-except
      return []
    lost = [p for p in everyone if p not in live]
    if lost or time.monotonic() >= deadline:
      return lost
    time.sleep(0.5)


def broadcast_text(text: str) -> str:
  """Process 0's `text`, in every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(text.encode(), np.uint8)
  length = int(multihost_utils.broadcast_one_to_all(
      np.array([data.size], np.int32))[0])
  buffer = np.zeros(length, np.uint8)
  if jax.process_index() == 0:
    buffer[:] = data
  received = multihost_utils.broadcast_one_to_all(buffer)
  return bytes(np.asarray(received, np.uint8)).decode()


def processes_where(flag: bool) -> list[int]:
  """The processes whose `flag` is True (a collective: all must call it)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(
      np.array([int(flag)], np.int32))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags)]


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
