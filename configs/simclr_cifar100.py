r"""SimCLR + CDG, CIFAR ResNet-18 on CIFAR-100.

  python -m cdg_jax.main --config=configs/simclr_cifar100.py --workdir=/tmp/simclr_c100
  python -m cdg_jax.main --config=configs/simclr_cifar100.py:smoke --workdir=/tmp/smoke

Local subset: `--config.data.source=npz --config.data.npz_path=../shared/data/cifar100.npz`.

Expected result: not yet measured by this project at this length; the CDG
paper reports up to 2.25x fewer backbone FLOPs on CIFAR-10/100 at close to
dense accuracy. Compare with the `:dense` run trained the same way.
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('simclr', 'cifar100'), arg)
