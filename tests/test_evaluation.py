"""Tests of the kNN monitor, feature extraction, test-set FLOPs and linear eval.

Tiny on purpose (width-8 ResNet-10, 16x16 images, a few dozen examples): the
properties tested do not depend on size.
"""

from collections.abc import Mapping
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax import evaluators
from cdg_jax import linear_eval
from cdg_jax.data import augment
from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.evaluators import gate_flops
from cdg_jax.evaluators import knn
from cdg_jax.evaluators import linear
from cdg_jax.gating import flops
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.run import parallel
from cdg_jax.ssl import models

NUM_CLASSES = 4
# Split sizes that are not multiples of the batch: the last batch is padded.
NUM_TRAIN, NUM_TEST, BATCH = 37, 23, 8


# ---------------------------------------------------------------------------
# kNN.
# ---------------------------------------------------------------------------

# Bank on the unit circle (after normalisation) and one query along +x:
#   entry     direction      label  cosine with the query
#   [1, 0]    0 deg          0      1
#   [1, 1]    45 deg         1      0.7071
#   [0, 2]    90 deg         1      0
#   [-1, 0]   180 deg        0      -1
BANK = np.array([[1., 0.], [1., 1.], [0., 2.], [-1., 0.]], np.float32)
BANK_LABELS = np.array([0, 1, 1, 0])
QUERY = np.array([[3., 0.]], np.float32)


def test_knn_weighted_vote_by_hand():
  # k=3 takes the first three entries. Votes at T=0.1:
  #   class 0: exp(1/0.1) = 22026;  class 1: exp(0.7071/0.1) + exp(0) = 1177.
  # A plain majority vote would say class 1 (two neighbours against one).
  ranked = knn.knn_predict(BANK, BANK_LABELS, QUERY, 2, k=3,
                                  temperature=0.1)
  np.testing.assert_array_equal(ranked, [[0, 1]])
  # At T=100 the weights are nearly equal (1.010, 1.007, 1.000): the two
  # class-1 votes (2.007) beat the single class-0 vote (1.010).
  ranked = knn.knn_predict(BANK, BANK_LABELS, QUERY, 2, k=3,
                                  temperature=100.0)
  np.testing.assert_array_equal(ranked, [[1, 0]])
  # k=2: class 0 gets exp(10), class 1 exp(7.07); class 0 wins at any T.
  result = knn.knn_classify(BANK, BANK_LABELS, QUERY, np.array([0]), 2,
                                   k=2, temperature=100.0)
  assert result == {'top1': 1.0, 'top5': 1.0}
  result = knn.knn_classify(BANK, BANK_LABELS, QUERY, np.array([1]), 2,
                                   k=2, temperature=0.1)
  assert result == {'top1': 0.0, 'top5': 1.0}  # Two classes: top-5 is all.


def test_knn_small_temperature_does_not_overflow():
  # exp(1 / 1e-3) overflows float32: with naive weights both classes would
  # get inf votes and the tie would go to class 0. The nearest entry is class 1
  # here, so it must win.
  ranked = knn.knn_predict(BANK, 1 - BANK_LABELS, QUERY, 2, k=3,
                                  temperature=1e-3)
  np.testing.assert_array_equal(ranked, [[1, 0]])


def _knn_reference(bank, bank_labels, queries, num_classes, k, temperature):
  """Brute-force numpy kNN, float64."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sim = queries.astype(np.float64) @ bank.T.astype(np.float64)
  ranked = []
  for row in sim:
    nearest = np.argsort(-row)[:k]
    votes = np.zeros(num_classes)
    np.add.at(votes, bank_labels[nearest], np.exp(row[nearest] / temperature))
    ranked.append(np.argsort(-votes, kind='stable')[:min(5, num_classes)])
  return np.array(ranked)


def test_knn_matches_reference_with_chunking():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 6)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  queries = rng.normal(size=(13, 6)).astype(np.float32)
  expected = _knn_reference(bank, labels, queries, 7, k=9, temperature=0.5)
  # 13 queries in chunks of 4: the last chunk is padded.
  ranked = knn.knn_predict(bank, labels, queries, 7, k=9,
                                  temperature=0.5, chunk_size=4)
  np.testing.assert_array_equal(ranked, expected)
  assert ranked.shape == (13, 5)
  result = knn.knn_classify(bank, labels, queries, expected[:, 0], 7,
                                   k=9, temperature=0.5, chunk_size=4)
  assert result['top1'] == 1.0


def test_knn_invariant_to_bank_permutation_and_feature_scale():
  rng = np.random.default_rng(1)
  bank = rng.normal(size=(40, 5)).astype(np.float32)
  labels = rng.integers(0, 6, 40)
  queries = rng.normal(size=(11, 5)).astype(np.float32)
  ranked = knn.knn_predict(bank, labels, queries, 6, k=7)
  perm = rng.permutation(40)
  scale = rng.uniform(0.1, 10.0, (40, 1)).astype(np.float32)
  permuted = knn.knn_predict(bank[perm] * scale, labels[perm], queries,
                                    6, k=7)
  np.testing.assert_array_equal(ranked[:, 0], permuted[:, 0])


def test_knn_k_larger_than_bank_uses_whole_bank():
  default_k = knn.knn_predict(BANK, BANK_LABELS, QUERY, 2)  # k=200
  np.testing.assert_array_equal(
      default_k, knn.knn_predict(BANK, BANK_LABELS, QUERY, 2, k=4))


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=0), 'k must be >= 1'),
    (dict(temperature=0.0), 'temperature must be > 0'),
    (dict(num_classes=1), r'outside \[0, 1\)'),
    (dict(test_features=np.zeros((1, 3), np.float32)), r'must be \(Q, 2\)'),
])
def test_knn_rejects_bad_input(kwargs, message):
  args = dict(train_features=BANK, train_labels=BANK_LABELS,
              test_features=QUERY, num_classes=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    knn.knn_predict(**args)


# ---------------------------------------------------------------------------
# Feature extraction, kNN eval and FLOPs on a tiny gated backbone.
# ---------------------------------------------------------------------------


def tiny_config():
  config = config_lib.apply_variants(config_lib.base_config(), 'smoke')
  config.data.num_classes = NUM_CLASSES
  config.eval.batch_size = BATCH
  return config


def _init(backbone):
  # Jitted: op-by-op initialisation of even a tiny ResNet takes seconds.
  return jax.jit(lambda key: backbone.init(key, jnp.zeros((1, 16, 16, 3)),
                                           train=False))(jax.random.key(0))


def _perturb_stats(variables, seed=0):
  """Random running statistics, so eval mode differs clearly from train mode
  and gate densities are not all alike."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = path[-1].key
    if name.endswith('mean'):
      return x + rng.normal(0, 0.3, x.shape).astype(np.float32)
    return x * rng.uniform(0.5, 2.0, x.shape).astype(np.float32)

  stats = jax.tree_util.tree_map_with_path(perturb, variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': stats}


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  backbone = models.create_resnet(config.model, config_lib.read_gating(config.gating).layer)
  variables = _init(backbone)
  variables = _perturb_stats(variables)
  rng = np.random.default_rng(0)
  # Smooth images (upsampled 4x4 noise) so features vary between images.
  def images(n):
    small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return small.repeat(4, axis=1).repeat(4, axis=2)
  source = input_pipeline.ArraySource(
      images(NUM_TRAIN), rng.integers(0, NUM_CLASSES, NUM_TRAIN),
      images(NUM_TEST), rng.integers(0, NUM_CLASSES, NUM_TEST), NUM_CLASSES)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 2, 'conftest.py sets two host devices'
  return config, backbone, variables, source, mesh


# One jitted reference per (backbone, config, mode), kept for the module: the
# tests call it again on images of the same shapes (one compilation each).
_DIRECT = {}


def _direct(backbone, variables, images, config, train=False):
  """Reference: plain `apply` on exactly these images (one device, no mask)."""
  key = (id(backbone), id(config), train)
  if key not in _DIRECT:

    @jax.jit
    def apply(variables, images):
      x = augment.preprocess_eval(images, config.augment)
      features, state = backbone.apply(variables, x, train=train,
                                       mutable=['gating', 'batch_stats'])
      return features, flops.mean_densities(state['gating'])

    # The backbone and config stay referenced, so their ids stay theirs.
    _DIRECT[key] = (apply, backbone, config)
  apply = _DIRECT[key][0]
  features, densities = apply(variables, jnp.asarray(images))
  return np.asarray(features), densities


def test_extract_features_counts_each_example_once_in_eval_mode(tiny):
  config, backbone, variables, source, mesh = tiny
  forward = extraction._eval_forward(backbone, tuple(config.augment.mean),
                                     tuple(config.augment.std), mesh)
  traces_before = forward._cache_size()
  result = {split: extraction.extract_features(
      backbone, variables, source, split, BATCH, config.augment, mesh)
            for split in ('train', 'test')}
  # Both splits, padded last batches included: at most one compilation.
  assert forward._cache_size() - traces_before <= 1

  for split, n in (('train', NUM_TRAIN), ('test', NUM_TEST)):
    images = source._images[split]
    assert result[split]['features'].shape == (n, 64)
    assert result[split]['features'].dtype == np.float32
    np.testing.assert_array_equal(result[split]['labels'],
                                  source._labels[split])
    features, densities = _direct(backbone, variables, images, config)
    np.testing.assert_allclose(result[split]['features'], features,
                               rtol=1e-4, atol=1e-5)
    assert set(result[split]['densities']) == set(densities)
    for name, value in densities.items():
      np.testing.assert_allclose(result[split]['densities'][name], value,
                                 atol=1e-6)

  # The check above would catch padding leaking into the densities: over the
  # padded batches they differ.
  padded = np.zeros((3 * BATCH, 16, 16, 3), np.uint8)
  padded[:NUM_TEST] = source._images['test']
  _, padded_densities = _direct(backbone, variables, padded, config)
  assert any(abs(float(padded_densities[k]) - float(densities[k])) > 1e-3
             for k in densities)
  # And train-mode features (batch statistics) differ from eval mode's.
  train_mode, _ = _direct(backbone, variables, source._images['test'], config,
                          train=True)
  assert not np.allclose(train_mode, result['test']['features'], atol=1e-3)


def test_extract_features_rejects_batch_not_divisible_by_devices(tiny):
  config, backbone, variables, source, mesh = tiny
  with pytest.raises(ValueError, match='not divisible by the 2 devices'):
    extraction.extract_features(backbone, variables, source, 'test', 7,
                                config.augment, mesh)


def test_knn_eval_reports_accuracy_and_test_set_flops(tiny):
  config, backbone, variables, source, mesh = tiny
  metrics = evaluators.knn_eval(backbone, variables, source, config.eval,
                                config.augment, mesh)
  assert set(metrics) == {'knn_top1', 'knn_top5', 'flops_reduction',
                          'gate_density', 'gated_flops_fraction',
                          'layer_density', 'layer_flops_share'}
  assert 0.0 <= metrics['knn_top1'] <= metrics['knn_top5'] <= 1.0
  test = extraction.extract_features(backbone, variables, source, 'test',
                                     BATCH, config.augment, mesh)
  assert metrics['layer_density'] == pytest.approx(test['densities'])
  gated = [c.name for c in flops.layer_costs(
      backbone, variables, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
      train=False) if c.gated]
  assert sorted(metrics['layer_density']) == sorted(gated)
  assert 0.0 < metrics['gate_density'] < 1.0
  assert metrics['flops_reduction'] > 1.0
  # G = 4: the gated layers run 1/4 + 3/4 of their MAC-weighted density.
  assert metrics['gated_flops_fraction'] == pytest.approx(
      0.25 + 0.75 * metrics['gate_density'])
  # Shares of the backbone's dense MACs, for the gated layers only.
  assert sorted(metrics['layer_flops_share']) == sorted(gated)
  assert 0.0 < sum(metrics['layer_flops_share'].values()) < 1.0


def test_set_flops_from_densities(tiny):
  _, backbone, variables, _, _ = tiny
  costs = flops.layer_costs(
      backbone, variables, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
      train=False)
  gated = [c for c in costs if c.gated]
  full = gate_flops.test_set_flops(backbone, variables,
                                   {c.name: 1.0 for c in gated}, 16)
  assert full.reduction == pytest.approx(1.0)
  # All gates shut: a gated layer costs 1/G of its dense MACs (G = 4).
  empty = gate_flops.test_set_flops(backbone, variables,
                                    {c.name: 0.0 for c in gated}, 16)
  dense = sum(c.macs for c in costs if c.part == 'backbone')
  saved = sum(c.macs * 3 / 4 for c in gated)
  assert empty.reduction == pytest.approx(dense / (dense - saved))
  with pytest.raises(ValueError, match='No measured density'):
    gate_flops.test_set_flops(backbone, variables, {}, 16)
  # A dense backbone needs no densities and has no reduction.
  config = tiny_config()
  config.gating.kind = 'none'
  dense_backbone = models.create_resnet(config.model, config_lib.read_gating(config.gating).layer)
  dense_variables = jax.eval_shape(lambda: _init(dense_backbone))
  report = gate_flops.test_set_flops(dense_backbone, dense_variables, {},
                                     (16, 16))
  assert report.reduction == 1.0 and report.gated_density is None
  assert report.backbone_dense_macs == dense


def test_open_gates_turns_a_cdg_backbone_into_the_dense_network(tiny):
  config, backbone, variables, source, _ = tiny
  opened = extraction.open_gates(variables)
  images = source._images['test']
  features, densities = _direct(backbone, opened, images, config)
  assert densities and all(float(d) == 1.0 for d in densities.values())
  # The same kernels and BatchNorms in the dense ResNet: the variables minus
  # the gates' thresholds and saliency statistics.
  gate_only = ('threshold', 'saliency_mean', 'saliency_var')

  def drop_gates(tree):
    if not isinstance(tree, Mapping):
      return tree
    kept = {k: drop_gates(v) for k, v in tree.items() if k not in gate_only}
    return {k: v for k, v in kept.items()
            if not (isinstance(v, Mapping) and not v)}

  dense_config = tiny_config()
  dense_config.gating.kind = 'none'
  dense_backbone = models.create_resnet(dense_config.model,
                                        config_lib.read_gating(dense_config.gating).layer)
  dense_variables = drop_gates(variables)
  assert (jax.tree.structure(dense_variables) == jax.tree.structure(
      jax.eval_shape(lambda: _init(dense_backbone))))
  dense_features = np.asarray(jax.jit(
      lambda v, x: dense_backbone.apply(v, x, train=False))(
          dense_variables, augment.preprocess_eval(jnp.asarray(images),
                                                   config.augment)))
  np.testing.assert_allclose(features, dense_features, rtol=1e-4, atol=1e-5)
  # As trained, the gates change the features; the input is left alone.
  gated_features, _ = _direct(backbone, variables, images, config)
  assert not np.allclose(gated_features, dense_features, atol=1e-3)
  assert not any(np.all(v == extraction.OPEN_GATE_THRESHOLD)
                 for v in jax.tree.leaves(variables['params']))


def test_open_gates_rejects_a_backbone_without_thresholds():
  no_thresholds = {'params': {'conv': {'kernel': np.ones((3, 3, 1, 1))}}}
  with pytest.raises(ValueError, match="gating.kind='cdg'"):
    extraction.open_gates(no_thresholds)


# ---------------------------------------------------------------------------
# Linear evaluation.
# ---------------------------------------------------------------------------


def test_linear_classifier_separates_separable_features():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16)) * 4.0

  def make(n):
    labels = rng.integers(0, 5, n)
    return centers[labels] + rng.normal(size=(n, 16)), labels

  train_x, train_y = make(300)
  test_x, test_y = make(100)
  # Shifted and scaled like real features; standardisation undoes it.
  train_x, test_x = linear.standardize(train_x * 30 + 50, test_x * 30 + 50)
  np.testing.assert_allclose(train_x.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(train_x.std(0), 1, atol=1e-4)
  params, losses = linear.train_linear_classifier(
      train_x, train_y, 5, epochs=20, batch_size=64, learning_rate=0.1,
      weight_decay=1e-4)
  assert params['kernel'].shape == (16, 5)
  assert losses.shape == (20,) and losses[-1] < 0.25 * losses[0]
  assert linear.classifier_accuracy(params, train_x, train_y)['top1'] > 0.99
  assert linear.classifier_accuracy(params, test_x, test_y)['top1'] > 0.97


def test_classifier_accuracy_by_hand():
  params = {'kernel': np.eye(6, dtype=np.float32),
            'bias': np.zeros(6, np.float32)}
  # Logits are the features; class 5 ranks 6th in the second row.
  features = np.array([[0, 0, 0, 9, 0, 0], [6, 5, 4, 3, 2, 1]], np.float32)
  result = linear.classifier_accuracy(params, features, np.array([3, 5]))
  assert result == {'top1': 0.5, 'top5': 0.5}


def test_standardize_leaves_constant_dimensions_finite():
  train = np.array([[1.0, 3.0], [3.0, 3.0]])
  test = np.array([[2.0, 100.0]])
  train_s, test_s = linear.standardize(train, test)
  np.testing.assert_allclose(train_s, [[-1, 0], [1, 0]])
  np.testing.assert_allclose(test_s, [[0, 97]])


def _export_tiny_backbone(workdir):
  config = config_lib.apply_variants(config_lib.base_config(), 'smoke')
  config.data.fake_num_train = 60
  config.data.fake_num_test = 30
  config.eval.batch_size = 16          # 60 and 30 are not multiples of 16
  config.linear_eval.epochs = 10
  config.linear_eval.batch_size = 16
  backbone = models.create_resnet(config.model, config_lib.read_gating(config.gating).layer)
  variables = _init(backbone)
  checkpoints.export_backbone(workdir, variables['params'],
                              variables['batch_stats'])
  checkpoints.write_config(config, workdir)
  return config


def test_run_linear_eval_end_to_end(tmp_path):
  workdir = str(tmp_path)
  config = _export_tiny_backbone(workdir)
  # The command line's config asks for another network: the workdir's wins.
  config.model.width = 16
  config.lock()
  results = linear_eval.run_linear_eval(config, workdir)
  assert results['feature_dim'] == 64          # width 8 * 8, not 16 * 8
  assert results['model']['width'] == 8
  assert any('model' in note for note in results['config_notes'])
  assert results['num_train'] == 60 and results['num_test'] == 30
  assert 0.0 <= results['top1'] <= results['top5'] <= 1.0
  assert results['flops_reduction'] > 1.0      # gated network, random gates
  assert 0.0 < results['gate_density'] < 1.0
  with open(os.path.join(workdir, linear_eval.RESULTS_FILE)) as f:
    written = json.load(f)
  assert written['top1'] == results['top1']
  assert written['flops']['flops_reduction'] == pytest.approx(
      results['flops_reduction'])
  summary = linear_eval.format_summary(results, workdir)
  assert 'FLOPs reduction' in summary and 'note:' in summary


def test_run_linear_eval_without_backbone(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match='config.json'):
    linear_eval.run_linear_eval(config, str(tmp_path))
  checkpoints.write_config(config, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='No exported backbone'):
    linear_eval.run_linear_eval(config, str(tmp_path))


def test_knn_eval_with_sparse_inference_gives_the_same_results(tiny):
  config, _, _, source, mesh = tiny
  config = config.copy_and_resolve_references()
  config.gating.block = (2, 2, 0)   # tiles across all channels
  backbone = models.create_resnet(config.model, config_lib.read_gating(config.gating).layer)
  variables = _perturb_stats(_init(backbone))
  masked = evaluators.knn_eval(backbone, variables, source, config.eval,
                                config.augment, mesh)
  config.eval.sparse_inference = True
  fast = evaluators.knn_eval(backbone, variables, source, config.eval,
                                config.augment, mesh)
  assert 0 < masked['gate_density'] < 1
  assert fast['knn_top1'] == masked['knn_top1']
  np.testing.assert_allclose(fast['flops_reduction'],
                             masked['flops_reduction'], rtol=1e-6)
  for name, density in masked['layer_density'].items():
    np.testing.assert_allclose(fast['layer_density'][name], density, rtol=1e-6)


def _augmented_settings(epochs=2, batch_size=8, feature_norm='batchnorm'):
  settings = linear_eval.linear_settings(tiny_config())
  settings.update(protocol='augmented', epochs=epochs, batch_size=batch_size)
  settings['augmented'].update(learning_rate=0.5, decay_fractions=(0.5,),
                               feature_norm=feature_norm)
  return settings


@pytest.mark.parametrize('feature_norm', ['none', 'batchnorm'])
def test_augmented_protocol_equals_a_step_by_step_reference(tiny,
                                                            feature_norm):
  """Frozen backbone in eval mode, new crops and flips in every epoch (and
  a non-affine BatchNorm on the features, running statistics folded into the
  classifier at the end): the classifier equals one trained by a plain loop
  that does exactly that."""
  config, backbone, variables, source, mesh = tiny
  settings = _augmented_settings(feature_norm=feature_norm)
  params, losses = linear.train_augmented_classifier(
      backbone, variables, source, config.augment, NUM_CLASSES, settings,
      seed=3, mesh=mesh)
  assert losses.shape == (2,) and np.all(np.isfinite(losses))

  # The reference: the same batches, one key per step, eval-mode features.
  view = augment.view_config(crop_scale=(0.08, 1.0), jitter_prob=0.0,
                             grayscale_prob=0.0)
  view.mean, view.std = config.augment.mean, config.augment.std
  steps = NUM_TRAIN // 8
  features_of = jax.jit(lambda v, x: backbone.apply(
      v, x, train=False, mutable=['gating'])[0])
  augmented = jax.jit(lambda key, images: augment.augment_view(key, images,
                                                               view))
  dim = features_of(variables, jnp.zeros((1, 16, 16, 3))).shape[-1]
  kernel, bias = np.zeros((dim, NUM_CLASSES)), np.zeros(NUM_CLASSES)
  velocity = [np.zeros_like(kernel), np.zeros_like(bias)]
  running_mean, running_var = np.zeros(dim), np.ones(dim)
  batches = source.train_batches(8, 3)
  seen = {}
  for t in range(2 * steps):
    batch = next(batches)
    images = augmented(jax.random.fold_in(jax.random.key(3), t),
                       jnp.asarray(batch['image']))
    seen.setdefault(t % steps, []).append(np.asarray(images))
    features = np.asarray(features_of(variables, images), np.float64)
    if feature_norm == 'batchnorm':
      mean, var = features.mean(0), features.var(0)
      features = (features - mean) / np.sqrt(var + 1e-6)
      running_mean = 0.9 * running_mean + 0.1 * mean
      running_var = 0.9 * running_var + 0.1 * var
    logits = features @ kernel + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    probs[np.arange(8), batch['label']] -= 1
    grads = [features.T @ probs / 8, probs.sum(0) / 8]
    lr = 0.5 if t < steps else 0.05          # x0.1 after half the epochs
    for i, (param, grad) in enumerate(zip((kernel, bias), grads)):
      velocity[i] = 0.9 * velocity[i] + grad   # optax.sgd's momentum
      param -= lr * velocity[i]
  if feature_norm == 'batchnorm':
    # Test time: (x - running mean) / running std, then the classifier.
    scale = 1 / np.sqrt(running_var + 1e-6)
    kernel, bias = kernel * scale[:, None], bias - (running_mean * scale) @ kernel
  np.testing.assert_allclose(params['kernel'], kernel, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(params['bias'], bias, rtol=2e-3, atol=2e-5)
  # Each epoch saw other crops of its images (the same batch order would
  # give the same crops if the keys repeated).
  first, second = seen[0]
  assert np.max(np.abs(first - second)) > 0.1


def test_augmented_protocol_runs_end_to_end_and_records_itself(tmp_path):
  workdir = str(tmp_path)
  config = _export_tiny_backbone(workdir)
  config.linear_eval.protocol = 'augmented'
  config.linear_eval.epochs = 2
  results = linear_eval.run_linear_eval(config, workdir)
  assert results['linear_eval']['protocol'] == 'augmented'
  assert results['protocol'] == linear.PROTOCOLS['augmented']
  assert tuple(results['linear_eval']['augmented']['decay_fractions']) == (
      0.6, 0.8)
  assert 0.0 <= results['top1'] <= 1.0 and results['num_test'] == 30
  with open(os.path.join(workdir, linear_eval.RESULTS_FILE)) as f:
    assert json.load(f)['linear_eval']['protocol'] == 'augmented'
  config.linear_eval.protocol = 'sideways'
  with pytest.raises(ValueError, match="protocol='sideways'"):
    linear_eval.run_linear_eval(config, workdir)


def test_linear_eval_notes_another_dataset_normalisation_and_framework():
  trained = config_lib.apply_variants(config_lib.base_config(), 'smoke')
  same = trained.copy_and_resolve_references()
  assert linear_eval.data_notes(same, trained) == []
  other = trained.copy_and_resolve_references()
  other.data.dataset, other.data.num_classes = 'cifar100', 100
  other.augment.mean = (0.5, 0.5, 0.5)
  other.framework = 'byol'
  notes = linear_eval.data_notes(other, trained)
  assert ("data.dataset='cifar100' differs from the 'cifar10' the backbone "
          'was trained with.') in notes
  assert any(n.startswith('data.num_classes=100 differs') for n in notes)
  assert any(n.startswith('augment.mean=[0.5, 0.5, 0.5]') for n in notes)
  assert any(n.startswith("framework='byol' differs") for n in notes)
  assert len(notes) == 4
