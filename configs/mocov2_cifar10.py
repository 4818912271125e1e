r"""MoCo v2 + CDG, CIFAR ResNet-18 on CIFAR-10 (momentum encoder gated too).

  python -m cdg_jax.main --config=configs/mocov2_cifar10.py --workdir=/tmp/moco_c10
  python -m cdg_jax.main --config=configs/mocov2_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters of the MoCo authors' CIFAR-10 recipe: SGD lr 0.06 at batch
512, weight decay 5e-4, temperature 0.1, queue 4096, momentum 0.99, cosine
schedule. Target encoder gating: `--config.gating.branches=online` leaves it dense.

Expected result: not yet measured by this project; the MoCo authors' CIFAR-10
demo reports about 82.6% kNN top-1 for dense ResNet-18 after 200 epochs.
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('mocov2', 'cifar10'), arg)
