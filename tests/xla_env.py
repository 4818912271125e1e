"""XLA flags for the tests' subprocesses.

conftest.py sets the session's flags (two forced host devices, backend
optimisation level 0). A subprocess that needs another device count takes
the session's flags with the count replaced, so it compiles like the rest.
"""

import os

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def xla_flags(device_count: int | None = None) -> str:
  """The session's XLA_FLAGS, with `device_count` host devices (None: JAX's
  default of one, no forced count)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith(_DEVICE_COUNT_FLAG)]
  if device_count is not None:
    flags.append(f'{_DEVICE_COUNT_FLAG}={device_count}')
  return ' '.join(flags)
