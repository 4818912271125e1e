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
  while _forked:
    process = _forked.pop()
    if process.exitcode is None:
      killed.append(f'fork of {process.pid}')
      process.kill()
      process.join()
  while _started:
    process = _started.pop()
    if process.poll() is None:
      killed.append(' '.join(map(str, process.args))[:200])
      _kill(process)
  return killed


def alive() -> list[subprocess.Popen]:
  """Programs started here that are still running."""
  return [p for p in _started if p.poll() is None]


# ---------------------------------------------------------------------------
# The program's commands as forks of one process that has imported the
# program's dependencies (Python's multiprocessing forkserver). Starting
# `python -m cdg_jax.main` imports JAX, Flax, Optax, orbax and the program
# first: about 4 s of CPU, most of what a command that stops before any
# work (the failure tests) costs. A fork of a process that holds those
# modules, has started no thread and no JAX backend (XLA reads its flags in
# the fork, from the command's environment) runs the same module as
# `python -m` runs it, with the same argv, environment, working directory,
# output and exit status. Never the modules that define command-line flags
# (cdg_jax.main, linear_eval, flops_table): `runpy` runs them afresh, as
# `-m` does, and a preloaded copy would have defined their flags already.
_PRELOAD = ('cdg_jax.train', 'cdg_jax.evaluators', 'cdg_jax.run.cli',
            'cdg_jax.run.parallel', 'ml_collections.config_flags', 'absl.app')
# Environment variables read when a module is imported (JAX's own config,
# TensorFlow's, etils'): a command that changes one starts a real process.
_READ_AT_IMPORT = ('JAX_', 'TF_', 'EPATH_', 'PYTHON')
_forked: list = []
# The environment the fork server was started with (it imported the program
# under it), set at its first use.
_server_environ: dict[str, str] = {}


def _forkserver():
  import multiprocessing  # pylint: disable=g-import-not-at-top
  context = multiprocessing.get_context('forkserver')
  if not _server_environ:
    _server_environ.update(os.environ)
    context.set_forkserver_preload(list(_PRELOAD))
  return context


def _module_in_fork(module, args, env, cwd, out_path, err_path):
  """The fork's body: becomes `python -m module *args` (exits as it does)."""
  import atexit  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  sys.stdout.flush()
  sys.stderr.flush()
  for fd, path in ((1, out_path), (2, err_path)):
    file_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(file_fd, fd)
    os.close(file_fd)
  sys.argv = [module, *map(str, args)]
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  finally:
    atexit._run_exitfuncs()  # pylint: disable=protected-access


def run_module(module: str, args, *, cwd: str, env: dict[str, str],
               timeout: float | None = None) -> subprocess.CompletedProcess:
  """`python -m module *args` with `env` in `cwd`, output captured as text,
  as a fork of a process that has imported the program (see above); as a
  real process (`run`) when `env` differs, in a variable read at import
  time, from the environment the fork server imported the program under.
  On a timeout the fork is killed and `subprocess.TimeoutExpired` raised."""
  import tempfile  # pylint: disable=g-import-not-at-top
  imported_under = _server_environ or os.environ
  changed = {k for k in set(env) | set(imported_under)
             if env.get(k) != imported_under.get(k)}
  if any(k.startswith(_READ_AT_IMPORT) and k != 'PYTHONPATH'
         for k in changed):
    return run([sys.executable, '-m', module, *args], cwd=cwd, env=env,
               capture_output=True, text=True, timeout=timeout)
  with tempfile.TemporaryDirectory(prefix='cdg_jax_fork_') as folder:
    out_path = os.path.join(folder, 'stdout')
    err_path = os.path.join(folder, 'stderr')
    process = _forkserver().Process(
        target=_module_in_fork,
        args=(module, list(args), dict(env), cwd, out_path, err_path))
    process.start()
    _forked.append(process)
    process.join(timeout)
    if process.exitcode is None:
      process.kill()
      process.join()
      raise subprocess.TimeoutExpired([module, *args], timeout)
    _forked.remove(process)
    outputs = []
    for path in (out_path, err_path):
      with open(path, errors='replace') as f:
        outputs.append(f.read())
  return subprocess.CompletedProcess([sys.executable, '-m', module, *args],
                                     process.exitcode, *outputs)
