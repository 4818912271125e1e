"""End-of-run pictures: per-layer gate density, and gate masks on test images."""

from __future__ import annotations

import io
import os
from typing import Any

import flax
import jax.numpy as jnp
import matplotlib
matplotlib.use('Agg')  # headless: files only
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from cdg_jax.data import augment
from cdg_jax.gating.layers import MASK_COLLECTION
from cdg_jax.run import storage

DENSITY_PLOT = 'gate_density.png'
MASK_PLOT = 'gate_masks.png'


def plot_layer_density(layer_density: dict[str, float], path: str,
                       title: str = '',
                       flops_share: dict[str, float] | None = None) -> None:
  """Bar chart of the gate density of each gated layer.

  With `flops_share` ({layer: share of the backbone's dense MACs}), each
  layer's share stands beside its density, and the layer's label says how
  much of the backbone's MACs its closed gates saved, so a reader sees where
  a budget was spent.
  """
  names = list(layer_density)
  positions = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 4.2))
  width = 0.4 if flops_share else 0.8
  ax.bar(positions - (width / 2 if flops_share else 0),
         [layer_density[n] for n in names], width, color='tab:blue',
         label='fraction of open gates')
  labels = [n.replace('backbone/', '') for n in names]
  if flops_share:
    ax.bar(positions + width / 2, [flops_share[n] for n in names], width,
           color='tab:gray', label="share of the backbone's dense MACs")
    ax.legend(fontsize=7, loc='upper right')
  ax.set_xticks(positions)
  ax.set_xticklabels(labels, rotation=75, ha='right', fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel('fraction')
  ax.set_title(title or 'Gate density per layer', fontsize=9)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def gate_masks(backbone, variables, images: np.ndarray, augment_config
               ) -> dict[str, np.ndarray]:
  """Eval-mode masks of every gated layer, {layer: (N, H, W) channel mean}."""
  x = augment.preprocess_eval(jnp.asarray(images), augment_config)
  _, state = backbone.apply(variables, x, train=False, mutable=[MASK_COLLECTION])
  flat = flax.traverse_util.flatten_dict(state.get(MASK_COLLECTION, {}))
  return {'/'.join(k[:-1]): np.asarray(v[0]).mean(axis=-1)
          for k, v in flat.items()}


def plot_masks(images: np.ndarray, masks: dict[str, np.ndarray],
               path: str) -> list[str]:
  """Images (rows) next to the fraction of open gates per position, one
  column per gated layer (every gated layer, in network order), with a
  colour key. Returns the column titles: the layers shown."""
  layers = list(masks)
  titles = [name.replace('backbone/', '') for name in layers]
  rows, cols = images.shape[0], len(layers) + 1
  fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols + 0.8, 1.5 * rows),
                           squeeze=False)
  shown = None
  for r in range(rows):
    axes[r, 0].imshow(images[r])
    if r == 0:
      axes[r, 0].set_title('test image', fontsize=6)
    for c, name in enumerate(layers, start=1):
      shown = axes[r, c].imshow(masks[name][r], vmin=0, vmax=1,
                                cmap='viridis')
      if r == 0:
        axes[r, c].set_title(titles[c - 1].replace('/', '\n'), fontsize=5)
  for ax in axes.ravel():
    ax.axis('off')
  fig.suptitle(f'Fraction of open gates per position in each of the '
               f'{len(layers)} gated layers (0: skipped, 1: computed)',
               fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.93, 1))
  if shown is not None:
    key = fig.add_axes((0.945, 0.15, 0.012, 0.7))
    fig.colorbar(shown, cax=key).ax.tick_params(labelsize=6)
  _save(fig, path)
  plt.close(fig)
  return titles


def _save(fig, path: str) -> None:
  """Writes a PNG through the workdir's storage (a local disk or gs://)."""
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=120)
  storage.write_bytes(path, image.getvalue())


def write_run_plots(workdir: str, backbone, variables, images: np.ndarray,
                    augment_config, layer_density: dict[str, Any],
                    flops_share: dict[str, float] | None = None,
                    split: str = 'test') -> list[str]:
  """Writes the density and mask plots of a gated run; returns their paths."""
  if not layer_density:
    return []  # a dense network has no gates to picture
  density_path = os.path.join(workdir, DENSITY_PLOT)
  plot_layer_density({k: float(v) for k, v in layer_density.items()},
                     density_path, f'Gate density per layer ({split} split)',
                     flops_share)
  mask_path = os.path.join(workdir, MASK_PLOT)
  plot_masks(images, gate_masks(backbone, variables, images, augment_config),
             mask_path)
  return [density_path, mask_path]
