"""The README's "Gate your own Flax network" code runs as written."""

import os
import re

import numpy as np

import cdg_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  section = text.split('## Gate your own Flax network', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_snippet_trains_a_gated_network_and_reports_its_flops(capsys):
  namespace = {}
  exec(compile(readme_snippet(), 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  report, grads = namespace['report'], namespace['grads']
  # Two gated layers, densities measured, a reduction above 1.
  gated = [r for r in report.rows if r.density is not None]
  assert [r.name for r in gated] == ['GatedConv_0', 'GatedConv_1']
  assert report.reduction > 1.0
  # The regulariser's gradient reaches the thresholds.
  assert np.abs(grads['GatedConv_0']['threshold']).max() > 0
  assert 'reduction' in capsys.readouterr().out


def test_public_names_resolve_and_are_listed():
  for name in cdg_jax.__all__:
    assert getattr(cdg_jax, name) is not None, name
  assert 'GatedConv' in dir(cdg_jax)
  try:
    cdg_jax.not_a_name  # pylint: disable=pointless-statement
  except AttributeError as e:
    assert 'not_a_name' in str(e)
  else:
    raise AssertionError('an unknown name resolved')
