"""The training program: pretraining with CDG, checkpoints, evaluation, reports.

`train_and_evaluate(config, workdir)` is what `cdg_jax.main` calls and what
tests call directly. It checks the whole config and the data before touching
the workdir, takes the workdir's lock (one run per workdir), resumes
automatically from the newest checkpoint that restores, logs metrics
(TensorBoard events, `metrics.jsonl` with one row per logged step, console),
runs the kNN monitor every `eval.every_steps` steps and at the end, and
writes an end-of-run summary (`summary.json`), the exported backbone and
plots. SIGTERM or SIGINT stops it after the current step with a checkpoint
(`run_control.Preempted`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from typing import Any

from absl import logging
# clu's parameter_overview imports without TensorFlow; its metric_writers and
# periodic_actions do not, hence cdg_jax.run.metric_logging.
from clu import parameter_overview
import jax
import numpy as np
import tqdm

from cdg_jax import evaluators
from cdg_jax.data import batching
from cdg_jax.data import input_pipeline
from cdg_jax.evaluators import extraction
from cdg_jax.gating import layers
from cdg_jax.gating import regularizers
from cdg_jax.run import checkpoints
from cdg_jax.run import config_lib
from cdg_jax.run import memory
from cdg_jax.run import metric_logging
from cdg_jax.run import parallel
from cdg_jax.run import plots
from cdg_jax.run import run_control
from cdg_jax.run import storage
from cdg_jax.ssl import models
from cdg_jax.ssl import pretraining

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable, with a clear error if not."""
  workdir = run_control.resolve_workdir(workdir)
  try:
    storage.makedirs(workdir)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise   # a full disk, not a permission: reported as such
    raise PermissionError(f'workdir {workdir!r} is not writable: {e}') from e
  run_control.check_writable(workdir)
  return workdir


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """Flattens fetched metrics ('layer_density' -> 'density/<layer>')."""
  out = {}
  for key, value in metrics.items():
    if key == 'layer_density':
      out.update({f'density/{name}': float(v) for name, v in value.items()})
    else:
      out[key] = float(value)
  return out


def _eval_scalars(results: dict[str, Any]) -> dict[str, float]:
  return {f'eval/{k}': float(v) for k, v in results.items()
          if isinstance(v, (int, float, np.floating, np.integer))}


def backbone_variables(state: pretraining.TrainState) -> dict[str, Any]:
  """The online backbone's variables (params incl. thresholds, batch stats)."""
  return {'params': state.params['backbone'],
          'batch_stats': state.batch_stats.get('backbone', {})}


def _sparse_layout_note(mesh, batch_size: int) -> str:
  """Where the sparse train step's executor runs (`tiling.per_batch_shard`)."""
  devices = mesh.devices.size
  if devices == 1:
    return 'Sparse train step: closed tiles skipped, on one device.'
  return (f'Sparse train step: closed tiles skipped on each of the {devices} '
          f'devices, each over its own {batch_size // devices} images (and '
          f'their views): no tile crosses devices.')


def _state_initializer(run: pretraining.Pretraining, mesh):
  return jax.jit(run.init_state, out_shardings=parallel.replicated(mesh))


def _create_state(run: pretraining.Pretraining, seed: int, mesh):
  return _state_initializer(run, mesh)(jax.random.key(seed))


def train_and_evaluate(config, workdir: str, *,
                       set_aside_earlier_run: bool = False) -> dict[str, Any]:
  """Pretrains with CDG under `config.framework`, evaluates, reports.

  Args:
    config: a config from `configs/` (see `cdg_jax.run.config_lib`).
    workdir: where checkpoints, metrics, summary, backbone and plots go; a
      run already there is resumed (`~` is expanded).
    set_aside_earlier_run: a workdir that holds another run's outputs but no
      checkpoint is refused unless the config is that run's; with this, the
      earlier files are moved to `<workdir>/earlier_runs/<time>/` and a new
      run starts (the flag `--set_aside_earlier_run`).

  Returns:
    The end-of-run summary (also written to `<workdir>/summary.json`): kNN
    top-1/top-5, FLOPs reduction and gate densities measured on the test set
    (or on the held-out validation split: `eval_split`),
    the last training metrics, steps and wall time.
  """
  start_time = time.time()
  is_main = jax.process_index() == 0
  workdir = run_control.resolve_workdir(workdir)
  if is_main:
    print(f'Workdir: {storage.absolute(workdir)}', flush=True)
  # A workdir in use by another run is refused first (reading its lock
  # only); then everything that can be checked is checked before the
  # workdir is touched: the config, the memory, the data, the devices.
  run_control.WorkdirLock(workdir, enabled=is_main).check()
  # The config's one parse: the gating spec and the pretraining settings
  # are read here and passed down; nothing below reads `config.gating`.
  gating = config_lib.validate(config)
  check_same_config_in_every_process(config)
  mesh = parallel.make_mesh()
  # Before the data are made or read: an image size or batch whose train
  # step cannot fit is refused with the estimate, not found by swapping.
  size = config.data.image_size
  memory_note = memory.check_fits(config.model, gating.layer,
                                  config.batch_size, (size, size, 3),
                                  list(mesh.devices.flat))
  if is_main and memory_note:
    print(memory_note, flush=True)
  if is_main and gating.layer.sparse_training:
    print(_sparse_layout_note(mesh, config.batch_size), flush=True)
  source = input_pipeline.create_source(config.data)
  # The evaluation batch is rounded up to the devices (eval_batch_size).
  parallel.check_batch_divisible(config.batch_size, mesh)
  settings = pretraining.read_settings(config, gating, source.num_train)
  run, abstract_state = check_shapes(config, settings, source, mesh)
  try:
    prepare_workdir(workdir)
    with run_control.WorkdirLock(workdir, enabled=is_main):
      # Every check that can refuse this run reads the workdir and writes
      # nothing: a refused resume leaves it as it was (config.json too).
      changes = checkpoints.check_compatible(config, workdir)
      checkpoints.check_restorable(workdir, abstract_state)
      earlier = checkpoints.check_new_run_allowed(config, workdir,
                                                  set_aside_earlier_run)
      check_changes_can_act(changes, workdir, settings.total_steps)
      moved_to = checkpoints.set_aside_earlier_outputs(workdir, earlier)
      if moved_to and is_main:
        print(f'Moved the earlier run\'s {", ".join(earlier)} to {moved_to}; '
              f'training a new run in {workdir}.', flush=True)
      return _train_and_evaluate(config, run, settings, workdir, source,
                                 mesh, start_time, changes)
  except OSError as e:
    error = _stopped_writing(workdir, e)
    if error is e:
      raise
    raise error from e


def _stopped_writing(workdir: str, error: OSError) -> OSError:
  """The error a run that failed to write ends with, once every write of the
  run has ended (the loop's `finally` waited for them)."""
  if isinstance(error, storage.StorageUnavailableError):
    # The store went away mid-run (or never answered): the cause, and the
    # checkpoint a rerun resumes from once it answers again.
    return storage.StorageUnavailableError(
        f'{error} Once it answers, run the same command again: '
        f'{checkpoints.resume_text(workdir)}.')
  # A full disk met outside a checkpoint save (the metrics, the config, the
  # lock, a plot, a rerun on a disk still full) ends as a failed save does:
  # the directory, the cause and the step the run resumes from.
  full = (error if isinstance(error, checkpoints.CheckpointWriteError)
          else checkpoints.disk_full_error(workdir, error))
  if full is None:
    return error
  # No half-written checkpoint is left behind.
  checkpoints.remove_unfinished(checkpoints.checkpoint_dir(workdir))
  return full


def check_changes_can_act(changes: dict[str, tuple[Any, Any]], workdir: str,
                          total_steps: int) -> None:
  """ValueError when a resume changes training fields with nothing to train.

  The changes would act on no step, yet the summary would describe the run
  under them (a FLOPs budget "reached" by a run never trained with it).
  """
  steps = checkpoints.complete_steps(workdir)
  if changes and steps and max(steps) >= total_steps:
    raise ValueError(
        f'The run in {workdir} has trained all {total_steps} steps, so these '
        f'changed fields would train nothing, yet its summary would describe '
        f'the run under them: {checkpoints.describe_changes(changes)}. Revert '
        f'them to evaluate this run again, or use a new --workdir to train '
        f'with them.')


def check_same_config_in_every_process(config) -> None:
  """ValueError in every process if any was started with another config.

  The processes of one run must train the same thing; a difference (a
  forgotten override on one host) would otherwise surface as a hang or a
  shape error deep in the first collective. The differing process names
  the fields; the others name the process.
  """
  if jax.process_count() == 1:
    return
  mine = checkpoints.flat_fields(json.loads(config.to_json_best_effort()))
  reference = checkpoints.flat_fields(json.loads(parallel.broadcast_text(
      config.to_json_best_effort())))
  differ = [f'{key}: process 0 {reference.get(key)!r}, process '
            f'{jax.process_index()} {mine.get(key)!r}'
            for key in sorted(set(mine) | set(reference))
            if mine.get(key) != reference.get(key)]
  others = parallel.processes_where(bool(differ))
  if differ:
    raise ValueError(f'Process {jax.process_index()} was started with another '
                     f'config than process 0; these fields differ:\n  ' +
                     '\n  '.join(differ) + '\nStart every process with the '
                     'same --config and overrides.')
  if others:
    raise ValueError(f'Process(es) {others} were started with another config '
                     f'than process 0 (their output names the fields); start '
                     f'every process with the same --config and overrides.')


def check_shapes(config, settings: pretraining.Settings,
                 source: input_pipeline.Source,
                 mesh: jax.sharding.Mesh):
  """Traces the whole run on the data's real shapes; computes nothing.

  The state's initialisation, the train step and the evaluation forward
  (block-sparse if `eval.sparse_inference`) are traced abstractly
  (`jax.eval_shape`), so an error that only the shapes reveal -- a gate
  block that does not divide a feature map, input-channel groups that do
  not divide a layer's channels, images too small for the network -- is
  raised before the workdir is touched, naming the config.

  The initialisation and the step are traced through the same jitted
  functions, with the same argument shardings, as the run then calls: JAX
  keeps those traces, so the run does not trace them a second time.

  Returns:
    (run, state): the assembled run, which the training then uses, and the
    train state's shapes (what a checkpoint of this run holds).

  Raises:
    ValueError: the config cannot run on this data.
  """
  height, width, channels = source.image_shape
  try:
    run = pretraining.assemble(settings)
    state = _state_initializer(run, mesh).eval_shape(jax.random.key(0))
    data = parallel.data_sharding(mesh)
    batch = {'image': jax.ShapeDtypeStruct(
                 (config.batch_size, height, width, channels), np.uint8,
                 sharding=data),
             'label': jax.ShapeDtypeStruct((config.batch_size,), np.int32,
                                           sharding=data)}
    pretraining.jit_train_step(run.train_step, mesh).eval_shape(state, batch)
    backbone = extraction.inference_backbone(
        _backbone(config, settings), config.eval)
    eval_images = jax.ShapeDtypeStruct(
        (extraction.eval_batch_size(config.eval.batch_size, mesh), height,
         width, channels), np.float32)
    jax.eval_shape(
        lambda variables, x: backbone.apply(
            variables, x, train=False, mutable=[layers.DENSITY_COLLECTION]),
        backbone_variables(state), eval_images)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'This config cannot run on this data ({height}x{width} images, '
        f'{source.num_train} for training, data.source='
        f'{config.data.source!r}): {e}') from e
  return run, state


def _backbone(config, settings: pretraining.Settings):
  """The run's online backbone, for evaluation and export."""
  return models.create_resnet(
      config.model, settings.gating,
      separate_partner_norm=settings.branches.separate_partner_norm)


def _restore_or_init(run: pretraining.Pretraining, config, workdir, mesh):
  """The train state (resumed from the workdir's latest checkpoint if any)
  and its checkpoint manager."""
  state = _create_state(run, config.seed, mesh)
  manager = checkpoints.checkpoint_manager(workdir, config.checkpoint.keep)
  restored = checkpoints.restore_latest(
      manager, state, os.path.join(workdir, checkpoints.DAMAGED_DIR))
  if restored is not None:
    state = restored
    if jax.process_index() == 0:
      print(f'Resumed from {manager.directory} at step {int(state.step)}.',
            flush=True)
  return state, manager


def _record_changes(writer, workdir, start_step: int,
                    changes: dict[str, tuple[Any, Any]]):
  """Records training fields changed on a resume (`checkpoints.
  check_compatible`); returns them with the step they took effect at."""
  config_changes = checkpoints.record_changes(workdir, start_step, changes)
  if changes:
    # Going on (not refused): a resume with a lower learning rate or
    # gating.alpha is the fix the divergence message itself suggests.
    if jax.process_index() == 0:
      print(f'Resumed at step {start_step} with changed training fields: '
            f'{checkpoints.describe_changes(changes)}. Steps from '
            f'{start_step} on train under them; the change is recorded in '
            f'{checkpoints.CHANGES_FILE}, summary.json and metrics.jsonl.',
            flush=True)
    writer.write_texts(start_step, {
        f'config_change/{key}': f'{before!r} -> {after!r}'
        for key, (before, after) in changes.items()})
  return config_changes


def _train_and_evaluate(config, run: pretraining.Pretraining,
                        settings: pretraining.Settings, workdir, source, mesh,
                        start_time, changes: dict[str, tuple[Any, Any]]
                        ) -> dict[str, Any]:
  """`train_and_evaluate` once the config, data and workdir are checked
  (`run`: the run `check_shapes` assembled and traced)."""
  backbone = _backbone(config, settings)
  had_config = storage.exists(os.path.join(workdir, checkpoints.CONFIG_FILE))
  state, manager = _restore_or_init(run, config, workdir, mesh)
  start_step = int(state.step)
  is_main = jax.process_index() == 0
  if start_step and not had_config and is_main:
    print(f'{checkpoints.CONFIG_FILE} was missing from {workdir}: the '
          f'checkpoint\'s shapes fit this config, but fields that change no '
          f'shape (learning rate, gating targets, ...) could not be compared '
          f'with the run\'s; {checkpoints.CONFIG_FILE} now holds this '
          f'config.', flush=True)
  # Written once the checkpoint restored: a refused or failed resume leaves
  # the run's own config.json in place.
  checkpoints.write_config(config, workdir)
  writer = metric_logging.create_writer(workdir, is_main, METRICS_FILE,
                                        resume_step=start_step)
  config_changes = _record_changes(writer, workdir, start_step, changes)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(scalar_hparams(config, settings))

  spec = settings.gating
  budget_note = regularizers.describe_budget(settings.loss, run.costs)
  if is_main and budget_note:
    print(budget_note, flush=True)
  train_step = pretraining.jit_train_step(run.train_step, mesh)
  batches = batching.prefetch(
      (batching.shard_batch(b, mesh) for b in source.train_batches(
          config.batch_size, config.seed, start_step)),
      config.data.prefetch)
  state, step, last_metrics = _train_loop(
      config, state, train_step, batches, manager, writer, start_step,
      settings.total_steps, evaluate=lambda state: evaluators.knn_eval(
          backbone, backbone_variables(state), source, config.eval,
          config.augment, mesh), settings=settings)
  variables = backbone_variables(state)
  # A run resumed at its last step trains nothing: its restored state is
  # checked here, before evaluation and export.
  nonfinite = checkpoints.nonfinite_arrays(state)
  if nonfinite:
    raise FloatingPointError(nonfinite_state_message(
        nonfinite, step, manager, config, settings))
  knn, dense_network = _final_evaluation(config, settings, backbone, variables,
                                         source, mesh, writer, step)
  writer.close()
  summary = {
      'framework': config.framework, 'model': config.model.name,
      'gating': spec.kind, 'steps': step,
      'resumed_from_step': start_step,
      'eval_split': source.eval_split_name,
      # Whether evaluation skipped the closed tiles (eval.sparse_inference).
      'sparse_inference': bool(config.eval.sparse_inference),
      'num_train': source.num_train, 'num_eval': source.num_test,
      'wall_time_s': time.time() - start_time,
      **knn,
      **({'dense_network': dense_network} if dense_network else {}),
      **({'gate_budget': regularizers.budget_summary(settings.loss,
                                                     run.costs)}
         if budget_note else {}),
      # Training fields changed on a resume, each with the step it took
      # effect at (checkpoints.check_compatible).
      **({'config_changes': config_changes} if config_changes else {}),
      'last_train_metrics': {k: v for k, v in last_metrics.items()
                             if not k.startswith('density/')},
  }
  _write_outputs(config, workdir, summary, backbone, variables, source, knn)
  return summary


def _write_outputs(config, workdir, summary, backbone, variables, source,
                   knn) -> None:
  """The exported backbone, summary.json, the gate plots, the console."""
  checkpoints.export_backbone(workdir, variables['params'],
                              variables['batch_stats'], step=summary['steps'])
  if jax.process_index() != 0:
    return
  storage.write_text(os.path.join(workdir, SUMMARY_FILE),
                     json.dumps(summary, indent=2, default=float))
  if config.plot_images > 0:
    test_images = next(iter(source.eval_batches('test', config.plot_images)))
    plots.write_run_plots(workdir, backbone, jax.device_get(variables),
                          test_images['image'][:config.plot_images],
                          config.augment, knn.get('layer_density'),
                          knn.get('layer_flops_share'),
                          source.eval_split_name)
  print(format_summary(summary), flush=True)


def nonfinite_state_message(paths: list[str], step: int, manager, config,
                            settings: pretraining.Settings) -> str:
  """Why a run stopped on a non-finite train state, and the likely field."""
  spec = settings.gating
  weight = (settings.loss or regularizers.RegularizerSpec()).weight
  if any('saliency_' in p for p in paths):
    likely = (f'the saliency statistics: gating.epsilon={spec.epsilon}, '
              f'gating.saliency_momentum={spec.saliency_momentum}')
  elif any('threshold' in p for p in paths):
    likely = (f'the gate thresholds: gating.alpha={spec.alpha}, '
              f'gating.weight={weight}')
  else:
    likely = (f'the learning rate: optim.base_learning_rate='
              f'{config.optim.base_learning_rate}')
  return (f'NaN or infinite values in the train state at step {step}, in '
          f'{checkpoints.describe_nonfinite(paths)}, while the loss was '
          f'still finite; training stopped without saving or exporting this '
          f'state. The last good checkpoint is step {manager.latest_step()} in '
          f'{manager.directory}. Likely cause: {likely}.')


def _train_loop(config, state, train_step, batches, manager, writer,
                start_step: int, total_steps: int, evaluate,
                settings: pretraining.Settings):
  """Steps from `start_step` to `total_steps`: metrics every
  `log_every_steps`, checkpoints every `checkpoint.every_steps` and at the
  end, kNN every `eval.every_steps` (`evaluate(state)`), a checkpoint and
  `run_control.Preempted` on SIGTERM/SIGINT.

  Returns:
    (state, the last step, the last logged metrics).
  """
  is_main = jax.process_index() == 0
  report_progress = metric_logging.ReportProgress(
      total_steps, writer, config.log_every_steps)
  progress = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                       disable=not is_main, dynamic_ncols=True)
  eval_every = config.eval.every_steps
  last_metrics: dict[str, float] = {}
  step = start_step
  # SIGTERM/SIGINT stop the loop at a step boundary, with a checkpoint.
  with run_control.PreemptionWatcher() as preemption:
    try:
      while step < total_steps:
        batch = next(batches)
        state, metrics = train_step(state, batch)
        step += 1
        report_progress(step)
        save_now = (step % config.checkpoint.every_steps == 0
                    or step == total_steps)
        if step % config.log_every_steps == 0 or save_now:
          # The only host synchronisation of the loop: this step's metrics.
          last_metrics = scalar_metrics(jax.device_get(metrics))
          if not math.isfinite(last_metrics['loss']):
            raise FloatingPointError(
                f'Loss is {last_metrics["loss"]} at step {step}; training '
                f'stopped without saving this state. The last good '
                f'checkpoint is step {manager.latest_step()} in '
                f'{manager.directory}; resume from it with a lower learning '
                f'rate or a smaller gating.alpha.')
          # A finite loss can sit on a state already partly NaN (saliency
          # statistics, thresholds, the target encoder): checked before any
          # checkpoint or export can keep it.
          nonfinite = checkpoints.nonfinite_arrays(state)
          if nonfinite:
            raise FloatingPointError(nonfinite_state_message(
                nonfinite, step, manager, config, settings))
          writer.write_scalars(step, last_metrics)
          progress.set_postfix(
              loss=f'{last_metrics["loss"]:.3f}',
              flops=f'{last_metrics["flops_reduction"]:.2f}x')
          progress.update(step - progress.n)
        if save_now:
          checkpoints.save(manager, state, step)
          # Uploads metrics.jsonl and the event file whole where the
          # workdir is an object store (nothing to do on a disk).
          writer.flush()
        if preemption.should_stop(step) and step < total_steps:
          if not save_now:
            checkpoints.save(manager, state, step)
          checkpoints.wait(manager)
          writer.close()
          cause = preemption.signal_name or 'a preemption notice'
          message = (f'Stopped by {cause} after step {step} of {total_steps}; '
                     f'checkpoint saved in {manager.directory}. Run the same '
                     f'command again to resume from step {step}.')
          logging.warning('%s', message)
          raise run_control.Preempted(message)
        if eval_every > 0 and step % eval_every == 0 and step < total_steps:
          writer.write_scalars(step, _eval_scalars(evaluate(state)))
    finally:
      progress.close()
      batches.close()   # joins the prefetch thread before anything exits
      checkpoints.wait(manager)

  return state, step, last_metrics


def _final_evaluation(config, settings, backbone, variables, source, mesh,
                      writer, step: int):
  """kNN and test-set FLOPs of the trained backbone (and of its dense path
  after a dense-partner run), written to the metrics at `step`.

  Returns:
    (`evaluators.knn_eval`'s dict, the dense path's {'knn_top1',
    'knn_top5', 'flops_reduction'} or None).
  """
  context = evaluators.context_for(backbone, variables, source, config.eval,
                                   config.augment, mesh)
  results = evaluators.evaluate(evaluators.KNN_EVALUATORS, context)
  knn = {key: results[key] for key in evaluators.KNN_EVAL_KEYS}
  writer.write_scalars(step, _eval_scalars(knn))
  dense_network = None
  if settings.branches.has_dense_partner:
    # One dense-partner run trains two networks: report the dense one too.
    dense_network = evaluators.evaluate_dense_path(
        evaluators.KNN_EVALUATORS, context, ('knn_top1', 'knn_top5', 'flops_reduction'))
    writer.write_scalars(step, {f'eval_dense/{k}': v
                                for k, v in dense_network.items()})
  return knn, dense_network


def scalar_hparams(config, settings: pretraining.Settings) -> dict[str, Any]:
  """A few headline hyperparameters for TensorBoard's HParams tab."""
  return {'framework': config.framework, 'model': config.model.name,
          'gating': settings.gating.kind, 'batch_size': config.batch_size,
          'groups': settings.gating.groups,
          'reg_weight': (settings.loss or regularizers.RegularizerSpec()).weight}


def format_summary(summary: dict[str, Any]) -> str:
  """Human-readable end-of-run summary."""
  split = summary.get('eval_split', 'test')
  lines = [f'Finished {summary["framework"]} / {summary["model"]} / gating '
           f'{summary["gating"]} after {summary["steps"]} steps '
           f'({summary["wall_time_s"]:.0f} s).',
           f'kNN top-1 {100 * summary["knn_top1"]:.2f}%, top-5 '
           f'{100 * summary["knn_top5"]:.2f}% ({split} split); backbone '
           f'FLOPs reduction {summary["flops_reduction"]:.3f}x measured on '
           f'the {split} split.']
  if summary.get('sparse_inference'):
    lines.append('Evaluated with block-sparse inference '
                 '(eval.sparse_inference=True): the closed tiles were '
                 'skipped, not computed and masked.')
  if summary.get('dense_network'):
    dense = summary['dense_network']
    lines.append(f'Dense network of the same run (every gate open): kNN '
                 f'top-1 {100 * dense["knn_top1"]:.2f}%, top-5 '
                 f'{100 * dense["knn_top5"]:.2f}% ({split} split), FLOPs '
                 f'reduction {dense["flops_reduction"]:.3f}x.')
  if summary.get('gate_budget'):
    budget = summary['gate_budget']
    lines.append(f"FLOPs budget: gated-layer density {budget['density']:.3f} "
                 f"({100 * budget['gated_flops_fraction']:.1f}% of their dense "
                 f"MACs, {budget['flops_reduction']:.2f}x); reached: "
                 f"{summary['gate_density']:.3f} "
                 f"({100 * summary['gated_flops_fraction']:.1f}%, "
                 f"{summary['flops_reduction']:.2f}x).")
  for entry in summary.get('config_changes', ()):
    lines.append(f'Changed on the resume at step {entry["step"]}: ' + ', '.join(
        f'{key} {change["before"]!r} -> {change["after"]!r}'
        for key, change in entry['changes'].items()) + '.')
  if summary.get('layer_density'):
    share = summary.get('layer_flops_share') or {}
    lines.append(f'Gate density per layer ({split} split), and the layer\'s '
                 f"share of the backbone's dense MACs:")
    lines += [f'  {name:<32} {d:.3f}' + (f'   {100 * share[name]:5.1f}%'
                                         if name in share else '')
              for name, d in summary['layer_density'].items()]
  return '\n'.join(lines)
