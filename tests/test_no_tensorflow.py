"""The TFDS source without TensorFlow says what to install; metric writers.

Accelerator images often lack TensorFlow. That the training, linear
evaluation and FLOPs commands run end to end without it is tested where
TensorFlow is truly absent: the wheel in a fresh virtual environment
(tests/test_packaging.py).
"""

import json
import os
import sys

import pytest

from cdg_jax.run import metric_logging
import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tfds_source_without_tensorflow_says_what_to_install():
  code = ("import sys; sys.modules['tensorflow'] = None; "
          "from cdg_jax.data import input_pipeline; "
          "from cdg_jax.run import config_lib; "
          "input_pipeline.create_source(config_lib.base_config().data)")
  result = launch.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode != 0
  assert 'pip install tensorflow-cpu tensorflow-datasets' in result.stderr
  assert 'data.source="npz"' in result.stderr


def test_event_files_hold_the_scalars(tmp_path):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  writer = metric_logging.create_writer(str(tmp_path), is_main=True)
  writer.write_hparams({'framework': 'simclr', 'batch_size': 256})
  writer.write_scalars(1, {'loss': 2.5, 'gate_density': 0.25})
  writer.write_scalars(2, {'loss': 2.0})
  writer.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  loss = accumulator.Scalars('loss')
  assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0)]
  assert accumulator.Scalars('gate_density')[0].value == 0.25
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{'step': 1, 'loss': 2.5, 'gate_density': 0.25},
                  {'step': 2, 'loss': 2.0}]


class _Recorder:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, dict(scalars)))


def test_report_progress_measures_the_rate_since_the_last_report():
  now = [100.0]
  recorder = _Recorder()
  report = metric_logging.ReportProgress(100, recorder, every_steps=10,
                                         clock=lambda: now[0])
  for step in range(1, 21):
    # The first step (compilation) takes 11 s, the others 0.5 s.
    now[0] += 11.0 if step == 1 else 0.5
    report(step)
  assert [step for step, _ in recorder.rows] == [10, 20]
  first, second = recorder.rows[0][1], recorder.rows[1][1]
  assert first['steps_per_sec'] == pytest.approx(10 / 15.5)
  assert second['steps_per_sec'] == pytest.approx(2.0)
  assert second['uptime'] == pytest.approx(20.5)
  with pytest.raises(ValueError, match='log_every_steps must be positive'):
    metric_logging.ReportProgress(10, recorder, every_steps=0)
  assert metric_logging.format_duration(3723) == '1h02m03s'
  assert metric_logging.format_duration(65) == '1m05s'
