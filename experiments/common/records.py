r"""One result record: every benchmark and grid run writes its figures here.

A record is one JSON file, named by what, when and where
(`<out>/<YYYY-MM-DDTHH-MM-SS>-<where>.json`, e.g.
`results/peer/2026-12-05T08-34-29-epyc.json`; `<out>` names what was
measured, `<where>` is the CPU family, or the accelerator where the measured
code ran on one), never overwritten, with one header:

  {"record": {"kind", "date", "command", "git_commit", "git_dirty",
              "machine", "cpu_model", "cores", "devices", "xla_flags",
              "versions", "unknown"},
   ...the benchmark's own fields (its figures)...}

  kind        what was measured ('peer', 'sparse_step', 'grid_run', ...);
  date        when the record was made, UTC ('2026-12-05T08:34:29Z');
  command     the command line that made it;
  git_commit, git_dirty
              HEAD of the checkout and whether tracked files differed from
              it (uncommitted changes were measured);
  machine     '<cpu_model>, <cores> cores'; cpu_model, cores: its parts;
  devices     {'platform', 'count', 'processes', 'kind'} of the devices the
              measured code ran on (a benchmark that measures in worker
              processes passes what they report);
  xla_flags   XLA_FLAGS of the measured code ('' when none were set);
  versions    python and the packages of `PACKAGES` (null: not installed);
  unknown     the header fields that are null because they could not be
              known (no git, no CPU model; for a converted old result, what
              the old file and git did not say).

A converted old result (`experiments/maintenance/convert_results.py`) also
has `record.converted`: where it came from and where each header field was
read.

A Markdown rendering of the record, if the benchmark makes one, sits beside
it with the same stem ('.md'; other files, a plot, with the stem too).
"The latest record" of a folder is derived (`latest_record`, or
`python -m experiments.common.records --latest <folder>`), never a file
that is rewritten.

  python -m experiments.common.records experiments/results/peer  # list, oldest first
  python -m experiments.common.records --latest --kind=sparse_step experiments/results/sparse_step
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Any

from experiments.common.repo import REPO_ROOT as REPO
HEADER_FIELDS = ('kind', 'date', 'command', 'git_commit', 'git_dirty',
                 'machine', 'cpu_model', 'cores', 'devices', 'xla_flags',
                 'versions')
PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin',
            'flax', 'optax', 'orbax-checkpoint', 'chex', 'ml-collections',
            'clu', 'dm-pix', 'tensorboardX', 'numpy', 'tensorflow', 'torch')
# A record's file name: '2026-12-05T08-34-29-epyc.json' (minutes only or
# the day only in converted old results), '.2', '.3', ... for a second
# record of the same second.
_NAME = re.compile(r'^(\d{4}-\d{2}-\d{2}(?:T\d{2}-\d{2}(?:-\d{2})?)?)-'
                   r'([a-z][a-z0-9-]*?)(?:\.(\d+))?\.json$')


def cpu_model() -> str | None:
  """This machine's CPU model ('Intel(R) Xeon(R) Processor'), or None where
  /proc/cpuinfo does not name one (and the platform module neither)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip() or None
  except OSError:
    pass
  # platform.processor() is the architecture ('x86_64') or '' on Linux: no
  # model. Elsewhere (macOS) it may name one.
  processor = platform.processor()
  if processor and processor not in (platform.machine(), 'i386', 'arm'):
    return processor
  return None


def cpu_tag(model: str | None) -> str:
  """A short name of a CPU model for file names: 'epyc', 'xeon', ...."""
  lowered = (model or 'unknown').lower()
  for family in ('epyc', 'xeon', 'ryzen', 'core', 'graviton', 'neoverse'):
    if family in lowered:
      return family
  return _slug(lowered) or 'unknown'


def _slug(text: str) -> str:
  slug = re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:24].strip('-')
  return slug if slug[:1].isalpha() else ''


def where_tag(record_header: dict[str, Any]) -> str:
  """The '<where>' of a record's file name: the accelerator's kind where the
  measured code ran on one ('nvidia-h100-80gb-hbm3'), else the CPU's
  family ('epyc')."""
  devices = record_header.get('devices') or {}
  if isinstance(devices, dict) and devices.get('platform') not in (None,
                                                                   'cpu'):
    tag = _slug(str(devices.get('kind') or devices['platform']))
    if tag:
      return tag
  return cpu_tag(record_header.get('cpu_model'))


def _git(*args: str) -> str | None:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None   # no git, or not a checkout (a copied working tree)


def versions() -> dict[str, str | None]:
  """Python's and `PACKAGES`' versions (None: not installed)."""
  found = {'python': platform.python_version()}
  for package in PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  return found



def jax_devices() -> dict[str, Any] | None:
  """JAX's platform, device count and kind, if this process started JAX."""
  if 'jax' not in sys.modules:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    return None
  return {'platform': jax.default_backend(), 'count': jax.device_count(),
          'processes': jax.process_count(),
          'kind': jax.devices()[0].device_kind}



def devices_of(tree) -> dict[str, Any]:
  """The devices a computation's arrays (`tree`) live on, as a header's
  'devices': the count it ran on, and 'available', all that JAX has (a
  step jitted without shardings runs on one of them)."""
  import jax  # pylint: disable=g-import-not-at-top
  used = set()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      used |= set(leaf.devices())
  first = min(used, key=lambda d: d.id) if used else jax.devices()[0]
  return {'platform': first.platform, 'count': len(used) or 1,
          'processes': jax.process_count(), 'kind': first.device_kind,
          'available': jax.device_count()}


def command_line(argv: Sequence[str] | None = None) -> str:
  """`argv` (default this process's) as the command a user types from the
  repository root. A module of the `experiments` package, which `python -m`
  runs with its file as argv[0], is named as a module: 'python -m
  experiments.benchmarks.benchmark_peer --width=8'; another file of the
  checkout by its path from the root: 'python tools/x.py'."""
  argv = list(sys.argv if argv is None else argv)
  if argv and argv[0].endswith('.py'):
    path = os.path.abspath(argv[0])
    if path.startswith(REPO + os.sep):
      module = _module_name(path)
      if module is not None:
        return 'python ' + shlex.join(['-m', module, *argv[1:]])
      argv[0] = os.path.relpath(path, REPO)
  return 'python ' + shlex.join(argv)


def _module_name(path: str) -> str | None:
  """The dotted name of the checkout's file `path` where every folder from
  the root to it is a package ('experiments.grids.run_grid'), else None."""
  parts = os.path.relpath(path, REPO)[:-len('.py')].split(os.sep)
  folder = REPO
  for part in parts[:-1]:
    folder = os.path.join(folder, part)
    if not os.path.isfile(os.path.join(folder, '__init__.py')):
      return None
  return '.'.join(parts) if len(parts) > 1 else None


def header(kind: str, argv: Sequence[str] | None = None,
           devices: dict[str, Any] | None = None,
           now: datetime.datetime | None = None,
           xla_flags: str | None = None) -> dict[str, Any]:
  """The header of a record of `kind` made now, by this process.

  Fields that cannot be known here (no git, no CPU model in /proc/cpuinfo,
  no JAX devices given or started) are None and named in 'unknown'.

  Args:
    kind: what was measured ('peer', 'sparse_step', ...).
    argv: the command line (default: this process's).
    devices: {'platform', 'count', ...} where the measured code ran in
      other processes (default: this process's JAX devices, if started).
    now: the record's time (default: now, UTC).
    xla_flags: XLA_FLAGS of the measured code where it ran in other
      processes (default: this process's environment).
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  if now.tzinfo is not None:
    now = now.astimezone(datetime.timezone.utc)
  model = cpu_model()
  cores = os.cpu_count()
  # A copy of the working tree without its .git (a lent accelerator
  # machine) has no commit, even inside another checkout.
  top = _git('rev-parse', '--show-toplevel')
  commit = (_git('rev-parse', 'HEAD') if top and os.path.realpath(top)
            == os.path.realpath(REPO) else None)
  status = (_git('status', '--porcelain', '--untracked-files=no')
            if commit else None)
  record_header = {
      'kind': kind,
      'date': now.strftime('%Y-%m-%dT%H:%M:%SZ'),
      'command': command_line(argv),
      'git_commit': commit or None,
      'git_dirty': bool(status) if status is not None else None,
      'machine': f'{model}, {cores} cores' if model and cores else None,
      'cpu_model': model,
      'cores': cores,
      'devices': devices if devices is not None else jax_devices(),
      'xla_flags': (xla_flags if xla_flags is not None
                    else os.environ.get('XLA_FLAGS', '')),
      'versions': versions(),
  }
  record_header['unknown'] = [f for f in HEADER_FIELDS
                              if record_header[f] is None]
  return record_header


def date_stamp(date: str) -> str:
  """A header's date as it appears in file names: '2026-12-05T08-34-29'."""
  stamp = re.sub(r'(Z|[+-]\d{2}:?\d{2})$', '', date).replace(':', '-')
  if not re.fullmatch(r'\d{4}-\d{2}-\d{2}(T\d{2}-\d{2}(-\d{2})?)?', stamp):
    raise ValueError(f'A record\'s date must be YYYY-MM-DD[THH:MM[:SS]][Z], '
                     f'not {date!r}.')
  return stamp


def record_path(out: str, record_header: dict[str, Any]) -> str:
  """A new file in `out` for a record with `record_header`: never one that
  exists (a second record of the same second gets '.2', '.3', ...), nor one
  whose Markdown exists."""
  stem = f'{date_stamp(record_header["date"])}-{where_tag(record_header)}'
  number = 1
  while True:
    path = os.path.join(out, stem + (f'.{number}' if number > 1 else '')
                        + '.json')
    if not os.path.exists(path) and not os.path.exists(markdown_path(path)):
      return path
    number += 1


def write_record(out: str, kind: str, figures: dict[str, Any],
                 render: Callable[[dict[str, Any]], str] | None = None,
                 argv: Sequence[str] | None = None,
                 devices: dict[str, Any] | None = None,
                 xla_flags: str | None = None,
                 now: datetime.datetime | None = None) -> str:
  """Writes a new record of `kind` into the folder `out`; returns its path.

  `figures` are the benchmark's own fields (a 'record' key among them is
  replaced by the header). `render(record)`, if given, makes the Markdown
  written beside the record with the same stem ('.md'), after a line that
  names the record. `argv`, `devices`, `xla_flags`, `now`: see `header`.
  """
  record = {'record': header(kind, argv, devices, now, xla_flags),
            **{k: v for k, v in figures.items() if k != 'record'}}
  os.makedirs(out, exist_ok=True)
  text = json.dumps(record, indent=1, default=float) + '\n'
  markdown = None
  if render is not None:   # before any file is made: a failing render
    markdown = render(record)   # leaves none behind
  while True:
    path = record_path(out, record['record'])
    try:
      # Exclusive creation: two writers never share a name.
      with open(path, 'x') as f:
        f.write(text)
      break
    except FileExistsError:
      continue
  if markdown is not None:
    with open(markdown_path(path), 'x') as f:
      f.write(f'<!-- rendered from {os.path.basename(path)} -->\n' + markdown)
  return path


def print_record(path: str) -> None:
  """Prints the Markdown beside the record `path`, then the record's path
  ('Record: <path>'): what a benchmark shows when it has written one."""
  with open(markdown_path(path)) as f:
    print(f.read(), flush=True)
  print(f'Record: {path}', flush=True)


def markdown_path(record_file: str) -> str:
  """The Markdown rendering beside a record file."""
  return beside(record_file, '.md')


def beside(record_file: str, suffix: str) -> str:
  """Another file of a record (its plot: suffix '.png'), with its stem."""
  return record_file[:-len('.json')] + suffix


def header_lines(record: dict[str, Any]) -> list[str]:
  """The header as Markdown list lines (machine, devices, versions, XLA
  flags, command, date, commit; what is not known), for a rendering."""
  head = record['record']
  devices = head.get('devices') or {}
  if isinstance(devices, dict) and devices:
    device_text = f'{devices.get("count")} {devices.get("platform")}' + (
        f' ({devices["kind"]})' if devices.get('kind')
        and devices.get('platform') != 'cpu' else '') + (
            f' (of {devices["available"]})'
            if devices.get('available') not in (None, devices.get('count'))
            else '')
  else:
    device_text = 'not recorded'
  versions_text = ', '.join(f'{k} {v}' for k, v in (head.get('versions') or {}
                                                    ).items() if v)
  commit = (head.get('git_commit') or 'unknown')[:12] + (
      ' (uncommitted changes)' if head.get('git_dirty') else '')
  lines = [f'- machine: {head.get("machine") or "unknown"}; devices: '
           + device_text,
           f'- versions: {versions_text or "not recorded"}',
           f'- XLA_FLAGS: `{head.get("xla_flags") or ""}`',
           f'- command: `{head.get("command")}`',
           f'- date: {head.get("date")}; commit {commit}']
  if head.get('unknown'):
    lines.append(f'- not recorded: {", ".join(head["unknown"])}')
  return lines


def is_record_name(name: str) -> bool:
  return bool(_NAME.match(name))


def _name_key(path: str) -> tuple[str, int, str]:
  stamp, where, number = _NAME.match(os.path.basename(path)).groups()
  return stamp, int(number or 1), where


def records_in(folder: str) -> list[str]:
  """The record files of `folder`, oldest first (by their names' time)."""
  if not os.path.isdir(folder):
    return []
  return sorted((os.path.join(folder, name) for name in os.listdir(folder)
                 if is_record_name(name)
                 and os.path.isfile(os.path.join(folder, name))),
                key=_name_key)


def read_record(path: str) -> dict[str, Any]:
  """A record, with a clear error naming the file when it is not one."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable result record ({e}).') from e
  if not isinstance(record, dict) or not isinstance(record.get('record'),
                                                    dict):
    raise ValueError(f'{path}: not a result record (no "record" header; '
                     f'an old result: convert it with '
                     f'python -m experiments.maintenance.convert_results).')
  missing = [f for f in HEADER_FIELDS + ('unknown',)
             if f not in record['record']]
  if missing:
    raise ValueError(f'{path}: its header lacks {", ".join(missing)} (list '
                     f'a field it cannot know under "unknown", as null).')
  return record


def latest_record(folder: str, kind: str | None = None) -> str | None:
  """The newest record file in `folder` (of `kind`, if given), or None."""
  for path in reversed(records_in(folder)):
    if kind is None or read_record(path)['record']['kind'] == kind:
      return path
  return None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description='Lists the result records '
                                   'of folders, oldest first.')
  parser.add_argument('folders', nargs='+')
  parser.add_argument('--kind', help='Only records of this kind.')
  parser.add_argument('--latest', action='store_true',
                      help='Print the newest record\'s path only.')
  args = parser.parse_args(argv)
  for folder in args.folders:
    if args.latest:
      path = latest_record(folder, args.kind)
      if path is None:
        print(f'{folder}: no record' + (f' of kind {args.kind}'
                                        if args.kind else ''),
              file=sys.stderr)
        return 1
      print(path)
      continue
    for path in records_in(folder):
      head = read_record(path)['record']
      if args.kind and head['kind'] != args.kind:
        continue
      print(f'{path}\t{head["kind"]}\t{head["machine"] or head["cpu_model"]}'
            f'\t{(head["git_commit"] or "unknown")[:12]}'
            f'\t{head["command"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
