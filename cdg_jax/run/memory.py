"""Memory a training run needs, estimated from shapes before any work.

An image size or batch that cannot fit would otherwise show up as the
machine swapping or the process killed minutes later (a 1000x1000 smoke run
asks for tens of GB). `train_step_bytes` estimates the train step's memory
from abstract shapes only (`jax.eval_shape`: nothing is computed or
compiled), and `check_fits` refuses a run whose estimate exceeds what the
devices have, naming the fields that decide it.

The estimate is the activations the online backbone keeps for its backward
pass (the residuals of `jax.vjp`, for both views of the device's share of
the batch), the augmented views in float32 and the train state. Measured
against XLA's own buffer assignment of the whole SimCLR step on CPU (the
smoke network at 16x16 and 64x64) it is about 1.35x XLA's temporary memory:
an upper estimate, since XLA fuses and frees some of those buffers.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from cdg_jax.gating import layers
from cdg_jax.ssl import models

GIB = 2**30


def _nbytes(tree) -> int:
  return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """The train step's estimated memory on one device, in bytes."""
  activations: int   # kept for the backward pass (both views)
  views: int         # the augmented views, float32
  state: int         # parameters, batch statistics, optimiser state (~3x)

  @property
  def total(self) -> int:
    return self.activations + self.views + self.state


def train_step_bytes(model_config, gating_spec: layers.GatingSpec | None,
                     batch_size: int, image_shape: tuple[int, int, int],
                     num_devices: int) -> StepMemory:
  """Estimated memory of one device's train step (see the module doc).

  Args:
    model_config: the `model` block.
    gating_spec: the online encoder's gating spec (None: dense).
    batch_size: the global batch size.
    image_shape: (H, W, C) of the training images.
    num_devices: devices the batch is split over (of every process).
  """
  backbone = models.create_resnet(model_config, gating_spec)
  per_device = max(1, batch_size // max(1, num_devices))
  views = jax.ShapeDtypeStruct((2 * per_device, *image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, train=True),
      jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
  others = {k: v for k, v in variables.items() if k != 'params'}

  def backward_residuals(params, others, x):
    forward = lambda p: backbone.apply(
        {'params': p, **others}, x, train=True,
        rngs={layers.GUMBEL_RNG: jax.random.key(0),
              layers.CLOSED_TILE_RNG: jax.random.key(1)},
        mutable=['batch_stats', layers.DENSITY_COLLECTION])[0]
    # The vjp function's leaves are exactly what the backward pass keeps.
    return jax.vjp(forward, params)[1]

  residuals = jax.eval_shape(backward_residuals, variables['params'], others,
                             views)
  return StepMemory(activations=_nbytes(residuals), views=_nbytes(views),
                    state=3 * _nbytes(variables))


def available_bytes(device: jax.Device) -> tuple[int | None, str]:
  """(bytes the device can give a run, what that number is) or (None, why).

  Accelerators report their allocator's limit; CPU devices share the host's
  memory, read as MemAvailable from /proc/meminfo (Linux).
  """
  if device.platform != 'cpu':
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    limit = stats.get('bytes_limit')
    if limit:
      return int(limit), f'the memory limit of {device.device_kind}'
    return None, f'{device.device_kind} does not report its memory'
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024, 'available host memory'
  except OSError:
    pass
  try:
    return (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'),
            'host memory')
  except (ValueError, OSError, AttributeError):
    return None, 'this host does not report its memory'


def describe(model_config, batch_size: int, image_shape, num_devices: int,
             memory: StepMemory) -> str:
  """One line: what the train step needs, and what decides it."""
  h, w, _ = image_shape
  per_device = max(1, batch_size // max(1, num_devices))
  return (f'about {memory.total / GIB:.2f} GiB per device '
          f'({memory.activations / GIB:.2f} GiB of activations kept for the '
          f'backward pass of 2 views x {per_device} images at {h}x{w} on '
          f'{model_config.name} width {model_config.width})')


def check_fits(model_config, gating_spec: layers.GatingSpec | None,
               batch_size: int, image_shape: tuple[int, int, int],
               devices: list[jax.Device]) -> str | None:
  """Raises ValueError if the train step cannot fit; else describes its cost.

  CPU devices split one host's memory, so on CPU the estimate of each of
  this process's devices counts against the host; an accelerator's against
  its own limit. `devices`: every device of the run (the mesh's).

  Returns:
    A line for the console: the estimate and the memory it was compared to;
    None if the network does not trace on these shapes (a gate block that
    does not tile a feature map...), which `train.check_shapes` reports
    with the data's context.

  Raises:
    ValueError naming data.image_size, batch_size and the model, with the
    estimate and the memory available.
  """
  try:
    memory = train_step_bytes(model_config, gating_spec, batch_size,
                              image_shape, len(devices))
  except (ValueError, TypeError):
    return None
  # The batch is split over every device of the run; this host's memory
  # holds the share of its own devices.
  local = [d for d in devices if d.process_index == jax.process_index()]
  available, what = available_bytes(local[0])
  cpu = local[0].platform == 'cpu'
  needed = memory.total * (len(local) if cpu else 1)
  text = describe(model_config, batch_size, image_shape, len(devices), memory)
  if available is None:
    return f'Train step memory: {text}; {what}.'
  where = (f'{len(local)} CPU device(s) sharing {available / GIB:.1f} GiB of '
           f'{what}' if cpu else f'{available / GIB:.1f} GiB, {what}')
  if needed > available:
    raise ValueError(
        f'data.image_size={image_shape[0]} with batch_size='
        f'{batch_size} does not fit: the train step needs {text}, '
        f'{needed / GIB:.1f} GiB in all, and this machine has {where}. Lower '
        f'data.image_size or batch_size, or use a smaller model.')
  return f'Train step memory: {text}; {where}.'
