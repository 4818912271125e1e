r"""MoCo v2 + CDG, CIFAR ResNet-18 on CIFAR-10 (momentum encoder gated too).

  python -m cdg_jax.main --config=configs/mocov2_cifar10.py --workdir=/tmp/moco_c10
  python -m cdg_jax.main --config=configs/mocov2_cifar10.py:smoke --workdir=/tmp/smoke

Hyperparameters of the MoCo authors' CIFAR-10 recipe: SGD lr 0.06 at batch
512, weight decay 5e-4, temperature 0.1, queue 4096, momentum 0.99, cosine
schedule. Target encoder gating: `--config.gating.branches=online` leaves it dense.

Expected result: not yet measured by this project; the MoCo authors' CIFAR-10
demo reports about 82.6% kNN top-1 for dense ResNet-18 after 200 epochs.
"""

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'mocov2'
  config.data.dataset = 'cifar10'
  config.data.num_classes = 10
  config.augment = augment.augment_preset('simclr_cifar', 32, 'cifar10')
  config.augment.image_size = config.data.get_ref('image_size')
  config.ssl.projector_hidden_dims = (512,)
  config.ssl.projector_dim = 128
  config.ssl.temperature = 0.1
  config.ssl.queue_size = 4096
  config.ssl.base_tau = 0.99
  config.ssl.tau_schedule = 'constant'
  config.optim.name = 'sgd'
  config.optim.base_learning_rate = 0.03    # x batch/256 -> 0.06 at 512
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 0.0
  config.batch_size = 512
  config.num_epochs = 200.0
  return config_lib.apply_variants(config, arg)
