r"""SimCLR + CDG, ResNet-50 (ImageNet stem) on ImageNet-100 at 224x224.

  python -m cdg_jax.main --config=configs/simclr_imagenet100.py --workdir=/tmp/simclr_in100

Needs ImageNet prepared for TFDS (see byol_imagenet100.py). Gated layers: the
3x3 convolution of every bottleneck. `--config.model.name=resnet18` for the
smaller network.

Expected result: not yet measured by this project. The CDG paper reports up to
1.65x fewer backbone FLOPs on ImageNet-100.
"""

from cdg_jax import augment
from cdg_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.framework = 'simclr'
  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.data.dataset = 'imagenet100'
  config.data.num_classes = 100
  config.data.image_size = 224
  config.augment = augment.augment_preset('simclr_imagenet', 224, 'imagenet100')
  config.augment.image_size = config.data.get_ref('image_size')
  config.ssl.projector_hidden_dims = (2048,)
  config.ssl.projector_dim = 128
  config.ssl.temperature = 0.1
  config.optim.name = 'lars'
  config.optim.base_learning_rate = 0.3
  config.optim.weight_decay = 1e-6
  config.optim.warmup_epochs = 10.0
  config.batch_size = 256
  config.num_epochs = 400.0
  config.checkpoint.every_steps = 2000
  return config_lib.apply_variants(config, arg)
