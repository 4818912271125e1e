r"""The CPU protocol: a config file from `configs/`, shrunk to run on 2 CPU cores.

  python -m cdg_jax.main --config=configs/cpu_protocol.py:simclr_cifar10 \
      --workdir=/tmp/cpu_simclr_c10

The argument names a config file in this directory (`simclr_cifar10`,
`byol_cifar10`, `byol_cifar100`, ...), optionally followed by its variants
(`:simclr_cifar10,dense`). Everything that defines the method (framework,
loss, augmentation recipe, gating) comes from that file; this file changes only
the scale:

- data: the real CIFAR subset `../shared/data/<dataset>.npz` (25,000 train
  images, the full 10,000-image test set), read from the repository root and
  downsampled to 16x16 on the host (train and test alike);
- model: CIFAR ResNet-18 at width 16 (channels 16-32-64-128, 128-d features,
  0.70 M parameters; 481.9/16/4 = 7.5 M MACs per 16x16 image dense);
- projector/predictor hidden width 512;
- batch 256 images, 4 epochs (388 steps), 1 warm-up epoch, LARS at
  base learning rate 1.0 (x batch/256);
- gating: as in the config file (the defaults of `cdg_jax.run.config_lib`:
  density-target regulariser, lambda 1.0, density target 0.25; the
  predictor baselines, variants `:channel_predictor` and
  `:spatial_predictor`, at density target 0.5, which gives them about the
  same FLOPs reduction (2x) as CDG at 0.25 with its always-on base path).

On the 2-core CPU one SimCLR run takes 6 to 8 minutes plus a minute of
evaluation. Expected results (seed 0, measured 2026-11-25; runs are
deterministic on CPU for a fixed device count):

  :simclr_cifar10          kNN 39.21%, linear 41.20%, 2.17x fewer FLOPs
  :simclr_cifar10,dense    kNN 41.91%, linear 44.47%

Means over --config.seed=0, 1, 2: CDG 38.53% / 41.23% at 2.15x (kNN 37.00
to 39.38), dense 41.89% / 44.63% (kNN 41.47 to 42.28).

(linear: `python -m cdg_jax.linear_eval --config=configs/cpu_protocol.py:...
--workdir=...` on the same workdir).
`experiments/grids/run_grid.py` runs the grids built on this file and states the
measured numbers. The paper protocol (ResNet-18 at width 64, 32x32 images,
full CIFAR through TFDS, 800 epochs) is the config file on its own.
"""

import importlib.util
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join('..', 'shared', 'data')


def _load_config_file(name: str, variants: str):
  path = os.path.join(CONFIG_DIR, f'{name}.py')
  if not os.path.exists(path) or name == 'cpu_protocol':
    raise ValueError(f'configs/cpu_protocol.py:{name}: no config file '
                     f'configs/{name}.py to shrink. Available: '
                     f'{sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "cpu_protocol.py")}')
  spec = importlib.util.spec_from_file_location(f'cdg_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variants or None)


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/cpu_protocol.py needs the config file to shrink, '
                     'e.g. --config=configs/cpu_protocol.py:simclr_cifar10')
  name, _, variants = arg.partition(',')
  config = _load_config_file(name.strip(), variants)
  config.seed = 0
  config.data.source = 'npz'
  config.data.npz_path = os.path.join(DATA_DIR, f'{config.data.dataset}.npz')
  config.data.image_size = 16
  config.model.name = 'resnet18'
  config.model.width = 16
  config.ssl.projector_hidden_dims = (512,)
  if config.ssl.predictor_dim > 0:
    config.ssl.predictor_hidden_dims = (512,)
  config.ssl.queue_size = 4096
  config.batch_size = 256
  config.num_epochs = 4.0
  config.num_steps = -1
  config.optim.base_learning_rate = 1.0
  config.optim.warmup_epochs = 1.0
  config.log_every_steps = 20
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 1
  config.plot_images = 4
  config.linear_eval.epochs = 100
  return config
