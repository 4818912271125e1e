"""Command-line plumbing shared by `main`, `linear_eval` and `flops`.

* `parse_flags`: absl flag parsing that turns the errors of a bad `--config`
  (a missing file, an unknown override) into one clear line instead of a
  traceback whose last line blames `config_config` or prints an escaped
  `KeyError`.
* `quiet_logging`: the console shows the program's own progress and results;
  absl and orbax INFO lines (per-step metrics, checkpoint internals) only
  with `--verbosity=0` (or `-v 0`). Orbax's own warnings and errors, and the
  exceptions its event loops leave behind after a failure ("Event loop is
  closed", "Exception ignored in coroutine", never-awaited coroutines), go
  to the log at INFO too: the program reports the failure itself.
* `reported_errors`: every way a command ends has its status and, on
  failure, the reason as the last line of output (`FATAL: ...`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import logging as std_logging
import os
import sys
import traceback
import warnings

from absl import flags
from absl import logging


def define_distributed_flags() -> None:
  """The launch flags of several processes, named as jax.distributed.initialize's
  arguments (see `parallel.initialize_distributed`)."""
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, e.g. 127.0.0.1:1234; with '
                      '--num_processes and --process_id, joins several '
                      'processes (default: JAX\'s cluster detection).')
  flags.DEFINE_integer('num_processes', None, 'Processes of the run.')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. '
                       'num_processes - 1.')
  flags.DEFINE_list('local_device_ids', None, 'This process\'s local '
                    'accelerators (default: all).')
  flags.DEFINE_integer('initialization_timeout', 120, 'Seconds to wait for '
                       'every process to join.')
  flags.DEFINE_integer('heartbeat_timeout_seconds', 60, 'A process silent '
                       'this long is declared dead; the others stop.')


def initialize_distributed_from_flags() -> None:
  """`parallel.initialize_distributed` with the flags of
  `define_distributed_flags`; a bad value is a FATAL line, status 2."""
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  ids = values.local_device_ids
  try:
    parallel.initialize_distributed(
        values.coordinator_address, values.num_processes, values.process_id,
        [int(i) for i in ids] if ids else None,
        values.initialization_timeout, values.heartbeat_timeout_seconds)
  except ValueError as e:
    print(f'FATAL: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except RuntimeError as e:
    print(f'FATAL: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=value` or `--name value` in argv, if given."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _root_cause(error: BaseException) -> str:
  """The innermost message of a chain of wrapped exceptions, unescaped."""
  while True:
    inner = error.args[0] if error.args else None
    if isinstance(inner, BaseException):
      error = inner
    elif error.__cause__ is not None:
      error = error.__cause__
    else:
      break
  message = error.args[0] if error.args else str(error)
  return message if isinstance(message, str) else str(error)


def config_file_error(argv: Sequence[str]) -> str | None:
  """A message if `--config` names a file that does not exist, else None."""
  value = _flag_value(argv, 'config')
  if not value:
    return None
  path = value.split(':', 1)[0]
  if os.path.isfile(path):
    return None
  where = os.path.abspath(path)
  return (f'--config={value}: no config file at {path!r} (looked for '
          f'{where}). Config files live in configs/ of the repository; run '
          f'from the repository root or give the path to the file.')


def _override_with_key(argv: Sequence[str], error: BaseException
                       ) -> str | None:
  """The `--config.x.y=...` argument that an override error is about."""
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  message = _root_cause(error)
  for key in (message.strip("'\""), *message.replace("'", ' ').split()):
    for arg in overrides:
      path = arg[len('--config.'):].split('=', 1)[0]
      if key and key in path.split('.'):
        return arg
  return overrides[0] if len(overrides) == 1 else None


def _flag_error_message(argv: Sequence[str], error: BaseException) -> str:
  """A flag error in one line: for a config file that raised while it was
  loaded (an unknown variant, a bad value in the file), its own message
  instead of the traceback that ml_collections puts before it."""
  text = str(error)
  if 'Traceback (most recent call last)' not in text:
    return text
  inner = error
  while (inner.__cause__ or inner.__context__) is not None:
    inner = inner.__cause__ or inner.__context__
  kind = '' if isinstance(inner, ValueError) else f'{type(inner).__name__}: '
  return f'--config={_flag_value(argv, "config")}: {kind}{inner}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one clear line for a bad --config.

  Use as `app.run(main, flags_parser=cli.parse_flags)`. Exits with status 2
  and a message on stderr naming the bad value.
  """
  message = config_file_error(argv)
  if message is None:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      message = _flag_error_message(argv, e)
    except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
      # Raised while applying `--config.x.y=...` overrides to the config:
      # name the override whose key the error names.
      override = _override_with_key(argv, e)
      message = 'Bad config override'
      if override:
        message += f' {override}'
      message += f': {_root_cause(e)}'
  print(f'FATAL: {message}', file=sys.stderr)
  sys.exit(2)


class _LibraryNoise(std_logging.Filter):
  """Passes a record unless it is an orbax/TensorStore/asyncio warning or error.

  Those come with every damaged checkpoint or failed write, often as many
  long tracebacks; the program reports the failure itself in one line.
  They still reach the log at INFO (`-v 0`).
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    # asyncio's own logger reports orbax's failed futures ("Future exception
    # was never retrieved"), often at exit, after the program's last line.
    if ('/orbax/' in path or '/tensorstore/' in path
        or record.name.startswith('asyncio')):
      if record.levelno < std_logging.CRITICAL and not _verbose():
        return False
    return True


def _verbose() -> bool:
  return logging.get_verbosity() >= logging.INFO


def _unraisable_to_log(unraisable) -> None:
  """sys.unraisablehook: an exception nobody could catch, to the log at INFO.

  After a failed orbax save or restore, TensorStore callbacks reach event
  loops that orbax has already closed, and each raises 'Event loop is
  closed' where no caller can catch it (hundreds of tracebacks on stderr).
  """
  exc = unraisable.exc_value
  logging.info('Ignored exception in %r: %s',
               unraisable.object, ''.join(traceback.format_exception(
                   unraisable.exc_type, exc, unraisable.exc_traceback)))


def _warning_to_log(message, category, filename, lineno, file=None,
                    line=None, _show=warnings.showwarning):
  """Never-awaited coroutines (orbax after a failure) to the log at INFO."""
  if issubclass(category, RuntimeWarning) and 'never awaited' in str(message):
    logging.info('%s:%d: %s: %s', filename, lineno, category.__name__,
                 message)
    return
  _show(message, category, filename, lineno, file, line)


def quiet_logging() -> None:
  """INFO logs (metrics lines, orbax internals) only with an explicit -v/--verbosity.

  Call in `main` (after flag parsing). The program's own progress goes to the
  console through tqdm and print, and its warnings always show; orbax's
  warnings and errors and the exceptions its closed event loops leave
  behind go to the log at INFO (see the module doc).
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
    handler.addFilter(_LibraryNoise())
  sys.unraisablehook = _unraisable_to_log
  warnings.showwarning = _warning_to_log


# Errors that the program raises on purpose, with a message that names the
# bad value and the fix: reported as one FATAL line (traceback at INFO).
def _expected_errors() -> tuple[type[BaseException], ...]:
  from cdg_jax.run import checkpoints  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import run_control
  from cdg_jax.run import storage
  return (ValueError, FileNotFoundError, PermissionError, FloatingPointError,
          checkpoints.NoValidCheckpointError, checkpoints.CheckpointWriteError,
          run_control.WorkdirLockedError, storage.StorageUnavailableError)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
  """Ends the command with its documented status and the reason last.

  Preempted (SIGTERM/SIGINT, checkpoint saved): its message, status 143.
  Another run holds the workdir: `FATAL: ...`, status 2. An error raised on
  purpose (a bad value, a damaged checkpoint, a full disk, a diverged loss):
  `FATAL: <message>`, status 1, the traceback in the log at INFO. Anything
  else: the traceback, then `FATAL: <type>: <message>`, status 1.
  """
  from cdg_jax.run import run_control  # pylint: disable=g-import-not-at-top
  try:
    yield
  except run_control.Preempted as e:
    _exit(str(e), run_control.Preempted.exit_code)
  except run_control.WorkdirLockedError as e:
    _exit(f'FATAL: {e}', 2)
  except _expected_errors() as e:
    logging.info('%s', traceback.format_exc())
    _exit(f'FATAL: {e}', 1, abandon=_several_processes())
  except Exception as e:  # pylint: disable=broad-except
    if _peer_failure(e):
      _exit(_lost_peer_message(e), LOST_PROCESS_EXIT_CODE, abandon=True)
    # Not raised on purpose: the traceback is what a bug report needs, in
    # the log (-v 0) as docs/running.md says; the console keeps one last line.
    logging.info('%s', traceback.format_exc())
    hint = ('' if _verbose() else ' (an unexpected error: its traceback is '
            'shown with -v 0)')
    _exit(f'FATAL: {type(e).__name__}: {e}{hint}', 1,
          abandon=_several_processes())


def _several_processes() -> bool:
  """Whether this process is one of several of a run.

  A process of such a run that fails leaves at once, without JAX's
  distributed shutdown: that shutdown waits at a barrier for every process
  (5 minutes), while the others may be waiting for this one in a collective
  or a barrier of their own, so both would hang until the runtime aborts
  them. Leaving at once closes its connections (the others' collectives
  fail and they stop, status 75) and stops its heartbeats (the coordination
  service stops the others within --heartbeat_timeout_seconds, naming it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1


# Status of a process that stops because another process of its run died.
LOST_PROCESS_EXIT_CODE = 75


def _peer_failure(error: BaseException) -> bool:
  """Whether a multi-process run failed because a peer went away."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return False
  text = str(error)
  return type(error).__name__ == 'JaxRuntimeError' and any(
      sign in text for sign in ('Gloo', 'Connection reset', 'Connection closed',
                                'UNAVAILABLE', 'heartbeat', 'DEADLINE_EXCEEDED'))


def _lost_peer_message(error: BaseException) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  # The coordination service declares a process dead only after the
  # heartbeat timeout; wait briefly in case it already knows which.
  lost = parallel.lost_processes(timeout_s=2.0)
  who = (f'process{"es" if len(lost) > 1 else ""} '
         f'{", ".join(map(str, lost))} of this run'
         if lost else 'another process of this run (the coordination service '
         'names it in the log once its heartbeat times out)')
  reason = str(error).splitlines()[0][:300]
  return (f'FATAL: process {jax.process_index()} stops: lost {who}: a '
          f'collective failed ({reason}). Restart every process with the same '
          f'command to resume from the newest checkpoint.')


def _exit(message: str, status: int, abandon: bool = False) -> None:
  """Prints the last line and exits; `abandon` skips the interpreter's exit
  handlers: after a peer is lost, JAX's distributed shutdown would wait at a
  barrier the dead process never reaches, then abort (status 134)."""
  sys.stdout.flush()
  if abandon:
    # The runtime's own threads (heartbeat, error polling) still log to
    # stderr as they notice the lost peer; point descriptor 2 at /dev/null
    # first, so that this message stays the last line.
    sys.stderr.flush()
    console = os.dup(2)
    with open(os.devnull, 'wb') as devnull:
      os.dup2(devnull.fileno(), 2)
    os.write(console, (message + '\n').encode())
    os._exit(status)  # pylint: disable=protected-access
  print(message, file=sys.stderr, flush=True)
  sys.exit(status)
