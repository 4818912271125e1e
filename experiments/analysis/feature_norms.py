r"""Size of each trained backbone's pooled features on the test images.

  python -m experiments.analysis.feature_norms \
      --workdirs=/tmp/cdg_grid/simclr_c10_dense_augmented_linear,/tmp/cdg_grid/simclr_c10_cdg_augmented_linear

Prints the mean L2 norm, mean |x| and mean per-dimension standard deviation
of the eval-mode features (the ones every linear protocol trains on). The
augmented linear protocol feeds these raw to a classifier at a fixed
learning rate, so their scale matters there; the fast protocol standardises
them first (experiments/README.md, "Two linear protocols").
"""

import jax
import numpy as np
from absl import app
from absl import flags

from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.run import checkpoints

flags.DEFINE_list('workdirs', None, 'Run directories with an exported backbone.')
flags.DEFINE_integer('batch_size', 500, 'Evaluation batch size.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch_size = extraction.eval_batch_size(FLAGS.batch_size, mesh)
  for workdir in FLAGS.workdirs:
    config, backbone, variables = checkpoints.load_backbone(workdir)
    source = input_pipeline.create_source(config.data)
    features = extraction.extract_features(
        backbone, variables, source, 'test', batch_size, config.augment,
        mesh)['features']
    print(f'{workdir}: mean L2 norm {np.linalg.norm(features, axis=1).mean():.2f}, '
          f'mean |x| {np.abs(features).mean():.3f}, '
          f'per-dimension std {features.std(0).mean():.3f}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdirs')
  app.run(main)
