"""The sparse train step in the program: gated ResNets and the SSL step with
tiles, one trace, one device against two."""

import chex
import jax
import numpy as np
import pytest

from cdg_jax.gating.layers import CLOSED_TILE_RNG
from cdg_jax.gating.layers import DENSITY_COLLECTION
from cdg_jax.gating.layers import GatingSpec
from cdg_jax.run import config_lib
from cdg_jax.run import parallel
from cdg_jax.ssl import models
from cdg_jax.ssl import pretraining

import test_pretraining


def test_gated_resnet_trains_the_same_forward_sparse():
  # Two images and 8x8 tiles: the first stage's maps hold four tiles a
  # sample (8 tiles, 7 capacity branches), the later ones one (2 tiles, one
  # branch besides the dense fallback); the sparse forward compiles less
  # than half the branches of four images with 4x4 tiles. (8x8 images
  # failed the tolerance: BatchNorm over a 1x1 last map of two samples.)
  model_config = {'name': 'resnet10', 'width': 8}
  masked = models.create_resnet(model_config, GatingSpec(block=(8, 8, 0)))
  fast = models.create_resnet(model_config, GatingSpec(
      block=(8, 8, 0), execution='sparse_training', closed_tile_gradient='sampled'))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(masked.init)(jax.random.key(1), x)   # not op by op
  apply = lambda model: jax.jit(lambda v, x: model.apply(
      v, x, train=True, rngs={CLOSED_TILE_RNG: jax.random.key(2)},
      mutable=['batch_stats', DENSITY_COLLECTION]))(variables, x)
  (want, want_state), (got, got_state) = apply(masked), apply(fast)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               got_state[DENSITY_COLLECTION], want_state[DENSITY_COLLECTION])


@pytest.mark.parametrize('fields, words', [
    ({'sparse_training': True}, 'needs gating.kind=.cdg. and gating.block=\\(bh, bw, 0\\)'),
    ({'sparse_training': True, 'block': (2, 2, 0), 'stage_blocks': ((2, 2, 0), (1, 1, 1), (1, 1, 0), (1, 1, 0))},
     'stage_blocks'),
    # The stem's block, used only when the stem is gated.
    ({'sparse_training': True, 'stage_blocks': ((2, 2, 0),) * 3 + ((1, 1, 1),)},
     'stage_blocks'),
    ({'closed_tile_gradient': 'sampled'}, r'would be ignored: it is read only with the sparse train step \(gating.sparse_training=True\), and this config has gating.sparse_training=False. Remove the override \(the default is .none.\) or change gating.sparse_training.$'),
    # The sample's size is read by the 'sampled' form only.
    ({'sparse_training': True, 'block': (2, 2, 0), 'closed_tile_sample': 0.5},
     r"gating.closed_tile_sample=0.5 would be ignored: it is read only with gating.closed_tile_gradient='sampled'"),
    ({'sparse_training': True, 'block': (2, 2, 0), 'closed_tile_gradient': 'all'},
     "closed_tile_gradient='all'"),
    ({'sparse_training': True, 'block': (2, 2, 0),
      'closed_tile_gradient': 'sampled', 'closed_tile_sample': 0.0},
     'closed_tile_sample must be in \\(0, 1\\]'),
])
def test_sparse_training_fields_are_checked(fields, words):
  with pytest.raises(ValueError, match=words):
    config_lib.read_gating(fields)


def test_stage_tiles_leave_the_ungated_stem_block_alone():
  spec = models.ResNetGating(execution='sparse_training',
                             stage_blocks=((2, 2, 0),) * 4)
  assert spec.blocks == ((2, 2, 0),) * 4
  with pytest.raises(ValueError, match='needs gating.kind'):
    models.ResNetGating(execution='sparse_training',
                        stage_blocks=((2, 2, 0),) * 4,
                        layers=('stem', 'block_3x3'))


def _collectives(compiled):
  """Cross-device collectives in a compiled program, by kind."""
  text = compiled.as_text()
  return {op: text.count(f' {op}(') + text.count(f' {op}-start(')
          for op in ('all-gather', 'all-reduce', 'all-to-all',
                     'collective-permute', 'reduce-scatter')}


def test_sparse_train_step_one_trace_and_two_devices_match_one():
  # Two images (one per device; four views) and tiles as large as every
  # map (a block is clamped to the map): four tiles per gated layer, two
  # per device. The step compiles one branch per static capacity of each
  # gated layer, forward and backward: 3 with four tiles, against 11 with
  # the 16 tiles of 8x8 tiles on the first stage's 16x16 maps (this test
  # took 131 s then, in the suite, 2026-12-07), 11 everywhere with 8 images
  # and 2x2 tiles. Several tiles per map, the windows' halos and their
  # add-back, are test_gated_resnet_trains_the_same_forward_sparse's and
  # tests/gating/test_sparse_training.py's ('sampled' on two devices too:
  # each device samples its own tiles, so it is not compared here).
  config = test_pretraining.tiny_config('simclr', batch_size=2)
  config.gating.block = (16, 16, 0)
  config.gating.sparse_training = True
  batch = test_pretraining.fixed_batch(batch_size=2)
  results = []
  for num_devices in (1, 2):
    _, state, mesh, step_fn = test_pretraining.setup(config, num_devices)
    chex.clear_trace_counter()
    step = pretraining.jit_train_step(chex.assert_max_traces(step_fn, n=1),
                                      mesh)
    sharded = jax.device_put(batch, parallel.data_sharding(mesh))
    if num_devices == 2:
      # Lowering shares the jitted step's one trace.
      sparse_collectives = _collectives(step.lower(state, sharded).compile())
    state, metrics = step(state, sharded)
    results.append(jax.device_get((state, metrics)))
    state, _ = step(state, sharded)   # a second call, no second trace
  (state1, metrics1), (state2, metrics2) = results
  assert 0 < metrics1['gate_density'] < 1
  np.testing.assert_allclose(metrics1['loss'], metrics2['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=2e-5),
               state1, state2)
  # The executor runs on each device's shard (tiling.per_batch_shard): the
  # compiled 2-device step holds the masked step's collectives (batch
  # statistics, the gradients' sums) and no more. On the whole sharded
  # batch its gathers and add-backs were hundreds of all-gathers and
  # all-reduces.
  config.gating.sparse_training = False
  _, state, mesh, step_fn = test_pretraining.setup(config, 2)
  masked_collectives = _collectives(pretraining.jit_train_step(
      step_fn, mesh).lower(state, sharded).compile())
  assert sparse_collectives == masked_collectives, (sparse_collectives,
                                                    masked_collectives)


def test_a_sparse_run_says_where_its_executor_runs():
  from cdg_jax import train  # pylint: disable=g-import-not-at-top
  assert train._sparse_layout_note(parallel.make_mesh(2), 8) == (
      'Sparse train step: closed tiles skipped on each of the 2 devices, '
      'each over its own 4 images (and their views): no tile crosses '
      'devices.')
  assert 'on one device' in train._sparse_layout_note(parallel.make_mesh(1), 8)
