r"""Peer benchmark: the same SimCLR train step in PyTorch and in cdg_jax.

  python -m experiments.benchmarks.benchmark_peer  # full run, width 64
  python -m experiments.benchmarks.benchmark_peer --cpu_devices=1  # cdg_jax on 1 device
  python -m experiments.benchmarks.benchmark_peer --width=8 --image_size=16 \
      --batch_size=16 --repeats=1 --out=/tmp/peer_check   # a quick check

PyTorch is no dependency of the project: the PyTorch half needs an
environment with torch as well (e.g. `python3 -m venv /root/venv-peer &&
/root/venv-peer/bin/pip install -r requirements.txt torch`, then run the
commands above with `/root/venv-peer/bin/python`). Without torch the script
says so, times the cdg_jax half only and writes the files with the PyTorch
fields null.

The step (CIFAR ResNet-18 with a 3x3 stem and no max-pool, `--width` 64,
`--image_size` 32, `--batch_size` 128 images = 256 views, synthetic uint8
images; two augmented views, NT-Xent at `--temperature` 0.2, projector
2048-128, gate regulariser, LARS, online linear probe):

  cdg_jax  dense   `gating.kind='none'`;
           masked  CDG tile gates (`--tiles`, all channels per tile), the
                   conditional path computed everywhere and masked;
           sparse  the same with `gating.sparse_training=True` (conditional
                   path at the open tiles only; closed_tile_gradient 'none').
  PyTorch  dense and masked (CDG, G=4, per position and output channel,
           everything computed: `peer_torch.py`), each eager NCHW, eager
           channels_last and `torch.compile`d (channels_last).

The cdg_jax steps are `benchmark_sparse_step.py`'s (its `_config`,
`_threshold_for`, `_with_thresholds`; `pretraining.assemble`): the tile
density is set to `--density` by one threshold found by bisection, and every
timed call starts from the same state (not donated). The PyTorch masked
step's threshold is set the same way to the same MAC-weighted density
(masked cost does not depend on it). Devices and threads: cdg_jax splits the
host into one CPU device per core and shards the batch over them, as
training does (`--cpu_devices`, `cdg_jax.run.parallel.configure_cpu`;
`--cpu_devices=1` runs on one device as `benchmark_sparse_step.py` does);
PyTorch runs with `torch.set_num_threads(os.cpu_count())`. The steps are
the program's (`pretraining.jit_train_step`, not donated): on several
devices the sparse executor runs on each device's shard of the batch
(`tiling.per_batch_shard`), with the collectives of the masked step only.
Time both settings: the best dense time may be on either.

Each library runs alone: the benchmark runs `--rounds` rounds, and in each
round starts one fresh process for cdg_jax and, after it has ended, one for
PyTorch (the order alternating between rounds, so that drift of the
machine's speed falls on both). Each process builds and compiles (or warms
up) its variants, times `--repeats` steps of each, the variants in turn, and
exits; this process only starts them and collects the times, and holds no
JAX arrays. A user runs one library at a time, and so is each timed: with
the other library's process alive (idle, 0.00 CPU s used), the cdg_jax
dense step took 10.7 s against 4.4 s alone (2026-12-05, 2-core Xeon): the
step maps fresh memory for its buffers, and memory held elsewhere makes
that slower (the minor page faults per step are in the table).
Writes a new record (`<date>-<cpu>.json`, experiments/common/records.py)
and its `.md` to `--out`, with the machine, versions, command and date.
The headline ratios are `sparse_vs_torch_compiled_masked` (PyTorch
compiled masked time / our sparse time) and
`dense_vs_torch_compiled_dense` (PyTorch compiled dense / our dense), each
the median of the per-repeat ratios, above 1 where ours is faster.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from absl import app
from absl import flags

# The cdg_jax half is benchmark_sparse_step.py's. Importing it defines its
# flags; this script shares those it reads (--width, --image_size,
# --batch_size, --tiles, --repeats, --out: the same meaning, this script's
# defaults and help) and removes the two it does not, so that they are
# refused rather than silently ignored.
from experiments.benchmarks import benchmark_sparse_step as sparse_step
from experiments.common import records
from experiments.common import repo
from experiments.common.repo import REPO_ROOT

FLAGS = flags.FLAGS
for _name in ('densities', 'sample_fraction'):
  if _name in FLAGS:
    delattr(FLAGS, _name)
DEFAULT_OUT = os.path.join(REPO_ROOT, 'experiments', 'results', 'peer')
FLAGS.set_default('out', DEFAULT_OUT)
FLAGS.set_default('repeats', 3)
FLAGS['out'].help = ('Folder of the records: each run writes a new '
                     '<date>-<cpu>.json (records.py) and its .md.')
FLAGS['repeats'].help = ('Timed steps per variant in each round and '
                         'library; the variants run in turn within each '
                         'repeat.')
FLAGS['tiles'].help = ('Tile scheme of the cdg_jax masked and sparse steps: '
                       't or t1-t2-t3-t4 (see benchmark_sparse.py).')
flags.DEFINE_float('density', 0.25, 'Target MAC-weighted gate density of '
                   'the masked and sparse steps (cdg_jax tiles; PyTorch '
                   'positions x channels), set by bisection on one shared '
                   'threshold.')
flags.DEFINE_float('temperature', 0.2, 'SimCLR NT-Xent temperature (both '
                   'libraries).')
flags.DEFINE_integer('cpu_devices', 0, 'CPU devices of the cdg_jax half '
                     '(0: one per core, the training default; 1: one '
                     'device, as benchmark_sparse_step.py runs).')
flags.DEFINE_list('other_cpu_devices', ['1'], 'Other CPU device counts whose '
                  'cdg_jax steps are timed as well, each in a process of '
                  'its own per round, so that the sparse step is compared '
                  'with the best dense layout (sparse_vs_best_dense); '
                  'empty: the --cpu_devices layout only.')
flags.DEFINE_bool('torch', True, 'Time the PyTorch half (needs torch).')
flags.DEFINE_bool('torch_compile', True, 'Include the torch.compile variants '
                  '(a compile error is recorded and the run goes on).')
flags.DEFINE_integer('rounds', 2, 'Rounds; in each, one fresh process per '
                     'library times its variants, one library alive at a '
                     'time.')
# Internal: set in the processes the benchmark starts.
flags.DEFINE_enum('worker', None, ['cdg_jax', 'torch'],
                  "Time this library's variants and reply to the parent.")

TORCH_MISSING = ('PyTorch is not installed: pip install torch in a separate '
                 'environment (e.g. python3 -m venv /root/venv-peer && '
                 '/root/venv-peer/bin/pip install -r requirements.txt torch) '
                 'and run this script with its python; timing the cdg_jax '
                 'half only')

# (key, library, kind, execution); keys name rows of the record.
JAX_VARIANTS = (('cdg_jax/dense', 'cdg_jax', 'dense', 'jit'),
                ('cdg_jax/masked', 'cdg_jax', 'masked', 'jit'),
                ('cdg_jax/sparse', 'cdg_jax', 'sparse', 'jit'))
TORCH_EXECUTIONS = (('eager_nchw', 'eager NCHW', False, False),
                    ('eager_channels_last', 'eager channels_last', True,
                     False),
                    ('compiled_channels_last', 'torch.compile channels_last',
                     True, True))
TORCH_VARIANTS = tuple(
    (f'torch/{kind}/{key}', 'torch', kind, label)
    for kind in ('dense', 'masked')
    for key, label, _, _ in TORCH_EXECUTIONS)
# name: (the peer's variant, ours); each ratio is peer time / our time.
RATIOS = {
    'sparse_vs_torch_compiled_masked': ('torch/masked/compiled_channels_last',
                                        'cdg_jax/sparse'),
    'dense_vs_torch_compiled_dense': ('torch/dense/compiled_channels_last',
                                      'cdg_jax/dense'),
    'masked_vs_torch_compiled_masked': ('torch/masked/compiled_channels_last',
                                        'cdg_jax/masked'),
    'sparse_vs_torch_compiled_dense': ('torch/dense/compiled_channels_last',
                                       'cdg_jax/sparse'),
    # The fastest PyTorch execution of each kind, taken within each repeat.
    'sparse_vs_torch_fastest_masked': ('torch/masked/*', 'cdg_jax/sparse'),
    'dense_vs_torch_fastest_dense': ('torch/dense/*', 'cdg_jax/dense'),
}
# Where the two steps differ (written into the record and its .md).
DIFFERENCES = (
    'Augmentation: both draw SimCLR CIFAR views (crop scale (0.08, 1), ratio '
    '(3/4, 4/3), flip 0.5, colour jitter 0.8 with (0.4, 0.4, 0.4, 0.1), '
    'grayscale 0.2) on the fly inside the timed step. cdg_jax: torchvision\'s '
    '10-attempt crop rule with antialiased bilinear resampling, jitter in a '
    'random order with saturation and hue in HSV. PyTorch: one crop draw '
    'clamped to the image, crop and flip as one bilinear grid_sample (no '
    'antialiasing), jitter in a fixed order with saturation as a blend with '
    'the luma and hue as a YIQ rotation.',
    'Gates: cdg_jax decides one gate per tile (tiles --tiles, all channels); '
    'PyTorch per position and output channel. The masked forms do the same '
    'work either way (base path, full conditional path, multiply); only '
    'cdg_jax sparse skips the closed tiles.',
    'Optimiser: optax.lars in cdg_jax; in PyTorch a LARS with optax.lars\'s '
    'update (peer_torch.LARS: weight decay and trust ratio for kernels only, '
    'momentum 0.9), run eagerly as a Python loop over the parameters in every '
    'PyTorch variant (torch.compile compiles the loss\'s forward and '
    'backward, augmentation included, not the optimiser); the online probe '
    'uses Adam on both sides. Both use the learning rate of our schedule at '
    'the state\'s step (step 0: warm-up, 0.0): all the work is done, the '
    'parameters do not move.',
    'State: every cdg_jax call starts from the same state (not donated, as '
    'benchmark_sparse_step.py), the output state is discarded; PyTorch '
    'updates its modules in place (BatchNorm statistics move; at learning '
    'rate 0 the parameters do not).',
    'Stride-2 3x3 convolutions: XLA SAME padding (0, 1), PyTorch padding 1 '
    'on both sides: the same output sizes and MACs.',
    'The cdg_jax step also computes its metrics (FLOPs reduction, gate '
    'densities, embedding std, probe accuracy); tiny next to the network.',
    'Devices and threads: see the threads line.',
)


def speed_ratio(theirs: Sequence[float] | None,
                ours: Sequence[float] | None) -> dict | None:
  """How much faster ours is: {'paired': median over repeats of theirs[i] /
  ours[i], 'of_medians': median(theirs) / median(ours)}; None if either
  side has no times. Above 1 where ours is faster."""
  if not theirs or not ours:
    return None
  if len(theirs) != len(ours):
    raise ValueError(f'Times of {len(theirs)} and {len(ours)} repeats do not '
                     f'pair up.')
  return {'paired': statistics.median(t / o for t, o in zip(theirs, ours)),
          'of_medians': statistics.median(theirs) / statistics.median(ours)}


def _fastest(times: dict[str, list[float]], prefix: str) -> list[float] | None:
  """Per repeat, the fastest time among the variants starting `prefix`."""
  series = [t for key, t in times.items() if key.startswith(prefix) and t]
  if not series:
    return None
  return [min(values) for values in zip(*series)]


def ratios_of(times: dict[str, list[float]]) -> dict[str, dict | None]:
  """Every ratio of `RATIOS` from the variants' per-repeat times."""
  out = {}
  for name, (theirs, ours) in RATIOS.items():
    peer = (_fastest(times, theirs[:-1]) if theirs.endswith('*')
            else times.get(theirs))
    out[name] = speed_ratio(peer, times.get(ours))
  return out


def _best_of(times: dict[str, list[float]], key: str
             ) -> tuple[str, float] | None:
  """(variant, median step s) of the fastest layout of cdg_jax variant
  `key` (`layout_key`), or None where none was timed."""
  medians = {k: statistics.median(v) for k, v in times.items()
             if v and (k == key or k.startswith(key + ' ('))}
  if not medians:
    return None
  best = min(medians, key=medians.get)
  return best, medians[best]


def best_layout_ratios(times: dict[str, list[float]]) -> dict:
  """The sparse step against the best dense layout, from median step times:
  `sparse_vs_best_dense` (the fastest dense layout's time over the fastest
  sparse layout's) and `default_sparse_vs_best_dense` (over the sparse
  step in the --cpu_devices layout, a training run's), above 1 where
  sparse is faster; with the variants they came from and the date."""
  dense, sparse = _best_of(times, 'cdg_jax/dense'), _best_of(
      times, 'cdg_jax/sparse')
  default = times.get('cdg_jax/sparse')
  return {
      'date': datetime.date.today().isoformat(),
      'best_dense': dense and {'variant': dense[0], 'median_step_s': dense[1]},
      'best_sparse': sparse and {'variant': sparse[0],
                                 'median_step_s': sparse[1]},
      'sparse_vs_best_dense': dense and sparse and dense[1] / sparse[1],
      'default_sparse_vs_best_dense': (
          dense and default and dense[1] / statistics.median(default))}


def _load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


# ------------------------------------------------------------- cdg_jax half


class JaxHalf:
  """The three cdg_jax steps, compiled, with their state and batch placed."""

  def __init__(self, images, labels):
    import jax  # pylint: disable=g-import-not-at-top
    from cdg_jax.data import augment  # pylint: disable=g-import-not-at-top
    from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
    from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
    from cdg_jax.ssl import pretraining  # pylint: disable=g-import-not-at-top

    self.configs, runs, self.calls, self.steps = {}, {}, {}, {}
    self.metrics = {}
    self.settings = {}
    for key, _, kind, _ in JAX_VARIANTS:
      config = sparse_step._config(  # pylint: disable=protected-access
          'sparse, none' if kind == 'sparse' else kind)
      config.ssl.temperature = FLAGS.temperature
      self.configs[key] = config
      self.settings[key] = pretraining.read_settings(
          config, config_lib.validate(config), 50_000)
      runs[key] = pretraining.assemble(self.settings[key])
    mesh = parallel.make_mesh()
    parallel.check_batch_divisible(FLAGS.batch_size, mesh)
    self.devices = mesh.devices.size
    batch = jax.device_put({'image': images, 'label': labels},
                           parallel.data_sharding(mesh))
    self.batch = batch
    masked = runs['cdg_jax/masked']
    gated_state = masked.init_state(jax.random.key(0))
    views = jax.numpy.concatenate(augment.two_views(
        jax.random.key(1), jax.numpy.asarray(images),
        self.configs['cdg_jax/masked'].augment))
    threshold = sparse_step._threshold_for(  # pylint: disable=protected-access
        masked, gated_state, views, FLAGS.density)
    gated_state = sparse_step._with_thresholds(  # pylint: disable=protected-access
        gated_state, threshold)
    # The program's jitted step (traced under the mesh: the sparse executor
    # runs per device), without donation: every timed call starts from the
    # same state.
    for key, _, kind, _ in JAX_VARIANTS:
      state = (runs[key].init_state(jax.random.key(0)) if kind == 'dense'
               else gated_state)
      state = parallel.replicate(state, mesh)
      step = pretraining.jit_train_step(runs[key].train_step, mesh,
                                        donate=False)
      self.steps[key] = (step, state)
      self.calls[key] = (lambda step=step, state=state:
                         jax.block_until_ready(step(state, batch)))
    self.learning_rate = float(
        self.settings['cdg_jax/masked'].learning_rate_schedule()(0))

  def warm_up(self, key: str) -> None:
    """The first call (compilation included); keeps the step's metrics."""
    _, metrics = self.calls[key]()
    self.metrics[key] = {
        'gate_density': float(metrics.get('gate_density', 1.0)),
        'flops_reduction': float(metrics['flops_reduction'])}


# ------------------------------------------------------------- PyTorch half


def torch_step_config(jax_half: JaxHalf, gated: bool) -> dict:
  """The PyTorch step's hyperparameters (`peer_torch.StepConfig`'s fields),
  read from the cdg_jax config."""
  config = jax_half.configs['cdg_jax/masked']
  settings = jax_half.settings['cdg_jax/masked']
  spec, view = settings.gating, config.augment.view1
  return dict(
      width=config.model.width, num_classes=config.data.num_classes,
      gated=gated, groups=spec.groups, alpha=spec.alpha,
      epsilon=spec.epsilon, density_target=spec.density_target,
      gate_weight=settings.loss.weight, threshold_init=spec.threshold_init,
      projector_hidden=tuple(config.ssl.projector_hidden_dims)[0],
      projector_dim=config.ssl.projector_dim,
      temperature=config.ssl.temperature,
      learning_rate=jax_half.learning_rate,
      weight_decay=config.optim.weight_decay,
      momentum=config.optim.momentum,
      trust_coefficient=config.optim.trust_coefficient,
      probe_learning_rate=config.probe.learning_rate,
      crop_scale=tuple(view.crop_scale), crop_ratio=tuple(view.crop_ratio),
      flip_prob=view.flip_prob, jitter_prob=view.jitter_prob,
      brightness=view.brightness, contrast=view.contrast,
      saturation=view.saturation, hue=view.hue,
      grayscale_prob=view.grayscale_prob, mean=tuple(config.augment.mean),
      std=tuple(config.augment.std))


def torch_steps(torch, peer_torch, step_configs: dict, images, labels
                ) -> tuple[dict[str, Callable], dict]:
  """The PyTorch variants' step callables and what was measured on the way
  (gate density of the masked model); `step_configs` maps 'dense' and
  'masked' to `torch_step_config`'s."""
  import copy  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  info = {'compile_errors': {}}
  calls = {}
  for kind in ('dense', 'masked'):
    model = peer_torch.SimCLR(step_configs[kind])
    if kind == 'masked':
      info['masked_gate_density'] = peer_torch.set_threshold(
          model, x, FLAGS.density, FLAGS.image_size)
    for key, _, channels_last, compiled in TORCH_EXECUTIONS:
      if compiled and not FLAGS.torch_compile:
        continue
      calls[f'torch/{kind}/{key}'] = peer_torch.TrainStep(
          copy.deepcopy(model), x, y, channels_last, compiled)
  return calls, info


def warm_up(calls: dict[str, Callable], must_work: Sequence[str] = ()
            ) -> tuple[dict[str, float], dict[str, str]]:
  """Calls each step once (compilation included): (first-call seconds,
  errors). A failing step is dropped from `calls` and its error kept, unless
  it is in `must_work`."""
  errors, first_call_s = {}, {}
  for key in list(calls):
    start = time.perf_counter()
    try:
      calls[key]()
    except Exception as e:  # pylint: disable=broad-except
      if key in must_work:
        raise
      errors[key] = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
      del calls[key]
      print(f'{key}: failed, {errors[key]}; going on without it', flush=True)
      continue
    first_call_s[key] = time.perf_counter() - start
    print(f'{key}: first call {first_call_s[key]:.1f} s', flush=True)
  return first_call_s, errors


def synthetic_batch():
  """The benchmark's uint8 images and labels (the same in every process)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.batch_size, FLAGS.image_size,
                                 FLAGS.image_size, 3), np.uint8)
  labels = rng.integers(0, 10, (FLAGS.batch_size,)).astype(np.int32)
  return images, labels


def time_in_turn(calls: dict[str, Callable]
                 ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
  """`--repeats` timed calls of each of `calls`, the variants in turn within
  each repeat: (seconds, minor page faults of this process) per call."""
  import resource  # pylint: disable=g-import-not-at-top
  times = {key: [] for key in calls}
  faults = {key: [] for key in calls}
  for repeat in range(FLAGS.repeats):
    for key, call in calls.items():
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      times[key].append(_seconds(call))
      faults[key].append(
          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(f'repeat {repeat + 1}/{FLAGS.repeats}: ' + ', '.join(
        f'{k} {t[-1]:.2f} s' for k, t in times.items()), flush=True)
  return times, faults


def layout_key(key: str, cpu_devices: int) -> str:
  """A cdg_jax variant's key in the layout of `cpu_devices` (the
  --cpu_devices layout keeps the bare key)."""
  return (key if cpu_devices == FLAGS.cpu_devices
          else f'{key} (--cpu_devices={cpu_devices})')


def _other_layouts() -> list[int]:
  """--other_cpu_devices as ints, without --cpu_devices itself."""
  try:
    counts = [int(n) for n in FLAGS.other_cpu_devices]
  except ValueError:
    raise app.UsageError(f'--other_cpu_devices takes device counts, got '
                         f'{",".join(FLAGS.other_cpu_devices)!r}.') from None
  if any(n < 0 for n in counts):
    raise app.UsageError(f'--other_cpu_devices: counts are 0 (one per core) '
                         f'or more, got {counts}.')
  return [n for n in dict.fromkeys(counts) if n != FLAGS.cpu_devices]


def cdg_jax_round(payload: dict) -> dict:
  """One round of the cdg_jax half (in a process of its own): builds,
  compiles and times the three steps on `payload`'s 'cpu_devices' (default
  --cpu_devices); also returns the PyTorch steps' configs, read from ours."""
  cpu_devices = payload.get('cpu_devices', FLAGS.cpu_devices)
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu(cpu_devices)   # before JAX starts
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  images, labels = synthetic_batch()
  half = JaxHalf(images, labels)
  first_call_s, errors = warm_up(
      {key: (lambda key=key: half.warm_up(key)) for key in half.calls},
      must_work=list(half.calls))
  times, faults = time_in_turn(half.calls)
  named = lambda values: {layout_key(k, cpu_devices): v
                          for k, v in values.items()}
  return {
      'times': named(times), 'minor_faults': named(faults),
      'first_call_s': named(first_call_s), 'errors': named(errors),
      'metrics': named(half.metrics), 'cpu_devices': cpu_devices,
      'learning_rate': half.learning_rate, 'devices': half.devices,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'step_configs': {kind: torch_step_config(half, kind == 'masked')
                       for kind in ('dense', 'masked')},
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                   'flax': flax.__version__, 'optax': optax.__version__}}


def torch_round(payload: dict) -> dict:
  """One round of the PyTorch half (in a process of its own), for the step
  configs in `payload` (`cdg_jax_round`'s)."""
  from experiments.benchmarks import peer_torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  step_configs = {kind: peer_torch.StepConfig(**{
      k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
                  for kind, fields in payload['step_configs'].items()}
  images, labels = synthetic_batch()
  calls, info = torch_steps(torch, peer_torch, step_configs, images, labels)
  first_call_s, errors = warm_up(calls)
  times, faults = time_in_turn(calls)
  return {'times': times, 'minor_faults': faults,
          'first_call_s': first_call_s, 'errors': errors, 'info': info,
          'versions': {'torch': torch.__version__},
          'threads': [torch.get_num_threads(),
                      torch.get_num_interop_threads()]}


ROUNDS = {'cdg_jax': cdg_jax_round, 'torch': torch_round}
_MESSAGE = 'PEER_WORKER '   # prefixes a worker's reply on its stdout
# The flags a worker process needs, passed on explicitly.
_WORKER_FLAGS = ('width', 'image_size', 'batch_size', 'tiles', 'model',
                 'density', 'temperature', 'repeats', 'cpu_devices',
                 'torch_compile')   # a layout's own count: its payload


def serve_worker() -> None:
  """The `--worker` process: reads its payload (one JSON line), runs its
  library's round, replies with one line."""
  reply = ROUNDS[FLAGS.worker](json.loads(sys.stdin.readline() or '{}'))
  print(_MESSAGE + json.dumps(reply), flush=True)


def run_worker(library: str, payload: dict) -> dict:
  """Runs one round of `library` in a fresh process and returns its reply;
  the process has ended when this returns."""
  import subprocess  # pylint: disable=g-import-not-at-top
  argv = [f'--worker={library}'] + [FLAGS[name].serialize()
                                     for name in _WORKER_FLAGS]
  print(f'--- {library}: a fresh process', flush=True)
  process = subprocess.Popen(
      repo.module_command(__spec__.name) + argv,
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      cwd=REPO_ROOT)
  process.stdin.write(json.dumps(payload) + '\n')
  process.stdin.close()
  reply = None
  for line in process.stdout:
    if line.startswith(_MESSAGE):
      reply = json.loads(line[len(_MESSAGE):])
    else:
      print(line, end='', flush=True)   # the worker's own progress
  status = process.wait()
  if status or reply is None:
    raise RuntimeError(f'The {library} process ended with exit status '
                       f'{status} before replying; see its messages above.')
  return reply


def torch_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    return importlib.util.find_spec('torch') is not None
  except ValueError:   # in sys.modules as None: blocked
    return False


# --------------------------------------------------------------------- main


def _row_text(value, fmt: str) -> str:
  return '-' if value is None else format(value, fmt)


def write_report(result: dict, out: str) -> str:
  """Writes a new record of `result` into `out` (`records.write_record`,
  with its Markdown beside it); returns the record's path."""
  devices = {'platform': 'cpu', 'count': result.get('jax_devices'),
             'processes': 1}
  return records.write_record(out, 'peer', result, render=render,
                              devices=devices)


def render(result: dict) -> str:
  """The Markdown of a peer record."""
  f_ = result['flags']
  lines = [
      '# Peer benchmark: the SimCLR train step in PyTorch and cdg_jax', '',
      f'CIFAR {f_["model"]} width {f_["width"]}, {f_["image_size"]}x'
      f'{f_["image_size"]}, batch {f_["batch_size"]} images (2 views each), '
      f'NT-Xent T={f_["temperature"]}, projector 2048-128, gate regulariser, '
      f'LARS, online probe; target gate density {f_["density"]} (cdg_jax '
      f'tiles {f_["tiles"]}); median of {f_["rounds"] * f_["repeats"]} steps: '
      f'{f_["rounds"]} rounds, in each one fresh process per library (one '
      f'alive at a time) timing {f_["repeats"]} steps per variant, the '
      f'variants in turn.', '',
      *records.header_lines(result),
      f'- 1-minute load average '
      f'{result["load_average_1min"]["before_timing"]} before the timed '
      f'steps, {result["load_average_1min"]["after_timing"]} after',
      f'- threads: {result["threads"]}', '']
  if result['torch']['message']:
    lines += [f'**{result["torch"]["message"]}.**', '']
  lines += ['| library | variant | execution | gate density | FLOPs '
            'reduction | step s (median) | time / cdg_jax dense (median of '
            'per-repeat ratios) | minor page faults per step (median) |',
            '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for row in result['rows']:
    if row['median_step_s'] is None:
      step = f'failed: {row["error"]}'
      relative = '-'
    else:
      step = f'{row["median_step_s"]:.3f}'
      relative = _row_text(row['relative_to_cdg_jax_dense'], '.2f')
    lines.append(
        f'| {row["library"]} | {row["kind"]} | {row["execution"]} | '
        f'{_row_text(row["gate_density"], ".3f")} | '
        f'{_row_text(row["flops_reduction"], ".2f")} | {step} | {relative} | '
        f'{_row_text(row["minor_faults_per_step"], ".0f")} |')
  lines += ['', 'Speed ratios (peer time / our time; above 1: ours faster; '
            'median of per-repeat ratios, ratio of medians in brackets):', '']
  for name, ratio in result['ratios'].items():
    theirs, ours = RATIOS[name]
    text = ('null (not timed)' if ratio is None else
            f'**{ratio["paired"]:.2f}x** ({ratio["of_medians"]:.2f}x)')
    lines.append(f'- `{name}` ({theirs} / {ours}): {text}')
  if result.get('best_dense') and result.get('best_sparse'):
    lines += [
        '', f'Against the best dense layout ({result["date"]}): the fastest '
        f'dense step is `{result["best_dense"]["variant"]}` '
        f'({result["best_dense"]["median_step_s"]:.3f} s), the fastest '
        f'sparse step `{result["best_sparse"]["variant"]}` '
        f'({result["best_sparse"]["median_step_s"]:.3f} s): '
        f'`sparse_vs_best_dense` **{result["sparse_vs_best_dense"]:.2f}x**; '
        f'the sparse step in the --cpu_devices layout (a training run\'s) '
        f'against it, `default_sparse_vs_best_dense`: '
        f'**{result["default_sparse_vs_best_dense"]:.2f}x**.']
  lines += ['', 'Where the two steps differ:', '']
  lines += [f'- {d}' for d in result['differences']]
  return '\n'.join(lines) + '\n'


def _every_round(replies: list[dict], field: str) -> dict[str, list]:
  """`field` (per-variant lists) of the rounds' replies joined in round
  order, for the variants that ran in every round."""
  keys = [key for key in replies[0][field]
          if all(key in reply[field] for reply in replies)]
  return {key: [v for reply in replies for v in reply[field][key]]
          for key in keys}


def run() -> dict:
  """The benchmark for the parsed flags: times, writes, returns the record's
  figures."""
  torch_message = _torch_message()
  if torch_message:
    print(torch_message, flush=True)

  libraries = (['cdg_jax'] + [f'cdg_jax:{n}' for n in _other_layouts()]
               + ([] if torch_message else ['torch']))
  load_before = _load_average()
  replies = _run_rounds(libraries)
  load_after = _load_average()
  result = _result(replies, torch_message, load_before, load_after)
  path = write_report(result, FLAGS.out)
  records.print_record(path)
  return result


def _torch_message() -> str | None:
  """Why the PyTorch half is not timed, or None where it is."""
  torch_message = None
  if not FLAGS.torch:
    torch_message = 'PyTorch half skipped (--notorch)'
  elif not torch_available():
    torch_message = TORCH_MISSING
  elif FLAGS.model != 'resnet18':
    torch_message = (f'The PyTorch step is CIFAR ResNet-18 only, not '
                     f'--model={FLAGS.model}: timing the cdg_jax half only')
  return torch_message


def _run_rounds(libraries: list[str]) -> dict[str, list[dict]]:
  """`--rounds` rounds of a fresh process per library (and per other
  cdg_jax layout, 'cdg_jax:<cpu_devices>'), one alive at a time: each one's
  replies, in round order."""
  replies = {library: [] for library in libraries}
  for round_index in range(FLAGS.rounds):
    # cdg_jax first in the first round: its reply holds PyTorch's configs.
    order = libraries if round_index % 2 == 0 else libraries[::-1]
    for library in order:
      if library == 'torch':
        replies[library].append(run_worker('torch', {
            'step_configs': replies['cdg_jax'][0]['step_configs']}))
      else:
        _, _, devices = library.partition(':')
        replies[library].append(run_worker(
            'cdg_jax', {'cpu_devices': int(devices)} if devices else {}))
  return replies


def _rows(replies: dict[str, list[dict]]) -> tuple[list[dict], dict, dict]:
  """The record's rows (one per variant that ran or failed), with the
  per-repeat times of the variants that ran in every round and the errors:
  (rows, times, errors)."""
  metrics_of = {key: metrics for library, library_replies in replies.items()
                if library != 'torch'
                for key, metrics in library_replies[0]['metrics'].items()}
  devices_of = {key: library_replies[0]['devices']
                for library, library_replies in replies.items()
                if library != 'torch' for key in library_replies[0]['times']}
  times, faults, first_call_s, errors = {}, {}, {}, {}
  for library_replies in replies.values():
    times.update(_every_round(library_replies, 'times'))
    faults.update(_every_round(library_replies, 'minor_faults'))
    first_call_s.update(library_replies[0]['first_call_s'])
    for reply in library_replies:
      errors.update(reply['errors'])
  torch_reply = replies['torch'][0] if 'torch' in replies else None
  torch_info = torch_reply['info'] if torch_reply else {}
  variants = {key: (library, kind, execution)
              for key, library, kind, execution in JAX_VARIANTS}
  for name, library_replies in replies.items():
    if name.startswith('cdg_jax:'):
      reply = library_replies[0]
      variants.update({
          layout_key(key, reply['cpu_devices']):
          (library, kind, f'{execution}, {reply["devices"]} device(s)')
          for key, library, kind, execution in JAX_VARIANTS})
  if torch_reply:
    variants.update({key: (library, kind, label) for key, library, kind, label
                     in TORCH_VARIANTS if key in times or key in errors})

  rows = []
  dense = times.get('cdg_jax/dense')
  for key, (library, kind, execution) in variants.items():
    measured = times.get(key)
    relative = speed_ratio(measured, dense)   # its time / our dense time
    metrics = metrics_of.get(key, {})
    gate_density = metrics.get('gate_density')
    if key.startswith('torch/masked'):
      gate_density = torch_info.get('masked_gate_density')
    elif key.startswith('torch/dense'):
      gate_density = 1.0
    rows.append({
        'key': key, 'library': library, 'kind': kind, 'execution': execution,
        'devices': devices_of.get(key),   # cdg_jax's layout (None: PyTorch)
        'gate_density': gate_density,
        'flops_reduction': metrics.get('flops_reduction'),
        'median_step_s': statistics.median(measured) if measured else None,
        # time / our dense time, the median of the per-repeat ratios.
        'relative_to_cdg_jax_dense': relative and relative['paired'],
        'first_call_s': first_call_s.get(key),
        'times_s': measured, 'error': errors.get(key),
        'minor_faults_per_step': (statistics.median(faults[key])
                                  if faults.get(key) else None)})
  return rows, times, errors


def _result(replies: dict[str, list[dict]], torch_message: str | None,
            load_before: float | None, load_after: float | None) -> dict:
  """The record's figures from the workers' replies."""
  jax_reply = replies['cdg_jax'][0]
  torch_reply = replies['torch'][0] if 'torch' in replies else None
  torch_info = torch_reply['info'] if torch_reply else {}
  rows, times, errors = _rows(replies)
  ratios = ratios_of(times)
  cores = os.cpu_count()
  if torch_reply:
    intra, inter = torch_reply['threads']
    torch_threads = (f'PyTorch torch.set_num_threads({cores}): {intra} '
                     f'intra-op, {inter} inter-op threads')
  else:
    torch_threads = 'PyTorch not run'
  return {
      # Other work on the machine skews the two libraries differently
      # (PyTorch's OpenMP barriers suffer most when a core is taken).
      'load_average_1min': {'before_timing': load_before,
                            'after_timing': load_after},
      # What the worker processes ran (the record's header has this
      # process's packages; the workers run the same interpreter).
      'worker_versions': {**jax_reply['versions'],
                          'torch': torch_reply['versions']['torch']
                                   if torch_reply else None},
      'jax_devices': jax_reply['devices'],
      'threads': (f'cdg_jax: {jax_reply["devices"]} CPU device(s) '
                  f'(--cpu_devices={FLAGS.cpu_devices}; XLA_FLAGS='
                  f'{jax_reply["xla_flags"]!r}), the batch sharded over '
                  f'them{_other_layouts_text(replies)}; {torch_threads}; '
                  f'each library in a fresh process per round, one alive '
                  f'at a time'),
      'flags': {'width': FLAGS.width, 'image_size': FLAGS.image_size,
                'batch_size': FLAGS.batch_size, 'model': FLAGS.model,
                'tiles': FLAGS.tiles, 'density': FLAGS.density,
                'temperature': FLAGS.temperature, 'rounds': FLAGS.rounds,
                'repeats': FLAGS.repeats, 'cpu_devices': FLAGS.cpu_devices,
                'other_cpu_devices': _other_layouts(),
                'torch_compile': FLAGS.torch_compile},
      'learning_rate': jax_reply['learning_rate'],
      'torch': {'available': torch_message is None, 'message': torch_message,
                'masked_gate_density': torch_info.get('masked_gate_density'),
                'compile_errors': {k: v for k, v in errors.items()
                                   if 'compiled' in k}},
      'rows': rows,
      'ratios': ratios,
      'sparse_vs_torch_compiled_masked': (
          ratios['sparse_vs_torch_compiled_masked'] or {}).get('paired'),
      'dense_vs_torch_compiled_dense': (
          ratios['dense_vs_torch_compiled_dense'] or {}).get('paired'),
      **best_layout_ratios(times),
      'differences': list(DIFFERENCES),
  }


def _other_layouts_text(replies: dict[str, list[dict]]) -> str:
  others = [reply[0] for name, reply in replies.items()
            if name.startswith('cdg_jax:')]
  return ''.join(f'; also on {r["devices"]} device(s) (--cpu_devices='
                 f'{r["cpu_devices"]})' for r in others)


def _seconds(call: Callable) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.worker:
    serve_worker()
  else:
    run()


if __name__ == '__main__':
  app.run(main)
