"""experiments/benchmarks/benchmark_peer.py: the cdg_jax half runs and writes
its files without PyTorch; the speed ratios are computed as stated."""

import json
import os
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

from experiments.benchmarks import benchmark_peer
from experiments.common import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def test_speed_ratio_on_hand_numbers():
  # Per-repeat ratios 2, 4, 3: median 3; medians 4 / 1.
  ratio = benchmark_peer.speed_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
  assert ratio == {'paired': 3.0, 'of_medians': 4.0}
  assert benchmark_peer.speed_ratio(None, [1.0]) is None
  assert benchmark_peer.speed_ratio([1.0], []) is None
  with pytest.raises(ValueError, match='pair up'):
    benchmark_peer.speed_ratio([1.0, 2.0], [1.0])


def test_named_ratios_on_hand_numbers():
  times = {'cdg_jax/dense': [2.0, 2.0], 'cdg_jax/sparse': [1.0, 2.0],
           'torch/dense/compiled_channels_last': [5.0, 7.0],
           'torch/masked/eager_nchw': [2.0, 10.0],
           'torch/masked/compiled_channels_last': [3.0, 6.0]}
  ratios = benchmark_peer.ratios_of(times)
  # PyTorch compiled masked / our sparse: 3/1, 6/2 -> 3.
  assert ratios['sparse_vs_torch_compiled_masked'] == {
      'paired': 3.0, 'of_medians': 4.5 / 1.5}
  # PyTorch compiled dense / our dense: 2.5, 3.5 -> 3; medians 6 / 2.
  assert ratios['dense_vs_torch_compiled_dense'] == {
      'paired': 3.0, 'of_medians': 3.0}
  # The fastest masked execution within each repeat: 2, then 6.
  assert ratios['sparse_vs_torch_fastest_masked'] == {
      'paired': 2.5, 'of_medians': 4.0 / 1.5}
  assert ratios['masked_vs_torch_compiled_masked'] is None  # no masked time


def test_jax_half_without_torch(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', None)   # `import torch` fails
  # ResNet-10 (one block per stage): the same steps at about half the
  # compile time (the sparse step's dominates this test). Two images (one
  # per device) and one tile per map: 4 tiles per gated layer, so the sparse
  # step compiles 3 capacity branches per layer instead of 11 (what this
  # test checks does not depend on the tiling). One round in a fresh process
  # of its own, as the benchmark runs it; how rounds are joined is checked
  # below on that round's reply.
  replies = []
  real_worker = benchmark_peer.run_worker

  def recording_worker(library, payload):
    replies.append(real_worker(library, payload))
    return replies[-1]

  monkeypatch.setattr(benchmark_peer, 'run_worker', recording_worker)
  argv = ['benchmark_peer.py', '--model=resnet10', '--width=8',
          '--image_size=16', '--batch_size=2', '--tiles=16', '--repeats=1',
          '--rounds=1', '--other_cpu_devices=', f'--out={tmp_path}']
  with flagsaver.flagsaver():
    flags.FLAGS(argv)
    returned = benchmark_peer.run()
  assert 'PyTorch is not installed' in capsys.readouterr().out
  (path,) = records.records_in(str(tmp_path))
  result = records.read_record(path)
  assert result['record']['kind'] == 'peer'
  assert result['record']['devices'] == {'platform': 'cpu', 'count': 2,
                                         'processes': 1}
  assert {k: v for k, v in result.items() if k != 'record'} == json.loads(
      json.dumps(returned))
  rows = {row['key']: row for row in result['rows']}
  assert set(rows) == {'cdg_jax/dense', 'cdg_jax/masked', 'cdg_jax/sparse'}
  for row in rows.values():
    assert isinstance(row['median_step_s'], float)
    assert row['median_step_s'] > 0
    assert len(row['times_s']) == 1   # one per round
    assert row['first_call_s'] > 0
    assert isinstance(row['minor_faults_per_step'], (int, float))
  assert rows['cdg_jax/dense']['flops_reduction'] == pytest.approx(1.0)
  assert rows['cdg_jax/sparse']['flops_reduction'] > 1.0
  assert rows['cdg_jax/sparse']['gate_density'] < 1.0
  assert result['torch']['available'] is False
  assert result['torch']['message'].startswith('PyTorch is not installed')
  assert result['worker_versions']['torch'] is None
  assert result['sparse_vs_torch_compiled_masked'] is None
  assert result['dense_vs_torch_compiled_dense'] is None
  assert all(r is None for r in result['ratios'].values())
  markdown = open(records.markdown_path(path)).read()
  assert markdown.startswith(f'<!-- rendered from {os.path.basename(path)}')
  assert 'PyTorch is not installed' in markdown
  assert '| cdg_jax | sparse | jit |' in markdown
  assert '`sparse_vs_torch_compiled_masked`' in markdown
  assert 'CIFAR resnet10 width 8' in markdown
  assert result['threads'].startswith('cdg_jax: ')
  # One layout: the best dense and sparse steps are its own.
  assert result['sparse_vs_best_dense'] == pytest.approx(
      rows['cdg_jax/dense']['median_step_s']
      / rows['cdg_jax/sparse']['median_step_s'])
  assert result['default_sparse_vs_best_dense'] == pytest.approx(
      result['sparse_vs_best_dense'])
  assert result['best_dense']['variant'] == 'cdg_jax/dense'
  assert result['date'] == result['record']['date'][:10]
  assert '`sparse_vs_best_dense`' in markdown

  # Two rounds: a fresh process each (two replies), the record's times the
  # rounds' joined in round order. The second reply is the first with its
  # times tripled, so that the order shows.
  # With another layout (--other_cpu_devices=1), a process of its own each
  # round, its variants keyed by their layout: here its dense step is the
  # fastest (a quarter of the first layout's) and its sparse step slower.
  (first,) = replies
  second = json.loads(json.dumps(first))
  second['times'] = {k: [3 * t for t in v] for k, v in first['times'].items()}
  one = {'cdg_jax/dense': 0.25, 'cdg_jax/masked': 1.0, 'cdg_jax/sparse': 2.5}
  other = json.loads(json.dumps(first))
  other.update(cpu_devices=1, devices=1)
  for field in ('times', 'minor_faults', 'first_call_s', 'metrics'):
    other[field] = {f'{k} (--cpu_devices=1)': (
        [one[k] * t for t in v] if field == 'times' else v)
                    for k, v in first[field].items()}
  calls = []

  def canned_worker(library, payload):
    calls.append((library, payload))
    if payload:
      return other
    return [first, second][sum(not p for _, p in calls) - 1]

  monkeypatch.setattr(benchmark_peer, 'run_worker', canned_worker)
  with flagsaver.flagsaver():
    flags.FLAGS(argv[:-3] + ['--rounds=2', '--other_cpu_devices=1',
                             f'--out={tmp_path / "two"}'])
    joined = benchmark_peer.run()
  # Round order alternates: the other layout first in the second round.
  assert calls == [('cdg_jax', {}), ('cdg_jax', {'cpu_devices': 1}),
                   ('cdg_jax', {'cpu_devices': 1}), ('cdg_jax', {})]
  rows = {row['key']: row for row in joined['rows']}
  for key, (once,) in first['times'].items():
    assert rows[key]['times_s'] == [once, 3 * once]
    assert rows[key]['median_step_s'] == pytest.approx(2 * once)
    assert rows[f'{key} (--cpu_devices=1)']['times_s'] == [one[key] * once] * 2
  assert rows['cdg_jax/sparse (--cpu_devices=1)']['execution'] == (
      'jit, 1 device(s)')
  assert rows['cdg_jax/sparse (--cpu_devices=1)']['devices'] == 1
  assert rows['cdg_jax/sparse']['devices'] == 2
  (dense,), (sparse,) = first['times']['cdg_jax/dense'], first['times'][
      'cdg_jax/sparse']
  assert joined['best_dense'] == {
      'variant': 'cdg_jax/dense (--cpu_devices=1)',
      'median_step_s': pytest.approx(0.25 * dense)}
  assert joined['best_sparse']['variant'] == 'cdg_jax/sparse'   # 2 < 2.5
  assert joined['sparse_vs_best_dense'] == pytest.approx(
      0.25 * dense / (2 * sparse))
  assert joined['default_sparse_vs_best_dense'] == pytest.approx(
      0.25 * dense / (2 * sparse))
  assert 'also on 1 device(s) (--cpu_devices=1)' in joined['threads']


def test_worker_failure_is_reported(tmp_path, monkeypatch):
  # A worker that dies before replying (an unknown backbone) stops the run
  # with the library named, rather than writing a table without it.
  monkeypatch.setitem(sys.modules, 'torch', None)
  argv = ['benchmark_peer.py', '--model=no_such_net', '--width=8',
          '--image_size=16', '--batch_size=8', '--repeats=1', '--rounds=1',
          f'--out={tmp_path}']
  with flagsaver.flagsaver():
    flags.FLAGS(argv)
    with pytest.raises(RuntimeError, match='cdg_jax process ended'):
      benchmark_peer.run()
  assert not os.listdir(tmp_path)
