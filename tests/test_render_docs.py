"""Rendered tables: the docs on main match their records, and a hand-edited
figure, a missing closing marker or an unknown table is caught."""

import os
import shutil

import pytest

from experiments.grids import render_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_rendered_table_matches_its_records(capsys):
  assert render_docs.main(['--check']) == 0, capsys.readouterr().out
  # Each doc that has tables has them as blocks with their sources named.
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for name in ('headline', 'width_gaps', 'peer'):
    assert f'<!-- table:{name} -->' in readme
  assert '`experiments/results/peer/`: 2026-12-05T08-34-29-epyc.json' in readme


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
  with pytest.raises(KeyError, match="no_such_table.*known: headline"):
    render_docs.main(['--check', path])
