"""The analytic FLOPs of the program's ResNets against hand counts and XLA's
cost analysis, and the FLOPs command."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdg_jax.gating import flops
from cdg_jax.gating import ops
from cdg_jax.ssl import models
from cdg_jax.run import config_lib

import launch
import xla_env


# CIFAR ResNet-18 at 32x32, per image, counted by hand (see _hand_count below).
PADDED_BACKBONE_MACS = 555_417_600   # k*k*Cin*Cout*Hout*Wout, the usual 0.56 G


BACKBONE_MACS = 481_854_208          # without taps on the zero padding


STEM_MACS = 3 * 64 * 94 * 94         # 94 = 3*32 - 2 valid taps per dimension


SHORTCUT_MACS = 3 * 2_097_152        # 1x1 stride-2 convs read no padding


def _hand_count():
  """Independent count: loops over the layer list of a CIFAR ResNet-18."""
  def taps(size, k, stride):
    out = -(-size // stride)
    pad = max((out - 1) * stride + k - size, 0) // 2
    return sum(0 <= o * stride - pad + r < size for o in range(out)
               for r in range(k))
  layers = [(32, 3, 64, 3, 1)] + [(32, 64, 64, 3, 1)] * 4
  size, c = 32, 64
  for _ in range(3):
    layers += [(size, c, 2 * c, 3, 2), (size, c, 2 * c, 1, 2)]
    size, c = size // 2, 2 * c
    layers += [(size, c, c, 3, 1)] * 3
  exact = sum(taps(s, k, st) ** 2 * ci * co for s, ci, co, k, st in layers)
  padded = sum(k * k * ci * co * (-(-s // st)) ** 2 for s, ci, co, k, st in layers)
  return exact, padded


@pytest.fixture(scope='module')
def resnet18():
  model = models.create_resnet({'name': 'resnet18', 'stem': 'cifar'},
                               config_lib.read_gating({'kind': 'cdg'}).layer, num_classes=10)
  variables = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))()
  return model, variables


def test_hand_count_constants():
  assert _hand_count() == (BACKBONE_MACS, PADDED_BACKBONE_MACS)


def test_dense_macs_match_hand_count_and_xla_cost_analysis(resnet18,
                                                           monkeypatch):
  # XLA's own convolutions: im2col (the CPU default for strided ones)
  # multiplies its zero padding too, which cost analysis counts.
  monkeypatch.setenv(ops.CONV_FORMULATION_VARIABLE, 'xla')
  model, variables = resnet18
  x = jnp.zeros((1, 32, 32, 3))
  costs = flops.layer_costs(model, variables, x, train=False)
  backbone = [c for c in costs if c.part == 'backbone']
  assert sum(c.macs for c in backbone) == BACKBONE_MACS
  assert sum(c.padded_macs for c in backbone) == PADDED_BACKBONE_MACS
  assert [c.macs for c in costs if c.part == 'head'] == [512 * 10]
  assert sum(c.gated for c in costs) == 16

  dense = models.create_resnet({'name': 'resnet18'}, None,
                               num_classes=10)
  dense_vars = dense.init(jax.random.key(0), x, train=False)
  analysis = jax.jit(lambda v, x: dense.apply(v, x, train=False)).lower(
      dense_vars, x).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  xla_macs = analysis['flops'] / 2
  ours = sum(c.macs for c in costs)
  assert abs(xla_macs - ours) / ours < 0.02, (xla_macs, ours)


def test_report_for_masks_forced_to_half_density(resnet18):
  model, variables = resnet18
  # Half the channels of each gated layer always open, half always closed:
  # density is exactly 0.5 whatever the input.
  def force(path, p):
    if path[-1].key != 'threshold':
      return p
    half = p.shape[0] // 2
    return jnp.concatenate([jnp.full((half,), -1e9), jnp.full((half,), 1e9)])
  params = jax.tree_util.tree_map_with_path(force, variables['params'])
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  report = flops.measure(model, {**variables, 'params': params}, x)
  gated_macs = BACKBONE_MACS - STEM_MACS - SHORTCUT_MACS
  expected = gated_macs * (1 / 4 + 3 / 4 * 0.5) + STEM_MACS + SHORTCUT_MACS
  assert expected == 304_154_368
  assert report.backbone_dense_macs == BACKBONE_MACS
  np.testing.assert_allclose(report.backbone_effective_macs, expected, rtol=1e-7)
  np.testing.assert_allclose(report.reduction, BACKBONE_MACS / expected, rtol=1e-7)
  assert report.gated_density == 0.5
  assert report.head_macs == 5120
  table = report.format_table()
  assert 'stage1_block0/conv1' in table and 'reduction 1.584x' in table


def test_flops_command_prints_table():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root,
         'XLA_FLAGS': xla_env.xla_flags()}
  result = launch.run_module(
      'cdg_jax.flops_table',
      [f'--config={root}/configs/default.py:smoke', '--batch_size=4'],
      env=env, cwd=root, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'stage4_block0/conv2' in result.stdout
  assert 'reduction' in result.stdout
