r"""Trains and evaluates a grid of runs; writes a results table and plot.

  python experiments/run_grid.py --grid=core            # the CPU protocol
  python experiments/run_grid.py --grid=core,ablations,byol,cifar100,repro
  python experiments/run_grid.py --grid=core --only=simclr_c10_cdg --rerun

Each run is two real command lines, recorded in its result: pretraining
(`python -m cdg_jax.main`) and linear evaluation (`python -m
cdg_jax.linear_eval`), run as subprocesses from the repository root. A run's
result is written to `<results_dir>/runs/<name>.json` as soon as it finishes;
started again, the runner skips runs that have a result, and a run interrupted
half-way resumes from its last checkpoint in `<workdir_root>/<name>`. After
every run the table (`results.md`, `results.csv`) and the plot of accuracy
against FLOPs reduction (`accuracy_vs_flops.png`) are rebuilt from all results
in the directory.

Accuracy is kNN top-1 (k=200, T=0.1, bank = train split) and linear top-1, both
on the whole test set; the FLOPs reduction is the backbone's, measured on the
test set from the traced masks (summary.json of the run). Grids (see GRIDS):

  core       SimCLR on CIFAR-10: dense, CDG unstructured, CDG structured
             (2x2x4 blocks), channel predictor, spatial predictor.
  byol       the same five under BYOL.
  cifar100   BYOL on CIFAR-100: dense and CDG.
  ablations  SimCLR: joint saliency statistics, density targets 0.15 and
             0.35 (with the core 0.25: three strengths), threshold-form
             regulariser, block (1x1x4); BYOL: target branch left dense.
  repro      the core CDG run again with the same seed.
  seeds      the core runs except structured CDG, at seeds 1 and 2 (spread
             between seeds; results.md averages the seeds of each setting).
  longer     the core dense and CDG runs at 12 epochs instead of 4.
  selection  model selection on a validation split (5,000 training images
             held out): CDG's lineage options one by one and together, and a
             density target annealed from 1 (ours); dense for reference.
  matched    more density targets of CDG and both predictors, for the
             accuracy-vs-FLOPs curves compared at 2.0x and 2.5x.
  matched_seeds  seeds 1 and 2 of the channel predictor at density 0.4, its
             operating point nearest 2.2x.
  tiles      tile-structured CDG, (4, 4, 0) blocks (what sparse inference
             skips; the ':tiles' variant).
  tiles32    tile-structured CDG at 32x32 with one tile size per stage
             (8, 8, 4, 4): the scheme of the sparse-inference benchmark.
  partner_selection  the dense partner (issue 20; ours, after Krishna et
             al.) on the validation split: SimCLR with shared and with
             separate BatchNorm for the dense path; BYOL with the target
             dense ('online') against both branches gated, and BYOL dense.
  fbs        the channel predictor with FBS's published, unbounded ReLU
             saliency, SimCLR and BYOL, at learning rate 1.0 and 0.1; logs
             every step, so a divergence is recorded with its step.
  partner_final, resolution, length36  issue 20's final comparison and the
             gap to dense along resolution (32x32) and length (36 epochs).
  linear_protocols  the core dense and CDG runs scored with the augmented
             linear protocol (30 epochs).
  smoke      two tiny runs on synthetic data (tests use it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = 'configs/cpu_protocol.py'

flags.DEFINE_list('grid', ['core'], 'Grids to run, in order (see GRIDS).')
flags.DEFINE_list('only', [], 'Run only these run names (within --grid).')
flags.DEFINE_string('results_dir', os.path.join(REPO_ROOT, 'experiments',
                                                'results'),
                    'Where per-run results, the table and the plot go.')
flags.DEFINE_string('workdir_root', '/tmp/cdg_grid',
                    'Parent of the runs\' training workdirs (checkpoints).')
flags.DEFINE_bool('rerun', False, 'Run again even if a result exists (the '
                  'workdir is cleared first).')
flags.DEFINE_bool('table_only', False, 'Only rebuild the table and plot.')
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Run:
  """One row of the grid: a config (file:arg) plus command-line overrides."""
  name: str
  group: str
  method: str                    # legend label (dense, CDG, ...)
  config: str                    # --config value, e.g. 'configs/x.py:arg'
  overrides: tuple[tuple[str, Any], ...] = ()

  def train_command(self, workdir: str) -> list[str]:
    return (['python', '-m', 'cdg_jax.main', f'--config={self.config}',
             f'--workdir={workdir}'] +
            [f'--config.{key}={value}' for key, value in self.overrides])

  def linear_eval_command(self, workdir: str) -> list[str]:
    return (['python', '-m', 'cdg_jax.linear_eval', f'--config={self.config}',
             f'--workdir={workdir}'] +
            [f'--config.{key}={value}' for key, value in self.overrides])


def _five(group: str, prefix: str, base: str) -> list[Run]:
  """Dense, CDG, CDG structured and the two predictor baselines."""
  return [
      Run(f'{prefix}_dense', group, 'dense', f'{PROTOCOL}:{base},dense'),
      Run(f'{prefix}_cdg', group, 'CDG', f'{PROTOCOL}:{base}'),
      Run(f'{prefix}_cdg_structured', group, 'CDG structured 2x2x4',
          f'{PROTOCOL}:{base},structured'),
      Run(f'{prefix}_channel_predictor', group, 'channel predictor',
          f'{PROTOCOL}:{base},channel_predictor'),
      Run(f'{prefix}_spatial_predictor', group, 'spatial predictor',
          f'{PROTOCOL}:{base},spatial_predictor'),
  ]


_SIMCLR = f'{PROTOCOL}:simclr_cifar10'
# Model selection (issue 12): training on 20,000 of the 25,000 training
# images, scored on the other 5,000 (class balanced, the same for every run);
# the test set is not touched.
VALIDATION = (('data.validation_size', 5000),)
# CDG's public lineage (channel gating / CGNet; docs/method.md [what is whose]), as
# gating overrides.
_DIAGONAL = (('gating.grouping', 'diagonal'),)
_INSTANCE_NORM = (('gating.saliency_norm', 'sample'),
                  ('gating.saliency_grad', True))
_HARD_SIGMOID = (('gating.surrogate', 'hard_sigmoid'),)
_THRESHOLD_SUM = (('gating.regularizer', 'threshold_sum'),
                  ('gating.weight', 1e-4), ('gating.threshold_target', 1.0))


def _selection(name: str, method: str, overrides=(), config=_SIMCLR,
               group: str = 'selection') -> Run:
  return Run(f'sel_{name}', group, method, config,
             VALIDATION + tuple(overrides))


_BYOL = f'{PROTOCOL}:byol_cifar10'
_DENSE_PARTNER = (('gating.branches', 'dense_partner'),)
# FBS as published: the unbounded ReLU saliency; every step logged, so the
# step of a divergence is exact.
_FBS_RELU = (('gating.predictor_saliency', 'relu'), ('log_every_steps', 1))
# The variant chosen on the validation split (partner_selection): the dense
# partner with the dense path's own BatchNorm.
_PARTNER = _DENSE_PARTNER + (('gating.partner_norm', 'separate'),)
_PARTNER_LABEL = 'CDG dense partner'
# One FLOPs budget for the network (issue 30), and the forms selected among.
_FLOPS_BUDGET = (('gating.regularizer', 'flops'),)
_BUDGET_FORMS = (
    ('_bounds', ' with bounds relaxing over 1/3',
     (('gating.budget_bounds_fraction', 0.33),)),
    ('', ', no bounds', ()),
    ('_delayed', ', no bounds, from 1/4 ramped over 1/10',
     (('gating.budget_start_fraction', 0.25),
      ('gating.budget_ramp_fraction', 0.1))),
)
# The rows compared along resolution and length: each as at 16x16 / 4 epochs
# except the named axis (the channel predictor at density 0.4, its point
# nearest CDG's 2.2x).
_SCALE_ROWS = (
    ('dense', 'dense', f'{_SIMCLR},dense', ()),
    ('cdg', 'CDG', _SIMCLR, ()),
    ('cdg_partner', _PARTNER_LABEL, _SIMCLR, _PARTNER),
    ('channel_predictor_d0.4', 'channel predictor density 0.4',
     f'{_SIMCLR},channel_predictor', (('gating.density_target', 0.4),)),
)


GRIDS: dict[str, list[Run]] = {
    'core': _five('core', 'simclr_c10', 'simclr_cifar10'),
    'byol': _five('byol', 'byol_c10', 'byol_cifar10'),
    'cifar100': [
        Run('byol_c100_dense', 'cifar100', 'dense',
            f'{PROTOCOL}:byol_cifar100,dense'),
        Run('byol_c100_cdg', 'cifar100', 'CDG', f'{PROTOCOL}:byol_cifar100'),
    ],
    'ablations': [
        Run('simclr_c10_cdg_joint_stats', 'ablations', 'CDG joint statistics',
            _SIMCLR, (('gating.saliency_stats', 'joint'),)),
        Run('simclr_c10_cdg_target0.15', 'ablations', 'CDG density 0.15',
            _SIMCLR, (('gating.density_target', 0.15),)),
        Run('simclr_c10_cdg_target0.35', 'ablations', 'CDG density 0.35',
            _SIMCLR, (('gating.density_target', 0.35),)),
        Run('simclr_c10_cdg_threshold_reg', 'ablations',
            'CDG threshold form 0.1', _SIMCLR,
            (('gating.regularizer', 'threshold'), ('gating.weight', 0.1),
             ('gating.threshold_target', 1.0))),
        Run('simclr_c10_cdg_block114', 'ablations', 'CDG structured 1x1x4',
            _SIMCLR, (('gating.block', '(1,1,4)'),)),
        Run('byol_c10_cdg_online_only', 'ablations', 'CDG online branch only',
            f'{PROTOCOL}:byol_cifar10', (('gating.branches', 'online'),)),
    ],
    'repro': [Run('simclr_c10_cdg_repro', 'repro', 'CDG (rerun)', _SIMCLR)],
    # Seeds 1 and 2 of the core rows (structured CDG aside): the seed-to-seed
    # spread, and whether the core comparisons hold across seeds. Same method
    # labels as the core rows: the table groups them by setting.
    'seeds': [
        dataclasses.replace(run, name=f'{run.name}_seed{seed}', group='seeds',
                            overrides=(('seed', seed),))
        for seed in (1, 2)
        for run in _five('seeds', 'simclr_c10', 'simclr_cifar10')
        if run.method != 'CDG structured 2x2x4'
    ],
    # Three times the CPU protocol's length: does the gap to dense shrink?
    'longer': [
        Run('simclr_c10_dense_12ep', 'longer', 'dense, 12 epochs',
            f'{PROTOCOL}:simclr_cifar10,dense', (('num_epochs', 12.0),)),
        Run('simclr_c10_cdg_12ep', 'longer', 'CDG, 12 epochs', _SIMCLR,
            (('num_epochs', 12.0),)),
    ],
    # Each lineage option alone, the lineage as a whole, and ours (a density
    # target annealed from 1), all on the validation split.
    'selection': [
        _selection('dense', 'dense', config=f'{_SIMCLR},dense'),
        _selection('cdg', 'CDG (first reading)'),
        _selection('cdg_diagonal', 'CDG diagonal grouping', _DIAGONAL),
        _selection('cdg_saliency_grad', 'CDG saliency gradient',
                   (('gating.saliency_grad', True),)),
        _selection('cdg_instance_norm', 'CDG instance-norm saliency',
                   _INSTANCE_NORM),
        _selection('cdg_hard_sigmoid', 'CDG hard-sigmoid surrogate',
                   _HARD_SIGMOID),
        _selection('cdg_threshold_sum', 'CDG summed threshold reg. 1e-4',
                   _THRESHOLD_SUM),
        _selection('cdg_lineage', 'CDG as the lineage (all four)',
                   _DIAGONAL + _INSTANCE_NORM + _HARD_SIGMOID
                   + _THRESHOLD_SUM),
        _selection('cdg_lineage_density', 'CDG lineage, density target',
                   _DIAGONAL + _INSTANCE_NORM + _HARD_SIGMOID),
        _selection('cdg_anneal', 'CDG target annealed (ours)',
                   (('gating.target_anneal_fraction', 0.5),)),
    ],
    # More operating points of each method (the core rows are the 0.25 / 0.5
    # points, the ablations CDG's 0.35 and 0.15): accuracy against FLOPs
    # curves, compared at equal FLOPs (results.md, matched_flops.png).
    'matched': [
        Run('simclr_c10_cdg_target0.10', 'matched', 'CDG density 0.10',
            _SIMCLR, (('gating.density_target', 0.1),)),
        *[Run(f'simclr_c10_{kind}_d{density}', 'matched',
              f'{kind.replace("_", " ")} density {density}',
              f'{_SIMCLR},{kind}', (('gating.density_target', density),))
          for kind, densities in (('channel_predictor', (0.6, 0.4, 0.35)),
                                  # 0.4 already lands at 3.28x.
                                  ('spatial_predictor', (0.6, 0.4)))
          for density in densities],
    ],
    # Seeds 1 and 2 of the channel predictor at density 0.4 (2.27x): its
    # operating point nearest CDG's 2.2x (its core 0.5 point lands at 1.92x).
    'matched_seeds': [
        Run(f'simclr_c10_channel_predictor_d0.4_seed{seed}', 'seeds',
            'channel predictor density 0.4', f'{_SIMCLR},channel_predictor',
            (('gating.density_target', 0.4), ('seed', seed)))
        for seed in (1, 2)
    ],
    # Tile-structured CDG (one decision per tile of positions, all channels:
    # what block-sparse inference skips).
    'tiles': [
        Run('simclr_c10_cdg_tiles4', 'tiles', 'CDG tiles 4x4x0', _SIMCLR,
            (('gating.block', '(4,4,0)'),)),
    ],
    # Issue 22: the tile scheme block-sparse inference settled on (8x8 tiles
    # on the 32x32 and 16x16 maps, 4x4 on the 8x8 and 4x4 ones), trained at
    # 32x32 beside unstructured CDG's 32x32 row of the 'resolution' grid.
    'tiles32': [
        Run('simclr_c10_cdg_tiles8844_32px', 'tiles',
            'CDG tiles 8-8-4-4 (per stage), 32x32', _SIMCLR,
            (('gating.stage_blocks', '((8,8,0),(8,8,0),(4,4,0),(4,4,0))'),
             ('data.image_size', 32))),
    ],
    # Issue 20 item 4: the dense partner and BYOL's dense target, chosen on
    # the validation split (density target 0.25, seed 0).
    'partner_selection': [
        _selection('cdg_partner', 'CDG dense partner, shared BN',
                   _DENSE_PARTNER, group='partner_selection'),
        _selection('cdg_partner_separate', 'CDG dense partner, separate BN',
                   _DENSE_PARTNER + (('gating.partner_norm', 'separate'),),
                   group='partner_selection'),
        _selection('byol_dense', 'dense', config=f'{_BYOL},dense',
                   group='partner_selection'),
        _selection('byol_cdg', 'CDG (both branches gated)', config=_BYOL,
                   group='partner_selection'),
        _selection('byol_cdg_online', 'CDG, target dense (online)',
                   (('gating.branches', 'online'),), config=_BYOL,
                   group='partner_selection'),
    ],
    # Issue 20 item 3: FBS's published saliency, at the protocol's learning
    # rate and at a tenth of it.
    'fbs': [
        Run(f'{prefix}_channel_predictor_relu{suffix}', 'fbs',
            f'channel predictor, FBS ReLU saliency{label}',
            f'{config},channel_predictor', _FBS_RELU + lr)
        for prefix, config in (('simclr_c10', _SIMCLR), ('byol_c10', _BYOL))
        for suffix, label, lr in (
            ('', '', ()),
            ('_lr0.1', ', LR 0.1', (('optim.base_learning_rate', 0.1),)))
    ],
    # Issue 20 item 5: the chosen variant (selection: the dense partner with
    # separate BatchNorm) on the test split: its accuracy-vs-FLOPs curve,
    # seeds 1 and 2 at its 2.2x point, and 12 epochs.
    'partner_final': [
        Run('simclr_c10_cdg_partner', 'partner', _PARTNER_LABEL, _SIMCLR,
            _PARTNER),
        *[Run(f'simclr_c10_cdg_partner_target{density}', 'partner',
              f'{_PARTNER_LABEL} density {density}', _SIMCLR,
              _PARTNER + (('gating.density_target', density),))
          for density in (0.35, 0.15, 0.10)],
        *[Run(f'simclr_c10_cdg_partner_seed{seed}', 'seeds', _PARTNER_LABEL,
              _SIMCLR, _PARTNER + (('seed', seed),)) for seed in (1, 2)],
        Run('simclr_c10_cdg_partner_12ep', 'longer',
            f'{_PARTNER_LABEL}, 12 epochs', _SIMCLR,
            _PARTNER + (('num_epochs', 12.0),)),
    ],
    # Issue 20 item 6: the gap to dense along resolution (32x32 instead of
    # 16x16: gated maps 32/16/8/4) and length (36 epochs instead of 4).
    'resolution': [
        Run(f'simclr_c10_{name}_32px', 'scale', f'{label}, 32x32', config,
            overrides + (('data.image_size', 32),))
        for name, label, config, overrides in _SCALE_ROWS
    ],
    'length36': [
        Run(f'simclr_c10_{name}_36ep', 'scale', f'{label}, 36 epochs', config,
            overrides + (('num_epochs', 36.0),))
        for name, label, config, overrides in _SCALE_ROWS
        if name != 'channel_predictor_d0.4'
    ],
    # Issue 23: the core dense and CDG runs (the same commands: training is
    # deterministic for a fixed device count, so the same backbones) scored
    # with the literature's augmented linear protocol, 30 epochs instead of
    # 100 for the CPU budget (the learning-rate steps at 60% and 80%).
    'linear_protocols': [
        Run(f'simclr_c10_{name}_augmented_linear', 'linear_protocols',
            f'{label} (augmented linear, 30 epochs)', config,
            (('linear_eval.protocol', 'augmented'),
             ('linear_eval.epochs', 30)))
        for name, label, config in (('dense', 'dense', f'{_SIMCLR},dense'),
                                    ('cdg', 'CDG', _SIMCLR))
    ],
    # Issue 30: one FLOPs budget for the whole network (the field's form,
    # docs/method.md [regulariser]) against today's uniform
    # per-layer target (sel_cdg, lambda 1), on the validation split, seed 0,
    # at the same gated-layer density 0.25: with per-layer bounds relaxing
    # over the first third (DynConv), without bounds, and without bounds but
    # off for the first quarter then ramped in over a tenth (Learning Dynamic
    # Routing); lambda 10 (DynConv's) and 30.
    'budget_selection': [
        _selection(f'cdg_flops{name}_l{weight:g}',
                   f'CDG FLOPs budget{label}, lambda {weight:g}',
                   _FLOPS_BUDGET + (('gating.weight', weight),) + overrides,
                   group='budget_selection')
        for weight in (10.0, 30.0)
        for name, label, overrides in _BUDGET_FORMS
    ],
    # Issue 30 item 5: the same two backbones scored with the augmented
    # protocol behind a non-affine feature BatchNorm (MAE's linear probe).
    'linear_protocols_bn': [
        Run(f'simclr_c10_{name}_augmented_linear_bn', 'linear_protocols',
            f'{label} (augmented linear + feature BatchNorm, 30 epochs)',
            config, (('linear_eval.protocol', 'augmented'),
                     ('linear_eval.epochs', 30),
                     ('linear_eval.augmented.feature_norm', 'batchnorm')))
        for name, label, config in (('dense', 'dense', f'{_SIMCLR},dense'),
                                    ('cdg', 'CDG', _SIMCLR))
    ],
    # Issue 30 item 4: the gap to dense along width (32 instead of the
    # protocol's 16; the paper's is 64), 16x16, seed 0, test split.
    'width32': [
        Run(f'simclr_c10_{name}_w32', 'scale', f'{label}, width 32', config,
            overrides + (('model.width', 32),))
        for name, label, config, overrides in (
            ('dense', 'dense', f'{_SIMCLR},dense', ()),
            # The form selected on validation (budget_selection): the
            # uniform per-layer target, the default.
            ('cdg', 'CDG', _SIMCLR, ()))
    ],
    'smoke': [
        Run('smoke_dense', 'smoke', 'dense', 'configs/simclr_cifar10.py:'
            'smoke,dense', (('num_steps', 4), ('linear_eval.epochs', 2))),
        Run('smoke_cdg', 'smoke', 'CDG', 'configs/simclr_cifar10.py:smoke',
            (('num_steps', 4), ('linear_eval.epochs', 2))),
    ],
}


def _shell(command: list[str]) -> str:
  return ' '.join(shlex.quote(part) for part in command)


def _run_command(command: list[str], log_path: str) -> float:
  """Runs `command` from the repository root, appending to `log_path`."""
  start = time.time()
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO_ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
  with open(log_path, 'a') as log:
    log.write(f'$ {_shell(command)}\n')
    log.flush()
    process = subprocess.run([sys.executable] + command[1:], cwd=REPO_ROOT,
                             env=env, stdout=log, stderr=subprocess.STDOUT,
                             check=False)
  if process.returncode != 0:
    raise RuntimeError(f'Command failed with exit status '
                       f'{process.returncode}: {_shell(command)}\n'
                       f'See the log {log_path}.')
  return time.time() - start


def result_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, 'runs', f'{name}.json')


def run_one(run: Run, results_dir: str, workdir_root: str) -> dict[str, Any]:
  """Trains, evaluates and saves one run's result; returns it."""
  start = time.time()
  workdir = os.path.join(workdir_root, run.name)
  os.makedirs(os.path.join(results_dir, 'runs'), exist_ok=True)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, 'run_grid.log')
  train_command = run.train_command(workdir)
  eval_command = run.linear_eval_command(workdir)
  with open(log_path, 'a') as log:
    log_start = log.tell()
  try:
    train_s = _run_command(train_command, log_path)
  except RuntimeError:
    with open(log_path) as log:
      log.seek(log_start)
      diverged_at = divergence_step(log.read())
    if diverged_at is None:
      raise
    # A divergence is a result (FBS's published saliency, issue 20), not a
    # failure of the runner: record the step, the losses before it, no
    # accuracy.
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    result = {**_describe(run, config), 'diverged_at_step': diverged_at,
              'losses_before_divergence': last_losses(workdir),
              'knn_top1': None, 'linear_top1': None, 'flops_reduction': None,
              'gate_density': None, 'steps': diverged_at,
              'eval_split': ('validation' if config['data']['validation_size']
                             else 'test'),
              'train_wall_s': time.time() - start, 'linear_eval_wall_s': 0.0,
              'resumed_from_step': 0, 'train_command': _shell(train_command),
              'linear_eval_command': '',
              'finished': time.strftime('%Y-%m-%d %H:%M:%S UTC',
                                        time.gmtime())}
    _save_result(results_dir, run.name, result)
    return result
  eval_s = _run_command(eval_command, log_path)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'linear_eval.json')) as f:
    linear = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  dense_knn = (summary.get('dense_network') or {}).get('knn_top1')
  dense_linear = (linear.get('dense_network') or {}).get('top1')
  result = {
      **_describe(run, config),
      'eval_split': summary.get('eval_split', 'test'),
      'num_train': summary.get('num_train'),
      'steps': summary['steps'],
      'knn_top1': summary['knn_top1'], 'linear_top1': linear['top1'],
      'flops_reduction': summary['flops_reduction'],
      'gate_density': linear['gate_density'],
      # Where the network spent its FLOPs (issue 30): each gated layer's
      # density and share of the backbone's dense MACs, on the eval split.
      'layer_density': summary.get('layer_density'),
      'layer_flops_share': summary.get('layer_flops_share'),
      # The dense network of a dense-partner run (every gate open).
      'dense_knn_top1': dense_knn, 'dense_linear_top1': dense_linear,
      'diverged_at_step': None,
      # Which linear protocol made linear_top1 (cdg_jax.linear_eval).
      'linear_protocol': linear.get('linear_eval', {}).get('protocol', 'fast'),
      'linear_epochs': linear.get('linear_eval', {}).get('epochs'),
      # The augmented protocol's feature normalisation (issue 30).
      'linear_feature_norm': linear_feature_norm(linear),
      # The wall time of the commands as run by this grid (a run resumed from
      # a checkpoint counts only its last part; see resumed_from_step).
      'train_wall_s': train_s, 'linear_eval_wall_s': eval_s,
      'resumed_from_step': summary.get('resumed_from_step', 0),
      'train_command': _shell(train_command),
      'linear_eval_command': _shell(eval_command),
      'finished': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
  }
  _save_result(results_dir, run.name, result)
  return result


def linear_feature_norm(linear: dict[str, Any]) -> str:
  """The augmented protocol's feature normalisation in a linear_eval.json
  ('none' for the fast protocol, which standardises on its own, and for
  results written before the field existed)."""
  settings = linear.get('linear_eval', {})
  if settings.get('protocol') != 'augmented':
    return 'none'
  return (settings.get('augmented') or {}).get('feature_norm', 'none')


def divergence_step(log_text: str) -> int | None:
  """The step of the training loop's non-finite-loss stop in a log, if any."""
  match = re.search(r'Loss is \S+ at step (\d+)', log_text)
  return int(match.group(1)) if match else None


def last_losses(workdir: str, count: int = 5) -> list[list[float]]:
  """[step, loss] of the last `count` rows of a run's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        rows.append([row['step'], row['loss']])
  return rows[-count:]


def _save_result(results_dir: str, name: str, result: dict[str, Any]) -> None:
  path = result_path(results_dir, name)
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(path + '.tmp', path)


def _describe(run: Run, config: dict[str, Any]) -> dict[str, Any]:
  """The fields of a result that describe its run (not its measures)."""
  gating = config['gating']
  return {
      'name': run.name, 'group': run.group, 'method': run.method,
      'framework': config['framework'], 'dataset': config['data']['dataset'],
      'seed': config['seed'],
      'gating': gating['kind'], 'block': gating['block'],
      'regularizer': gating['regularizer'], 'weight': gating['weight'],
      'density_target': gating['density_target'],
      'saliency_stats': gating['saliency_stats'],
      'branches': gating['branches'],
      **{field: gating.get(field, default)
         for field, default in ADDED_GATING_DEFAULTS.items()},
      'threshold_target': gating['threshold_target'],
      'learning_rate': config['optim']['base_learning_rate'],
      'model': f'{config["model"]["name"]} width {config["model"]["width"]}',
      'image_size': config['data']['image_size'],
      'batch_size': config['batch_size'],
  }


def load_results(results_dir: str) -> list[dict[str, Any]]:
  """All saved run results, in grid order, then by name."""
  runs_dir = os.path.join(results_dir, 'runs')
  if not os.path.isdir(runs_dir):
    return []
  results = []
  for filename in sorted(os.listdir(runs_dir)):
    if filename.endswith('.json'):
      with open(os.path.join(runs_dir, filename)) as f:
        results.append(with_defaults(json.load(f)))
  order = {run.name: i for i, run in enumerate(
      r for runs in GRIDS.values() for r in runs)}
  return sorted(results, key=lambda r: (order.get(r['name'], len(order)),
                                        r['name']))


# Gating fields added after the first runs (issues 12, 20 and 22), with the
# value every earlier run had: a result saved before a field existed is read
# as having run with it.
ADDED_GATING_DEFAULTS = {'grouping': 'first', 'saliency_norm': 'batch',
                         'saliency_grad': False, 'surrogate': 'sigmoid',
                         'target_anneal_fraction': 0.0,
                         'partner_norm': 'shared',
                         'predictor_saliency': 'bounded', 'stage_blocks': [],
                         'budget_bounds_fraction': 0.0,
                         'budget_start_fraction': 0.0,
                         'budget_ramp_fraction': 0.0}


def with_defaults(result: dict[str, Any]) -> dict[str, Any]:
  """A result with the fields earlier runs did not record, at their values."""
  return {'eval_split': 'test', 'learning_rate': 1.0, 'dense_knn_top1': None,
          'linear_protocol': 'fast', 'linear_epochs': 100,
          'linear_feature_norm': 'none',
          'dense_linear_top1': None, 'diverged_at_step': None,
          **ADDED_GATING_DEFAULTS, **result}


def trained(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The results that have accuracies (not diverged runs)."""
  return [r for r in results if r.get('diverged_at_step') is None]


TABLE_COLUMNS = ('name', 'framework', 'dataset', 'eval_split', 'method',
                 'knn_top1',
                 'linear_top1', 'flops_reduction', 'gate_density', 'seed',
                 'steps', 'train_wall_s', 'linear_eval_wall_s',
                 'train_command', 'linear_eval_command')


# What defines a run's setting, apart from its seed: runs equal on these are
# the same experiment at different seeds. Gating fields count only where the
# kind uses them (a dense run ignores them all, the predictors ignore the
# regulariser form and the saliency statistics; see layers.GatingSpec), so
# rows trained before a default changed still group with later ones.
SETTING_FIELDS = ('framework', 'dataset', 'eval_split', 'model', 'image_size',
                  'batch_size', 'steps', 'learning_rate', 'linear_protocol',
                  'linear_feature_norm', 'gating')
GATING_FIELDS = {
    'none': (),
    'cdg': ('block', 'regularizer', 'weight', 'density_target',
            'saliency_stats', 'branches',
            *(f for f in ADDED_GATING_DEFAULTS if f != 'predictor_saliency')),
    'channel_predictor': ('weight', 'density_target', 'branches',
                          'predictor_saliency'),
    'spatial_predictor': ('block', 'weight', 'density_target', 'branches'),
}
SEED_MEASURES = ('knn_top1', 'linear_top1', 'flops_reduction')


def seed_summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean, min and max over seeds of each setting run with several seeds.

  A rerun with a seed already counted (the `repro` row) is left out: it
  measures determinism, not the spread between seeds.

  Returns:
    One entry per setting with two or more seeds, in the order of the
    settings' first results: {'method', 'framework', 'dataset', 'steps',
    'seeds', 'runs', and for each of SEED_MEASURES '<m>_mean', '<m>_min',
    '<m>_max'}.
  """
  by_setting: dict[tuple, dict[int, dict[str, Any]]] = {}
  for r in map(with_defaults, trained(results)):
    fields = SETTING_FIELDS + GATING_FIELDS[r['gating']]
    key = tuple((f, json.dumps(r.get(f))) for f in fields)
    by_setting.setdefault(key, {}).setdefault(r['seed'], r)
  summary = []
  for runs in by_setting.values():
    if len(runs) < 2:
      continue
    seeds = sorted(runs)
    first = runs[seeds[0]]
    entry = {'method': first['method'], 'framework': first['framework'],
             'dataset': first['dataset'], 'eval_split': first['eval_split'],
             'steps': first['steps'],
             'seeds': seeds, 'runs': [runs[s]['name'] for s in seeds]}
    for measure in SEED_MEASURES:
      values = [runs[s][measure] for s in seeds]
      entry[f'{measure}_mean'] = sum(values) / len(values)
      entry[f'{measure}_min'] = min(values)
      entry[f'{measure}_max'] = max(values)
    summary.append(entry)
  return summary


def write_table(results: list[dict[str, Any]], results_dir: str) -> None:
  """Writes results.csv (every field) and results.md (the headline columns)."""
  results = [with_defaults(r) for r in results]
  os.makedirs(results_dir, exist_ok=True)
  fields = list(TABLE_COLUMNS) + sorted(
      {k for r in results for k in r} - set(TABLE_COLUMNS))
  with open(os.path.join(results_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in results:
      writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                       for k, v in r.items()})
  lines = ['Every accuracy and FLOPs figure is measured on the split named in '
           'the "split" column: `test` (the 10,000-image test set; training '
           'on all 25,000 training images) or `validation` (5,000 '
           'class-balanced images held out of the training set; training on '
           'the other 20,000). Choices are made on validation rows only.', '',
           'A dense-partner run trains two networks: the "dense path" column '
           'gives kNN / linear top-1 of its dense network (the same weights, '
           'every gate open; 1.00x). A run whose loss became non-finite shows '
           'the step it stopped at instead of accuracies.', '',
           '| run | framework | data | split | method | kNN top-1 | linear '
           'top-1 | FLOPs reduction | gate density | dense path | seed | '
           'steps | wall (train + linear eval) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
           '| --- | --- |']
  for r in results:
    if r['diverged_at_step'] is not None:
      measures = (f'diverged at step {r["diverged_at_step"]} | - | - | - '
                  f'| - ')
    else:
      dense = ('-' if r['dense_knn_top1'] is None else
               f'{100 * r["dense_knn_top1"]:.2f} / '
               f'{100 * r["dense_linear_top1"]:.2f}')
      measures = (f'{100 * r["knn_top1"]:.2f} | {100 * r["linear_top1"]:.2f} '
                  f'| {r["flops_reduction"]:.2f}x | {r["gate_density"]:.3f} '
                  f'| {dense} ')
    lines.append(
        f'| {r["name"]} | {r["framework"]} | {r["dataset"]} '
        f'| {r["eval_split"]} | {r["method"]} | {measures}'
        f'| {r["seed"]} | {r["steps"]} '
        f'| {r["train_wall_s"]:.0f} s + {r["linear_eval_wall_s"]:.0f} s |')
  summary = seed_summary(results)
  if summary:
    lines += ['', 'Across seeds (settings run with several seeds; mean, then '
              'min-max):', '',
              '| method | framework | data | split | steps | seeds | kNN top-1 '
              '| linear top-1 | FLOPs reduction |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for e in summary:
      def spread(measure, scale, unit):
        return (f'{scale * e[measure + "_mean"]:.2f}{unit} '
                f'({scale * e[measure + "_min"]:.2f}-'
                f'{scale * e[measure + "_max"]:.2f})')
      lines.append(
          f'| {e["method"]} | {e["framework"]} | {e["dataset"]} '
          f'| {e["eval_split"]} | {e["steps"]} | {", ".join(map(str, e["seeds"]))} '
          f'| {spread("knn_top1", 100, "")} '
          f'| {spread("linear_top1", 100, "")} '
          f'| {spread("flops_reduction", 1, "x")} |')
  lines += matched_lines(results)
  lines += gap_lines(results)
  lines += layer_lines(results)
  lines += ['', 'Commands (run from the repository root; each run\'s workdir '
            'under --workdir_root):', '']
  for r in results:
    then = (f' then `{r["linear_eval_command"]}`'
            if r['linear_eval_command'] else ' (diverged: no evaluation)')
    lines.append(f'- `{r["name"]}`: `{r["train_command"]}`{then}')
  with open(os.path.join(results_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def layer_lines(results: list[dict[str, Any]]) -> list[str]:
  """Per-layer gate densities of the runs that recorded them (issue 30 on).

  One table per network shape (the same gated layers with the same MAC
  shares): its first row is each layer's share of the backbone's dense MACs,
  then one row of densities per run, on the run's evaluation split.
  """
  tables: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for r in map(with_defaults, results):
    if r.get('layer_density') and r.get('layer_flops_share'):
      shape = tuple((name, round(r['layer_flops_share'][name], 4))
                    for name in r['layer_density'])
      tables.setdefault(shape, []).append(r)
  if not tables:
    return []
  lines = ['', 'Per-layer gate density (fraction of open gates on the run\'s '
           'split) and each gated layer\'s share of the backbone\'s dense '
           'MACs: where each run spent its FLOPs.']
  for shape, rows in tables.items():
    names = [name.replace('backbone/', '').replace('stage', 's')
             .replace('_block', 'b').replace('/conv', 'c')
             for name, _ in shape]
    lines += ['', '| run | split | ' + ' | '.join(names) + ' |',
              '| --- | --- |' + ' --- |' * len(names),
              '| MAC share | - | ' + ' | '.join(
                  f'{100 * share:.1f}%' for _, share in shape) + ' |']
    lines += [f'| {r["name"]} | {r["eval_split"]} | ' + ' | '.join(
        f'{r["layer_density"][name]:.3f}' for name, _ in shape) + ' |'
              for r in rows]
  return lines


def write_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """accuracy_vs_flops.png: kNN and linear top-1 against FLOPs reduction."""
  results = [with_defaults(r) for r in trained(results)]
  if not results:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  # One row of panels per framework, dataset, split, training length and
  # resolution: only runs trained the same way are compared against each
  # other's dense line.
  panel = lambda r: (r['framework'], r['dataset'], r['eval_split'],
                     r['steps'], r['image_size'])
  settings = sorted({panel(r) for r in results})
  fig, axes = plt.subplots(len(settings), 2, squeeze=False,
                           figsize=(11, 3.8 * max(1, len(settings))))
  methods = sorted({r['method'] for r in results})
  markers = dict(zip(methods, 'os^vDPX*<>phH8d'))
  # Up to 20 methods with distinct colours (the default cycle has 10): the
  # strong shades of tab20 first, then the light ones.
  colors = [plt.get_cmap('tab20')(i) for i in (*range(0, 20, 2),
                                               *range(1, 20, 2))]
  for row, setting in enumerate(settings):
    framework, dataset, split, steps, size = setting
    subset = [r for r in results if panel(r) == setting]
    dense = [r for r in subset if r['gating'] == 'none']
    for col, key in enumerate(('knn_top1', 'linear_top1')):
      ax = axes[row][col]
      for r in subset:
        color = colors[methods.index(r['method']) % len(colors)]
        # Main grid rows filled; ablations, reruns and other seeds hollow.
        hollow = r['group'] in ('ablations', 'repro', 'seeds')
        ax.scatter(r['flops_reduction'], 100 * r[key], s=90 if hollow else 55,
                   marker=markers.get(r['method'], 'o'), label=r['method'],
                   facecolors='none' if hollow else color, edgecolors=color,
                   linewidths=1.5)
      if dense:
        # The target region: >= 2x fewer FLOPs, within 2 points of
        # dense (its mean over seeds where there are several).
        dense_mean = sum(r[key] for r in dense) / len(dense)
        ax.axhline(100 * dense_mean - 2, color='gray', ls='--', lw=0.8)
        ax.axvline(2.0, color='gray', ls=':', lw=0.8)
      ax.set_xlabel(f'backbone FLOPs reduction (x, {split} split)')
      ax.set_ylabel(f'{"kNN" if key == "knn_top1" else "linear"} top-1 (%)')
      ax.set_title(f'{framework}, {dataset}, {split} split, {steps} steps, '
                   f'{size}x{size}\nhollow: other '
                   f'seeds, ablations, reruns; dashed: dense (mean) - 2 '
                   f'points; dotted: 2x', fontsize=8)
      ax.grid(alpha=0.3)
      handles, labels = ax.get_legend_handles_labels()
      unique = {}
      for label, handle in zip(labels, handles):
        unique.setdefault(label, handle)  # the first: the filled main row
      ax.legend(unique.values(), unique.keys(), fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, 'accuracy_vs_flops.png'), dpi=110)
  plt.close(fig)


# Matched-FLOPs comparison (issue 12): each method's accuracy-vs-FLOPs curve
# from its seed-0 test rows of the CPU protocol (SimCLR, CIFAR-10, 4 epochs)
# at several density targets, read off at these reductions by linear
# interpolation between the two nearest measured points.
MATCHED_REDUCTIONS = (2.0, 2.5)
MATCHED_SETTING = {'framework': 'simclr', 'dataset': 'cifar10',
                   'eval_split': 'test', 'steps': 388, 'seed': 0,
                   'image_size': 16, 'model': 'resnet18 width 16',
                   'linear_protocol': 'fast'}
FIRST_READING = {'grouping': 'first', 'saliency_norm': 'batch',
                 'saliency_grad': False, 'surrogate': 'sigmoid',
                 'target_anneal_fraction': 0.0, 'block': [1, 1, 1],
                 'regularizer': 'density', 'weight': 1.0,
                 'saliency_stats': 'per_branch', 'branches': 'both',
                 'partner_norm': 'shared'}
# The variant of issue 20 (ours, after Krishna et al.): CDG's first reading
# with a dense partner branch that has its own BatchNorm.
DENSE_PARTNER = {**FIRST_READING, 'branches': 'dense_partner',
                 'partner_norm': 'separate'}


def _cdg_default() -> dict[str, Any]:
  """The library's CDG defaults, in the fields a result records."""
  sys.path.insert(0, REPO_ROOT)
  from cdg_jax import config_lib  # pylint: disable=g-import-not-at-top
  defaults = config_lib.gating_config().to_dict()
  return {k: (list(defaults[k]) if k == 'block' else defaults[k])
          for k in FIRST_READING}


def curves(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Accuracy-vs-FLOPs curves: {label: rows sorted by FLOPs reduction}."""
  results = [with_defaults(r) for r in trained(results)]
  # The rerun of a row (group 'repro') is not another point of the curve.
  base = [r for r in results if r['group'] != 'repro' and
          all(r.get(k) == v for k, v in MATCHED_SETTING.items())]
  default = _cdg_default()
  families = {'CDG (default)': lambda r: r['gating'] == 'cdg' and all(
      r[k] == v for k, v in default.items())}
  if default != FIRST_READING:
    families['CDG (first reading)'] = lambda r: r['gating'] == 'cdg' and all(
        r[k] == v for k, v in FIRST_READING.items())
  families['CDG dense partner'] = lambda r: r['gating'] == 'cdg' and all(
      r[k] == v for k, v in DENSE_PARTNER.items())
  families['channel predictor'] = lambda r: (
      r['gating'] == 'channel_predictor' and
      r['predictor_saliency'] == 'bounded')
  families['spatial predictor'] = lambda r: r['gating'] == 'spatial_predictor'
  return {label: sorted([r for r in base if keep(r)],
                        key=lambda r: r['flops_reduction'])
          for label, keep in families.items()}


def interpolate(rows: list[dict[str, Any]], reduction: float,
                measure: str) -> float | None:
  """`measure` at `reduction` on the piecewise-linear curve; None outside."""
  points = [(r['flops_reduction'], r[measure]) for r in rows]
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= reduction <= x1 and x1 > x0:
      return y0 + (reduction - x0) / (x1 - x0) * (y1 - y0)
  exact = [y for x, y in points if abs(x - reduction) < 1e-9]
  return exact[0] if exact else None


def matched_lines(results: list[dict[str, Any]]) -> list[str]:
  """The matched-FLOPs section of results.md."""
  curve = curves(results)
  dense = [r for r in map(with_defaults, trained(results))
           if r['gating'] == 'none'
           and all(r.get(k) == v for k, v in MATCHED_SETTING.items()
                   if k != 'seed')]
  if not any(len(rows) >= 2 for rows in curve.values()):
    return []
  lines = ['', 'Matched FLOPs (test split; SimCLR, CIFAR-10, 388 steps, seed '
           '0): each method\'s kNN / linear top-1 read off its curve at the '
           'given backbone FLOPs reduction, **interpolated** linearly between '
           'the two nearest measured density targets ("n/a": outside the '
           'measured range). Points: ' + '; '.join(
               f'{label}: ' + ', '.join(
                   f'{r["flops_reduction"]:.2f}x {100 * r["knn_top1"]:.2f}'
                   for r in rows) for label, rows in curve.items()) + '.', '']
  if dense:
    lines += [f'Dense (mean of seeds {sorted(r["seed"] for r in dense)}): kNN '
              f'{100 * sum(r["knn_top1"] for r in dense) / len(dense):.2f}, '
              f'linear {100 * sum(r["linear_top1"] for r in dense) / len(dense):.2f}.',
              '']
  header = ' | '.join(f'kNN at {x}x | linear at {x}x'
                      for x in MATCHED_REDUCTIONS)
  lines += [f'| method | {header} |',
            '| --- |' + ' --- | --- |' * len(MATCHED_REDUCTIONS)]
  for label, rows in curve.items():
    cells = []
    for x in MATCHED_REDUCTIONS:
      for measure in ('knn_top1', 'linear_top1'):
        value = interpolate(rows, x, measure)
        cells.append('n/a' if value is None else f'{100 * value:.2f}')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return lines


def write_matched_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """matched_flops.png: the methods' kNN curves against FLOPs, dense line."""
  curve = curves(results)
  if not any(len(rows) >= 2 for rows in curve.values()):
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  dense = [r for r in map(with_defaults, trained(results))
           if r['gating'] == 'none'
           and all(r.get(k) == v for k, v in MATCHED_SETTING.items()
                   if k != 'seed')]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, measure in zip(axes, ('knn_top1', 'linear_top1')):
    for label, rows in curve.items():
      if rows:
        ax.plot([r['flops_reduction'] for r in rows],
                [100 * r[measure] for r in rows], 'o-', label=label)
    if dense:
      mean = 100 * sum(r[measure] for r in dense) / len(dense)
      ax.axhline(mean, color='black', lw=1, label='dense (mean of seeds)')
      ax.axhline(mean - 2, color='gray', ls='--', lw=0.8,
                 label='dense - 2 points')
    for x in MATCHED_REDUCTIONS:
      ax.axvline(x, color='gray', ls=':', lw=0.8)
    ax.set_xlabel('backbone FLOPs reduction (x, test split)')
    ax.set_ylabel(f'{"kNN" if measure == "knn_top1" else "linear"} top-1 (%)')
    ax.set_title('SimCLR, CIFAR-10, CPU protocol (388 steps), seed 0; '
                 'dotted: 2.0x and 2.5x', fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, 'matched_flops.png'), dpi=110)
  plt.close(fig)


# The gap to dense along scale (issue 20 item 6): SimCLR, CIFAR-10, test
# split, seed 0; each column trained as the CPU protocol except the named
# axis. Rows: the runs of each method at each point (None: not run).
SCALE_POINTS = ('4 epochs', '12 epochs', '36 epochs', '32x32')
SCALE_RUNS = {
    'dense': ('simclr_c10_dense', 'simclr_c10_dense_12ep',
              'simclr_c10_dense_36ep', 'simclr_c10_dense_32px'),
    'CDG': ('simclr_c10_cdg', 'simclr_c10_cdg_12ep', 'simclr_c10_cdg_36ep',
            'simclr_c10_cdg_32px'),
    'CDG dense partner': ('simclr_c10_cdg_partner', 'simclr_c10_cdg_partner_12ep',
                          'simclr_c10_cdg_partner_36ep',
                          'simclr_c10_cdg_partner_32px'),
    'channel predictor (density 0.4)': (
        'simclr_c10_channel_predictor_d0.4', None, None,
        'simclr_c10_channel_predictor_d0.4_32px'),
}
_PARTNER_DENSE_PATH = 'CDG dense partner: its dense network'


def scale_gaps(results: list[dict[str, Any]]
               ) -> dict[str, list[dict[str, float] | None]]:
  """{method: per SCALE_POINTS, None or {'knn', 'linear' (gaps to dense in
  points, negative = below dense), 'flops'}}; the dense partner's dense
  network as a method of its own."""
  by_name = {r['name']: r for r in map(with_defaults, trained(results))}
  dense = [by_name.get(name) for name in SCALE_RUNS['dense']]
  gaps: dict[str, list[dict[str, float] | None]] = {}
  for method, names in SCALE_RUNS.items():
    if method == 'dense':
      continue
    rows = [by_name.get(name) if name else None for name in names]
    gaps[method] = [
        None if r is None or d is None else
        {'knn': 100 * (r['knn_top1'] - d['knn_top1']),
         'linear': 100 * (r['linear_top1'] - d['linear_top1']),
         'flops': r['flops_reduction']}
        for r, d in zip(rows, dense)]
    if method == 'CDG dense partner':
      gaps[_PARTNER_DENSE_PATH] = [
          None if r is None or d is None or r['dense_knn_top1'] is None else
          {'knn': 100 * (r['dense_knn_top1'] - d['knn_top1']),
           'linear': 100 * (r['dense_linear_top1'] - d['linear_top1']),
           'flops': 1.0}
          for r, d in zip(rows, dense)]
  return gaps


def gap_lines(results: list[dict[str, Any]]) -> list[str]:
  """The gap-to-dense section of results.md (empty before any scale run)."""
  gaps = scale_gaps(results)
  by_name = {r['name']: r for r in trained(results)}
  if not any(name in by_name for name in SCALE_RUNS['dense'][2:]):
    return []
  dense = ['-' if by_name.get(n) is None else
           f'{100 * by_name[n]["knn_top1"]:.2f} / '
           f'{100 * by_name[n]["linear_top1"]:.2f}'
           for n in SCALE_RUNS['dense']]
  lines = ['', 'Gap to dense along scale (test split; SimCLR, CIFAR-10, seed '
           '0; each column trained as the CPU protocol except the named axis: '
           '4 epochs at 16x16 is the protocol itself). Each cell: kNN gap / '
           'linear gap in points (negative: below dense), and the backbone '
           'FLOPs reduction; "-": not run.', '',
           '| method | ' + ' | '.join(SCALE_POINTS) + ' |',
           '| --- |' + ' --- |' * len(SCALE_POINTS),
           '| dense (kNN / linear top-1) | ' + ' | '.join(dense) + ' |']
  for method, cells in gaps.items():
    text = ['-' if c is None else
            f'{c["knn"]:+.2f} / {c["linear"]:+.2f} ({c["flops"]:.2f}x)'
            for c in cells]
    lines.append(f'| {method} | ' + ' | '.join(text) + ' |')
  return lines


def write_gap_plot(results: list[dict[str, Any]], results_dir: str) -> None:
  """gap_to_dense.png: each method's gap to dense at each scale point."""
  if not gap_lines(results):
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  gaps = scale_gaps(results)
  # The epoch points are one axis (length at 16x16) and are joined by a line
  # only between neighbours that were both run; 32x32 is another axis (4
  # epochs), drawn as a marker of the method's colour beyond a separator.
  resolution = SCALE_POINTS.index('32x32')
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, measure in zip(axes, ('knn', 'linear')):
    for i, (method, cells) in enumerate(gaps.items()):
      color = f'C{i}'
      style = '--' if method == _PARTNER_DENSE_PATH else '-'
      # NaN for a point not run: matplotlib breaks the line there.
      length = [float('nan') if c is None else c[measure]
                for c in cells[:resolution]]
      ax.plot(range(resolution), length, marker='o', ls=style, color=color,
              label=method)
      if cells[resolution] is not None:
        ax.plot([resolution], [cells[resolution][measure]], marker='s',
                color=color, ls='none')
    ax.axvline(resolution - 0.5, color='gray', lw=0.8)
    ax.axhline(0, color='black', lw=1)
    ax.axhline(-1, color='gray', ls=':', lw=0.8)
    ax.set_xticks(range(len(SCALE_POINTS)), SCALE_POINTS)
    ax.set_ylabel(f'{"kNN" if measure == "knn" else "linear"} top-1 minus '
                  f'dense (points)')
    ax.set_title('SimCLR, CIFAR-10, test split, seed 0; dotted: 1 point '
                 'below dense\nleft of the separator: length at 16x16; '
                 'right: 32x32 at 4 epochs', fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, 'gap_to_dense.png'), dpi=110)
  plt.close(fig)


def write_report(results_dir: str) -> list[dict[str, Any]]:
  results = load_results(results_dir)
  if results:
    write_table(results, results_dir)
    write_plot(results, results_dir)
    write_matched_plot(results, results_dir)
    write_gap_plot(results, results_dir)
  return results


def select_runs(grids: list[str], only: list[str]) -> list[Run]:
  unknown = [g for g in grids if g not in GRIDS]
  if unknown:
    raise ValueError(f'Unknown --grid {unknown}; expected any of '
                     f'{sorted(GRIDS)}.')
  runs = [run for grid in grids for run in GRIDS[grid]]
  missing = [name for name in only if name not in {r.name for r in runs}]
  if missing:
    raise ValueError(f'--only names {missing} are not runs of --grid={grids}; '
                     f'those are {[r.name for r in runs]}.')
  return [r for r in runs if not only or r.name in only]


def run_grid(grids: list[str], results_dir: str, workdir_root: str,
             only: list[str] = (), rerun: bool = False) -> list[dict]:
  """Runs the selected grids, skipping finished runs; returns all results."""
  runs = select_runs(list(grids), list(only))
  for index, run in enumerate(runs):
    path = result_path(results_dir, run.name)
    if os.path.exists(path) and not rerun:
      print(f'[{index + 1}/{len(runs)}] {run.name}: result exists, skipped.',
            flush=True)
      continue
    if rerun:
      shutil.rmtree(os.path.join(workdir_root, run.name), ignore_errors=True)
    print(f'[{index + 1}/{len(runs)}] {run.name}: '
          f'{_shell(run.train_command(os.path.join(workdir_root, run.name)))}',
          flush=True)
    result = run_one(run, results_dir, workdir_root)
    if result.get('diverged_at_step') is not None:
      print(f'    diverged at step {result["diverged_at_step"]} (last losses '
            f'{result["losses_before_divergence"]}), '
            f'{result["train_wall_s"]:.0f} s', flush=True)
    else:
      print(f'    kNN {100 * result["knn_top1"]:.2f}%, linear '
            f'{100 * result["linear_top1"]:.2f}%, FLOPs reduction '
            f'{result["flops_reduction"]:.2f}x, '
            f'{result["train_wall_s"] + result["linear_eval_wall_s"]:.0f} s',
            flush=True)
    write_report(results_dir)
  return write_report(results_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.table_only:
    results = write_report(FLAGS.results_dir)
  else:
    results = run_grid(FLAGS.grid, FLAGS.results_dir, FLAGS.workdir_root,
                       FLAGS.only, FLAGS.rerun)
  print(f'{len(results)} results; table and plot in {FLAGS.results_dir}')


if __name__ == '__main__':
  app.run(main)
