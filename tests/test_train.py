"""End-to-end tests of the training program on the synthetic source."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cdg_jax import linear_eval
from cdg_jax import train
from cdg_jax.data import input_pipeline
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.ssl import pretraining

import launch
import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, variants='smoke'):
  """A config file's get_config, as `--config=configs/<name>.py:<variants>`."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variants)


def test_smoke_run_writes_results_resumes_and_feeds_linear_eval(tmp_path):
  workdir = str(tmp_path / 'run')
  config = load_config('byol_cifar100')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps'] == config.num_steps == 20
  assert 0.0 <= summary['knn_top1'] <= summary['knn_top5'] <= 1.0
  assert summary['flops_reduction'] > 1.0
  assert len(summary['layer_density']) == 8  # resnet10: 4 blocks x 2 convs
  for name in ['config.json', 'summary.json', 'metrics.jsonl',
               'gate_density.png', 'gate_masks.png', 'backbone']:
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert steps == [10, 20]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  logged = [r['step'] for r in records if 'loss' in r]
  assert logged == [5, 10, 15, 20]
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)

  # Running again resumes at the end instead of restarting.
  again = train.train_and_evaluate(config, workdir)
  assert again['resumed_from_step'] == 20 and again['steps'] == 20
  np.testing.assert_allclose(again['knn_top1'], summary['knn_top1'])

  # The FLOPs command measures the trained backbone on the same test split,
  # on one device: the backbone exported by this 2-device run loads anywhere.
  result = launch.run_module(
      'cdg_jax.flops_table', [f'--workdir={workdir}'], cwd=ROOT, timeout=300,
      env={**os.environ, 'PYTHONPATH': ROOT,
           'XLA_FLAGS': xla_env.xla_flags(device_count=1)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'reduction {summary["flops_reduction"]:.3f}x' in result.stdout
  # The exported backbone has no heads: said so, rather than "0 MMACs".
  assert 'heads: not traced' in result.stdout

  # Linear evaluation of the exported backbone.
  results = linear_eval.run_linear_eval(config, workdir)
  assert 0.0 <= results['top1'] <= results['top5'] <= 1.0
  assert results['flops_reduction'] > 1.0
  assert os.path.exists(os.path.join(workdir, 'linear_eval.json'))


class _Interrupted(Exception):
  pass


def test_interrupted_run_ends_with_the_parameters_of_an_uninterrupted_one(
    tmp_path, monkeypatch):
  import _run_shared  # pylint: disable=g-import-not-at-top
  # The uninterrupted run: 4 steps, a checkpoint every 2 (trained once per
  # test process, copied here).
  config = _run_shared.small_config()
  straight = _run_shared.copy_of_small_run(tmp_path / 'straight')

  real_create_source = input_pipeline.create_source

  def create_source_that_dies(data_config):
    source = real_create_source(data_config)
    real_batches = source.train_batches

    def batches(*args, **kwargs):
      for i, batch in enumerate(real_batches(*args, **kwargs)):
        if i == 3:  # the process "dies" while step 4 waits for its batch
          raise _Interrupted()
        yield batch
    source.train_batches = batches
    return source

  workdir = str(tmp_path / 'interrupted')
  monkeypatch.setattr(input_pipeline, 'create_source', create_source_that_dies)
  with pytest.raises(_Interrupted):
    train.train_and_evaluate(config, workdir)
  assert checkpoints.complete_steps(workdir) == [2]
  monkeypatch.setattr(input_pipeline, 'create_source', real_create_source)
  # The resumed run traces its initialisation and its step once each: the
  # shape check's traces are the ones the run calls (train.check_shapes).
  traces = {'init_state': 0, 'train_step': 0}
  real_assemble = pretraining.assemble

  def counting_assemble(settings):
    run = real_assemble(settings)

    def counted(name):
      def traced(*args):
        traces[name] += 1
        return getattr(run, name)(*args)
      return traced
    return dataclasses.replace(run, init_state=counted('init_state'),
                               train_step=counted('train_step'))

  monkeypatch.setattr(pretraining, 'assemble', counting_assemble)
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_from_step'] == 2
  assert traces == {'init_state': 1, 'train_step': 1}

  _, _, straight = checkpoints.load_backbone(straight)
  _, _, resumed = checkpoints.load_backbone(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               straight, resumed)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = load_config('simclr_cifar10')
  config.optim.name = 'sgd'
  config.optim.base_learning_rate = 1e30   # diverges on the first update
  config.num_steps = 5
  config.log_every_steps = 1
  config.checkpoint.every_steps = 1
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='last good checkpoint is step 1'):
    train.train_and_evaluate(config, workdir)
  steps = [s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  assert steps == ['1']


def test_bad_workdir_incompatible_checkpoint_and_typos_are_reported(tmp_path):
  config = load_config('simclr_cifar10')
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(PermissionError, match='is not writable'):
    train.train_and_evaluate(config, str(blocker / 'run'))

  workdir = str(tmp_path / 'run')
  # A workdir with a saved step (the check reads only config.json and the
  # step's presence).
  os.makedirs(os.path.join(workdir, checkpoints.CHECKPOINT_DIR, '10'))
  checkpoints.write_config(config, workdir)
  other = load_config('simclr_cifar10')
  other.gating.groups = 2
  other.model.width = 16
  with pytest.raises(ValueError, match=r'(?s)gating.groups: checkpoint 4, config 2'
                     r'.*model.width: checkpoint 8, config 16'):
    train.train_and_evaluate(other, workdir)

  typo = load_config('simclr_cifar10')
  typo.gating.grups = 2
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['gating.grups'\]"):
    train.train_and_evaluate(typo, str(tmp_path / 'typo'))


def test_command_line_rejects_missing_config_and_unknown_override(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  def run(*args):
    return launch.run_module('cdg_jax.main', args, env=env, cwd=ROOT,
                             timeout=300)
  result = run('--config=configs/does_not_exist.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  # One line naming the file, not a traceback blaming 'config_config'.
  assert result.stderr.strip().splitlines() == [
      "FATAL: --config=configs/does_not_exist.py: no config file at "
      f"'configs/does_not_exist.py' (looked for "
      f"{os.path.join(ROOT, 'configs', 'does_not_exist.py')}). Config files "
      "live in configs/ of the repository; run from the repository root or "
      "give the path to the file."]
  result = run('--config=configs/byol_cifar100.py:smoke',
               '--config.gating.grups=2', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "FATAL: Bad config override --config.gating.grups=2: 'grups'",
      'Did you mean "groups" instead of "grups"?']
  # The typo is in the second override: that is the flag named.
  result = run('--config=configs/byol_cifar100.py:smoke',
               '--config.num_steps=4', '--config.batch_sise=4',
               f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[0] == (
      "FATAL: Bad config override --config.batch_sise=4: 'batch_sise'")
