r"""BYOL + CDG, ResNet-18 (ImageNet stem) on ImageNet-100 at 224x224.

  python -m cdg_jax.main --config=configs/byol_imagenet100.py --workdir=/tmp/byol_in100

Needs ImageNet prepared for TFDS (manual download):
`tfds build imagenet2012 --manual_dir=<dir with the ILSVRC2012 tars>` and
`--config.data.data_dir=<tfds data dir>`; the 100-class subset (CMC's list)
is selected on the fly.

Expected result: not yet measured by this project. The CDG paper reports up to
1.65x fewer backbone FLOPs on ImageNet-100. Note: stage-4 maps are 7x7, so
structured blocks must divide 7 there (e.g. `--config.gating.block='(1,1,8)'`).
"""

from cdg_jax.run import config_lib


def get_config(arg=None):
  config = config_lib.recipe_config('byol', 'imagenet100',
                                    augment_name='byol_imagenet',
                                    image_size=224)
  config.model.stem = 'imagenet'
  config.num_epochs = 400.0
  config.checkpoint.every_steps = 2000
  return config_lib.apply_variants(config, arg)
