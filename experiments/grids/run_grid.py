r"""Trains and evaluates a grid of runs; writes a results table and plot.

  python -m experiments.grids.run_grid --grid=core            # the CPU protocol
  python -m experiments.grids.run_grid --grid=core,ablations,byol,cifar100,repro
  python -m experiments.grids.run_grid --grid=core --only=simclr_c10_cdg --rerun

Each run is two real command lines, recorded in its result: pretraining
(`python -m cdg_jax.main`) and linear evaluation (`python -m
cdg_jax.linear_eval`), run as subprocesses from the repository root. A run's
result is written to `<results_dir>/runs/<name>.json` as soon as it finishes,
a record (`records.py`) whose 'record' header holds this command, the date,
the git commit, the machine, devices, XLA flags and package versions;
started again, the runner skips runs that have a result, and a run interrupted
half-way resumes from its last checkpoint in `<workdir_root>/<name>`. A result
is never overwritten: `--rerun` moves the earlier one to
`<results_dir>/runs/earlier/<name>.<date>.json` (the report reads only
`runs/*.json`). After
every run the table (`results.md`, `results.csv`) and the plot of accuracy
against FLOPs reduction (`accuracy_vs_flops.png`) are rebuilt from all results
in the directory.

Accuracy is kNN top-1 (k=200, T=0.1, bank = train split) and linear top-1, both
on the whole test set; the FLOPs reduction is the backbone's, measured on the
test set from the traced masks (summary.json of the run). The grids
(`experiments/grids/grids.py`, GRIDS) are run by `experiments/grids/runner.py`
and reported by `experiments/grids/report.py`:

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
  tiles32_sparse  the same trained with the sparse train step
             (gating.sparse_training), closed-tile gradient 'none' and
             'sampled'.
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
             linear protocol (30 epochs, raw features).
  linear_protocols_bn  the same, the features through a non-affine
             BatchNorm before the classifier (the protocol's default now).
  budget_selection  one FLOPs budget for the network (gating.regularizer=
             'flops': with relaxing per-layer bounds, without, started
             late; lambda 10 and 30) on the validation split.
  width32    dense and CDG at width 32 (the gap to dense along width).
  width64    dense and CDG at width 64 (the paper's), 16x16, seeds 0-2.
  width64_channel_predictor  the channel predictor (density 0.4) at width
             64, seeds 0-2.
  width64_32px  dense and CDG at width 64 and 32x32 (the paper's network
             and input), seed 0.
  smoke      two tiny runs on synthetic data (tests use it).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments.common.repo import REPO_ROOT
from experiments.grids.report import load_results
from experiments.grids.report import ResultFileError
from experiments.grids.report import write_report
from experiments.grids.runner import run_grid

flags.DEFINE_list('grid', ['core'], 'Grids to run, in order (grids.GRIDS).')
flags.DEFINE_list('only', [], 'Run only these run names (within --grid).')
flags.DEFINE_string('results_dir', os.path.join(REPO_ROOT, 'experiments',
                                                'results'),
                    'Where per-run results, the table and the plot go.')
flags.DEFINE_string('workdir_root', '/tmp/cdg_grid',
                    'Parent of the runs\' training workdirs (checkpoints).')
flags.DEFINE_bool('rerun', False, 'Run again even if a result exists (the '
                  'workdir is cleared first; the earlier result moves to '
                  'runs/earlier/<name>.<date>.json).')
flags.DEFINE_bool('table_only', False, 'Only rebuild the table and plot.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    # Every saved result is read before any run: a bad file stops the grid
    # now, not after hours of training when the table is rebuilt.
    load_results(FLAGS.results_dir)
    if FLAGS.table_only:
      results = write_report(FLAGS.results_dir)
    else:
      results = run_grid(FLAGS.grid, FLAGS.results_dir, FLAGS.workdir_root,
                         FLAGS.only, FLAGS.rerun)
  except ResultFileError as e:
    print(f'FATAL: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(f'{len(results)} results; table and plot in {FLAGS.results_dir}')


if __name__ == '__main__':
  app.run(main)
