"""Defaults and variants shared by the config files in `configs/`.

Config files call `base_config()`, set what differs, and finish with
`apply_variants(config, arg)` so that `--config=configs/x.py:smoke,dense`
works for every file. Living in the package (not in `configs/`) lets config
files be loaded from any working directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import numbers
import types
from typing import Any


import ml_collections

from cdg_jax.data import augment
from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.evaluators import knn
from cdg_jax.evaluators import linear
from cdg_jax.gating import layers
from cdg_jax.gating import regularizers
from cdg_jax.ssl import frameworks
from cdg_jax.ssl import models
from cdg_jax.ssl import pretraining

# Protocols of `linear_eval.protocol` (described in cdg_jax/evaluators/linear.py).
LINEAR_PROTOCOLS = tuple(linear.PROTOCOLS)
# Feature normalisation of the augmented protocol (`linear_eval.augmented.
# feature_norm`).
FEATURE_NORMS = ('batchnorm', 'none')



# The `gating` block's fields, in the config's order. Each is a field of the
# same name of the spec that reads it (`GatingConfig`), but for
# `sparse_training`, which sets the layer spec's `execution`. `layers` and
# `stage_blocks` are the ResNet's (`models.ResNetGating`), the rest of the
# network spec the gated layers' (`layers.GatingSpec`).
GATING_FIELDS = (
    'kind', 'groups', 'grouping', 'block', 'stage_blocks', 'alpha',
    'surrogate', 'threshold_init', 'layers', 'saliency_norm', 'saliency_grad',
    'saliency_momentum', 'epsilon', 'saliency_stats', 'branches',
    'partner_norm', 'predictor_saliency', 'regularizer', 'weight',
    'threshold_target', 'density_target', 'target_anneal_fraction',
    'budget_bounds_fraction', 'budget_start_fraction', 'budget_ramp_fraction',
    'gumbel_temperature', 'sparse_training', 'closed_tile_gradient',
    'closed_tile_sample')
_GATING_SPECS = (models.ResNetGating, regularizers.RegularizerSpec,
                 pretraining.BranchSpec)


def _gating_defaults() -> dict[str, Any]:
  """Every `gating` field's default: its spec's (stated once, there)."""
  defaults = {'sparse_training': False}
  for spec in _GATING_SPECS:
    for field in dataclasses.fields(spec):
      defaults.setdefault(field.name, field.default)
  return {name: defaults[name] for name in GATING_FIELDS}


def gating_config() -> ml_collections.ConfigDict:
  """The `gating` block: the one place gating is configured.

  Built from the specs' defaults (`GatingConfig`), where every field is
  described; `layers` is written as a comma-separated string of roles, as on
  the command line.
  """
  defaults = _gating_defaults()
  defaults['layers'] = ','.join(defaults['layers'])
  return ml_collections.ConfigDict(defaults)


@dataclasses.dataclass(frozen=True)
class GatingConfig:
  """The config's `gating` block as typed specs (`read_gating`).

  Attributes:
    layer: the ResNet's gating (`models.ResNetGating`): what its gated
      layers compute (a `layers.GatingSpec`) and where they sit
      (`gating.layers`, `gating.stage_blocks`).
    loss: the gates' regulariser (`regularizers.RegularizerSpec`); None
      without gates.
    branches: how the SSL branches are wired (`pretraining.BranchSpec`).
  """
  layer: models.ResNetGating
  loss: regularizers.RegularizerSpec | None
  branches: pretraining.BranchSpec


def _block_value(field: str, value: Any) -> tuple[int, int, int]:
  """A config's (bh, bw, bc) as ints, or ValueError naming `field`."""
  if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
      or len(value) != 3 or not all(isinstance(b, numbers.Integral)
                                    and not isinstance(b, bool) for b in value)):
    raise ValueError(f'{field}={value!r} must be three ints (bh, bw, bc), e.g. '
                     f'(4, 4, 0): a block of bh x bw positions and bc channels '
                     f'(0: all channels).')
  return tuple(int(b) for b in value)


def _gating_values(block: Mapping[str, Any] | None) -> dict[str, Any]:
  """The block's values with defaults filled in and tuples made; unknown
  fields are errors."""
  given = {} if block is None else (
      dict(block.items()) if hasattr(block, 'items') else dict(block))
  unknown = sorted(set(given) - set(GATING_FIELDS))
  if unknown:
    raise ValueError(f'Unknown gating config field(s) {unknown}; known fields: '
                     f'{sorted(GATING_FIELDS)}.')
  values = {**_gating_defaults(), **given}
  if block is None:
    values['kind'] = 'none'
  values['block'] = _block_value('gating.block', values['block'])
  stage_blocks = values['stage_blocks']
  if isinstance(stage_blocks, (str, bytes)) or not isinstance(
      stage_blocks, Sequence):
    raise ValueError(
        f'gating.stage_blocks={stage_blocks!r} must be a tuple of one '
        f'(bh, bw, bc) per ResNet stage, e.g. ((8, 8, 0), (8, 8, 0), '
        f'(4, 4, 0), (4, 4, 0)), or () to use gating.block everywhere.')
  values['stage_blocks'] = tuple(
      _block_value(f'gating.stage_blocks[{i}]', block)
      for i, block in enumerate(stage_blocks))
  roles = values['layers']
  if isinstance(roles, str):
    roles = [s.strip() for s in roles.split(',') if s.strip()]
  values['layers'] = tuple(roles)
  return values


def read_gating(block: Mapping[str, Any] | None) -> GatingConfig:
  """The one parse of a config's `gating` block into typed specs.

  A field set away from its default where nothing reads it is refused
  (`FIELD_READ_WHEN`); each spec checks its own values' ranges.

  Args:
    block: the `gating` block (a ConfigDict or a dict, missing fields at
      their defaults); None: the dense network.

  Raises:
    ValueError naming the field, its value and what it must be.
  """
  values = _gating_values(block)
  _check_read(values)
  def fields_of(spec):
    return {f.name: values[f.name] for f in dataclasses.fields(spec)
            if f.name in values}
  branches = pretraining.BranchSpec(**fields_of(pretraining.BranchSpec))
  layer = models.ResNetGating(
      **fields_of(models.ResNetGating),
      execution='sparse_training' if values['sparse_training'] else 'masked')
  if branches.has_dense_partner and layer.kind != 'cdg':
    raise ValueError(
        f"gating.branches='dense_partner' is implemented for "
        f"gating.kind='cdg', got gating.kind={layer.kind!r}.")
  loss = (regularizers.RegularizerSpec(
      **fields_of(regularizers.RegularizerSpec)) if layer.enabled else None)
  return GatingConfig(layer=layer, loss=loss, branches=branches)


def _uses_density_target(s) -> bool:
  return s.kind in layers.PREDICTOR_KINDS or (
      s.kind == 'cdg' and s.regularizer in ('density', 'flops'))


# Where each gating field is read -- the rule stated once, here: (the
# fields the condition depends on, the condition in words, the condition on
# the block's values). A field set away from its default where nothing reads
# it would be silently ignored, so it is refused before any work, naming the
# field, the value and what to change. Fields without an entry are read
# whenever gates are ('kind' itself, 'sparse_training' with its own tile
# rule, `layers.GatingSpec`; 'layers', the ResNet's, `models.ResNetGating`).
_CDG = (('kind',), "gating.kind='cdg'", lambda s: s.kind == 'cdg')
_GATED = (('kind',), "a gated kind (gating.kind other than 'none')",
          lambda s: s.kind != 'none')
_DENSITY = (('kind', 'regularizer'), "gating.kind='channel_predictor' or "
            "'spatial_predictor', or gating.kind='cdg' with gating."
            "regularizer='density' or 'flops'", _uses_density_target)
_ANNEALED = (('kind', 'regularizer'), "gating.kind='spatial_predictor', or "
             "gating.kind='cdg' with gating.regularizer='density' or 'flops' "
             "(a density target to anneal)",
             lambda s: s.kind == 'spatial_predictor' or (
                 s.kind == 'cdg' and s.regularizer in ('density', 'flops')))
_BUDGET = (('kind', 'regularizer'), "the FLOPs budget (gating.kind='cdg' "
           "with gating.regularizer='flops')",
           lambda s: s.kind == 'cdg' and s.regularizer == 'flops')
FIELD_READ_WHEN = {
    'groups': _CDG, 'grouping': _CDG, 'stage_blocks': _CDG, 'alpha': _CDG,
    'surrogate': _CDG, 'threshold_init': _CDG, 'saliency_norm': _CDG,
    'saliency_grad': _CDG, 'saliency_momentum': _CDG, 'epsilon': _CDG,
    'saliency_stats': _CDG,
    # The predictor kinds' auxiliary loss is fixed by the kind.
    'regularizer': _CDG,
    'block': (('kind',), "gating.kind='cdg' or 'spatial_predictor' (the "
              "channel predictor gates whole channels)",
              lambda s: s.kind in ('cdg', 'spatial_predictor')),
    'layers': _GATED, 'branches': _GATED, 'weight': _GATED,
    'partner_norm': (('branches',), "gating.branches='dense_partner'",
                     lambda s: s.branches == 'dense_partner'),
    'predictor_saliency': (('kind',), "gating.kind='channel_predictor'",
                           lambda s: s.kind == 'channel_predictor'),
    'threshold_target': (('kind', 'regularizer'), "gating.kind='cdg' with "
                         "gating.regularizer='threshold' or 'threshold_sum'",
                         lambda s: s.kind == 'cdg' and s.regularizer in (
                             'threshold', 'threshold_sum')),
    'density_target': _DENSITY,
    'target_anneal_fraction': _ANNEALED,
    'budget_bounds_fraction': _BUDGET, 'budget_start_fraction': _BUDGET,
    'budget_ramp_fraction': _BUDGET,
    'gumbel_temperature': (('kind',), "gating.kind='spatial_predictor'",
                           lambda s: s.kind == 'spatial_predictor'),
    'closed_tile_gradient': (('sparse_training',), 'the sparse train step '
                             '(gating.sparse_training=True)',
                             lambda s: s.sparse_training),
    'closed_tile_sample': (('closed_tile_gradient',),
                           "gating.closed_tile_gradient='sampled'",
                           lambda s: s.closed_tile_gradient == 'sampled'),
}


def _check_read(values: Mapping[str, Any]) -> None:
  """ValueError for a field set away from its default where it is not read."""
  defaults = _gating_values({})
  block = types.SimpleNamespace(**values)
  for name, (depends, where, read) in FIELD_READ_WHEN.items():
    value = values[name]
    if value == defaults[name] or read(block):
      continue
    given = ', '.join(f'gating.{d}={values[d]!r}' for d in depends)
    raise ValueError(
        f'gating.{name}={value!r} would be ignored: it is read only with '
        f'{where}, and this config has {given}. Remove the override (the '
        f'default is {defaults[name]!r}) or change '
        f'{" or ".join(f"gating.{d}" for d in depends)}.')


def _model_config() -> ml_collections.ConfigDict:
  """The `model` block: the backbone and its compute dtype."""
  return ml_collections.ConfigDict(dict(
      name='resnet18', stem='cifar', width=64,
      # Compute dtype of convolutions and matmuls: 'bfloat16' (mixed
      # precision, for GPUs and TPUs) or 'float32'. Parameters, optimiser
      # state, BatchNorm statistics, losses and the gate decision (saliency
      # normalisation, threshold comparison) stay float32 either way.
      dtype='float32'))


def _ssl_config() -> ml_collections.ConfigDict:
  """The `ssl` block: the framework's heads, loss and target encoder."""
  return ml_collections.ConfigDict(dict(
      projector_hidden_dims=(2048,),
      projector_dim=128,
      projector_last_bn=False,
      predictor_hidden_dims=(),    # BYOL/SimSiam set theirs
      predictor_dim=0,
      temperature=0.5,             # SimCLR NT-Xent / MoCo InfoNCE
      queue_size=4096,             # MoCo negatives
      base_tau=0.99,               # EMA of the target encoder
      tau_schedule='cosine',       # 'cosine' (BYOL: base -> 1) | 'constant'
  ))


def _optim_config() -> ml_collections.ConfigDict:
  """The `optim` block: the pretraining optimiser."""
  return ml_collections.ConfigDict(dict(
      name='lars',                 # 'lars' | 'sgd'
      base_learning_rate=1.0,      # scaled by batch_size / 256
      weight_decay=1e-6,           # not applied to biases, norms, thresholds
      momentum=0.9,
      trust_coefficient=1e-3,      # LARS
      warmup_epochs=10.0,
  ))


def _data_config() -> ml_collections.ConfigDict:
  """The `data` block: the input pipeline (cdg_jax/data/input_pipeline.py)."""
  return ml_collections.ConfigDict(dict(
      source='tfds',               # 'tfds' | 'npz' | 'fake'
      dataset='cifar10',           # tfds: cifar10 | cifar100 | imagenet100 |
                                   # imagenet2012
      data_dir='',                 # TFDS data dir; '' = ~/tensorflow_datasets
      npz_path='',                 # npz: x_train, y_train, x_test, y_test
      image_size=32,               # host resolution (square)
      num_classes=10,
      fake_num_train=10_000,       # fake: synthetic examples per split
      fake_num_test=2_000,
      shuffle_buffer=10_000,       # ImageNet stream only; arrays shuffle fully
      validation_size=0,           # > 0: hold out this many class-balanced
                                   # training images and evaluate on them
                                   # instead of the test set (model selection)
      prefetch=2,                  # host batches prepared ahead
  ))


def _augment_config(data: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The `augment` block (cdg_jax/data/augment.py), its image size a
  reference to `data.image_size`; mean/std per dataset."""
  config = augment.augment_preset('simclr_cifar', 32)
  config.image_size = data.get_ref('image_size')
  return config


def _eval_config() -> ml_collections.ConfigDict:
  """The `eval` block (cdg_jax/evaluators/): weighted kNN monitor
  (bank = train split, queries = test split) and FLOPs measured on the test
  split."""
  return ml_collections.ConfigDict(dict(
      knn_k=knn.DEFAULT_KNN_K,
      knn_temperature=knn.DEFAULT_KNN_TEMPERATURE,
      batch_size=extraction.DEFAULT_EVAL_BATCH_SIZE,  # rounded up to a
                                   # multiple of the devices
      every_steps=0,
      sparse_inference=False,      # skip closed tiles (CDG with gating.block
                                   # (bh, bw, 0)); same features, less time
  ))


def _linear_eval_config() -> ml_collections.ConfigDict:
  """The `linear_eval` block: linear evaluation of the frozen backbone
  (cdg_jax/linear_eval.py)."""
  return ml_collections.ConfigDict(dict(
      # 'fast': features extracted once without augmentation, standardised,
      # SGD Nesterov + cosine (ours, quick). 'augmented': the SSL
      # literature's protocol (solo-learn's linear scripts, SimCLR's linear
      # evaluation): random resized crop + flip recomputed every epoch, SGD,
      # step decay; centre (unaugmented) test images.
      protocol='fast',
      epochs=100,
      batch_size=256,
      learning_rate=0.1,
      weight_decay=1e-4,           # fast protocol: L2 on the weights, not
                                   # the bias
      # The augmented protocol's settings, solo-learn's (linear/cifar): SGD
      # momentum 0.9, lr 0.1 at batch 256, no weight decay, lr x0.1 after
      # 60% and 80% of the epochs (epochs 60 and 80 of 100).
      augmented=ml_collections.ConfigDict(dict(
          learning_rate=0.1,
          momentum=0.9,
          weight_decay=0.0,
          decay_fractions=(0.6, 0.8),
          crop_scale=(0.08, 1.0),
          # 'batchnorm': a non-affine BatchNorm before the classifier (MAE's
          # linear probe; frozen features of any scale train at one lr) |
          # 'none': raw features (solo-learn; runs before 2026-12-03).
          feature_norm='batchnorm',
      )),
  ))


def base_config() -> ml_collections.ConfigDict:
  """CDG-gated CIFAR ResNet-18 on CIFAR-10 at 32x32."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = _model_config()
  config.gating = gating_config()
  # Self-supervised framework and its heads (see cdg_jax/ssl/pretraining.py).
  config.framework = 'simclr'      # a key of frameworks.FRAMEWORK_TABLE
  config.ssl = _ssl_config()
  config.optim = _optim_config()
  config.probe = ml_collections.ConfigDict(dict(learning_rate=1e-3))
  config.batch_size = 256          # global, images (each gives two views)
  config.num_epochs = 800.0
  config.num_steps = -1            # > 0 overrides num_epochs
  # Training program (cdg_jax/train.py).
  config.log_every_steps = 50      # metrics are fetched from device only here
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2))
  config.cpu_devices = 0           # CPU only: devices to split the host into
                                   # (0: one per core; 1: leave XLA alone)
  config.plot_images = 4           # test images in the end-of-run mask plot
  config.data = _data_config()
  config.augment = _augment_config(config.data)
  config.eval = _eval_config()
  config.linear_eval = _linear_eval_config()
  return config


# The SSL frameworks' recipes on CIFAR, as the literature's CIFAR scripts set
# them (solo-learn; SimCLR's and MoCo v2's papers for the temperatures):
# what `recipe_config` sets on top of `base_config()`. The config files in
# configs/ pick a recipe and a dataset; their docstrings say where each
# number comes from and what to expect.
CIFAR_RECIPES = {
    'simclr': dict(
        augment='simclr_cifar',
        ssl=dict(projector_hidden_dims=(2048,), projector_dim=128,
                 temperature=0.2),
        # lr x batch/256 (SimCLR: 0.3 * B/256 for 1000 epochs on ImageNet).
        optim=dict(name='lars', base_learning_rate=1.0, weight_decay=1e-6,
                   warmup_epochs=10.0),
        batch_size=512, num_epochs=800.0),
    'mocov2': dict(
        augment='simclr_cifar',
        ssl=dict(projector_hidden_dims=(512,), projector_dim=128,
                 temperature=0.1, queue_size=4096, base_tau=0.99,
                 tau_schedule='constant'),
        # lr x batch/256 -> 0.06 at 512.
        optim=dict(name='sgd', base_learning_rate=0.03, weight_decay=5e-4,
                   warmup_epochs=0.0),
        batch_size=512, num_epochs=200.0),
    'byol': dict(
        augment='byol_cifar',
        ssl=dict(projector_hidden_dims=(4096,), projector_dim=256,
                 predictor_hidden_dims=(4096,), predictor_dim=256,
                 base_tau=0.99, tau_schedule='cosine'),
        optim=dict(name='lars', base_learning_rate=1.0, weight_decay=1e-5,
                   warmup_epochs=10.0),
        batch_size=256, num_epochs=1000.0),
    'simsiam': dict(
        augment='simclr_cifar',
        ssl=dict(projector_hidden_dims=(2048, 2048), projector_dim=2048,
                 projector_last_bn=True, predictor_hidden_dims=(512,),
                 predictor_dim=2048),
        optim=dict(name='sgd', base_learning_rate=0.03, weight_decay=5e-4,
                   warmup_epochs=0.0),
        batch_size=512, num_epochs=800.0),
}
# Number of classes of each dataset a config file names.
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet100': 100}


def recipe_config(framework: str, dataset: str,
                  recipe: dict[str, Any] | None = None,
                  augment_name: str | None = None,
                  image_size: int = 32) -> ml_collections.ConfigDict:
  """`base_config()` with a framework's recipe on a dataset.

  Args:
    framework: a key of `CIFAR_RECIPES` (and `config.framework`).
    dataset: 'cifar10', 'cifar100' or 'imagenet100'.
    recipe: the recipe to apply instead of `CIFAR_RECIPES[framework]` (same
      keys: 'augment', 'ssl', 'optim', 'batch_size', 'num_epochs').
    augment_name: the `augment.augment_preset` name instead of the
      recipe's.
    image_size: `data.image_size`; the augmentation block follows it by
      reference, so an override of `data.image_size` moves both.
  """
  recipe = CIFAR_RECIPES[framework] if recipe is None else recipe
  config = base_config()
  config.framework = framework
  config.data.dataset = dataset
  config.data.num_classes = NUM_CLASSES[dataset]
  if image_size != config.data.image_size:
    config.data.image_size = image_size
  config.augment = augment.augment_preset(
      augment_name or recipe['augment'], image_size, dataset)
  config.augment.image_size = config.data.get_ref('image_size')
  for block in ('ssl', 'optim'):
    config[block].update(recipe[block])
  config.batch_size = recipe['batch_size']
  config.num_epochs = recipe['num_epochs']
  return config


def _smoke(config: ml_collections.ConfigDict) -> None:
  """A tiny network on synthetic data, for runs that finish in seconds."""
  config.model.name = 'resnet10'
  config.model.width = 8
  config.data.source = 'fake'
  config.data.image_size = 16
  config.data.fake_num_train = 512
  config.data.fake_num_test = 200
  config.ssl.projector_hidden_dims = (64,)
  config.ssl.projector_dim = 32
  if config.ssl.predictor_dim > 0:
    config.ssl.predictor_hidden_dims = (64,)
    config.ssl.predictor_dim = 32
  config.ssl.queue_size = 128
  config.batch_size = 32
  config.num_steps = 20
  config.optim.warmup_epochs = 0.0
  config.log_every_steps = 5
  config.checkpoint.every_steps = 10


def _dense(config: ml_collections.ConfigDict) -> None:
  # Every other gating field is unread without gates (and refused when
  # set): the dense run of a config file that tunes its gates.
  config.gating = gating_config()
  config.gating.kind = 'none'


def _dense_partner(config: ml_collections.ConfigDict) -> None:
  # A framework with a target encoder leaves it dense instead.
  has_target = frameworks.FRAMEWORK_TABLE[config.framework].target
  config.gating.branches = 'online' if has_target else 'dense_partner'


def _gating_fields(**fields):
  def apply(config: ml_collections.ConfigDict) -> None:
    for name, value in fields.items():
      config.gating[name] = value
  return apply


# Variant name -> what it changes (see `apply_variants`); a new variant is
# one entry.
VARIANT_TABLE = {
    'smoke': _smoke,
    'dense': _dense,
    'structured': _gating_fields(block=(2, 2, 4)),
    'tiles': _gating_fields(block=(4, 4, 0)),
    # FBS-style L1 on the saliencies.
    'channel_predictor': _gating_fields(kind='channel_predictor',
                                        density_target=0.5, weight=1e-4),
    'spatial_predictor': _gating_fields(kind='spatial_predictor',
                                        density_target=0.5, weight=1.0),
    'dense_partner': _dense_partner,
}
VARIANTS = tuple(VARIANT_TABLE)


def apply_variants(config: ml_collections.ConfigDict,
                   arg: str | None) -> ml_collections.ConfigDict:
  """Applies comma-separated variants (`VARIANT_TABLE`), in order.

  smoke: tiny network on synthetic data, for runs that finish in seconds.
  dense: the same run without gating (`gating.kind='none'`, the other
    gating fields at their defaults).
  structured: CDG with (2, 2, 4) blocks instead of unstructured gates.
  tiles: CDG with 4x4 tiles of positions across all channels, (4, 4, 0):
    what block-sparse inference skips (`eval.sparse_inference`).
  channel_predictor, spatial_predictor: the predictor baselines in place of
    CDG, at density target 0.5 (about 2x fewer backbone FLOPs, like CDG at
    0.25 with its always-computed base path); the channel predictor's L1
    saliency loss gets weight 1e-4, the spatial predictor's density loss 1.0.
  dense_partner: CDG's dense-partner form (ours, after Krishna et al.; see
    `pretraining.BranchSpec.branches`): 'dense_partner' for SimCLR and
    SimSiam, 'online' (dense target) for MoCo v2 and BYOL.
  """
  for variant in [v.strip() for v in (arg or '').split(',') if v.strip()]:
    if variant not in VARIANT_TABLE:
      raise ValueError(f'Unknown config variant {variant!r}; expected any of '
                       f'{VARIANTS}, comma-separated.')
    VARIANT_TABLE[variant](config)
  return config


def _field_paths(config, prefix=''):
  paths = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _field_paths(value, f'{prefix}{key}.')
    else:
      paths.add(f'{prefix}{key}')
  return paths


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming fields that `base_config()` does not define.

  A typo in a config file (`config.gating.grups = 2`) would otherwise add a
  new, silently ignored field.
  """
  known = _field_paths(base_config())
  unknown = sorted(_field_paths(config) - known)
  if unknown:
    raise ValueError(f'Unknown config field(s) {unknown}: not defined in '
                     f'cdg_jax.run.config_lib.base_config() (a typo?).')


def _problems(config: ml_collections.ConfigDict
              ) -> tuple[list[str], GatingConfig | None]:
  """Every out-of-range value of a config (see `validate`), and the gating
  spec when the `gating` block parses."""
  problems = []
  spec = None

  def need(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  need(config.log_every_steps > 0,
       f'log_every_steps={config.log_every_steps} must be positive.')
  need(config.checkpoint.every_steps > 0, f'checkpoint.every_steps='
       f'{config.checkpoint.every_steps} must be positive.')
  need(config.checkpoint.keep >= 1,
       f'checkpoint.keep={config.checkpoint.keep} must be at least 1.')
  need(config.cpu_devices >= 0,
       f'cpu_devices={config.cpu_devices} must be >= 0 (0: one per core).')
  # Each block is checked by the module that reads it.
  problems += pretraining.config_problems(config)
  problems += models.config_problems(config.model)
  problems += input_pipeline.config_problems(config.data)
  problems += extraction.config_problems(config.eval)
  problems += linear_eval_problems(config.linear_eval.to_dict())
  try:
    spec = read_gating(config.gating)
    if config.framework in frameworks.FRAMEWORKS:
      pretraining.check_branches(config.framework, spec.layer, spec.branches)
    if config.model.name in models.ARCHITECTURES:
      spec.layer.for_stage(0, len(models.ARCHITECTURES[config.model.name][0]))
    if config.eval.sparse_inference:
      spec.layer.with_sparse_inference()
  except ValueError as e:
    problems.append(str(e))
  return problems, spec


def linear_eval_problems(settings: Mapping[str, Any]) -> list[str]:
  """Every out-of-range value of a `linear_eval` block, each naming its field.

  Checked before any work: by `linear_eval.linear_settings` (the linear
  evaluation command) and by `validate` (training, whose config carries the
  block for a later evaluation).
  """
  problems = []

  def need(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  need(settings['protocol'] in LINEAR_PROTOCOLS, f'linear_eval.protocol='
       f'{settings["protocol"]!r} must be one of {sorted(LINEAR_PROTOCOLS)}.')
  need(settings['epochs'] > 0, f'linear_eval.epochs={settings["epochs"]} must '
       f'be a positive number of passes over the training set.')
  need(settings['batch_size'] > 0, f'linear_eval.batch_size='
       f'{settings["batch_size"]} must be positive.')
  need(settings['learning_rate'] > 0, f'linear_eval.learning_rate='
       f'{settings["learning_rate"]} must be positive.')
  need(settings['weight_decay'] >= 0, f'linear_eval.weight_decay='
       f'{settings["weight_decay"]} must be >= 0.')
  hyper = settings['augmented']
  need(hyper['learning_rate'] > 0, f'linear_eval.augmented.learning_rate='
       f'{hyper["learning_rate"]} must be positive.')
  need(0 <= hyper['momentum'] < 1, f'linear_eval.augmented.momentum='
       f'{hyper["momentum"]} must be in [0, 1).')
  need(hyper['weight_decay'] >= 0, f'linear_eval.augmented.weight_decay='
       f'{hyper["weight_decay"]} must be >= 0.')
  need(all(0 < f <= 1 for f in hyper['decay_fractions']),
       f'linear_eval.augmented.decay_fractions={tuple(hyper["decay_fractions"])}'
       f' must be fractions of the epochs in (0, 1].')
  need(hyper.get('feature_norm', 'none') in FEATURE_NORMS,
       f'linear_eval.augmented.feature_norm={hyper.get("feature_norm")!r} '
       f'must be one of {list(FEATURE_NORMS)}.')
  scale = tuple(hyper['crop_scale'])
  need(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
       f'linear_eval.augmented.crop_scale={scale} must be (low, high) with '
       f'0 < low <= high <= 1.')
  return problems


def validate(config: ml_collections.ConfigDict) -> GatingConfig:
  """Checks field names and value ranges of a whole config, before any work.

  Returns:
    The `gating` block as typed specs (`read_gating`): the run's one parse
    of it, which the entry point passes down (`pretraining.read_settings`,
    `models.create_resnet`).

  Raises:
    ValueError listing every unknown field or out-of-range value, each with
    the value and what it must be.
  """
  check_fields(config)
  problems, spec = _problems(config)
  if problems:
    raise ValueError('Invalid config:\n  ' + '\n  '.join(problems))
  return spec
