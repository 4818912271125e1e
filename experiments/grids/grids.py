"""The grids of runs of `run_grid.py`: each run's config, overrides and label.

A run is a config (`file:variants`) plus command-line overrides; its name
is its result file's and its workdir's. What each grid is for: the docstring
of `run_grid.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any
PROTOCOL = 'configs/cpu_protocol.py'


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
    # Issue 31 item 5: the same tile run trained with the sparse step, each
    # closed-tile gradient form (test split, seed 0), against the masked
    # row above.
    'tiles32_sparse': [
        Run(f'simclr_c10_cdg_tiles8844_32px_sparse_{form}', 'tiles',
            f'CDG tiles 8-8-4-4, 32x32, sparse train step ({form})', _SIMCLR,
            (('gating.stage_blocks', '((8,8,0),(8,8,0),(4,4,0),(4,4,0))'),
             ('data.image_size', 32), ('gating.sparse_training', True),
             ('gating.closed_tile_gradient', form)))
        for form in ('none', 'sampled')
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
    ] + [
        # sel_cdg ran on an AMD EPYC (2026-11-28), the budget rows on an
        # Intel Xeon: XLA's CPU code differs between the two (the same dense
        # command gave 41.91 and 41.97 kNN), so the uniform row again here,
        # on the machine of the budget rows.
        Run('sel_cdg_repro', 'repro', 'CDG (first reading), rerun on the '
            'Intel Xeon', _SIMCLR, VALIDATION),
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
    # Issue 39: the gap along width settled. Width 32 at seeds 1 and 2
    # (seed 0 is `width32`), the channel predictor at width 32 at its
    # operating point nearest CDG's 2.2x (density 0.4, as in
    # `matched_seeds`), seeds 0-2; width 64 (the paper's) at 16x16, seeds
    # 0-2; and width 64 at 32x32, dense against tile CDG (8-8-4-4) trained
    # with the sparse step. All on the test split; nothing is selected here.
    'width32_seeds': [
        Run(f'simclr_c10_{name}_w32_seed{seed}', 'seeds', f'{label}, width 32',
            config, overrides + (('model.width', 32), ('seed', seed)))
        for seed in (1, 2)
        for name, label, config, overrides in (
            ('dense', 'dense', f'{_SIMCLR},dense', ()),
            ('cdg', 'CDG', _SIMCLR, ()))
    ],
    'width32_channel_predictor': [
        Run(f'simclr_c10_channel_predictor_d0.4_w32'
            + (f'_seed{seed}' if seed else ''), 'seeds' if seed else 'scale',
            'channel predictor density 0.4, width 32',
            f'{_SIMCLR},channel_predictor',
            (('gating.density_target', 0.4), ('model.width', 32))
            + ((('seed', seed),) if seed else ()))
        for seed in (0, 1, 2)
    ],
    'width64': [
        Run(f'simclr_c10_{name}_w64' + (f'_seed{seed}' if seed else ''),
            'seeds' if seed else 'scale', f'{label}, width 64', config,
            overrides + (('model.width', 64),)
            + ((('seed', seed),) if seed else ()))
        for seed in (0, 1, 2)
        for name, label, config, overrides in (
            ('dense', 'dense', f'{_SIMCLR},dense', ()),
            ('cdg', 'CDG', _SIMCLR, ()))
    ],
    # Issue 50: the channel predictor at width 64 (density 0.4, as at width
    # 32), seeds 0-2, beside the width-64 dense and CDG rows; and the paper's
    # input, width 64 at 32x32, seed 0, dense and CDG (the masked step: the
    # sparse step has not been compared with it at this width). Test split.
    'width64_channel_predictor': [
        Run(f'simclr_c10_channel_predictor_d0.4_w64'
            + (f'_seed{seed}' if seed else ''), 'seeds' if seed else 'scale',
            'channel predictor density 0.4, width 64',
            f'{_SIMCLR},channel_predictor',
            (('gating.density_target', 0.4), ('model.width', 64))
            + ((('seed', seed),) if seed else ()))
        for seed in (0, 1, 2)
    ],
    'width64_32px': [
        Run(f'simclr_c10_{name}_w64_32px', 'scale', f'{label}, width 64, 32x32',
            config, overrides + (('model.width', 64), ('data.image_size', 32)))
        for name, label, config, overrides in (
            ('dense', 'dense', f'{_SIMCLR},dense', ()),
            ('cdg', 'CDG', _SIMCLR, ()))
    ],
    'smoke': [
        Run('smoke_dense', 'smoke', 'dense', 'configs/simclr_cifar10.py:'
            'smoke,dense', (('num_steps', 4), ('linear_eval.epochs', 2))),
        Run('smoke_cdg', 'smoke', 'CDG', 'configs/simclr_cifar10.py:smoke',
            (('num_steps', 4), ('linear_eval.epochs', 2))),
    ],
}
