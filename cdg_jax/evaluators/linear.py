"""Linear probes of a frozen backbone: the 'fast' and 'augmented' protocols.

'fast' (the default, ours): features of the train and test splits are
extracted once, with the backbone in evaluation mode (BatchNorm and gate
saliency with running statistics) and no augmentation (images at the training
resolution, only normalised). They are standardised with the train split's
per-dimension mean and std, and a linear softmax classifier is trained on
them with SGD (Nesterov momentum 0.9), a cosine learning-rate decay and L2
weight decay on the weights (not the bias), for `linear_eval.epochs` epochs
of minibatches of `linear_eval.batch_size`. The classifier after the last
epoch is evaluated once on the test set: there is no model selection on it.

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
raw features, solo-learn's form (the runs scored before 2026-12-03). Slower
(a backbone forward per image and epoch) and the numbers to set beside
published ones. Compare runs evaluated the same way.

The evaluators `evaluate_fast` and `evaluate_augmented` read the protocol's
settings from `context.linear_settings` (`cdg_jax.linear_eval.
linear_settings`, validated once by `config_lib.linear_eval_problems`).
"""

from __future__ import annotations

from collections.abc import Mapping
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
from cdg_jax.run import parallel
from cdg_jax.ssl.optimizers import decay_mask

# The augmented protocol's feature BatchNorm (MAE's linear probe: no affine
# parameters, eps 1e-6; PyTorch's momentum 0.1 is 0.9 in this convention).
FEATURE_NORM_EPSILON = 1e-6
FEATURE_NORM_MOMENTUM = 0.9
# Each protocol in words, recorded with every result ('protocol').
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


def _check_linear_inputs(features: np.ndarray, labels: np.ndarray,
                         num_classes: int) -> None:
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f'Expected (N, D) features and (N,) labels, got '
                     f'{features.shape} and {labels.shape}.')
  if features.shape[0] == 0:
    raise ValueError('No training features.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels lie in [{labels.min()}, {labels.max()}], outside '
                     f'[0, {num_classes}).')


def _sgd_epoch(tx: optax.GradientTransformation, num_examples: int,
               steps_per_epoch: int, batch_size: int):
  """One jitted epoch: `lax.scan` over minibatches of a fresh permutation."""

  @jax.jit
  def train_epoch(params, opt_state, features, labels, key):
    order = jax.random.permutation(key, num_examples)[
        :steps_per_epoch * batch_size]
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

  return train_epoch


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

  The settings' ranges are checked once, with the config
  (`config_lib.linear_eval_problems`).

  Returns:
    ({'kernel': (D, C), 'bias': (C,)} as numpy, per-epoch mean training loss
    (epochs,)).
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  _check_linear_inputs(features, labels, num_classes)
  n, dim = features.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate,
                                         epochs * steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                   optax.sgd(schedule, momentum=momentum, nesterov=True))
  # Zero init: the problem is convex, and zeros make runs reproducible.
  params = {'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(params)
  train_epoch = _sgd_epoch(tx, n, steps_per_epoch, batch_size)
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


def _augmented_optimizer(hyper: Mapping[str, Any], epochs: int,
                         steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum, x0.1 at each of `decay_fractions` of the epochs."""
  decays = {int(round(f * epochs)) * steps_per_epoch: 0.1
            for f in hyper['decay_fractions'] if 0 < f < 1}
  schedule = optax.piecewise_constant_schedule(float(hyper['learning_rate']),
                                               decays)
  return optax.chain(
      optax.add_decayed_weights(float(hyper['weight_decay']), mask=decay_mask),
      optax.sgd(schedule, momentum=float(hyper['momentum'])))


def _augmented_step(backbone: nn.Module, view: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, normalize: bool):
  """One classifier step on a freshly augmented batch (not jitted)."""

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

  return step


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
  tx = _augmented_optimizer(hyper, epochs, steps_per_epoch)
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
  replicated = parallel.replicated(mesh)
  step = jax.jit(_augmented_step(backbone, view, tx, normalize),
                 in_shardings=(replicated, replicated, replicated,
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


def _scores(params, train_x, test_x, context, losses) -> dict[str, Any]:
  train, test = context.features('train'), context.features('test')
  test_acc = classifier_accuracy(params, test_x, test['labels'])
  train_acc = classifier_accuracy(params, train_x, train['labels'])
  return {
      'top1': test_acc['top1'],
      'top5': test_acc['top5'],
      'train_top1': train_acc['top1'],
      'final_train_loss': float(losses[-1]),
      'num_train': int(len(train['labels'])),
      'num_test': int(len(test['labels'])),
      'feature_dim': int(train['features'].shape[1]),
  }


def evaluate_fast(context) -> dict[str, Any]:
  """The 'fast' protocol on the context's shared features.

  Returns:
    {'top1', 'top5', 'train_top1', 'final_train_loss', 'num_train',
    'num_test', 'feature_dim'}.
  """
  settings = context.linear_settings
  train, test = context.features('train'), context.features('test')
  train_x, test_x = standardize(train['features'], test['features'])
  params, losses = train_linear_classifier(
      train_x, train['labels'], context.source.num_classes,
      epochs=int(settings['epochs']), batch_size=int(settings['batch_size']),
      learning_rate=float(settings['learning_rate']),
      weight_decay=float(settings['weight_decay']), seed=context.seed)
  return _scores(params, train_x, test_x, context, losses)


def evaluate_augmented(context) -> dict[str, Any]:
  """The 'augmented' protocol: trained on augmented images, scored on the
  raw features of the centre (unaugmented) ones; keys as `evaluate_fast`."""
  params, losses = train_augmented_classifier(
      context.backbone, context.variables, context.source,
      context.augment_config, context.source.num_classes,
      context.linear_settings, context.seed, context.mesh)
  return _scores(params, context.features('train')['features'],
                 context.features('test')['features'], context, losses)
