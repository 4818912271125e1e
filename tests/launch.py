"""Subprocesses that never outlive their test.

A training process of a multi-process run ignores SIGTERM by design (JAX's
preemption notifier turns it into a stop at the next step, which never
comes once a peer is gone), so a test that stops early -- a failed
assertion, a timeout, the test runner stopped -- could leave processes
behind that hold a port, a workdir lock and two cores. Every test starts
its programs through `popen` / `run` here (tests/launch.py):

* each program runs in its own process group, killed whole (SIGKILL) by
  `kill_all`, which conftest.py calls after every test and at exit;
* each program is killed by the kernel when the process that started it
  dies, however it dies (Linux `PR_SET_PDEATHSIG`): a test runner stopped
  by a CI timeout or by kill -9 leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_started: list[subprocess.Popen] = []

# Runs first in the child: asks the kernel to kill it when its parent dies,
# then becomes the program (exec keeps that request). Done in the child
# rather than in a `preexec_fn`, which would fork the multithreaded test
# process (JAX warns that this can deadlock).
_DIE_WITH_PARENT = """
import ctypes, ctypes.util, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith('linux'):
  libc = ctypes.CDLL(ctypes.util.find_library('c') or None, use_errno=True)
  libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
if os.getppid() != parent:        # the parent died before the request
  sys.exit(137)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def popen(args, *, capture_output: bool = False, **kwargs) -> subprocess.Popen:
  """`subprocess.Popen`, in a new process group that dies with this process
  and is killed by `kill_all`."""
  if capture_output:
    kwargs.setdefault('stdout', subprocess.PIPE)
    kwargs.setdefault('stderr', subprocess.PIPE)
  command = [sys.executable, '-c', _DIE_WITH_PARENT, str(os.getpid()),
             *map(str, args)]
  process = subprocess.Popen(command, start_new_session=True, **kwargs)
  process.args = args   # as given, for messages
  _started.append(process)
  return process


def run(args, *, timeout: float | None = None, check: bool = False,
        input=None, **kwargs) -> subprocess.CompletedProcess:  # pylint: disable=redefined-builtin
  """`subprocess.run` through `popen`: on a timeout or any other exception
  the program's whole process group is killed before the exception goes on."""
  if input is not None:
    kwargs.setdefault('stdin', subprocess.PIPE)
  process = popen(args, **kwargs)
  try:
    out, err = process.communicate(input, timeout=timeout)
  except BaseException:
    _kill(process)
    raise
  if check and process.returncode:
    raise subprocess.CalledProcessError(process.returncode, args, out, err)
  return subprocess.CompletedProcess(args, process.returncode, out, err)


def _kill(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  try:
    process.communicate(timeout=30)
  except (subprocess.TimeoutExpired, ValueError, OSError):
    pass


def kill_all() -> list[str]:
  """Kills every program started here that is still running (with its
  process group); returns their command lines."""
  killed = []
  while _started:
    process = _started.pop()
    if process.poll() is None:
      killed.append(' '.join(map(str, process.args))[:200])
      _kill(process)
  return killed


def alive() -> list[subprocess.Popen]:
  """Programs started here that are still running."""
  return [p for p in _started if p.poll() is None]
