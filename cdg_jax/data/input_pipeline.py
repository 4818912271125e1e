"""Host input pipeline: uint8 image batches of fixed shape, per process.

The host only reads, shuffles and batches; SSL augmentation runs on device
(`cdg_jax.data.augment`). Sources, chosen by `config.data.source`:

  tfds  `cifar10`, `cifar100` (held in memory), `imagenet100` (the 100-class
        ImageNet subset of the contrastive multiview coding (CMC) work, class
        list in `imagenet100_classes.txt`) and `imagenet2012` (streamed with
        tf.data), read from `data.data_dir`; nothing is downloaded.
  npz   a local `.npz` with x_train, y_train, x_test, y_test (uint8 NHWC
        images, integer labels): how users bring their own data.
  fake  synthetic class-dependent images, for smoke runs and benchmarks.

Every source gives:

  source.train_batches(global_batch_size, seed, start_step=0)
      infinite iterator of {'image': uint8 (B, H, W, 3), 'label': int32 (B,)}
      with B = global_batch_size // jax.process_count(). Epoch `e` visits the
      training set in an order that depends only on (seed, e); the last
      partial batch of each epoch is dropped so shapes never change. Step `s`
      is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`, so a
      resumed run passes `start_step` and continues the same sequence.
  source.eval_batches(split, batch_size)
      the whole 'train' or 'test' split in order, once, as {'image', 'label',
      'mask'} with fixed shape: the last batch is padded and `mask` (float32)
      is 0 on padding, so every example is counted exactly once.
  source.eval_split_name
      what the 'test' split really is: 'test', or 'validation' when
      `data.validation_size` > 0 holds out a class-balanced part of the
      training set (`holdout_validation`); training then reads the rest.
      Choices (defaults, hyperparameters) are made on 'validation'; the test
      set only gives final numbers.

Multi-host: every process builds the same global batch and keeps rows
[p * B, (p + 1) * B) of it (p = jax.process_index());
`batching.shard_batch` assembles the process-local rows into one global
jax.Array sharded over the mesh's `data` axis. In-memory sources hold the
whole (small) dataset in each process and gather their rows; the ImageNet
stream reads one shard of the files per process for training and decodes
only its own rows for evaluation. Placement on devices and prefetching are
`cdg_jax.data.batching`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
import dataclasses
import io
import math
import os
import zipfile
import zlib

from absl import logging
import jax
import ml_collections
import numpy as np

from cdg_jax.run import storage

Batch = dict[str, np.ndarray]

SOURCES = ('tfds', 'npz', 'fake')
NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
SPLITS = ('train', 'test')
IMAGENET100_CLASS_FILE = os.path.join(os.path.dirname(__file__),
                                      'imagenet100_classes.txt')
# Seed of the synthetic images (the training seed only shuffles them).
FAKE_DATA_SEED = 1234
# Seed of the held-out validation rows: fixed, not the training seed, so that
# runs at every seed are selected on the same validation images.
VALIDATION_SEED = 0x76616C


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """How a `data.dataset` name maps onto a TFDS builder."""
  tfds_name: str
  num_classes: int
  test_split: str            # The split `eval_batches('test')` reads.
  in_memory: bool            # Small enough to decode once into numpy.
  class_file: str | None = None  # Subset of the builder's classes, in order.
  # Split sizes where TFDS cannot report them (class subsets; ILSVRC-2012 also
  # listed so that mocked builders, whose `info.splits` is empty, work).
  num_train: int | None = None
  num_test: int | None = None
  manual_download: bool = False


TFDS_DATASETS = {
    'cifar10': TfdsDataset('cifar10', 10, 'test', in_memory=True),
    'cifar100': TfdsDataset('cifar100', 100, 'test', in_memory=True),
    # CMC's ImageNet-100: 1300 (fewer for some classes) train and 50 val images
    # per class of ILSVRC-2012.
    'imagenet100': TfdsDataset('imagenet2012', 100, 'validation',
                               in_memory=False,
                               class_file=IMAGENET100_CLASS_FILE,
                               num_train=126_689, num_test=5_000,
                               manual_download=True),
    'imagenet2012': TfdsDataset('imagenet2012', 1000, 'validation',
                                in_memory=False, num_train=1_281_167,
                                num_test=50_000, manual_download=True),
}


# ---------------------------------------------------------------------------
# Helpers shared by the sources.
# ---------------------------------------------------------------------------


def _process_info(process_index: int | None,
                  process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process; arguments override JAX's (for tests)."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} is outside [0, {count}).')
  return index, count


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'Batch size {batch_size} must be a positive multiple of '
                     f'the number of processes ({process_count}).')
  return batch_size // process_count


def _epoch_seed(seed: int, epoch: int, *extra: int) -> int:
  """A 32-bit seed that depends only on (seed, epoch, *extra)."""
  if seed < 0:
    raise ValueError(f'The data seed must be >= 0, got {seed}.')
  return int(np.random.SeedSequence([seed, epoch, *extra]).generate_state(1)[0])


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order in which epoch `epoch` visits `num_examples` examples."""
  return np.random.default_rng(_epoch_seed(seed, epoch)).permutation(
      num_examples)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def check_images(images: np.ndarray, name: str) -> None:
  """Raises ValueError unless `images` is uint8 (N, H, W, 3) with N > 0."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{name} must be uint8 images of shape (N, H, W, 3) (HWC '
                     f'RGB), got shape {images.shape}.')
  if images.shape[0] == 0:
    raise ValueError(f'{name} holds no images (shape {images.shape}): '
                     f'training needs training images, and evaluation (kNN, '
                     f'FLOPs, linear) needs test images.')
  if images.dtype != np.uint8:
    raise ValueError(f'{name} must be uint8 (0..255), got dtype '
                     f'{images.dtype}.')


def check_labels(labels: np.ndarray, num_images: int, num_classes: int,
                 name: str) -> np.ndarray:
  """Validates integer labels in [0, num_classes); returns them as int32."""
  if labels.ndim != 1 or labels.shape[0] != num_images:
    raise ValueError(f'{name} must have shape ({num_images},) to match the '
                     f'images, got {labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must be integer class ids, got dtype '
                     f'{labels.dtype}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f'{name} has labels in [{labels.min()}, {labels.max()}] but '
        f'data.num_classes={num_classes}; labels must be in [0, num_classes).')
  return labels.astype(np.int32)


def resize_images(images: np.ndarray, size: int,
                  chunk: int = 1024) -> np.ndarray:
  """Resizes uint8 NHWC images: shorter side to `size`, then centre square.

  Used once at load time when stored images differ from `data.image_size`.
  Runs on the CPU device so that it never occupies an accelerator.
  """
  height, width = images.shape[1:3]
  if (height, width) == (size, size):
    return images
  scale = size / min(height, width)
  new_h = max(size, round(height * scale))
  new_w = max(size, round(width * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2

  @jax.jit
  def resize(x):
    x = jax.image.resize(x.astype(np.float32), (x.shape[0], new_h, new_w, 3),
                         method='bilinear', antialias=True)
    x = x[:, top:top + size, left:left + size]
    return jax.numpy.clip(jax.numpy.round(x), 0, 255).astype(np.uint8)

  logging.info('Resizing %d images from %dx%d to %dx%d.', len(images), height,
               width, size, size)
  with jax.default_device(jax.devices('cpu')[0]):
    return np.concatenate([np.asarray(resize(images[i:i + chunk]))
                           for i in range(0, len(images), chunk)])


# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------


def config_problems(data_config) -> list[str]:
  """Every out-of-range value of a `data` block, each naming its field."""
  checks = [
      (data_config.source in SOURCES, f'data.source={data_config.source!r} '
       f'must be one of {SOURCES}.'),
      (data_config.image_size > 0,
       f'data.image_size={data_config.image_size} must be positive.'),
      (data_config.num_classes >= 2,
       f'data.num_classes={data_config.num_classes} must be at least 2.'),
      (data_config.validation_size >= 0, f'data.validation_size='
       f'{data_config.validation_size} must be >= 0 (0: no validation '
       f'split).'),
      (data_config.prefetch >= 0,
       f'data.prefetch={data_config.prefetch} must be >= 0.'),
  ]
  return [message for ok, message in checks if not ok]


def steps_per_epoch(num_train: int, batch_size: int,
                    validation_size: int = 0) -> int:
  """Full training batches per epoch (the partial last one is dropped).

  Raises:
    ValueError: the batch is larger than the training set, naming the
      validation holdout when one shrank it.
  """
  if batch_size > num_train:
    where = (f' left after holding out data.validation_size={validation_size} '
             f'for validation' if validation_size else '')
    raise ValueError(f'batch_size={batch_size} exceeds the {num_train} '
                     f'training images{where}; lower the batch size.')
  return num_train // batch_size


@dataclasses.dataclass(frozen=True)
class _TrainPlan:
  """What a source's training iterator needs, checked by `train_batches`."""
  global_batch_size: int
  local: int            # this process's rows of each global batch
  index: int            # this process's index ...
  count: int            # ... among this many
  seed: int
  steps_per_epoch: int


class Source(abc.ABC):
  """A dataset the training loop reads from; see the module docstring."""

  num_train: int
  num_test: int
  num_classes: int
  image_shape: tuple[int, int, int]
  # 'test', or 'validation' when the 'test' split is held out of training.
  eval_split_name: str = 'test'

  def steps_per_epoch(self, global_batch_size: int) -> int:
    """Full training batches per epoch (the partial last one is dropped)."""
    return steps_per_epoch(self.num_train, global_batch_size)

  def num_examples(self, split: str) -> int:
    _check_split(split)
    return self.num_train if split == 'train' else self.num_test

  def num_eval_batches(self, split: str, batch_size: int) -> int:
    """Batches `eval_batches(split, batch_size)` yields (the last padded)."""
    return math.ceil(self.num_examples(split) / batch_size)

  def train_batches(self, global_batch_size: int, seed: int,
                    start_step: int = 0, *, process_index: int | None = None,
                    process_count: int | None = None) -> Iterator[Batch]:
    """Infinite iterator of this process's training batches.

    Args:
      global_batch_size: batch size summed over processes.
      seed: data seed; epoch e is shuffled from (seed, e).
      start_step: index of the first batch, to resume a run exactly.
      process_index, process_count: override jax.process_index()/count().

    Yields:
      {'image': uint8 (B, H, W, 3), 'label': int32 (B,)},
      B = global_batch_size // process_count.
    """
    index, count = _process_info(process_index, process_count)
    local = _local_batch_size(global_batch_size, count)
    steps_per_epoch = self.steps_per_epoch(global_batch_size)
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}.')
    _epoch_seed(seed, 0)  # Validates the seed now rather than at first next().
    return self._train_iterator(_TrainPlan(
        global_batch_size, local, index, count, seed, steps_per_epoch),
                                start_step)

  @abc.abstractmethod
  def _train_iterator(self, plan: '_TrainPlan', step: int) -> Iterator[Batch]:
    """The batches of `train_batches` from `step` on (arguments checked)."""

  def eval_batches(self, split: str, batch_size: int, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[Batch]:
    """This process's rows of every global batch of a split, in order, once.

    Args:
      split: 'train' or 'test'.
      batch_size: global batch size (summed over processes).
      process_index, process_count: override jax.process_index()/count().

    Yields:
      {'image': uint8 (B, H, W, 3), 'label': int32 (B,), 'mask': float32 (B,)}
      with B = batch_size // process_count; mask is 1 for real examples, 0 for
      the padding of the last global batch.
    """
    _check_split(split)
    index, count = _process_info(process_index, process_count)
    local = _local_batch_size(batch_size, count)
    return self._eval_iterator(split, batch_size, local, index * local)

  @abc.abstractmethod
  def _eval_iterator(self, split: str, batch_size: int, local: int,
                     offset: int) -> Iterator[Batch]:
    """The batches of `eval_batches` (arguments checked): `local` rows of
    each global batch of `batch_size`, from row `offset` of it on."""


class ArraySource(Source):
  """A dataset held in memory as numpy arrays (npz, fake, TFDS CIFAR).

  Batches are gathered with one numpy fancy-indexing call each, so the host
  pipeline costs far less than a training step.
  """

  def __init__(self, x_train: np.ndarray, y_train: np.ndarray,
               x_test: np.ndarray, y_test: np.ndarray, num_classes: int,
               name: str = 'arrays', eval_split_name: str = 'test'):
    """Validates and stores the arrays.

    Args:
      x_train, x_test: uint8 (N, H, W, 3) images, same H and W.
      y_train, y_test: integer labels in [0, num_classes), shape (N,).
      num_classes: number of classes.
      name: shown in error messages (e.g. the npz path).
      eval_split_name: what x_test is ('test' or 'validation'), for reports.
    """
    self.eval_split_name = eval_split_name
    check_images(x_train, f'{name}: x_train')
    check_images(x_test, f'{name}: x_test')
    if x_train.shape[1:] != x_test.shape[1:]:
      raise ValueError(f'{name}: x_train images are {x_train.shape[1:]} but '
                       f'x_test images are {x_test.shape[1:]}.')
    self._images = {'train': np.ascontiguousarray(x_train),
                    'test': np.ascontiguousarray(x_test)}
    self._labels = {
        'train': check_labels(np.asarray(y_train), len(x_train), num_classes,
                              f'{name}: y_train'),
        'test': check_labels(np.asarray(y_test), len(x_test), num_classes,
                             f'{name}: y_test')}
    self.name = name
    self.num_train = len(x_train)
    self.num_test = len(x_test)
    self.num_classes = num_classes
    self.image_shape = tuple(x_train.shape[1:])

  def _train_iterator(self, plan, step):
    images, labels = self._images['train'], self._labels['train']
    offset = plan.index * plan.local
    epoch, order = None, None
    while True:
      step_epoch, batch_index = divmod(step, plan.steps_per_epoch)
      if step_epoch != epoch:
        epoch = step_epoch
        order = epoch_permutation(plan.seed, epoch, self.num_train)
      start = batch_index * plan.global_batch_size + offset
      rows = order[start:start + plan.local]
      yield {'image': images[rows], 'label': labels[rows]}
      step += 1

  def _eval_iterator(self, split, batch_size, local, offset):
    images, labels = self._images[split], self._labels[split]
    total = len(images)
    for batch_start in range(0, total, batch_size):
      start = min(batch_start + offset, total)
      stop = min(start + local, total)
      real = stop - start
      batch = {
          'image': np.zeros((local, *self.image_shape), np.uint8),
          'label': np.zeros((local,), np.int32),
          'mask': np.zeros((local,), np.float32),
      }
      batch['image'][:real] = images[start:stop]
      batch['label'][:real] = labels[start:stop]
      batch['mask'][:real] = 1.0
      yield batch


def fake_arrays(num_examples: int, image_size: int, num_classes: int,
                seed: int, class_seed: int = FAKE_DATA_SEED
                ) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic images whose colour and coarse pattern depend on the class.

  Each class has a mean colour and a 4x4 pattern of offsets upsampled to the
  image; each image adds Gaussian noise (std 24). Labels are balanced and in
  random order. Learnable enough that a smoke run's kNN beats chance.

  The class colours and patterns come from `class_seed`, labels and noise from
  `seed`: train and test splits share classes (different `seed`, same
  `class_seed`), so a model that learns on one can be evaluated on the other.

  Returns:
    images uint8 (num_examples, image_size, image_size, 3), labels int32.
  """
  class_rng = np.random.default_rng(class_seed)
  colours = class_rng.uniform(48, 208, (num_classes, 1, 1, 3)).astype(
      np.float32)
  patterns = class_rng.uniform(-40, 40, (num_classes, 4, 4, 3)).astype(
      np.float32)
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_examples) % num_classes).astype(
      np.int32)
  cells = -(-image_size // 4)  # Pattern cells are ceil(size / 4) pixels.
  patterns = patterns.repeat(cells, axis=1).repeat(cells, axis=2)
  patterns = patterns[:, :image_size, :image_size] + colours
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  # Chunks of at most 64 MiB of float32 temporaries (the noise and the
  # class patterns), whatever the image size.
  chunk = max(1, 2**24 // (image_size * image_size * 3))
  for start in range(0, num_examples, chunk):
    stop = min(start + chunk, num_examples)
    noise = rng.standard_normal((stop - start, image_size, image_size, 3),
                                dtype=np.float32) * 24
    images[start:stop] = np.clip(patterns[labels[start:stop]] + noise, 0, 255)
  return images, labels


def holdout_validation(labels: np.ndarray, size: int, num_classes: int,
                       seed: int = VALIDATION_SEED
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic, class-balanced validation rows of a training set.

  Each class gives `size // num_classes` rows (the first `size % num_classes`
  classes one more), drawn at random with a generator seeded by `seed` alone.

  Args:
    labels: (N,) integer training labels.
    size: validation examples to hold out, 0 < size < N.
    num_classes: number of classes.
    seed: the draw's seed (the default is fixed, so every run holds out the
      same images).

  Returns:
    (train_rows, validation_rows): sorted row indices, disjoint, covering all
    N rows.

  Raises:
    ValueError: naming `data.validation_size` if it is out of range or a class
      has too few examples.
  """
  labels = np.asarray(labels)
  if not 0 < size < len(labels):
    raise ValueError(f'data.validation_size={size} must be between 1 and '
                     f'{len(labels) - 1} (the training set has {len(labels)} '
                     f'examples); 0 turns the validation split off.')
  rng = np.random.default_rng(seed)
  per_class = [size // num_classes + (c < size % num_classes)
               for c in range(num_classes)]
  chosen = []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    if per_class[c] >= len(rows):
      raise ValueError(
          f'data.validation_size={size} takes {per_class[c]} examples of '
          f'class {c}, which has only {len(rows)} training examples; lower '
          f'it.')
    chosen.append(rng.choice(rows, per_class[c], replace=False))
  validation = np.sort(np.concatenate(chosen))
  train = np.setdiff1d(np.arange(len(labels)), validation)
  return train, validation


def with_validation_split(source: 'ArraySource', size: int) -> 'ArraySource':
  """The source with `size` training examples held out as its 'test' split.

  Training reads the other examples; `eval_split_name` becomes 'validation'.
  """
  images, labels = source._images['train'], source._labels['train']  # pylint: disable=protected-access
  train, validation = holdout_validation(labels, size, source.num_classes)
  return ArraySource(images[train], labels[train], images[validation],
                     labels[validation], source.num_classes,
                     name=f'{source.name} (validation split)',
                     eval_split_name='validation')


def _fake_source(data_config: ml_collections.ConfigDict) -> ArraySource:
  size = data_config.image_size
  num_classes = data_config.num_classes
  for field in ('fake_num_train', 'fake_num_test'):
    if data_config[field] <= 0:
      raise ValueError(f'data.{field} must be positive, got '
                       f'{data_config[field]}.')
  x_train, y_train = fake_arrays(data_config.fake_num_train, size, num_classes,
                                 FAKE_DATA_SEED)
  x_test, y_test = fake_arrays(data_config.fake_num_test, size, num_classes,
                               FAKE_DATA_SEED + 1)
  return ArraySource(x_train, y_train, x_test, y_test, num_classes, 'fake')


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads x_train, y_train, x_test, y_test from a `.npz` file (no pickle).

  Raises:
    FileNotFoundError / ValueError naming the path: missing file, a file
    that is not an npz (zip) archive, a truncated archive, missing keys.
  """
  if not path:
    raise ValueError('data.source="npz" needs data.npz_path, the path of a '
                     f'.npz file with keys {NPZ_KEYS}; it is empty.')
  path = os.path.expanduser(path)
  storage.check_reachable(path, ' (data.npz_path)')
  if not storage.path(path).is_file():
    raise FileNotFoundError(f'data.npz_path={path!r}: no such file. It must be '
                            f'a .npz with keys {NPZ_KEYS}.')
  # From an object store the archive is read whole, once: np.load's seeks
  # would each be a request.
  if storage.is_remote(path):
    source = io.BytesIO(storage.read_bytes(path))
    magic = source.getvalue()[:4]
  else:
    source = path
    with open(path, 'rb') as f:
      magic = f.read(4)
  if magic != b'PK\x03\x04':
    raise ValueError(
        f'data.npz_path={path!r} is not an .npz archive (a zip file written '
        f'by numpy.savez; its first bytes are {magic!r}). Write your arrays '
        f'with numpy.savez(path, x_train=..., y_train=..., x_test=..., '
        f'y_test=...).')
  try:
    with np.load(source, allow_pickle=False) as npz:
      missing = [key for key in NPZ_KEYS if key not in npz.files]
      if missing:
        raise ValueError(f'{path} lacks keys {missing}; it has {npz.files} '
                         f'and needs {NPZ_KEYS} (uint8 NHWC images, integer '
                         f'labels).')
      return {key: npz[key] for key in NPZ_KEYS}
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise ValueError(
        f'data.npz_path={path!r} cannot be read: the archive is damaged or '
        f'truncated ({type(e).__name__}: {e}). Copy or write it again.'
        ) from e


def _npz_source(data_config: ml_collections.ConfigDict) -> ArraySource:
  arrays = load_npz(data_config.npz_path)
  for key in ('x_train', 'x_test'):
    check_images(arrays[key], f'{data_config.npz_path}: {key}')
    arrays[key] = resize_images(arrays[key], data_config.image_size)
  return ArraySource(**arrays, num_classes=data_config.num_classes,
                     name=data_config.npz_path)


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------


def _import_tfds():
  """Imports tensorflow_datasets with TensorFlow kept off the accelerators."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'data.source="tfds" reads datasets with TensorFlow Datasets, which '
        f'needs TensorFlow ({e}). Install them with `pip install '
        f'tensorflow-cpu tensorflow-datasets` (the CPU build is enough: JAX '
        f'keeps the accelerators), or use data.source="npz" (your arrays '
        f'in a .npz) or "fake", which need no TensorFlow.') from e
  try:
    # JAX owns the accelerators; TF only decodes on the CPU.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialised; nothing to hide then.
    pass
  return tf, tfds


def _prepare_instructions(dataset: str, spec: TfdsDataset,
                          data_dir: str) -> str:
  data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  if spec.manual_download:
    return (
        f'{spec.tfds_name} needs the manual ImageNet download: register at '
        'https://image-net.org/download-images, put ILSVRC2012_img_train.tar '
        'and ILSVRC2012_img_val.tar in a folder MANUAL_DIR, then run\n'
        f'  tfds build {spec.tfds_name}{data_dir_flag} '
        '--manual_dir=MANUAL_DIR\n'
        '(or tfds.builder("imagenet2012", data_dir=...).download_and_prepare('
        'download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))).'
        + (' data.dataset="imagenet100" then reads its 100 classes from it.'
           if dataset == 'imagenet100' else ''))
  return (f'Prepare it on a machine with internet access:\n'
          f'  tfds build {spec.tfds_name}{data_dir_flag}\n'
          'and copy the data dir here, or use data.source="npz".')


def _as_dataset(builder, dataset: str, spec: TfdsDataset, data_dir: str,
                **kwargs):
  """builder.as_dataset, with a ValueError saying how to prepare the data."""
  try:
    return builder.as_dataset(**kwargs)
  except AssertionError as e:
    # TFDS signals a dataset that was never built with this AssertionError.
    if 'could not find data' not in str(e):
      raise
    where = data_dir or '~/tensorflow_datasets (the default)'
    raise ValueError(
        f'TFDS dataset {spec.tfds_name!r} (data.dataset={dataset!r}) is not '
        f'prepared in data_dir={where!r}. '
        f'{_prepare_instructions(dataset, spec, data_dir)}') from e


def _label_table(builder, spec: TfdsDataset) -> np.ndarray:
  """Maps the builder's label ids to ours; -1 for classes left out."""
  names = list(builder.info.features['label'].names)
  if spec.class_file is None:
    return np.arange(len(names), dtype=np.int64)
  with open(spec.class_file) as f:
    wanted = [line.strip() for line in f if line.strip()]
  if len(wanted) != spec.num_classes or len(set(wanted)) != len(wanted):
    raise ValueError(f'{spec.class_file} must list {spec.num_classes} unique '
                     f'class ids, found {len(wanted)} ({len(set(wanted))} '
                     f'unique).')
  index = {name: i for i, name in enumerate(names)}
  unknown = [w for w in wanted if w not in index]
  if unknown:
    raise ValueError(f'{spec.class_file} lists classes that {spec.tfds_name} '
                     f'does not have: {unknown[:5]}.')
  table = np.full(len(names), -1, np.int64)
  table[[index[w] for w in wanted]] = np.arange(len(wanted))
  return table


def _tfds_in_memory(data_config: ml_collections.ConfigDict,
                    spec: TfdsDataset) -> ArraySource:
  """Decodes a small TFDS dataset (CIFAR) once into numpy arrays."""
  _, tfds = _import_tfds()
  builder = tfds.builder(spec.tfds_name, data_dir=data_config.data_dir or None)
  arrays = {}
  for split, tfds_split in (('train', 'train'), ('test', spec.test_split)):
    ds = _as_dataset(builder, data_config.dataset, spec, data_config.data_dir,
                     split=tfds_split, shuffle_files=False, as_supervised=True)
    # Chunks rather than batch_size=-1, which aborts under tfds mock_data.
    chunks = list(tfds.as_numpy(ds.batch(8192)))
    images = np.concatenate([image for image, _ in chunks])
    check_images(images, f'{spec.tfds_name} {tfds_split} images')
    arrays[f'x_{split}'] = resize_images(images, data_config.image_size)
    arrays[f'y_{split}'] = np.concatenate([label for _, label in chunks])
  return ArraySource(**arrays, num_classes=spec.num_classes,
                     name=f'tfds:{spec.tfds_name}')


class TfdsStreamSource(Source):
  """ImageNet through tf.data: JPEGs decoded and resized on the fly.

  Images are resized (shorter side to `data.image_size`, bilinear with
  antialiasing) and centre-cropped to a square, for training and evaluation
  alike; the random resized crop then happens on device.

  Training: each process reads its own 1/process_count of the files
  (`tfds.even_splits`), keeps the selected classes, shuffles with a buffer of
  `data.shuffle_buffer` from (seed, epoch, process), and yields exactly
  `steps_per_epoch` batches per epoch (a shard that runs short wraps around),
  so every process takes the same steps and `start_step` resumes the same
  sequence without decoding the skipped images.
  Evaluation: every process reads the split in order, forms the same global
  batches of still-encoded images, and decodes only its own rows.
  """

  def __init__(self, data_config: ml_collections.ConfigDict,
               spec: TfdsDataset):
    self._tf, self._tfds = _import_tfds()
    self._spec = spec
    self._dataset = data_config.dataset
    self._data_dir = data_config.data_dir
    self._shuffle_buffer = data_config.get('shuffle_buffer', 10_000)
    self._builder = self._tfds.builder(spec.tfds_name,
                                       data_dir=self._data_dir or None)
    self._table = self._tf.constant(_label_table(self._builder, spec))
    # Fails early, with instructions, if the data is not prepared.
    self._read('train', shuffle_files=False)
    size = data_config.image_size
    self.image_shape = (size, size, 3)
    self.num_classes = spec.num_classes
    self.num_train = spec.num_train
    self.num_test = spec.num_test

  def _read(self, split: str, **kwargs):
    """The selected classes of a TFDS split, images still encoded."""
    tf = self._tf
    ds = _as_dataset(self._builder, self._dataset, self._spec, self._data_dir,
                     split=split, as_supervised=True,
                     decoders={'image': self._tfds.decode.SkipDecoding()},
                     **kwargs)
    table = self._table
    ds = ds.map(lambda image, label: (image, tf.gather(table, label)))
    return ds.filter(lambda image, label: label >= 0)

  def _decode(self, encoded):
    """Encoded image -> uint8 (S, S, 3): shorter side to S, centre crop."""
    tf = self._tf
    size = self.image_shape[0]
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.maximum(
        tf.cast(tf.round(shape * size / tf.reduce_min(shape)), tf.int32), size)
    image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.ensure_shape(image, self.image_shape)

  def _train_epoch(self, epoch, skip_steps, local, seed, steps_per_epoch,
                   index, count):
    tf, tfds = self._tf, self._tfds
    epoch_seed = _epoch_seed(seed, epoch, index)
    split = tfds.even_splits('train', n=count)[index] if count > 1 else 'train'
    ds = self._read(split, shuffle_files=True,
                    read_config=tfds.ReadConfig(shuffle_seed=epoch_seed))
    ds = ds.shuffle(self._shuffle_buffer, seed=epoch_seed)
    # Same number of batches on every process; skip before decoding.
    ds = ds.repeat().take(steps_per_epoch * local).skip(skip_steps * local)
    ds = ds.map(lambda image, label: (self._decode(image), label),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def _train_iterator(self, plan, step):
    epoch, skip_steps = divmod(step, plan.steps_per_epoch)
    while True:
      ds = self._train_epoch(epoch, skip_steps, plan.local, plan.seed,
                             plan.steps_per_epoch, plan.index, plan.count)
      for image, label in ds.as_numpy_iterator():
        yield {'image': image, 'label': label.astype(np.int32)}
      epoch, skip_steps = epoch + 1, 0

  def _eval_iterator(self, split, batch_size, local, offset):
    tf = self._tf
    tfds_split = 'train' if split == 'train' else self._spec.test_split
    ds = self._read(tfds_split, shuffle_files=False).batch(batch_size)

    def own_rows(encoded, label):
      # This process's rows of the global batch, padded to `local` rows.
      encoded = encoded[offset:offset + local]
      label = label[offset:offset + local]
      real = tf.shape(encoded)[0]
      pad = local - real
      return (tf.concat([encoded, tf.fill([pad], '')], 0),
              tf.concat([tf.cast(label, tf.int32), tf.zeros([pad], tf.int32)],
                        0),
              tf.concat([tf.ones([real]), tf.zeros([pad])], 0))

    def decode_or_zeros(encoded, label, mask):
      image = tf.cond(mask > 0, lambda: self._decode(encoded),
                      lambda: tf.zeros(self.image_shape, tf.uint8))
      return {'image': image, 'label': label, 'mask': mask}

    ds = ds.map(own_rows).unbatch()
    ds = ds.map(decode_or_zeros, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
    return iter(ds.as_numpy_iterator())


def _tfds_source(data_config: ml_collections.ConfigDict) -> Source:
  dataset = data_config.dataset
  if dataset not in TFDS_DATASETS:
    raise ValueError(f'Unknown TFDS dataset data.dataset={dataset!r}; '
                     f'expected one of {tuple(TFDS_DATASETS)}.')
  spec = TFDS_DATASETS[dataset]
  if data_config.num_classes != spec.num_classes:
    raise ValueError(f'data.num_classes={data_config.num_classes} but '
                     f'{dataset} has {spec.num_classes} classes.')
  # TFDS reads a gs:// data_dir itself (its metadata through etils.epath,
  # here gcsfs; the record files through TensorFlow's own GCS client). A
  # missing bucket would read as a dataset not prepared there: named first.
  storage.check_reachable(data_config.data_dir, ' (data.data_dir)')
  if spec.in_memory:
    return _tfds_in_memory(data_config, spec)
  return TfdsStreamSource(data_config, spec)


def create_source(data_config: ml_collections.ConfigDict) -> Source:
  """Builds the source `data_config.source` names.

  Args:
    data_config: the `config.data` block: source ('tfds' | 'npz' | 'fake'),
      dataset, data_dir, npz_path, image_size, num_classes, fake_num_train,
      fake_num_test, shuffle_buffer.

  Returns:
    A Source; see the module docstring.

  Raises:
    ValueError (FileNotFoundError for a missing npz) naming the bad value.
  """
  source = data_config.source
  if data_config.image_size <= 0:
    raise ValueError(f'data.image_size must be positive, got '
                     f'{data_config.image_size}.')
  validation_size = int(data_config.get('validation_size', 0))
  if validation_size < 0:
    raise ValueError(f'data.validation_size must be >= 0 (0: no validation '
                     f'split), got {validation_size}.')
  if source == 'fake':
    result = _fake_source(data_config)
  elif source == 'npz':
    result = _npz_source(data_config)
  elif source == 'tfds':
    result = _tfds_source(data_config)
  else:
    raise ValueError(f'Unknown data.source={source!r}; expected one of '
                     f'{SOURCES}.')
  if validation_size == 0:
    return result
  if not isinstance(result, ArraySource):
    raise ValueError(
        f'data.validation_size={validation_size}: a validation split is held '
        f'out of in-memory datasets only (npz, fake, TFDS CIFAR), not of the '
        f'streamed {data_config.dataset!r}.')
  return with_validation_split(result, validation_size)
