"""Gated ResNet-10/18/34/50 in Flax Linen, with CIFAR and ImageNet stems.

Every convolution is a `GatedConv`; whether it is gated is decided by its role
('stem', 'block_3x3', 'block_1x1', 'shortcut') and the ResNet's placement of
its gates, `ResNetGating.layers` (and each stage's block,
`ResNetGating.stage_blocks`): settings of the ResNet, not of a layer. With
`gating.kind='none'` the network is the plain dense ResNet with the same
parameter tree minus the gate parameters. The ResNet's convolutions are
computed in the formulation `conv_formulation` (`create_resnet`: the
program's, `ops.program_formulation()`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdg_jax.gating import ops
from cdg_jax.gating.layers import check_gate_mode, GatedConv, GatingSpec
from cdg_jax.gating.ops import BlockTilingError

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# Compute dtypes of convolutions and matmuls (`model.dtype`). Parameters,
# optimiser state, BatchNorm statistics, the gate decision and the losses stay
# float32 whatever this is (see `GatedConv`).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# Roles of the convolutions of a ResNet; `ResNetGating.layers` (the config's
# `gating.layers`) selects among them.
LAYER_ROLES = ('stem', 'block_3x3', 'block_1x1', 'shortcut')


@dataclasses.dataclass(frozen=True)
class ResNetGating(GatingSpec):
  """A ResNet's gating: what its gated layers compute (the `GatingSpec`
  fields, each read by every gated `GatedConv`) and where they sit, the
  ResNet's own settings. `config_lib.read_gating` makes it from the config's
  `gating` block (`gating.layers`, `gating.stage_blocks`); a plain
  `GatingSpec` given to `create_resnet` or `ResNet` places its gates by the
  defaults below. Its layers get `layer_spec` (a stage's:
  `for_stage(i, n).layer_spec`): `GatedConv` refuses this class, whose
  placement a single layer would ignore.

  Attributes:
    layers: which convolution roles are gated, a subset of `LAYER_ROLES`.
    stage_blocks: CDG only: one (bh, bw, bc) per stage of the ResNet, used
      instead of `block` by that stage's gated layers (the stem, if gated,
      keeps `block`); empty: `block` everywhere. Lets block-sparse inference
      use larger tiles on the large early maps, where a tile's halo costs
      most (8x8 tiles read 10x10 windows, 1.56x their area; 4x4 tiles 6x6,
      2.25x), and smaller ones on the small late maps. Training uses the
      same granularity.
  """
  layers: tuple[str, ...] = ('block_3x3',)
  stage_blocks: tuple[tuple[int, int, int], ...] = ()

  @classmethod
  def of(cls, spec: GatingSpec) -> 'ResNetGating':
    """`spec` as a ResNet's gating: itself, or placed by the defaults."""
    if isinstance(spec, cls):
      return spec
    return cls(**{f.name: getattr(spec, f.name)
                  for f in dataclasses.fields(GatingSpec)})

  def _check_placement(self) -> None:
    if isinstance(self.layers, (str, bytes)):
      # A string would be read letter by letter ("entry='b'"), and
      # `gates(role)` would test substrings.
      names = self.layers if isinstance(self.layers, str) else (
          self.layers.decode())
      meant = tuple(n.strip() for n in names.split(',') if n.strip())
      raise ValueError(
          f'gating.layers={self.layers!r} must be a tuple of role names, '
          f'e.g. {meant}, not a string; the roles are '
          f'{", ".join(map(repr, LAYER_ROLES))}.')
    for role in self.layers:
      if role not in LAYER_ROLES:
        raise ValueError(
            f'Unknown gating.layers entry={role!r}; expected one of '
            f'{", ".join(map(repr, LAYER_ROLES))}.')

  def _named_blocks(self) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    return super()._named_blocks() + tuple(
        (f'stage_blocks[{i}]', b) for i, b in enumerate(self.stage_blocks))

  def _blocks_described(self) -> str:
    stages = (f', gating.stage_blocks={self.stage_blocks}'
              if self.stage_blocks else '')
    return (f' (and every entry of gating.stage_blocks so); got '
            f'gating.kind={self.kind!r}, gating.block={self.block}{stages}')

  @property
  def blocks(self) -> tuple[tuple[int, int, int], ...]:
    """Every gate granularity the gated layers use.

    `block` alone without `stage_blocks`; with them, `stage_blocks`, and
    `block` too when the stem (which belongs to no stage) is gated.
    """
    if not self.stage_blocks:
      return (self.block,)
    return ((self.block,) if self.gates('stem') else ()) + self.stage_blocks

  def for_stage(self, stage: int, num_stages: int) -> 'ResNetGating':
    """The gating of stage `stage`'s layers: its entry of `stage_blocks`.

    Raises:
      ValueError: if `stage_blocks` is set without one entry per stage.
    """
    if not self.stage_blocks:
      return self
    if len(self.stage_blocks) != num_stages:
      raise ValueError(
          f'gating.stage_blocks has {len(self.stage_blocks)} entries for a '
          f'ResNet of {num_stages} stages: give one (bh, bw, bc) per stage, '
          f'got {self.stage_blocks}.')
    return dataclasses.replace(self, block=self.stage_blocks[stage],
                               stage_blocks=())

  def gates(self, role: str) -> bool:
    """Whether a convolution of this role is gated."""
    return self.enabled and role in self.layers

  def spec_of(self, role: str) -> GatingSpec | None:
    """The `GatedConv.gating` of a convolution of this role: `layer_spec`
    where gated, None (dense) elsewhere."""
    return self.layer_spec if self.gates(role) else None


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
  gating: ResNetGating = ResNetGating(kind='none')
  dtype: Any = jnp.float32
  gate_mode: str = 'gated'
  separate_partner_norm: bool = False
  conv_formulation: str | None = None
  expansion = 1

  def layer_factories(self, train: bool):
    """(gate, norm, conv): the spec of a convolution role (None: dense), the
    normalisation after a convolution (`path_norm`, by name) and the
    convolution, all in this block's dtype, gate mode and formulation. Each
    convolution applies the BatchNorm after it (the channel-predictor
    baseline scales its channels after the normalisation)."""
    gate = ResNetGating.of(self.gating).spec_of
    norm = functools.partial(
        path_norm, functools.partial(BatchNorm, use_running_average=not train,
                                     dtype=self.dtype),
        gate_mode=self.gate_mode, separate=self.separate_partner_norm,
        initializing=self.is_initializing())
    conv = functools.partial(GatedConv, dtype=self.dtype,
                             gate_mode=self.gate_mode,
                             formulation=self.conv_formulation)
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
    gating: the network's gating, a `ResNetGating` (what the gated layers
      compute and which roles and stage blocks are gated; a plain
      `GatingSpec` is placed by `ResNetGating`'s defaults);
      `GatingSpec(kind='none')` is the dense network. Its `execution` says
      whether closed tiles are skipped in training or at inference
      (`with_sparse_inference`).
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
    conv_formulation: how every convolution is computed
      (`GatedConv.formulation`; None: XLA's convolution). `create_resnet`
      sets the program's, `ops.program_formulation()`.
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  width: int = 64
  stem: str = 'cifar'
  gating: GatingSpec = ResNetGating(kind='none')
  num_classes: int | None = None
  dtype: Any = jnp.float32
  gate_mode: str = 'gated'
  separate_partner_norm: bool = False
  conv_formulation: str | None = None

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
    spec = ResNetGating.of(self.gating)
    check_gate_mode(self.gate_mode, spec)
    # An ungated stem computes the same for both paths: its BatchNorm stays
    # shared (as in Krishna et al.) unless the stem itself is gated.
    stem_norm = path_norm(
        functools.partial(BatchNorm, use_running_average=not train,
                          dtype=self.dtype), 'stem_bn', self.gate_mode,
        self.separate_partner_norm and spec.gates('stem'),
        self.is_initializing())
    stem_conv = functools.partial(GatedConv, self.width,
                                  gating=spec.spec_of('stem'),
                                  dtype=self.dtype, gate_mode=self.gate_mode,
                                  formulation=self.conv_formulation,
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
              self.conv_formulation,
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
                  separate_partner_norm: bool = False,
                  conv_formulation: str | None = None) -> ResNet:
  """Builds a ResNet from the config's `model` block and a gating spec.

  Args:
    model_config: with `name` ('resnet18' | 'resnet34' | 'resnet50'),
      `stem` ('cifar' | 'imagenet'), `width` (default 64) and `dtype`
      ('float32' default | 'bfloat16').
    gating: the network's gating, parsed once from the config's `gating`
      block by the entry point (`config_lib.read_gating(...).layer`, a
      `ResNetGating`: the layers' spec and their placement); a plain
      `GatingSpec` is placed by `ResNetGating`'s defaults (both 3x3
      convolutions of every block, `block` everywhere); None gives the
      dense network.
    num_classes: adds a linear head when given.
    gate_mode: 'gated', 'open' or 'partner' (see `ResNet`).
    separate_partner_norm: the dense partner path has BatchNorm layers of
      its own (`pretraining.BranchSpec.separate_partner_norm`).
    conv_formulation: how the convolutions are computed (`ResNet.
      conv_formulation`, `GatedConv.formulation`). None: the training
      program's, `ops.program_formulation()` ('auto', the per-shape choice
      on CPU, unless CDG_JAX_CONV_FORMULATION overrides it), read now; the
      network's `conv_formulation` shows it.

  Raises:
    TypeError: for a `gating` that is not a GatingSpec (a config block).
    ValueError: for a gate mode other than 'gated' without CDG gates to
      open, or a formulation (argument or environment) that is none.
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
  spec = ResNetGating.of(gating)
  if conv_formulation is None:
    conv_formulation = ops.program_formulation()
  ops.check_formulation(conv_formulation, 'conv_formulation')
  network = ResNet(stage_sizes=stage_sizes, block_cls=block_cls,
                   width=int(model_config['width']),
                   stem=model_config['stem'], gating=spec,
                   num_classes=num_classes,
                   dtype=compute_dtype(model_config['dtype']),
                   gate_mode=gate_mode,
                   separate_partner_norm=separate_partner_norm,
                   conv_formulation=conv_formulation)
  check_gate_mode(gate_mode, spec)
  return network


def with_sparse_inference(backbone: ResNet) -> ResNet:
  """The same network (same variables) with block-sparse inference: with
  `train=False` its gated layers skip the closed tiles' conditional work
  (`cdg_jax.gating.sparse`). Same outputs as the masked form; faster where
  gates are closed. A dense network is returned unchanged.

  Raises:
    ValueError: unless CDG-gated with tile-structured gates: every block it
      uses (`ResNetGating.blocks`) is (bh, bw, 0).
  """
  if not backbone.gating.enabled:
    return backbone
  return backbone.clone(
      gating=ResNetGating.of(backbone.gating).with_sparse_inference())


def dense_path(backbone: ResNet) -> ResNet:
  """The same network (same variables) with every CDG gate open.

  The dense network of a dense-partner run (`pretraining.BranchSpec.branches`): each
  gated layer computes Y_base + Y_cond, its full convolution, and under
  `partner_norm='separate'` the dense path's own BatchNorm layers are used.
  For a CDG network trained otherwise it is the gates-forced-open diagnostic
  (`cdg_jax.evaluators.extraction.open_gates`). A dense network is returned unchanged.
  """
  return backbone.clone(gate_mode='open')
