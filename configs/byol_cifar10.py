r"""BYOL + CDG, CIFAR ResNet-18 on CIFAR-10 (online and EMA target both gated).

  python -m cdg_jax.main --config=configs/byol_cifar10.py --workdir=/tmp/byol_c10
  python -m cdg_jax.main --config=configs/byol_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters as solo-learn's BYOL CIFAR recipe: LARS lr 1.0 x B/256,
weight decay 1e-5, projector and predictor 4096 -> 256, tau 0.99 -> 1 (cosine),
BYOL's asymmetric colour/solarisation views without blur (32x32 images).

Expected result: not yet measured by this project; dense BYOL ResNet-18 is
reported at about 92% on CIFAR-10 after 1000 epochs (solo-learn).
"""

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'byol'
  config.data.dataset = 'cifar10'
  config.data.num_classes = 10
  config.augment = augment.augment_preset('byol_cifar', 32, 'cifar10')
  config.augment.image_size = config.data.get_ref('image_size')
  config.ssl.projector_hidden_dims = (4096,)
  config.ssl.projector_dim = 256
  config.ssl.predictor_hidden_dims = (4096,)
  config.ssl.predictor_dim = 256
  config.ssl.base_tau = 0.99
  config.ssl.tau_schedule = 'cosine'
  config.optim.name = 'lars'
  config.optim.base_learning_rate = 1.0
  config.optim.weight_decay = 1e-5
  config.optim.warmup_epochs = 10.0
  config.batch_size = 256
  config.num_epochs = 1000.0
  return config_lib.apply_variants(config, arg)
