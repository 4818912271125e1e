"""The XLA-levers benchmark's summary: ratios and numerics from hand numbers."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import benchmark_levers  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_summary_pairs_repeats_and_flags_numerics_changes():
  runs = {'protocol': {
      'default': [{'median_step_s': 2.0, 'first_step_s': 10.0, 'loss': 5.0},
                  {'median_step_s': 3.0, 'first_step_s': 11.0, 'loss': 5.0}],
      # Faster in both repeats: 2/1 and 3/2, median 1.75.
      'use_onednn': [{'median_step_s': 1.0, 'first_step_s': 9.0, 'loss': 5.5},
                     {'median_step_s': 2.0, 'first_step_s': 9.0, 'loss': 5.5}],
      'xnnpack': [{'error': ['FATAL: no such flag'], 'wall_s': 1.0}] * 2,
  }}
  table = benchmark_levers.summarise(runs)['protocol']
  assert table['default']['speedup_vs_default'] == 1.0
  assert table['default']['loss_diff_vs_default'] == 0.0
  assert table['use_onednn']['median_step_s'] == 1.5
  assert table['use_onednn']['speedup_vs_default'] == pytest.approx(1.75)
  assert table['use_onednn']['loss_diff_vs_default'] == pytest.approx(0.5)
  # These hand-made results carry no page-fault counts: none, not zero.
  assert table['use_onednn']['minor_faults_per_step'] is None
  assert table['xnnpack'] == {'error': ['FATAL: no such flag']}


def test_every_lever_sets_cpu_flags_devices_the_conv_formulation_or_malloc():
  for name, (flags, devices, variables) in benchmark_levers.LEVERS.items():
    assert all(f.startswith('--xla_cpu_') for f in flags.split()), name
    assert devices in (0, 1), name
    assert set(variables) <= {'CDG_JAX_CONV_FORMULATION',
                              'GLIBC_TUNABLES'}, name
    for tunable in variables.get('GLIBC_TUNABLES', '').split(':'):
      if tunable:   # name=value, glibc's malloc tunables only
        assert tunable.startswith('glibc.malloc.'), (name, tunable)
        assert int(tunable.split('=')[1]) >= 0, (name, tunable)
