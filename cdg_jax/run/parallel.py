"""Device set-up: host CPU splitting, multi-host initialisation, the data mesh.

Data parallelism is `jax.jit` over a one-axis `Mesh` named 'data': the batch is
sharded over it, the train state replicated (docs/method.md [training]). No `pmap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import errno
import functools
import json
import numbers
import os
import selectors
import socket
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from cdg_jax.gating import tiling

# The gating library's executors run per shard along this axis
# (`tiling.per_batch_shard`), so the two names are one.
DATA_AXIS = tiling.BATCH_AXIS
_HOST_DEVICE_FLAG = '--xla_force_host_platform_device_count'


# XLA:CPU hands convolutions to YNNPACK by default. Its kernels ran our
# ResNet convolutions (forward and both gradients) 1.3-2.6x slower than XLA's
# own (Eigen) kernels on a 2-core Xeon (experiments/results/levers/), and the
# whole width-64 dense train step 1.6x slower. The flag names an XLA:CPU
# option only: GPU and TPU backends ignore it.
CPU_CONVOLUTION_FLAG = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution')


# The flags `configure_cpu` put in XLA_FLAGS, by option: a later call before
# JAX starts replaces them (a user's own flags it never touches).
_ADDED_FLAGS: dict[str, str] = {}


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
  value) wins. Called again before JAX starts, the last call's count holds.
  Once JAX's backends are initialised XLA has read its flags: nothing is
  changed, and a count other than the CPU devices JAX started with is an
  error (unless the user's `XLA_FLAGS` set the count, or JAX computes on
  another platform).

  Args:
    cpu_devices: number of CPU devices, an int >= 0; 0 means
      `os.cpu_count()`.

  Returns:
    The flags added, by option name ({} when nothing was changed).

  Raises:
    ValueError: `cpu_devices` is not an int >= 0 (a bool neither), or JAX's
      backends already run on the CPU with another number of devices.
  """
  # A float or a string would reach XLA's flag parser, which kills the
  # process when JAX starts; True would be taken for 1.
  if (isinstance(cpu_devices, bool)
      or not isinstance(cpu_devices, numbers.Integral) or cpu_devices < 0):
    raise ValueError(
        f'configure_cpu: cpu_devices={cpu_devices!r} '
        f'({type(cpu_devices).__name__}) must be an int >= 0: the number of '
        f'CPU devices, 0 for one per core.')
  count = int(cpu_devices) or os.cpu_count() or 1
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    _check_started_count(count, cpu_devices)
    return {}
  flags = os.environ.get('XLA_FLAGS', '').split()
  # This module's own earlier flags give way to this call's.
  kept = [f for f in flags if f not in _ADDED_FLAGS.values()]
  removed = len(kept) < len(flags)
  flags = kept
  _ADDED_FLAGS.clear()
  wanted = [CPU_CONVOLUTION_FLAG]
  if count > 1:
    wanted.append(f'{_HOST_DEVICE_FLAG}={count}')
  added = {}
  for flag in wanted:
    option = flag.split('=', 1)[0]
    if not any(f.split('=', 1)[0] == option for f in flags):
      added[option] = flag
  _ADDED_FLAGS.update(added)
  if added or removed:
    os.environ['XLA_FLAGS'] = ' '.join([*flags, *added.values()])
  return added


def _check_started_count(count: int, cpu_devices: int) -> None:
  """Raises when JAX runs on the CPU with a device count other than `count`
  (what `configure_cpu(cpu_devices)` asks for), which can no longer change."""
  user_count = any(f.startswith(_HOST_DEVICE_FLAG)
                   and f not in _ADDED_FLAGS.values()
                   for f in os.environ.get('XLA_FLAGS', '').split())
  if user_count or jax.default_backend() != 'cpu':
    return   # the user's flag wins; on GPU/TPU the CPU count does not matter
  started = len(jax.devices('cpu'))
  if started != count:
    per_core = '' if cpu_devices else ' (one per core)'
    raise ValueError(
        f'configure_cpu({cpu_devices}) asks for {count} CPU device(s)'
        f'{per_core}, but JAX already runs on {started}: XLA reads its device '
        f'count once, when JAX starts. Call configure_cpu before the first '
        f'JAX computation, or ask for {started}.')


def _check_launch_flags(coordinator_address: str | None,
                        num_processes: int | None,
                        process_id: int | None) -> bool:
  """Whether the three launch flags are given (False: none is); ValueError
  naming the flag when some but not all are, or one is out of range."""
  given = {'coordinator_address': coordinator_address,
           'num_processes': num_processes, 'process_id': process_id}
  if all(v is None for v in given.values()):
    return False
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
  return True


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
    ValueError: some but not all of the three launch values are given,
      process_id is outside [0, num_processes), or the processes were
      started with different num_processes or two with the same process_id
      (`check_launch_values`).
    RuntimeError: the processes could not be joined within
      `initialization_timeout`.
  """
  if not _check_launch_flags(coordinator_address, num_processes, process_id):
    cluster_env = ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
                   'JAX_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE')
    if not any(os.environ.get(v) for v in cluster_env):
      return
  if coordinator_address is not None:
    # JAX's runtime checks neither value: a process started with another
    # --num_processes joined a run of process 0's size, or both aborted
    # (status 134) after the timeout, and two processes given one
    # --process_id aborted. Every process reports both values to process 0
    # first, which stops them all at once when they disagree.
    check_launch_values(coordinator_address, num_processes, process_id,
                        initialization_timeout)
    if process_id != 0:
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


# The launch check (`check_launch_values`). Process 0 serves the coordinator
# port itself for a moment, before JAX's service takes it over; every other
# process connects, reports its launch values and waits for the verdict.
# Messages are one JSON object a line. The greeting lets a process tell this
# check from another program on the port (JAX's own service speaks HTTP/2).
_GREETING = {'cdg_jax_launch_check': 1}
# Seconds to wait for the greeting after connecting; a program that is not
# this check answers garbage or closes at once.
_GREETING_TIMEOUT_S = 10.0


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(':')
  try:
    return host.strip('[]'), int(port)
  except ValueError:
    raise ValueError(f'--coordinator_address={address!r} must be host:port '
                     f'with a numeric port, e.g. 127.0.0.1:1234.') from None


def _send(connection: socket.socket, message: dict) -> None:
  try:
    connection.sendall((json.dumps(message) + '\n').encode())
  except OSError:
    pass   # the other process is gone; it reports for itself


def _read_line(connection: socket.socket, buffer: bytearray,
               deadline: float) -> dict | None:
  """The next JSON line from `connection` (consumed from `buffer` too); None
  on EOF, a timeout at `deadline`, or bytes that are not a JSON object."""
  while b'\n' not in buffer:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or len(buffer) > 65536:
      return None
    connection.settimeout(remaining)
    try:
      data = connection.recv(4096)
    except OSError:
      return None
    if not data:
      return None
    buffer += data
  line, _, rest = bytes(buffer).partition(b'\n')
  buffer[:] = rest
  try:
    message = json.loads(line)
  except ValueError:
    return None
  return message if isinstance(message, dict) else None


def _listen(host: str, port: int) -> socket.socket | None:
  """A listening socket on the coordinator's host and port; None when the
  port is taken."""
  try:
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE)[0]
  except socket.gaierror as e:
    raise ValueError(f'--coordinator_address: cannot resolve its host '
                     f'{host!r} ({e}).') from e
  try:
    # create_server sets SO_REUSEADDR (connections of a run that just ended
    # may linger in TIME_WAIT) but not SO_REUSEPORT, so a port that another
    # listener holds, JAX's service included, is refused.
    return socket.create_server(sockaddr[:2], family=family)
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      return None
    if e.errno != errno.EADDRNOTAVAIL:
      raise
  # The address is not one of this host's (a NAT or DNS name): JAX's service
  # binds every address of the host, so the check does the same.
  if socket.has_dualstack_ipv6():
    return socket.create_server(('', port), family=socket.AF_INET6,
                                dualstack_ipv6=True)
  return socket.create_server(('', port))


def check_launch_values(coordinator_address: str, num_processes: int,
                        process_id: int, timeout_s: float = 120) -> None:
  """Stops every process of a launch whose values disagree, within seconds.

  Called by every process with its own flags before JAX's runtime starts.
  Process 0 listens on the coordinator's address (the port JAX's service
  takes next) until the other `num_processes - 1` processes have reported
  their `num_processes` and `process_id`; the others connect, report and
  wait for its verdict. A `num_processes` other than process 0's, or a
  `process_id` that two processes claim, stops all processes connected so
  far with one message naming the flag and the values. A second process 0
  finds the port taken, reports to the first, and both stop.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: this process's --num_processes.
    process_id: this process's --process_id, in [0, num_processes).
    timeout_s: seconds to wait for process 0 (the others) or for every other
      process to report (process 0).

  Raises:
    ValueError: the processes disagree (the message says how and the fix).
    RuntimeError: the check could not complete within `timeout_s`, or the
      coordinator port is held by another program.
  """
  host, port = _split_address(coordinator_address)
  deadline = time.monotonic() + timeout_s
  if process_id == 0:
    # A port that is taken but refuses connections is held by a socket that
    # does not listen (another program's connection): a few seconds cover
    # the moment between another process 0's bind and its listen.
    deadline = min(deadline, time.monotonic() + 5.0)
  while True:
    if process_id == 0:
      listener = _listen(host, port)
      if listener is not None:
        with listener:
          _collect_launch_values(listener, coordinator_address,
                                 num_processes, timeout_s,
                                 time.monotonic() + timeout_s)
        return
    try:
      connection = socket.create_connection((host, port), timeout=2.0)
    except OSError as e:
      # Process 0 not started yet (or, for a second process 0, the port's
      # holder just released it): retry.
      if time.monotonic() >= deadline:
        if process_id == 0:
          raise RuntimeError(
              f'Process 0 could not serve the coordinator at '
              f'{coordinator_address}: its port is taken, yet nothing there '
              f'accepts connections ({e}). Choose a free port for '
              f'--coordinator_address.') from e
        raise RuntimeError(
            f'Process {process_id} could not reach the coordinator at '
            f'{coordinator_address} within {timeout_s:.0f} s ({e}). Start '
            f'process 0 with the same --coordinator_address (it serves it), '
            f'check that this host can reach that address and port, or raise '
            f'--initialization_timeout.') from e
      time.sleep(0.2)
      continue
    with connection:
      _report_launch_values(connection, coordinator_address, num_processes,
                            process_id, deadline)
    return


def _report_launch_values(connection: socket.socket, address: str,
                          num_processes: int, process_id: int,
                          deadline: float) -> None:
  """A process's side of the launch check: report, then await the verdict."""
  _send(connection, {**_GREETING, 'num_processes': num_processes,
                     'process_id': process_id})
  buffer = bytearray()
  greeting = _read_line(connection, buffer,
                        time.monotonic() + _GREETING_TIMEOUT_S)
  if greeting is None or any(greeting.get(k) != v
                             for k, v in _GREETING.items()):
    who = ('a process 0 that is already running (is --process_id=0 given '
           'to two processes?) or another program'
           if process_id == 0 else
           'another program: another run\'s coordinator, or this run\'s '
           'process 0 already running with all the processes it expected '
           '(is a --process_id given twice, or --num_processes larger here?)')
    raise RuntimeError(
        f'Process {process_id}: the coordinator port {address} is held by '
        f'{who}, not by a process 0 waiting for its processes. Check the '
        f'launch flags, or choose a free port for --coordinator_address.')
  # Process 0 answers once every process has reported, or at its own
  # timeout; the margin lets that answer arrive first.
  verdict = _read_line(connection, buffer, deadline + 10.0)
  if verdict is None:
    raise RuntimeError(
        f'Process {process_id}: process 0 at {address} ended the launch check '
        f'without a verdict (did it stop? See its output).')
  if 'error' in verdict:
    error = ValueError if verdict.get('bad_value') else RuntimeError
    raise error(str(verdict['error']))
  if verdict.get('ok') is not True:
    raise RuntimeError(f'Process {process_id}: unexpected answer from process '
                       f'0 at {address}: {verdict!r}.')


def _collect_launch_values(listener: socket.socket, address: str,
                           num_processes: int, timeout_s: float,
                           deadline: float) -> None:
  """Process 0's side of the launch check (see `check_launch_values`)."""
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  buffers: dict[socket.socket, bytearray] = {}   # connected, not reported
  reported: dict[int, socket.socket] = {}        # by process_id

  def stop(message: str, bad_value: bool, *connections) -> None:
    selector.close()
    listener.close()
    for connection in {*reported.values(), *connections}:
      _send(connection, {'error': message, 'bad_value': bad_value})
    for connection in {*buffers, *reported.values(), *connections}:
      connection.close()
    raise (ValueError if bad_value else RuntimeError)(message)

  while len(reported) < num_processes - 1:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      missing = sorted(set(range(1, num_processes)) - set(reported))
      stop(f'Could not join the distributed runtime as process 0 of '
           f'{num_processes} at {address} within {timeout_s:.0f} s: '
           f'process(es) {missing} did not report. Start every process with '
           f'the same --coordinator_address and --num_processes, or raise '
           f'--initialization_timeout.', False)
    for key, _ in selector.select(timeout=min(remaining, 1.0)):
      if key.fileobj is listener:
        connection, _ = listener.accept()
        _send(connection, _GREETING)
        buffers[connection] = bytearray()
        selector.register(connection, selectors.EVENT_READ)
        continue
      connection = key.fileobj
      hello = _read_hello(connection, selector, buffers, reported)
      if hello is None:
        continue
      other_n, other_id = hello
      if other_n != num_processes:
        stop(f'--num_processes differs between the processes of this run: '
             f'{num_processes} in process 0, {other_n} in process '
             f'{other_id}. Start every process with the same '
             f'--num_processes.', True, connection)
      if other_id == 0 or other_id in reported:
        where = (f' (one serves the coordinator at {address}, the other '
                 f'found its port taken)' if other_id == 0 else '')
        stop(f'--process_id={other_id} was given to two processes of this '
             f'run{where}. Start each process with its own --process_id in '
             f'[0, --num_processes={num_processes}).', True, connection)
      # Still registered: an EOF before the verdict means it died.
      reported[other_id] = connection
  selector.close()
  # Closed before the verdict: once a process has it, its next connection
  # must reach JAX's service (or be refused until the service is up), never
  # this check.
  listener.close()
  for connection in reported.values():
    _send(connection, {'ok': True})
  for connection in reported.values():
    # The other side closes first, so that no connection of this port lingers
    # here in TIME_WAIT when JAX's service binds it.
    connection.settimeout(2.0)
    try:
      connection.recv(1)
    except OSError:
      pass
    connection.close()


def _read_hello(connection: socket.socket, selector,
                buffers: dict[socket.socket, bytearray],
                reported: dict[int, socket.socket]) -> tuple[int, int] | None:
  """Process 0 reads from `connection`: (num_processes, process_id) once its
  report is complete; None while it is incomplete, or when the connection
  closed or is a stranger's (then unregistered and closed)."""
  try:
    data = connection.recv(4096)
  except OSError:
    data = b''
  if not data or connection not in buffers:
    # Closed: a process that reported and died (it may be started again),
    # or a stranger.
    selector.unregister(connection)
    buffers.pop(connection, None)
    for pid, c in list(reported.items()):
      if c is connection:
        del reported[pid]
    connection.close()
    return None
  buffers[connection] += data
  if b'\n' not in buffers[connection]:
    if len(buffers[connection]) > 65536:
      selector.unregister(connection)
      del buffers[connection]
      connection.close()
    return None
  line = bytes(buffers.pop(connection)).partition(b'\n')[0]
  try:
    hello = json.loads(line)
    if any(hello[k] != v for k, v in _GREETING.items()):
      raise KeyError
    return hello['num_processes'], hello['process_id']
  except (ValueError, TypeError, KeyError):
    selector.unregister(connection)   # not this check: a stranger
    connection.close()
    return None


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
      # Short: process 0 starts the service right after the launch check,
      # and every process waits for it here.
      time.sleep(0.1)


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


# One wrapper per (mesh, function): jitting the same function twice then
# shares one trace, as it did unwrapped (`train.check_shapes` traces the step
# the run then calls).
@functools.lru_cache(maxsize=64)
def traced_under(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
  """`fn` traced under `mesh` as the abstract mesh of the trace.

  Inside it `jax.sharding.get_abstract_mesh()` is `mesh`'s, which is how the
  gating library's sparse executors find the batch axis to run per device
  on (`tiling.per_batch_shard`); nothing else in the step reads it. Wrap
  the function given to `jax.jit` with it, so that every trace, whoever
  calls the jitted function and when, sees the mesh.
  """
  @functools.wraps(fn)
  def under_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return under_mesh


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
