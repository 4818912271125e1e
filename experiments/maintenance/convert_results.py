r"""Converts the results written before `records.py` into records.

  python -m experiments.maintenance.convert_results --dry_run  # print what it would do
  python -m experiments.maintenance.convert_results  # experiments/results

Every result file gets the 'record' header of `records.py`, filled with what
the file itself says (its date, command, machine, versions, devices, XLA
flags) and what git knows: the commit that added this version of the file
(`git log --follow`, the oldest commit since which the file is unchanged)
gives `git_commit`, and its date the record's date where the file has none.
A header field that neither tells is null and named in `record.unknown`;
`record.converted` says where the file was, where each field was read, and
what else is uncertain. The header fields move out of the figures.

- Grid runs (`runs/<name>.json`, and `sparse/final_code_accuracy/`) keep
  their names: the header is added in place.
- Benchmark results are renamed to the record naming, into one folder per
  kind (`BENCHMARKS`): `peer/peer.json` becomes
  `peer/2026-12-05T08-34-29-epyc.json`; the Markdown beside it (and the
  plot of a sparse_speed result) takes the same stem, with a first line
  naming the record and the old file. The old files are removed (a rename:
  `git add -A` records it).
- A result whose JSON was overwritten but whose Markdown was kept under
  another name (`RECOVERED`) gets its JSON back from the commit in which
  that Markdown was the benchmark's.

Idempotent: a file that has a header already, or an old name that no longer
exists, is left alone. Prints the mapping old -> new.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from typing import Any

from experiments.benchmarks import benchmark_levers
from experiments.common import records
from experiments.common import repo

REPO = repo.REPO_ROOT
DEFAULT_RESULTS = repo.RESULTS
BY = 'experiments/maintenance/convert_results.py'

# Old benchmark results (relative to the results folder): their kind; the
# record goes to the kind's folder.
BENCHMARKS = {
    'peer/peer.json': 'peer',
    'peer/peer_1device.json': 'peer',
    'sparse/sparse_speed.json': 'sparse_speed',
    'sparse/pooled_gate/sparse_speed.json': 'sparse_speed',
    'sparse/sparse_step.json': 'sparse_step',
    'sparse/sparse_step_two_densities.json': 'sparse_step',
    'sparse/width16/sparse_step.json': 'sparse_step',
    'levers/levers.json': 'levers',
    'levers/levers_conv_patches_one_device.json': 'levers',
    'levers/levers_conv_xla.json': 'levers',
    'levers/levers_kernels.json': 'levers',
    'levers/levers_malloc.json': 'levers',
    'levers/conv_forms.json': 'conv_forms',
    'levers/conv_forms_ynn.json': 'conv_forms',
    'profile/profile.json': 'profile',
    'profile/profile_strided_xla.json': 'profile',
    'profile/profile_xla_convs.json': 'profile',
    'profile/profile_ynn_convs.json': 'profile',
}
FOLDERS = {'peer': 'peer', 'sparse_speed': 'sparse_speed',
           'sparse_step': 'sparse_step', 'levers': 'levers',
           'conv_forms': 'conv_forms', 'profile': 'profile'}
PLOTS = {'sparse_speed': 'sparse_speedup.png'}
# Markdown kept beside a later run of its benchmark: (the Markdown, the
# name it had when its JSON was written, that JSON, kind). The JSON is read
# from the commit whose Markdown under the old name is this one.
RECOVERED = (('sparse/sparse_step_first_7_repeats.md', 'sparse/sparse_step.md',
              'sparse/sparse_step.json', 'sparse_step'),)
GRID_RUN_FOLDERS = ('runs', 'sparse/final_code_accuracy')

GIT_COMMIT_SOURCE = ('git log: the commit that added this version of the '
                     'file (the code measured is its tree, as far as it did '
                     'not change between the measurement and the commit)')
GIT_DATE_SOURCE = ('git log: the date of the commit that added this version '
                   'of the file (the measurement was earlier); the file has '
                   'no date')


# --------------------------------------------------------------------- git


def _git(*args: str, binary: bool = False) -> str | bytes | None:
  try:
    out = subprocess.run(['git', *args], cwd=REPO, capture_output=True,
                         check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return out if binary else out.decode()


def history(path: str) -> list[tuple[str, str, str]]:
  """(commit, committer date, the file's path then) of every commit that
  changed `path`, newest first, following renames."""
  out = _git('log', '--follow', '--format=%x00%H %cI', '--name-only', '--',
             os.path.relpath(path, REPO))
  entries = []
  for block in (out or '').split('\0')[1:]:
    lines = [l for l in block.splitlines() if l.strip()]
    if len(lines) < 2:
      continue
    commit, date = lines[0].split()
    entries.append((commit, date, lines[-1]))
  return entries


def added(path: str, content: bytes | None = None
          ) -> tuple[str, str] | None:
  """(commit, date) of the commit that added this version of `path` (the
  oldest since which it is unchanged; `content`: compare with that instead
  of the file), or None where git does not have it (untracked, changed
  since, no git)."""
  if content is None:
    with open(path, 'rb') as f:
      content = f.read()
  found = None
  for commit, date, then in history(path):
    if _git('show', f'{commit}:{then}', binary=True) != content:
      break
    found = (commit, date)
  return found


def _utc(date: str) -> str:
  """A git date ('2026-12-03T20:24:58+00:00') as a record's ('...Z')."""
  return datetime.datetime.fromisoformat(date).astimezone(
      datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


# ------------------------------------------------------------------ header


def _machine(text: str | None) -> tuple[str | None, int | None]:
  """('AMD EPYC', 2) from 'AMD EPYC, 2 cores'; (text, None) without cores."""
  if not text:
    return None, None
  match = re.fullmatch(r'(.*), (\d+) cores', text)
  return (match.group(1), int(match.group(2))) if match else (text, None)


def file_date(text: str | None) -> tuple[str | None, str | None]:
  """A date as an old file wrote it, as a record's date, and a note on its
  time zone: '2026-12-04 16:29 UTC' -> '2026-12-04T16:29Z';
  '2026-12-05T08:34:29' (the machine's local time) stays so."""
  if not text:
    return None, None
  match = re.fullmatch(r'(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}(?::\d{2})?)'
                       r' UTC', text)
  if match:
    return f'{match.group(1)}T{match.group(2)}Z', None
  if re.fullmatch(r'\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?', text):
    return text, ('date: the machine\'s local time as the file wrote it; '
                  'its time zone was not recorded')
  if re.fullmatch(r'\d{4}-\d{2}-\d{2}', text):
    return text, 'date: the file recorded the day only (UTC)'
  raise ValueError(f'Unexpected date {text!r}.')


def converted_header(kind: str, fields: dict[str, Any], source: str,
                     sources: dict[str, str], notes: list[str],
                     git: tuple[str, str] | None) -> dict[str, Any]:
  """The header of a converted result: `fields` (what the file says),
  completed from git; every other header field None and named under
  'unknown'."""
  sources = dict(sources)
  notes = list(notes)
  head = {field: None for field in records.HEADER_FIELDS}
  head.update(fields)
  head['kind'] = kind
  if git is not None:
    head['git_commit'] = git[0]
    sources['git_commit'] = GIT_COMMIT_SOURCE
    if head.get('date') is None:
      head['date'] = _utc(git[1])
      sources['date'] = GIT_DATE_SOURCE
  else:
    notes.append('git has no commit with this version of the file')
  head['git_dirty'] = None   # whether the tree was committed: not recorded
  if head.get('cpu_model') and head.get('cores'):
    head['machine'] = f'{head["cpu_model"]}, {head["cores"]} cores'
  head['unknown'] = [f for f in records.HEADER_FIELDS if head[f] is None]
  head['converted'] = {'from': source, 'by': BY, 'sources': sources,
                       'notes': notes}
  return head


# ------------------------------------------------------- benchmark formats


def _peer(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  del markdown
  cpu, cores = _machine(data.pop('machine'))
  cores = data.pop('cores', cores)
  date, zone = file_date(data.pop('date'))
  threads = data.get('threads', '')
  count = re.search(r'cdg_jax: (\d+) CPU device', threads)
  flags = re.search(r"XLA_FLAGS=(['\"])(.*?)\1\)", threads)
  fields = {'date': date, 'command': data.pop('command'), 'cpu_model': cpu,
            'cores': cores, 'versions': data.pop('versions'),
            'devices': ({'platform': 'cpu', 'count': int(count.group(1)),
                         'processes': 1} if count else None),
            'xla_flags': flags.group(2) if flags else None}
  sources = {'date': "the file's 'date'", 'command': "the file's 'command'",
             'cpu_model': "the file's 'machine'", 'cores': "the file's "
             "'cores'", 'versions': "the file's 'versions' (python: the "
             "parent process's; the rest: the cdg_jax worker's)",
             'devices': "the file's 'threads' (the cdg_jax worker "
             "processes')", 'xla_flags': "the file's 'threads' (the cdg_jax "
             "worker processes')"}
  return fields, data, sources, [zone] if zone else []


def _sparse_speed(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  del markdown
  environment = data.pop('environment')
  cpu, cores = _machine(environment.get('machine'))
  date, zone = file_date(environment.get('date'))
  fields = {'date': date, 'command': data.pop('command'), 'cpu_model': cpu,
            'cores': cores, 'versions': {'jax': environment.get('jax')},
            'devices': {'platform': 'cpu', 'count': 1,
                        'available': environment.get('devices')}}
  sources = {'date': "the file's 'environment.date'",
             'command': "the file's 'command'",
             'cpu_model': "the file's 'environment.machine'",
             'cores': "the file's 'environment.machine'",
             'versions': "the file's 'environment.jax'",
             'devices': "'available': the file's 'environment.devices'; "
                        "'count': benchmark_sparse.py times its forward "
                        "passes unsharded (jax.jit on one device's arrays)"}
  notes = ['versions: only jax was recorded', 'xla_flags: not recorded '
           '(configure_cpu set one CPU device per core)']
  return fields, data, sources, notes + ([zone] if zone else [])


def _sparse_step(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  del markdown
  cpu, cores = _machine(data.pop('machine'))
  fields = {'cpu_model': cpu, 'cores': cores,
            'devices': {'platform': 'cpu', 'count': 1}}
  sources = {'cpu_model': "the file's 'machine'",
             'cores': "the file's 'machine'",
             'devices': 'benchmark_sparse_step.py jits the step without '
                        'shardings: one device'}
  notes = ['command, versions, XLA flags and the date were not recorded '
           '(the flags are in the figures)']
  return fields, data, sources, notes


def _levers(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  del markdown
  cpu, cores = _machine(data.pop('machine'))
  date, zone = file_date(data.pop('date'))
  # The header the benchmark writes now, from the same per-lever results.
  devices, default_flags = benchmark_levers.devices_and_flags(data['runs'])
  fields = {'date': date, 'command': data.pop('command'), 'cpu_model': cpu,
            'cores': cores, 'versions': {'jax': data.pop('jax')},
            'devices': devices,
            'xla_flags': default_flags}
  sources = {'date': "the file's 'date'", 'command': "the file's 'command'",
             'cpu_model': "the file's 'machine'",
             'cores': "the file's 'machine'", 'versions': "the file's 'jax'",
             'devices': "the processes' 'devices' in the file's 'runs' "
                        "(count: the 'default' lever's)",
             'xla_flags': "the 'default' lever's processes' 'xla_flags' in "
                          "the file's 'runs'"}
  return fields, data, sources, ['versions: only jax was recorded'] + (
      [zone] if zone else [])


def _conv_forms(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  date, zone = file_date(data.pop('date'))
  flags = re.search(r'command: `XLA_FLAGS=(\S+) python', markdown)
  fields = {'date': date, 'command': data.pop('command'),
            'cpu_model': data.pop('machine'), 'cores': data.pop('cores'),
            'versions': {'jax': data.pop('jax')},
            'devices': {'platform': 'cpu', 'count': data.pop('devices'),
                        'processes': 1},
            'xla_flags': flags.group(1) if flags else None}
  sources = {'date': "the file's 'date'", 'command': "the file's 'command'",
             'cpu_model': "the file's 'machine'",
             'cores': "the file's 'cores'", 'versions': "the file's 'jax'",
             'devices': "the file's 'devices' (the batch sharded over "
                        "them)"}
  notes = ['versions: only jax was recorded']
  if flags:
    sources['xla_flags'] = ('the Markdown beside the file (the user\'s '
                            'XLA_FLAGS; configure_cpu added the device '
                            'count)')
  return fields, data, sources, notes + ([zone] if zone else [])


def _profile(data: dict, markdown: str) -> tuple[dict, dict, dict, list]:
  del markdown
  date, zone = file_date(data.pop('date'))
  counts = {name: step.get('devices') for name, step in data['steps'].items()}
  values = set(counts.values()) - {None}
  devices = None
  if values:
    devices = {'platform': 'cpu', 'count': max(values), 'processes': 1}
    if len(values) > 1:
      devices['by_step'] = counts
  fields = {'date': date, 'command': data.pop('command'),
            'cpu_model': data.pop('machine'), 'cores': data.pop('cores'),
            'versions': data.pop('versions'), 'devices': devices}
  sources = {'date': "the file's 'date'", 'command': "the file's 'command'",
             'cpu_model': "the file's 'machine'",
             'cores': "the file's 'cores'",
             'versions': "the file's 'versions'",
             'devices': "the devices of the steps' traces (the file's "
                        "'steps.*.devices')"}
  notes = ['xla_flags: not recorded']
  return fields, data, sources, notes + ([zone] if zone else [])


FORMATS = {'peer': _peer, 'sparse_speed': _sparse_speed,
           'sparse_step': _sparse_step, 'levers': _levers,
           'conv_forms': _conv_forms, 'profile': _profile}


# ------------------------------------------------------------- conversion


def _rel(path: str, results_dir: str) -> str:
  return os.path.relpath(path, results_dir)


def _repo_rel(path: str) -> str:
  return os.path.relpath(os.path.abspath(path), REPO)


def convert_grid_run(path: str, dry_run: bool = False
                     ) -> dict[str, Any] | None:
  """Adds the header to a grid run's result in place; returns the result,
  or None if it has a header already."""
  with open(path) as f:
    data = json.load(f)
  if 'record' in data:
    return None
  git = added(path)
  date, zone = file_date(data.pop('finished', None))
  cpu = data.pop('cpu', None)
  fields = {'date': date, 'cpu_model': cpu}
  sources = {'date': "the file's 'finished'"}
  if cpu:
    sources['cpu_model'] = "the file's 'cpu'"
  notes = ['command: the grid\'s command line was not recorded (the run\'s '
           'own are train_command and linear_eval_command)',
           'cores, devices, XLA flags and versions were not recorded']
  head = converted_header('grid_run', fields, _repo_rel(path), sources,
                          notes + ([zone] if zone else []), git)
  result = {'record': head, **data}
  if not dry_run:
    with open(path + '.tmp', 'w') as f:
      json.dump(result, f, indent=2)
    os.replace(path + '.tmp', path)
  return result


def convert_benchmark(path: str, kind: str, out: str,
                      content: bytes | None = None,
                      markdown_file: str | None = None,
                      git: tuple[str, str] | None = None,
                      source: str | None = None,
                      dry_run: bool = False) -> dict[str, str] | None:
  """Converts one old benchmark result (`path`, or its JSON `content` and
  the commit `git` that had it) into a record in `out`, renaming its
  Markdown (default: beside it) and plot; returns {old: new} of the files,
  or None if `path` is a record already."""
  if content is None:
    with open(path, 'rb') as f:
      content = f.read()
  data = json.loads(content)
  if 'record' in data:
    return None
  source = source or _repo_rel(path)
  done = converted_from(out, source)
  if done is not None:   # converted before; its Markdown may be left
    raise ValueError(f'{source} was converted to {done} already; its '
                     f'other files are still there: move them by hand.')
  if git is None:
    git = added(path, content)
  markdown_file = markdown_file or path[:-len('.json')] + '.md'
  markdown = ''
  if os.path.exists(markdown_file):
    with open(markdown_file) as f:
      markdown = f.read()
  fields, figures, sources, notes = FORMATS[kind](data, markdown)
  head = converted_header(kind, fields, source, sources, notes, git)
  if head['date'] is None:
    raise ValueError(f'{path}: no date in the file and none in git: cannot '
                     f'name its record.')
  new = records.record_path(out, head)
  moves = {path if os.path.exists(path) else f'({head["converted"]["from"]})':
           new}
  record = {'record': head, **figures}
  if os.path.exists(markdown_file):
    moves[markdown_file] = records.markdown_path(new)
  plot = PLOTS.get(kind)
  if plot and os.path.exists(os.path.join(os.path.dirname(path), plot)):
    moves[os.path.join(os.path.dirname(path), plot)] = records.beside(
        new, '.png')
  if dry_run:
    return moves
  os.makedirs(out, exist_ok=True)
  with open(new, 'x') as f:
    # The old file's indentation: git sees a rename with a header added.
    json.dump(record, f, indent=_indent(content))
    f.write('\n')
  if os.path.exists(path):
    os.remove(path)
  for old, target in moves.items():
    if old == path or not os.path.exists(old):
      continue   # the JSON (written above), or its source in git
    os.rename(old, target)
    if target.endswith('.md'):
      with open(target) as f:
        text = f.read()
      with open(target, 'w') as f:
        f.write(f'<!-- the record: {os.path.basename(new)} ({BY} renamed '
                f'this page from {_repo_rel(old)}) -->\n' + text)
  return moves


def _indent(content: bytes) -> int:
  """The indentation of a JSON file's text (1 if it has none)."""
  match = re.search(rb'\n( +)\S', content)
  return len(match.group(1)) if match else 1


def converted_from(out: str, source: str) -> str | None:
  """The record in `out` converted from `source`, if any."""
  for path in records.records_in(out):
    with open(path) as f:
      head = json.load(f).get('record') or {}
    if (head.get('converted') or {}).get('from') == source:
      return path
  return None


def recover(markdown_file: str, old_markdown: str, old_json: str, kind: str,
            out: str, results_dir: str, dry_run: bool = False
            ) -> dict[str, str] | None:
  """The record of a Markdown whose JSON was overwritten: the JSON from the
  commit in which `old_markdown` was this Markdown."""
  with open(markdown_file, 'rb') as f:
    text = f.read()
  old_markdown = os.path.join(results_dir, old_markdown)
  old_json = os.path.join(results_dir, old_json)
  for commit, date, then in history(old_markdown):
    if _git('show', f'{commit}:{then}', binary=True) != text:
      continue
    json_then = os.path.join(os.path.dirname(then),
                             os.path.basename(old_json))
    content = _git('show', f'{commit}:{json_then}', binary=True)
    if content is None:
      continue
    git = (commit, date)   # the oldest commit with this JSON:
    for older, older_date, path_then in history(old_json):
      if _git('show', f'{older}:{path_then}', binary=True) == content:
        git = (older, older_date)
    source = (f'{_repo_rel(markdown_file)}; its JSON from git '
              f'{commit[:12]}:{json_then}')
    return convert_benchmark(markdown_file[:-len('.md')] + '.json', kind,
                             out, content=content,
                             markdown_file=markdown_file, git=git,
                             source=source, dry_run=dry_run)
  raise ValueError(f'{markdown_file}: no commit has it as {old_markdown}.')


def convert_all(results_dir: str = DEFAULT_RESULTS, dry_run: bool = False
                ) -> dict[str, str]:
  """Converts every old result under `results_dir`; returns {old: new}
  (grid runs: the same path)."""
  moves = {}
  for folder in GRID_RUN_FOLDERS:
    folder = os.path.join(results_dir, folder)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if name.endswith('.json') and os.path.isfile(path):
        if convert_grid_run(path, dry_run) is not None:
          moves[path] = path
  for old, kind in BENCHMARKS.items():
    path = os.path.join(results_dir, old)
    if os.path.exists(path):
      moves.update(convert_benchmark(
          path, kind, os.path.join(results_dir, FOLDERS[kind]),
          dry_run=dry_run) or {})
  for markdown_file, old_markdown, old_json, kind in RECOVERED:
    markdown_file = os.path.join(results_dir, markdown_file)
    if os.path.exists(markdown_file):
      moves.update(recover(markdown_file, old_markdown, old_json, kind,
                           os.path.join(results_dir, FOLDERS[kind]),
                           results_dir, dry_run) or {})
  if not dry_run:   # folders the renames emptied
    for old in list(BENCHMARKS) + [m for m, *_ in RECOVERED]:
      folder = os.path.dirname(os.path.join(results_dir, old))
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
  return moves


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--results_dir', default=DEFAULT_RESULTS)
  parser.add_argument('--dry_run', action='store_true',
                      help='Print the mapping; change nothing.')
  args = parser.parse_args(argv)
  moves = convert_all(args.results_dir, args.dry_run)
  for old, new in moves.items():
    shown_old = (old if old.startswith('(') else
                 os.path.relpath(old, args.results_dir))
    if old == new:
      print(f'{shown_old}: header added in place')
    else:
      print(f'{shown_old} -> {os.path.relpath(new, args.results_dir)}')
  print(f'{len(moves)} files' + (' would change' if args.dry_run else
                                 ' changed'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
