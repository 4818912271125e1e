r"""SimSiam + CDG, CIFAR ResNet-18 on CIFAR-10.

  python -m cdg_jax.main --config=configs/simsiam_cifar10.py --workdir=/tmp/simsiam_c10
  python -m cdg_jax.main --config=configs/simsiam_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters of the SimSiam paper's CIFAR-10 recipe: SGD lr 0.03 x B/256,
weight decay 5e-4, batch 512, 800 epochs, projector 2048-2048 (last BN),
predictor bottleneck 512.

Expected result: not yet measured by this project; the SimSiam paper reports
about 91.8% top-1 for dense ResNet-18 on CIFAR-10 after 800 epochs (appendix D).
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('simsiam', 'cifar10'), arg)
