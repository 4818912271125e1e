r"""SimCLR + CDG, CIFAR ResNet-18 on CIFAR-10 (the paper's main CIFAR setting).

  python -m cdg_jax.main --config=configs/simclr_cifar10.py --workdir=/tmp/simclr_c10

Smoke run (tiny network, synthetic data, 20 steps, about a minute on a 2-core CPU):

  python -m cdg_jax.main --config=configs/simclr_cifar10.py:smoke --workdir=/tmp/smoke

Dense baseline: `:dense`; structured (2x2x4 blocks) gating: `:structured`.
On this project's CPU machines, use the local CIFAR subset instead of TFDS:
`--config.data.source=npz --config.data.npz_path=../shared/data/cifar10.npz`.

Expected result: not yet measured at this length by this project (no
accelerator runs so far). Reference points: dense SimCLR ResNet-18 reaches
about 91% linear top-1 on CIFAR-10 after 1000 epochs (google-research/simclr);
the CDG paper reports up to 2.25x fewer backbone FLOPs on CIFAR at close to
dense accuracy. The smoke run only checks the program end to end.
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  return config_lib.apply_variants(
      config_lib.recipe_config('simclr', 'cifar10'), arg)
