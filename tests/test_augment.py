"""Tests of the on-device augmentation (cdg_jax/data/augment.py).

Small images (8x8 to 16x16) keep every compile short; each test compares
against a hand-computed reference or an invariant that a real bug breaks.
"""

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdg_jax.data import augment

ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)


def _images(n=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _view(**overrides):
  """A view that does nothing (identity crop, all ops off), then overrides."""
  config = augment.view_config(
      crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
      jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
  config.mean, config.std = ZERO, ONE  # Outputs stay in [0, 1] units.
  config.update(overrides)
  return config


_augment_view_jit = jax.jit(
    lambda key, images, view: augment.augment_view(key, images, view),
    static_argnums=2)


def _run(view, images, seed=0):
  # Jitted with the (frozen, hashable) view static: one compile per config,
  # much faster than eager op-by-op dispatch of the whole pipeline.
  return np.asarray(_augment_view_jit(
      jax.random.key(seed), jnp.asarray(images),
      ml_collections.FrozenConfigDict(view)))


# The other presets differ only in numbers (checked in test_presets).
@pytest.mark.parametrize('preset', ['simclr_cifar', 'byol'])
def test_two_views_shape_dtype_and_range(preset):
  config = augment.augment_preset(preset, 16)
  images = _images()
  view1, view2 = augment.two_views(jax.random.key(0), images, config)
  for view in (view1, view2):
    assert view.shape == images.shape and view.dtype == jnp.float32
    pixels = augment.denormalize(view, config.mean, config.std)
    assert np.all(np.isfinite(pixels))
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  assert not np.allclose(view1, view2)  # Independent keys per view.


def test_every_op_on_stays_in_range():
  view = _view(crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3),
               flip_prob=0.5, jitter_prob=1.0, brightness=0.9, contrast=0.9,
               saturation=0.9, hue=0.5, grayscale_prob=0.5, blur_prob=0.5,
               solarize_prob=0.5)
  out = _run(view, _images(n=32))
  assert out.shape == (32, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


def test_zero_strength_configuration_is_identity():
  images = _images()
  view = _view(jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0,
               hue=0.0)
  # Equal up to float32 rounding of the (identity) crop resampling.
  np.testing.assert_allclose(_run(view, images),
                             images.astype(np.float32) / 255.0, atol=1e-6)


def test_near_zero_jitter_is_near_identity():
  # Exercises the traced jitter path (including the HSV round trip), where the
  # zero-strength test above skips every op at trace time.
  images = _images()
  view = _view(jitter_prob=1.0, brightness=1e-6, contrast=1e-6,
               saturation=1e-6, hue=1e-6)
  np.testing.assert_allclose(_run(view, images),
                             images.astype(np.float32) / 255.0, atol=1e-5)


def test_normalisation_uses_mean_and_std():
  images = _images()
  config = augment.augment_preset('simclr_cifar', 16, dataset='cifar100')
  expected = ((images / 255.0 - np.array([0.5071, 0.4865, 0.4409]))
              / np.array([0.2673, 0.2564, 0.2762]))
  np.testing.assert_allclose(augment.preprocess_eval(images, config), expected,
                             atol=1e-5)
  view = _view()
  view.mean, view.std = config.mean, config.std
  np.testing.assert_allclose(_run(view, images), expected, atol=1e-5)


def test_flip_flips():
  images = _images()
  np.testing.assert_allclose(_run(_view(flip_prob=1.0), images),
                             images[:, :, ::-1].astype(np.float32) / 255.0,
                             atol=1e-6)


def test_flip_probability_is_per_image():
  # One asymmetric image repeated: each copy is flipped or not on its own key.
  image = np.zeros((1, 8, 8, 3), np.uint8)
  image[:, :, :4] = 255
  out = _run(_view(flip_prob=0.5), np.repeat(image, 400, axis=0))
  flipped = out[:, 0, 0, 0] == 0.0
  assert np.all(np.isin(out[:, 0, 0, 0], [0.0, 1.0]))
  assert 0.4 < flipped.mean() < 0.6


def test_grayscale_is_rec601_luma_in_every_channel():
  images = _images()
  out = _run(_view(grayscale_prob=1.0), images)
  luma = (images / 255.0) @ np.array([0.2989, 0.5870, 0.1140])
  for channel in range(3):
    np.testing.assert_allclose(out[..., channel], luma, atol=1e-5)


def test_grayscale_probability():
  out = _run(_view(grayscale_prob=0.2), _images(n=500, size=8))
  is_gray = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
  assert 0.13 < is_gray.mean() < 0.27


def test_solarize_inverts_above_threshold():
  images = _images()
  x = images.astype(np.float32) / 255.0
  np.testing.assert_allclose(_run(_view(solarize_prob=1.0), images),
                             np.where(x < 0.5, x, 1.0 - x), atol=1e-6)


def test_brightness_multiplies_by_one_factor_per_image():
  images = (_images(n=8) // 2 + 40).astype(np.uint8)  # No clipping at 1.4x.
  x = images.astype(np.float64) / 255.0
  out = _run(_view(jitter_prob=1.0, brightness=0.4, contrast=0.0,
                   saturation=0.0, hue=0.0), images)
  factors = out / x
  per_image = factors.reshape(8, -1)
  np.testing.assert_allclose(
      per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=1e-5)
  assert np.all((per_image[:, 0] >= 0.6) & (per_image[:, 0] <= 1.4))
  assert np.std(per_image[:, 0]) > 0.01  # Different factor per image.


def test_contrast_scales_distance_to_channel_mean():
  images = (_images(n=8) // 2 + 64).astype(np.uint8)  # No clipping.
  x = images.astype(np.float64) / 255.0
  out = _run(_view(jitter_prob=1.0, brightness=0.0, contrast=0.4,
                   saturation=0.0, hue=0.0), images)
  mean = x.mean(axis=(1, 2), keepdims=True)
  factor = ((out - mean) * (x - mean)).sum(axis=(1, 2, 3)) / (
      (x - mean)**2).sum(axis=(1, 2, 3))
  expected = factor[:, None, None, None] * (x - mean) + mean
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert np.all((factor >= 0.6) & (factor <= 1.4))


def test_hue_and_saturation_keep_value_and_gray_pixels():
  images = _images(n=8)
  images[:, :4] = images[:, :4, :, :1]  # Top half gray (R = G = B).
  x = images.astype(np.float32) / 255.0
  out = _run(_view(jitter_prob=1.0, brightness=0.0, contrast=0.0,
                   saturation=0.4, hue=0.1), images)
  # HSV value (max channel) is untouched; gray pixels have no hue/saturation.
  np.testing.assert_allclose(out.max(-1), x.max(-1), atol=1e-5)
  np.testing.assert_allclose(out[:, :4], x[:, :4], atol=1e-5)
  assert np.abs(out - x).max() > 0.05


def test_jitter_probability_zero_and_one():
  images = _images()
  strong = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
  np.testing.assert_allclose(_run(_view(jitter_prob=0.0, **strong), images),
                             images / np.float32(255.0), atol=1e-6)
  out = _run(_view(jitter_prob=1.0, **strong), images)
  assert np.all(np.abs(out - images / 255.0).max(axis=(1, 2, 3)) > 1e-3)


def test_crop_scale_one_ratio_one_returns_input():
  image = jnp.asarray(_images(n=1)[0], jnp.float32)
  crop = jax.jit(lambda key: augment.random_resized_crop(
      key, image, (1.0, 1.0), (1.0, 1.0)))
  for seed in range(5):
    np.testing.assert_allclose(crop(jax.random.key(seed)), image, atol=1e-4)


def test_crop_at_output_size_is_a_window_of_the_input():
  # Scale 1/4, ratio 1 on 16x16 is an 8x8 window; at 8x8 output no resampling.
  image = np.asarray(_images(n=1)[0], np.float32)
  windows = np.stack([image[i:i + 8, j:j + 8] for i in range(9)
                      for j in range(9)])
  crop = jax.jit(lambda key: augment.random_resized_crop(
      key, jnp.asarray(image), (0.25, 0.25), (1.0, 1.0), output_shape=(8, 8)))
  found = set()
  for seed in range(12):
    out = np.asarray(crop(jax.random.key(seed)))
    errors = np.abs(windows - out).max(axis=(1, 2, 3))
    assert errors.min() < 1e-3, 'crop is not a window of the input'
    found.add(int(errors.argmin()))
  assert len(found) > 3  # Random positions.


def test_crop_upsamples_the_window():
  # A crop of half the side resampled to full size: a 2x bilinear upsampling
  # of some window, so a constant image stays constant and a horizontal ramp
  # keeps its direction with half the slope.
  ramp = np.tile(np.arange(16, dtype=np.float32)[None, :, None], (16, 1, 3))
  out = np.asarray(augment.random_resized_crop(
      jax.random.key(3), jnp.asarray(ramp), (0.25, 0.25), (1.0, 1.0)))
  np.testing.assert_allclose(np.diff(out[:, 2:-2], axis=1), 0.5, atol=1e-4)
  np.testing.assert_allclose(out[:, :, 0], out[:1, :, 0].repeat(16, 0))


def test_crop_fallback_is_centred_square_for_wide_image():
  # No 1:1 crop of the full area fits 8x16, so torchvision's fallback applies.
  image = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8, 16, 3)
  out = augment.random_resized_crop(jax.random.key(0), jnp.asarray(image),
                                    (1.0, 1.0), (1.0, 1.0), output_shape=(8, 8))
  np.testing.assert_allclose(out, image[:, 4:12], atol=1e-3)


def test_crop_and_resize_matches_scale_and_translate():
  # (top, left, height, width, output): upsampling, identity, downsampling.
  cases = [(3, 2, 8, 11, (16, 16)), (0, 0, 16, 16, (16, 16)),
           (1, 5, 13, 7, (12, 20)), (2, 3, 10, 12, (4, 5))]

  @jax.jit  # One compile for all cases; eager dispatch is slower here.
  def both(image):
    results = []
    for top, left, h, w, out in cases:
      scale = jnp.array([out[0] / h, out[1] / w])
      results.append((
          augment.crop_and_resize(image, top, left, h, w, out),
          jax.image.scale_and_translate(
              image, (*out, 3), (0, 1), scale, -jnp.array([top, left]) * scale,
              method='bilinear', antialias=True)))
    return results

  for ours, reference in both(jnp.asarray(_images(n=1)[0], jnp.float32)):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_blur_matches_dm_pix():
  image = jnp.asarray(_images(n=1, size=24)[0], jnp.float32) / 255.0
  for sigma in (0.3, 1.0, 2.0):
    np.testing.assert_allclose(
        augment.gaussian_blur(image, sigma, 5),
        dm_pix.gaussian_blur(image, sigma, kernel_size=5), atol=1e-6)


def test_blur_smooths_and_keeps_the_interior_mean():
  images = _images(n=8)
  x = images / np.float32(255.0)
  out = _run(_view(blur_prob=1.0), images)
  assert out[:, 1:-1, 1:-1].std() < 0.8 * x.std()
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(16) == 3


def test_keys_decide_the_view():
  images = _images()
  view = augment.augment_preset('byol', 16).view2  # Every op on.
  same_a = _run(view, images, seed=7)
  same_b = _run(view, images, seed=7)
  other = _run(view, images, seed=8)
  np.testing.assert_array_equal(same_a, same_b)
  assert not np.allclose(same_a, other)
  # One key per image: identical images in one batch get different views.
  repeated = _run(view, np.repeat(images[:1], 4, axis=0), seed=7)
  assert not np.allclose(repeated[0], repeated[1])


def test_jit_equals_eager():
  images = _images()
  view = augment.augment_preset('byol', 16).view2  # Every op on.
  eager = augment.augment_view(jax.random.key(1), jnp.asarray(images), view)
  np.testing.assert_allclose(eager, _run(view, images, seed=1), atol=1e-5)


def test_presets():
  simclr = augment.augment_preset('simclr_cifar', 32)
  for view in (simclr.view1, simclr.view2):
    assert view.crop_scale == (0.08, 1.0) and view.jitter_prob == 0.8
    assert (view.brightness, view.contrast, view.saturation, view.hue) == (
        0.4, 0.4, 0.4, 0.1)
    assert view.grayscale_prob == 0.2
    assert view.blur_prob == 0.0 and view.solarize_prob == 0.0
  byol = augment.augment_preset('byol', 224)
  assert (byol.view1.blur_prob, byol.view1.solarize_prob) == (1.0, 0.0)
  assert (byol.view2.blur_prob, byol.view2.solarize_prob) == (0.1, 0.2)
  assert byol.view1.saturation == 0.2 and byol.mean == (0.485, 0.456, 0.406)
  byol_cifar = augment.augment_preset('byol_cifar', 32)
  assert byol_cifar.view1.blur_prob == byol_cifar.view2.blur_prob == 0.0
  assert byol_cifar.view2.solarize_prob == 0.2
  assert byol_cifar.mean == (0.4914, 0.4822, 0.4465)
  assert byol_cifar.std == (0.247, 0.243, 0.261)


def test_mean_and_std_are_shared_by_views_and_eval():
  config = ml_collections.ConfigDict()
  config.augment = augment.augment_preset('simclr_cifar', 32)
  config.augment.mean = (0.5, 0.5, 0.5)
  assert config.augment.view1.mean == config.augment.view2.mean == (0.5,) * 3


@pytest.mark.parametrize('images, message', [
    (np.zeros((2, 8, 8, 3), np.float32), 'dtype float32'),
    (np.zeros((8, 8, 3), np.uint8), r'shape \(8, 8, 3\)'),
    (np.zeros((2, 8, 8, 1), np.uint8), r'shape \(2, 8, 8, 1\)'),
])
def test_bad_images_are_rejected(images, message):
  config = augment.augment_preset('simclr_cifar', 8)
  with pytest.raises(ValueError, match=message):
    augment.two_views(jax.random.key(0), images, config)
  with pytest.raises(ValueError, match=message):
    augment.preprocess_eval(images, config)


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="'simclr_mnist'"):
    augment.augment_preset('simclr_mnist', 32)
  with pytest.raises(ValueError, match="'svhn'"):
    augment.augment_preset('byol', 32, dataset='svhn')
  with pytest.raises(ValueError, match='flip_prob=1.5'):
    _run(_view(flip_prob=1.5), _images())
  with pytest.raises(ValueError, match=r'crop_scale=\(0.0, 1.0\)'):
    _run(_view(crop_scale=(0.0, 1.0)), _images())
  with pytest.raises(ValueError, match='blur_radius'):
    augment.view_config(blur_radius=3)
