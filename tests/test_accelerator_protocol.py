"""The accelerator protocol, rehearsed end to end on CPU with a tiny model.

So that the one call on a lent GPU works the first time: the data builder and
the protocol module run as experiments/README.md says, on synthetic
CIFAR-shaped arrays
(tests never need ../shared), with TensorFlow blocked as on an accelerator
image.
"""

import os
import sys

import numpy as np
import pytest

from experiments.accelerator import build_accelerator_data
from experiments.common import records
import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_cifar(path, per_class_train=30, per_class_test=12):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, per_class in (('train', per_class_train), ('test', per_class_test)):
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    # Class-coloured images, so that the tiny run has something to learn.
    colours = np.linspace(20, 235, 10)[labels][:, None, None, None]
    noise = rng.normal(0, 20, (len(labels), 32, 32, 3))
    arrays[f'x_{split}'] = np.clip(colours + noise, 0, 255).astype(np.uint8)
    arrays[f'y_{split}'] = labels.astype(np.int64)
  np.savez(path, **arrays)


def test_builder_takes_the_first_images_of_each_class(tmp_path):
  source, output = tmp_path / 'cifar.npz', tmp_path / 'subset.npz'
  _fake_cifar(source)
  sizes = build_accelerator_data.build(str(source), str(output), 20, 5)
  assert (sizes['num_train'], sizes['num_test']) == (200, 50)
  with np.load(source) as full, np.load(output) as subset:
    assert subset['x_train'].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(subset['y_train']), [20] * 10)
    np.testing.assert_array_equal(np.bincount(subset['y_test']), [5] * 10)
    first_of_class0 = np.flatnonzero(full['y_train'] == 0)[:20]
    np.testing.assert_array_equal(subset['x_train'][subset['y_train'] == 0],
                                  full['x_train'][first_of_class0])
  with pytest.raises(ValueError, match='Class 0 has 30 examples'):
    build_accelerator_data.build(str(source), str(output), 31, 5)
  with pytest.raises(FileNotFoundError, match='--source='):
    build_accelerator_data.build(str(tmp_path / 'missing.npz'), str(output),
                                 1, 1)


def test_protocol_runs_end_to_end_without_tensorflow(tmp_path):
  source, data = tmp_path / 'cifar.npz', tmp_path / 'subset.npz'
  _fake_cifar(source)
  env = {**os.environ, 'PYTHONPATH': ROOT}
  launch.run([sys.executable, '-m',
              'experiments.accelerator.build_accelerator_data',
              f'--source={source}', f'--output={data}',
              '--train_per_class=25', '--test_per_class=10'],
             check=True, cwd=ROOT, env=env, timeout=120)
  out = tmp_path / 'results'
  argv = ['accelerator_protocol', f'--data={data}',
          f'--out={out}', f'--workdir_root={tmp_path / "work"}',
          '--model=resnet10', '--width=8', '--image_size=16',
          '--batch_size=32', '--projector_hidden=32', '--bench_steps=2',
          '--budget_s=1', '--eval_reserve_s=0', '--linear_epochs=2',
          # One dtype (each benchmarked config costs a compilation); the
          # bfloat16 steps are checked in test_mixed_precision.
          '--bench_dtypes=float32', '--train_dtype=float32']
  # As `python -m experiments.accelerator.accelerator_protocol` runs it
  # (alter_sys: argv[0] becomes the module's file), TensorFlow blocked.
  code = ("import runpy, sys; sys.modules['tensorflow'] = None; "
          f"sys.argv = {argv!r}; "
          "runpy.run_module('experiments.accelerator.accelerator_protocol', "
          "run_name='__main__', alter_sys=True)")
  result = launch.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Device: cpu' in result.stdout.replace('Device: CPU', 'Device: cpu')
  (path,) = records.records_in(str(out))
  report = records.read_record(path)
  head = report['record']
  assert head['kind'] == 'accelerator_protocol'
  assert head['versions']['jax'] and head['versions']['tensorflow'] is None
  assert head['devices']['platform'] == 'cpu'
  # conftest.py's two host devices (XLA_FLAGS, which configure_cpu keeps).
  assert head['devices']['count'] == 2
  assert '--xla_force_host_platform_device_count=2' in head['xla_flags']
  assert head['command'].startswith(
      'python -m experiments.accelerator.accelerator_protocol --data=')
  assert head['unknown'] == []
  assert {(r['gating'], r['dtype']) for r in report['benchmark']} == {
      ('none', 'float32'), ('cdg', 'float32')}
  assert set(report['gated_over_dense']) == {'float32'}
  assert report['plan']['dtype'] == 'float32'
  # A 1 s budget still trains one epoch (250 images // 32 = 7 steps).
  assert report['plan']['epochs'] == 1
  for name in ('dense', 'cdg'):
    run = report['training'][name]
    assert run['steps'] == 7
    assert 0 <= run['knn_top1'] <= 1 and 0 <= run['linear_top1'] <= 1
    assert run['eval_split'] == 'test' and run['num_test'] == 100
  assert report['training']['dense']['flops_reduction'] == 1.0
  assert report['training']['cdg']['flops_reduction'] > 1.0
  table = open(records.markdown_path(path)).read()
  assert '| cdg | float32 |' in table and '| dense |' in table
