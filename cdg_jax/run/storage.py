"""One path layer for workdirs and data: local disks and object stores.

Every file the program reads or writes in a workdir or a data path goes
through these functions, which use `etils.epath` (os and shutil for local
paths, fsspec's gcsfs for `gs://`); checkpoints and the exported backbone go
through orbax, which writes the same paths with TensorStore. No TensorFlow:
where TensorFlow is installed epath would switch to `tf.io.gfile`; the
program keeps the fsspec backend everywhere (`EPATH_USE_TF=false` unless the
environment already sets it), so that a run behaves the same with and
without it.

An object store is not a disk, and the program does not pretend it is:

- No appends (gcsfs silently *replaces* an object opened for append): files
  that grow during a run (`metrics.jsonl`, the TensorBoard event file) are
  written to a local staging copy (`StagedFile`) and uploaded whole at each
  flush, which the training loop does with each checkpoint and at the end.
  Cost: one upload of the whole file per checkpoint (tens of kB).
- No atomic rename (it is copy plus delete): a file other readers need whole
  (config.json, summary.json, a linear evaluation) is replaced by a single
  upload, which GCS makes atomic; on disk, a temporary file renamed over it.
- Bounded retries and timeouts: gcsfs retries a failed request up to 6 times
  with backoff; each request times out after `REQUEST_TIMEOUT_S`.
- No listing cache: another process (a second host, orbax's TensorStore)
  writes the same prefix, so every listing asks the server.
- A store that stops answering fails the call after gcsfs's retries (about
  a minute), as `StorageUnavailableError`; every later call of the process
  then fails at once, so that a run stops (and its lock is given up) in
  bounded time instead of retrying each write in turn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

# Before etils or gcsfs is imported anywhere: the fsspec backend even where
# TensorFlow is installed; and gcsfs's gRPC probe for hierarchical-namespace
# buckets, which waits 60 s per call against servers that lack gRPC (every
# emulator), is skipped: the JSON API serves every bucket kind.
os.environ.setdefault('EPATH_USE_TF', 'false')
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position

REQUEST_TIMEOUT_S = 60.0
fsspec.config.conf.setdefault('gcs', {}).update(
    use_listings_cache=False, requests_timeout=REQUEST_TIMEOUT_S)

_REMOTE_PREFIXES = ('gs://', 's3://', 'az://', 'hf://')
# Errors that are answers about one object, not a lost store.
_ANSWERS = (FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError)
# Set once the store stopped answering: what every later call raises.
_lost: str | None = None


class StorageUnavailableError(OSError):
  """A remote workdir or data path cannot be used: no bucket, no credentials,
  or the store cannot be reached."""


def _remote(name: str, operation: Callable[[], Any]) -> Any:
  """`operation()` on the remote path `name`, its failures in words."""
  global _lost
  if _lost is not None:
    raise StorageUnavailableError(_lost)
  try:
    return operation()
  except _ANSWERS:
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = describe_failure(name, e)
    if not _is_permission(e):
      _lost = message
    raise StorageUnavailableError(message) from e


def _is_permission(error: BaseException) -> bool:
  # gcsfs raises a 403 as OSError('Forbidden: ...').
  return (getattr(error, 'code', None) in (401, 403)
          or isinstance(error, PermissionError)
          or str(error).startswith('Forbidden'))


def is_remote(path: str) -> bool:
  """Whether `path` is in an object store (`gs://...`), not on a disk."""
  return str(path).startswith(_REMOTE_PREFIXES)


def path(name: str) -> epath.Path:
  """The epath of a local or remote path."""
  return epath.Path(name)


def absolute(name: str) -> str:
  """`name` made absolute (a remote path is already)."""
  return str(name) if is_remote(name) else os.path.abspath(name)


def _info(name: str) -> dict[str, Any]:
  """What the store says of a remote path; FileNotFoundError if nothing.

  Not fsspec's `exists`/`isdir`, which answer False to any error: a store
  that cannot be reached would look empty (no lock, no checkpoint).
  """
  filesystem, object_path = fsspec.core.url_to_fs(name)
  return _remote(name, lambda: filesystem.info(object_path))


def exists(name: str) -> bool:
  if is_remote(name):
    try:
      _info(name)
    except FileNotFoundError:
      return False
    return True
  return os.path.exists(name)


def isdir(name: str) -> bool:
  if is_remote(name):
    try:
      return _info(name)['type'] == 'directory'
    except FileNotFoundError:
      return False
  return os.path.isdir(name)


def listdir(name: str) -> list[str]:
  """Names in a directory (for an object store: under the prefix)."""
  if is_remote(name):
    return _remote(name, lambda: sorted(
        child.name for child in path(name).iterdir()))
  return sorted(os.listdir(name))


def makedirs(name: str) -> None:
  """Creates a directory and its parents (nothing to do in an object store,
  whose "directories" exist through the objects under them)."""
  if not is_remote(name):
    os.makedirs(name, exist_ok=True)


def read_text(name: str) -> str:
  return read_bytes(name).decode()


def read_bytes(name: str) -> bytes:
  if is_remote(name):
    return _remote(name, path(name).read_bytes)
  with open(name, 'rb') as f:
    return f.read()


def write_bytes(name: str, data: bytes) -> None:
  """Replaces the file whole: readers see the old content or the new one.

  On disk through a temporary file renamed over it (removed if the write
  fails, a full disk); in an object store by one upload.
  """
  if is_remote(name):
    _remote(name, lambda: path(name).write_bytes(data))
    return
  temporary = f'{name}.tmp'
  try:
    with open(temporary, 'wb') as f:
      f.write(data)
    os.replace(temporary, name)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_text(name: str, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(name, text.encode())


def create_exclusive(name: str, text: str) -> bool:
  """Creates the file only if it does not exist; False if it does.

  On disk with O_EXCL; in GCS with an `ifGenerationMatch=0` upload, which
  the server refuses when the object exists (GCS does; fake-gcs-server does
  not, so a race of two creators is not tested).
  """
  if is_remote(name):
    # epath opens 'r', 'w' and 'a' only; gcsfs's 'xb' is the precondition.
    # The look first serves servers that ignore it (every emulator).
    filesystem, object_path = fsspec.core.url_to_fs(name)
    if exists(name):
      return False

    def create() -> bool:
      try:
        with filesystem.open(object_path, 'xb') as f:
          f.write(text.encode())
      except FileExistsError:
        return False
      return True
    return _remote(name, create)
  try:
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


def remove(name: str) -> None:
  """Removes a file; no error if it is gone."""
  try:
    if is_remote(name):
      _remote(name, path(name).unlink)
    else:
      os.remove(name)
  except FileNotFoundError:
    pass


def rmtree(name: str) -> None:
  """Removes a directory tree; no error if it is gone."""
  if is_remote(name):
    if exists(name):
      _remote(name, path(name).rmtree)
  else:
    shutil.rmtree(name, ignore_errors=True)


def move(source: str, target: str) -> None:
  """Moves a file or directory (in an object store: copies, then deletes)."""
  if is_remote(source):
    # fsspec rather than epath: epath wants the target's "directory" to
    # exist, which in an object store it does only through its objects.
    filesystem, source_path = fsspec.core.url_to_fs(source)
    _remote(source, lambda: filesystem.mv(
        source_path, fsspec.core.url_to_fs(target)[1], recursive=True))
  else:
    shutil.move(source, target)


class StagedFile:
  """A file that grows during a run, kept whole in the workdir.

  On disk, `local_path` is the file itself and `sync` does nothing. In an
  object store, `local_path` is a staging copy (holding what the object held
  when opened) and `sync` uploads it whole: objects cannot be appended to;
  `close` uploads it a last time and removes the staging copy.
  """

  def __init__(self, name: str):
    self.name = name
    self.remote = is_remote(name)
    self._staging = None
    if not self.remote:
      self.local_path = name
      return
    self._staging = tempfile.mkdtemp(prefix='cdg_jax_staging_')
    self.local_path = os.path.join(self._staging, os.path.basename(name))
    if exists(name):
      with open(self.local_path, 'wb') as f:
        f.write(read_bytes(name))

  def sync(self) -> None:
    """Uploads the staging copy (nothing on disk, or before it exists)."""
    if self.remote and os.path.exists(self.local_path):
      with open(self.local_path, 'rb') as f:
        write_bytes(self.name, f.read())

  def close(self) -> None:
    self.sync()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


def check_reachable(name: str, why: str = '') -> None:
  """Stops with one clear line when the bucket of a remote path is missing,
  not ours to write, or unreachable; nothing for a local path.

  `why` says what will be written there, for the message.

  Raises:
    StorageUnavailableError: naming the path, the cause and the fix.
  """
  if not is_remote(name):
    return
  scheme = str(name).split('://')[0]
  try:
    _, object_path = fsspec.core.url_to_fs(name)
  except ImportError as e:
    raise StorageUnavailableError(
        f'{name}: {scheme}:// paths need the fsspec filesystem for them, '
        f'which is not installed ({e}). pip install "cdg_jax[gcs]" (gcsfs).'
        ) from e
  bucket = object_path.split('/')[0]
  if not exists(f'{scheme}://{bucket}'):
    raise StorageUnavailableError(
        f'The bucket {scheme}://{bucket} of {name} does not exist{why}. '
        f'Create it (gcloud storage buckets create {scheme}://{bucket} '
        f'--location=<your TPU\'s region>) or fix the path.')


def describe_failure(name: str, error: BaseException, why: str = '') -> str:
  """One line for a failed access to a remote path: the cause and the fix."""
  text = f'{type(error).__name__}: {str(error).splitlines()[0][:200]}' if str(
      error) else type(error).__name__
  if _is_permission(error):
    return (f'No permission to write {name}{why} ({text}). Give this '
            f'machine\'s credentials access to the bucket: on a Cloud TPU VM '
            f'its service account needs roles/storage.objectUser on it; '
            f'elsewhere run gcloud auth application-default login.')
  return (f'Could not reach {name}{why} ({text}). Check the network and the '
          f'storage service.')
