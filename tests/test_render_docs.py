"""Rendered tables: the docs on main match their records, and a hand-edited
figure, a missing closing marker or an unknown table is caught."""

import json
import os
import re
import shutil

import pytest

from experiments.common import records
from experiments.grids import bench_tables
from experiments.grids import render_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_rendered_table_matches_its_records(capsys):
  assert render_docs.main(['--check']) == 0, capsys.readouterr().out
  # Each doc that has tables has them as blocks with their sources named.
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for name in ('headline', 'width_gaps', 'peer'):
    assert f'<!-- table:{name} -->' in readme
  # The peer table names the dated record it comes from.
  assert re.search(r'`experiments/results/peer/`: '
                   r'\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-\w+\.json', readme)


def test_a_hand_edited_figure_fails_the_check_and_rendering_restores_it(
    tmp_path, capsys):
  path = str(tmp_path / 'README.md')
  shutil.copy(os.path.join(ROOT, 'README.md'), path)
  with open(path) as f:
    text = f.read()
  original = text
  # The dense row's seed-0 kNN of the headline table, edited by hand.
  assert '| dense | 41.91 |' in text
  with open(path, 'w') as f:
    f.write(text.replace('| dense | 41.91 |', '| dense | 42.91 |', 1))
  assert render_docs.main(['--check', path]) == 1
  out = capsys.readouterr().out
  assert "table 'headline', line 3" in out
  assert '| dense | 42.91 |' in out and '| dense | 41.91 |' in out
  # Rendering writes the records' figure back; prose is untouched.
  assert render_docs.main([path]) == 0
  with open(path) as f:
    assert f.read() == original


def test_broken_markers_are_named(tmp_path):
  path = str(tmp_path / 'doc.md')
  with open(path, 'w') as f:
    f.write('text\n<!-- table:headline -->\n| a |\n')
  with pytest.raises(ValueError, match='no closing <!-- /table:headline -->'):
    render_docs.main(['--check', path])
  with open(path, 'w') as f:
    f.write('<!-- table:no_such_table -->\n<!-- /table:no_such_table -->\n')
  with pytest.raises(KeyError, match="no_such_table.*known: .*headline"):
    render_docs.main(['--check', path])


def test_every_doc_names_its_tables_records(capsys):
  """Each table block of experiments/README.md and docs/sparse.md ends with
  the records it was rendered from."""
  for doc, names in (('experiments/README.md', ('seeds', 'width', 'peer_steps',
                                                 'knn_vs_linear', 'selection')),
                     ('docs/sparse.md', ('sparse_step', 'peer_devices',
                                         'tiles32_sparse'))):
    with open(os.path.join(ROOT, doc)) as f:
      text = f.read()
    for name in names:
      block = text.split(f'<!-- table:{name} -->')[1].split(
          f'<!-- /table:{name} -->')[0]
      assert 'Rendered by `python -m experiments.grids.render_docs` from' in block
  assert '`experiments/results/sparse_step/`: 2026-12-03T20-24-58-xeon.json' \
      in open(os.path.join(ROOT, 'docs/sparse.md')).read()


def _levers_record(path, protocol_s, dense_s):
  header = {field: None for field in records.HEADER_FIELDS}
  header.update(kind='levers', unknown=[])
  summary = {step: {lever: {'median_step_s': seconds[i],
                            'minor_faults_per_step': 1000.0 * (i + 1)}
                    for i, lever in enumerate(('default', 'hugetlb'))}
             for step, seconds in (('protocol', protocol_s),
                                   ('dense64', dense_s))}
  with open(path, 'w') as f:
    json.dump({'record': header, 'summary': summary}, f)


def test_a_benchmark_table_reads_its_record(tmp_path):
  path = str(tmp_path / '2026-12-05T08-16-epyc.json')
  _levers_record(path, (0.5321, 0.4204), (6.3951, 6.4582))
  render = bench_tables.levers_table(
      path, (('default', 'default'), ('huge pages', 'hugetlb')),
      (('CPU protocol', 'protocol'), ('dense, width 64', 'dense64')))
  rendered = render()
  assert rendered.lines == [
      '| step | default | huge pages |', '| --- | --- | --- |',
      '| CPU protocol | 0.532 s, 1,000 faults | 0.420 s, 2,000 faults |',
      '| dense, width 64 | 6.395 s, 1,000 faults | 6.458 s, 2,000 faults |']
  assert rendered.sources == [path]
  # A changed figure in the record changes the table.
  _levers_record(path, (0.6321, 0.4204), (6.3951, 6.4582))
  assert '| CPU protocol | 0.632 s, 1,000 faults | 0.420 s, 2,000 faults |' in (
      render().lines)


def test_the_paper_input_table_gaps_each_run_to_the_dense_run_of_its_input(
    tmp_path, monkeypatch):
  from experiments.grids import doc_tables  # pylint: disable=g-import-not-at-top
  runs = tmp_path / 'runs'
  runs.mkdir()

  def write(name, knn, linear, flops, wall_s, resumed=0, cpu='Intel Xeon'):
    (runs / f'{name}.json').write_text(json.dumps({
        'name': name, 'knn_top1': knn, 'linear_top1': linear,
        'flops_reduction': flops, 'train_wall_s': wall_s, 'steps': 388,
        'resumed_from_step': resumed, 'cpu': cpu,
        'finished': '2026-12-08 01:00:00 UTC'}))

  write('simclr_c10_dense_w64', 0.45, 0.50, 1.0, 3600)
  write('simclr_c10_cdg_w64', 0.43, 0.4951, 2.12, 1800, cpu='AMD EPYC')
  write('simclr_c10_dense_w64_32px', 0.48, 0.52, 1.0, 1200, resumed=300)
  monkeypatch.setattr(doc_tables, 'RESULTS', str(tmp_path))
  rendered = doc_tables.paper_input_table()
  assert rendered.lines[2:] == [
      '| dense | 16x16 | 45.00 | 50.00 | - | 1.00x | 60 min | Intel Xeon, '
      '2026-12-08 01:00:00 UTC |',
      '| CDG | 16x16 | 43.00 | 49.51 | -2.00 / -0.49 | 2.12x | 30 min | '
      'AMD EPYC, 2026-12-08 01:00:00 UTC |',
      '| dense | 32x32 | 48.00 | 52.00 | - | 1.00x | 20 min (steps 300-388 '
      'only: resumed) | Intel Xeon, 2026-12-08 01:00:00 UTC |',
      '| CDG | 32x32 | no result yet (`simclr_c10_cdg_w64_32px`) | - | - | - | '
      '- | - |']
  assert [os.path.basename(s) for s in rendered.sources] == [
      'simclr_c10_dense_w64.json', 'simclr_c10_cdg_w64.json',
      'simclr_c10_dense_w64_32px.json']
  # The 32x32 CDG run, once there, is gapped to the 32x32 dense run.
  write('simclr_c10_cdg_w64_32px', 0.47, 0.515, 2.2, 2400)
  assert doc_tables.paper_input_table().lines[-1].startswith(
      '| CDG | 32x32 | 47.00 | 51.50 | -1.00 / -0.50 | 2.20x | 40 min |')
