"""Command-line plumbing shared by `main`, `linear_eval` and `flops`.

* `parse_flags`: absl flag parsing that turns the errors of a bad `--config`
  (a missing file, an unknown override) into one clear line instead of a
  traceback whose last line blames `config_config` or prints an escaped
  `KeyError`.
* `quiet_logging`: the console shows the program's own progress and results;
  absl and orbax INFO lines (per-step metrics, checkpoint internals) only
  with `--verbosity=0` (or `-v 0`).
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from absl import flags
from absl import logging


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
      message = str(e)
    except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
      # Raised while applying `--config.x.y=...` overrides to the config.
      override = next((a for a in argv[1:] if a.startswith('--config.')),
                      None)
      message = f'Bad config override'
      if override:
        message += f' {override}'
      message += f': {_root_cause(e)}'
  print(f'FATAL: {message}', file=sys.stderr)
  sys.exit(2)


def quiet_logging() -> None:
  """INFO logs (metrics lines, orbax internals) only with an explicit -v/--verbosity.

  Call in `main` (after flag parsing). The program's own progress goes to the
  console through tqdm and print, and warnings always show.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
