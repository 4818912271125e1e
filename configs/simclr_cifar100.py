r"""SimCLR + CDG, CIFAR ResNet-18 on CIFAR-100.

  python -m cdg_jax.main --config=configs/simclr_cifar100.py --workdir=/tmp/simclr_c100
  python -m cdg_jax.main --config=configs/simclr_cifar100.py:smoke --workdir=/tmp/smoke

Local subset: `--config.data.source=npz --config.data.npz_path=../shared/data/cifar100.npz`.

Expected result: not yet measured by this project at this length; the CDG
paper reports up to 2.25x fewer backbone FLOPs on CIFAR-10/100 at close to
dense accuracy. Compare with the `:dense` run trained the same way.
"""

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'simclr'
  config.data.dataset = 'cifar100'
  config.data.num_classes = 100
  config.augment = augment.augment_preset('simclr_cifar', 32, 'cifar100')
  config.augment.image_size = config.data.get_ref('image_size')
  config.ssl.projector_hidden_dims = (2048,)
  config.ssl.projector_dim = 128
  config.ssl.temperature = 0.2
  config.optim.name = 'lars'
  config.optim.base_learning_rate = 1.0
  config.optim.weight_decay = 1e-6
  config.optim.warmup_epochs = 10.0
  config.batch_size = 512
  config.num_epochs = 800.0
  return config_lib.apply_variants(config, arg)
