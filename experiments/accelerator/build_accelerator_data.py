r"""Builds the accelerator protocol's data: a class-balanced CIFAR-10 subset.

  python -m experiments.accelerator.build_accelerator_data  # -> data/cifar10_accelerator.npz

A lent accelerator machine receives only the repository's working tree (at
most 64 MiB) and cannot download anything, so the protocol
(`experiments/accelerator/accelerator_protocol.py`) reads its images from a
file inside the repository. This script writes it into the git-ignored `data/` folder:
the first `--train_per_class` training and `--test_per_class` test images of
each class of `--source` (default `../shared/data/cifar10.npz`, whose rows are
in random order), uint8 HWC, compressed; at most 50 MB (checked).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from experiments.common.repo import REPO_ROOT

DEFAULT_OUTPUT = os.path.join(REPO_ROOT, 'data', 'cifar10_accelerator.npz')
MAX_BYTES = 50_000_000

flags.DEFINE_string('source', os.path.join(REPO_ROOT, '..', 'shared', 'data',
                                           'cifar10.npz'),
                    'npz with x_train, y_train, x_test, y_test.')
flags.DEFINE_string('output', DEFAULT_OUTPUT, 'Where the subset is written.')
flags.DEFINE_integer('train_per_class', 1250, 'Training images per class.')
flags.DEFINE_integer('test_per_class', 500, 'Test images per class.')
FLAGS = flags.FLAGS


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Sorted rows of the first `per_class` examples of every class.

  Raises:
    ValueError: if a class has fewer than `per_class` examples.
  """
  rows = []
  for c in np.unique(labels):
    of_class = np.flatnonzero(labels == c)
    if len(of_class) < per_class:
      raise ValueError(f'Class {c} has {len(of_class)} examples, fewer than '
                       f'the {per_class} asked for.')
    rows.append(of_class[:per_class])
  return np.sort(np.concatenate(rows))


def build(source: str, output: str, train_per_class: int,
          test_per_class: int) -> dict[str, int]:
  """Writes the subset; returns its sizes (images and bytes on disk)."""
  if not os.path.isfile(source):
    raise FileNotFoundError(
        f'--source={source!r} does not exist: pass the path of a CIFAR-10 '
        f'npz (x_train, y_train, x_test, y_test; the project machines have '
        f'it at ../shared/data/cifar10.npz).')
  with np.load(source, allow_pickle=False) as data:
    arrays = {}
    for split, per_class in (('train', train_per_class),
                             ('test', test_per_class)):
      labels = data[f'y_{split}']
      rows = first_per_class(labels, per_class)
      arrays[f'x_{split}'] = np.ascontiguousarray(
          data[f'x_{split}'][rows], np.uint8)
      arrays[f'y_{split}'] = labels[rows].astype(np.int64)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.savez_compressed(output, **arrays)
  size = os.path.getsize(output)
  if size > MAX_BYTES:
    os.remove(output)
    raise ValueError(
        f'The subset would take {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} '
        f'MB that leave room in the 64 MiB an accelerator machine receives; '
        f'lower --train_per_class or --test_per_class.')
  return {'num_train': len(arrays['y_train']),
          'num_test': len(arrays['y_test']), 'bytes': size}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes = build(FLAGS.source, FLAGS.output, FLAGS.train_per_class,
                FLAGS.test_per_class)
  print(f'Wrote {FLAGS.output}: {sizes["num_train"]} train and '
        f'{sizes["num_test"]} test images, {sizes["bytes"] / 1e6:.1f} MB.')


if __name__ == '__main__':
  app.run(main)
