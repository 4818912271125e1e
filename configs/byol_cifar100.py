r"""BYOL + CDG, CIFAR ResNet-18 on CIFAR-100 (online and EMA target both gated).

  python -m cdg_jax.main --config=configs/byol_cifar100.py --workdir=/tmp/byol_c100
  python -m cdg_jax.main --config=configs/byol_cifar100.py:smoke --workdir=/tmp/smoke

Local subset: `--config.data.source=npz --config.data.npz_path=../shared/data/cifar100.npz`.
Hyperparameters as solo-learn's BYOL CIFAR recipe (see byol_cifar10.py).

Expected result: not yet measured by this project at this length. Reference:
dense BYOL ResNet-18 reaches 70.5% online-probe top-1 on CIFAR-100 after 1000
epochs (solo-learn). The smoke run takes about a minute on a 2-core
CPU and its accuracy is at chance (synthetic data); it checks the program.
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('byol', 'cifar100'), arg)
