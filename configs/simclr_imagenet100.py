r"""SimCLR + CDG, ResNet-50 (ImageNet stem) on ImageNet-100 at 224x224.

  python -m cdg_jax.main --config=configs/simclr_imagenet100.py --workdir=/tmp/simclr_in100

Needs ImageNet prepared for TFDS (see byol_imagenet100.py). Gated layers: the
3x3 convolution of every bottleneck. `--config.model.name=resnet18` for the
smaller network.

Expected result: not yet measured by this project. The CDG paper reports up to
1.65x fewer backbone FLOPs on ImageNet-100.
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  config = config_lib.recipe_config('simclr', 'imagenet100',
                                    augment_name='simclr_imagenet',
                                    image_size=224)
  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.ssl.temperature = 0.1
  config.optim.base_learning_rate = 0.3
  config.batch_size = 256
  config.num_epochs = 400.0
  config.checkpoint.every_steps = 2000
  return config_lib.apply_variants(config, arg)
