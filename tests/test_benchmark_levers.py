"""The XLA-levers benchmark's summary (ratios and numerics from hand
numbers) and its record."""

import os

import pytest

from experiments.benchmarks import benchmark_levers
from experiments.common import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_each_run_writes_a_new_record_with_the_default_levers_devices(
    tmp_path):
  def result(step_s, devices, xla_flags):
    return {'median_step_s': step_s, 'first_step_s': 9.0, 'loss': 5.0,
            'devices': devices, 'xla_flags': xla_flags,
            'minor_faults_per_step': 100}
  default_flags = '--xla_force_host_platform_device_count=2'
  runs = {'protocol': {
      'default': [result(2.0, 2, default_flags)],
      'one_device': [result(4.0, 1, '--xla_force_host_platform_device_count=1')],
  }}
  flag_values = {'levers': ['one_device'], 'steps_configs': ['protocol'],
                 'steps': 2, 'repeats': 1}
  first = benchmark_levers.write_report(runs, str(tmp_path), flag_values)
  second = benchmark_levers.write_report(runs, str(tmp_path), flag_values)
  assert first != second   # never overwritten
  assert records.records_in(str(tmp_path)) == [first, second]
  record = records.read_record(first)
  head = record['record']
  assert head['kind'] == 'levers'
  # The measured code ran in the levers' processes: the header holds what
  # the default lever's reported, each lever's count beside it.
  assert head['devices'] == {'platform': 'cpu', 'count': 2, 'processes': 1,
                             'by_lever': {'default': 2, 'one_device': 1}}
  assert head['xla_flags'] == default_flags
  assert record['flags'] == flag_values
  assert record['runs'] == runs
  assert record['summary']['protocol']['one_device']['speedup_vs_default'] \
      == 0.5
  assert record['levers']['one_device'] == {
      'xla_flags': '', 'host_devices': 1, 'environment': {}}
  markdown = open(records.markdown_path(first)).read()
  assert markdown.startswith(f'<!-- rendered from {os.path.basename(first)}')
  assert '| protocol | one_device | -, 1 | 4.000 | 0.50x | 0.00e+00 | 9.0 ' \
      '| 100 |' in markdown
  assert f'- command: `{head["command"]}`' in markdown
