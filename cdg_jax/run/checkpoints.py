"""Checkpoints (orbax), the resolved config, and the exported backbone.

Layout of a workdir:

  config.json          the resolved config of the run (checked on resume)
  checkpoints/<step>/  full train state, the last `checkpoint.keep` kept
  damaged_checkpoints/ checkpoints that failed to restore, moved aside
  backbone/            exported backbone: params, batch stats (incl. the
                       saliency statistics) and thresholds -- load it with
                       `load_backbone(workdir)` in other code
  backbone.json        which backbone that is: its training step and a
                       digest of its arrays (linear evaluations record both)
  earlier_runs/<time>/ the outputs of an earlier run that had no checkpoint,
                       set aside before a new run started in the workdir
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cdg_jax.run import config_lib
from cdg_jax.run import storage
from cdg_jax.ssl import models

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
BACKBONE_DIR = 'backbone'
BACKBONE_INFO_FILE = 'backbone.json'
EARLIER_RUNS_DIR = 'earlier_runs'
# What a run writes into its workdir besides checkpoints/ (docs/running.md,
# "What a run writes"), as names or name prefixes. Files the program does
# not write (a log of the user's, a launcher's) are neither guarded nor
# moved: they are not a run's outputs.
_RUN_OUTPUTS = ('config.json', 'config_changes.json', 'metrics.jsonl',
                'summary.json', BACKBONE_DIR, BACKBONE_INFO_FILE,
                'gate_density.png', 'gate_masks.png', DAMAGED_DIR,
                'stale_linear_eval', 'events.out.tfevents.', 'linear_eval')
# Fields whose change makes an existing checkpoint unusable for this run.
STRUCTURAL_FIELDS = ('framework', 'model', 'gating.kind', 'gating.groups',
                     'gating.layers', 'gating.saliency_norm', 'gating.branches',
                     'gating.partner_norm',
                     'ssl.projector_hidden_dims', 'ssl.projector_dim',
                     'ssl.projector_last_bn', 'ssl.predictor_hidden_dims',
                     'ssl.predictor_dim', 'ssl.queue_size', 'optim.name',
                     'data.num_classes', 'data.image_size')
# Fields that change only how a step executes, or what is logged, saved and
# evaluated, not what is trained: free to change on resume, without a word
# (docs/running.md). The compute dtype leaves every saved array float32; the
# sparse train step computes the masked step's outputs and every gradient
# but the closed tiles' gate gradient (`GatingSpec.execution`).
EXECUTION_FIELDS = ('model.dtype', 'gating.sparse_training',
                    'gating.closed_tile_gradient', 'gating.closed_tile_sample',
                    'log_every_steps', 'checkpoint', 'cpu_devices',
                    'plot_images', 'eval', 'linear_eval', 'data.prefetch',
                    'data.data_dir', 'data.npz_path')
# Every other field that differs on resume changes what the rest of the run
# trains (the objective, the gates' meaning, the schedules, the data): the
# run goes on, warns, and records the change with its step in
# CHANGES_FILE, summary.json and metrics.jsonl.
CHANGES_FILE = 'config_changes.json'


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


def _in(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or key.startswith(f + '.') for f in fields)


def read_saved_fields(workdir: str) -> dict[str, Any] | None:
  """The flat fields of `<workdir>/config.json`, or None when there is none.

  Raises:
    ValueError naming the file when it is not a config (not JSON, not an
    object, or no fields at all): a run cannot be checked against it.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    return None
  try:
    saved = json.loads(storage.read_text(path))
  except ValueError as e:
    raise ValueError(
        f'{path} is not valid JSON ({e}), so the run in {workdir} cannot be '
        f'checked against this config. Restore that file (the run wrote it '
        f'at its start), or use a new --workdir.') from e
  if not isinstance(saved, dict) or not flat_fields(saved):
    raise ValueError(
        f'{path} holds no config ({json.dumps(saved)[:80]}), so the run in '
        f'{workdir} cannot be checked against this config. Restore that file '
        f'(the run wrote it at its start), or use a new --workdir.')
  return flat_fields(saved)


def config_differences(config, saved: dict[str, Any]
                       ) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
  """How `config` differs from a run's saved flat fields.

  A field that the saved config lacks (one added to the library after that
  run) is taken at its default, the value the run had.

  Returns:
    (structural, changes): lines 'field: checkpoint X, config Y' for the
    `STRUCTURAL_FIELDS` that differ, and {field: (saved, new)} for every
    other differing field but the `EXECUTION_FIELDS` (free to differ).
  """
  current = flat_fields(_config_dict(config))
  defaults = flat_fields(_config_dict(config_lib.base_config()))
  differ, changes = [], {}
  for key in sorted(set(saved) | set(current)):
    before, after = saved.get(key, defaults.get(key)), current.get(key)
    if before == after or _in(key, EXECUTION_FIELDS):
      continue
    if _in(key, STRUCTURAL_FIELDS):
      differ.append(f'{key}: checkpoint {before!r}, config {after!r}')
    else:
      changes[key] = (before, after)
  return differ, changes


def check_compatible(config, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the config of the run saved in `workdir`.

  A workdir without a checkpoint has nothing to resume (`earlier_outputs`
  guards what such a workdir holds).

  Returns:
    {field: (saved value, new value)} of the fields that change what the
    rest of the run trains: every differing field except
    `STRUCTURAL_FIELDS` (refused) and `EXECUTION_FIELDS` (free).

  Raises:
    ValueError listing the fields that change the shapes or meaning of the
    saved state (`STRUCTURAL_FIELDS`), with which the checkpoint cannot be
    resumed; or naming a config.json that is not a config.
  """
  if not has_checkpoint(workdir):
    return {}
  saved = read_saved_fields(workdir)
  if saved is None:
    return {}   # checked against the checkpoint itself (`check_restorable`)
  differ, changes = config_differences(config, saved)
  if differ:
    raise ValueError(
        f'The checkpoint in {workdir} comes from an incompatible config; these '
        f'fields differ:\n  ' + '\n  '.join(differ) +
        '\nUse a new --workdir, or the config the checkpoint was trained with.')
  return changes


# Arrays whose shape tells a config field, for a refusal that names the
# field when config.json cannot (it is missing or was edited).
_SHAPE_FIELDS = (('params/backbone/stem_conv/kernel', -1, 'model.width'),
                 ('probe_params/kernel', -1, 'data.num_classes'))


def check_restorable(workdir: str, abstract_state) -> None:
  """Refuses a checkpoint whose arrays do not fit this config's train state.

  Reads the newest complete checkpoint's metadata (the shapes, no data) and
  compares it with `abstract_state`, the state this config would train. It
  is what is on disk, so it holds whatever config.json says (the file may be
  missing or edited). A checkpoint whose metadata cannot be read is left to
  `restore_latest`, which reports damage and falls back to older steps.

  Raises:
    ValueError naming the config fields the shapes tell (model.width,
    data.num_classes) with both values, and the first differing arrays.
  """
  directory = checkpoint_dir(workdir)
  saved, step = {}, None
  # The newest checkpoint whose metadata reads; a damaged one (orbax warns
  # and returns nothing, or raises) is left to restore_latest, which names
  # the damage and falls back the same way.
  for step in reversed(complete_steps(workdir)):
    try:
      metadata = ocp.StandardCheckpointer().metadata(
          os.path.join(directory, str(step), 'default'))
      saved_tree = getattr(metadata, 'item_metadata', metadata)
      saved = _shapes(getattr(saved_tree, 'tree', saved_tree))
    except Exception:  # pylint: disable=broad-except
      saved = {}
    if saved:
      break
  if not saved:
    return
  wanted = _shapes(abstract_state)
  differ = [f'{path}: checkpoint {saved.get(path, "absent")}, config '
            f'{wanted.get(path, "absent")}'
            for path in sorted(set(saved) | set(wanted))
            if saved.get(path) != wanted.get(path)]
  if not differ:
    return
  fields = [f'{field}: checkpoint {saved[path][axis]}, config '
            f'{wanted[path][axis]}'
            for path, axis, field in _SHAPE_FIELDS
            if saved.get(path) and wanted.get(path)
            and saved[path][axis] != wanted[path][axis]]
  shown = differ[:3] + ([f'... {len(differ) - 3} more'] if len(differ) > 3
                        else [])
  raise ValueError(
      f'The checkpoint of step {step} in {directory} does not fit this '
      f'config: ' + ('; '.join(fields) + '. ' if fields else '') +
      'Arrays that differ (shapes):\n  ' + '\n  '.join(shown) +
      '\nRun the config the checkpoint was trained with, or use a new '
      '--workdir. Nothing in the workdir was changed.')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/backbone/...': shape} of the arrays of a state or metadata."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if getattr(leaf, 'shape', None) is not None}


def earlier_outputs(workdir: str) -> list[str]:
  """Names of the files an earlier run left in a workdir without a checkpoint.

  What the program writes there (config.json, metrics, summary, backbone,
  linear evaluations, plots, events, damaged checkpoints); other files are
  not a run's. [] when the workdir has a checkpoint (it is resumed) or none
  of these.
  """
  if has_checkpoint(workdir) or not storage.isdir(workdir):
    return []
  return sorted(name for name in storage.listdir(workdir)
                if name.startswith(_RUN_OUTPUTS)
                and not name.endswith('.tmp'))


def check_new_run_allowed(config, workdir: str, set_aside: bool) -> list[str]:
  """Whether a run may start in a workdir holding another run's outputs.

  A workdir whose checkpoints are gone (deleted to save disk) but which
  keeps a run's outputs must not be overwritten by another run: that is
  allowed only when `config` trains what config.json says (the same run
  again) or when the user says so (`set_aside`, the flag
  --set_aside_earlier_run). Either way the earlier files are kept: the
  caller moves them with `set_aside_earlier_outputs`.

  Returns:
    The earlier outputs to set aside ([] when there are none).

  Raises:
    ValueError naming the differing fields (or the missing config.json),
    what the workdir holds and the flag.
  """
  names = earlier_outputs(workdir)
  if names == [CONFIG_FILE]:
    # A start that failed before it wrote anything else: the new run's
    # config.json replaces it.
    return []
  if not names or set_aside:
    return names
  saved = read_saved_fields(workdir)
  if saved is not None:
    differ, changes = config_differences(config, saved)
    differ += [f'{key}: earlier run {before!r}, config {after!r}'
               for key, (before, after) in changes.items()]
    differ = [line.replace(': checkpoint ', ': earlier run ')
              for line in differ]
    if not differ:
      return names
    why = 'this config differs from the one it was trained with:\n  ' + (
        '\n  '.join(differ[:8]) +
        (f'\n  ... {len(differ) - 8} more' if len(differ) > 8 else ''))
  else:
    why = f'it has no {CONFIG_FILE} to check this config against.'
  shown = ', '.join(names[:6]) + (', ...' if len(names) > 6 else '')
  raise ValueError(
      f'{workdir} holds the outputs of another run ({shown}) but no '
      f'checkpoint, and {why}\nTraining here would overwrite them. Use a new '
      f'--workdir, or pass --set_aside_earlier_run to move them to '
      f'{os.path.join(workdir, EARLIER_RUNS_DIR)}/<time>/ and train a new '
      f'run here.')


def set_aside_earlier_outputs(workdir: str, names: list[str]) -> str | None:
  """Moves `names` of `workdir` into `earlier_runs/<time>/` (process 0).

  Returns:
    The directory they went to, or None when there was nothing to move.
  """
  if not names or jax.process_index() != 0:
    return None
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  target = os.path.join(workdir, EARLIER_RUNS_DIR, stamp)
  number = 1
  while storage.exists(target):
    target = os.path.join(workdir, EARLIER_RUNS_DIR, f'{stamp}.{number}')
    number += 1
  storage.makedirs(target)
  for name in names:
    storage.move(os.path.join(workdir, name), os.path.join(target, name))
  return target


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  """'gating.weight 1.0 -> 2.0, ...' of `check_compatible`'s changes."""
  return ', '.join(f'{key} {before!r} -> {after!r}'
                   for key, (before, after) in changes.items())


def record_changes(workdir: str, step: int,
                   changes: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
  """Appends a resume's changed fields, at `step`, to CHANGES_FILE (process
  0 writes); returns every change recorded in the workdir so far."""
  recorded = read_changes(workdir)
  # A resume from an earlier checkpoint (a damaged newest one) drops what
  # was recorded after it, as metrics.jsonl drops its rows.
  history = [entry for entry in recorded
             if entry['step'] < step or (entry['step'] == step and not changes)]
  if changes:
    history.append({'step': int(step),
                    'changes': {key: {'before': before, 'after': after}
                                for key, (before, after) in changes.items()}})
  if history != recorded and jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, CHANGES_FILE),
                       json.dumps(history, indent=2))
  return history


def read_changes(workdir: str) -> list[dict[str, Any]]:
  """The changes recorded in a workdir (`record_changes`), oldest first."""
  path = os.path.join(workdir, CHANGES_FILE)
  if not storage.exists(path):
    return []
  return json.loads(storage.read_text(path))


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds at least one saved step (damaged or not)."""
  return bool(complete_steps(workdir))


def write_config(config, workdir: str) -> None:
  """Writes the resolved config as JSON (process 0 only).

  Atomically (a temporary file renamed over the old one): on a resumed run
  of several processes, process 0 writes config.json while the others read
  it (`check_compatible`), and a reader must see the old file or the new
  one, never a truncated one. A half-read file once stopped process 1 alone,
  and process 0 then waited for it at orbax's start-up barrier until the
  runtime's shutdown timeout aborted both.
  """
  if jax.process_index() != 0:
    return
  storage.write_text(os.path.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved in a workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is it the workdir '
                            f'of a cdg_jax run?')
  read_saved_fields(workdir)   # a file that is no config is named
  return ml_collections.ConfigDict(json.loads(storage.read_text(path)))


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`, absolute."""
  return storage.absolute(os.path.join(workdir, CHECKPOINT_DIR))


# How TensorStore retries a checkpoint's requests to GCS: as gcsfs does the
# program's own files (6 tries over about a minute), not TensorStore's
# default (32 tries up to 32 s apart, many minutes against a store that went
# away). Orbax builds its TensorStore context itself, from these module
# dicts; it has no public setting for it (orbax-checkpoint 0.12).
GCS_REQUEST_RETRIES = {'max_retries': 6, 'initial_delay': '1s',
                       'max_delay': '32s'}


def _bound_gcs_retries() -> None:
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  contexts = [getattr(tensorstore_utils, name, None)
              for name in ('_BASE_TS_CONTEXT', '_DEFAULT_OCDBT_TS_CONTEXT')]
  if not all(isinstance(context, dict) for context in contexts):
    logging.warning('This orbax builds its TensorStore context differently: '
                    'checkpoint writes to gs:// keep TensorStore\'s default '
                    'retries.')
    return
  for context in contexts:
    context['gcs_request_retries'] = dict(GCS_REQUEST_RETRIES)


def checkpoint_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """Orbax manager over `<workdir>/checkpoints`, keeping the last `keep`."""
  if storage.is_remote(workdir):
    _bound_gcs_retries()
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


# In the name of a directory orbax writes a save into before renaming it.
TMP_MARK = '.orbax-checkpoint-tmp'
# The file orbax writes last into a step saved to an object store.
COMMIT_MARK = 'commit_success.txt'


class NoValidCheckpointError(RuntimeError):
  """Checkpoints exist but none of them restores."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, lost permission, ...)."""


def complete_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir` (not half-written ones)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  names = _checkpoint_names(directory)
  unfinished = set(_unfinished_names(directory, names))
  return sorted(int(name) for name in names
                if name.isdigit() and name not in unfinished)


def _is_disk_full(error: BaseException) -> bool:
  text = str(error)
  return (getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT)
          or 'No space left on device' in text or "os_error_code='28'" in text)


# The newest step known to be saved whole, per checkpoint directory, from
# what this process saw (a restore, a save that finished): what a message
# names when the store that holds the checkpoints cannot be listed.
_known_complete: dict[str, int] = {}


def resume_text(workdir: str) -> str:
  """'it resumes from step N, the newest complete checkpoint' (or from 0),
  from a listing of the workdir or, where the store cannot be listed, from
  what this process saw saved."""
  try:
    finished = complete_steps(workdir)
  except storage.StorageUnavailableError:
    known = _known_complete.get(checkpoint_dir(workdir))
    if known is None:
      return (f'it resumes from the newest complete checkpoint in '
              f'{checkpoint_dir(workdir)} (the store could not be listed to '
              f'name it)')
    finished = [known]
  return (f'it resumes from step {finished[-1]}, the newest complete '
          f'checkpoint' if finished else 'no checkpoint is complete yet, so '
          'it starts from step 0')


_FULL = 'the disk is full (No space left on device)'
_FREE_SPACE = ('Free space on that filesystem (or use a --workdir on a larger '
               'one)')


def _write_error(manager: ocp.CheckpointManager, step: int | None,
                 error: BaseException) -> CheckpointWriteError:
  """A CheckpointWriteError naming the directory, the cause and the fix."""
  directory = str(manager.directory)
  text = str(error)
  full = _is_disk_full(error)
  cause = (_FULL if full
           else f'{type(error).__name__}: {text.splitlines()[0][:300]}'
           if text else type(error).__name__)
  what = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
  fix = _FREE_SPACE if full else 'Fix the cause'
  return CheckpointWriteError(
      f'Could not write {what} in {directory}: {cause}. {fix} and run the '
      f'same command again: {resume_text(os.path.dirname(directory))}.')


def disk_full_error(workdir: str, error: OSError) -> CheckpointWriteError | None:
  """For a write into `workdir` that failed on a full disk (the metrics, the
  config, the lock, a plot): the error a failed checkpoint write gives,
  naming the directory, the cause and the step the run resumes from. None
  for any other OSError."""
  if not _is_disk_full(error):
    return None
  path = str(getattr(error, 'filename', None) or '')
  inside = os.path.abspath(path).startswith(os.path.abspath(workdir) + os.sep)
  # A temporary file's name is ours, not the user's: name what it becomes.
  name = os.path.relpath(path, workdir).removesuffix('.tmp') if (
      path and inside) else path
  what = f'{name} in {workdir}' if name else f'to {workdir}'
  return CheckpointWriteError(
      f'Could not write {what}: {_FULL}. {_FREE_SPACE} and run the same '
      f'command again: {resume_text(workdir)}.')


# How long a failed save's checkpoint must stay removed before the error is
# reported (see `remove_unfinished`).
_WRITES_SETTLE_S = 1.0


def save(manager: ocp.CheckpointManager, state, step: int) -> None:
  """Saves the train state asynchronously (`wait` before exiting).

  Raises:
    CheckpointWriteError: this save, or an earlier asynchronous one, failed.
  """
  try:
    # Orbax would finish the previous save before starting this one anyway;
    # finishing it here tells which step is known to be whole.
    manager.wait_until_finished()
    if manager.latest_step() is not None:
      _known_complete[str(manager.directory)] = manager.latest_step()
    manager.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # pylint: disable=broad-except
    error = _write_error(manager, step, e)
    _settle(manager)
    remove_unfinished(str(manager.directory), quiet_seconds=_WRITES_SETTLE_S)
    raise error from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves.

  Raises:
    CheckpointWriteError: a pending save failed (e.g. the disk is full).
  """
  try:
    manager.wait_until_finished()
    if manager.latest_step() is not None:
      _known_complete[str(manager.directory)] = manager.latest_step()
  except Exception as e:  # pylint: disable=broad-except
    error = _write_error(manager, _safe_unfinished_step(manager), e)
    remove_unfinished(str(manager.directory), quiet_seconds=_WRITES_SETTLE_S)
    raise error from e


def _settle(manager: ocp.CheckpointManager) -> None:
  """Lets orbax's background writes of a failed save end (their error is
  the one already being reported), so that nothing writes into the
  half-written checkpoint while it is removed."""
  try:
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    pass


def remove_unfinished(directory: str, quiet_seconds: float = 0.0) -> list[str]:
  """Removes half-written checkpoints (orbax's `<step>.orbax-checkpoint-tmp`
  directories) from a run's checkpoint `directory`; process 0 only.

  A save that failed (a full disk) or was cut short (kill -9) leaves one
  behind; it can never be restored, and on a full disk it holds the space
  the next save needs. Returns the names removed.

  Args:
    directory: the run's checkpoint directory.
    quiet_seconds: after a save that just failed, how long a removed
      checkpoint must stay gone. Orbax reports the first failed write while
      TensorStore may still finish others of the same save, and a write
      recreates its directories (seen: files of the failed step written 5 ms
      after its removal, the only trace of the run left on the disk). Each
      one that appears in that time is removed and restarts the wait, for
      at most 30 s.
  """
  if jax.process_index() != 0:
    return []
  try:
    return _remove_unfinished(directory, quiet_seconds)
  except storage.StorageUnavailableError as e:
    # The store is gone (the error being reported says so): what it holds
    # half-written is removed by the next run's start.
    logging.warning('Could not remove half-written checkpoints: %s', e)
    return []


def _remove_unfinished(directory: str, quiet_seconds: float) -> list[str]:
  if not storage.isdir(directory):
    return []
  removed = []
  deadline = time.monotonic() + 30.0
  last_seen = time.monotonic()
  while True:
    present = _unfinished_names(directory)
    for name in present:
      storage.rmtree(os.path.join(directory, name))
      if name not in removed:
        removed.append(name)
    now = time.monotonic()
    if present:
      last_seen = now
    elif now - last_seen >= quiet_seconds:
      return removed
    if now > deadline:
      raise OSError(f'Could not remove the half-written checkpoints '
                    f'{", ".join(present)} in {directory} within 30 s: '
                    f'something keeps writing into them.')
    time.sleep(0.05)


def _unfinished_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step whose save was begun but not finished, if any."""
  steps = [int(name.split('.')[0])
           for name in _unfinished_names(str(manager.directory))]
  return max(steps) if steps else None


def _safe_unfinished_step(manager: ocp.CheckpointManager) -> int | None:
  try:
    return _unfinished_step(manager)
  except storage.StorageUnavailableError:
    return None


def _checkpoint_names(directory: str) -> list[str]:
  return storage.listdir(directory) if storage.isdir(directory) else []


def _unfinished_names(directory: str,
                      names: list[str] | None = None) -> list[str]:
  """Names of the checkpoints in `directory` whose save did not finish
  (`names`: its listing, when the caller has it).

  On disk orbax saves into `<step>.orbax-checkpoint-tmp` and renames it; an
  object store has no atomic rename, so there it writes `<step>/` directly
  and marks it finished with `commit_success.txt`, written last.
  """
  names = _checkpoint_names(directory) if names is None else names
  unfinished = [name for name in names if TMP_MARK in name]
  if storage.is_remote(directory):
    unfinished += [name for name in names if name.isdigit() and not
                   storage.exists(os.path.join(directory, name, COMMIT_MARK))]
  return unfinished


# Signs of damage in the errors orbax and TensorStore raise, in words.
_DAMAGE = (
    ('JSONDecodeError', 'a metadata file is not valid JSON (truncated or '
                        'overwritten)'),
    ('OUT_OF_RANGE', 'a data file is shorter than the checkpoint\'s index '
                     'says (truncated)'),
    ('DATA_LOSS', 'a file is corrupt (it fails its own checks)'),
    ('NOT_FOUND', 'a file is missing'),
)


def restore_failure(error: BaseException) -> str:
  """Why a checkpoint does not restore, in words.

  Orbax wraps TensorStore's error (which names the array and the file) in
  one whose message embeds a repr of a bound method; this reads the whole
  chain of causes, says what kind of damage it is and which array could
  not be read, and never prints a repr.
  """
  chain = []
  while error is not None and len(chain) < 8:
    chain.append(error)
    error = error.__cause__ or error.__context__
  whole = '\n'.join(f'{type(e).__name__}: {e}' for e in chain)
  kind = next((words for sign, words in _DAMAGE if sign in whole), None)
  if kind is None:
    readable = [e for e in reversed(chain)
                if str(e) and '<bound method' not in str(e)]
    inner = readable[0] if readable else chain[0]
    first = str(inner).splitlines()[0] if str(inner) else ''
    kind = f'{type(inner).__name__}: {first[:200]}'.rstrip(': ')
  array = re.search(r'Error reading "([^"/]+)', whole)
  return kind + (f', while reading {array.group(1)}' if array else '')


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
  for name in remove_unfinished(str(manager.directory)):
    logging.warning('Removed the half-written checkpoint %s/%s (a save that '
                    'did not finish).', manager.directory, name)
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
      reason = restore_failure(e)
      failures.append(f'step {step}: {reason}')
      logging.warning('Checkpoint %s/%d does not restore: %s. Trying the '
                      'previous one.', manager.directory, step, reason)
      continue
    if failures and quarantine_dir and jax.process_index() == 0:
      _quarantine(manager, [int(f.split(':')[0].split()[1]) for f in failures],
                  quarantine_dir)
    _known_complete[str(manager.directory)] = step
    return state
  # The shapes were checked against the config first (`check_restorable`),
  # so these failures are damage, not another config: nothing here would
  # restore, but the advice still keeps the files.
  raise NoValidCheckpointError(
      f'None of the {len(steps)} checkpoint(s) in {manager.directory} '
      f'restores:\n  ' + '\n  '.join(failures) + f'\nNo checkpoint of '
      f'{manager.directory} restores (damaged files): use a new --workdir, or '
      f'move that directory aside to start this run from scratch.')


def _quarantine(manager: ocp.CheckpointManager, steps: list[int],
                quarantine_dir: str) -> None:
  storage.makedirs(quarantine_dir)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  for step in steps:
    source = os.path.join(str(manager.directory), str(step))
    if storage.exists(source):
      target = os.path.join(quarantine_dir, f'{step}-{stamp}')
      storage.move(source, target)
      logging.warning('Moved the damaged checkpoint %s to %s.', source, target)
  manager.reload()


@jax.jit
def _all_finite(leaves):
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def nonfinite_arrays(tree: Any) -> list[str]:
  """Paths ('params/backbone/conv1/kernel') of the floating-point arrays of
  `tree` that hold a NaN or an infinity; [] when every value is finite.

  One jitted reduction per array on device (a train state) or numpy on host
  (a loaded backbone); only the flags come back to the host.
  """
  flat = [(jax.tree_util.keystr(path, simple=True, separator='/'), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not flat:
    return []
  if all(isinstance(leaf, np.ndarray) for _, leaf in flat):
    finite = [bool(np.all(np.isfinite(leaf))) for _, leaf in flat]
  else:
    finite = [bool(f) for f in jax.device_get(
        _all_finite([leaf for _, leaf in flat]))]
  return [path for (path, _), ok in zip(flat, finite) if not ok]


def describe_nonfinite(paths: list[str], limit: int = 3) -> str:
  """'3 arrays (a, b, c)' or '7 arrays (a, b, c, ...)'."""
  shown = ', '.join(paths[:limit]) + (', ...' if len(paths) > limit else '')
  return f'{len(paths)} array{"s" if len(paths) != 1 else ""} ({shown})'


def backbone_digest(variables) -> str:
  """A digest of a backbone's arrays (paths, dtypes, shapes and bytes).

  What identifies an exported backbone: a linear evaluation records it, and
  compares it with the backbone it loaded, so that a result always names
  the weights it scored.
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(
      (jax.tree_util.keystr(path, simple=True, separator='/'), np.asarray(leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          jax.device_get(variables))):
    digest.update(f'{path}:{leaf.dtype}:{leaf.shape};'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def read_backbone_info(workdir: str) -> dict[str, Any] | None:
  """`backbone.json` ({'step', 'digest', 'exported'}), or None if absent
  (a backbone exported before the file existed) or unreadable."""
  try:
    info = json.loads(storage.read_text(os.path.join(workdir,
                                                     BACKBONE_INFO_FILE)))
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def export_backbone(workdir: str, params, batch_stats,
                    step: int | None = None) -> str:
  """Writes the online backbone's variables to `<workdir>/backbone`.

  Every process of a run calls it (orbax synchronises the processes and
  writes host arrays from process 0). With `step`, process 0 also writes
  `backbone.json` (the step and the arrays' digest), and moves linear
  evaluations of an earlier backbone (`linear_eval*.json` that name
  another digest, or none) to `stale_linear_eval/`, so that no result sits
  beside weights it did not score.
  """
  path = storage.absolute(os.path.join(workdir, BACKBONE_DIR))
  checkpointer = ocp.StandardCheckpointer()
  # Host arrays: a backbone saved from device arrays keeps their sharding and
  # would then only load on the same device topology (8 GPUs -> laptop fails).
  variables = jax.device_get({'params': params, 'batch_stats': batch_stats})
  checkpointer.save(path, variables, force=True)
  checkpointer.wait_until_finished()
  if step is not None and jax.process_index() == 0:
    info = {'step': int(step), 'digest': backbone_digest(variables),
            'exported': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    storage.write_text(os.path.join(workdir, BACKBONE_INFO_FILE),
                       json.dumps(info, indent=2))
    move_stale_linear_results(workdir, info['digest'])
  return path


STALE_LINEAR_DIR = 'stale_linear_eval'


def move_stale_linear_results(workdir: str, digest: str) -> list[str]:
  """Moves `linear_eval*.json` that did not score the backbone `digest` into
  `stale_linear_eval/` (named by the step they scored); returns the names
  they got there."""
  moved = []
  for name in storage.listdir(workdir):
    if not (name.startswith('linear_eval') and name.endswith('.json')):
      continue
    source = os.path.join(workdir, name)
    try:
      scored = (json.loads(storage.read_text(source)).get('backbone') or {})
    except (OSError, ValueError, AttributeError):
      scored = {}
    if scored.get('digest') == digest:
      continue
    storage.makedirs(os.path.join(workdir, STALE_LINEAR_DIR))
    stem = f'step{scored["step"]}' if 'step' in scored else 'step_unknown'
    target = os.path.join(workdir, STALE_LINEAR_DIR, f'{stem}.{name}')
    number = 1
    while storage.exists(target):
      target = os.path.join(workdir, STALE_LINEAR_DIR,
                            f'{stem}.{number}.{name}')
      number += 1
    storage.move(source, target)
    moved.append(os.path.relpath(target, workdir))
    logging.warning('Moved %s (a linear evaluation of an earlier backbone) to '
                    '%s.', source, target)
  return moved


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
  path = storage.absolute(os.path.join(workdir, BACKBONE_DIR))
  if not storage.exists(path):
    raise FileNotFoundError(f'No exported backbone at {path}; it is written at '
                            f'the end of a training run.')
  variables = ocp.StandardCheckpointer().restore(path)
  bad = nonfinite_arrays(variables)
  if bad:
    raise ValueError(
        f'The backbone exported in {path} holds NaN or infinite values in '
        f'{describe_nonfinite(bad)}: the run that wrote it diverged, and its '
        f'features would mean nothing. Train it again (a lower '
        f'optim.base_learning_rate, or the gating fields named when that run '
        f'stopped).')
  gating = config_lib.read_gating(config.gating)
  backbone = models.create_resnet(
      config.model, gating.layer,
      separate_partner_norm=gating.branches.separate_partner_norm)
  return config, backbone, variables
