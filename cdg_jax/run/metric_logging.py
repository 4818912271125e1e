"""Metric writers and progress reports that need no TensorFlow.

`clu.metric_writers` and `clu.periodic_actions` import TensorFlow (clu 0.0.12,
even their interface modules), which accelerator images usually lack and
whose CUDA build fights JAX's. The training loop therefore writes through
these small classes, on every machine alike:

  TensorBoardWriter  TensorBoard event files (`events.out.tfevents.*`) through
                     tensorboardX, which writes the same event protocol
                     without TensorFlow.
  JsonlWriter        one JSON object per logged step (scalars, and texts
                     such as a resume's changed fields).
  LoggingWriter      the console (absl logging), one line per call.
  MultiWriter        all of the above at once.
  ReportProgress     steps/s, uptime and ETA every N steps.

`create_writer(workdir, is_main)` builds what a run uses: the console on
every process, event files and `metrics.jsonl` on process 0 only.

In an object store (`gs://`), which cannot append, both files are written to
a local staging copy and uploaded whole by `flush()` (the training loop
flushes with each checkpoint, and `close()` flushes): rows logged after the
last checkpoint are the ones a resumed run drops and logs again anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Protocol

from absl import logging

from cdg_jax.run import storage

Scalars = Mapping[str, float]


class MetricWriter(Protocol):
  """What the training loop writes to."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    ...

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    ...

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def _format_value(value: Any) -> str:
  return f'{value:.6g}' if isinstance(value, float) else str(value)


class LoggingWriter:
  """Writes `[step] name=value, ...` lines to the absl log (the console)."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    if scalars:
      logging.info('[%d] %s', step, ', '.join(
          f'{k}={_format_value(v)}' for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('Hyperparameters: %s', ', '.join(
        f'{k}={_format_value(v)}' for k, v in sorted(hparams.items())))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for name, text in sorted(texts.items()):
      logging.info('[%d] %s: %s', step, name, text)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class JsonlWriter:
  """One JSON object per logged step: `{"step": s, name: value, ...}`.

  Writes for the step of the last row (training metrics, progress, an
  evaluation at the same step) are merged into that row, so every step has
  exactly one row. Resuming a run from a checkpoint at step `resume_step`
  drops the rows after it (they are logged again by the resumed run) and
  merges what is logged at `resume_step` again into its row.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self._file = storage.StagedFile(path)
    self.path = self._file.local_path
    self._last_row: dict[str, float] | None = None
    self._last_offset = 0
    if os.path.exists(self.path):
      self._rewrite(resume_step)
      self._file.sync()

  def _rewrite(self, resume_step: int | None) -> None:
    rows: dict[int, dict[str, float]] = {}
    with open(self.path) as f:
      for line in f:
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError:
          continue   # a line cut off by a crash mid-write
        if resume_step is None or row['step'] <= resume_step:
          rows.setdefault(int(row['step']), {}).update(row)
    lines = [json.dumps(rows[step]) + '\n' for step in sorted(rows)]
    temporary = self.path + '.tmp'
    try:
      with open(temporary, 'w') as f:
        f.writelines(lines)
      os.replace(temporary, self.path)
    finally:
      # Left behind only when the write failed (a full disk): the original
      # file is intact, the partial copy is not kept.
      if os.path.exists(temporary):
        os.remove(temporary)
    if lines:
      self._last_row = rows[max(rows)]
      self._last_offset = sum(len(line.encode()) for line in lines[:-1])

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    self._write_row(step, {k: float(v) for k, v in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write_row(step, {k: str(v) for k, v in texts.items()})

  def _write_row(self, step: int, values: Mapping[str, Any]) -> None:
    row = {'step': int(step), **values}
    with open(self.path, 'a+b') as f:
      if self._last_row is not None and self._last_row['step'] == row['step']:
        row = {**self._last_row, **row}
        f.truncate(self._last_offset)
      else:
        f.seek(0, os.SEEK_END)
        self._last_offset = f.tell()
      f.write((json.dumps(row) + '\n').encode())
    self._last_row = row

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # Stored in config.json.

  def flush(self) -> None:
    self._file.sync()

  def close(self) -> None:
    self._file.close()


class TensorBoardWriter:
  """TensorBoard event files in `logdir`, written by tensorboardX.

  Scalars go to the Scalars tab under their names; hyperparameters to the
  Text tab as a Markdown table (tag 'hparams').
  """

  def __init__(self, logdir: str):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          'Writing TensorBoard event files needs tensorboardX (it does not '
          'need TensorFlow): pip install tensorboardX') from e
    # In an object store, tensorboardX would write through its own client
    # (google-cloud-storage), whose writer blocks the exit for minutes when
    # the store is gone: it writes a staging directory instead, uploaded
    # through `storage` at each flush.
    self._logdir = logdir
    self._staging = (tempfile.mkdtemp(prefix='cdg_jax_events_')
                     if storage.is_remote(logdir) else None)
    self._writer = SummaryWriter(logdir=self._staging or logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for name, text in texts.items():
      self._writer.add_text(name, str(text), global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    rows = ['| hyperparameter | value |', '| --- | --- |']
    rows += [f'| {k} | {_format_value(v)} |' for k, v in sorted(hparams.items())]
    self._writer.add_text('hparams', '\n'.join(rows), global_step=0)

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)

  def _upload(self) -> None:
    if self._staging is None:
      return
    for name in os.listdir(self._staging):
      with open(os.path.join(self._staging, name), 'rb') as f:
        storage.write_bytes(os.path.join(self._logdir, name), f.read())

class MultiWriter:
  """Forwards every call to each of `writers`."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for writer in self.writers:
      writer.write_texts(step, texts)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def create_writer(workdir: str, is_main: bool,
                  metrics_file: str = 'metrics.jsonl',
                  resume_step: int | None = None) -> MultiWriter:
  """The console everywhere; event files and `metrics_file` on process 0.

  `resume_step`: the step a resumed run restarts from; later rows of
  `metrics_file` are dropped (see `JsonlWriter`).
  """
  writers: list[MetricWriter] = [LoggingWriter()]
  if is_main:
    writers += [TensorBoardWriter(workdir),
                JsonlWriter(os.path.join(workdir, metrics_file), resume_step)]
  return MultiWriter(writers)


def format_duration(seconds: float) -> str:
  """`1h02m03s`, `4m05s` or `6s`."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


class ReportProgress:
  """Every `every_steps` steps: writes steps_per_sec and uptime, logs the ETA.

  The rate is measured over the steps since the previous report, so the
  compilation of the first step only slows the first report.

  Args:
    num_train_steps: total steps of the run, for the ETA.
    writer: where `steps_per_sec` and `uptime` (seconds) go.
    every_steps: report period in steps (> 0).
    clock: time source (tests pass a fake one).
  """

  def __init__(self, num_train_steps: int, writer: MetricWriter,
               every_steps: int, clock=time.monotonic):
    if every_steps <= 0:
      raise ValueError(f'log_every_steps must be positive, got {every_steps}.')
    self.num_train_steps = num_train_steps
    self.writer = writer
    self.every_steps = every_steps
    self._clock = clock
    self._start = clock()
    self._last_step: int | None = None
    self._last_time = self._start

  def __call__(self, step: int) -> dict[str, float] | None:
    """Call after each step; returns the reported values on report steps."""
    now = self._clock()
    if self._last_step is None:  # First call: the run (or resume) starts here.
      self._last_step, self._last_time = step - 1, self._start
    if step % self.every_steps:
      return None
    elapsed = now - self._last_time
    rate = (step - self._last_step) / elapsed if elapsed > 0 else math.inf
    values = {'steps_per_sec': rate, 'uptime': now - self._start}
    self.writer.write_scalars(step, values)
    remaining = self.num_train_steps - step
    eta = remaining / rate if rate > 0 and math.isfinite(rate) else 0.0
    logging.info('Step %d/%d (%.1f%%): %.3g steps/s, ETA %s.', step,
                 self.num_train_steps, 100 * step / self.num_train_steps,
                 rate, format_duration(eta))
    self._last_step, self._last_time = step, now
    return values
