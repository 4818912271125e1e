"""Checkpoints (orbax), the resolved config, and the exported backbone.

Layout of a workdir:

  config.json          the resolved config of the run (checked on resume)
  checkpoints/<step>/  full train state, the last `checkpoint.keep` kept
  damaged_checkpoints/ checkpoints that failed to restore, moved aside
  backbone/            exported backbone: params, batch stats (incl. the
                       saliency statistics) and thresholds -- load it with
                       `load_backbone(workdir)` in other code
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from cdg_jax import config_lib
from cdg_jax import models

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
BACKBONE_DIR = 'backbone'
# Fields whose change makes an existing checkpoint unusable for this run.
STRUCTURAL_FIELDS = ('framework', 'model', 'gating.kind', 'gating.groups',
                     'gating.layers', 'gating.saliency_norm', 'gating.branches',
                     'gating.partner_norm',
                     'ssl.projector_hidden_dims', 'ssl.projector_dim',
                     'ssl.projector_last_bn', 'ssl.predictor_hidden_dims',
                     'ssl.predictor_dim', 'ssl.queue_size', 'optim.name',
                     'data.num_classes', 'data.image_size')
# Inside STRUCTURAL_FIELDS but free to change on resume: the compute dtype
# leaves every saved array float32.
RESUMABLE_FIELDS = ('model.dtype',)


def flat_fields(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b.c': value} of a nested dict (a config as JSON)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flat_fields(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def _config_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_compatible(config, workdir: str) -> None:
  """Raises ValueError listing the fields that differ from the workdir's run.

  Only fields that change the shapes or meaning of the saved state count
  (`STRUCTURAL_FIELDS`); schedules, logging and evaluation may change between
  a run and its continuation. A workdir without a checkpoint (a run that
  stopped before its first save) has nothing to be incompatible with. A
  field that the saved config lacks (one added to the library after that
  run) is taken at its default, the value the run had.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or not has_checkpoint(workdir):
    return
  with open(path) as f:
    saved = flat_fields(json.load(f))
  current = flat_fields(_config_dict(config))
  defaults = flat_fields(_config_dict(config_lib.base_config()))
  differ = []
  for key in sorted(set(saved) | set(current)):
    if (not any(key == f or key.startswith(f + '.') for f in STRUCTURAL_FIELDS)
        or key in RESUMABLE_FIELDS):
      continue
    if saved.get(key, defaults.get(key)) != current.get(key):
      differ.append(f'{key}: checkpoint {saved.get(key)!r}, config '
                    f'{current.get(key)!r}')
  if differ:
    raise ValueError(
        f'The checkpoint in {workdir} comes from an incompatible config; these '
        f'fields differ:\n  ' + '\n  '.join(differ) +
        '\nUse a new --workdir, or the config the checkpoint was trained with.')


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds at least one saved step (damaged or not)."""
  return bool(complete_steps(workdir))


def write_config(config, workdir: str) -> None:
  """Writes the resolved config as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved in a workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is it the workdir '
                            f'of a cdg_jax run?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """Orbax manager over `<workdir>/checkpoints`, keeping the last `keep`."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


class NoValidCheckpointError(RuntimeError):
  """Checkpoints exist but none of them restores."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, lost permission, ...)."""


def complete_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir` (not half-written ones)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _write_error(manager: ocp.CheckpointManager, step: int | None,
                 error: BaseException) -> CheckpointWriteError:
  """A CheckpointWriteError naming the directory, the cause and the fix."""
  directory = str(manager.directory)
  text = str(error)
  full = ('No space left on device' in text or 'os_error_code=\'28\'' in text
          or getattr(error, 'errno', None) == 28)
  cause = ('the disk is full (No space left on device)' if full
           else f'{type(error).__name__}: {text.splitlines()[0][:300]}'
           if text else type(error).__name__)
  finished = complete_steps(os.path.dirname(directory))
  what = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
  resume = (f'it resumes from step {finished[-1]}, the newest complete '
            f'checkpoint' if finished else 'no checkpoint is complete yet, so '
            'it starts from step 0')
  fix = (f'Free space on that filesystem (or use a --workdir on a larger '
         f'one)' if full else 'Fix the cause')
  return CheckpointWriteError(
      f'Could not write {what} in {directory}: {cause}. {fix} and run the '
      f'same command again: {resume}.')


def save(manager: ocp.CheckpointManager, state, step: int) -> None:
  """Saves the train state asynchronously (`wait` before exiting).

  Raises:
    CheckpointWriteError: this save, or an earlier asynchronous one, failed.
  """
  try:
    manager.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, step, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves.

  Raises:
    CheckpointWriteError: a pending save failed (e.g. the disk is full).
  """
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _write_error(manager, _unfinished_step(manager), e) from e


def _unfinished_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step whose save was begun but not finished, if any."""
  directory = str(manager.directory)
  steps = [int(name.split('.')[0]) for name in os.listdir(directory)
           if name.split('.')[0].isdigit() and not name.isdigit()]
  return max(steps) if steps else None


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   quarantine_dir: str | None = None):
  """Restores the newest checkpoint that restores, or None when there is none.

  A checkpoint that fails to restore (a truncated array file, missing
  metadata, a half-written step) is reported by name and skipped for the
  next older one. Skipped checkpoints are moved to `quarantine_dir` (when
  given; process 0 only) so that the run can save that step again, and so
  that nothing is deleted.

  Args:
    manager: the run's checkpoint manager.
    abstract_state: a state (or its shapes) giving structure and shardings.
    quarantine_dir: where to move checkpoints that failed to restore.

  Returns:
    The restored state, or None if the manager holds no checkpoint.

  Raises:
    NoValidCheckpointError: checkpoints exist but none restores; names the
      directory and the fix.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  failures = []
  for step in steps:
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      failures.append(f'step {step}: {type(e).__name__}: {reason}')
      logging.warning('Checkpoint %s/%d does not restore (%s: %s); trying '
                      'the previous one.', manager.directory, step,
                      type(e).__name__, reason)
      continue
    if failures and quarantine_dir and jax.process_index() == 0:
      _quarantine(manager, [int(f.split(':')[0].split()[1]) for f in failures],
                  quarantine_dir)
    return state
  raise NoValidCheckpointError(
      f'None of the {len(steps)} checkpoint(s) in {manager.directory} '
      f'restores:\n  ' + '\n  '.join(failures) + f'\nNo checkpoint of '
      f'{manager.directory} restores: move or delete that directory to start '
      f'the run from scratch, or use a new --workdir.')


def _quarantine(manager: ocp.CheckpointManager, steps: list[int],
                quarantine_dir: str) -> None:
  os.makedirs(quarantine_dir, exist_ok=True)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  for step in steps:
    source = os.path.join(str(manager.directory), str(step))
    if os.path.exists(source):
      target = os.path.join(quarantine_dir, f'{step}-{stamp}')
      shutil.move(source, target)
      logging.warning('Moved the damaged checkpoint %s to %s.', source, target)
  manager.reload()


def export_backbone(workdir: str, params, batch_stats) -> str:
  """Writes the online backbone's variables to `<workdir>/backbone`.

  Every process of a run calls it (orbax synchronises the processes and
  writes host arrays from process 0).
  """
  path = os.path.abspath(os.path.join(workdir, BACKBONE_DIR))
  checkpointer = ocp.StandardCheckpointer()
  # Host arrays: a backbone saved from device arrays keeps their sharding and
  # would then only load on the same device topology (8 GPUs -> laptop fails).
  checkpointer.save(path, jax.device_get({'params': params,
                                          'batch_stats': batch_stats}),
                    force=True)
  checkpointer.wait_until_finished()
  return path


def load_backbone(workdir: str):
  """Loads an exported backbone for use in other code.

  Returns:
    (config, backbone, variables): the run's config, the `models.ResNet`
    module (gated as trained) and its variables (numpy arrays, loadable on
    any number of devices), ready for
    `backbone.apply(variables, images, train=False)` -> (N, D) features.
    Add `mutable=['gating']` to get per-sample gate densities too.
  """
  config = read_config(workdir)
  path = os.path.abspath(os.path.join(workdir, BACKBONE_DIR))
  if not os.path.exists(path):
    raise FileNotFoundError(f'No exported backbone at {path}; it is written at '
                            f'the end of a training run.')
  variables = ocp.StandardCheckpointer().restore(path)
  backbone = models.create_resnet(config.model, config.gating)
  return config, backbone, variables
