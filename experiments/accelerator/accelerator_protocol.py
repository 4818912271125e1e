r"""The accelerator protocol: step benchmark, then dense and CDG SimCLR in a budget.

  python -m experiments.accelerator.build_accelerator_data  # once, on a machine with
                                                       # ../shared/data/cifar10.npz
  python -m experiments.accelerator.accelerator_protocol --budget_s=300 \
      --out=experiments/results/accelerator

In one call, on whatever JAX sees (GPU, TPU or CPU):

  (a) prints and records the device, the JAX version and the packages;
  (b) times the SimCLR train step of dense and CDG CIFAR ResNet-18 (width 64,
      32x32, batch 512 by default) in float32 and bfloat16: images/s and the
      gated/dense step-time ratio;
  (c) trains SimCLR dense and CDG (library defaults) on the class-balanced
      CIFAR-10 subset built by `build_accelerator_data.py` (12,500 train, 5,000
      test images), for the same number of epochs, the most that fit
      `--budget_s` of training (both runs together) at the measured step time
      of `--train_dtype`, and evaluates kNN top-1, linear top-1 and the test-set
      FLOPs reduction of each;
  (d) writes a new record into `--out` (`records.py`:
      `<out>/<date>-<device>.json`, e.g. `2026-12-06T10-00-00-nvidia-h100-80gb-hbm3.json`,
      with the device, its count, XLA flags, the packages, the command, the
      date and, where the checkout has git, the commit in its header; what
      the machine cannot tell, no git or no CPU model, is null and listed
      under `record.unknown`) and its Markdown beside it.

The training runs are the library's own (`cdg_jax.train.train_and_evaluate`
and `cdg_jax.linear_eval.run_linear_eval`), with the `configs/simclr_cifar10.py`
recipe (LARS, base LR 1.0 x batch/256, warm-up over the first tenth of the
epochs, cosine decay) on the subset. Needs no TensorFlow. CI runs this script
end to end on CPU with a tiny model and budget (tests/test_accelerator_protocol.py).
"""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

from absl import app
from absl import flags

from experiments.common import records
from experiments.common.repo import REPO_ROOT

flags.DEFINE_string('data', os.path.join(REPO_ROOT, 'data',
                                         'cifar10_accelerator.npz'),
                    'The subset written by build_accelerator_data.py.')
flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                        'accelerator'),
                    'Folder of the records: each run writes a new '
                    '<date>-<device>.json (records.py) and its .md.')
flags.DEFINE_string('workdir_root', '/tmp/cdg_accelerator',
                    'Parent of the two training workdirs (cleared first).')
flags.DEFINE_float('budget_s', 300.0, 'Wall-clock budget of the two '
                   'trainings together, compilation and evaluation excluded '
                   '(they are estimated and reserved separately).')
flags.DEFINE_float('eval_reserve_s', 60.0, 'Seconds set aside for the '
                   'evaluations of both runs when choosing the epochs.')
flags.DEFINE_integer('max_epochs', 1000, 'Upper bound on the epochs trained.')
flags.DEFINE_string('model', 'resnet18', 'Backbone.')
flags.DEFINE_integer('width', 64, 'Backbone width (64: the standard network).')
flags.DEFINE_integer('image_size', 32, 'Image size (the subset is resized).')
flags.DEFINE_integer('batch_size', 512, 'Images per step (two views each).')
flags.DEFINE_integer('projector_hidden', 2048, 'Projector hidden width.')
flags.DEFINE_integer('bench_steps', 10, 'Timed steps per benchmark config.')
flags.DEFINE_list('bench_dtypes', ['float32', 'bfloat16'],
                  'Compute dtypes the step benchmark times.')
flags.DEFINE_string('train_dtype', 'bfloat16', 'Compute dtype of the '
                    'training runs (must be among --bench_dtypes).')
flags.DEFINE_integer('linear_epochs', 100, 'Epochs of the linear evaluation.')
FLAGS = flags.FLAGS

def environment() -> dict[str, Any]:
  """The devices JAX computes on and the installed packages (the record's
  header holds the same), printed before anything is measured."""
  devices = records.jax_devices()
  if devices is None:   # JAX not started yet: start it
    import jax  # pylint: disable=g-import-not-at-top
    jax.devices()
    devices = records.jax_devices()
  return {'devices': devices, 'versions': records.versions()}


def make_config(kind: str, dtype: str, epochs: float = 1.0):
  """The SimCLR CIFAR-10 config at this protocol's scale."""
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_variants(config_lib.base_config(), None)
  config.gating.kind = kind
  config.model.name = FLAGS.model
  config.model.width = FLAGS.width
  config.model.dtype = dtype
  config.ssl.projector_hidden_dims = (FLAGS.projector_hidden,)
  config.data.source = 'npz'
  config.data.npz_path = FLAGS.data
  config.data.image_size = FLAGS.image_size
  config.batch_size = FLAGS.batch_size
  config.num_epochs = float(epochs)
  config.optim.warmup_epochs = max(0.1 * epochs, 0.0)
  config.log_every_steps = 20
  config.checkpoint.every_steps = 10**9   # the last step only
  config.checkpoint.keep = 1
  config.eval.batch_size = 1000
  config.linear_eval.epochs = FLAGS.linear_epochs
  return config


def benchmark() -> list[dict[str, Any]]:
  """Step time of dense and CDG in each of --bench_dtypes."""
  from experiments.common import step_timing  # pylint: disable=g-import-not-at-top
  rows = []
  for dtype in FLAGS.bench_dtypes:
    for kind in ('none', 'cdg'):
      row = step_timing.time_step(make_config(kind, dtype),
                                     FLAGS.bench_steps, num_train=12_500)
      rows.append(row)
      print(f'  {kind:>4} {dtype:>8}: {row["median_step_s"] * 1e3:8.1f} ms/step, '
            f'{row["images_per_s"]:9.1f} images/s (first step '
            f'{row["first_step_s"]:.1f} s)', flush=True)
  return rows


def gated_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
  """CDG step time over dense step time, per dtype."""
  times = {(r['gating'], r['dtype']): r['median_step_s'] for r in rows}
  return {dtype: times[('cdg', dtype)] / times[('none', dtype)]
          for dtype in {r['dtype'] for r in rows}}


def choose_epochs(rows: list[dict[str, Any]], steps_per_epoch: int,
                  budget_s: float, eval_reserve_s: float, dtype: str,
                  max_epochs: int) -> dict[str, Any]:
  """The most epochs both runs fit in the budget at the measured step times.

  Compilation (measured by the benchmark's first steps) and `eval_reserve_s`
  are set aside first; at least one epoch is trained.
  """
  times = {r['gating']: r for r in rows if r['dtype'] == dtype}
  if set(times) != {'none', 'cdg'}:
    raise ValueError(f'--train_dtype={dtype!r} was not benchmarked; '
                     f'--bench_dtypes={FLAGS.bench_dtypes}.')
  per_epoch_s = steps_per_epoch * (times['none']['median_step_s'] +
                                   times['cdg']['median_step_s'])
  compile_s = times['none']['first_step_s'] + times['cdg']['first_step_s']
  available = budget_s - compile_s - eval_reserve_s
  epochs = int(min(max_epochs, max(1, math.floor(available / per_epoch_s))))
  return {'epochs': epochs, 'seconds_per_epoch_both_runs': per_epoch_s,
          'compile_s_reserved': compile_s, 'eval_s_reserved': eval_reserve_s,
          'planned_train_s': epochs * per_epoch_s}


def train_both(epochs: int, dtype: str) -> dict[str, dict[str, Any]]:
  """Trains and evaluates dense and CDG; returns their results."""
  import shutil  # pylint: disable=g-import-not-at-top
  from cdg_jax import linear_eval  # pylint: disable=g-import-not-at-top
  from cdg_jax import train
  results = {}
  for name, kind in (('dense', 'none'), ('cdg', 'cdg')):
    workdir = os.path.join(FLAGS.workdir_root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    config = make_config(kind, dtype, epochs)
    start = time.time()
    summary = train.train_and_evaluate(config, workdir)
    train_s = time.time() - start
    start = time.time()
    linear = linear_eval.run_linear_eval(config, workdir)
    results[name] = {
        'gating': kind, 'epochs': epochs, 'steps': summary['steps'],
        'knn_top1': summary['knn_top1'], 'linear_top1': linear['top1'],
        'flops_reduction': summary['flops_reduction'],
        'gate_density': linear['gate_density'],
        'train_wall_s': train_s, 'linear_eval_wall_s': time.time() - start,
        'num_train': linear['num_train'], 'num_test': linear['num_test'],
        'eval_split': summary['eval_split'],
    }
    print(f'  {name}: kNN {100 * summary["knn_top1"]:.2f}%, linear '
          f'{100 * linear["top1"]:.2f}%, FLOPs reduction '
          f'{summary["flops_reduction"]:.2f}x, {train_s:.0f} s training',
          flush=True)
  return results


def markdown(report: dict[str, Any]) -> str:
  """A record of the protocol as a Markdown page."""
  plan = report['plan']
  devices = report['record']['devices'] or {}
  lines = [
      f'# Accelerator protocol: {devices.get("kind")} '
      f'({devices.get("platform")}, {devices.get("count")} device(s))', '',
      *records.header_lines(report), f'- host: {report.get("host")}', '',
      f'## Train step: SimCLR, {report["settings"]["model"]} width '
      f'{report["settings"]["width"]}, {report["settings"]["image_size"]}x'
      f'{report["settings"]["image_size"]}, batch '
      f'{report["settings"]["batch_size"]} images (two views each), median of '
      f'{report["settings"]["bench_steps"]} steps', '',
      '| gating | dtype | step (ms) | images/s | gated / dense | first step '
      '(s, compilation included) |', '| --- | --- | --- | --- | --- | --- |']
  ratios = report['gated_over_dense']
  for row in report['benchmark']:
    ratio = ratios[row['dtype']] if row['gating'] == 'cdg' else 1.0
    lines.append(f'| {row["gating"]} | {row["dtype"]} | '
                 f'{1e3 * row["median_step_s"]:.1f} | '
                 f'{row["images_per_s"]:.1f} | {ratio:.2f} | '
                 f'{row["first_step_s"]:.1f} |')
  runs = report['training']
  lines += [
      '', f'## Training: dense and CDG, {plan["epochs"]} epochs each '
      f'({report["training"]["dense"]["steps"]} steps) in {plan["dtype"]}, '
      f'budget {plan["budget_s"]:.0f} s', '',
      f'Data: {runs["dense"]["num_train"]} class-balanced CIFAR-10 training '
      f'images; kNN (k=200, T=0.1), linear top-1 and FLOPs reduction on '
      f'{runs["dense"]["num_test"]} {runs["dense"]["eval_split"]} images.', '',
      '| run | kNN top-1 | linear top-1 | FLOPs reduction | gate density | '
      'train wall (s) |', '| --- | --- | --- | --- | --- | --- |']
  for name in ('dense', 'cdg'):
    r = runs[name]
    lines.append(f'| {name} | {100 * r["knn_top1"]:.2f} | '
                 f'{100 * r["linear_top1"]:.2f} | {r["flops_reduction"]:.2f}x '
                 f'| {r["gate_density"]:.3f} | {r["train_wall_s"]:.0f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not os.path.isfile(FLAGS.data):
    raise FileNotFoundError(
        f'--data={FLAGS.data!r} does not exist; build it first with '
        f'`python -m experiments.accelerator.build_accelerator_data` (it reads '
        f'../shared/data/cifar10.npz).')
  if FLAGS.train_dtype not in FLAGS.bench_dtypes:
    raise ValueError(f'--train_dtype={FLAGS.train_dtype!r} must be one of '
                     f'--bench_dtypes={FLAGS.bench_dtypes}.')
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu()   # CPU only; before JAX starts.
  start = time.time()
  env = environment()
  devices, versions = env['devices'], env['versions']
  print(f'Device: {devices["kind"]} x{devices["count"]} '
        f'({devices["platform"]}), JAX {versions["jax"]}, Python '
        f'{versions["python"]}', flush=True)
  print('Packages: ' + ', '.join(f'{k} {v}' for k, v in versions.items()
                                 if v), flush=True)
  print('Step benchmark:', flush=True)
  rows = benchmark()
  ratios = gated_ratios(rows)
  from cdg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.create_source(make_config('none', 'float32').data)
  plan = choose_epochs(rows, source.steps_per_epoch(FLAGS.batch_size),
                       FLAGS.budget_s, FLAGS.eval_reserve_s,
                       FLAGS.train_dtype, FLAGS.max_epochs)
  plan.update(dtype=FLAGS.train_dtype, budget_s=FLAGS.budget_s)
  print(f'Training {plan["epochs"]} epochs per run in {FLAGS.train_dtype} '
        f'(planned {plan["planned_train_s"]:.0f} s of steps for both):',
        flush=True)
  training = train_both(plan['epochs'], FLAGS.train_dtype)
  report = {
      'host': platform.node(),
      'settings': {'model': FLAGS.model, 'width': FLAGS.width,
                   'image_size': FLAGS.image_size,
                   'batch_size': FLAGS.batch_size,
                   'bench_steps': FLAGS.bench_steps, 'data': FLAGS.data},
      'benchmark': rows, 'gated_over_dense': ratios, 'plan': plan,
      'training': training, 'total_wall_s': time.time() - start,
  }
  path = records.write_record(FLAGS.out, 'accelerator_protocol', report,
                              render=markdown, devices=devices)
  print(f'Record: {path} and its .md ({report["total_wall_s"]:.0f} s in '
        f'all).', flush=True)


if __name__ == '__main__':
  app.run(main)
