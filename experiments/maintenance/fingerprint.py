r"""A fingerprint of the project's behaviour, to show that a refactor changed none.

  python -m experiments.maintenance.fingerprint --out=/tmp/before.json
  (change the code)
  python -m experiments.maintenance.fingerprint --out=/tmp/after.json \
      --compare=/tmp/before.json

Run it from the root of the checkout to fingerprint: `python -m` puts the
current directory first on the import path, so that checkout's `cdg_jax` is
the one measured, not an installed copy (the script stops, naming both,
where they differ), and its commands run there too.

It records, through the stable surfaces only (config files, the public API
`cdg_jax.create_resnet`/`GatingSpec`/`ResNetGating`, the `cdg_jax.main` and
`cdg_jax.linear_eval` command lines), so the same script runs on the code
before and after a change:

- every config file with no variant and with each variant, dumped as JSON;
- the outputs, parameters, batch statistics and gate densities of gated
  ResNets of every gate kind and block shape, train and eval mode;
- the step metrics of 3-step smoke runs of every framework and gating form
  (CDG, both predictors, the dense partner, tiles with the sparse train step,
  the FLOPs budget, dense), their kNN summary, the sparse-inference kNN, and a
  linear evaluation of one run.

Each item is a SHA-256 of its bytes (floats as their exact bits), so equal
means bit-identical. `--compare` prints the items that differ or that one
fingerprint lacks, and exits 1 when there is any (its last line
says how many and which). Wall times are left out. About 10 minutes on 2 CPU
cores; `--only=configs` takes seconds.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_OUT = flags.DEFINE_string('out', None, 'Where to write the fingerprint JSON.')
_COMPARE = flags.DEFINE_string('compare', None,
                               'An earlier fingerprint to compare with.')
_ONLY = flags.DEFINE_list('only', None,
                          'Parts to record: configs, models, runs (all).')

# The checkout this script sits in (experiments/maintenance/ of it), whose
# cdg_jax is fingerprinted: `python -m` from its root imports that one.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
VARIANTS = ('smoke', 'dense', 'structured', 'tiles', 'channel_predictor',
            'spatial_predictor', 'dense_partner')
# Keys of metrics.jsonl and summary.json that measure time, not behaviour.
# Keys of what differs from run to run: timings, and when the backbone was
# exported (linear_eval.json's 'backbone'; its step and digest stay).
_TIMING = ('time', 'sec', 'wall', 'throughput', 'per_s', 'seconds', 'exported')


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _tree_digest(tree) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  hasher = hashlib.sha256()
  for path, leaf in leaves:
    hasher.update(jax.tree_util.keystr(path).encode())
    array = np.asarray(leaf)
    hasher.update(str(array.dtype).encode() + str(array.shape).encode())
    hasher.update(array.tobytes())
  return hasher.hexdigest()[:16]


def config_items() -> dict[str, str]:
  items = {}
  for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
    name = os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(f'config_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if name == 'cpu_protocol':
      args = [f'{base}{variant}' for base in ('simclr_cifar10', 'byol_cifar100')
              for variant in [''] + [f',{v}' for v in VARIANTS]]
    else:
      args = [None] + list(VARIANTS)
    for arg in args:
      try:
        config = module.get_config(arg) if arg is not None else (
            module.get_config())
        dumped = config.to_json_best_effort(sort_keys=True)
      except Exception as error:  # pylint: disable=broad-except
        dumped = f'{type(error).__name__}: {error}'
      items[f'config/{name}:{arg or ""}'] = _digest(dumped.encode())
  return items


def model_items() -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import cdg_jax  # pylint: disable=g-import-not-at-top
  specs = {
      'none': None,
      'cdg': cdg_jax.GatingSpec(),
      'cdg_structured': cdg_jax.GatingSpec(block=(2, 2, 4)),
      'cdg_tiles': cdg_jax.GatingSpec(block=(4, 4, 0)),
      # The ResNet's placement of its gates: `ResNetGating` (before it,
      # fields of `GatingSpec`).
      'cdg_all_roles': getattr(cdg_jax, 'ResNetGating', cdg_jax.GatingSpec)(
          layers=('block_3x3', 'block_1x1', 'shortcut')),
      'channel_predictor': cdg_jax.GatingSpec(kind='channel_predictor',
                                              density_target=0.5),
      'spatial_predictor': cdg_jax.GatingSpec(kind='spatial_predictor',
                                              density_target=0.5),
  }
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  items = {}
  for model_name in ('resnet10', 'resnet50'):
    for spec_name, spec in specs.items():
      if model_name == 'resnet50' and spec_name not in ('cdg', 'cdg_all_roles'):
        continue
      model = cdg_jax.create_resnet({'name': model_name, 'width': 8}, spec,
                                    num_classes=5)
      variables = model.init(jax.random.key(0), images, train=False)
      rngs = {'gumbel': jax.random.key(2), 'closed_tiles': jax.random.key(3)}
      train_out, train_state = model.apply(
          variables, images, train=True, rngs=rngs,
          mutable=['batch_stats', cdg_jax.DENSITY_COLLECTION])
      eval_out, eval_state = model.apply(
          variables, images, train=False,
          mutable=[cdg_jax.DENSITY_COLLECTION])
      key = f'model/{model_name}/{spec_name}'
      items[f'{key}/params'] = _tree_digest(variables)
      items[f'{key}/train'] = _tree_digest((train_out, train_state))
      items[f'{key}/eval'] = _tree_digest((eval_out, eval_state))
      grads = jax.grad(lambda p: jnp.sum(model.apply(  # pylint: disable=cell-var-from-loop
          {**variables, 'params': p}, images, train=True, rngs=rngs,
          mutable=['batch_stats'])[0] ** 2))(variables['params'])
      items[f'{key}/grad'] = _tree_digest(grads)
  return items


RUNS = {
    # name: (config argument, extra flags)
    'simclr': ('configs/simclr_cifar10.py:smoke', []),
    'mocov2': ('configs/mocov2_cifar10.py:smoke', []),
    'byol': ('configs/byol_cifar10.py:smoke', []),
    'simsiam': ('configs/simsiam_cifar10.py:smoke', []),
    'simclr_dense': ('configs/simclr_cifar10.py:smoke,dense', []),
    'simclr_channel_predictor':
        ('configs/simclr_cifar10.py:smoke,channel_predictor', []),
    'byol_spatial_predictor':
        ('configs/byol_cifar10.py:smoke,spatial_predictor', []),
    'simclr_dense_partner': ('configs/simclr_cifar10.py:smoke,dense_partner',
                             []),
    'byol_dense_partner': ('configs/byol_cifar10.py:smoke,dense_partner', []),
    'simclr_tiles_sparse': (
        'configs/simclr_cifar10.py:smoke,tiles',
        ['--config.gating.sparse_training=True',
         "--config.gating.closed_tile_gradient=sampled",
         '--config.eval.sparse_inference=True']),
    'simclr_budget': ('configs/simclr_cifar10.py:smoke',
                      ['--config.gating.regularizer=flops',
                       '--config.gating.budget_ramp_fraction=0.5']),
}


def _without_timing(record):
  if isinstance(record, dict):
    return {key: _without_timing(value) for key, value in record.items()
            if not any(word in key for word in _TIMING)}
  if isinstance(record, list):
    return [_without_timing(value) for value in record]
  return record


def _run(args: list[str]) -> None:
  result = subprocess.run([sys.executable, '-m', *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{args} failed:\n{result.stderr[-3000:]}')


def run_items() -> dict[str, str]:
  items = {}
  with tempfile.TemporaryDirectory() as root:
    for name, (config, extra) in RUNS.items():
      workdir = os.path.join(root, name)
      _run(['cdg_jax.main', f'--config={config}', f'--workdir={workdir}',
            '--config.num_steps=3', '--config.log_every_steps=1',
            '--config.checkpoint.every_steps=2', '--config.plot_images=0',
            *extra])
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [_without_timing(json.loads(line)) for line in f]
      items[f'run/{name}/metrics'] = _digest(
          json.dumps(records, sort_keys=True).encode())
      with open(os.path.join(workdir, 'summary.json')) as f:
        summary = _without_timing(json.load(f))
      summary.pop('workdir', None)
      items[f'run/{name}/summary'] = _digest(
          json.dumps(summary, sort_keys=True).encode())
      if name == 'simclr':
        _run(['cdg_jax.linear_eval', f'--config={config}',
              f'--workdir={workdir}', '--config.linear_eval.epochs=2'])
        with open(os.path.join(workdir, 'linear_eval.json')) as f:
          result = _without_timing(json.load(f))
        items['run/simclr/linear_eval'] = _digest(
            json.dumps(result, sort_keys=True).encode())
  return items


# The parts `--only` chooses from.
PARTS = ('configs', 'models', 'runs')


def _fail(message: str) -> None:
  print(f'FATAL: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _few(keys: list[str], count: int = 3) -> str:
  """Up to `count` of `keys`, and how many more."""
  shown = ', '.join(keys[:count])
  return shown + (f' and {len(keys) - count} more' if len(keys) > count
                  else '')


def _items(count: int) -> str:
  return f'{count} item{"s" * (count != 1)}'


def _are(count: int) -> str:
  return 'is' if count == 1 else 'are'


def read_fingerprint(path: str) -> dict[str, str]:
  """A fingerprint written by `--out`; ValueError naming the file and the
  problem when it cannot be read or is not one."""
  try:
    with open(path) as f:
      fingerprint = json.load(f)
  except OSError as e:
    raise ValueError(f'--compare={path}: cannot read it ({e.strerror}). Give '
                     f'a fingerprint written earlier with --out.') from e
  except ValueError as e:
    raise ValueError(f'--compare={path}: not a fingerprint (invalid JSON: '
                     f'{e}). Give a file written with --out.') from e
  if (not isinstance(fingerprint, dict) or not fingerprint
      or not all(isinstance(v, str) for v in fingerprint.values())):
    raise ValueError(f'--compare={path}: not a fingerprint (a non-empty JSON '
                     f'object of item name to digest). Give a file written '
                     f'with --out.')
  return fingerprint


def compare(earlier: dict[str, str], current: dict[str, str],
            earlier_name: str = 'the earlier fingerprint'
            ) -> tuple[list[str], bool]:
  """The report of comparing two fingerprints, and whether they are equal.

  Equal means the same items with the same digests: an item recorded on
  one side only is a difference too (a config, variant or run added or
  removed, or fingerprints of different `--only` parts), since its
  behaviour was not compared. The last line sums up; when not equal it is
  a `FATAL:` line naming how many items differ or are missing, and a few.
  """
  shared = sorted(set(earlier) & set(current))
  differ = [key for key in shared if earlier[key] != current[key]]
  missing = sorted(set(earlier) - set(current))   # not recorded now
  new = sorted(set(current) - set(earlier))
  lines = [f'DIFFERS: {key}' for key in differ]
  lines += [f'MISSING HERE (only in {earlier_name}): {key}' for key in missing]
  lines += [f'NEW HERE (not in {earlier_name}): {key}' for key in new]
  if not (differ or missing or new):
    return lines + [f'{len(shared)} of {len(shared)} items identical.'], True
  problems = []
  if differ:
    problems.append(f'{len(differ)} of {len(shared)} shared items '
                    f'{"differ" if len(differ) > 1 else "differs"} '
                    f'({_few(differ)})')
  if missing:
    problems.append(f'{_items(len(missing))} of {earlier_name} '
                    f'{_are(len(missing))} missing here ({_few(missing)})')
  if new:
    problems.append(f'{_items(len(new))} {_are(len(new))} not in '
                    f'{earlier_name} ({_few(new)})')
  fix = ''
  if missing or new:
    fix = (' Compare fingerprints of the same parts (--only); items that '
           'the change added or removed on purpose could not be compared.')
  return lines + [f'FATAL: the fingerprints are not the same: '
                  f'{"; ".join(problems)}.{fix}'], False


def _check_checkout() -> None:
  """Stops unless the `cdg_jax` imported is the one of this checkout."""
  import cdg_jax  # pylint: disable=g-import-not-at-top
  imported = os.path.dirname(os.path.dirname(os.path.abspath(
      cdg_jax.__file__)))
  if os.path.realpath(imported) != os.path.realpath(REPO):
    _fail(f'cdg_jax is imported from {imported}, not from this checkout '
          f'({REPO}). Run the fingerprint from the checkout\'s root: cd '
          f'{REPO} && python -m experiments.maintenance.fingerprint ...')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_checkout()
  # Every argument is checked before the minutes of work.
  parts = _ONLY.value or list(PARTS)
  unknown = [part for part in parts if part not in PARTS]
  if unknown:
    _fail(f'--only={",".join(_ONLY.value)}: unknown part(s) '
          f'{", ".join(unknown)}; the parts are {", ".join(PARTS)} '
          f'(comma-separated; default all).')
  earlier = None
  if _COMPARE.value:
    try:
      earlier = read_fingerprint(_COMPARE.value)
    except ValueError as e:
      _fail(str(e))
  if _OUT.value:
    existed = os.path.exists(_OUT.value)
    try:
      # Opened for appending: checks that it can be written, and leaves an
      # existing file as it is until the new fingerprint replaces it.
      with open(_OUT.value, 'a'):
        pass
      if not existed:
        os.remove(_OUT.value)
    except OSError as e:
      _fail(f'--out={_OUT.value}: cannot write there ({e.strerror}). Give a '
            f'path in an existing, writable directory.')
  fingerprint = {}
  for part, function in (('configs', config_items), ('models', model_items),
                         ('runs', run_items)):
    if part in parts:
      fingerprint.update(function())
      print(f'{part}: done', flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
  print(f'{len(fingerprint)} items.')
  if earlier is not None:
    lines, equal = compare(earlier, fingerprint, _COMPARE.value)
    for line in lines[:-1]:
      print(line)
    if not equal:
      print(lines[-1], file=sys.stderr, flush=True)
      sys.exit(1)
    print(lines[-1])


if __name__ == '__main__':
  app.run(main)
