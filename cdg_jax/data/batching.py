"""From host batches to device arrays: sharding over the mesh and prefetching.

The sources of `cdg_jax.data.input_pipeline` yield each process's uint8 rows of a
global batch. `shard_batch` assembles them into one global jax.Array sharded
over the mesh's `data` axis; `prefetch` runs any iterator in a background
thread, so that wrapping `shard_batch` inside it also overlaps the
host-to-device copy:

  batches = prefetch((shard_batch(b, mesh) for b in
                      source.train_batches(batch_size, seed, step)),
                     size=config.data.prefetch)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import queue
import threading
import time
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def shard_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh
                ) -> dict[str, jax.Array]:
  """Assembles process-local batches into global arrays sharded over `data`.

  Args:
    batch: this process's rows, leading dimension B (the same on every
      process), as `train_batches`/`eval_batches` yield them.
    mesh: device mesh with a `data` axis.

  Returns:
    The same keys, each a global jax.Array of leading dimension
    B * process_count with NamedSharding(mesh, P('data')).
  """
  if 'data' not in mesh.axis_names:
    raise ValueError(f'The mesh has axes {mesh.axis_names}; shard_batch needs '
                     'a "data" axis.')
  sharding = NamedSharding(mesh, P('data'))
  data_size = mesh.shape['data']

  def put(x):
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % data_size:
      raise ValueError(f'Global batch of {global_rows} rows does not divide '
                       f'over the {data_size} devices of the data axis.')
    return jax.make_array_from_process_local_data(sharding, x)

  return {key: put(value) for key, value in batch.items()}


# How long closing a prefetch generator waits for its thread (one batch).
JOIN_TIMEOUT_S = 60.0


class _Raised:
  """Carries an exception from the prefetch thread to the consumer."""

  def __init__(self, exception: BaseException):
    self.exception = exception


def prefetch(iterator, size: int = 2) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `size` items ahead.

  Host batches (or, with `shard_batch` inside the iterator, device arrays) are
  ready before the train step asks, so the accelerator does not wait on the
  host. Exceptions in the iterator are re-raised in the consumer; closing or
  dropping the returned generator stops the thread and waits for it (up to
  `JOIN_TIMEOUT_S`), so that no thread is inside JAX or NumPy while the
  interpreter exits: a daemon thread killed there aborts the process
  (status 134, 'FATAL: exception not rethrown').

  Args:
    iterator: any iterable.
    size: items produced ahead; 0 disables prefetching.

  Yields:
    The items of `iterator`, in order.
  """
  if size < 0:
    raise ValueError(f'prefetch size must be >= 0, got {size}.')
  if size == 0:
    yield from iterator
    return
  items = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not offer(item):
          return
      offer(done)
    except BaseException as e:  # pylint: disable=broad-except
      offer(_Raised(e))

  thread = threading.Thread(target=produce, daemon=True,
                            name='cdg_jax-prefetch')
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, _Raised):
        raise item.exception
      yield item
  finally:
    stop.set()
    closing = time.monotonic()
    # Let a producer blocked on a full queue finish its `offer`, then wait
    # for it to leave the source iterator.
    while thread.is_alive():
      try:
        items.get_nowait()
      except queue.Empty:
        pass
      thread.join(timeout=0.05)
      if time.monotonic() - closing > JOIN_TIMEOUT_S:
        logging.warning('The prefetch thread did not stop within %.0f s.',
                        JOIN_TIMEOUT_S)
        break
