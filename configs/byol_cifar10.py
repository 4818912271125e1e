r"""BYOL + CDG, CIFAR ResNet-18 on CIFAR-10 (online and EMA target both gated).

  python -m cdg_jax.main --config=configs/byol_cifar10.py --workdir=/tmp/byol_c10
  python -m cdg_jax.main --config=configs/byol_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters as solo-learn's BYOL CIFAR recipe: LARS lr 1.0 x B/256,
weight decay 1e-5, projector and predictor 4096 -> 256, tau 0.99 -> 1 (cosine),
BYOL's asymmetric colour/solarisation views without blur (32x32 images).

Expected result: not yet measured by this project; dense BYOL ResNet-18 is
reported at about 92% on CIFAR-10 after 1000 epochs (solo-learn).
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('byol', 'cifar10'), arg)
