r"""kNN accuracy of trained CDG backbones with their gates as trained and forced open.

  python -m experiments.analysis.open_gates --workdirs=/tmp/cdg_grid/simclr_c10_cdg,...

For each workdir of a CDG training run (one with an exported backbone), runs
the kNN evaluation of the training loop (bank = train split, queries = test
split, eval mode) twice: with the learned thresholds, and with every gate open
(`extraction.open_gates`: the trained kernels as a dense network). If opening
the gates does not recover the dense run's accuracy, the gap to dense comes
from the weights learned under gating, not from the masks applied at test time.

The data and evaluation settings are each run's own (its `config.json`), so
run this from the repository root, as the run was. Results go to stdout.
"""

import os

from absl import app
from absl import flags

from cdg_jax.run import checkpoints
from cdg_jax.run import parallel

_WORKDIRS = flags.DEFINE_list('workdirs', None,
                              'Workdirs of CDG training runs.')
flags.mark_flag_as_required('workdirs')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  configs = [checkpoints.read_config(w) for w in _WORKDIRS.value]
  # Before JAX starts, as in cdg_jax.main.
  parallel.configure_cpu(configs[0].cpu_devices)
  from cdg_jax import evaluators
  from cdg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from cdg_jax.evaluators import extraction

  mesh = parallel.make_mesh()
  print('| run | gates | kNN top-1 | FLOPs reduction | gate density |')
  print('| --- | --- | --- | --- | --- |')
  for workdir in _WORKDIRS.value:
    config, backbone, variables = checkpoints.load_backbone(workdir)
    source = input_pipeline.create_source(config.data)
    for gates, run_variables in (('as trained', variables),
                                 ('all open', extraction.open_gates(variables))):
      result = evaluators.knn_eval(backbone, run_variables, source,
                                   config.eval, config.augment, mesh)
      print(f'| {os.path.basename(os.path.normpath(workdir))} | {gates} | '
            f'{100 * result["knn_top1"]:.2f} | '
            f'{result["flops_reduction"]:.2f}x | '
            f'{result["gate_density"]:.3f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
