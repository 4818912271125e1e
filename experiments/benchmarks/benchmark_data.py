r"""Throughput of the data path on the CPU: augmentation and host pipeline.

  PYTHONPATH=. .venv/bin/python -m experiments.benchmarks.benchmark_data

Reports, in images/s:
  * on-device augmentation (`augment.two_views`, jitted) of a batch of 256
    uint8 32x32 images into two views, for the SimCLR-CIFAR, BYOL and
    BYOL-CIFAR presets: median of --repeats timed runs after one compile run;
  * the host pipeline: uint8 training batches of 256 from the npz source on
    the real CIFAR-10 subset in ../shared/data (synthetic `fake` data of the
    same size when absent), plain and through `prefetch`, and the padded eval
    batches over the test split.

A CDG training step on this CPU consumes roughly 50-300 images/s; the host
pipeline should deliver at least 5x that. The numbers go to stdout; nothing is
timed inside the test suite.
"""

import os
import pathlib
import statistics
import time

# The benchmark is about the CPU; set before JAX initialises.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from cdg_jax.data import augment
from cdg_jax.data import batching
from cdg_jax.data import input_pipeline
from cdg_jax.run import config_lib
from experiments.common import repo

REPO_ROOT = pathlib.Path(repo.REPO_ROOT)

_BATCH = flags.DEFINE_integer('batch_size', 256, 'Images per batch.')
_SIZE = flags.DEFINE_integer('image_size', 32, 'Image side, pixels.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed augmentation runs.')
_HOST_STEPS = flags.DEFINE_integer('host_steps', 2000,
                                   'Host batches timed (crosses epochs).')
_PRESETS = flags.DEFINE_list('presets', ['simclr_cifar', 'byol', 'byol_cifar'],
                             'Augmentation presets to time.')
_NPZ = flags.DEFINE_string(
    'npz', str(REPO_ROOT.parent / 'shared' / 'data' / 'cifar10.npz'),
    'Real data for the host pipeline; fake data of the same size if absent.')
# Upper end of the expected CPU training-step throughput (images/s).
STEP_IMAGES_PER_S = 300


def benchmark_augmentation(preset: str, images: jax.Array) -> tuple[float,
                                                                    float]:
  """(compile seconds, median images/s) of jitted two_views on `images`."""
  config = augment.augment_preset(preset, images.shape[1])
  two_views = jax.jit(lambda key, x: augment.two_views(key, x, config))
  start = time.perf_counter()
  jax.block_until_ready(two_views(jax.random.key(0), images))
  compile_s = time.perf_counter() - start
  times = []
  for i in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(two_views(jax.random.key(i + 1), images))
    times.append(time.perf_counter() - start)
  return compile_s, images.shape[0] / statistics.median(times)


def host_source() -> tuple[input_pipeline.Source, str]:
  data = config_lib.base_config().data
  data.image_size = _SIZE.value
  if os.path.exists(_NPZ.value):
    data.source, data.npz_path = 'npz', _NPZ.value
    description = f'npz {_NPZ.value}'
  else:
    data.source = 'fake'
    data.fake_num_train, data.fake_num_test = 25_000, 10_000
    description = f'fake (no {_NPZ.value})'
  return input_pipeline.create_source(data), description


def images_per_second(iterator, steps: int) -> float:
  next(iterator)  # Warm up (first permutation, thread start).
  start = time.perf_counter()
  images = 0
  for _ in range(steps):
    images += len(next(iterator)['label'])
  return images / (time.perf_counter() - start)


def main(argv):
  del argv
  batch, size = _BATCH.value, _SIZE.value
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform} '
        f'({os.cpu_count()} CPU cores); batch {batch} x {size}x{size}x3 uint8')

  images = jax.numpy.asarray(np.random.default_rng(0).integers(
      0, 256, (batch, size, size, 3), dtype=np.uint8))
  print('\nOn-device augmentation, two views per image (median of '
        f'{_REPEATS.value} runs after compile):')
  for preset in _PRESETS.value:
    compile_s, rate = benchmark_augmentation(preset, images)
    print(f'  {preset:14s} {rate:9,.0f} images/s   (compile {compile_s:.1f} s)')

  source, description = host_source()
  steps = _HOST_STEPS.value
  print(f'\nHost pipeline, uint8 batches of {batch} from {description} '
        f'({source.num_train} train images, {steps} batches):')
  plain = images_per_second(source.train_batches(batch, seed=0), steps)
  prefetched_iterator = batching.prefetch(
      source.train_batches(batch, seed=0), size=2)
  prefetched = images_per_second(prefetched_iterator, steps)
  prefetched_iterator.close()
  eval_iterator = source.eval_batches('test', batch)
  evaluation = images_per_second(
      eval_iterator, source.num_eval_batches('test', batch) - 1)
  print(f'  train_batches            {plain:12,.0f} images/s')
  print(f'  prefetch(train_batches)  {prefetched:12,.0f} images/s')
  print(f'  eval_batches (test)      {evaluation:12,.0f} images/s')
  print(f'  = {min(plain, prefetched) / STEP_IMAGES_PER_S:,.0f}x a training '
        f'step at {STEP_IMAGES_PER_S} images/s (needed: >= 5x)')


if __name__ == '__main__':
  app.run(main)
