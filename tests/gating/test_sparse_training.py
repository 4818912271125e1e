"""The sparse training executor: the conditional path at open tiles only,
per layer (the program's ResNets and SSL step:
tests/test_sparse_training_resnet.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import ops
from cdg_jax.gating import sparse_training
from cdg_jax.gating import tiling

from two_devices import collectives
from two_devices import on_two_devices


BLOCK = (2, 2, 0)


def _layer_inputs(seed=0, threshold_shift=0.0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.2, jnp.float32)
  threshold = jnp.asarray(rng.normal(size=(16,)) * 0.3 + threshold_shift,
                          jnp.float32)
  weights = jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32)
  return x, kernel, threshold, weights


def _masked_loss(x, kernel, threshold, weights, cut_closed=False):
  """The masked form by hand; `cut_closed` stops the gate's gradient at
  closed tiles (what the 'none' form gives)."""
  y_base, y_cond = ops.base_and_conditional(x, kernel, 4, 'first', (1, 1),
                                            'SAME')
  mask, _ = ops.saliency_gate(y_base, threshold, block=BLOCK)
  if cut_closed:
    mask = jnp.where(jax.lax.stop_gradient(mask) > 0, mask,
                     jax.lax.stop_gradient(mask))
  return jnp.sum(weights * (y_base + mask * y_cond))


def _sparse_loss(x, kernel, threshold, weights, key, form='none',
                 fraction=0.0625):
  y, _, _ = sparse_training.sparse_train_gated_conv(
      x, kernel, threshold, block=BLOCK, closed_tile_gradient=form,
      sample_fraction=fraction, rng=key)
  return jnp.sum(weights * y)


_grad = jax.grad(_masked_loss, argnums=(0, 1, 2))
_sparse_grad = jax.jit(jax.grad(_sparse_loss, argnums=(0, 1, 2)),
                       static_argnames=('form', 'fraction'))


def _assert_close(got, want):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


def test_outputs_and_masks_equal_the_masked_form():
  x, kernel, threshold, _ = _layer_inputs()
  want, want_mask, want_stats = ops.gated_conv(x, kernel, threshold,
                                               block=BLOCK)
  got, mask, stats = jax.jit(lambda *a: sparse_training.sparse_train_gated_conv(
      *a, block=BLOCK))(x, kernel, threshold)
  assert 0.2 < float(jnp.mean(mask)) < 0.8   # both open and closed tiles
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, stats, want_stats)


def test_none_form_is_the_masked_gradient_without_closed_gates():
  inputs = _layer_inputs()
  got = _sparse_grad(*inputs, jax.random.key(0))
  _assert_close(got, _grad(*inputs, cut_closed=True))
  # ... which differs from the masked form's exactly by the gate's gradient
  # at closed tiles (it reaches the threshold and, through the saliency, the
  # base path and the input).
  full = _grad(*inputs)
  assert float(jnp.max(jnp.abs(got[2] - full[2]))) > 1e-2


def test_sampling_every_closed_tile_gives_the_masked_gradient():
  inputs = _layer_inputs()
  got = _sparse_grad(*inputs, jax.random.key(3), form='sampled', fraction=1.0)
  _assert_close(got, _grad(*inputs))


def test_sampled_gate_gradient_is_unbiased():
  """The mean of the estimate over many samples approaches the masked
  gradient of the thresholds; leaving out the inverse sampling rate would
  miss it by several standard errors."""
  inputs = _layer_inputs()
  want = np.asarray(_grad(*inputs)[2])
  cut = np.asarray(_grad(*inputs, cut_closed=True)[2])
  keys = jax.random.split(jax.random.key(0), 400)
  estimates = np.asarray(jax.jit(jax.vmap(
      lambda key: jax.grad(_sparse_loss, argnums=2)(
          *inputs, key, form='sampled', fraction=0.25)))(keys))
  mean = estimates.mean(0)
  standard_error = estimates.std(0) / np.sqrt(len(keys))
  # A quarter of the tiles of the batch: the sample is most of the closed
  # tiles' (a third open), so the estimate is noisy but unbiased.
  z = np.abs(mean - want) / (standard_error + 1e-6)
  assert z.max() < 4.5, (z, mean, want)
  # Without the inverse sampling rate, the closed tiles' part would shrink
  # by the inclusion probability m / closed.
  _, mask, _ = ops.gated_conv(*inputs[:3], block=BLOCK)
  closed = int((~tiling.tile_mask_of(mask, BLOCK)).sum())
  sampled = min(16, closed)   # capacity: a quarter of the 64 tiles
  assert sampled < closed
  unscaled = cut + (mean - cut) * sampled / closed
  wrong = np.abs(unscaled - want) / (standard_error * sampled / closed + 1e-6)
  assert wrong.max() > 10, wrong


# One case per path: stride 1 with a 2x2 grid of tiles a sample, stride 2
# with one tile a sample and with a 2x2 grid, a tile clamped to the map, 1x1
# tiles with stride 2 on an odd map. ((4, 2, 1) stands for the former
# (8, 2, 1) and (16, 8, 1), the same stride-1 path with 11 and 7 capacities.)
@pytest.mark.parametrize('h,tile,stride', [(4, 2, 1), (8, 4, 2), (16, 4, 2),
                                           (4, 8, 1), (7, 1, 2)])
def test_open_tile_gradients_equal_the_masked_form_for_every_capacity(
    h, tile, stride):
  """Input and kernel gradients of the conditional path at open tiles, for
  each capacity branch and the dense fallback, against autodiff of the
  masked dense convolution: the windows' gradients added back with their
  halos (stride 2 and an odd map included) and the dense transposed
  convolution give the same input gradient."""
  kx, kk, kw = jax.random.split(jax.random.key(h + tile + stride), 3)
  x = jax.random.normal(kx, (2, h, h, 8))
  kernel_cond = jax.random.normal(kk, (3, 3, 6, 5)) * 0.2
  strides = (stride, stride)
  out = -(-h // stride)
  bh, _ = tiling.effective_tile((out, out), (tile, tile))
  weights = jax.random.normal(kw, (2, out, out, 5))
  grid = (2, out // bh, out // bh)

  def masked(x, k, tile_mask):
    mask = jnp.repeat(jnp.repeat(tile_mask, bh, 1), bh, 2)[..., None]
    return jnp.sum(weights * mask * ops.conv(x[..., 2:], k, strides))

  def sparse_loss(x, k, tile_mask, sparse_input):
    return jnp.sum(weights * sparse_training.conditional_at_open_tiles(
        x, k, tile_mask, strides, cond_channels_from=2,
        sparse_input_gradient=sparse_input))

  want_fn = jax.jit(jax.grad(masked, argnums=(0, 1)))
  got_fn = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)),
                   static_argnames='sparse_input')
  num_tiles = int(np.prod(grid))
  caps = tiling.capacities(num_tiles)
  counts = sorted({0, num_tiles} | {c for cap in caps for c in (cap, cap + 1)
                                    if c <= num_tiles})
  rng = np.random.default_rng(h * 10 + tile)
  for count in counts:
    flat = np.zeros(num_tiles, bool)
    flat[rng.choice(num_tiles, count, replace=False)] = True
    tile_mask = jnp.asarray(flat.reshape(grid))
    want = want_fn(x, kernel_cond, tile_mask)
    for sparse_input in (True, False):
      got = got_fn(x, kernel_cond, tile_mask, sparse_input=sparse_input)
      for g, w, name in zip(got, want, ('input', 'kernel')):
        np.testing.assert_allclose(
            g, w, rtol=1e-5, atol=1e-5,
            err_msg=f'{name}, {count} tiles open, sparse input {sparse_input}')
  assert float(jnp.max(jnp.abs(want[0][..., :2]))) == 0   # base channels


def test_overlap_add_places_windows_by_hand():
  # One 2x2 output tile at (0, 1) of a 4x4 map (3x3 kernel, stride 1): its
  # window covers input rows -1..2 and columns 1..4; the padding row and
  # column (-1 and 4) are dropped.
  tile_mask = jnp.zeros((1, 2, 2), bool).at[0, 0, 1].set(True)
  window = jnp.arange(16.0).reshape(1, 4, 4, 1)
  got = tiling.overlap_add_windows(window, tile_mask, (4, 4), (2, 2), (3, 3),
                                   (1, 1))[0, ..., 0]
  want = np.zeros((4, 4))
  want[0:3, 1:4] = np.arange(16.0).reshape(4, 4)[1:4, 0:3]
  np.testing.assert_array_equal(got, want)
  # Two neighbouring tiles: their halos overlap and add.
  both = tile_mask.at[0, 0, 0].set(True)
  windows = jnp.ones((2, 4, 4, 1))
  got = tiling.overlap_add_windows(windows, both, (4, 4), (2, 2), (3, 3),
                                   (1, 1))[0, ..., 0]
  want = np.zeros((4, 4))
  want[0:3, 0:3] += 1
  want[0:3, 1:4] += 1
  np.testing.assert_array_equal(got, want)


def test_windows_past_the_neighbouring_tiles_take_the_dense_input_gradient():
  # A 5x5 kernel on 1x1 tiles: each window reaches two tiles out, which the
  # halo add-back does not cover; the dense transposed convolution is used.
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, 3, 2))
  tile_mask = jax.random.uniform(jax.random.key(2), (2, 4, 4)) < 0.3
  with pytest.raises(ValueError, match=r'reach past the neighbouring input'):
    tiling.overlap_add_windows(jnp.zeros((4, 5, 5, 3)), tile_mask, (4, 4),
                               (1, 1), (5, 5), (1, 1))
  # Compiled whole (op-by-op dispatch compiles each operation alone).
  got = jax.jit(jax.grad(lambda x: jnp.sum(
      sparse_training.conditional_at_open_tiles(x, kernel, tile_mask) ** 2)))(x)
  want = jax.jit(jax.grad(lambda x: jnp.sum(
      (tile_mask[..., None] * ops.conv(x, kernel)) ** 2)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('norm, num_groups, running', [
    ('batch', 2, False), ('sample', 1, False), ('batch', 1, True)])
def test_tile_gate_is_the_block_gate_on_pooled_outputs(norm, num_groups,
                                                       running):
  """The gate decided on the tile-pooled base output: the same mask and the
  same straight-through gradient (threshold and base output) as the block
  mean of the normalised saliency."""
  ky, kt, kw = jax.random.split(jax.random.key(7), 3)
  y_base = jax.random.normal(ky, (4, 8, 8, 6)) + jnp.linspace(-1, 1, 6)
  threshold = jax.random.normal(kt, (6,)) * 0.3
  threshold -= jnp.mean(threshold)   # about half the tiles open
  weights = jax.random.normal(kw, (4, 8, 8, 6))
  stats = (dict(running_mean=jnp.linspace(-1, 1, 6),
                running_var=jnp.linspace(0.5, 2.0, 6)) if running else {})
  options = dict(norm=norm, num_groups=num_groups, saliency_grad=True,
                 **stats)

  def block_form(y, t):
    mask, _ = ops.saliency_gate(y, t, block=(4, 2, 0), **options)
    return jnp.sum(weights * mask), mask

  def tile_form(y, t):
    mask, _, _ = tiling.tile_gate(y, t, (4, 2), **options)
    return jnp.sum(weights * mask), mask

  # Each form compiled as one program (op-by-op dispatch of the gradient
  # compiles every operation on its own: several times the CPU time).
  (_, want_mask), want = jax.jit(jax.value_and_grad(
      block_form, (0, 1), has_aux=True))(y_base, threshold)
  (_, mask), got = jax.jit(jax.value_and_grad(
      tile_form, (0, 1), has_aux=True))(y_base, threshold)
  assert 0.2 < float(jnp.mean(mask)) < 0.8
  np.testing.assert_array_equal(mask, want_mask)
  _, tile_mask, _ = jax.jit(lambda y, t: tiling.tile_gate(
      y, t, (4, 2), **options))(y_base, threshold)
  np.testing.assert_array_equal(tile_mask, tiling.tile_mask_of(mask, (4, 2)))
  assert float(jnp.max(jnp.abs(want[1]))) > 1e-2
  _assert_close(got, want)


def test_the_estimator_adds_nothing_to_the_forward_pass():
  x, kernel, threshold, _ = _layer_inputs()
  # Both forms in one compiled program (rather than op by op).
  plain, sampled = jax.jit(lambda x, kernel, threshold: (
      sparse_training.sparse_train_gated_conv(x, kernel, threshold,
                                              block=BLOCK)[0],
      sparse_training.sparse_train_gated_conv(
          x, kernel, threshold, block=BLOCK, closed_tile_gradient='sampled',
          sample_fraction=0.5, rng=jax.random.key(1))[0]))(x, kernel,
                                                           threshold)
  np.testing.assert_array_equal(plain, sampled)


def test_closed_tile_sample_is_uniform_and_scaled():
  tile_mask = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4))
                          < 0.3)
  closed = int((~tile_mask).sum())
  counts = np.zeros(tile_mask.shape)
  for i in range(300):
    sampled, scale = sparse_training.sample_closed_tiles(jax.random.key(i), tile_mask, 8)
    sampled = np.asarray(sampled)
    assert sampled.sum() == 8 and not (sampled & np.asarray(tile_mask)).any()
    np.testing.assert_allclose(scale, closed / 8)
    counts += sampled
  # Each closed tile is drawn with probability 8 / closed.
  frequency = counts[~np.asarray(tile_mask)] / 300
  assert np.abs(frequency - 8 / closed).max() < 0.12
  # More capacity than closed tiles: all of them, scale 1.
  sampled, scale = sparse_training.sample_closed_tiles(jax.random.key(0), tile_mask, 32)
  assert int(np.asarray(sampled).sum()) == closed and float(scale) == 1.0





def test_two_devices_run_the_executor_per_shard():
  """On a 2-device mesh each device lists and gathers its own tiles: the
  gradients are the one-device ones (the capacities and the kernel's
  gradient summed over the devices), sampling every closed tile of each
  shard still gives the masked gradient, and the compiled layer holds no
  more collectives than the masked layer's (the batch statistics and the
  gradients' sums) where the executor on the whole sharded batch held
  hundreds."""
  inputs = _layer_inputs()
  batched = (True, False, False, True)
  key = jax.random.key(3)
  masked = on_two_devices(jax.grad(_masked_loss, argnums=(0, 1, 2)),
                           batched)
  none = on_two_devices(
      lambda *a: jax.grad(_sparse_loss, argnums=(0, 1, 2))(*a, key), batched)
  every = on_two_devices(lambda *a: jax.grad(_sparse_loss, argnums=(0, 1, 2))(
      *a, key, form='sampled', fraction=1.0), batched)
  _assert_close(none(*inputs), _sparse_grad(*inputs, key))
  _assert_close(every(*inputs), _grad(*inputs))
  want = collectives(masked.lower(*inputs).compile().as_text())
  for step in (none, every):
    assert collectives(step.lower(*inputs).compile().as_text()) <= want
