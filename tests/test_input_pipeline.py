"""Tests of the host input pipeline (cdg_jax/data/input_pipeline.py).

Offline and small: a generated .npz, synthetic data, and TFDS through
`tfds.testing.mock_data` (under which `info.splits` is empty and split slicing
is ignored). One integration test reads the real CIFAR-10 subset in
../shared/data and skips when it is absent.
"""

import os
import pathlib

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cdg_jax.data import batching
from cdg_jax.data import input_pipeline
from cdg_jax.run import config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10.npz'


def _data_config(**overrides):
  config = config_lib.base_config().data
  config.update(overrides)
  return config


def _ids(images):
  """Recovers the example id written into pixel (0, 0) by `_write_npz`."""
  return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


def _write_npz(path, num_train=50, num_test=23, size=8, num_classes=5,
               **replace):
  """A small npz whose images carry their example id in pixel (0, 0)."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n, offset in (('train', num_train, 0), ('test', num_test, 1000)):
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ids = np.arange(n) + offset
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    arrays[f'x_{split}'] = images
    arrays[f'y_{split}'] = np.arange(n) % num_classes
  arrays.update(replace)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture
def npz_source(tmp_path):
  path = _write_npz(tmp_path / 'data.npz')
  return input_pipeline.create_source(_data_config(
      source='npz', npz_path=path, image_size=8, num_classes=5))


def test_npz_source_properties_and_batch_shapes(npz_source):
  assert (npz_source.num_train, npz_source.num_test) == (50, 23)
  assert npz_source.num_classes == 5 and npz_source.image_shape == (8, 8, 3)
  batch = next(npz_source.train_batches(16, seed=0))
  assert batch['image'].shape == (16, 8, 8, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32


def test_each_epoch_visits_distinct_examples_in_a_new_order(npz_source):
  it = npz_source.train_batches(16, seed=3)
  steps = npz_source.steps_per_epoch(16)
  assert steps == 3  # 50 // 16; the partial 4th batch is dropped.
  epochs = [np.concatenate([_ids(next(it)['image']) for _ in range(steps)])
            for _ in range(3)]
  for ids in epochs:
    assert len(set(ids)) == 48 and set(ids) <= set(range(50))
  assert not np.array_equal(epochs[0], epochs[1])
  batch = next(npz_source.train_batches(16, seed=3))
  np.testing.assert_array_equal(batch['label'], _ids(batch['image']) % 5)


def test_shuffle_depends_only_on_seed_and_epoch(npz_source):
  def first(seed, n):
    it = npz_source.train_batches(16, seed=seed)
    return np.concatenate([_ids(next(it)['image']) for _ in range(n)])

  np.testing.assert_array_equal(first(5, 7), first(5, 7))
  assert not np.array_equal(first(5, 3), first(6, 3))


def test_start_step_resumes_the_same_sequence(npz_source):
  it = npz_source.train_batches(16, seed=1)
  uninterrupted = [_ids(next(it)['image']) for _ in range(8)]
  resumed = npz_source.train_batches(16, seed=1, start_step=5)
  for step in range(5, 8):  # Crosses the epoch boundary at step 6.
    np.testing.assert_array_equal(_ids(next(resumed)['image']),
                                  uninterrupted[step])


def test_processes_split_each_global_batch(npz_source):
  single = npz_source.train_batches(16, seed=2, process_count=1,
                                    process_index=0)
  halves = [npz_source.train_batches(16, seed=2, process_count=2,
                                     process_index=p) for p in (0, 1)]
  for _ in range(4):
    parts = [next(h) for h in halves]
    assert parts[0]['image'].shape == (8, 8, 8, 3)
    # Disjoint slices that together are the single-process global batch.
    assert not set(_ids(parts[0]['image'])) & set(_ids(parts[1]['image']))
    np.testing.assert_array_equal(
        np.concatenate([_ids(p['image']) for p in parts]),
        _ids(next(single)['image']))


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_exactly_once(npz_source, process_count):
  seen = []
  num_batches = []
  for index in range(process_count):
    batches = list(npz_source.eval_batches(
        'test', 8, process_index=index, process_count=process_count))
    num_batches.append(len(batches))
    for batch in batches:
      local = 8 // process_count
      assert batch['image'].shape == (local, 8, 8, 3)
      assert batch['mask'].dtype == np.float32
      real = batch['mask'] == 1
      assert np.all(batch['mask'][~real] == 0)
      assert np.all(batch['image'][~real] == 0)
      seen.extend(_ids(batch['image'][real]))
      np.testing.assert_array_equal(batch['label'][real],
                                    (_ids(batch['image'][real]) - 1000) % 5)
  # Every process steps through the same number of (padded) batches.
  assert num_batches == [npz_source.num_eval_batches('test', 8)] * process_count
  assert num_batches[0] == 3  # 23 examples: 8 + 8 + 7 and one padded row.
  assert sorted(seen) == list(range(1000, 1023))


def test_eval_over_train_split_in_order(npz_source):
  ids = np.concatenate([_ids(b['image'][b['mask'] == 1])
                        for b in npz_source.eval_batches('train', 16)])
  np.testing.assert_array_equal(ids, np.arange(50))


def test_fake_source_and_smoke_config():
  config = config_lib.apply_variants(config_lib.base_config(), 'smoke')
  source = input_pipeline.create_source(config.data)
  assert (source.num_train, source.num_test) == (512, 200)
  assert source.image_shape == (16, 16, 3) and source.num_classes == 10
  batch = next(source.train_batches(32, seed=0))
  assert batch['image'].shape == (32, 16, 16, 3)
  assert batch['image'].dtype == np.uint8
  labels = np.concatenate([b['label'][b['mask'] == 1]
                           for b in source.eval_batches('train', 64)])
  np.testing.assert_array_equal(np.bincount(labels), [52] * 2 + [51] * 8)
  # Deterministic and class dependent (the class means differ).
  again = input_pipeline.create_source(config.data)
  np.testing.assert_array_equal(next(again.train_batches(32, seed=0))['image'],
                                batch['image'])
  images, labels = input_pipeline.fake_arrays(200, 8, 4, seed=0)
  means = np.stack([images[labels == c].mean(axis=(0, 1, 2))
                    for c in range(4)])
  assert np.ptp(means, axis=0).max() > 20


def test_fake_train_and_test_splits_share_their_classes():
  """A nearest-class-mean classifier fit on train works on test (not chance)."""
  x_train, y_train = input_pipeline.fake_arrays(400, 8, 10, seed=1)
  x_test, y_test = input_pipeline.fake_arrays(200, 8, 10, seed=2)
  assert not np.array_equal(x_train[:200], x_test)
  means = np.stack([x_train[y_train == c].astype(np.float32).mean(axis=0)
                    for c in range(10)])
  distances = ((x_test[:, None].astype(np.float32) - means[None]) ** 2).sum(
      axis=(2, 3, 4))
  assert np.mean(distances.argmin(axis=1) == y_test) > 0.9


def test_holdout_validation_is_class_balanced_disjoint_and_fixed():
  labels = np.random.default_rng(0).permutation(np.arange(103) % 5)
  train, validation = input_pipeline.holdout_validation(labels, 12, 5)
  # 12 = 5 * 2 + 2: classes 0 and 1 give 3 examples, the others 2.
  np.testing.assert_array_equal(np.bincount(labels[validation], minlength=5),
                                [3, 3, 2, 2, 2])
  assert len(np.intersect1d(train, validation)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])),
                                np.arange(103))
  again = input_pipeline.holdout_validation(labels, 12, 5)
  np.testing.assert_array_equal(again[1], validation)
  other_seed = input_pipeline.holdout_validation(labels, 12, 5, seed=1)
  assert not np.array_equal(other_seed[1], validation)
  with pytest.raises(ValueError, match='validation_size=103 must be between'):
    input_pipeline.holdout_validation(labels, 103, 5)
  with pytest.raises(ValueError, match='class 0, which has only 21'):
    input_pipeline.holdout_validation(labels, 101, 5)


def test_validation_split_replaces_the_test_split(tmp_path):
  path = _write_npz(tmp_path / 'data.npz')
  full = input_pipeline.create_source(_data_config(
      source='npz', npz_path=path, image_size=8, num_classes=5))
  held = input_pipeline.create_source(_data_config(
      source='npz', npz_path=path, image_size=8, num_classes=5,
      validation_size=10))
  assert full.eval_split_name == 'test'
  assert held.eval_split_name == 'validation'
  assert (held.num_train, held.num_test) == (40, 10)
  ids = lambda source, split: np.concatenate(
      [_ids(b['image'][b['mask'] == 1])
       for b in source.eval_batches(split, 8)])
  train_ids, validation_ids = ids(held, 'train'), ids(held, 'test')
  # The validation images are training images, never test images, and
  # training no longer sees them.
  assert set(validation_ids) <= set(ids(full, 'train'))
  assert not set(validation_ids) & set(train_ids)
  assert not set(validation_ids) & set(ids(full, 'test'))
  assert sorted([*train_ids, *validation_ids]) == sorted(ids(full, 'train'))
  with pytest.raises(ValueError, match='validation_size must be >= 0'):
    input_pipeline.create_source(_data_config(
        source='npz', npz_path=path, image_size=8, num_classes=5,
        validation_size=-1))


def test_npz_with_other_image_size_is_resized(tmp_path):
  path = _write_npz(tmp_path / 'big.npz', size=12)
  source = input_pipeline.create_source(_data_config(
      source='npz', npz_path=path, image_size=6, num_classes=5))
  assert source.image_shape == (6, 6, 3)
  assert next(source.train_batches(10, 0))['image'].shape == (10, 6, 6, 3)


def test_resize_images_keeps_constant_images_and_crops_the_centre():
  flat = np.full((2, 12, 16, 3), 77, np.uint8)
  np.testing.assert_array_equal(input_pipeline.resize_images(flat, 6), 77)
  # Shorter side 12 -> 6 halves the width 16 -> 8; the centre 6 of 8 remain.
  ramp = np.tile(np.arange(16, dtype=np.uint8)[None, None, :, None] * 10,
                 (1, 12, 1, 3))
  out = input_pipeline.resize_images(ramp, 6)
  assert out.shape == (1, 6, 6, 3)
  np.testing.assert_allclose(out[0, 0, :, 0], [25, 45, 65, 85, 105, 125],
                             atol=1)


def test_prefetch_preserves_order_and_raises():
  assert list(batching.prefetch(iter(range(10)), size=3)) == list(
      range(10))
  assert list(batching.prefetch(iter(range(4)), size=0)) == [0, 1, 2, 3]

  def failing():
    yield 1
    raise RuntimeError('broken source')

  it = batching.prefetch(failing(), size=2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='broken source'):
    next(it)


def test_shard_batch_places_the_batch_over_the_data_axis(npz_source):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices)
  batch = next(npz_source.train_batches(8 * len(devices), seed=0))
  sharded = batching.shard_batch(batch, mesh)
  for key in ('image', 'label'):
    assert sharded[key].shape == batch[key].shape
    assert sharded[key].sharding.spec == P('data')
    np.testing.assert_array_equal(np.asarray(sharded[key]), batch[key])


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_missing_npz_file(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    input_pipeline.create_source(_data_config(source='npz', npz_path=missing))
  with pytest.raises(ValueError, match='npz_path'):
    input_pipeline.create_source(_data_config(source='npz', npz_path=''))


@pytest.mark.parametrize('replace, message', [
    (dict(y_test=None), r"lacks keys \['y_test'\]"),
    (dict(x_train=np.zeros((4, 8, 8), np.uint8)),
     r'x_train.*shape \(4, 8, 8\)'),
    (dict(x_test=np.zeros((4, 8, 8, 3), np.float32)),
     'x_test must be uint8.*float32'),
    (dict(y_train=np.full(50, 7)), r'labels in \[7, 7\].*num_classes=5'),
    (dict(y_train=np.zeros(49, np.int64)), r'y_train must have shape \(50,\)'),
])
def test_bad_npz_contents(tmp_path, replace, message):
  path = _write_npz(tmp_path / 'bad.npz', **replace)
  with pytest.raises(ValueError, match=message):
    input_pipeline.create_source(_data_config(
        source='npz', npz_path=path, image_size=8, num_classes=5))


def test_bad_config_values(npz_source):
  with pytest.raises(ValueError, match="'hdf5'"):
    input_pipeline.create_source(_data_config(source='hdf5'))
  with pytest.raises(ValueError, match="'cifar11'"):
    input_pipeline.create_source(_data_config(source='tfds', dataset='cifar11'))
  with pytest.raises(ValueError, match='num_classes=10.*cifar100 has 100'):
    input_pipeline.create_source(_data_config(source='tfds',
                                              dataset='cifar100'))
  with pytest.raises(ValueError, match='batch_size=64 exceeds the 50 training images; lower'):
    npz_source.train_batches(64, seed=0)
  with pytest.raises(ValueError, match='Batch size 15.*2'):
    npz_source.train_batches(15, seed=0, process_count=2, process_index=0)
  with pytest.raises(ValueError, match="'validation'"):
    npz_source.eval_batches('validation', 8)


@pytest.mark.parametrize('dataset, num_classes, hint', [
    ('cifar10', 10, 'tfds build cifar10 --data_dir='),
    ('imagenet100', 100, 'tfds build imagenet2012 --data_dir=.* --manual_dir='),
])
def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path, dataset,
                                                       num_classes, hint):
  empty = str(tmp_path / 'tfds')
  with pytest.raises(ValueError, match=f'(?s)not prepared.*{hint}'):
    input_pipeline.create_source(_data_config(
        source='tfds', dataset=dataset, num_classes=num_classes,
        data_dir=empty))


# ---------------------------------------------------------------------------
# TFDS, mocked.
# ---------------------------------------------------------------------------


def test_tfds_cifar_under_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    source = input_pipeline.create_source(_data_config(
        source='tfds', dataset='cifar100', num_classes=100,
        data_dir=str(tmp_path)))
    reference = list(tfds.as_numpy(tfds.builder('cifar100').as_dataset(
        split='test', as_supervised=True)))
  # Mocked splits hold num_examples each (split names are not checked).
  assert (source.num_train, source.num_test) == (20, 20)
  assert source.image_shape == (32, 32, 3)
  batch = next(source.train_batches(8, seed=0))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  eval_batches = list(source.eval_batches('test', 8))
  assert len(eval_batches) == 3
  assert sum(b['mask'].sum() for b in eval_batches) == 20
  images = np.concatenate([b['image'][b['mask'] == 1] for b in eval_batches])
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in eval_batches])
  np.testing.assert_array_equal(images, np.stack([x for x, _ in reference]))
  np.testing.assert_array_equal(labels, [y for _, y in reference])


def test_imagenet100_class_list():
  with open(input_pipeline.IMAGENET100_CLASS_FILE) as f:
    wnids = f.read().split()
  assert len(wnids) == 100 and len(set(wnids)) == 100
  assert all(len(w) == 9 and w[0] == 'n' and w[1:].isdigit() for w in wnids)
  # First and last of CMC's imagenet100.txt.
  assert (wnids[0], wnids[-1]) == ('n02869837', 'n02090622')


def test_tfds_imagenet100_under_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=200):
    source = input_pipeline.create_source(_data_config(
        source='tfds', dataset='imagenet100', num_classes=100, image_size=24,
        data_dir=str(tmp_path)))
    builder = tfds.builder('imagenet2012')
    raw_labels = [int(label) for _, label in tfds.as_numpy(builder.as_dataset(
        split='validation', as_supervised=True,
        decoders={'image': tfds.decode.SkipDecoding()}))]
    names = builder.info.features['label'].names
    eval_batches = list(source.eval_batches('test', 16))
    train = source.train_batches(8, seed=0)
    first = [next(train) for _ in range(4)]
    resumed = next(source.train_batches(8, seed=0, start_step=3))
  with open(input_pipeline.IMAGENET100_CLASS_FILE) as f:
    wnids = f.read().split()
  expected = [wnids.index(names[label]) for label in raw_labels
              if names[label] in wnids]
  assert len(expected) >= 5  # ~10% of the random mock labels are selected.
  assert source.num_classes == 100 and source.image_shape == (24, 24, 3)
  for batch in eval_batches:
    assert batch['image'].shape == (16, 24, 24, 3)
    assert batch['image'].dtype == np.uint8
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in eval_batches])
  np.testing.assert_array_equal(labels, expected)  # Each once, in order.
  for batch in first:
    assert batch['image'].shape == (8, 24, 24, 3)
    assert set(batch['label']) <= set(expected)
  np.testing.assert_array_equal(resumed['label'], first[3]['label'])
  np.testing.assert_array_equal(resumed['image'], first[3]['image'])


# ---------------------------------------------------------------------------
# Real data (skipped without ../shared/data).
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_CIFAR10.exists(),
                    reason=f'real CIFAR-10 subset not found at '
                    f'{SHARED_CIFAR10} (only on the project build machines)')
def test_real_cifar10_subset():
  source = input_pipeline.create_source(_data_config(
      source='npz', npz_path=os.fspath(SHARED_CIFAR10)))
  assert (source.num_train, source.num_test) == (25_000, 10_000)
  assert source.image_shape == (32, 32, 3) and source.num_classes == 10
  for split, per_class in (('train', 2_500), ('test', 1_000)):
    labels = np.concatenate([b['label'][b['mask'] == 1]
                             for b in source.eval_batches(split, 1024)])
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
  batch = next(source.train_batches(256, seed=0))
  assert batch['image'].shape == (256, 32, 32, 3)
  # Real photographs: channel means near the published CIFAR-10 means.
  np.testing.assert_allclose(batch['image'].mean(axis=(0, 1, 2)) / 255,
                             [0.4914, 0.4822, 0.4465], atol=0.03)
