r"""Linear evaluation of an exported gated backbone, with test-set FLOPs.

  python -m cdg_jax.linear_eval --config=configs/default.py --workdir=DIR
  cdg-linear-eval --config=configs/default.py --workdir=DIR   # installed

loads the backbone a training run exported into DIR (`checkpoints.
load_backbone`), trains a linear classifier on its frozen features, and
writes top-1/top-5 on the whole test set, together with the FLOPs reduction
and gate densities measured on the test set, to `DIR/linear_eval.json`; a
summary is printed (before the file is written). An earlier result of another
evaluation (the other protocol, other settings) is kept beside it as
`DIR/linear_eval.1.json` (`.2`, ...).

Each result names the backbone it scored ('backbone': the training step and
the digest of its arrays, from `DIR/backbone.json`); a later export of the
run moves results of the earlier backbone to `DIR/stale_linear_eval/`. The
evaluation refuses a workdir whose run is training (its `run.lock`), holds
that lock itself while it runs, and refuses a workdir it cannot write before
any work.

Two protocols (`linear_eval.protocol`), the evaluators 'linear_fast' and
'linear_augmented' of `cdg_jax.evaluators` (described in
`cdg_jax/evaluators/linear.py`); every result records which one made it
('protocol', and 'linear_eval.protocol').

The network evaluated is the one in DIR: the `model` and `gating` blocks of
DIR/config.json are used whatever the --config says (a difference is logged
and recorded in the JSON under 'config_notes'). Data, augmentation
normalisation and the `eval` / `linear_eval` blocks come from --config; a
data block, normalisation or framework that differs from the trained run's
is allowed (a transfer evaluation) and noted the same way.
"""

from __future__ import annotations

# Before any third-party import of the program: a library-only install
# (`pip install cdg_jax`) gets the install command, not a ModuleNotFoundError.
from cdg_jax import run as _run  # pylint: disable=g-import-not-at-top
_run.require_program_dependencies(
    'cdg-linear-eval (python -m cdg_jax.linear_eval)')

from collections.abc import Mapping
import contextlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from cdg_jax import evaluators
from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import linear
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.run import parallel
from cdg_jax.run import run_control
from cdg_jax.run import storage

RESULTS_FILE = 'linear_eval.json'
# What linear_eval.json holds of the evaluators' results, in this order.
RESULT_KEYS = ('top1', 'top5', 'train_top1', 'final_train_loss',
               'flops_reduction', 'gate_density', 'layer_density', 'flops',
               'num_train', 'num_test', 'feature_dim')
# ... and of the dense network's, after a dense-partner run.
DENSE_NETWORK_KEYS = ('top1', 'top5', 'train_top1', 'final_train_loss',
                      'flops_reduction')


def _as_json(block: ml_collections.ConfigDict) -> Any:
  return json.loads(block.to_json_best_effort())


def use_backbone_config(config: ml_collections.ConfigDict,
                        backbone_config: ml_collections.ConfigDict
                        ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `config` with the `model` and `gating` blocks of the backbone.

  Returns:
    (config, notes): notes name every field that differed (empty if none).
  """
  notes = []
  for block in ('model', 'gating'):
    given = _as_json(config[block]) if block in config else None
    saved = _as_json(backbone_config[block])
    if given != saved:
      notes.append(f'--config {block}={given} differs from the exported '
                   f'backbone\'s {block}={saved}; using the backbone\'s.')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = backbone_config.model
    config.gating = backbone_config.gating
  return config, notes


# Fields of --config that may differ from the trained run's on purpose (a
# transfer evaluation on another dataset, another resolution) but change what
# the numbers mean: each difference is noted in the results.
DATA_FIELDS = ('source', 'dataset', 'npz_path', 'data_dir', 'num_classes',
               'image_size', 'validation_size')


def data_notes(config: ml_collections.ConfigDict,
               backbone_config: ml_collections.ConfigDict) -> list[str]:
  """Notes on the data, normalisation and framework that differ from the run.

  Evaluating a backbone on other data is allowed (transfer), so these are
  notes, not errors; each names both values.
  """
  notes = []
  for field in DATA_FIELDS:
    given, trained = config.data.get(field), backbone_config.data.get(field)
    if given != trained:
      notes.append(f'data.{field}={given!r} differs from the {trained!r} the '
                   f'backbone was trained with.')
  for field in ('mean', 'std'):
    given = [float(v) for v in config.augment.get(field, ())]
    trained = [float(v) for v in backbone_config.augment.get(field, ())]
    if trained and given != trained:
      notes.append(f'augment.{field}={given} (input normalisation) differs '
                   f'from the {trained} the backbone was trained with.')
  if config.get('framework') != backbone_config.get('framework'):
    notes.append(f'framework={config.get("framework")!r} differs from the '
                 f'{backbone_config.get("framework")!r} the backbone was '
                 f'trained with (it does not change the linear protocol).')
  return notes


def run_linear_eval(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, Any]:
  """Linear evaluation of the backbone exported in `workdir`, written to
  `<workdir>/linear_eval.json` (see module doc and `evaluate_backbone`)."""
  workdir = run_control.resolve_workdir(workdir)
  with workdir_for_evaluation(config, workdir):
    results = evaluate_backbone(config, workdir)
    write_results(workdir, results)
  return results


@contextlib.contextmanager
def workdir_for_evaluation(config: ml_collections.ConfigDict, workdir: str):
  """Checks the settings and that `workdir` can take a result, and holds its
  lock meanwhile.

  Bad `linear_eval` settings, a workdir that holds no run, one whose run is
  still training (its backbone may be replaced while it is read) and one
  where the result could not be written are refused, in that order, before
  any work.
  """
  linear_settings(config)
  checkpoints.read_config(workdir)
  lock = run_control.WorkdirLock(workdir, enabled=jax.process_index() == 0,
                                 purpose='linear evaluation')
  lock.check()
  if jax.process_index() == 0:
    run_control.check_writable(
        workdir, why=f', so {RESULTS_FILE} could not be written there')
  with lock:
    yield


def evaluate_backbone(config: ml_collections.ConfigDict,
                      workdir: str) -> dict[str, Any]:
  """Linear evaluation of the backbone exported in `workdir`; writes nothing.

  Args:
    config: data, augmentation (normalisation), `eval.batch_size` and
      `linear_eval` settings; `model`/`gating` are taken from the workdir.
    workdir: a training run's workdir, with `config.json` and `backbone/`.

  Returns:
    The results `write_results` writes to `<workdir>/linear_eval.json`:
    'top1', 'top5' and 'train_top1' (fractions), 'flops_reduction',
    'gate_density' (1.0 for a dense backbone), 'layer_density', the full
    'flops' report, sizes, the settings used, 'config_notes' and 'backbone'
    (the step and digest of the backbone scored); for a dense-partner run
    (`gating.branches='dense_partner'`) also 'dense_network', the same
    measures of the run's dense network (every gate open).

  Raises:
    FileNotFoundError: no config.json or no exported backbone in `workdir`.
    ValueError: the backbone loaded is not the one `backbone.json` describes
      (replaced while it was read).
  """
  # The settings first: a bad value stops before the backbone is loaded.
  settings = linear_settings(config)
  backbone_config, backbone, variables = checkpoints.load_backbone(workdir)
  scored = scored_backbone(workdir, variables)
  config, notes = use_backbone_config(config, backbone_config)
  for note in notes:
    logging.warning('%s', note)
  for note in data_notes(config, backbone_config):
    notes.append(note)
    logging.warning('%s', note)

  mesh = parallel.make_mesh()
  source = input_pipeline.create_source(config.data)
  eval_config = config.get('eval') or {}
  context = evaluators.context_for(
      backbone, variables, source, eval_config, config.augment, mesh,
      seed=int(config.seed), linear_settings=settings)
  names = (f'linear_{settings["protocol"]}', 'flops')
  scores = evaluators.evaluate(names, context)
  dense_network = None
  if config_lib.read_gating(config.gating).branches.has_dense_partner:
    # The dense network of the same run: the same weights, every gate open.
    dense_network = evaluators.evaluate_dense_path(names, context,
                                                   DENSE_NETWORK_KEYS)
  results = {
      **{key: scores[key] for key in RESULT_KEYS},
      # 'validation' when data.validation_size holds out part of the training
      # set: then 'top1' etc. are validation accuracies, not test ones.
      'eval_split': source.eval_split_name,
      'num_classes': int(source.num_classes),
      **({'dense_network': dense_network} if dense_network else {}),
      # Which protocol made these numbers, in words; its name and settings
      # are under 'linear_eval'.
      'protocol': linear.PROTOCOLS[settings['protocol']],
      'sparse_inference': bool(eval_config.get('sparse_inference', False)),
      'linear_eval': settings,
      'model': _as_json(config.model),
      'gating': _as_json(config.gating),
      'data': _as_json(config.data),
      'config_notes': notes,
      'backbone': scored,
  }
  return results


def scored_backbone(workdir: str, variables) -> dict[str, Any]:
  """{'step', 'digest', 'exported'} of the backbone loaded from `workdir`.

  The digest is of the arrays actually loaded; `backbone.json` (written at
  export) gives the step. A backbone exported before that file existed has
  its step from summary.json when there is one ('exported': None).

  Raises:
    ValueError: the loaded arrays are not those `backbone.json` describes.
  """
  digest = checkpoints.backbone_digest(variables)
  info = checkpoints.read_backbone_info(workdir)
  if info is None:
    try:
      step = json.loads(storage.read_text(
          os.path.join(workdir, 'summary.json'))).get('steps')
    except (OSError, ValueError, AttributeError):
      step = None
    return {'step': step, 'digest': digest, 'exported': None}
  if info.get('digest') != digest:
    raise ValueError(
        f'The backbone in {os.path.join(workdir, checkpoints.BACKBONE_DIR)} '
        f'(digest {digest}) is not the one {checkpoints.BACKBONE_INFO_FILE} '
        f'describes (step {info.get("step")}, digest {info.get("digest")}): '
        f'it was replaced while it was read, or by hand. Evaluate again once '
        f'the run that writes it has ended.')
  return {'step': info.get('step'), 'digest': digest,
          'exported': info.get('exported')}


def write_results(workdir: str, results: dict[str, Any]) -> None:
  """Writes `results` to `<workdir>/linear_eval.json` (process 0), keeping
  an earlier result of another evaluation (`keep_earlier_result`)."""
  if jax.process_index() != 0:
    return
  kept = keep_earlier_result(workdir, results)
  if kept:
    results['earlier_result_kept_as'] = kept
  storage.write_text(os.path.join(workdir, RESULTS_FILE),
                     json.dumps(results, indent=2))


# What makes two linear evaluations the same evaluation (of one backbone).
_SAME_EVALUATION = ('linear_eval', 'data', 'sparse_inference', 'eval_split',
                    'backbone')


def keep_earlier_result(workdir: str, results: Mapping[str, Any]) -> str | None:
  """Moves an earlier `linear_eval.json` of another evaluation aside.

  A second evaluation with other settings (the other protocol, other
  epochs, other data) must not destroy the first: the earlier file becomes
  `linear_eval.1.json` (then `.2`, ...), and the new result takes
  `linear_eval.json`. The same evaluation run again replaces its own file.

  Returns:
    The earlier file's new name, or None when nothing was moved.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not storage.exists(path):
    return None
  try:
    earlier = json.loads(storage.read_text(path))
  except ValueError:
    earlier = {}
  # Compared as JSON (tuples in memory are lists in the file).
  if all(earlier.get(key) == json.loads(json.dumps(results.get(key)))
         for key in _SAME_EVALUATION):
    return None
  stem, extension = os.path.splitext(RESULTS_FILE)
  number = 1
  while storage.exists(os.path.join(workdir, f'{stem}.{number}{extension}')):
    number += 1
  name = f'{stem}.{number}{extension}'
  storage.move(path, os.path.join(workdir, name))
  return name


def linear_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `linear_eval` block as plain values, defaults filled in."""
  settings = config_lib.base_config().linear_eval.to_dict()
  given = config.get('linear_eval')
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given or {})
  settings.update({k: v for k, v in given.items() if k != 'augmented'})
  settings['augmented'].update(given.get('augmented') or {})
  problems = config_lib.linear_eval_problems(settings)
  if problems:
    raise ValueError('Invalid linear_eval settings:\n  ' +
                     '\n  '.join(problems))
  return settings


def format_summary(results: Mapping[str, Any], workdir: str,
                   written: bool = True) -> str:
  """Human-readable summary of `run_linear_eval`'s results (without the
  lines on the file written when `written` is False)."""
  model, gating = results['model'], results['gating']
  split = results.get('eval_split', 'test')
  step = (results.get('backbone') or {}).get('step')
  lines = [
      f'Linear evaluation of {workdir} ({model["name"]}, width '
      f'{model.get("width", 64)}, gating.kind={gating["kind"]}, backbone of '
      f'step {step if step is not None else "unknown"}):',
      f'  {split} top-1 {100 * results["top1"]:.2f}%, top-5 '
      f'{100 * results["top5"]:.2f}% on the {results["num_test"]} {split} '
      f'images (train top-1 {100 * results["train_top1"]:.2f}%, '
      f'{results["num_train"]} images)',
      f'  FLOPs reduction {results["flops_reduction"]:.3f}x, gated-layer '
      f'density {results["gate_density"]:.3f} (measured on the {split} '
      f'split)',
      f'  protocol: {results["protocol"]}',
  ]
  if results.get('sparse_inference'):
    lines.append('  features computed with block-sparse inference '
                 '(eval.sparse_inference=True): closed tiles skipped')
  if results.get('dense_network'):
    dense = results['dense_network']
    lines.insert(-1, f'  dense network of the same run (every gate open): '
                     f'{split} top-1 {100 * dense["top1"]:.2f}%, top-5 '
                     f'{100 * dense["top5"]:.2f}%, FLOPs reduction '
                     f'{dense["flops_reduction"]:.3f}x')
  lines += [f'  note: {note}' for note in results['config_notes']]
  if not written:
    return '\n'.join(lines)
  lines.append(f'  written to {os.path.join(workdir, RESULTS_FILE)}')
  if results.get('earlier_result_kept_as'):
    lines.append(f'  the earlier result (another evaluation) was kept as '
                 f'{os.path.join(workdir, results["earlier_result_kept_as"])}')
  return '\n'.join(lines)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  from cdg_jax.run import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_logging()
  # Before JAX starts its backends: one CPU device per core.
  parallel.configure_cpu(flags.FLAGS.config.get('cpu_devices', 0))
  cli.initialize_distributed_from_flags()
  with cli.reported_errors():
    workdir = run_control.resolve_workdir(flags.FLAGS.workdir)
    with workdir_for_evaluation(flags.FLAGS.config, workdir):
      results = evaluate_backbone(flags.FLAGS.config, workdir)
      # The accuracy reaches the console before the file is written, so a
      # write that fails loses nothing of the evaluation.
      if jax.process_index() == 0:
        print(format_summary(results, workdir, written=False), flush=True)
      write_results(workdir, results)
  if jax.process_index() == 0:
    print(f'  written to {os.path.join(workdir, RESULTS_FILE)}' + (
        f'\n  the earlier result (another evaluation) was kept as '
        f'{os.path.join(workdir, results["earlier_result_kept_as"])}'
        if results.get('earlier_result_kept_as') else ''))


def run() -> None:
  """Entry point of `python -m cdg_jax.linear_eval` and `cdg-linear-eval`."""
  # Flags are defined here, not at import, so that importing this module
  # (tests, notebooks, other mains) does not claim the global flag names.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from cdg_jax.run import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/default.py; its model and '
      'gating blocks are replaced by the workdir\'s.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir of a finished run, holding '
                      'config.json and the exported backbone/.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.define_distributed_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
