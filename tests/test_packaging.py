"""The installable package: the wheel in a fresh environment, and the layout.

The wheel tests build the project's wheel and install it into a new virtual
environment twice over: first alone (`pip install cdg_jax`: the gating
library, whose README code must run there, and commands that name the
missing extra), then with the `train` extra and without the TFDS one (so
without TensorFlow), where the three console commands run from a directory
outside the repository, with the config file addressed by its path, as a
user of `pip install "cdg_jax[train]"` would.
"""

import ast
import json
import os
import shutil
import sys

import pytest

import launch
import test_readme
from test_train import ROOT

PACKAGE = os.path.join(ROOT, 'cdg_jax')
# The experiments: a package of the checkout, not of the wheel.
EXPERIMENTS = os.path.join(ROOT, 'experiments')


def _modules(package=PACKAGE):
  """Every module of `package` (default cdg_jax), by dotted name -> its
  file."""
  found = {}
  for directory, _, files in os.walk(package):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path[:-3], ROOT).replace(os.sep, '.')
        found[dotted.removesuffix('.__init__')] = path
  return found


def _imports_of(module_path, modules):
  """The cdg_jax modules a module imports, at the top or inside functions."""
  with open(module_path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('cdg_jax')):
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('cdg_jax.')}
  return found


def _import_graph():
  modules = _modules()
  return {m: _imports_of(path, modules) - {m} for m, path in modules.items()}


def _reachable(graph, start):
  seen, stack = set(), [start]
  while stack:
    for nxt in graph.get(stack.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        stack.append(nxt)
  return seen


def test_no_module_imports_one_that_imports_it_back():
  graph = _import_graph()
  # A package's __init__ importing its own modules is not a cycle.
  circles = {m: sorted(d for d in graph[m] if m in _reachable(graph, d)
                       and not m.startswith(d + '.'))
             for m in graph if m in _reachable(graph, m)}
  assert {m: c for m, c in circles.items() if c} == {}
  assert {'cdg_jax.gating.predictors'} <= graph['cdg_jax.gating.layers']
  assert 'cdg_jax.gating.predictors' not in _reachable(graph,
                                                       'cdg_jax.gating.ops')


def test_the_gating_library_imports_nothing_of_the_program():
  graph = _import_graph()
  library = [m for m in graph if m.startswith('cdg_jax.gating')]
  outside = {m: sorted(d for d in _reachable(graph, m)
                       if not d.startswith('cdg_jax.gating'))
             for m in library}
  assert {m: d for m, d in outside.items() if d} == {}
  assert len(library) >= 9   # the package and its eight modules


TESTS = os.path.join(ROOT, 'tests')


def _test_module_imports(path):
  """(cdg_jax modules, the tests' own helper modules) a test file imports."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f'{node.module}.{a.name}' for a in node.names}
    elif isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
  package = {n for n in names if n == 'cdg_jax' or n.startswith('cdg_jax.')}
  helpers = {n for n in names
             if os.path.exists(os.path.join(TESTS, f'{n}.py'))
             or os.path.exists(os.path.join(TESTS, 'gating', f'{n}.py'))}
  return package, helpers


def test_the_library_tests_import_nothing_of_the_program():
  """tests/gating/ checks cdg_jax.gating alone: its files, and the test
  helpers they import, import the library and the package's public names
  only, so the library can be checked (or lifted out) without the program."""
  gating_tests = [os.path.join(TESTS, 'gating', name)
                  for name in sorted(os.listdir(os.path.join(TESTS, 'gating')))
                  if name.endswith('.py')]
  assert len(gating_tests) >= 7
  seen, stack, program = set(), list(gating_tests), {}
  while stack:
    path = stack.pop()
    if path in seen:
      continue
    seen.add(path)
    package, helpers = _test_module_imports(path)
    outside = sorted(m for m in package if m != 'cdg_jax'
                     and m != 'cdg_jax.gating'
                     and not m.startswith('cdg_jax.gating.'))
    if outside:
      program[os.path.relpath(path, ROOT)] = outside
    for helper in helpers:
      for folder in (TESTS, os.path.join(TESTS, 'gating')):
        if os.path.exists(os.path.join(folder, f'{helper}.py')):
          stack.append(os.path.join(folder, f'{helper}.py'))
  assert program == {}
  # The package's public names resolve lazily; the library's tests use the
  # library's own (create_resnet and configure_cpu are the program's).
  for path in gating_tests:
    with open(path) as f:
      text = f.read()
    assert 'cdg_jax.create_resnet' not in text, path
    assert 'cdg_jax.configure_cpu' not in text, path


def test_importing_the_gating_library_loads_no_training_stack():
  result = launch.run(
      [sys.executable, '-c', 'import sys, json, cdg_jax.gating; '
       'print(json.dumps(sorted(m for m in sys.modules)))'],
      cwd=ROOT, capture_output=True, text=True, check=True,
      env={**os.environ, 'PYTHONPATH': ROOT})
  loaded = set(json.loads(result.stdout))
  assert 'cdg_jax.gating.layers' in loaded and 'flax' in loaded
  heavy = sorted(m for m in loaded if m.split('.')[0] in (
      'optax', 'orbax', 'tensorflow', 'tensorflow_datasets', 'clu'))
  assert heavy == []
  program = sorted(m for m in loaded if m.startswith('cdg_jax.')
                   and not m.startswith('cdg_jax.gating'))
  assert program == []


# The program's layers, bottom-up: a module imports from its own layer and
# the ones below, never from above (the package's `cdg_jax/__init__.py`,
# which resolves its public names lazily, excepted). A module belongs to the
# layer of the longest prefix that names it.
PROGRAM_LAYERS = (
    ('cdg_jax.gating',),                          # the library
    ('cdg_jax.run.parallel',                      # devices and shardings
     'cdg_jax.run.storage',                       # local disk or gs:// paths
     'cdg_jax.data'),                             # sources, batches, views
    ('cdg_jax.ssl',                               # (its __init__: a docstring)
     'cdg_jax.ssl.losses', 'cdg_jax.ssl.models'),
    ('cdg_jax.ssl.optimizers', 'cdg_jax.ssl.frameworks'),
    ('cdg_jax.ssl.pretraining',),                 # the train step
    ('cdg_jax.evaluators',),                      # kNN, linear, FLOPs
    ('cdg_jax.run',),                             # config parse, checkpoints,
                                                  # logging, run control
    ('cdg_jax.train',),
    ('cdg_jax.main', 'cdg_jax.linear_eval', 'cdg_jax.flops_table'),
)


def _layer_of(module):
  matches = [(len(prefix), index)
             for index, layer in enumerate(PROGRAM_LAYERS) for prefix in layer
             if module == prefix or module.startswith(prefix + '.')]
  return max(matches)[1] if matches else None


def test_the_program_imports_downward_only():
  graph = _import_graph()
  unplaced = sorted(m for m in graph if m != 'cdg_jax' and _layer_of(m) is None)
  assert unplaced == []
  upward = {m: sorted(d for d in imports if _layer_of(d) > _layer_of(m))
            for m, imports in graph.items() if m != 'cdg_jax'}
  assert {m: d for m, d in upward.items() if d} == {}
  # What the layering rules out, as this issue found it: the linear
  # evaluator pulling in the train step for a helper, the step module
  # holding the frameworks and the optimisers.
  assert 'cdg_jax.ssl.pretraining' not in graph['cdg_jax.evaluators.linear']
  assert _layer_of('cdg_jax.ssl.pretraining') > _layer_of(
      'cdg_jax.ssl.frameworks')


MAX_FUNCTION_LINES = 80


def _function_lengths(module_path):
  """(function name, lines) of every function of a module, nested included."""
  with open(module_path) as f:
    tree = ast.parse(f.read())
  return [(node.name, node.end_lineno - node.lineno + 1)
          for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_cdg_jax_or_experiments_is_longer_than_80_lines():
  paths = [*_modules().values(), *_modules(EXPERIMENTS).values()]
  assert any(p.startswith(EXPERIMENTS + os.sep) for p in paths)
  too_long = sorted(
      (os.path.relpath(path, ROOT).replace(os.sep, '/'), name, lines)
      for path in paths
      for name, lines in _function_lengths(path)
      if lines > MAX_FUNCTION_LINES)
  assert too_long == []


def test_the_experiments_are_a_package_imported_without_path_edits():
  # Every folder of modules under experiments/ is a package (results/ holds
  # records only), and neither the experiments nor the tests edit
  # sys.path: `python -m experiments.grids.run_grid` from the root, and
  # `from experiments.grids import runner` in the tests.
  for directory, _, files in os.walk(EXPERIMENTS):
    if any(name.endswith('.py') for name in files):
      assert '__init__.py' in files, directory
  tests = os.path.dirname(os.path.abspath(__file__))
  sources = [*_modules(EXPERIMENTS).values(),
             *(os.path.join(tests, name) for name in os.listdir(tests)
               if name.endswith('.py'))]
  editing = []
  for path in sources:
    with open(path) as f:
      tree = ast.parse(f.read())
    editing += [f'{os.path.relpath(path, ROOT)}:{node.lineno}'
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr == 'path'
                and isinstance(node.value, ast.Name) and node.value.id == 'sys']
  assert editing == []


def test_the_wheel_finds_cdg_jax_only():
  # The wheel test below builds from a copy of cdg_jax/; this is what
  # setuptools' discovery, as pyproject.toml configures it, picks from the
  # checkout itself, where experiments/ is a package too.
  import setuptools  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    find = tomllib.load(f)['tool']['setuptools']['packages']['find']
  finder = (setuptools.find_namespace_packages if find.get('namespaces', True)
            else setuptools.find_packages)
  packages = finder(ROOT, include=find.get('include', ('*',)),
                    exclude=find.get('exclude', ()))
  assert 'cdg_jax.gating' in packages
  assert [p for p in packages if p.split('.')[0] != 'cdg_jax'] == []


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """A fresh virtual environment with the project's wheel and its `train`
  extra installed, and what its library-only install did before the extra
  was added."""
  root = tmp_path_factory.mktemp('wheel')
  # Built from a copy of what the wheel is made of, so that setuptools'
  # build/ and *.egg-info land there, not in the checkout.
  source = root / 'source'
  shutil.copytree(PACKAGE, source / 'cdg_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), source / name)
  wheels = root / 'dist'
  launch.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                  '--quiet', '-w', str(wheels), str(source)], check=True,
                 capture_output=True, text=True)
  [wheel] = [w for w in os.listdir(wheels) if w.endswith('.whl')]
  venv = root / 'venv'
  # The environment gets no pip of its own: this session's pip installs
  # into it (--python), resolving the wheel's own requirements as a user's
  # `pip install` does. Bootstrapping a pip there, and byte-compiling every
  # installed module (most of which no command imports; Python compiles
  # those it imports on first use), cost more than half the test's set-up.
  launch.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
             check=True)
  _pip_install(venv, str(wheels / wheel))
  # The library install, checked before the program's extra joins it: the
  # README's own-network code, what is (not) installed, a command's message.
  snippet = root / 'snippet.py'
  snippet.write_text(test_readme.readme_snippet())
  outside = root / 'elsewhere'
  outside.mkdir()
  library = {
      'snippet': _command(venv, 'python', str(snippet), cwd=outside),
      'modules': launch.run(
          [str(venv / 'bin' / 'python'), '-c',
           'import importlib.util as u, json; print(json.dumps({m: u.find_spec'
           f'(m) is not None for m in {sorted(PROGRAM_MODULES)!r}}}))'],
          cwd=outside, capture_output=True, text=True, check=True),
      'train': _command(venv, 'cdg-train', '--help', cwd=outside),
  }
  _pip_install(venv, f'{wheels / wheel}[train]')
  return venv, library


def _pip_install(venv, requirement):
  """This session's pip installing `requirement` into `venv`."""
  result = launch.run(
      [sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'),
       'install', '--quiet', '--no-compile', requirement],
      capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _command(venv, name, *args, cwd):
  # A clean environment: nothing from the repository or this test session
  # (no PYTHONPATH, no forced host devices: each command splits the host
  # itself). Only the flags for compile time are kept, as every test
  # compiles (conftest.py): they change rounding, not what the commands do.
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['XLA_FLAGS'] = ('--xla_backend_optimization_level=0 '
                      '--xla_cpu_use_fusion_emitters=false')
  env['PATH'] = f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}'
  return launch.run([str(venv / 'bin' / name), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


# What the program imports beyond the library (its `train` extra), as
# importable names; flax itself brings optax, orbax and absl.
PROGRAM_MODULES = ('ml_collections', 'clu', 'tensorboardX', 'dm_pix',
                   'matplotlib', 'tqdm')


def test_the_library_install_runs_the_readme_code_and_names_the_extra(
    installed):
  _, library = installed
  snippet = library['snippet']
  assert snippet.returncode == 0, snippet.stderr[-3000:]
  assert 'reduction' in snippet.stdout
  # `pip install cdg_jax` brought none of the program's own dependencies.
  found = json.loads(library['modules'].stdout)
  assert found == {m: False for m in PROGRAM_MODULES}
  # A command of the program says what to install, in one line.
  train = library['train']
  assert train.returncode == 1
  last = train.stderr.strip().splitlines()
  assert len(last) == 1 and last[0].startswith('FATAL: cdg-train'), last
  assert 'pip install "cdg_jax[train]"' in last[0]
  for distribution in ('ml-collections', 'clu', 'dm-pix', 'tensorboardX'):
    assert distribution in last[0]


def test_the_wheel_runs_the_commands_without_tensorflow(installed, tmp_path):
  installed, _ = installed
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  python = str(installed / 'bin' / 'python')
  probe = launch.run(
      [python, '-c', 'import importlib.util as u, cdg_jax; '
       'print(u.find_spec("tensorflow") is None, cdg_jax.__file__)'],
      cwd=outside, capture_output=True, text=True, check=True)
  no_tensorflow, location = probe.stdout.split()
  assert no_tensorflow == 'True'                    # no TFDS extra
  assert str(installed) in location                 # not the repository's
  config = os.path.join(ROOT, 'configs', 'simclr_cifar10.py') + ':smoke'
  workdir = str(tmp_path / 'run')
  # -v 0: the INFO lines (metrics, progress rate and ETA) on the console too.
  result = _command(installed, 'cdg-train', f'--config={config}',
                    f'--workdir={workdir}', '--config.num_steps=4',
                    '--config.log_every_steps=2',
                    '--config.checkpoint.every_steps=2',
                    '--config.plot_images=1', '-v', '0', cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'kNN top-1' in result.stdout
  assert os.path.exists(os.path.join(workdir, 'summary.json'))
  # Progress reports (rate and ETA) and TensorBoard event files without
  # TensorFlow, as clu gives them with it.
  assert 'steps/s, ETA' in result.stdout + result.stderr
  events = [f for f in os.listdir(workdir)
            if f.startswith('events.out.tfevents')]
  assert events and os.path.getsize(os.path.join(workdir, events[0])) > 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4]
  assert any('steps_per_sec' in r for r in records)
  result = _command(installed, 'cdg-linear-eval', f'--config={config}',
                    f'--workdir={workdir}', '--config.linear_eval.epochs=2',
                    cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'test top-1' in result.stdout
  result = _command(installed, 'cdg-flops', f'--workdir={workdir}',
                    cwd=outside)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reduction' in result.stdout.lower()
  # The package data came along (ImageNet-100's class list).
  listing = launch.run(
      [python, '-c', 'import importlib.resources as r; print(r.files('
       '"cdg_jax.data").joinpath("imagenet100_classes.txt").read_text()'
       '.split())'],
      cwd=outside, capture_output=True, text=True, check=True)
  wnids = json.loads(listing.stdout.replace("'", '"'))
  assert len(wnids) == 100 and all(w.startswith('n') for w in wnids)
