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

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'byol'
  config.data.dataset = 'cifar100'
  config.data.num_classes = 100
  config.augment = augment.augment_preset('byol_cifar', 32, 'cifar100')
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
