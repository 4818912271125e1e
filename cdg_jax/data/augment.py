"""On-device SSL augmentation in pure JAX.

The host feeds uint8 batches of fixed shape; the two contrastive views are made
here, inside the jitted train step, with one PRNG key per image (as DeepMind's
BYOL does), so the host never becomes the bottleneck and every op is traced
once. Each image draws all its random numbers in one `jax.random.uniform`
call (see NUM_UNIFORMS), which halves compile time compared with a key split
per op. All functions are pure: `(key, uint8 images, config) -> float32 images`.
They are jittable and the config is read at trace time (plain Python floats),
so an op whose probability is 0 costs nothing.

One view, per image, in the order of SimCLR and BYOL:

  random resized crop -> horizontal flip -> colour jitter (brightness,
  contrast, saturation, hue in random order, with probability jitter_prob) ->
  grayscale -> Gaussian blur -> solarisation -> normalisation.

dm-pix provides the ops it already implements the way SimCLR/BYOL use them
(flip, contrast, RGB<->HSV for saturation and hue, grayscale, solarisation).
Three ops are written here on purpose:

* Brightness is multiplicative, a factor in [max(0, 1 - b), 1 + b], as in
  torchvision's ColorJitter, SimCLR v2 and BYOL. dm_pix.random_brightness is
  additive (tf.image semantics), which is a different augmentation.
* Random resized crop: dm_pix.random_crop takes fixed crop sizes; the SSL crop
  samples its area and aspect ratio per image and resamples to a fixed output
  shape, with the weights of `jax.image.scale_and_translate` (bilinear,
  antialiased) written out as two small matrices (see `crop_and_resize`).
* Gaussian blur: the same filter as dm_pix.gaussian_blur, but as shifted sums,
  because a per-image sigma under vmap makes dm-pix's convolution 10-30x
  slower on CPU (see `gaussian_blur`).

Configuration (`augment_preset` builds it):

  augment_config:
    mean, std:   per-channel normalisation, applied after augmentation.
    view1, view2: view configs, each with
      crop_scale (min, max) fraction of the image area, crop_ratio (min, max)
      aspect ratio w/h, flip_prob, jitter_prob, brightness, contrast,
      saturation, hue (jitter strengths), jitter_random_order, grayscale_prob,
      blur_prob, blur_sigma (min, max) in pixels, solarize_prob,
      solarize_threshold, and mean/std (references to the block's mean/std).
    name, image_size: the preset and training resolution, for the record (the
      views keep the resolution of the images they are given).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array

# Per-channel RGB mean and std of the training images, in [0, 1] units.
NORMALIZATION = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZATION['imagenet100'] = NORMALIZATION['imagenet']
NORMALIZATION['imagenet2012'] = NORMALIZATION['imagenet']

PRESETS = ('simclr_cifar', 'byol', 'byol_cifar', 'simclr_imagenet',
           'byol_imagenet')

# Number of (area, ratio) candidates a random resized crop draws at once; the
# first that fits is used, as torchvision's 10 sequential attempts do.
_CROP_ATTEMPTS = 10

VIEW_FIELDS = ('crop_scale', 'crop_ratio', 'flip_prob', 'jitter_prob',
               'brightness', 'contrast', 'saturation', 'hue',
               'jitter_random_order', 'grayscale_prob', 'blur_prob',
               'blur_sigma', 'solarize_prob', 'solarize_threshold', 'mean',
               'std')


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


def view_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A view config with SimCLR's ImageNet defaults, updated by `overrides`.

  Defaults: crop scale (0.08, 1), ratio (3/4, 4/3), flip 0.5, colour jitter
  with probability 0.8 and strengths (0.4, 0.4, 0.4, 0.1) in random order,
  grayscale 0.2, no blur, no solarisation. mean/std are left out: the augment
  block supplies them (see `augment_preset`).
  """
  config = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0),
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      flip_prob=0.5,
      jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.4,
      hue=0.1,
      jitter_random_order=True,
      grayscale_prob=0.2,
      blur_prob=0.0,
      blur_sigma=(0.1, 2.0),
      solarize_prob=0.0,
      solarize_threshold=0.5,
  ))
  unknown = set(overrides) - set(VIEW_FIELDS)
  if unknown:
    raise ValueError(f'Unknown view config fields {sorted(unknown)}; expected '
                     f'any of {VIEW_FIELDS}.')
  config.update(overrides)
  return config


def augment_preset(name: str, image_size: int,
                   dataset: str | None = None) -> ml_collections.ConfigDict:
  """The `augment` config block of a named recipe.

  Args:
    name: one of PRESETS.
      'simclr_cifar': SimCLR on CIFAR: crop scale (0.08, 1), jitter 0.8 with
        strengths (0.4, 0.4, 0.4, 0.1), grayscale 0.2, no blur, no solarise.
      'byol': BYOL (Grill et al. 2020): jitter 0.8 with (0.4, 0.4, 0.2, 0.1),
        grayscale 0.2; view1 blur 1.0 / solarise 0.0, view2 blur 0.1 /
        solarise 0.2 (the asymmetric views of the paper).
      'byol_cifar': 'byol' without blur (blur destroys 32x32 images; the usual
        CIFAR choice), keeping the solarisation asymmetry.
      'simclr_imagenet': SimCLR on ImageNet (colour strength 1.0): jitter 0.8
        with strengths (0.8, 0.8, 0.8, 0.2), grayscale 0.2, blur 0.5 on both
        views, no solarise.
      'byol_imagenet': the same as 'byol' (ImageNet is BYOL's own setting).
    image_size: side of the (square) training images. Recorded in the block;
      the blur kernel is 10% of the image side (23 px at 224, as in BYOL).
    dataset: whose normalisation statistics to use ('cifar10', 'cifar100',
      'imagenet', 'imagenet100'); by default CIFAR-10's for the CIFAR presets
      and ImageNet's otherwise.

  Returns:
    ConfigDict with image_size, mean, std, view1, view2. view1/view2 mean and
    std are references to the block's, so `config.augment.mean = ...` (or
    `--config.augment.mean=...`) changes both views and evaluation together.
  """
  if name not in PRESETS:
    raise ValueError(f'Unknown augmentation preset {name!r}; expected one of '
                     f'{PRESETS}.')
  if dataset is None:
    dataset = 'cifar10' if name.endswith('cifar') else 'imagenet'
  if dataset not in NORMALIZATION:
    raise ValueError(f'No normalisation statistics for dataset {dataset!r}; '
                     f'expected one of {tuple(NORMALIZATION)}.')
  if name == 'simclr_cifar':
    view1 = view_config()
    view2 = view_config()
  elif name == 'simclr_imagenet':
    view1 = view_config(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                        blur_prob=0.5)
    view2 = view_config(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                        blur_prob=0.5)
  else:  # BYOL family.
    blur1, blur2 = (0.0, 0.0) if name == 'byol_cifar' else (1.0, 0.1)
    view1 = view_config(saturation=0.2, blur_prob=blur1, solarize_prob=0.0)
    view2 = view_config(saturation=0.2, blur_prob=blur2, solarize_prob=0.2)
  mean, std = NORMALIZATION[dataset]
  config = ml_collections.ConfigDict(dict(
      name=name, image_size=image_size, mean=mean, std=std))
  config.view1 = view1
  config.view2 = view2
  for view in (config.view1, config.view2):
    view.mean = config.get_ref('mean')
    view.std = config.get_ref('std')
  return config


# ---------------------------------------------------------------------------
# Single-image ops on float32 (H, W, 3) images in [0, 1].
# ---------------------------------------------------------------------------


# Every random number of one view of one image comes from a single
# `jax.random.uniform(key, (NUM_UNIFORMS,))` call, sliced per op: one PRNG
# evaluation instead of one per op cut the compile time of a view by half or
# more on CPU, and fixed slots keep each op's randomness independent of which
# other ops are switched on.
_U_CROP_AREA = slice(0, _CROP_ATTEMPTS)
_U_CROP_RATIO = slice(_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS)
_U_CROP_TOP, _U_CROP_LEFT = 2 * _CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS + 1
_U_FLIP = 2 * _CROP_ATTEMPTS + 2
_U_JITTER_APPLY = _U_FLIP + 1
_U_JITTER = slice(_U_JITTER_APPLY + 1, _U_JITTER_APPLY + 9)  # 4 + 4 uniforms.
_U_GRAY = _U_JITTER_APPLY + 9
_U_BLUR_APPLY, _U_BLUR_SIGMA = _U_GRAY + 1, _U_GRAY + 2
_U_SOLARIZE = _U_GRAY + 3
NUM_UNIFORMS = _U_SOLARIZE + 1


def _crop_fallback(height: int, width: int,
                   ratio: tuple[float, float]) -> tuple[int, int]:
  """Crop (h, w) used when no sampled candidate fits: torchvision's choice.

  The whole image if its aspect ratio is inside `ratio`, else the largest
  centred crop with the nearest allowed ratio.
  """
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return h, w


def _random_resized_crop(uniforms: Array, image: Array,
                         scale: Sequence[float], ratio: Sequence[float],
                         output_shape: Sequence[int]) -> Array:
  """`random_resized_crop` driven by 2 * _CROP_ATTEMPTS + 2 uniforms."""
  height, width, _ = image.shape
  area = height * width * (
      scale[0] + (scale[1] - scale[0]) * uniforms[_U_CROP_AREA])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * uniforms[_U_CROP_RATIO])
  crop_w = jnp.round(jnp.sqrt(area * aspect))
  crop_h = jnp.round(jnp.sqrt(area / aspect))
  fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
  first = jnp.argmax(fits)  # Index of the first candidate that fits.
  found = jnp.any(fits)
  fallback_h, fallback_w = _crop_fallback(height, width, tuple(ratio))
  crop_h = jnp.where(found, crop_h[first], fallback_h)
  crop_w = jnp.where(found, crop_w[first], fallback_w)
  # Offsets are whole pixels uniform in [0, H - h] (centred for the fallback).
  top = jnp.where(
      found, jnp.floor(uniforms[_U_CROP_TOP] * (height - crop_h + 1)),
      (height - fallback_h) // 2)
  left = jnp.where(
      found, jnp.floor(uniforms[_U_CROP_LEFT] * (width - crop_w + 1)),
      (width - fallback_w) // 2)
  return crop_and_resize(image, top, left, crop_h, crop_w, output_shape)


def random_resized_crop(key: Array, image: Array,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        output_shape: Sequence[int] | None = None) -> Array:
  """Inception-style random resized crop of one image (torchvision semantics).

  Draws `_CROP_ATTEMPTS` candidates with area uniform in `scale` times the
  image area and log-uniform aspect ratio (w/h) in `ratio`, rounded to whole
  pixels; takes the first that fits inside the image at a uniform random
  position (or torchvision's centred fallback when none fits), and resamples it
  bilinearly (antialiased when shrinking) to `output_shape`.

  Args:
    key: PRNG key.
    image: (H, W, C) float image.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio width / height.
    output_shape: (H_out, W_out); defaults to (H, W).

  Returns:
    (H_out, W_out, C) float32 image. With scale (1, 1) and ratio (1, 1) on a
    square image it returns the input unchanged.
  """
  uniforms = jax.random.uniform(key, (NUM_UNIFORMS,))
  return _random_resized_crop(uniforms, image, scale, ratio,
                              output_shape or image.shape[:2])


def _resample_weights(out_size: int, in_size: int, start: Array,
                      length: Array) -> Array:
  """(out_size, in_size) bilinear weights mapping [start, start + length).

  Triangle kernel widened by the downscaling factor (antialiasing) and
  renormalised at the borders: the weights jax.image.scale_and_translate
  (method='bilinear', antialias=True) uses, written out as one small matrix
  per axis.
  """
  scale = out_size / length
  centres = start + (jnp.arange(out_size) + 0.5) / scale  # In input pixels.
  kernel_width = jnp.maximum(1.0 / scale, 1.0)
  pixels = jnp.arange(in_size) + 0.5
  weights = jnp.maximum(
      0.0, 1.0 - jnp.abs(pixels[None, :] - centres[:, None]) / kernel_width)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def crop_and_resize(image: Array, top: Array, left: Array, height: Array,
                    width: Array, output_shape: Sequence[int]) -> Array:
  """Bilinearly resamples the window [top, top + height) x [left, left + width).

  Args:
    image: (H, W, C) image.
    top, left, height, width: the window in pixels (may be traced floats).
    output_shape: (H_out, W_out).

  Returns:
    (H_out, W_out, C) float32; equal to jax.image.scale_and_translate with
    scale out/size and translation -offset * scale (a test checks it).
  """
  rows = _resample_weights(output_shape[0], image.shape[0], top, height)
  cols = _resample_weights(output_shape[1], image.shape[1], left, width)
  return jnp.einsum('ih,hwc,jw->ijc', rows, image.astype(jnp.float32), cols)


def _color_jitter(uniforms: Array, image: Array, brightness: float,
                  contrast: float, saturation: float, hue: float,
                  random_order: bool) -> Array:
  """`color_jitter` driven by 8 uniforms: 4 for the order, 4 for strengths."""

  def factor(u, strength):
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * u

  brightness_factor = factor(uniforms[4], brightness)
  contrast_factor = factor(uniforms[5], contrast)
  saturation_factor = factor(uniforms[6], saturation)
  hue_delta = hue * (2.0 * uniforms[7] - 1.0)
  # argsort of 4 uniforms is a uniformly random permutation.
  order = jnp.argsort(uniforms[:4]) if random_order else jnp.arange(4)
  use_hsv = saturation > 0 or hue > 0

  def apply_slot(slot, image):
    op = order[slot]
    if brightness > 0:
      image = jnp.clip(image * jnp.where(op == 0, brightness_factor, 1.0),
                       0.0, 1.0)
    if contrast > 0:
      image = jnp.clip(dm_pix.adjust_contrast(
          image, jnp.where(op == 1, contrast_factor, 1.0)), 0.0, 1.0)
    if use_hsv:
      # dm_pix.adjust_saturation and adjust_hue, fused into one round trip.
      h, s, v = jnp.moveaxis(dm_pix.rgb_to_hsv(image), -1, 0)
      h = (h + jnp.where(op == 3, hue_delta, 0.0)) % 1.0
      s = jnp.clip(s * jnp.where(op == 2, saturation_factor, 1.0), 0.0, 1.0)
      image = jnp.clip(dm_pix.hsv_to_rgb(jnp.stack([h, s, v], axis=-1)),
                       0.0, 1.0)
    return image

  for slot in range(4):
    image = apply_slot(slot, image)
  return image


def color_jitter(key: Array, image: Array, brightness: float, contrast: float,
                 saturation: float, hue: float,
                 random_order: bool = True) -> Array:
  """SimCLR/BYOL colour jitter of one image, clipped to [0, 1] after each op.

  Brightness multiplies by a factor in [max(0, 1 - b), 1 + b]; contrast scales
  the distance to the per-channel mean by a factor in [max(0, 1 - c), 1 + c]
  (tf.image / dm-pix semantics); saturation multiplies HSV saturation by a
  factor in [max(0, 1 - s), 1 + s]; hue adds a delta in [-h, h] (in turns) to
  HSV hue. With `random_order` the four ops are applied in a random
  permutation per image.

  Implementation: each of the four slots applies every op with the identity
  parameter except the op the permutation puts in that slot, which is
  jittable and vmappable without `lax.switch` (that would evaluate all four
  branches per slot under vmap anyway); saturation and hue share one RGB->HSV
  round trip per slot. Ops of strength 0 are left out at trace time, so zero
  strengths give back the input exactly.

  Args:
    key: PRNG key.
    image: (H, W, 3) float image in [0, 1].
    brightness, contrast, saturation, hue: jitter strengths (>= 0; hue <= 0.5).
    random_order: apply the four ops in a random order (else the order above).

  Returns:
    (H, W, 3) jittered image in [0, 1].
  """
  return _color_jitter(jax.random.uniform(key, (8,)), image, brightness,
                       contrast, saturation, hue, random_order)


def to_grayscale(image: Array) -> Array:
  """Rec. 601 luma (TensorFlow's weights) repeated over the 3 channels."""
  return dm_pix.rgb_to_grayscale(image, keep_dims=True)


def blur_kernel_size(image_side: int) -> int:
  """Odd Gaussian-blur kernel of ~10% of the image side (23 at 224, BYOL)."""
  size = max(3, int(0.1 * image_side))
  return size if size % 2 else size + 1


def gaussian_blur(image: Array, sigma: Array | float, kernel_size: int
                  ) -> Array:
  """Separable Gaussian blur of one (H, W, C) image, zero 'SAME' padding.

  The same filter as dm_pix.gaussian_blur (normalised Gaussian taps over
  `kernel_size` pixels, zero padding), written as a sum of shifted copies:
  with a per-image sigma under vmap, dm-pix's depthwise convolution becomes a
  convolution with a batched kernel, which ran 10-30x slower on CPU (measured
  at 32x32 and 224x224). A test checks the two agree.
  """
  radius = kernel_size // 2
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-offsets**2 / (2.0 * jnp.asarray(sigma, jnp.float32)**2))
  taps = taps / jnp.sum(taps)
  height, width, _ = image.shape
  padded = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)))
  image = sum(taps[i] * padded[i:i + height] for i in range(2 * radius + 1))
  padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)))
  return sum(taps[i] * padded[:, i:i + width] for i in range(2 * radius + 1))


def _with_prob(uniform: Array, prob: float, fn, image: Array) -> Array:
  """`fn(image)` if `uniform` < `prob`; traced only when 0 < prob."""
  if prob <= 0:
    return image
  if prob >= 1:
    return fn(image)
  return jnp.where(uniform < prob, fn(image), image)


def _augment_one(key: Array, image: Array, view: ml_collections.ConfigDict
                 ) -> Array:
  """Augments one float image in [0, 1]; see the module docstring for order."""
  u = jax.random.uniform(key, (NUM_UNIFORMS,))
  image = _random_resized_crop(u, image, tuple(view.crop_scale),
                               tuple(view.crop_ratio), image.shape[:2])
  image = _with_prob(u[_U_FLIP], view.flip_prob, dm_pix.flip_left_right,
                     image)
  if max(view.brightness, view.contrast, view.saturation, view.hue) > 0:
    image = _with_prob(
        u[_U_JITTER_APPLY], view.jitter_prob,
        functools.partial(_color_jitter, u[_U_JITTER],
                          brightness=view.brightness, contrast=view.contrast,
                          saturation=view.saturation, hue=view.hue,
                          random_order=view.jitter_random_order),
        image)
  image = _with_prob(u[_U_GRAY], view.grayscale_prob, to_grayscale, image)
  sigma_low, sigma_high = view.blur_sigma
  image = _with_prob(
      u[_U_BLUR_APPLY], view.blur_prob,
      functools.partial(
          gaussian_blur,
          sigma=sigma_low + (sigma_high - sigma_low) * u[_U_BLUR_SIGMA],
          kernel_size=blur_kernel_size(max(image.shape[:2]))),
      image)
  image = _with_prob(
      u[_U_SOLARIZE], view.solarize_prob,
      functools.partial(dm_pix.solarize, threshold=view.solarize_threshold),
      image)
  return image


# ---------------------------------------------------------------------------
# Batch API.
# ---------------------------------------------------------------------------


def _check_images(images: Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected uint8 images of shape (N, H, W, 3), got shape '
                     f'{tuple(images.shape)}.')
  if images.dtype != jnp.uint8:
    raise ValueError(f'Expected uint8 images (0..255), got dtype '
                     f'{images.dtype}; the host pipeline feeds uint8.')


def _check_view(view: ml_collections.ConfigDict) -> None:
  missing = [f for f in VIEW_FIELDS if f not in view]
  if missing:
    raise ValueError(f'View config lacks fields {missing}; build it with '
                     f'augment.view_config() or augment.augment_preset().')
  for name in ('crop_scale', 'crop_ratio', 'blur_sigma'):
    low, high = view[name]
    if not 0 < low <= high:
      raise ValueError(f'{name}={tuple(view[name])} must be (min, max) with '
                       f'0 < min <= max.')
  for name in ('flip_prob', 'jitter_prob', 'grayscale_prob', 'blur_prob',
               'solarize_prob'):
    if not 0 <= view[name] <= 1:
      raise ValueError(f'{name}={view[name]} is not a probability in [0, 1].')
  for name in ('brightness', 'contrast', 'saturation', 'hue'):
    if view[name] < 0:
      raise ValueError(f'{name}={view[name]} must be >= 0.')
  if view.hue > 0.5:
    raise ValueError(f'hue={view.hue} must be <= 0.5 (hue is in turns).')


def normalize(images: Array, mean: Sequence[float],
              std: Sequence[float]) -> Array:
  """(images in [0, 1] - mean) / std, per channel, as float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def augment_view(rng: Array, images: Array,
                 view: ml_collections.ConfigDict) -> Array:
  """One augmented, normalised view of a batch, one PRNG key per image.

  Args:
    rng: PRNG key; split into one key per image.
    images: (N, H, W, 3) uint8 images.
    view: a view config (see module docstring), with mean and std.

  Returns:
    (N, H, W, 3) float32, normalised with the view's mean/std.
  """
  _check_images(images)
  _check_view(view)
  keys = jax.random.split(rng, images.shape[0])
  floats = images.astype(jnp.float32) / 255.0
  out = jax.vmap(functools.partial(_augment_one, view=view))(keys, floats)
  return normalize(out, view.mean, view.std)


def two_views(rng: Array, images: Array,
              augment_config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  """The two contrastive views of a batch, each with its own view config.

  Args:
    rng: PRNG key; the views get independent keys.
    images: (N, H, W, 3) uint8 images.
    augment_config: block with `view1` and `view2` (see `augment_preset`).

  Returns:
    (view1, view2), each (N, H, W, 3) float32, normalised.
  """
  key1, key2 = jax.random.split(rng)
  return (augment_view(key1, images, augment_config.view1),
          augment_view(key2, images, augment_config.view2))


def preprocess_eval(images: Array,
                    augment_config: ml_collections.ConfigDict) -> Array:
  """Evaluation preprocessing: no augmentation, only normalisation.

  Args:
    images: (N, H, W, 3) uint8 images, already at the training resolution (the
      host pipeline resizes ImageNet images).
    augment_config: block with `mean` and `std`.

  Returns:
    (N, H, W, 3) float32, normalised.
  """
  _check_images(images)
  return normalize(images.astype(jnp.float32) / 255.0, augment_config.mean,
                   augment_config.std)


def denormalize(images: Array, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
  """Inverse of `normalize`, to [0, 1] floats (for plots and tests)."""
  return np.asarray(images) * np.asarray(std) + np.asarray(mean)
