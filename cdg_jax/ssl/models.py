"""Gated ResNet-10/18/34/50 in Flax Linen, with CIFAR and ImageNet stems.

Every convolution is a `GatedConv`; whether it is gated is decided by its role
('stem', 'block_3x3', 'block_1x1', 'shortcut') and `gating.layers`. With
`gating.kind='none'` the network is the plain dense ResNet with the same
parameter tree minus the gate parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdg_jax.gating.layers import check_gate_mode, GatedConv, GatingSpec
from cdg_jax.gating.ops import BlockTilingError

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# Compute dtypes of convolutions and matmuls (`model.dtype`). Parameters,
# optimiser state, BatchNorm statistics, the gate decision and the losses stay
# float32 whatever this is (see `GatedConv`).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def path_norm(make_norm: Callable[..., nn.Module], name: str, gate_mode: str,
              separate: bool, initializing: bool
              ) -> Callable[[jax.Array], jax.Array]:
  """The normalisation after a convolution, for one gate mode.

  With `separate` (the dense partner's own BatchNorm, `GatingSpec.
  partner_norm='separate'`), the open (dense) path goes through
  `<name>_dense` and the gated path through `<name>`; in 'partner' mode the
  first half of the batch is the gated path, the second the open one, and
  each BatchNorm sees only its own half. Both layers are created at
  initialisation in every mode, so a network has one variable tree whatever
  its gate mode. Without `separate`, `<name>` normalises the whole batch.

  Call it inside the compact method of the module that owns the layers.
  """
  gated_norm = make_norm(name=name)
  if not separate:
    return gated_norm
  open_norm = make_norm(name=f'{name}_dense')

  def apply(y: jax.Array) -> jax.Array:
    if gate_mode == 'partner':
      n = y.shape[0] // 2
      return jnp.concatenate([gated_norm(y[:n]), open_norm(y[n:])])
    if initializing:   # create the other path's variables too
      (open_norm if gate_mode == 'gated' else gated_norm)(y)
    return open_norm(y) if gate_mode == 'open' else gated_norm(y)
  return apply


def compute_dtype(name: str) -> Any:
  """The jnp dtype for `model.dtype` (checked by `config_problems`)."""
  return COMPUTE_DTYPES[name]


class ResidualBlock(nn.Module):
  """What every residual block shares: its fields, its layer factories and
  its shortcut. Subclasses define `expansion` and `__call__`."""
  features: int
  strides: int = 1
  gating: GatingSpec = GatingSpec(kind='none')
  dtype: Any = jnp.float32
  gate_mode: str = 'gated'
  separate_partner_norm: bool = False
  expansion = 1

  def layer_factories(self, train: bool):
    """(gate, norm, conv): the spec of a convolution role (None: dense), the
    normalisation after a convolution (`path_norm`, by name) and the
    convolution, all in this block's dtype and gate mode. Each convolution
    applies the BatchNorm after it (the channel-predictor baseline scales its
    channels after the normalisation)."""
    spec = self.gating
    gate = lambda role: spec if spec.gates(role) else None
    norm = functools.partial(
        path_norm, functools.partial(BatchNorm, use_running_average=not train,
                                     dtype=self.dtype),
        gate_mode=self.gate_mode, separate=self.separate_partner_norm,
        initializing=self.is_initializing())
    conv = functools.partial(GatedConv, dtype=self.dtype,
                             gate_mode=self.gate_mode)
    return gate, norm, conv

  def shortcut(self, x, out_features: int, train: bool, stat_groups: int):
    """Identity, or a 1x1 projection when the stride or width changes."""
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    gate, norm, conv = self.layer_factories(train)
    return conv(out_features, (1, 1), (self.strides, self.strides),
                gate('shortcut'), name='shortcut_conv')(
                    x, train, stat_groups, norm=norm('shortcut_bn'))


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False, stat_groups: int = 1):
    gate, norm, conv = self.layer_factories(train)
    s = (self.strides, self.strides)
    y = conv(self.features, (3, 3), s, gate('block_3x3'), name='conv1')(
        x, train, stat_groups, norm=norm('bn1'))
    y = conv(self.features, (3, 3), (1, 1), gate('block_3x3'),
             name='conv2')(nn.relu(y), train, stat_groups, norm=norm('bn2'))
    return nn.relu(y + self.shortcut(x, self.features, train, stat_groups))


class Bottleneck(ResidualBlock):
  """1x1 reduce, 3x3 (strided, as in torchvision v1.5), 1x1 expand by 4."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False, stat_groups: int = 1):
    gate, norm, conv = self.layer_factories(train)
    s = (self.strides, self.strides)
    out_features = self.features * self.expansion
    y = conv(self.features, (1, 1), (1, 1), gate('block_1x1'),
             name='conv1')(x, train, stat_groups, norm=norm('bn1'))
    y = conv(self.features, (3, 3), s, gate('block_3x3'), name='conv2')(
        nn.relu(y), train, stat_groups, norm=norm('bn2'))
    y = conv(out_features, (1, 1), (1, 1), gate('block_1x1'),
             name='conv3')(nn.relu(y), train, stat_groups, norm=norm('bn3'))
    return nn.relu(y + self.shortcut(x, out_features, train, stat_groups))


class ResNet(nn.Module):
  """A ResNet backbone, optionally with a linear classification head.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `Bottleneck`.
    width: channels of the first stage (64 in the standard networks); stage i
      has width * 2**i (times 4 at the output of bottleneck blocks).
    stem: 'cifar' (3x3 stride-1 conv, no max-pool) or 'imagenet' (7x7
      stride-2 conv and 3x3 stride-2 max-pool).
    gating: the gating spec; `GatingSpec(kind='none')` is the dense network.
      Its `execution` says whether closed tiles are skipped in training or
      at inference (`with_sparse_inference`).
    num_classes: adds a linear head 'head' when given.
    dtype: compute dtype of convolutions (jnp.bfloat16 for mixed precision);
      parameters, BatchNorm statistics and gate decisions stay float32, and
      the pooled features are returned in float32.
    gate_mode: 'gated' (default), 'open' (every CDG gate open: the dense
      network with the same weights, and under a separate partner norm the
      dense path's BatchNorms) or 'partner' (the dense-partner training
      forward: the first half of the batch gated, the second open); see
      `pretraining.BranchSpec.branches`.
    separate_partner_norm: under 'open' and 'partner', the dense path uses
      BatchNorm layers of its own (`BranchSpec.partner_norm='separate'`).
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  width: int = 64
  stem: str = 'cifar'
  gating: GatingSpec = GatingSpec(kind='none')
  num_classes: int | None = None
  dtype: Any = jnp.float32
  gate_mode: str = 'gated'
  separate_partner_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               stat_groups: int = 1) -> jax.Array:
    """Maps (N, H, W, 3) images to (N, features) pooled features or logits.

    `stat_groups` splits the batch into equal consecutive groups that get
    separate saliency statistics in gated layers (per-branch statistics); the
    network's BatchNorm layers always use the whole batch.
    """
    if x.ndim != 4:
      raise ValueError(f'ResNet expects (N, H, W, C) images, got shape '
                       f'{x.shape}.')
    spec = self.gating
    check_gate_mode(self.gate_mode, spec)
    gate = lambda role: spec if spec.gates(role) else None
    # An ungated stem computes the same for both paths: its BatchNorm stays
    # shared (as in Krishna et al.) unless the stem itself is gated.
    stem_norm = path_norm(
        functools.partial(BatchNorm, use_running_average=not train,
                          dtype=self.dtype), 'stem_bn', self.gate_mode,
        self.separate_partner_norm and spec.gates('stem'),
        self.is_initializing())
    stem_conv = functools.partial(GatedConv, self.width, gating=gate('stem'),
                                  dtype=self.dtype, gate_mode=self.gate_mode,
                                  name='stem_conv')
    if self.stem == 'cifar':
      x = nn.relu(stem_conv((3, 3), (1, 1))(x, train, stat_groups,
                                            norm=stem_norm))
    elif self.stem == 'imagenet':
      x = nn.relu(stem_conv((7, 7), (2, 2))(x, train, stat_groups,
                                            norm=stem_norm))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      raise ValueError(f"Unknown model.stem={self.stem!r}; expected 'cifar' or "
                       f"'imagenet'.")
    for i, num_blocks in enumerate(self.stage_sizes):
      stage_spec = spec.for_stage(i, len(self.stage_sizes))
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        try:
          x = self.block_cls(
              self.width * 2**i, strides, stage_spec, self.dtype,
              self.gate_mode, self.separate_partner_norm,
              name=f'stage{i + 1}_block{j}')(x, train, stat_groups)
        except BlockTilingError as e:
          if not spec.stage_blocks:
            raise
          # The block is this stage's entry of stage_blocks: name that.
          raise e.for_field(f'gating.stage_blocks[{i}]') from None
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is None:
      return features
    return nn.Dense(self.num_classes, name='head')(features)


ARCHITECTURES = {
    # One block per stage: the smallest of the family, for smoke runs and tests
    # (half the layers of ResNet-18, so about half the compile time).
    'resnet10': ((1, 1, 1, 1), BasicBlock),
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
}


def feature_dim(name: str, width: int = 64) -> int:
  """Width of the pooled features of a backbone."""
  stage_sizes, block_cls = ARCHITECTURES[name]
  return width * 2**(len(stage_sizes) - 1) * block_cls.expansion


def config_problems(model_config: Mapping[str, Any]) -> list[str]:
  """Every out-of-range value of a `model` block, each naming its field."""
  checks = [
      (model_config['name'] in ARCHITECTURES, f"model.name="
       f"{model_config['name']!r} must be one of {sorted(ARCHITECTURES)}."),
      (model_config['width'] > 0,
       f"model.width={model_config['width']} must be positive."),
      (model_config['dtype'] in COMPUTE_DTYPES, f"model.dtype="
       f"{model_config['dtype']!r} must be one of {sorted(COMPUTE_DTYPES)} "
       f"(bfloat16: mixed precision for GPUs and TPUs)."),
  ]
  return [message for ok, message in checks if not ok]


def create_resnet(model_config: Mapping[str, Any],
                  gating: GatingSpec | None = None,
                  num_classes: int | None = None,
                  gate_mode: str = 'gated',
                  separate_partner_norm: bool = False) -> ResNet:
  """Builds a ResNet from the config's `model` block and a gating spec.

  Args:
    model_config: with `name` ('resnet18' | 'resnet34' | 'resnet50'),
      `stem` ('cifar' | 'imagenet'), `width` (default 64) and `dtype`
      ('float32' default | 'bfloat16').
    gating: the gating spec, parsed once from the config's `gating` block by
      the entry point (`config_lib.read_gating`); None gives the dense
      network.
    num_classes: adds a linear head when given.
    gate_mode: 'gated', 'open' or 'partner' (see `ResNet`).
    separate_partner_norm: the dense partner path has BatchNorm layers of
      its own (`pretraining.BranchSpec.separate_partner_norm`).

  Raises:
    TypeError: for a `gating` that is not a GatingSpec (a config block).
    ValueError: for a gate mode other than 'gated' without CDG gates to
      open.
  """
  missing = [key for key in ('name',) if key not in model_config]
  if missing:
    raise ValueError(
        f'The model block {dict(model_config)} lacks {missing}: give at least '
        f"'name' (one of {sorted(ARCHITECTURES)}); 'stem', 'width' and "
        f"'dtype' default to 'cifar', 64 and 'float32'.")
  model_config = {'stem': 'cifar', 'width': 64, 'dtype': 'float32',
                  **model_config}
  problems = config_problems(model_config)
  if problems:
    raise ValueError(' '.join(problems))
  stage_sizes, block_cls = ARCHITECTURES[model_config['name']]
  if gating is None:
    gating = GatingSpec(kind='none')
  if not isinstance(gating, GatingSpec):
    raise TypeError(
        f'create_resnet takes a GatingSpec or None, got '
        f'{type(gating).__name__}; parse the gating block once with '
        f'config_lib.read_gating(config.gating).layer and pass the spec.')
  spec = gating
  network = ResNet(stage_sizes=stage_sizes, block_cls=block_cls,
                   width=int(model_config['width']),
                   stem=model_config['stem'], gating=spec,
                   num_classes=num_classes,
                   dtype=compute_dtype(model_config['dtype']),
                   gate_mode=gate_mode,
                   separate_partner_norm=separate_partner_norm)
  check_gate_mode(gate_mode, spec)
  return network


def with_sparse_inference(backbone: ResNet) -> ResNet:
  """The same network (same variables) with block-sparse inference: with
  `train=False` its gated layers skip the closed tiles' conditional work
  (`cdg_jax.gating.sparse`). Same outputs as the masked form; faster where
  gates are closed. A dense network is returned unchanged.

  Raises:
    ValueError: unless CDG-gated with tile-structured gates: every block it
      uses (`GatingSpec.blocks`) is (bh, bw, 0).
  """
  if not backbone.gating.enabled:
    return backbone
  return backbone.clone(gating=backbone.gating.with_sparse_inference())


def dense_path(backbone: ResNet) -> ResNet:
  """The same network (same variables) with every CDG gate open.

  The dense network of a dense-partner run (`pretraining.BranchSpec.branches`): each
  gated layer computes Y_base + Y_cond, its full convolution, and under
  `partner_norm='separate'` the dense path's own BatchNorm layers are used.
  For a CDG network trained otherwise it is the gates-forced-open diagnostic
  (`cdg_jax.evaluators.extraction.open_gates`). A dense network is returned unchanged.
  """
  return backbone.clone(gate_mode='open')
