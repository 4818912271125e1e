"""The machine a result was measured on, named the same way everywhere."""

import platform


def cpu_model() -> str:
  """This machine's CPU model, e.g. 'Intel(R) Xeon(R) Processor'."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
