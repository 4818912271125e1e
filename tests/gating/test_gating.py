"""Tests of the pure CDG gating ops against hand-computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import ops
from cdg_jax.gating import regularizers



def _inputs(seed=0, n=3, h=6, w=6, c_in=8, c_out=4, k=3):
  kx, kk, kt = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, h, w, c_in))
  kernel = jax.random.normal(kk, (k, k, c_in, c_out)) * 0.3
  threshold = jax.random.normal(kt, (c_out,)) * 0.3
  return x, kernel, threshold


def test_hard_gate_forward_is_exactly_binary_and_backward_is_sigmoid_slope():
  z = jnp.array([-3.0, -1e-7, 0.0, 1e-7, 0.3, 5.0])
  alpha = 2.0
  d = ops.hard_gate(z, alpha)
  np.testing.assert_array_equal(d, [0, 0, 0, 1, 1, 1])
  grad = jax.grad(lambda z: jnp.sum(ops.hard_gate(z, alpha) * jnp.arange(6.)))(z)
  s = 1 / (1 + np.exp(-alpha * np.asarray(z)))
  np.testing.assert_allclose(grad, np.arange(6.) * alpha * s * (1 - s), rtol=1e-6)


def test_gated_conv_output_is_binary_masked_combination():
  x, kernel, threshold = _inputs()
  y, mask, _ = ops.gated_conv(x, kernel, threshold, groups=4)
  assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
  assert 0 < float(mask.mean()) < 1
  y_base = ops.conv(x[..., :2], kernel[:, :, :2])
  y_cond = ops.conv(x[..., 2:], kernel[:, :, 2:])
  np.testing.assert_allclose(y, y_base + mask * y_cond, rtol=1e-5, atol=1e-5)


def test_all_gates_open_equals_dense_conv_and_all_closed_equals_base_path():
  x, kernel, _ = _inputs()
  c_out = kernel.shape[-1]
  for strides in [(1, 1), (2, 2)]:
    dense = ops.conv(x, kernel, strides)
    y_open, mask, _ = ops.gated_conv(x, kernel, jnp.full((c_out,), -1e9),
                                     groups=4, strides=strides)
    np.testing.assert_array_equal(mask, 1.0)
    np.testing.assert_allclose(y_open, dense, rtol=1e-5, atol=1e-5)
    y_closed, mask, _ = ops.gated_conv(x, kernel, jnp.full((c_out,), 1e9),
                                       groups=4, strides=strides)
    np.testing.assert_array_equal(mask, 0.0)
    base = ops.conv(x[..., :2], kernel[:, :, :2], strides)
    np.testing.assert_allclose(y_closed, base, rtol=1e-6, atol=1e-6)


def _reference_gated_conv(x, kernel, threshold, alpha):
  """The same layer with the classic `soft + stop_gradient(hard - soft)` STE."""
  n_base = x.shape[-1] // 4
  y_base = ops.conv(x[..., :n_base], kernel[:, :, :n_base])
  y_cond = ops.conv(x[..., n_base:], kernel[:, :, n_base:])
  stats = jax.lax.stop_gradient(y_base)
  mean = jnp.mean(stats, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(stats - mean), axis=(0, 1, 2))
  z = (y_base - mean) / jnp.sqrt(var + 1e-5) - threshold
  soft = jax.nn.sigmoid(alpha * z)
  hard = (z > 0).astype(z.dtype)
  return y_base + (soft + jax.lax.stop_gradient(hard - soft)) * y_cond


def test_gradient_reaches_thresholds_and_base_weights_as_the_ste_prescribes():
  x, kernel, threshold = _inputs(seed=1)
  probe = jax.random.normal(jax.random.key(7), (3, 6, 6, 4))
  alpha = 2.0

  def loss(fn, kernel, threshold):
    return jnp.sum(fn(x, kernel, threshold) * probe)

  ours = lambda x, k, t: ops.gated_conv(x, k, t, groups=4, alpha=alpha)[0]
  ref = lambda x, k, t: _reference_gated_conv(x, k, t, alpha)
  g_kernel, g_threshold = jax.grad(loss, argnums=(1, 2))(ours, kernel, threshold)
  r_kernel, r_threshold = jax.grad(loss, argnums=(1, 2))(ref, kernel, threshold)
  np.testing.assert_allclose(g_threshold, r_threshold, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(g_kernel, r_kernel, rtol=1e-4, atol=1e-4)

  # Hand-computed threshold gradient: dL/d delta_c = -sum probe*Y_cond*alpha*s(1-s).
  y_base = ops.conv(x[..., :2], kernel[:, :, :2])
  y_cond = ops.conv(x[..., 2:], kernel[:, :, 2:])
  mean, var = ops.saliency_moments(y_base)
  z = ops.normalize_saliency(y_base, mean, var) - threshold
  s = jax.nn.sigmoid(alpha * z)
  expected = -jnp.sum(probe * y_cond * alpha * s * (1 - s), axis=(0, 1, 2))
  np.testing.assert_allclose(g_threshold, expected, rtol=1e-4, atol=1e-5)
  assert np.all(np.abs(g_threshold) > 0)

  # The base-path weights get gradient through the saliency too, not only
  # through Y_base: compare with the gradient when the mask is frozen.
  def frozen_mask_loss(kernel):
    y_base = ops.conv(x[..., :2], kernel[:, :, :2])
    y_cond = ops.conv(x[..., 2:], kernel[:, :, 2:])
    mask = jax.lax.stop_gradient(ours(x, kernel, threshold) - y_base) != 0
    return jnp.sum((y_base + mask * y_cond) * probe)
  g_frozen = jax.grad(frozen_mask_loss)(kernel)
  diff = np.abs(np.asarray(g_kernel - g_frozen))
  assert diff[:, :, :2].max() > 1e-3       # saliency path reaches base weights
  np.testing.assert_allclose(diff[:, :, 2:], 0, atol=1e-5)


def test_structured_masks_are_constant_within_blocks():
  x, kernel, threshold = _inputs(n=2, h=8, w=8, c_out=8)
  block = (2, 4, 4)
  _, mask, _ = ops.gated_conv(x, kernel, jnp.zeros((8,)), groups=4,
                              block=block)
  blocks = np.asarray(mask).reshape(2, 4, 2, 2, 4, 2, 4)
  assert np.all(blocks == blocks[:, :, :1, :, :1, :, :1])
  assert 0 < mask.mean() < 1


def test_block_decision_uses_block_mean_of_saliency_minus_threshold():
  saliency = jnp.array([1.0, 0.0, -0.5, 3.0]).reshape(1, 2, 2, 1)
  threshold = jnp.array([0.5])
  mask = ops.gate_mask(saliency, threshold, block=(2, 2, 1))
  # Block mean saliency 0.875 > 0.5: the whole block opens.
  np.testing.assert_array_equal(mask, np.ones((1, 2, 2, 1)))
  mask = ops.gate_mask(saliency, jnp.array([0.9]), block=(2, 2, 1))
  np.testing.assert_array_equal(mask, np.zeros((1, 2, 2, 1)))
  mask = ops.gate_mask(saliency, threshold, block=(1, 1, 1))
  np.testing.assert_array_equal(mask.ravel(), [1, 0, 0, 1])


def test_jit_and_vmap_give_the_eager_result():
  x, kernel, threshold = _inputs()
  fn = lambda x, k, t: ops.gated_conv(x, k, t, groups=4, block=(2, 2, 2),
                                      norm='sample')[:2]
  eager = fn(x, kernel, threshold)
  jitted = jax.jit(fn)(x, kernel, threshold)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  stacked = jnp.stack([x, 2 * x])
  vmapped = jax.vmap(fn, in_axes=(0, None, None))(stacked, kernel, threshold)
  for i, xi in enumerate([x, 2 * x]):
    looped = fn(xi, kernel, threshold)
    np.testing.assert_allclose(vmapped[0][i], looped[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(vmapped[1][i], looped[1])


def test_running_or_per_sample_statistics_make_masks_batch_independent():
  x, kernel, threshold = _inputs(n=4)
  other = jax.random.normal(jax.random.key(3), x.shape) * 5
  mixed = x.at[1:].set(other[1:])
  running = dict(running_mean=jnp.full((4,), 0.1), running_var=jnp.full((4,), 2.))
  for kwargs in [running, dict(norm='sample')]:
    m_a = ops.gated_conv(x, kernel, threshold, groups=4, **kwargs)[1]
    m_b = ops.gated_conv(mixed, kernel, threshold, groups=4, **kwargs)[1]
    np.testing.assert_array_equal(m_a[0], m_b[0])
  # Batch statistics (training) do depend on the batch, as BatchNorm does.
  m_a = ops.gated_conv(x, kernel, threshold, groups=4)[1]
  m_b = ops.gated_conv(mixed, kernel, threshold, groups=4)[1]
  assert not np.array_equal(m_a[0], m_b[0])


def test_per_group_saliency_moments_equal_separate_statistics():
  y = jax.random.normal(jax.random.key(0), (6, 3, 3, 2)) + jnp.arange(6.)[:, None, None, None]
  mean, var = ops.saliency_moments(y, 'batch', num_groups=2)
  for g, part in enumerate([y[:3], y[3:]]):
    np.testing.assert_allclose(mean[3 * g:3 * g + 3, 0, 0],
                               np.broadcast_to(part.mean(axis=(0, 1, 2)), (3, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(var[3 * g, 0, 0], np.var(part, axis=(0, 1, 2)),
                               rtol=1e-5)
  joint_mean, _ = ops.saliency_moments(y, 'batch', num_groups=1)
  np.testing.assert_allclose(joint_mean[0, 0, 0], y.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_regularisers_match_hand_computed_values():
  thresholds = [jnp.array([0.0, 1.0]), jnp.array([3.0])]
  # mean((0-1)^2, 0) = 0.5 ; (3-1)^2 = 4
  np.testing.assert_allclose(regularizers.threshold_regularizer(thresholds, 1.0), 4.5)
  np.testing.assert_allclose(
      regularizers.density_regularizer([jnp.array(0.7), jnp.array(0.2)], 0.5),
      0.04 + 0.09, rtol=1e-6)


def test_bad_groups_and_blocks_name_the_bad_value():
  x, kernel, threshold = _inputs(c_in=6)
  with pytest.raises(ValueError, match='groups=4 does not divide the 6 input'):
    ops.gated_conv(x, kernel, threshold, groups=4)
  x, kernel, threshold = _inputs()
  with pytest.raises(ValueError, match=r'block=\(4, 4, 1\).*height 4 does not divide 6'):
    ops.gated_conv(x, kernel, threshold, groups=4, block=(4, 4, 1))
  with pytest.raises(ValueError, match="saliency_norm='group'"):
    ops.saliency_moments(x, 'group')


# ------------------------------------------------- lineage options (issue 12)


def test_diagonal_grouping_base_path_is_block_diagonal_and_paths_sum_to_dense():
  x, kernel, _ = _inputs(c_in=8, c_out=12)
  for strides in [(1, 1), (2, 2)]:
    y_base, y_cond = ops.base_and_conditional(x, kernel, 4, 'diagonal',
                                              strides)
    # Hand reference: output group i (3 channels) from input group i (2).
    reference = np.concatenate(
        [ops.conv(x[..., 2 * i:2 * i + 2],
                  kernel[:, :, 2 * i:2 * i + 2, 3 * i:3 * i + 3], strides)
         for i in range(4)], axis=-1)
    np.testing.assert_allclose(y_base, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_base + y_cond,
                               ops.conv(x, kernel, strides),
                               rtol=1e-5, atol=1e-5)
  # 'first' is the split of the module docstring.
  y_base, y_cond = ops.base_and_conditional(x, kernel, 4, 'first')
  np.testing.assert_allclose(y_base, ops.conv(x[..., :2], kernel[:, :, :2]),
                             rtol=1e-6, atol=1e-6)


def test_diagonal_mask_and_bad_groupings():
  np.testing.assert_array_equal(ops.diagonal_mask(4, 6, 2),
                                np.kron(np.eye(2), np.ones((2, 3))))
  with pytest.raises(ValueError, match='divide the 6 output channels'):
    ops.base_and_conditional(jnp.zeros((1, 2, 2, 8)),
                             jnp.zeros((1, 1, 8, 6)), 4, 'diagonal')
  with pytest.raises(ValueError, match="grouping='second'"):
    ops.base_and_conditional(jnp.zeros((1, 2, 2, 4)),
                             jnp.zeros((1, 1, 4, 6)), 2, 'second')


def test_diagonal_gated_conv_open_is_dense_and_gradient_skips_diagonal_cond():
  x, kernel, _ = _inputs(c_in=8, c_out=8)
  y, mask, _ = ops.gated_conv(x, kernel, jnp.full((8,), -1e9), groups=4,
                              grouping='diagonal')
  np.testing.assert_array_equal(mask, 1.0)
  np.testing.assert_allclose(y, ops.conv(x, kernel), rtol=1e-5, atol=1e-5)
  y, mask, _ = ops.gated_conv(x, kernel, jnp.full((8,), 1e9), groups=4,
                              grouping='diagonal')
  np.testing.assert_array_equal(mask, 0.0)
  # Gates closed: only the diagonal blocks of the kernel get gradient.
  grad = jax.grad(lambda k: jnp.sum(ops.gated_conv(
      x, k, jnp.full((8,), 1e9), groups=4, grouping='diagonal')[0] ** 2))(
          kernel)
  on_diagonal = np.asarray(ops.diagonal_mask(8, 8, 4), bool)
  assert np.all(np.abs(np.asarray(grad)[:, :, on_diagonal]) > 0)
  np.testing.assert_array_equal(np.asarray(grad)[:, :, ~on_diagonal], 0.0)


def test_hard_sigmoid_surrogate_slope_is_a_box_of_height_alpha_over_four():
  z = jnp.array([-3.0, -0.99, 0.0, 0.5, 0.99, 1.01])
  alpha = 2.0  # slope 0.5 inside |z| < 2 / alpha = 1, 0 outside
  weights = jnp.arange(1.0, 7.0)
  gate = lambda z: jnp.sum(ops.hard_gate(z, alpha, 'hard_sigmoid') * weights)
  np.testing.assert_array_equal(ops.hard_gate(z, alpha, 'hard_sigmoid'),
                                [0, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(jax.grad(gate)(z),
                             weights * np.array([0, .5, .5, .5, .5, 0]))
  # Same slope as the sigmoid at z = 0.
  np.testing.assert_allclose(ops.surrogate_slope(jnp.zeros(()), 3.0,
                                                 'hard_sigmoid'),
                             ops.surrogate_slope(jnp.zeros(()), 3.0), 1e-6)
  with pytest.raises(ValueError, match="surrogate='relu'"):
    ops.surrogate_slope(z, alpha, 'relu')


def _reference_with_statistics_gradient(x, kernel, threshold, alpha, norm):
  """STE by the soft + stop_gradient trick, gradient through the statistics."""
  y_base = ops.conv(x[..., :2], kernel[:, :, :2])
  y_cond = ops.conv(x[..., 2:], kernel[:, :, 2:])
  axes = (0, 1, 2) if norm == 'batch' else (1, 2)
  mean = jnp.mean(y_base, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(y_base - mean), axis=axes, keepdims=True)
  z = (y_base - mean) / jnp.sqrt(var + 1e-5) - threshold
  soft = jax.nn.sigmoid(alpha * z)
  hard = (z > 0).astype(z.dtype)
  return y_base + (soft + jax.lax.stop_gradient(hard - soft)) * y_cond


@pytest.mark.parametrize('norm', ['batch', 'sample'])
def test_saliency_gradient_through_statistics_matches_reference(norm):
  x, kernel, threshold = _inputs(seed=2)
  probe = jax.random.normal(jax.random.key(8), (3, 6, 6, 4))
  loss = lambda fn, k: jnp.sum(fn(k) * probe)
  ours = lambda k: ops.gated_conv(x, k, threshold, groups=4, norm=norm,
                                  saliency_grad=True)[0]
  ref = lambda k: _reference_with_statistics_gradient(x, k, threshold, 2.0,
                                                      norm)
  no_stats_grad = lambda k: ops.gated_conv(x, k, threshold, groups=4,
                                           norm=norm)[0]
  g_ours = jax.grad(lambda k: loss(ours, k))(kernel)
  np.testing.assert_allclose(g_ours, jax.grad(lambda k: loss(ref, k))(kernel),
                             rtol=1e-4, atol=1e-4)
  # The forward pass is the same; only the base weights' gradient changes.
  np.testing.assert_array_equal(ours(kernel), no_stats_grad(kernel))
  g_plain = jax.grad(lambda k: loss(no_stats_grad, k))(kernel)
  assert np.abs(np.asarray(g_ours - g_plain))[:, :, :2].max() > 1e-3
  np.testing.assert_allclose(g_ours[:, :, 2:], g_plain[:, :, 2:], rtol=1e-5,
                             atol=1e-5)


def test_summed_threshold_regulariser_counts_every_channel():
  thresholds = [jnp.array([0.0, 1.0, 3.0]), jnp.array([3.0])]
  # (0-1)^2 + 0 + (3-1)^2 + (3-1)^2 = 9; the per-layer mean form: 5/3 + 4.
  np.testing.assert_allclose(
      regularizers.threshold_sum_regularizer(thresholds, 1.0), 9.0)
  np.testing.assert_allclose(regularizers.threshold_regularizer(thresholds, 1.0),
                             5 / 3 + 4, rtol=1e-6)
  assert float(regularizers.threshold_sum_regularizer([], 1.0)) == 0.0


@pytest.mark.parametrize('formulation', ['patches', 'shifted_dots'])
@pytest.mark.parametrize('size,kernel,stride,padding', [
    (8, 3, 1, 'SAME'), (7, 3, 2, 'SAME'), (8, 1, 2, 'SAME'),
    (9, 3, 1, 'VALID'), (6, 3, 2, ((0, 1), (1, 1)))])
def test_conv_formulations_match_xla_values_and_gradients(
    formulation, size, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 5, 4)), jnp.float32)

  def loss(form):
    return lambda x, w: jnp.sum(jnp.sin(ops.conv(
        x, w, (stride, stride), padding, formulation=form)))
  np.testing.assert_allclose(
      ops.conv(x, w, (stride, stride), padding, formulation=formulation),
      ops.conv(x, w, (stride, stride), padding, formulation='xla'),
      rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(formulation), (0, 1))(x, w),
                       jax.grad(loss('xla'), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_auto_formulation_on_cpu_picks_patches_for_strides_and_tiny_maps(
    monkeypatch):
  assert ops.auto_formulation((2, 16, 16, 8), (3, 3, 8, 8), (1, 1),
                              'SAME') == 'xla'
  assert ops.auto_formulation((2, 16, 16, 8), (3, 3, 8, 8), (2, 2),
                              'SAME') == 'patches'
  assert ops.auto_formulation((2, 16, 16, 8), (1, 1, 8, 8), (2, 2),
                              'SAME') == 'patches'
  assert ops.auto_formulation((2, 2, 2, 8), (3, 3, 8, 8), (1, 1),
                              'SAME') == 'patches'
  assert ops.auto_formulation((2, 2, 2, 8), (1, 1, 8, 8), (1, 1),
                              'SAME') == 'xla'
  assert ops.auto_formulation((2, 4, 4, 8), (3, 3, 8, 8), (1, 1),
                              'VALID') == 'patches'   # 2x2 out
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert ops.auto_formulation((2, 16, 16, 8), (3, 3, 8, 8), (2, 2),
                              'SAME') == 'xla'


def test_conv_default_is_xla_and_the_environment_is_the_programs_only(
    monkeypatch):
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 2))

  def no_auto(*args):
    raise AssertionError(f'auto_formulation called with {args}')
  monkeypatch.setattr(ops, 'auto_formulation', no_auto)
  # The default is XLA's convolution, whatever the environment says: conv
  # never reads it.
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'auto')
  np.testing.assert_array_equal(ops.conv(x, w, (2, 2)),
                                jax.lax.conv_general_dilated(
                                    x, w, (2, 2), 'SAME',
                                    dimension_numbers=ops.DIMENSION_NUMBERS))
  # The program's choice reads it (when the program builds its network).
  assert ops.program_formulation() == 'auto'
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'xla')
  assert ops.program_formulation() == 'xla'
  monkeypatch.delenv(ops.CONV_FORMULATION_VARIABLE)
  assert ops.program_formulation() == ops.PROGRAM_FORMULATION == 'auto'
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'im2col')
  with pytest.raises(ValueError, match="CDG_JAX_CONV_FORMULATION='im2col' "
                     "names no convolution formulation"):
    ops.program_formulation()
  with pytest.raises(ValueError, match="formulation='im2col'"):
    ops.conv(x, w, formulation='im2col')
  # A `conv_defaults` block sets the formulation of calls that give none
  # ('auto' here, which calls auto_formulation); an argument wins.
  with ops.conv_defaults('auto'):
    with pytest.raises(AssertionError, match='auto_formulation called'):
      ops.conv(x, w, (2, 2))
    ops.conv(x, w, (2, 2), formulation='xla')
  ops.conv(x, w, (2, 2))
