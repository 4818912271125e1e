"""experiments/common/records.py, the one result record, and
experiments/maintenance/convert_results.py."""

import datetime
import glob
import json
import os

import pytest

from experiments.common import records
from experiments.maintenance import convert_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOW = datetime.datetime(2026, 12, 5, 8, 34, 29, tzinfo=datetime.timezone.utc)


def _render(record):
  return f'# {record["record"]["kind"]}: {record["speed"]}\n'


def test_the_writer_never_overwrites(tmp_path):
  # Two records of the same second, and a third whose name a Markdown
  # alone already takes: three files, none overwritten.
  first = records.write_record(str(tmp_path), 'demo', {'speed': 1.0},
                               render=_render, now=NOW)
  second = records.write_record(str(tmp_path), 'demo', {'speed': 2.0},
                                render=_render, now=NOW)
  tag = records.cpu_tag(records.cpu_model())
  assert os.path.basename(first) == f'2026-12-05T08-34-29-{tag}.json'
  assert os.path.basename(second) == f'2026-12-05T08-34-29-{tag}.2.json'
  (tmp_path / f'2026-12-05T08-34-29-{tag}.3.md').write_text('by hand\n')
  third = records.write_record(str(tmp_path), 'demo', {'speed': 3.0},
                               render=_render, now=NOW)
  assert os.path.basename(third) == f'2026-12-05T08-34-29-{tag}.4.json'
  assert [records.read_record(p)['speed'] for p in (first, second, third)
          ] == [1.0, 2.0, 3.0]
  assert open(records.markdown_path(second)).read() == (
      f'<!-- rendered from {os.path.basename(second)} -->\n# demo: 2.0\n')
  assert (tmp_path / f'2026-12-05T08-34-29-{tag}.3.md').read_text() == (
      'by hand\n')
  # Names sort by time, then by their number (.10 after .2).
  assert records.records_in(str(tmp_path)) == [first, second, third]


def test_a_failing_render_leaves_no_file(tmp_path):
  def broken(record):
    raise KeyError('flags')
  with pytest.raises(KeyError):
    records.write_record(str(tmp_path), 'demo', {}, render=broken)
  assert not os.listdir(tmp_path)


def test_the_header_has_every_field(tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  path = records.write_record(
      str(tmp_path), 'demo', {'speed': 1.0, 'record': 'replaced'},
      argv=[os.path.join(ROOT, 'experiments', 'benchmarks', 'demo.py'),
            '--width=8'],
      devices={'platform': 'cpu', 'count': 2, 'processes': 1})
  record = records.read_record(path)
  head = record['record']
  assert set(head) == set(records.HEADER_FIELDS) | {'unknown'}
  assert head['kind'] == 'demo'
  assert datetime.datetime.strptime(head['date'], '%Y-%m-%dT%H:%M:%SZ')
  assert head['command'] == 'python -m experiments.benchmarks.demo --width=8'
  assert len(head['git_commit']) == 40   # the tests run in a checkout
  assert isinstance(head['git_dirty'], bool)
  assert head['cores'] == os.cpu_count()
  assert head['machine'] == f'{head["cpu_model"]}, {os.cpu_count()} cores'
  assert head['devices'] == {'platform': 'cpu', 'count': 2, 'processes': 1}
  assert head['xla_flags'] == '--xla_force_host_platform_device_count=2'
  assert head['versions']['python'] and head['versions']['jax']
  assert head['unknown'] == [f for f in records.HEADER_FIELDS
                             if head[f] is None]
  assert record['speed'] == 1.0 and list(record)[0] == 'record'
  assert records.header_lines(record)[0].startswith(
      f'- machine: {head["machine"]}; devices: 2 cpu')


def test_the_command_is_the_one_a_user_types_from_the_root():
  # `python -m experiments.grids.run_grid --grid=smoke` has the module's
  # file as argv[0]: recorded as the module it ran.
  run_grid = os.path.join(ROOT, 'experiments', 'grids', 'run_grid.py')
  assert records.command_line([run_grid, '--grid=smoke', '--only=a b']) == (
      "python -m experiments.grids.run_grid --grid=smoke '--only=a b'")
  assert records.command_line(
      [os.path.join(ROOT, 'experiments', 'common', 'records.py')]) == (
          'python -m experiments.common.records')
  # A file of the checkout outside a package, by its path from the root;
  # one outside the checkout and `python -c` as they are.
  assert records.command_line(
      [os.path.join(ROOT, 'configs', 'x.py'), '--a=1']) == (
          'python configs/x.py --a=1')
  assert records.command_line(['/elsewhere/x.py', '--a=1']) == (
      'python /elsewhere/x.py --a=1')
  assert records.command_line(['-c', '--a=1']) == 'python -c --a=1'


def test_without_git_or_cpu_model_the_header_says_so(tmp_path, monkeypatch):
  # A lent accelerator machine runs a copy of the working tree: no git,
  # and /proc/cpuinfo may name no model.
  monkeypatch.setattr(records, '_git', lambda *args: None)
  monkeypatch.setattr(records, 'cpu_model', lambda: None)
  head = records.header('demo', argv=['x.py'], now=NOW,
                        devices={'platform': 'gpu', 'count': 1,
                                 'kind': 'NVIDIA H100 80GB HBM3'})
  assert head['git_commit'] is None and head['git_dirty'] is None
  assert head['cpu_model'] is None and head['machine'] is None
  assert head['unknown'] == ['git_commit', 'git_dirty', 'machine',
                             'cpu_model']
  # Named by the accelerator it ran on.
  path = records.record_path(str(tmp_path), head)
  assert os.path.basename(path) == (
      '2026-12-05T08-34-29-nvidia-h100-80gb-hbm3.json')
  assert records.header_lines({'record': head})[-1] == (
      '- not recorded: git_commit, git_dirty, machine, cpu_model')


def test_read_record_names_a_file_that_is_not_a_record(tmp_path):
  cases = {'empty.json': '', 'old.json': '{"machine": "AMD EPYC"}',
           'list.json': '[1]',
           'short.json': json.dumps({'record': {'kind': 'demo'}})}
  for name, text in cases.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(ValueError, match=r'empty\.json: not a readable'):
    records.read_record(str(tmp_path / 'empty.json'))
  with pytest.raises(ValueError, match=r'old\.json: not a result record .*'
                     r'python -m experiments\.maintenance\.convert_results'):
    records.read_record(str(tmp_path / 'old.json'))
  with pytest.raises(ValueError, match=r'list\.json: not a result record'):
    records.read_record(str(tmp_path / 'list.json'))
  with pytest.raises(ValueError, match=r'short\.json: its header lacks date, '
                     r'command'):
    records.read_record(str(tmp_path / 'short.json'))
  with pytest.raises(ValueError, match='missing.json'):
    records.read_record(str(tmp_path / 'missing.json'))


def test_latest_record_picks_the_newest_by_name(tmp_path):
  def write(name, kind):
    head = dict(records.header(kind, argv=['x.py']), date='2026-01-01')
    (tmp_path / name).write_text(json.dumps({'record': head}))
  # Written in another order than their names' times; a day-only name
  # (a converted old result) sorts before the times of that day.
  write('2026-12-05T08-34-29-epyc.2.json', 'peer')
  write('2026-12-05T08-34-29-epyc.10.json', 'levers')
  write('2026-12-05T08-34-29-epyc.json', 'peer')
  write('2026-12-06-xeon.json', 'peer')
  write('2026-12-05-xeon.json', 'peer')
  write('2026-12-04T23-15-xeon.json', 'peer')
  (tmp_path / 'notes.json').write_text('{}')   # not a record's name
  (tmp_path / 'peer.md').write_text('')
  names = [os.path.basename(p) for p in records.records_in(str(tmp_path))]
  assert names == ['2026-12-04T23-15-xeon.json', '2026-12-05-xeon.json',
                   '2026-12-05T08-34-29-epyc.json',
                   '2026-12-05T08-34-29-epyc.2.json',
                   '2026-12-05T08-34-29-epyc.10.json', '2026-12-06-xeon.json']
  assert os.path.basename(records.latest_record(str(tmp_path))) == (
      '2026-12-06-xeon.json')
  assert os.path.basename(records.latest_record(str(tmp_path), 'levers')) == (
      '2026-12-05T08-34-29-epyc.10.json')
  assert records.latest_record(str(tmp_path), 'profile') is None
  assert records.latest_record(str(tmp_path / 'none')) is None


def test_a_converted_old_file_says_which_fields_are_unknown(tmp_path,
                                                           monkeypatch):
  # Outside the repository's history: git knows nothing of these files.
  monkeypatch.setattr(convert_results, 'history', lambda path: [])
  old = tmp_path / 'levers'
  old.mkdir()
  (old / 'conv_forms.json').write_text(json.dumps({
      'machine': 'Intel(R) Xeon(R) Processor', 'cores': 2, 'devices': 2,
      'jax': '0.10.2', 'command': 'python experiments/benchmark_conv_forms.py',
      'date': '2026-12-05T04:36:31', 'repeats': 3, 'formulations': ['xla'],
      'rows': []}, indent=1))
  (old / 'conv_forms.md').write_text('# conv forms\n')
  out = tmp_path / 'conv_forms'
  moves = convert_results.convert_benchmark(str(old / 'conv_forms.json'),
                                            'conv_forms', str(out))
  new = str(out / '2026-12-05T04-36-31-xeon.json')
  assert moves == {str(old / 'conv_forms.json'): new,
                   str(old / 'conv_forms.md'): records.markdown_path(new)}
  assert sorted(os.listdir(old)) == []
  record = records.read_record(new)
  head = record['record']
  # What the file said is in the header, and out of the figures.
  assert head['machine'] == 'Intel(R) Xeon(R) Processor, 2 cores'
  assert head['devices'] == {'platform': 'cpu', 'count': 2, 'processes': 1}
  assert head['versions'] == {'jax': '0.10.2'}
  assert head['date'] == '2026-12-05T04:36:31'
  assert {k: v for k, v in record.items() if k != 'record'} == {
      'repeats': 3, 'formulations': ['xla'], 'rows': []}
  # What neither the file nor git said is null and named.
  assert head['unknown'] == ['git_commit', 'git_dirty', 'xla_flags']
  assert head['git_commit'] is None and head['xla_flags'] is None
  assert head['converted']['from'].endswith('levers/conv_forms.json')
  assert 'git has no commit with this version of the file' in (
      head['converted']['notes'])
  assert open(records.markdown_path(new)).read().startswith(
      f'<!-- the record: {os.path.basename(new)}')

  # A grid run keeps its name; its header is added in place, once.
  runs = tmp_path / 'runs'
  runs.mkdir()
  run = runs / 'simclr_c10_cdg.json'
  run.write_text(json.dumps({'name': 'simclr_c10_cdg', 'knn_top1': 0.4,
                             'cpu': 'AMD EPYC',
                             'finished': '2026-11-25 18:22:21 UTC'},
                            indent=2))
  assert convert_results.convert_all(str(tmp_path)) == {str(run): str(run)}
  result = records.read_record(str(run))
  assert result['record']['date'] == '2026-11-25T18:22:21Z'
  assert result['record']['cpu_model'] == 'AMD EPYC'
  assert result['record']['unknown'] == [
      'command', 'git_commit', 'git_dirty', 'machine', 'cores', 'devices',
      'xla_flags', 'versions']
  assert 'finished' not in result and 'cpu' not in result
  text = run.read_text()
  assert convert_results.convert_all(str(tmp_path)) == {}   # idempotent
  assert run.read_text() == text


def test_every_result_file_in_the_repository_is_a_record():
  """Each JSON under experiments/results/ has the header, with every field
  (null where unknown, and then named in 'unknown')."""
  results = os.path.join(ROOT, 'experiments', 'results')
  paths = sorted(glob.glob(os.path.join(results, '**', '*.json'),
                           recursive=True))
  assert len(paths) > 100
  for path in paths:
    head = records.read_record(path)['record']
    missing = [f for f in records.HEADER_FIELDS if f not in head]
    assert not missing, (path, missing)
    assert sorted(head['unknown']) == sorted(
        f for f in records.HEADER_FIELDS if head[f] is None), path
