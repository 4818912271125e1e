"""The gating library on a 2-device 'data' mesh, as a data-parallel step runs
it: jitted with the batch sharded and traced under the mesh."""

import jax

from cdg_jax.gating import tiling


def on_two_devices(fn, batched):
  """`fn` jitted over a 2-device 'data' mesh, traced under it (as a
  data-parallel step is), the `batched` operands sharded over the batch."""
  mesh = jax.sharding.Mesh(jax.devices()[:2], (tiling.BATCH_AXIS,))
  spec = jax.sharding.PartitionSpec
  shardings = tuple(jax.sharding.NamedSharding(
      mesh, spec(tiling.BATCH_AXIS) if split else spec())
                    for split in batched)

  def under_mesh(*operands):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*operands)
  return jax.jit(under_mesh, in_shardings=shardings)


def collectives(compiled_text: str) -> int:
  """How many cross-device collectives a compiled program's text holds."""
  return sum(compiled_text.count(f' {op}(') + compiled_text.count(
      f' {op}-start(') for op in ('all-gather', 'all-reduce', 'all-to-all',
                                  'collective-permute', 'reduce-scatter'))
