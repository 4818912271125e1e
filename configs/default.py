"""Default config: CDG-gated CIFAR ResNet-18 (G=4, unstructured gates).

FLOPs of a randomly initialised network on one batch:

  python -m cdg_jax.flops_table --config=configs/default.py

prints the per-layer table; the dense backbone is 555.42 MMACs per 32x32
image, and a random network gates about half the conditional work (reduction
near 1.6x).
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(config_lib.base_config(), arg)
