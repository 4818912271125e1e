r"""SimSiam + CDG, CIFAR ResNet-18 on CIFAR-10.

  python -m cdg_jax.main --config=configs/simsiam_cifar10.py --workdir=/tmp/simsiam_c10
  python -m cdg_jax.main --config=configs/simsiam_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters of the SimSiam paper's CIFAR-10 recipe: SGD lr 0.03 x B/256,
weight decay 5e-4, batch 512, 800 epochs, projector 2048-2048 (last BN),
predictor bottleneck 512.

Expected result: not yet measured by this project; the SimSiam paper reports
about 91.8% top-1 for dense ResNet-18 on CIFAR-10 after 800 epochs (appendix D).
"""

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'simsiam'
  config.data.dataset = 'cifar10'
  config.data.num_classes = 10
  config.augment = augment.augment_preset('simclr_cifar', 32, 'cifar10')
  config.augment.image_size = config.data.get_ref('image_size')
  config.ssl.projector_hidden_dims = (2048, 2048)
  config.ssl.projector_dim = 2048
  config.ssl.projector_last_bn = True
  config.ssl.predictor_hidden_dims = (512,)
  config.ssl.predictor_dim = 2048
  config.optim.name = 'sgd'
  config.optim.base_learning_rate = 0.03
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 0.0
  config.batch_size = 512
  config.num_epochs = 800.0
  return config_lib.apply_variants(config, arg)
