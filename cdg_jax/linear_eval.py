r"""Linear evaluation of an exported gated backbone, with test-set FLOPs.

  python -m cdg_jax.linear_eval --config=configs/default.py --workdir=DIR
  cdg-linear-eval --config=configs/default.py --workdir=DIR   # installed

loads the backbone a training run exported into DIR (`checkpoints.
load_backbone`), trains a linear classifier on its frozen features, and
writes top-1/top-5 on the whole test set, together with the FLOPs reduction
and gate densities measured on the test set, to `DIR/linear_eval.json`; a
summary is printed. An earlier result of another evaluation (the other
protocol, other settings) is kept beside it as `DIR/linear_eval.1.json`
(`.2`, ...).

Two protocols (`linear_eval.protocol`); every result records which one made
it ('protocol', and 'linear_eval.protocol').

'fast' (the default, ours): features of the train
and test splits are extracted once, with the backbone in evaluation mode
(BatchNorm and gate saliency with running statistics) and no augmentation
(images at the training resolution, only normalised). They are standardised
with the train split's per-dimension mean and std, and a linear softmax
classifier is trained on them with SGD (Nesterov momentum 0.9), a cosine
learning-rate decay and L2 weight decay on the weights (not the bias), for
`linear_eval.epochs` epochs of minibatches of `linear_eval.batch_size`. The
classifier after the last epoch is evaluated once on the test set: there is
no model selection on it.

'augmented' (the SSL literature's: solo-learn's linear scripts, SimCLR's
linear evaluation): the backbone stays frozen in evaluation mode and its
features are recomputed every step from training images augmented anew
(random resized crop, scale `linear_eval.augmented.crop_scale`, and a
horizontal flip); a linear classifier is trained with SGD (momentum 0.9,
learning rate 0.1 at batch 256, no weight decay, x0.1 after 60% and 80% of
the epochs; solo-learn's CIFAR settings) for `linear_eval.epochs` epochs and
evaluated once on the centre (unaugmented) test images. By default
(`linear_eval.augmented.feature_norm='batchnorm'`) the features pass a
BatchNorm without affine parameters first, as MAE's linear probe: frozen
features of unknown scale (a gated backbone's raw features have 1.8x a dense
one's norm, and solo-learn's fixed learning rate then did not train: 33.8% vs
41.2% with the fast protocol) train with one learning rate; 'none' is the
raw features, solo-learn's form (the runs scored before 2026-12-03). Slower (a backbone forward per image and epoch) and the
numbers to set beside published ones. Compare runs evaluated the same way.

The network evaluated is the one in DIR: the `model` and `gating` blocks of
DIR/config.json are used whatever the --config says (a difference is logged
and recorded in the JSON under 'config_notes'). Data, augmentation
normalisation and the `eval` / `linear_eval` blocks come from --config; a
data block, normalisation or framework that differs from the trained run's
is allowed (a transfer evaluation) and noted the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cdg_jax.data import augment
from cdg_jax.data import batching
from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import evaluation
from cdg_jax.run import checkpoints
from cdg_jax.run import parallel
from cdg_jax.ssl import models

RESULTS_FILE = 'linear_eval.json'
# The augmented protocol's feature BatchNorm (MAE's linear probe: no affine
# parameters, eps 1e-6; PyTorch's momentum 0.1 is 0.9 in this convention).
FEATURE_NORM_EPSILON = 1e-6
FEATURE_NORM_MOMENTUM = 0.9
# Defaults of `config.linear_eval`, used where a config (an older run's)
# lacks the block or a field: `config_lib.base_config()`'s.
PROTOCOLS = {
    'fast': ('frozen eval-mode features without augmentation, standardised; '
             'linear softmax classifier, SGD Nesterov momentum 0.9, cosine '
             'learning rate, L2 weight decay on weights; last-epoch classifier '
             'evaluated once on the whole test set'),
    'augmented': ('frozen eval-mode backbone; random resized crop and '
                  'horizontal flip recomputed for every training image in '
                  'every epoch; linear softmax classifier (on BatchNorm-'
                  'normalised features unless feature_norm is none), '
                  'SGD momentum, step-decayed learning rate (solo-learn\'s '
                  'linear protocol); last-epoch classifier evaluated once on '
                  'the centre (unaugmented) test images'),
}


def standardize(train_features: np.ndarray, test_features: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Standardises both sets with the train set's per-dimension statistics.

  Args:
    train_features: (N, D).
    test_features: (Q, D).

  Returns:
    (train, test) as float32, train with zero mean and unit std per dimension.
    Dimensions constant on the train set (dead ReLU units) are only centred,
    so that a tiny std does not blow up their test values.
  """
  train_features = np.asarray(train_features, np.float64)
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0)
  std = np.where(std > 1e-6, std, 1.0)
  return (((train_features - mean) / std).astype(np.float32),
          ((np.asarray(test_features, np.float64) - mean) / std
           ).astype(np.float32))


def _loss(params, features, labels):
  logits = features @ params['kernel'] + params['bias']
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def train_linear_classifier(features: np.ndarray, labels: np.ndarray,
                            num_classes: int, *, epochs: int, batch_size: int,
                            learning_rate: float, weight_decay: float,
                            momentum: float = 0.9, seed: int = 0
                            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Trains a linear softmax classifier on fixed features.

  One jitted function runs a whole epoch (`lax.scan` over minibatches of a
  fresh permutation; the remainder of the permutation is left out of that
  epoch only), so the loop costs one dispatch per epoch and no host sync.

  Args:
    features: (N, D) float features (standardised ones train best).
    labels: (N,) integer labels in [0, num_classes).
    num_classes: C.
    epochs: passes over the data.
    batch_size: minibatch size; clipped to N.
    learning_rate: peak learning rate, decayed by a cosine to 0.
    weight_decay: L2 coefficient on the (D, C) kernel (not on the bias).
    momentum: Nesterov momentum.
    seed: seed of the minibatch order.

  Returns:
    ({'kernel': (D, C), 'bias': (C,)} as numpy, per-epoch mean training loss
    (epochs,)).
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f'Expected (N, D) features and (N,) labels, got '
                     f'{features.shape} and {labels.shape}.')
  n, dim = features.shape
  if n == 0:
    raise ValueError('No training features.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels lie in [{labels.min()}, {labels.max()}], outside '
                     f'[0, {num_classes}).')
  for name, value in (('epochs', epochs), ('batch_size', batch_size)):
    if value < 1:
      raise ValueError(f'linear_eval.{name} must be >= 1, got {value}.')
  if not learning_rate > 0:
    raise ValueError(f'linear_eval.learning_rate must be > 0, got '
                     f'{learning_rate}.')
  if weight_decay < 0:
    raise ValueError(f'linear_eval.weight_decay must be >= 0, got '
                     f'{weight_decay}.')
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate,
                                         epochs * steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(
          weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.sgd(schedule, momentum=momentum, nesterov=True))
  # Zero init: the problem is convex, and zeros make runs reproducible.
  params = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(params)

  @jax.jit
  def train_epoch(params, opt_state, features, labels, key):
    order = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
    order = order.reshape(steps_per_epoch, batch_size)

    def step(carry, rows):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(_loss)(params, features[rows],
                                              labels[rows])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               order)
    return params, opt_state, jnp.mean(losses)

  features = jnp.asarray(features)
  labels = jnp.asarray(labels, jnp.int32)
  losses = []
  for key in jax.random.split(jax.random.key(seed), epochs):
    params, opt_state, loss = train_epoch(params, opt_state, features, labels,
                                          key)
    losses.append(loss)
  return jax.device_get(params), np.asarray(jax.device_get(losses))


def classifier_accuracy(params: Mapping[str, Any], features: np.ndarray,
                        labels: np.ndarray) -> dict[str, float]:
  """Top-1/top-5 accuracy of a linear classifier.

  Args:
    params: {'kernel': (D, C), 'bias': (C,)}.
    features: (N, D); labels: (N,).

  Returns:
    {'top1', 'top5'} in [0, 1]; top-5 is top-min(5, C).
  """
  logits = np.asarray(features, np.float32) @ np.asarray(params['kernel']) + \
      np.asarray(params['bias'])
  top = min(5, logits.shape[1])
  # Stable sort: ties resolved towards the lower class id, like argmax.
  ranked = np.argsort(-logits, axis=1, kind='stable')[:, :top]
  hits = ranked == np.asarray(labels)[:, None]
  return {'top1': float(np.mean(hits[:, 0])),
          'top5': float(np.mean(np.any(hits, axis=1)))}


def _as_json(block: ml_collections.ConfigDict) -> Any:
  return json.loads(block.to_json_best_effort())


def use_backbone_config(config: ml_collections.ConfigDict,
                        backbone_config: ml_collections.ConfigDict
                        ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `config` with the `model` and `gating` blocks of the backbone.

  Returns:
    (config, notes): notes name every field that differed (empty if none).
  """
  notes = []
  for block in ('model', 'gating'):
    given = _as_json(config[block]) if block in config else None
    saved = _as_json(backbone_config[block])
    if given != saved:
      notes.append(f'--config {block}={given} differs from the exported '
                   f'backbone\'s {block}={saved}; using the backbone\'s.')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = backbone_config.model
    config.gating = backbone_config.gating
  return config, notes


# Fields of --config that may differ from the trained run's on purpose (a
# transfer evaluation on another dataset, another resolution) but change what
# the numbers mean: each difference is noted in the results.
DATA_FIELDS = ('source', 'dataset', 'npz_path', 'data_dir', 'num_classes',
               'image_size', 'validation_size')


def data_notes(config: ml_collections.ConfigDict,
               backbone_config: ml_collections.ConfigDict) -> list[str]:
  """Notes on the data, normalisation and framework that differ from the run.

  Evaluating a backbone on other data is allowed (transfer), so these are
  notes, not errors; each names both values.
  """
  notes = []
  for field in DATA_FIELDS:
    given, trained = config.data.get(field), backbone_config.data.get(field)
    if given != trained:
      notes.append(f'data.{field}={given!r} differs from the {trained!r} the '
                   f'backbone was trained with.')
  for field in ('mean', 'std'):
    given = [float(v) for v in config.augment.get(field, ())]
    trained = [float(v) for v in backbone_config.augment.get(field, ())]
    if trained and given != trained:
      notes.append(f'augment.{field}={given} (input normalisation) differs '
                   f'from the {trained} the backbone was trained with.')
  if config.get('framework') != backbone_config.get('framework'):
    notes.append(f'framework={config.get("framework")!r} differs from the '
                 f'{backbone_config.get("framework")!r} the backbone was '
                 f'trained with (it does not change the linear protocol).')
  return notes


def run_linear_eval(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, Any]:
  """Linear evaluation of the backbone exported in `workdir` (see module doc).

  Args:
    config: data, augmentation (normalisation), `eval.batch_size` and
      `linear_eval` settings; `model`/`gating` are taken from the workdir.
    workdir: a training run's workdir, with `config.json` and `backbone/`.

  Returns:
    The results written to `<workdir>/linear_eval.json`: 'top1', 'top5' and
    'train_top1' (fractions), 'flops_reduction', 'gate_density' (1.0 for a
    dense backbone), 'layer_density', the full 'flops' report, sizes, the
    settings used and 'config_notes'; for a dense-partner run
    (`gating.branches='dense_partner'`) also 'dense_network', the same
    measures of the run's dense network (every gate open).

  Raises:
    FileNotFoundError: no config.json or no exported backbone in `workdir`.
  """
  # The settings first: a bad value stops before the backbone is loaded.
  settings = linear_settings(config)
  backbone_config, backbone, variables = checkpoints.load_backbone(workdir)
  config, notes = use_backbone_config(config, backbone_config)
  for note in notes:
    logging.warning('%s', note)
  for note in data_notes(config, backbone_config):
    notes.append(note)
    logging.warning('%s', note)

  mesh = parallel.make_mesh()
  source = input_pipeline.create_source(config.data)
  eval_config = config.get('eval') or {}
  batch_size = evaluation.eval_batch_size(
      eval_config.get('batch_size', evaluation.DEFAULT_EVAL_BATCH_SIZE), mesh)
  scores = evaluate_network(
      evaluation.inference_backbone(backbone, eval_config), variables, source,
      config, settings, batch_size, mesh)
  dense_network = None
  if backbone.gating.has_dense_partner:
    # The dense network of the same run: the same weights, every gate open.
    dense_scores = evaluate_network(
        evaluation.inference_backbone(models.dense_path(backbone), eval_config),
        variables, source, config, settings, batch_size, mesh)
    dense_network = {k: dense_scores[k] for k in
                     ('top1', 'top5', 'train_top1', 'final_train_loss',
                      'flops_reduction')}
  results = {
      **scores,
      # 'validation' when data.validation_size holds out part of the training
      # set: then 'top1' etc. are validation accuracies, not test ones.
      'eval_split': source.eval_split_name,
      'num_classes': int(source.num_classes),
      **({'dense_network': dense_network} if dense_network else {}),
      # Which protocol made these numbers, in words; its name and settings
      # are under 'linear_eval'.
      'protocol': PROTOCOLS[settings['protocol']],
      'sparse_inference': bool(eval_config.get('sparse_inference', False)),
      'linear_eval': settings,
      'model': _as_json(config.model),
      'gating': _as_json(config.gating),
      'data': _as_json(config.data),
      'config_notes': notes,
  }
  if jax.process_index() == 0:
    kept = keep_earlier_result(workdir, results)
    if kept:
      results['earlier_result_kept_as'] = kept
    with open(os.path.join(workdir, RESULTS_FILE), 'w') as f:
      json.dump(results, f, indent=2)
  return results


# What makes two linear evaluations of one backbone the same evaluation.
_SAME_EVALUATION = ('linear_eval', 'data', 'sparse_inference', 'eval_split')


def keep_earlier_result(workdir: str, results: Mapping[str, Any]) -> str | None:
  """Moves an earlier `linear_eval.json` of another evaluation aside.

  A second evaluation with other settings (the other protocol, other
  epochs, other data) must not destroy the first: the earlier file becomes
  `linear_eval.1.json` (then `.2`, ...), and the new result takes
  `linear_eval.json`. The same evaluation run again replaces its own file.

  Returns:
    The earlier file's new name, or None when nothing was moved.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      earlier = json.load(f)
  except ValueError:
    earlier = {}
  # Compared as JSON (tuples in memory are lists in the file).
  if all(earlier.get(key) == json.loads(json.dumps(results.get(key)))
         for key in _SAME_EVALUATION):
    return None
  stem, extension = os.path.splitext(RESULTS_FILE)
  number = 1
  while os.path.exists(os.path.join(workdir, f'{stem}.{number}{extension}')):
    number += 1
  name = f'{stem}.{number}{extension}'
  os.replace(path, os.path.join(workdir, name))
  return name


def linear_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `linear_eval` block as plain values, defaults filled in."""
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  settings = config_lib.base_config().linear_eval.to_dict()
  given = config.get('linear_eval')
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given or {})
  settings.update({k: v for k, v in given.items() if k != 'augmented'})
  settings['augmented'].update(given.get('augmented') or {})
  problems = config_lib.linear_eval_problems(settings)
  if problems:
    raise ValueError('Invalid linear_eval settings:\n  ' +
                     '\n  '.join(problems))
  return settings


def train_augmented_classifier(
    backbone: nn.Module, variables: Mapping[str, Any],
    source: input_pipeline.Source, augment_config: ml_collections.ConfigDict,
    num_classes: int, settings: Mapping[str, Any], seed: int,
    mesh: jax.sharding.Mesh) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The augmented linear protocol: a linear classifier on a frozen backbone.

  Every step draws a shuffled batch of training images (`source.
  train_batches`, a new order every epoch), augments each image on device
  with its own key (random resized crop with `augmented.crop_scale`, then
  a horizontal flip with probability 1/2: new crops every epoch), computes
  the backbone's features in eval mode (BatchNorm and gate saliency with
  running statistics; no gradient reaches the backbone, whose variables are
  an argument, not a parameter), and takes one SGD step on the classifier.

  Args:
    backbone: the (gated) backbone; variables: its variables.
    source: the data source.
    augment_config: the run's `augment` block (its mean/std normalise).
    num_classes: C.
    settings: `linear_settings(config)`: epochs, batch_size, augmented.*.
    seed: seed of the batch order, the crops and the flips.
    mesh: device mesh; batches are sharded over its 'data' axis.

  Returns:
    ({'kernel': (D, C), 'bias': (C,)} as numpy, mean training loss of each
    epoch).
  """
  hyper = settings['augmented']
  epochs, batch_size = int(settings['epochs']), int(settings['batch_size'])
  batch_size = min(batch_size, source.num_train)
  parallel.check_batch_divisible(batch_size, mesh, 'linear_eval.batch_size')
  steps_per_epoch = source.num_train // batch_size
  decays = {int(round(f * epochs)) * steps_per_epoch: 0.1
            for f in hyper['decay_fractions'] if 0 < f < 1}
  schedule = optax.piecewise_constant_schedule(float(hyper['learning_rate']),
                                               decays)
  tx = optax.chain(
      optax.add_decayed_weights(
          float(hyper['weight_decay']),
          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.sgd(schedule, momentum=float(hyper['momentum'])))
  view = augment.view_config(crop_scale=tuple(hyper['crop_scale']),
                             flip_prob=0.5, jitter_prob=0.0,
                             grayscale_prob=0.0)
  view.mean, view.std = augment_config.mean, augment_config.std
  normalize = hyper.get('feature_norm', 'none') == 'batchnorm'
  feature_dim = jax.eval_shape(
      lambda v, x: backbone.apply(v, x, train=False, mutable=['gating'])[0],
      variables, jax.ShapeDtypeStruct((1, *source.image_shape), jnp.float32)
  ).shape[-1]
  params = {'kernel': jnp.zeros((feature_dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(params)
  # Running statistics of the non-affine feature BatchNorm (unused without).
  norm_stats = {'mean': jnp.zeros((feature_dim,), jnp.float32),
                'var': jnp.ones((feature_dim,), jnp.float32)}

  def step(params, opt_state, norm_stats, variables, batch, key):
    images = augment.augment_view(key, batch['image'], view)
    features, _ = backbone.apply(variables, images, train=False,
                                 mutable=['gating'])
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    if normalize:
      # Frozen features of unknown scale (a gated backbone's are ~1.8x a
      # dense one's): normalised by the batch's statistics in training, by
      # their running averages at test time (MAE's linear probe), so one
      # learning rate fits every backbone.
      mean, var = jnp.mean(features, 0), jnp.var(features, 0)
      features = (features - mean) * jax.lax.rsqrt(var + FEATURE_NORM_EPSILON)
      norm_stats = jax.tree.map(
          lambda old, new: FEATURE_NORM_MOMENTUM * old
          + (1 - FEATURE_NORM_MOMENTUM) * new,
          norm_stats, {'mean': mean, 'var': var})
    loss, grads = jax.value_and_grad(_loss)(params, features, batch['label'])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm_stats, loss

  replicated = parallel.replicated(mesh)
  step = jax.jit(step, in_shardings=(replicated, replicated, replicated,
                                     replicated, parallel.data_sharding(mesh),
                                     replicated),
                 out_shardings=replicated, donate_argnums=(0, 1, 2))
  params, opt_state, norm_stats, variables = parallel.replicate(
      (params, opt_state, norm_stats, variables), mesh)
  batches = batching.prefetch(
      (batching.shard_batch(b, mesh)
       for b in source.train_batches(batch_size, seed)), size=2)
  base_key = jax.random.key(seed)
  epoch_losses = []
  try:
    for epoch in range(epochs):
      losses = []
      for i in range(steps_per_epoch):
        key = jax.random.fold_in(base_key, epoch * steps_per_epoch + i)
        params, opt_state, norm_stats, loss = step(
            params, opt_state, norm_stats, variables, next(batches), key)
        losses.append(loss)
      # One host sync per epoch.
      epoch_losses.append(float(np.mean(jax.device_get(losses))))
      logging.info('Augmented linear protocol, epoch %d/%d: loss %.4f',
                   epoch + 1, epochs, epoch_losses[-1])
  finally:
    batches.close()
  params = jax.device_get(params)
  if normalize:
    params = fold_feature_norm(params, jax.device_get(norm_stats))
  return params, np.asarray(epoch_losses)


def fold_feature_norm(params: Mapping[str, np.ndarray],
                      norm_stats: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
  """The classifier on raw features equal to (running-stat BatchNorm, params).

  `((x - m) / s) K + b = x (K / s) + (b - (m / s) K)` with s = sqrt(v + eps):
  at test time the non-affine BatchNorm is an affine map, folded into the
  linear layer, so the result scores raw features like any classifier here.
  """
  scale = 1.0 / np.sqrt(np.asarray(norm_stats['var'], np.float64)
                        + FEATURE_NORM_EPSILON)
  kernel = np.asarray(params['kernel'], np.float64)
  shift = np.asarray(norm_stats['mean'], np.float64) * scale
  return {'kernel': (kernel * scale[:, None]).astype(np.float32),
          'bias': (np.asarray(params['bias'], np.float64)
                   - shift @ kernel).astype(np.float32)}


def evaluate_network(backbone: nn.Module, variables: Mapping[str, Any],
                     source: input_pipeline.Source,
                     config: ml_collections.ConfigDict,
                     settings: Mapping[str, Any], batch_size: int,
                     mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The linear protocol (module doc) and test-set FLOPs of one network.

  Returns:
    {'top1', 'top5', 'train_top1', 'final_train_loss', 'flops_reduction',
    'gate_density', 'layer_density', 'flops' (the full report), 'num_train',
    'num_test', 'feature_dim'}.
  """
  train = evaluation.extract_features(backbone, variables, source, 'train',
                                      batch_size, config.augment, mesh)
  test = evaluation.extract_features(backbone, variables, source, 'test',
                                     batch_size, config.augment, mesh)
  if settings['protocol'] == 'augmented':
    # Raw features, as the literature's protocol; trained on augmented
    # images, scored on the centre (unaugmented) ones.
    train_x, test_x = train['features'], test['features']
    params, losses = train_augmented_classifier(
        backbone, variables, source, config.augment, source.num_classes,
        settings, int(config.seed), mesh)
  else:
    train_x, test_x = standardize(train['features'], test['features'])
    params, losses = train_linear_classifier(
        train_x, train['labels'], source.num_classes,
        epochs=int(settings['epochs']), batch_size=int(settings['batch_size']),
        learning_rate=float(settings['learning_rate']),
        weight_decay=float(settings['weight_decay']), seed=int(config.seed))
  test_acc = classifier_accuracy(params, test_x, test['labels'])
  train_acc = classifier_accuracy(params, train_x, train['labels'])
  report = evaluation.test_set_flops(backbone, variables, test['densities'],
                                     source.image_shape[:2])
  gated = report.gated_density
  return {
      'top1': test_acc['top1'],
      'top5': test_acc['top5'],
      'train_top1': train_acc['top1'],
      'final_train_loss': float(losses[-1]),
      'flops_reduction': float(report.reduction),
      'gate_density': 1.0 if gated is None else float(gated),
      'layer_density': {k: float(v) for k, v in test['densities'].items()},
      'flops': report.as_dict(),
      'num_train': int(len(train['labels'])),
      'num_test': int(len(test['labels'])),
      'feature_dim': int(train['features'].shape[1]),
  }


def format_summary(results: Mapping[str, Any], workdir: str) -> str:
  """Human-readable summary of `run_linear_eval`'s results."""
  model, gating = results['model'], results['gating']
  split = results.get('eval_split', 'test')
  lines = [
      f'Linear evaluation of {workdir} ({model["name"]}, width '
      f'{model.get("width", 64)}, gating.kind={gating["kind"]}):',
      f'  {split} top-1 {100 * results["top1"]:.2f}%, top-5 '
      f'{100 * results["top5"]:.2f}% on the {results["num_test"]} {split} '
      f'images (train top-1 {100 * results["train_top1"]:.2f}%, '
      f'{results["num_train"]} images)',
      f'  FLOPs reduction {results["flops_reduction"]:.3f}x, gated-layer '
      f'density {results["gate_density"]:.3f} (measured on the {split} '
      f'split)',
      f'  protocol: {results["protocol"]}',
  ]
  if results.get('sparse_inference'):
    lines.append('  features computed with block-sparse inference '
                 '(eval.sparse_inference=True): closed tiles skipped')
  if results.get('dense_network'):
    dense = results['dense_network']
    lines.insert(-1, f'  dense network of the same run (every gate open): '
                     f'{split} top-1 {100 * dense["top1"]:.2f}%, top-5 '
                     f'{100 * dense["top5"]:.2f}%, FLOPs reduction '
                     f'{dense["flops_reduction"]:.3f}x')
  lines += [f'  note: {note}' for note in results['config_notes']]
  lines.append(f'  written to {os.path.join(workdir, RESULTS_FILE)}')
  if results.get('earlier_result_kept_as'):
    lines.append(f'  the earlier result (another evaluation) was kept as '
                 f'{os.path.join(workdir, results["earlier_result_kept_as"])}')
  return '\n'.join(lines)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  from cdg_jax.run import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_logging()
  # Before JAX starts its backends: one CPU device per core.
  parallel.split_host_into_devices(flags.FLAGS.config.get('cpu_devices', 0))
  cli.initialize_distributed_from_flags()
  workdir = flags.FLAGS.workdir
  with cli.reported_errors():
    results = run_linear_eval(flags.FLAGS.config, workdir)
  if jax.process_index() == 0:
    print(format_summary(results, workdir))


def run() -> None:
  """Entry point of `python -m cdg_jax.linear_eval` and `cdg-linear-eval`."""
  # Flags are defined here, not at import, so that importing this module
  # (tests, notebooks, other mains) does not claim the global flag names.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/default.py; its model and '
      'gating blocks are replaced by the workdir\'s.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir of a finished run, holding '
                      'config.json and the exported backbone/.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.define_distributed_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
