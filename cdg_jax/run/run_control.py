"""Run control: one run per workdir, and a clean stop on preemption.

`WorkdirLock` -- `<workdir>/run.lock` holds the host, PID and start time of
the run that owns the workdir. A second run on the same workdir fails at
once, before touching anything, with a message naming the owner. A lock
left by a process that no longer exists on this host (killed with -9, a
crashed machine that came back) is stale: it is taken over with a warning.
A lock held from another host cannot be checked from here; the message
says how to remove it once that run is known to be gone. In an object store
(`gs://`), where the hosts of a pod slice come and go, the holder also
rewrites the lock every `LOCK_REFRESH_S` seconds, and a lock not rewritten
for `LOCK_STALE_AFTER_S` is stale too (a preempted pod killed before its
clean stop).

`PreemptionWatcher` -- SIGTERM (what Cloud TPU, spot GPUs and SLURM send
before preempting) and SIGINT (Ctrl-C) set a flag instead of killing the
process; the training loop checks `should_stop(step)` after every step,
saves a checkpoint and exits non-zero. With several processes (multi-host),
every process must stop at the same step: JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`, which needs the
distributed runtime's preemption service) decides the step; no handler is
installed there, so without that service a signal ends the processes as
usual and the periodic checkpoints remain.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
from typing import Any

from absl import logging
import jax

from cdg_jax.run import storage

LOCK_FILE = 'run.lock'
# A lock in an object store: rewritten this often by its holder, and stale
# when not rewritten for this long.
LOCK_REFRESH_S = 300.0
LOCK_STALE_AFTER_S = 1800.0


def resolve_workdir(workdir: str | None) -> str:
  """The workdir a command was given, with `~` expanded.

  A quoted `--workdir='~/run'` reaches the program with its `~` (the shell
  expands only an unquoted one); taken literally it would make a directory
  named `~` in the current one.

  Raises:
    ValueError: no workdir was given.
    storage.StorageUnavailableError: a `gs://` workdir's bucket is missing,
      not writable with these credentials, or unreachable.
  """
  if not workdir:
    raise ValueError('A --workdir is required.')
  # A bucket that is missing, not ours or unreachable stops the command
  # here, before anything reads the workdir or the data.
  storage.check_reachable(workdir)
  return os.path.expanduser(workdir)


def check_writable(workdir: str, why: str = '') -> None:
  """Raises PermissionError naming `workdir` if a file cannot be written in
  it (an OSError of a full disk is raised as it is).

  Every process of a run checks (orbax writes from every process), each with
  its own probe file so that they do not race. `why` says what will be
  written, for the message.
  """
  probe = os.path.join(workdir, f'.write_test.{jax.process_index()}')
  if storage.is_remote(workdir):
    try:
      storage.write_text(probe, 'ok')
      storage.remove(probe)
    except Exception as e:  # pylint: disable=broad-except
      raise storage.StorageUnavailableError(
          storage.describe_failure(workdir, e, why)) from e
    return
  try:
    try:
      storage.write_text(probe, 'ok')
    finally:
      storage.remove(probe)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise   # a full disk, not a permission: reported as such
    raise PermissionError(f'workdir {workdir!r} is not writable{why}: '
                          f'{e}') from e


class WorkdirLockedError(RuntimeError):
  """Another live run owns the workdir."""


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint; rerun to resume."""

  exit_code = 143  # 128 + SIGTERM, what a killed process would report


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except OSError as e:
    return e.errno == errno.EPERM  # exists, owned by someone else
  return True


class WorkdirLock:
  """An exclusive, stale-aware lock on a workdir (process 0 takes it).

  Use as a context manager around everything a run does to its workdir.
  """

  def __init__(self, workdir: str, enabled: bool = True,
               purpose: str = 'training'):
    """`purpose` ('training', 'linear evaluation') is recorded in the lock
    and named to whoever finds the workdir in use."""
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self.purpose = purpose
    self._held = False
    self._remote = storage.is_remote(workdir)
    self._refresher: threading.Thread | None = None
    self._released = threading.Event()

  def _owner(self) -> dict[str, Any] | None:
    try:
      return json.loads(storage.read_text(self.path))
    except (FileNotFoundError, NotADirectoryError):
      return None   # no lock, or no such directory: nobody holds it
    except (OSError, ValueError):
      return {}   # unreadable: treated as held by an unknown owner

  def check(self) -> None:
    """Raises WorkdirLockedError if another live run holds the lock.

    Reads the lock file only (the workdir is not touched): a training
    command calls it first, so that a second run on a workdir is refused in
    seconds, before its data are read. `acquire` takes the lock later.
    """
    self._everyone_learns(self._check)

  def _check(self) -> None:
    if not self.enabled:
      return
    owner = self._owner()
    if owner is not None and not self._stale(owner):
      raise self._locked_error(owner)

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLockedError naming its owner.

    With several processes (one run), process 0 takes it and every process
    learns the outcome: a workdir in use stops all of them, not just the
    one that looked.
    """
    self._everyone_learns(self._acquire)

  def _everyone_learns(self, look) -> None:
    """Runs `look` (which may raise WorkdirLockedError) and stops every
    process of the run if it raised in any."""
    error = None
    try:
      look()
    except WorkdirLockedError as e:
      error = e
    if jax.process_count() > 1:
      from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
      refused = parallel.processes_where(error is not None)
      if refused and error is None:
        raise WorkdirLockedError(
            f'The workdir {os.path.dirname(self.path)} is in use by another '
            f'run (process {refused[0]} of this one found its lock; its '
            f'output names the owner).')
    if error is not None:
      raise error

  def _acquire(self) -> None:
    if not self.enabled:
      return
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
          'purpose': self.purpose}
    if self._remote:
      me['refreshed'] = time.time()
    for _ in range(2):
      if not storage.create_exclusive(self.path, json.dumps(me)):
        owner = self._owner()
        if owner is None:
          continue   # released between our two calls; try again
        if self._stale(owner):
          logging.warning('Taking over the stale lock %s of process %s (%s).',
                          self.path, owner.get('pid'), self._why_stale(owner))
          storage.remove(self.path)
          continue
        raise self._locked_error(owner)
      self._held = True
      if self._remote:
        self._refresher = threading.Thread(
            target=self._refresh, args=(me,), daemon=True,
            name='cdg_jax-lock-refresh')
        self._refresher.start()
      return
    raise WorkdirLockedError(f'Could not take the lock {self.path}.')

  def _refresh(self, me: dict[str, Any]) -> None:
    """Rewrites the lock of an object-store workdir every LOCK_REFRESH_S,
    so that only a lock whose holder is gone goes stale."""
    while not self._released.wait(LOCK_REFRESH_S):
      try:
        storage.write_text(self.path, json.dumps({**me,
                                                  'refreshed': time.time()}))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not refresh the lock %s: %s', self.path, e)

  @staticmethod
  def _stale(owner: dict[str, Any]) -> bool:
    """Whether the lock's owner is a process of this host that is gone, or
    (in an object store) has not rewritten the lock for LOCK_STALE_AFTER_S."""
    return bool(WorkdirLock._why_stale(owner))

  @staticmethod
  def _why_stale(owner: dict[str, Any]) -> str:
    if (owner.get('host') == socket.gethostname()
        and isinstance(owner.get('pid'), int)
        and not _process_alive(owner['pid'])):
      return 'no longer running'
    refreshed = owner.get('refreshed')
    if isinstance(refreshed, (int, float)) and (
        time.time() - refreshed > LOCK_STALE_AFTER_S):
      return (f'not refreshed for {(time.time() - refreshed) / 60:.0f} min; '
              f'a live run refreshes it every {LOCK_REFRESH_S / 60:.0f} min')
    return ''

  def _locked_error(self, owner: dict[str, Any]) -> WorkdirLockedError:
    # Locks written before 'purpose' existed were training runs'.
    what = owner.get('purpose', 'training') if owner else None
    where = (f'process {owner.get("pid")} on host {owner.get("host")}, '
             f'started {owner.get("started")} ({what})' if owner
             else 'an unknown process (unreadable lock file)')
    if self.purpose == 'training':
      why = ('Two runs on one workdir would overwrite each other\'s '
             'checkpoints and metrics: use another --workdir, or wait for '
             'that run to end.')
    else:
      why = (f'The {self.purpose} would read a backbone that may be replaced '
             f'while it runs: wait for that run to end, then evaluate its '
             f'final backbone.')
    if owner and isinstance(owner.get('refreshed'), (int, float)):
      where += (f', lock last refreshed '
                f'{(time.time() - owner["refreshed"]) / 60:.0f} min ago (taken '
                f'over once not refreshed for {LOCK_STALE_AFTER_S / 60:.0f} '
                f'min)')
    return WorkdirLockedError(
        f'The workdir {os.path.dirname(self.path)} is in use by {where}. '
        f'{why} If you are sure it is gone, delete {self.path}.')

  def release(self) -> None:
    if self._held:
      self._released.set()
      if self._refresher is not None:
        self._refresher.join()
      self._held = False
      try:
        storage.remove(self.path)
      except storage.StorageUnavailableError as e:
        # The store is gone: the error that ends the run says so; the lock
        # left behind goes stale (LOCK_STALE_AFTER_S).
        logging.warning('Could not remove the lock %s: %s', self.path, e)

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into a stop at the next step boundary.

  Install in the main thread (signal handlers can only be set there; from
  other threads, e.g. a notebook's executor, it does nothing). A second
  SIGINT while stopping raises KeyboardInterrupt at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      # From the first Ctrl-C on, Python's own handler: a second one while
      # the step finishes and the checkpoint is written interrupts at once.
      signal.signal(signal.SIGINT, signal.default_int_handler)
    self.signal_name = signal.Signals(signum).name
    logging.warning('Received %s: stopping after this step and saving a '
                    'checkpoint.', self.signal_name)

  def __enter__(self) -> 'PreemptionWatcher':
    if jax.process_count() > 1:
      # Multi-host: JAX's distributed runtime watches for the preemption
      # notice and `should_stop` asks its sync point; a handler here would
      # stop one process alone.
      return self
    try:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:   # not the main thread
      self._previous = {}
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on all hosts)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:
        # No preemption service in this distributed runtime: the signal
        # kills the processes as usual and the periodic checkpoints remain.
        return False
    return self.signal_name is not None
