"""The experiment runner: every grid row parses, a grid runs, resumes, reports."""

import csv
import importlib.util
import json
import os
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from cdg_jax.run import config_lib
import launch

from experiments.common import records
from experiments.grids import grids
from experiments.grids import report
from experiments.grids import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_command(command):
  """The config a `python -m cdg_jax.main ...` command line would train."""
  argv = ['main'] + command[3:]
  flag_values = flags.FlagValues()
  # Override flags (--config.x.y) are declared from the argv given here.
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('run', [r for runs in grids.GRIDS.values()
                                 for r in runs], ids=lambda r: r.name)
def test_every_grid_row_is_a_valid_command(run, monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths are relative to the repository root
  config = parse_command(run.train_command('/tmp/x'))
  config_lib.check_fields(config)
  gating = config_lib.read_gating(config.gating)
  spec = gating.layer
  for key, value in run.overrides:
    node = config
    for part in key.split('.'):
      node = node[part]
    assert str(node).replace(' ', '') == str(value), key
  if run.group == 'smoke':
    return
  # The CPU protocol: real CIFAR subset at 16x16, ResNet-18 width 16.
  assert config.data.source == 'npz'
  assert config.data.npz_path.endswith(f'{config.data.dataset}.npz')
  overrides = dict(run.overrides)
  assert (config.model.name, config.model.width) == (
      'resnet18', overrides.get('model.width', 16))
  assert config.data.image_size == overrides.get('data.image_size', 16)
  assert config.augment.image_size == config.data.image_size
  assert config.num_epochs == overrides.get('num_epochs', 4.0)
  assert (config.num_epochs == 12.0) == (run.group == 'longer')
  assert config.seed == dict(run.overrides).get('seed', 0)
  assert (config.seed != 0) == (run.group == 'seeds')
  # Model selection is scored on held-out training images, never the test set.
  assert (config.data.validation_size == 5000) == (
      run.group in ('selection', 'partner_selection', 'budget_selection')
      or run.name.startswith('sel_'))
  overrides = dict(run.overrides)
  if run.method.startswith('dense'):
    assert spec.kind == 'none'
  elif 'predictor' in run.method:
    kind = run.method.split(' density')[0].split(',')[0]
    assert spec.kind == kind.replace(' ', '_')
    assert spec.density_target == overrides.get('gating.density_target', 0.5)
  else:
    assert spec.kind == 'cdg'
  assert gating.branches.has_dense_partner == ('dense partner' in run.method)
  assert (spec.predictor_saliency == 'relu') == ('FBS ReLU' in run.method)
  if run.group == 'fbs':   # a divergence is located to the step
    assert config.log_every_steps == 1


def test_cpu_protocol_names_the_bad_config_file():
  spec = importlib.util.spec_from_file_location(
      'cpu_protocol', os.path.join(ROOT, 'configs', 'cpu_protocol.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(ValueError, match='simclr_cifar11'):
    module.get_config('simclr_cifar11')
  with pytest.raises(ValueError, match='needs the config file'):
    module.get_config(None)
  assert module.get_config('byol_cifar100').data.npz_path.endswith(
      'cifar100.npz')


def test_select_runs_rejects_unknown_names():
  with pytest.raises(ValueError, match='nope'):
    runner.select_runs(['nope'], [])
  with pytest.raises(ValueError, match='byol_c10_dense'):
    runner.select_runs(['core'], ['byol_c10_dense'])
  assert [r.name for r in runner.select_runs(['core'], ['simclr_c10_cdg'])
          ] == ['simclr_c10_cdg']


def _result(name, seed, knn, gating='cdg', **fields):
  result = {'name': name, 'group': 'core', 'method': name.split('_')[0],
            'seed': seed,
            'knn_top1': knn, 'linear_top1': knn + 0.02,
            'flops_reduction': 1.0 if gating == 'none' else 2.0 + seed / 10,
            'framework': 'simclr', 'dataset': 'cifar10', 'model': 'resnet18',
            'image_size': 16, 'batch_size': 256, 'steps': 388,
            'gating': gating, 'block': [1, 1, 1], 'regularizer': 'density',
            'weight': 1.0, 'density_target': 0.25,
            'saliency_stats': 'per_branch', 'branches': 'both',
            'gate_density': 0.25, 'train_wall_s': 1.0,
            'linear_eval_wall_s': 1.0, 'train_command': f'train {name}',
            'linear_eval_command': f'eval {name}'}
  result.update(fields)
  return result


def test_seed_summary_groups_settings_across_seeds(tmp_path):
  results = [
      _result('cdg', 0, 0.40), _result('cdg_repro', 0, 0.30, group='repro'),
      _result('cdg_seed1', 1, 0.37), _result('cdg_seed2', 2, 0.34),
      # A dense run ignores the gating fields: these three are one setting.
      _result('dense', 0, 0.42, gating='none', regularizer='threshold',
              weight=1e-4), _result('dense_seed1', 1, 0.41, gating='none'),
      _result('dense_seed2', 2, 0.44, gating='none', density_target=0.5),
      # Another density target or length is another setting (one seed each).
      _result('target', 1, 0.1, density_target=0.15),
      _result('long', 1, 0.5, steps=1164),
  ]
  summary = report.seed_summary(results)
  assert [e['runs'] for e in summary] == [
      ['cdg', 'cdg_seed1', 'cdg_seed2'], ['dense', 'dense_seed1', 'dense_seed2']]
  cdg, dense = summary
  assert cdg['method'] == 'cdg' and cdg['seeds'] == [0, 1, 2]
  # The same-seed rerun (0.30) is not a seed of its own.
  assert cdg['knn_top1_mean'] == pytest.approx((0.40 + 0.37 + 0.34) / 3)
  assert (cdg['knn_top1_min'], cdg['knn_top1_max']) == (0.34, 0.40)
  assert cdg['linear_top1_mean'] == pytest.approx(0.39)
  assert cdg['flops_reduction_mean'] == pytest.approx(2.1)
  assert (cdg['flops_reduction_min'], cdg['flops_reduction_max']) == (2.0, 2.2)
  assert dense['knn_top1_mean'] == pytest.approx(0.42 + 1 / 300)
  assert report.seed_summary(results[:1] + results[-2:]) == []
  report.write_table(results, str(tmp_path))
  table = (tmp_path / 'results.md').read_text()
  assert ('| cdg | simclr | cifar10 | test | 388 | 0, 1, 2 | 37.00 (34.00-40.00) '
          '| 39.00 (36.00-42.00) | 2.10x (2.00-2.20) |') in table



def test_layer_table_shows_each_runs_densities_beside_the_mac_shares(
    tmp_path):
  shares = {'backbone/stage1_block0/conv1': 0.25,
            'backbone/stage4_block1/conv2': 0.125}
  results = [
      _result('uniform', 0, 0.40,
              layer_density={'backbone/stage1_block0/conv1': 0.25,
                             'backbone/stage4_block1/conv2': 0.26},
              layer_flops_share=shares),
      _result('budget', 0, 0.41, regularizer='flops',
              layer_density={'backbone/stage1_block0/conv1': 0.1,
                             'backbone/stage4_block1/conv2': 0.9},
              layer_flops_share=shares),
      _result('old', 0, 0.39),     # saved before densities were recorded
  ]
  lines = report.layer_lines(results)
  assert lines[3:] == [
      '| run | split | s1b0c1 | s4b1c2 |', '| --- | --- | --- | --- |',
      '| MAC share | - | 25.0% | 12.5% |',
      '| uniform | test | 0.250 | 0.260 |', '| budget | test | 0.100 | 0.900 |']
  assert report.layer_lines(results[2:]) == []
  report.write_table(results, str(tmp_path))
  assert '| budget | test | 0.100 | 0.900 |' in (
      tmp_path / 'results.md').read_text()


def test_linear_feature_norm_is_recorded_only_where_it_applies():
  augmented = {'linear_eval': {'protocol': 'augmented',
                               'augmented': {'feature_norm': 'batchnorm'}}}
  assert runner.linear_feature_norm(augmented) == 'batchnorm'
  # Written before the field existed: raw features.
  assert runner.linear_feature_norm(
      {'linear_eval': {'protocol': 'augmented', 'augmented': {}}}) == 'none'
  # The fast protocol standardises on its own: the field does not apply.
  assert runner.linear_feature_norm(
      {'linear_eval': {'protocol': 'fast',
                       'augmented': {'feature_norm': 'batchnorm'}}}) == 'none'
  # So an augmented score with and without it are two settings.
  rows = [_result('raw', 0, 0.3, linear_protocol='augmented'),
          _result('raw_seed1', 1, 0.3, linear_protocol='augmented'),
          _result('bn', 0, 0.4, linear_protocol='augmented',
                  linear_feature_norm='batchnorm')]
  assert [e['runs'] for e in report.seed_summary(rows)] == [
      ['raw', 'raw_seed1']]


def test_matched_flops_reads_each_curve_at_equal_reduction():
  setting = {'model': 'resnet18 width 16'}   # report.MATCHED_SETTING's model

  def point(name, reduction, knn, linear, seed=0, **fields):
    result = _result(name, seed, knn, flops_reduction=reduction, **setting,
                     **fields)
    return {**result, 'linear_top1': linear}

  results = [
      point('cdg_a', 1.8, 0.40, 0.42), point('cdg_b', 2.2, 0.36, 0.40),
      point('cdg_c', 2.6, 0.34, 0.40),
      # Neither a same-seed rerun nor another seed is a point of the curve.
      point('cdg_repro', 2.0, 0.10, 0.10, group='repro'),
      point('cdg_seed1', 2.0, 0.10, 0.10, seed=1),
      # Another CDG setting (not the default) is another curve, not shown.
      point('cdg_diag', 2.0, 0.10, 0.10, grouping='diagonal'),
      point('channel_a', 1.5, 0.42, 0.44, gating='channel_predictor'),
      point('channel_b', 2.2, 0.41, 0.43, gating='channel_predictor'),
      point('spatial', 2.0, 0.30, 0.33, gating='spatial_predictor'),
      # The dense partner with separate BatchNorm is a curve; with a shared
      # one, and FBS's unbounded saliency, are not.
      point('partner', 2.1, 0.39, 0.41, branches='dense_partner',
            partner_norm='separate'),
      point('partner_shared', 2.1, 0.1, 0.1, branches='dense_partner'),
      point('channel_relu', 2.0, 0.1, 0.1, gating='channel_predictor',
            predictor_saliency='relu'),
      point('dense', 1.0, 0.44, 0.46, gating='none'),
      point('dense_seed1', 1.0, 0.46, 0.48, gating='none', seed=1),
  ]
  curves = report.curves(results)
  assert {label: [r['name'] for r in rows] for label, rows in curves.items()
          } == {'CDG (default)': ['cdg_a', 'cdg_b', 'cdg_c'],
                'CDG dense partner': ['partner'],
                'channel predictor': ['channel_a', 'channel_b'],
                'spatial predictor': ['spatial']}
  cdg = curves['CDG (default)']
  # Linear between the two nearest points; exact at a measured point only.
  assert report.interpolate(cdg, 2.0, 'knn_top1') == pytest.approx(0.38)
  assert report.interpolate(cdg, 2.5, 'knn_top1') == pytest.approx(0.345)
  assert report.interpolate(cdg, 2.2, 'linear_top1') == pytest.approx(0.40)
  assert report.interpolate(cdg, 1.7, 'knn_top1') is None
  assert report.interpolate(cdg, 2.7, 'knn_top1') is None
  lines = report.matched_lines(results)
  assert 'Dense (mean of seeds [0, 1]): kNN 45.00, linear 47.00.' in lines
  assert '| CDG (default) | 38.00 | 41.00 | 34.50 | 40.00 |' in lines
  # 0.42 + (2.0 - 1.5) / (2.2 - 1.5) * (0.41 - 0.42); 2.5x is past the curve.
  assert '| channel predictor | 41.29 | 43.29 | n/a | n/a |' in lines
  assert '| spatial predictor | 30.00 | 33.00 | n/a | n/a |' in lines

def test_gap_to_dense_along_scale_against_hand_computed_values(tmp_path):
  runs = report.SCALE_RUNS
  results = [
      _result(runs['dense'][0], 0, 0.40, gating='none'),
      _result(runs['dense'][3], 0, 0.50, gating='none', image_size=32),
      _result(runs['CDG'][0], 0, 0.37),
      _result(runs['CDG'][3], 0, 0.48, image_size=32),
      _result(runs['CDG dense partner'][3], 0, 0.45, image_size=32,
              branches='dense_partner', partner_norm='separate',
              dense_knn_top1=0.49, dense_linear_top1=0.53),
      # Without its dense partner a column is '-'.
      _result(runs['CDG'][1], 0, 0.30, steps=1164),
  ]
  gaps = report.scale_gaps(results)
  assert gaps['CDG'][0] == pytest.approx({'knn': -3.0, 'linear': -3.0,
                                          'flops': 2.0})
  assert gaps['CDG'][1] is None and gaps['CDG'][2] is None
  assert gaps['CDG'][3]['knn'] == pytest.approx(-2.0)
  partner_dense = gaps['CDG dense partner: its dense network'][3]
  # 0.49 - 0.50 kNN; 0.53 - 0.52 linear (linear = kNN + 0.02 in _result).
  assert partner_dense == pytest.approx({'knn': -1.0, 'linear': 1.0,
                                         'flops': 1.0})
  lines = report.gap_lines(results)
  assert ('| dense (kNN / linear top-1) | 40.00 / 42.00 | - | - | '
          '50.00 / 52.00 |') in lines
  assert '| CDG | -3.00 / -3.00 (2.00x) | - | - | -2.00 / -2.00 (2.00x) |' \
      in lines
  assert ('| CDG dense partner | - | - | - | -5.00 / -5.00 (2.00x) |'
          in lines)
  report.write_gap_plot(results, str(tmp_path))
  assert (tmp_path / 'gap_to_dense.png').stat().st_size > 10_000
  # Before any scale run there is no section.
  assert report.gap_lines(results[:1] + results[2:3]) == []


def test_width_table_gaps_formulations_and_layer_densities(tmp_path):
  name = report._width_run_name
  densities = lambda first, last: {'stage1_block0/conv1': first,
                                   'stage4_block1/conv2': last}
  shares = {'stage1_block0/conv1': 0.08, 'stage4_block1/conv2': 0.04}
  results = [
      # Width 16: one seed, written before the per-layer densities and the
      # formulation were recorded (so: XLA's convolutions).
      _result(name('dense', 16, 0), 0, 0.40, gating='none', cpu='EPYC'),
      _result(name('CDG', 16, 0), 0, 0.37, cpu='EPYC'),
      # Width 64: two seeds with the per-shape formulation; dense seed 0 on
      # another CPU model.
      *[_result(name('dense', 64, seed), seed, 0.50 + seed / 100,
                gating='none', conv_formulation='auto',
                cpu='Xeon' if seed == 0 else 'EPYC') for seed in (0, 1)],
      _result(name('CDG', 64, 0), 0, 0.495, conv_formulation='auto',
              layer_density=densities(0.2, 0.3), layer_flops_share=shares,
              gate_density=0.24),
      _result(name('CDG', 64, 1), 1, 0.49, conv_formulation='auto',
              layer_density=densities(0.4, 0.5), layer_flops_share=shares,
              gate_density=0.26),
  ]
  gaps = report.width_gaps(results, 'CDG')
  assert gaps[16] == pytest.approx({0: -3.0})
  assert gaps[64] == pytest.approx({0: -0.5, 1: -2.0})
  # The linear panel's gaps: each run's linear_top1 (kNN + 0.02 here, so
  # the same gaps), one changed by hand, one missing (left out).
  linear = report.width_gaps(results, 'CDG', 'linear_top1')
  assert linear.keys() == gaps.keys()
  for width in gaps:
    assert linear[width] == pytest.approx(gaps[width])
  changed = [dict(r) for r in results]
  changed[-1]['linear_top1'] = 0.52      # CDG, width 64, seed 1
  changed[-2]['linear_top1'] = None      # CDG, width 64, seed 0
  assert report.width_gaps(changed, 'CDG', 'linear_top1')[64] == (
      pytest.approx({1: -1.0}))
  lines = report.width_lines(results)
  row_64 = next(line for line in lines if line.startswith('| 64 |'))
  # Mean and per-seed gaps; FLOPs reduction 2.0 + seed / 10, mean 2.05.
  assert '| -1.25 (-0.50, -2.00) | - | 2.05x | - | 0.20-0.50 | auto |' in row_64
  assert row_64.endswith('| auto | dense: EPYC, Xeon; CDG: ? |')
  assert row_64.startswith('| 64 | 0,1 | 50.50 (50.00-51.00) / 52.50 '
                           '(52.00-53.00) | 49.25 (49.00-49.50) /')
  assert next(line for line in lines if line.startswith('| 16 |')
              ).endswith('| 2.00x | - | - | xla | EPYC |')
  # Only width 64 recorded its layers: a column of means over its seeds.
  assert '| layer | MACs share (width 64) | width 64 (2 seeds) |' in lines
  assert '| stage1_block0/conv1 | 8.0% | 0.300 |' in lines
  assert '| stage4_block1/conv2 | 4.0% | 0.400 |' in lines
  assert '| all (FLOPs reduction) | 100% | 0.250 (2.05x) |' in lines
  report.write_width_plot(results, str(tmp_path))
  assert (tmp_path / 'gap_vs_width.png').stat().st_size > 10_000
  # Width 16 alone is not a curve: no section, no plot.
  assert report.width_lines(results[:2]) == []


def test_smoke_grid_runs_saves_each_result_and_skips_finished_runs(
    tmp_path, monkeypatch):
  results_dir, workdir_root = str(tmp_path / 'results'), str(tmp_path / 'work')
  # sys.argv of `python -m experiments.grids.run_grid --grid=smoke`.
  command = [os.path.join(ROOT, 'experiments', 'grids', 'run_grid.py'),
             '--grid=smoke']
  results = runner.run_grid(['smoke'], results_dir, workdir_root,
                            argv=command)
  assert [r['name'] for r in results] == ['smoke_dense', 'smoke_cdg']
  by_name = {r['name']: r for r in results}
  assert by_name['smoke_dense']['flops_reduction'] == pytest.approx(1.0)
  assert by_name['smoke_dense']['gate_density'] == 1.0
  assert by_name['smoke_cdg']['flops_reduction'] > 1.0
  for r in results:
    assert r['steps'] == 4 and r['seed'] == 0
    assert 0.0 <= r['knn_top1'] <= 1.0 and 0.0 <= r['linear_top1'] <= 1.0
    assert r['train_wall_s'] > 0 and r['linear_eval_wall_s'] > 0
    assert r['train_command'].startswith('python -m cdg_jax.main --config=')
    # The linear evaluation ran with the row's overrides too.
    with open(os.path.join(workdir_root, r['name'], 'linear_eval.json')) as f:
      assert json.load(f)['linear_eval']['epochs'] == 2
    # Each result is a record: the grid's command, the devices and XLA
    # flags the training ran with (conftest.py's two host devices) in its
    # header; the run's own command lines stay in the result.
    saved = records.read_record(runner.result_path(results_dir, r['name']))
    assert report.with_defaults(saved) == r
    head = saved['record']
    assert head['kind'] == 'grid_run'
    assert head['command'] == (
        'python -m experiments.grids.run_grid --grid=smoke')
    assert head['devices']['platform'] == 'cpu'
    assert head['devices']['count'] == 2
    assert '--xla_force_host_platform_device_count=2' in head['xla_flags']
    assert head['unknown'] == []
    assert 'finished' not in saved and 'cpu' not in saved
    assert r['finished'] == head['date'][:-1].replace('T', ' ') + ' UTC'
    assert r['cpu'] == head['cpu_model']
    assert saved['train_command'] == r['train_command']

  with open(os.path.join(results_dir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [row['name'] for row in rows] == ['smoke_dense', 'smoke_cdg']
  assert 'record' not in rows[0] and rows[0]['finished'].endswith(' UTC')
  assert float(rows[1]['flops_reduction']) == pytest.approx(
      by_name['smoke_cdg']['flops_reduction'])
  with open(os.path.join(results_dir, 'results.md')) as f:
    table = f.read()
  assert f'| {100 * by_name["smoke_cdg"]["knn_top1"]:.2f} |' in table
  assert by_name['smoke_cdg']['train_command'] in table
  assert os.path.getsize(os.path.join(results_dir,
                                      'accuracy_vs_flops.png')) > 1000

  # Started again: finished runs are skipped, nothing is executed.
  def fail(command, log_path):
    raise AssertionError(f'ran {command}')
  monkeypatch.setattr(runner, '_run_command', fail)
  assert runner.run_grid(['smoke'], results_dir, workdir_root) == results

  # A run whose result is gone is run again (here: the fake command fails,
  # naming it), while the other result stays.
  os.remove(runner.result_path(results_dir, 'smoke_cdg'))
  with pytest.raises(AssertionError, match='smoke'):
    runner.run_grid(['smoke'], results_dir, workdir_root)
  assert [r['name'] for r in report.load_results(results_dir)] == [
      'smoke_dense']


def test_a_rerun_never_overwrites_and_the_report_reads_old_and_new_results(
    tmp_path, monkeypatch):
  monkeypatch.setattr(runner, 'training_devices', lambda config: (
      {'platform': 'cpu', 'count': 2, 'processes': 1}, '--xla_flags=of_it'))
  results_dir = str(tmp_path)
  runs_dir = tmp_path / 'runs'
  runs_dir.mkdir()
  # Results saved before the header: one stays, one is run again.
  old = json.dumps(_result('dense', 0, 0.40, gating='none',
                           finished='2026-11-25 18:13:49 UTC', cpu='EPYC'),
                   indent=2)
  (runs_dir / 'dense.json').write_text(old)
  (runs_dir / 'cdg.json').write_text(json.dumps(_result(
      'cdg', 0, 0.37, finished='2026-11-25 18:22:21 UTC')))
  command = [os.path.join(ROOT, 'experiments', 'grids', 'run_grid.py'),
             '--grid=core', '--rerun']
  new = runner._save_result(results_dir, 'dense',
                            _result('dense', 0, 0.42, gating='none'), command)
  earlier = runs_dir / 'earlier'
  assert os.listdir(earlier) == ['dense.2026-11-25T18-13-49.json']
  assert (earlier / 'dense.2026-11-25T18-13-49.json').read_text() == old
  assert records.read_record(str(runs_dir / 'dense.json')) == new
  assert new['record']['command'] == (
      'python -m experiments.grids.run_grid --grid=core --rerun')
  assert new['record']['devices']['count'] == 2
  assert new['record']['xla_flags'] == '--xla_flags=of_it'
  # Saved again, twice in the same second: each earlier result is kept,
  # named by its header's date.
  monkeypatch.setattr(records, 'header', lambda *args, **kwargs: dict(
      new['record'], date='2026-12-06T10:00:00Z'))
  for knn in (0.43, 0.44, 0.45):
    runner._save_result(results_dir, 'dense',
                        _result('dense', 0, knn, gating='none'), command)
  stamp = new['record']['date'].replace(':', '-')[:-1]
  assert sorted(os.listdir(earlier)) == sorted([
      'dense.2026-11-25T18-13-49.json', f'dense.{stamp}.json',
      'dense.2026-12-06T10-00-00.json', 'dense.2026-12-06T10-00-00.2.json'])
  assert [json.loads((earlier / name).read_text())['knn_top1'] for name in (
      'dense.2026-12-06T10-00-00.json', 'dense.2026-12-06T10-00-00.2.json')
          ] == [0.43, 0.44]
  # The report reads the current results, old and new, not runs/earlier/.
  results = report.load_results(results_dir)
  by_name = {r['name']: r for r in results}
  assert sorted(by_name) == ['cdg', 'dense']
  assert by_name['dense']['knn_top1'] == 0.45
  assert by_name['dense']['finished'] == '2026-12-06 10:00:00 UTC'
  assert by_name['cdg']['finished'] == '2026-11-25 18:22:21 UTC'
  assert by_name['cdg'].get('cpu') is None   # not recorded then
  report.write_table(results, results_dir)
  with open(tmp_path / 'results.csv') as f:
    rows = {row['name']: row for row in csv.DictReader(f)}
  assert 'record' not in rows['dense']
  assert rows['dense']['finished'] == '2026-12-06 10:00:00 UTC'
  assert rows['dense']['knn_top1'] == '0.45'
  # A header that is not an object is named.
  (runs_dir / 'cdg.json').write_text('{"name": "cdg", "record": [1]}')
  with pytest.raises(report.ResultFileError, match=r'cdg\.json: its '
                     r'"record" header is a list'):
    report.load_results(results_dir)


def test_a_diverged_run_is_recorded_with_its_step(tmp_path):
  """FBS's unbounded saliency at a huge learning rate: the loss overflows in
  a few steps; the runner records the step instead of failing."""
  run = grids.Run(
      'smoke_diverges', 'fbs', 'channel predictor, FBS ReLU saliency',
      'configs/simclr_cifar10.py:smoke,channel_predictor',
      (('gating.predictor_saliency', 'relu'), ('log_every_steps', 1),
       ('optim.base_learning_rate', 1e6), ('num_steps', 8)))
  results_dir = str(tmp_path / 'results')
  result = runner.run_one(run, results_dir, str(tmp_path / 'work'))
  step = result['diverged_at_step']
  assert step is not None and 1 <= step <= 8
  assert result['record']['kind'] == 'grid_run'   # a record like any run
  assert result['knn_top1'] is None and result['steps'] == step
  # The losses logged before it, every step up to the divergence.
  assert [s for s, _ in result['losses_before_divergence']] == list(
      range(max(1, step - 5), step))
  report.write_report(results_dir)
  with open(os.path.join(results_dir, 'results.md')) as f:
    table = f.read()
  assert f'| diverged at step {step} |' in table
  assert '(diverged: no evaluation)' in table
  assert runner.divergence_step(
      'FloatingPointError: Loss is nan at step 17; training stopped') == 17
  assert runner.divergence_step(
      'FATAL: NaN or infinite values in the train state at step 9, in 1 '
      'array (batch_stats/backbone/...)') == 9
  assert runner.divergence_step('RuntimeError: something else') is None


def _script(module, *args, timeout=300):
  """experiments.<module> run as a user runs it, from the repository root."""
  return launch.run([sys.executable, '-m', f'experiments.{module}', *args],
                    cwd=ROOT, capture_output=True, text=True,
                    timeout=timeout)


def _last_line(text):
  return text.strip().splitlines()[-1]


def test_table_only_names_a_bad_result_file(tmp_path):
  runs_dir = tmp_path / 'runs'
  runs_dir.mkdir()
  (runs_dir / 'smoke_dense.json').write_text(json.dumps(_result(
      'smoke_dense', 0, 0.4, gating='none')))
  bad = runs_dir / 'simclr_c10_cdg.json'
  bad.write_text('{"name": "simclr_c10_cdg",')   # cut short
  fix = ('Restore it, or delete it and run python -m '
         'experiments.grids.run_grid again to train simclr_c10_cdg anew.')
  result = _script('grids.run_grid', '--table_only',
                   f'--results_dir={tmp_path}')
  assert result.returncode == 1, result.stderr[-3000:]
  assert _last_line(result.stderr) == (
      f'FATAL: {bad}: not valid JSON (Expecting property name enclosed in '
      f'double quotes: line 1 column 27 (char 26)). {fix}')
  assert not (tmp_path / 'results.md').exists()
  # Read before any run: a grid stops at once too, not after its runs.
  result = _script('grids.run_grid', '--grid=smoke',
                   f'--results_dir={tmp_path}',
                   f'--workdir_root={tmp_path / "work"}')
  assert result.returncode == 1 and _last_line(result.stderr).startswith(
      f'FATAL: {bad}: not valid JSON')
  assert not (tmp_path / 'work').exists()
  # The reader's other refusals (the same line, without "FATAL: ").
  for content, problem in (
      ('', 'the result file is empty'),
      (' \n', 'the result file is empty'),
      ('[1, 2]', 'not a run\'s result (a JSON object with a "name"; found '
       'list)'),
      ('{"knn_top1": 0.5}', 'not a run\'s result (a JSON object with a '
       '"name"; found dict without a name)')):
    bad.write_text(content)
    with pytest.raises(report.ResultFileError) as error:
      report.load_results(str(tmp_path))
    assert str(error.value) == f'{bad}: {problem}. {fix}'


def test_fingerprint_checks_its_arguments_before_any_work(tmp_path):
  fingerprint = tmp_path / 'fingerprint.json'
  fingerprint.write_text('{"config/a:": "0"}')
  cases = [
      (['--only=bogus'], 'FATAL: --only=bogus: unknown part(s) bogus; the '
       'parts are configs, models, runs (comma-separated; default all).'),
      (['--only=configs', f'--compare={tmp_path / "none.json"}'],
       f'FATAL: --compare={tmp_path / "none.json"}: cannot read it (No such '
       f'file or directory). Give a fingerprint written earlier with --out.'),
      (['--only=configs', f'--compare={tmp_path}'],
       f'FATAL: --compare={tmp_path}: cannot read it (Is a directory). Give a '
       f'fingerprint written earlier with --out.'),
      (['--only=configs', f'--compare={fingerprint}',
        f'--out={tmp_path / "no_dir" / "out.json"}'],
       f'FATAL: --out={tmp_path / "no_dir" / "out.json"}: cannot write there '
       f'(No such file or directory). Give a path in an existing, writable '
       f'directory.'),
  ]
  for args, last_line in cases:
    result = _script('maintenance.fingerprint', *args)
    assert result.returncode == 2, (args, result.stderr[-3000:])
    assert _last_line(result.stderr) == last_line
    assert 'done' not in result.stdout   # no part was recorded
  fingerprint.write_text('{"config/a:": ')
  result = _script('maintenance.fingerprint', '--only=configs',
                   f'--compare={fingerprint}')
  assert result.returncode == 2 and _last_line(result.stderr).startswith(
      f'FATAL: --compare={fingerprint}: not a fingerprint (invalid JSON: ')


def test_fingerprint_compare_fails_on_items_missing_on_either_side(tmp_path):
  out = tmp_path / 'configs.json'
  result = _script('maintenance.fingerprint', '--only=configs', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  items = json.loads(out.read_text())
  keys = sorted(items)
  # The same parts again: identical.
  result = _script('maintenance.fingerprint', '--only=configs',
                   f'--compare={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert _last_line(result.stdout) == (
      f'{len(items)} of {len(items)} items identical.')
  # An earlier fingerprint with more parts (37 items missing here), one
  # config missing there, and one that differs.
  earlier = {key: value for key, value in items.items() if key != keys[0]}
  earlier[keys[1]] = 'changed'
  earlier.update({f'model/m{i:02d}': 'x' for i in range(37)})
  path = tmp_path / 'earlier.json'
  path.write_text(json.dumps(earlier))
  result = _script('maintenance.fingerprint', '--only=configs',
                   f'--compare={path}')
  assert result.returncode == 1, result.stderr[-3000:]
  assert _last_line(result.stderr) == (
      f'FATAL: the fingerprints are not the same: 1 of {len(items) - 1} '
      f'shared items differs ({keys[1]}); 37 items of {path} are missing here '
      f'(model/m00, model/m01, model/m02 and 34 more); 1 item is not in '
      f'{path} ({keys[0]}). Compare fingerprints of the same parts (--only); '
      f'items that the change added or removed on purpose could not be '
      f'compared.')
  assert f'MISSING HERE (only in {path}): model/m36' in result.stdout
  assert f'NEW HERE (not in {path}): {keys[0]}' in result.stdout
  assert f'DIFFERS: {keys[1]}' in result.stdout
