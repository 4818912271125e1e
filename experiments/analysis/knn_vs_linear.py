r"""Why kNN and linear evaluation disagree: feature statistics and kNN variants.

  python -m experiments.analysis.knn_vs_linear \
      --workdirs=/work/cdg_grid64/simclr_c10_dense_w64_seed2,/work/cdg_grid64/simclr_c10_cdg_w64_seed2 \
      --validation_size=5000 --out=experiments/results/knn_vs_linear

For each trained run (a workdir with an exported backbone), extracts the
eval-mode pooled features that both protocols read (the kNN memory bank and
the fast linear protocol's inputs) and reports:

- their statistics: mean L2 norm; mean per-dimension std and how unequal the
  dimensions' variances are (the largest over the median, and the share of the
  total variance held by the top 1% of dimensions); the participation ratio
  (sum of covariance eigenvalues squared over the sum of their squares: the
  number of directions the variance really spreads over); dead dimensions
  (std < 1e-6); the mean cosine similarity of random pairs (how much every
  feature points the same way, which compresses cosine kNN's similarities);
- kNN top-1 in variants: the protocol (raw features, cosine, k=200, T=0.1),
  other k and T, on centred features (the training set's mean removed), on
  standardised features (per-dimension mean and std of the training set,
  exactly the fast linear protocol's input, `evaluators.linear.standardize`),
  and on PCA-whitened features (every direction of the training set's
  variance at unit variance: the weighting a linear classifier can learn).

`--validation_size=N` holds out N class-balanced training images as the
queries (the bank is the rest of the training set), as every choice in this
project is made; 0 evaluates on the test split, where the reported gaps come
from. The run's own linear result (`linear_eval.json`) is quoted beside it,
with its split. Writes one dated record (`experiments/common/records.py`) with a
Markdown table beside it.
"""

import json
import os
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags

from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.evaluators import knn
from cdg_jax.evaluators import linear
from cdg_jax.run import checkpoints
from cdg_jax.run import parallel

from experiments.common import records

FLAGS = flags.FLAGS

# (name, k, temperature, feature transform): the protocol first.
KNN_VARIANTS = (
    ('protocol (raw, k=200, T=0.1)', 200, 0.1, 'raw'),
    ('raw, k=20', 20, 0.1, 'raw'),
    ('raw, T=0.05', 200, 0.05, 'raw'),
    ('raw, T=0.2', 200, 0.2, 'raw'),
    ('centred', 200, 0.1, 'centred'),
    ('standardised (the linear input)', 200, 0.1, 'standardised'),
    ('whitened (PCA)', 200, 0.1, 'whitened'),
)

# Directions whose variance is below this fraction of the largest are left
# out of the whitening (noise, amplified to unit variance, would swamp the
# cosine).
WHITENING_FLOOR = 1e-4


def feature_statistics(features: np.ndarray, pairs: int = 4000,
                       seed: int = 0) -> dict[str, float]:
  """Scale, spread and direction statistics of (N, D) features."""
  features = np.asarray(features, np.float64)
  variances = features.var(axis=0)
  top = max(1, int(round(0.01 * variances.size)))
  eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(features, rowvar=False)),
                        0.0, None)
  rng = np.random.default_rng(seed)
  first = rng.integers(0, len(features), pairs)
  second = rng.integers(0, len(features), pairs)
  keep = first != second
  unit = features / np.maximum(np.linalg.norm(features, axis=1,
                                              keepdims=True), 1e-12)
  cosines = np.sum(unit[first[keep]] * unit[second[keep]], axis=1)
  median_variance = np.median(variances)
  return {
      'mean_l2_norm': float(np.linalg.norm(features, axis=1).mean()),
      'mean_dimension_std': float(np.sqrt(variances).mean()),
      'largest_over_median_variance': (
          float(variances.max() / median_variance) if median_variance > 0
          else float('inf')),
      'top1pct_variance_share': float(np.sort(variances)[-top:].sum()
                                      / max(variances.sum(), 1e-30)),
      'participation_ratio': float(eigenvalues.sum() ** 2
                                   / max(np.sum(eigenvalues ** 2), 1e-30)),
      'dead_dimensions': int(np.sum(np.sqrt(variances) < 1e-6)),
      'zero_fraction': float(np.mean(features == 0.0)),
      'mean_pair_cosine': float(cosines.mean()),
  }


def transformed(kind: str, bank: np.ndarray, queries: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """The bank and the queries under a kNN variant's feature transform."""
  if kind == 'raw':
    return bank, queries
  if kind == 'centred':
    mean = bank.mean(axis=0)
    return bank - mean, queries - mean
  if kind == 'standardised':
    return linear.standardize(bank, queries)
  if kind == 'whitened':
    return whiten(bank, queries)
  raise ValueError(f'Unknown feature transform {kind!r}; one of raw, '
                   f'centred, standardised, whitened.')


def whiten(bank: np.ndarray, queries: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
  """PCA whitening with the bank's mean and covariance: every direction of
  the bank's variance (above `WHITENING_FLOOR` of the largest) at unit
  variance, so that cosine kNN weighs directions as a linear classifier is
  free to. If kNN on whitened features closes a gap, the gap is in how the
  variance is spread, not in what the features separate."""
  bank64 = np.asarray(bank, np.float64)
  mean = bank64.mean(axis=0)
  eigenvalues, eigenvectors = np.linalg.eigh(
      np.cov(bank64 - mean, rowvar=False))
  kept = eigenvalues > WHITENING_FLOOR * eigenvalues.max()
  projection = eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])
  return (((bank64 - mean) @ projection).astype(np.float32),
          ((np.asarray(queries, np.float64) - mean) @ projection
           ).astype(np.float32))


def knn_variants(bank: dict[str, np.ndarray], queries: dict[str, np.ndarray],
                 num_classes: int) -> dict[str, float]:
  """kNN top-1 of every `KNN_VARIANTS` entry."""
  accuracy = {}
  for name, k, temperature, kind in KNN_VARIANTS:
    bank_x, query_x = transformed(kind, bank['features'], queries['features'])
    accuracy[name] = knn.knn_classify(
        bank_x, bank['labels'], query_x, queries['labels'], num_classes,
        k=k, temperature=temperature)['top1']
  return accuracy


def _linear_record(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'linear_eval.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  return {'top1': result['top1'], 'split': result.get('eval_split', 'test')}


def analyse(workdir: str, validation_size: int, batch_size: int,
            mesh: jax.sharding.Mesh, pairs: int) -> dict[str, Any]:
  """Statistics and kNN variants of one run's features."""
  config, backbone, variables = checkpoints.load_backbone(workdir)
  data_config = config.data.copy_and_resolve_references()
  data_config.validation_size = validation_size
  source = input_pipeline.create_source(data_config)
  batch = extraction.eval_batch_size(batch_size, mesh)
  split = {name: extraction.extract_features(backbone, variables, source,
                                             name, batch, config.augment,
                                             mesh)
           for name in ('train', 'test')}
  standardised_bank, _ = linear.standardize(split['train']['features'],
                                            split['test']['features'][:1])
  return {
      'workdir': os.path.abspath(workdir),
      'gating': config.gating.kind, 'width': config.model.width,
      'seed': config.seed,
      'query_split': 'validation' if validation_size else 'test',
      'num_bank': int(len(split['train']['labels'])),
      'num_queries': int(len(split['test']['labels'])),
      'statistics': feature_statistics(split['train']['features'], pairs),
      'standardised_statistics': feature_statistics(standardised_bank, pairs),
      'knn_top1': knn_variants(split['train'], split['test'],
                               config.data.num_classes),
      'linear': _linear_record(workdir),
  }


def render(record: dict[str, Any]) -> str:
  """The record as Markdown: a kNN table and a statistics table."""
  runs = record['runs']
  names = [f"{r['gating']} w{r['width']} s{r['seed']}" for r in runs]
  lines = [f"# kNN and linear evaluation of the same features "
           f"(queries: {runs[0]['query_split']} split)", '',
           '| kNN top-1 (%) | ' + ' | '.join(names) + ' |',
           '| --- |' + ' --- |' * len(runs)]
  for name, *_ in KNN_VARIANTS:
    lines.append(f'| {name} | ' + ' | '.join(
        f"{100 * r['knn_top1'][name]:.2f}" for r in runs) + ' |')
  lines.append('| linear (fast protocol, linear_eval.json) | ' + ' | '.join(
      (f"{100 * r['linear']['top1']:.2f} ({r['linear']['split']})"
       if r['linear'] else '-') for r in runs) + ' |')
  lines += ['', '| feature statistic (training set) | ' + ' | '.join(names)
            + ' |', '| --- |' + ' --- |' * len(runs)]
  for key in runs[0]['statistics']:
    lines.append(f'| {key} | ' + ' | '.join(
        f"{r['statistics'][key]:.4g}" for r in runs) + ' |')
  lines.append('| mean_pair_cosine after standardising | ' + ' | '.join(
      f"{r['standardised_statistics']['mean_pair_cosine']:.4g}"
      for r in runs) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  parallel.configure_cpu(0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  runs = []
  for workdir in FLAGS.workdirs:
    runs.append(analyse(workdir, FLAGS.validation_size, FLAGS.batch_size,
                        mesh, FLAGS.pairs))
    print(f"{workdir}: kNN {runs[-1]['knn_top1']}", flush=True)
  path = records.write_record(FLAGS.out, 'knn_vs_linear', {'runs': runs},
                              render=render)
  records.print_record(path)


def define_flags() -> None:
  """The command's flags (defined when it runs, not on import, so that
  tests can import this module beside other scripts' flags)."""
  flags.DEFINE_list('workdirs', None,
                    'Run directories with an exported backbone (dense and CDG '
                    'of one seed side by side reads best).')
  flags.DEFINE_integer('validation_size', 0,
                       'Hold out this many training images as queries (0: the '
                       'test split).')
  flags.DEFINE_integer('batch_size', 500, 'Evaluation batch size.')
  flags.DEFINE_integer('pairs', 4000,
                       'Random feature pairs for the mean cosine similarity.')
  flags.DEFINE_string('out', 'experiments/results/knn_vs_linear',
                      'Folder of the dated record.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdirs')
  app.run(main)
