"""The PyTorch half of `benchmark_peer.py`: cdg_jax's SimCLR step in PyTorch.

Imported only by `benchmark_peer.py`, and only when torch is installed
(torch is no dependency of the project). Every hyperparameter comes in a
`StepConfig` that `benchmark_peer.py` fills from the cdg_jax config of the
same step, so both sides read the same values.

The step, as close to `cdg_jax.ssl.pretraining`'s SimCLR step as the two
libraries allow:

  two augmented views of a uint8 batch (`augment`) -> CIFAR ResNet-18 (3x3
  stem, no max-pool; `ResNet18`) on both views at once -> projector
  (Linear without bias -> BatchNorm -> ReLU -> Linear) -> NT-Xent ->
  + lambda * sum_layers (gate density - target)^2 (gated networks) ->
  backward -> LARS (`LARS`, optax.lars's update) -> the online linear probe
  (Linear on the first view's detached features, Adam) in the same backward.

Masked channel gating (`GatedConv2d`): CDG with G input-channel groups on the
3x3 convolutions of the residual blocks, everything computed, nothing skipped:
Y_base convolves the first C_in/G input channels, Y_cond the rest; the
saliency is Y_base normalised per channel with the batch statistics of each
view (no gradient through the statistics); the gate is 1[saliency >
threshold] per position and output channel with the straight-through
derivative of sigmoid(alpha z); Y = Y_base + gate * Y_cond.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The step's hyperparameters (filled from the cdg_jax config)."""
  width: int = 64
  num_classes: int = 10
  gated: bool = False
  groups: int = 4
  alpha: float = 2.0
  epsilon: float = 1e-5
  density_target: float = 0.25
  gate_weight: float = 1.0
  threshold_init: float = 0.0
  projector_hidden: int = 2048
  projector_dim: int = 128
  temperature: float = 0.2
  learning_rate: float = 0.0
  weight_decay: float = 1e-6
  momentum: float = 0.9
  trust_coefficient: float = 1e-3
  probe_learning_rate: float = 1e-3
  # Augmentation (the same view for both views, as 'simclr_cifar').
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_prob: float = 0.2
  mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
  std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------- augmentation

_LUMA = (0.299, 0.587, 0.114)   # Rec. 601, as cdg_jax (dm-pix) uses
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], dtype=torch.float64)
_FROM_YIQ = torch.linalg.inv(_TO_YIQ).float()
_TO_YIQ = _TO_YIQ.float()


def _luma(x: torch.Tensor) -> torch.Tensor:
  r, g, b = x.unbind(1)
  return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_image(values: torch.Tensor) -> torch.Tensor:
  return values.view(-1, 1, 1, 1)


def _hue_rotation(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
  """Hue shift as a rotation of the chroma plane in YIQ (cheap, batched)."""
  angle = 2 * math.pi * turns
  cos, sin = torch.cos(angle), torch.sin(angle)
  one, zero = torch.ones_like(cos), torch.zeros_like(cos)
  rotation = torch.stack([torch.stack([one, zero, zero], -1),
                          torch.stack([zero, cos, -sin], -1),
                          torch.stack([zero, sin, cos], -1)], -2)  # (N, 3, 3)
  matrix = _FROM_YIQ.to(x.device) @ rotation @ _TO_YIQ.to(x.device)
  return torch.einsum('nij,njhw->nihw', matrix, x)


def augment(images: torch.Tensor, c: StepConfig) -> torch.Tensor:
  """One SimCLR view of a (N, 3, H, W) uint8 batch, float32, normalised.

  Random resized crop (one draw of area and log aspect ratio, clamped to the
  image) and horizontal flip as one affine resampling (bilinear
  `grid_sample`); colour jitter with probability `jitter_prob` (brightness,
  contrast around the per-channel mean, saturation as a blend with the luma,
  hue as a YIQ rotation; in this fixed order), grayscale with probability
  `grayscale_prob`, then the dataset's mean and std.
  """
  x = images.float() / 255.0
  n = x.shape[0]
  device = x.device
  u = lambda: torch.rand(n, device=device)   # noqa: E731
  area = c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u()
  log_low, log_high = math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])
  aspect = torch.exp(log_low + (log_high - log_low) * u())
  crop_w = torch.sqrt(area * aspect).clamp(max=1.0)   # fractions of the side
  crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
  centre_x = (1 - crop_w) * (2 * u() - 1)             # in [-1, 1] coordinates
  centre_y = (1 - crop_h) * (2 * u() - 1)
  flip = torch.where(u() < c.flip_prob, -1.0, 1.0)
  zero = torch.zeros_like(crop_w)
  theta = torch.stack([torch.stack([crop_w * flip, zero, centre_x], 1),
                       torch.stack([zero, crop_h, centre_y], 1)], 1)
  grid = F.affine_grid(theta, list(x.shape), align_corners=False)
  x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                    align_corners=False)

  def factor(strength):
    low = max(0.0, 1.0 - strength)
    return _per_image(low + (1.0 + strength - low) * u())

  jittered = (x * factor(c.brightness)).clamp(0, 1)
  mean = jittered.mean(dim=(2, 3), keepdim=True)
  jittered = ((jittered - mean) * factor(c.contrast) + mean).clamp(0, 1)
  gray = _luma(jittered)
  jittered = ((jittered - gray) * factor(c.saturation) + gray).clamp(0, 1)
  jittered = _hue_rotation(jittered, c.hue * (2 * u() - 1)).clamp(0, 1)
  x = torch.where(_per_image(u() < c.jitter_prob), jittered, x)
  x = torch.where(_per_image(u() < c.grayscale_prob),
                  _luma(x).expand_as(x), x)
  mean = x.new_tensor(c.mean).view(1, 3, 1, 1)
  std = x.new_tensor(c.std).view(1, 3, 1, 1)
  return (x - mean) / std


# ------------------------------------------------------------------- network


def _conv_weight(c_out: int, c_in: int, k: int) -> nn.Parameter:
  weight = torch.empty(c_out, c_in, k, k)
  nn.init.kaiming_normal_(weight, mode='fan_out', nonlinearity='relu')
  return nn.Parameter(weight)


class GatedConv2d(nn.Module):
  """A bias-free 3x3 convolution; CDG-masked when `gated` (module docstring).

  `forward(x, densities)` appends the gate's mean (straight-through, so the
  regulariser's gradient reaches the thresholds) to `densities`.
  """

  def __init__(self, c_in: int, c_out: int, stride: int, c: StepConfig):
    super().__init__()
    self.stride = stride
    self.gated = c.gated
    self.weight = _conv_weight(c_out, c_in, 3)
    if self.gated:
      if c_in % c.groups:
        raise ValueError(f'{c_in} input channels do not split into '
                         f'{c.groups} groups.')
      self.base_channels = c_in // c.groups
      self.alpha, self.epsilon = c.alpha, c.epsilon
      self.threshold = nn.Parameter(torch.full((c_out,), c.threshold_init))

  def forward(self, x: torch.Tensor, densities: list) -> torch.Tensor:
    if not self.gated:
      return F.conv2d(x, self.weight, stride=self.stride, padding=1)
    b = self.base_channels
    y_base = F.conv2d(x[:, :b], self.weight[:, :b], stride=self.stride,
                      padding=1)
    y_cond = F.conv2d(x[:, b:], self.weight[:, b:], stride=self.stride,
                      padding=1)
    # Per-view ("per-branch") statistics: the batch is (view 1, view 2).
    views = y_base.unflatten(0, (2, -1))
    with torch.no_grad():
      mean = views.mean(dim=(1, 3, 4), keepdim=True)
      var = views.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
    saliency = ((views - mean) * torch.rsqrt(var + self.epsilon)).flatten(0, 1)
    z = saliency - self.threshold.view(1, -1, 1, 1)
    soft = torch.sigmoid(self.alpha * z)
    gate = (z > 0).to(z.dtype) + (soft - soft.detach())
    densities.append(gate.mean())
    return y_base + gate * y_cond


class BasicBlock(nn.Module):
  """Two 3x3 (gated) convolutions, identity or 1x1-projection shortcut."""

  def __init__(self, c_in: int, c_out: int, stride: int, c: StepConfig):
    super().__init__()
    self.conv1 = GatedConv2d(c_in, c_out, stride, c)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = GatedConv2d(c_out, c_out, 1, c)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.shortcut = None
    if stride != 1 or c_in != c_out:
      self.shortcut = nn.Sequential(
          nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
      nn.init.kaiming_normal_(self.shortcut[0].weight, mode='fan_out',
                              nonlinearity='relu')

  def forward(self, x: torch.Tensor, densities: list) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x, densities)))
    y = self.bn2(self.conv2(y, densities))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
  """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, widths w, 2w, 4w, 8w."""

  def __init__(self, c: StepConfig):
    super().__init__()
    w = c.width
    self.stem = nn.Conv2d(3, w, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(self.stem.weight, mode='fan_out',
                            nonlinearity='relu')
    self.stem_bn = nn.BatchNorm2d(w)
    blocks, c_in = [], w
    for i in range(4):
      for j in range(2):
        blocks.append(BasicBlock(c_in, w * 2**i, 2 if i > 0 and j == 0 else 1,
                                 c))
        c_in = w * 2**i
    self.blocks = nn.ModuleList(blocks)
    self.feature_dim = c_in

  def forward(self, x: torch.Tensor, densities: list) -> torch.Tensor:
    x = F.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x, densities)
    return x.mean(dim=(2, 3))


class SimCLR(nn.Module):
  """Backbone, projector and the online linear probe."""

  def __init__(self, c: StepConfig):
    super().__init__()
    self.config = c
    self.backbone = ResNet18(c)
    d = self.backbone.feature_dim
    self.projector = nn.Sequential(
        nn.Linear(d, c.projector_hidden, bias=False),
        nn.BatchNorm1d(c.projector_hidden), nn.ReLU(),
        nn.Linear(c.projector_hidden, c.projector_dim))
    self.probe = nn.Linear(d, c.num_classes)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
  """SimCLR's loss over the 2N embeddings (view 1 rows, then view 2 rows)."""
  n = z.shape[0] // 2
  z = F.normalize(z, dim=1)
  logits = z @ z.t() / temperature
  eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
  logits = logits.masked_fill(eye, float('-inf'))
  positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
  return F.cross_entropy(logits, positives)


def step_loss(model: SimCLR, images: torch.Tensor, labels: torch.Tensor,
              channels_last: bool):
  """(total loss, gate densities (L,) or empty): both views, loss, gate
  regulariser and the probe's loss (on detached features of view 1)."""
  c = model.config
  x = torch.cat([augment(images, c), augment(images, c)])
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  densities = []
  features = model.backbone(x, densities)
  loss = nt_xent(model.projector(features), c.temperature)
  if densities:
    stacked = torch.stack(densities)
    loss = loss + c.gate_weight * torch.sum(
        torch.square(stacked - c.density_target))
  else:
    stacked = features.new_zeros((0,))
  logits = model.probe(features[:images.shape[0]].detach())
  return loss + F.cross_entropy(logits, labels), stacked


class LARS:
  """optax.lars's update: decoupled-by-mask weight decay, trust ratio
  coefficient * ||p|| / ||g + wd p|| for kernels only (ndim > 1, as cdg_jax's
  `decay_mask`), then momentum on -lr times the update."""

  def __init__(self, params, c: StepConfig):
    self.params = [p for p in params if p.requires_grad]
    self.buffers = [torch.zeros_like(p) for p in self.params]
    self.c = c

  @torch.no_grad()
  def step(self) -> None:
    c = self.c
    for p, buffer in zip(self.params, self.buffers):
      if p.grad is None:
        continue
      update = p.grad
      if p.ndim > 1:
        update = update.add(p, alpha=c.weight_decay)
        param_norm, update_norm = p.norm(), update.norm()
        ratio = torch.where((param_norm > 0) & (update_norm > 0),
                            c.trust_coefficient * param_norm / update_norm,
                            torch.ones_like(param_norm))
        update = update * ratio
      buffer.mul_(c.momentum).add_(update, alpha=-c.learning_rate)
      p.add_(buffer)


class TrainStep:
  """One train step of a `SimCLR` model: `__call__()` runs it (synchronous
  on CPU) and returns the step's gate densities."""

  def __init__(self, model: SimCLR, images: torch.Tensor,
               labels: torch.Tensor, channels_last: bool, compiled: bool):
    self.model = model
    if channels_last:
      model.to(memory_format=torch.channels_last)
    self.images, self.labels = images, labels
    self.channels_last = channels_last
    body = [p for name, p in model.named_parameters()
            if not name.startswith('probe.')]
    self.lars = LARS(body, model.config)
    self.adam = torch.optim.Adam(model.probe.parameters(),
                                 lr=model.config.probe_learning_rate)
    self.loss_fn = torch.compile(step_loss) if compiled else step_loss

  def __call__(self) -> torch.Tensor:
    self.model.train()
    loss, densities = self.loss_fn(self.model, self.images, self.labels,
                                   self.channels_last)
    loss.backward()
    self.lars.step()
    self.adam.step()
    self.model.zero_grad(set_to_none=True)
    return densities.detach()


def gated_macs(model: SimCLR, image_size: int) -> list[int]:
  """MACs of each gated convolution, in `forward`'s order of densities."""
  macs, size = [], image_size
  for block in model.backbone.blocks:
    for conv in (block.conv1, block.conv2):
      size = size // conv.stride
      if conv.gated:
        c_out, c_in = conv.weight.shape[:2]
        macs.append(c_out * c_in * 9 * size * size)
  return macs


@torch.no_grad()
def set_threshold(model: SimCLR, images: torch.Tensor, density: float,
                  image_size: int) -> float:
  """One threshold for every gate giving `density` (MAC-weighted) on a
  training-mode pass of two views, by bisection (as the cdg_jax side sets its
  own); returns the density reached. BatchNorm statistics are restored."""
  weights = torch.tensor(gated_macs(model, image_size), dtype=torch.float32)
  state = {k: v.clone() for k, v in model.state_dict().items()}
  x = torch.cat([augment(images, model.config),
                 augment(images, model.config)])
  thresholds = [m.threshold for m in model.modules()
                if isinstance(m, GatedConv2d) and m.gated]
  model.train()

  def measured(value: float) -> float:
    for t in thresholds:
      t.fill_(value)
    densities = []
    model.backbone(x, densities)
    return float((torch.stack(densities) * weights).sum() / weights.sum())

  low, high = -3.0, 3.0
  for _ in range(20):
    middle = (low + high) / 2
    if measured(middle) > density:
      low = middle
    else:
      high = middle
  value = (low + high) / 2
  reached = measured(value)
  model.load_state_dict(state)   # BatchNorm statistics as they were
  for t in thresholds:
    t.fill_(value)
  return reached
