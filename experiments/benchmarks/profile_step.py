r"""Where the train step's time goes: an XLA:CPU trace of the step, op by op.

  python -m experiments.benchmarks.profile_step  # protocol, dense64, masked64, sparse64
  /root/venv-peer/bin/python -m experiments.benchmarks.profile_step  # + PyTorch per shape
  python -m experiments.benchmarks.profile_step --step_kinds=protocol --width=8 \
      --repeats=1 --out=/tmp/profile_check    # a quick check

The steps (the same programs training and the peer benchmark run):

  protocol  the CPU protocol's CDG step (configs/cpu_protocol.py, SimCLR,
            width 16, 16x16, batch 256), `step_timing.build_step`;
  dense64, masked64, sparse64
            the peer benchmark's cdg_jax steps (`benchmark_peer.JaxHalf`:
            width `--width` 64, `--image_size` 32, `--batch_size` 128
            images, tile density `--density`).

Each step is compiled and run once, timed untraced for `--repeats` steps,
then traced for `--repeats` steps with `jax.profiler`. XLA:CPU records one
trace event per executed op ("thunk") with the op's name and device; the
compiled program's text names, for every op, the source of the operations
in it (`op_name` metadata: the Flax module path, `jvp`/`transpose` for the
forward and backward passes, and the step's named scopes 'augment',
'target_branch', 'ssl_loss', 'gate_regularizer', 'optimizer', 'probe',
'metrics'). Each op goes to one category (a fusion to the category most of its
operations belong to; a transpose or copy that lays out a convolution's
operand to 'convolution operand layouts'; the sparse executor's matrix
products over tile patches to 'convolution') and to the forward or backward
pass. Times are wall-clock per step: while several ops run at once (one per
device, or concurrent ops of one device) they share the time equally, so
the categories add up to the time during which any op ran ("busy"); a
conditional or loop, whose branch ops the trace times as well, gets only
the time when none of them runs. The rest of the step (dispatch,
transfers, waiting) is "outside ops".

Convolutions: every convolution and matrix product of a convolution layer
is counted with its multiply-adds from the program's shapes, grouped by the
layer's shape (its kernel's, and its full feature map's); the machine's
GFLOP/s (both devices' FLOPs over the wall-clock time given to them) stands
beside PyTorch's for the same convolution on the whole batch
(channels_last, `torch.set_num_threads(os.cpu_count())`), forward and
backward, when torch is installed (see benchmark_peer.py).

Each run writes a new record into `--out` (`results/profile/<date>-<cpu>.json`,
`records.py`: machine, devices, XLA flags, versions, command and date in its
header) and its Markdown beside it.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags

from experiments.benchmarks import benchmark_peer
from experiments.common import records
from experiments.common import repo
from experiments.common.repo import REPO_ROOT

flags.DEFINE_list('step_kinds', ['protocol', 'dense64', 'masked64',
                                    'sparse64'],
                  'Steps to profile: protocol, dense64, masked64, sparse64.')
FLAGS = flags.FLAGS
FLAGS.set_default('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                      'profile'))
FLAGS['out'].help = ('Folder of the records: each run writes a new '
                     '<date>-<cpu>.json (records.py) and its .md.')

# The categories, in the order a tie between them is broken.
CATEGORIES = ('augmentation', 'convolution', 'convolution operand layouts',
              'batchnorm', 'gating',
              'sparse tiles (gathers, scatters, indices)',
              'projector/predictor', 'ssl loss', 'gate regulariser',
              'optimizer', 'probe', 'metrics', 'other network',
              'layout copies')
_SCOPES = (('augment', 'augmentation'), ('ssl_loss', 'ssl loss'),
           ('gate_regularizer', 'gate regulariser'),
           ('optimizer', 'optimizer'), ('probe', 'probe'),
           ('metrics', 'metrics'))


@dataclasses.dataclass(frozen=True)
class Op:
  """One op of a compiled program's entry (what a trace event names), as far
  as a profile needs it: for a fusion, what it fuses counts."""
  name: str
  opcode: str
  op_names: tuple[str, ...]   # its own and its fused operations' sources
  macs: int = 0               # its convolutions' and matrix products'
  conv_geometry: dict | None = None   # of a NHWC/HWIO convolution in it
  has_convolution: bool = False
  inherited: bool = False     # op_names taken from its operands and users
  # The convolution that reads this op's output, when the op only lays an
  # operand out for it (a transpose or copy, alone or at a fusion's root).
  lays_out_for: str | None = None
  # For a conditional, loop or call: the ops of the computations it runs,
  # nested ones included (the trace times each of them as well).
  contains: frozenset[str] = frozenset()


def _dims(shape: str) -> list[int]:
  match = re.match(r'\w+\[([\d,]*)\]', shape)
  if not match:
    return []
  return [int(d) for d in match.group(1).split(',') if d]


def _product(values) -> int:
  result = 1
  for v in values:
    result *= v
  return result


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  op_name: str | None


def _instruction(line: str) -> _Instruction | None:
  match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', line)
  if not match:
    return None
  name, rest = match.groups()
  if rest.startswith('('):   # a tuple shape
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 2:]
  else:
    shape, _, rest = rest.partition(' ')
  opcode, _, rest = rest.partition('(')
  operands = tuple(re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0]))
  op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
  return _Instruction(name, shape, opcode, operands, rest,
                      op_name.group(1) if op_name else None)


def _instruction_macs(inst: _Instruction, shapes: dict[str, str]) -> int:
  """Multiply-adds of a convolution or matrix product, from its shapes."""
  out = _product(_dims(inst.shape))
  if inst.opcode == 'convolution':
    kernel = _dims(shapes[inst.operands[1]])
    labels = re.search(r'dim_labels=\w+_(\w+)->', inst.attributes).group(1)
    return out * _product(kernel) // kernel[labels.index('o')]
  if inst.opcode == 'dot':
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}',
                            inst.attributes).group(1)
    lhs = _dims(shapes[inst.operands[0]])
    return out * _product(lhs[int(d)] for d in contracting.split(',') if d)
  return 0


def _geometry(inst: _Instruction, shapes: dict[str, str]) -> dict | None:
  """Batch, size, channels, kernel and stride of a NHWC x HWIO convolution
  (a forward pass's layout; weight gradients share it, so callers keep only
  forward ops)."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->', inst.attributes)
  if (inst.opcode != 'convolution' or labels.group(1) != 'b01f'
      or labels.group(2) != '01io'):
    return None
  batch, height, width, channels_in = _dims(shapes[inst.operands[0]])
  kernel = _dims(shapes[inst.operands[1]])
  stride = re.search(r'stride=(\d+)x\d+', inst.attributes)
  return {'batch': batch, 'height': height, 'width': width,
          'channels_in': channels_in, 'channels_out': kernel[3],
          'kernel': kernel[0], 'stride': int(stride.group(1)) if stride else 1}


def parse_hlo(text: str) -> dict[str, Op]:
  """Every instruction of a compiled HLO module's text, by name, with what
  the operations it calls (a fusion's) contribute."""
  computations, current = collections.defaultdict(list), None
  roots = {}
  for line in text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if header and ' = ' not in line.split('{')[0]:
      current = header.group(1)
      continue
    inst = _instruction(line) if current else None
    if inst is not None:
      computations[current].append(inst)
      if line.lstrip().startswith('ROOT '):
        roots[current] = inst.opcode
  fused = {m.group(1) for instructions in computations.values()
           for inst in instructions if inst.opcode == 'fusion'
           for m in [re.search(r'calls=%?([\w.\-]+)', inst.attributes)] if m}
  ops = {}
  for computation, instructions in computations.items():
    if computation in fused:   # counted with the fusion that calls it
      continue
    shapes = {inst.name: inst.shape for inst in instructions}
    for inst in instructions:
      called = re.search(r'calls=%?([\w.\-]+)', inst.attributes)
      inner = computations.get(called.group(1), []) if called else []
      inner_shapes = {i.name: i.shape for i in inner}
      names = tuple(n for n in [inst.op_name] + [i.op_name for i in inner]
                    if n)
      geometries = [g for g in [_geometry(inst, shapes)]
                    + [_geometry(i, inner_shapes) for i in inner] if g]
      ops[inst.name] = Op(
          inst.name, inst.opcode, names,
          _instruction_macs(inst, shapes)
          + sum(_instruction_macs(i, inner_shapes) for i in inner),
          geometries[0] if geometries else None,
          any(i.opcode == 'convolution' for i in [inst] + inner))
    # XLA leaves some ops it creates (weight-gradient convolutions among
    # them) without a source: they take their operands' and users'.
    users = collections.defaultdict(list)
    for inst in instructions:
      for operand in inst.operands:
        users[operand].append(inst.name)
    for inst in instructions:
      if ops[inst.name].op_names:
        continue
      neighbours = [n for other in list(inst.operands) + users[inst.name]
                    for n in ops[other].op_names if other in ops]
      ops[inst.name] = dataclasses.replace(
          ops[inst.name], op_names=tuple(neighbours), inherited=True)
    _mark_operand_layouts(instructions, roots, ops)
  for computation, instructions in computations.items():
    for inst in instructions:
      inner = _called_ops(inst, computations)
      if inner:
        ops[inst.name] = dataclasses.replace(ops[inst.name], contains=inner)
  return ops


_CALLED = re.compile(r'(?:branch_computations=\{([^}]*)\}|'
                     r'(?:true_computation|false_computation|body|condition'
                     r')=%?([\w.\-]+))')


def _called_ops(inst: _Instruction, computations: dict) -> frozenset[str]:
  """The instructions of the computations a conditional, loop or call
  runs, nested ones included; empty for any other op."""
  if inst.opcode not in ('conditional', 'while', 'call'):
    return frozenset()
  names = []
  for branches, single in _CALLED.findall(inst.attributes):
    names += [n.strip().lstrip('%') for n in branches.split(',')] + [single]
  if inst.opcode == 'call':
    called = re.search(r'to_apply=%?([\w.\-]+)', inst.attributes)
    names += [called.group(1)] if called else []
  inner = set()
  for name in filter(None, names):
    for called_inst in computations.get(name, []):
      inner.add(called_inst.name)
      inner |= _called_ops(called_inst, computations)
  return frozenset(inner)


def _mark_operand_layouts(instructions: list[_Instruction],
                          roots: dict[str, str], ops: dict[str, Op]) -> None:
  """Marks the ops that only transpose or copy a convolution's operand
  (`Op.lays_out_for`). XLA:CPU's weight-gradient convolutions take their
  input batch-minor (CHWN), and XLA fuses the recomputation of the layer's
  BatchNorm and ReLU into that transpose, so by its sources such an op would
  count as BatchNorm."""
  by_name = {inst.name: inst for inst in instructions}
  for inst in instructions:
    if inst.opcode != 'convolution' and not ops[inst.name].has_convolution:
      continue
    for operand in inst.operands:
      source = by_name.get(operand)
      if source is None:
        continue
      called = re.search(r'calls=%?([\w.\-]+)', source.attributes)
      opcode = (roots.get(called.group(1)) if source.opcode == 'fusion'
                and called else source.opcode)
      if opcode in ('transpose', 'copy'):
        ops[operand] = dataclasses.replace(ops[operand],
                                           lays_out_for=inst.name)


def _category_of_name(op_name: str) -> str:
  for scope, category in _SCOPES:
    if re.search(rf'(^|/|\(){scope}(/|\)|$)', op_name):
      return category
  if 'SSLNetwork' not in op_name:
    return 'other network' if 'target_branch' in op_name else 'layout copies'
  layer_path = op_name.split('SSLNetwork', 1)[1]
  if re.search(r'/(\w*_)?bn\d*(/|$)', layer_path):
    return 'batchnorm'
  if 'conditional_at_open_tiles' in layer_path or '/cond/' in layer_path:
    return 'sparse tiles (gathers, scatters, indices)'
  if '._cdg' in layer_path or 'gate' in layer_path:
    return 'gating'
  if '/projector' in layer_path or '/predictor' in layer_path:
    return 'projector/predictor'
  return 'other network'


def classify(op: Op, ops: dict[str, Op] | None = None) -> tuple[str, str]:
  """(category, 'forward' or 'backward') of one op: by majority over its
  operations' sources, ties broken in `CATEGORIES` order; an op that lays
  out a convolution's operand is 'convolution operand layouts', in the pass
  of that convolution (found in `ops`)."""
  if op.lays_out_for is not None and ops and op.lays_out_for in ops:
    return ('convolution operand layouts',
            classify(ops[op.lays_out_for])[1])
  if not op.op_names:
    return 'layout copies', 'forward'
  if _is_convolution(op):
    category = 'convolution'
  else:
    votes = collections.Counter(_category_of_name(n)
                                for n in op.op_names)
    category = max(votes, key=lambda c: (votes[c], -CATEGORIES.index(c)))
  backward = sum('transpose(' in n for n in op.op_names)
  if op.inherited:   # one backward neighbour makes an op of the backward pass
    return category, 'backward' if backward else 'forward'
  return category, 'backward' if 2 * backward > len(op.op_names) else 'forward'


def _is_convolution(op: Op) -> bool:
  """A convolution, or matrix products of one: a backbone layer's own (the
  'patches' formulation, `ops.auto_formulation`'s for strided layers; the
  backbone has no other matrix products), or the sparse executor's over the
  open tiles' patches (inside its capacity `cond`)."""
  return op.has_convolution or bool(op.macs and any(
      'conv_general_dilated' in n or '/cond/' in n
      or ('/backbone/' in n and 'dot_general' in n) for n in op.op_names))


def conv_layer(op: Op) -> str | None:
  """The Flax path of the convolution layer an op belongs to, or None."""
  if not _is_convolution(op):
    return None
  for name in op.op_names:
    if 'SSLNetwork' in name:
      layer = []
      for part in name.split('SSLNetwork', 1)[1].strip(')/').split('/')[:-1]:
        if part in ('cond', 'while', 'shard_map') or '(' in part:
          break   # the sparse executor's own structure starts here
        if layer and part.startswith(f'{layer[-1]}._'):
          break   # the layer's own methods ('conv1._plain/bn1/...')
        if '.' not in part:   # not a module's method ('block.shortcut')
          layer.append(part)
      return '/'.join(layer)
  return None


def read_trace(trace_dir: str, module_prefix: str = 'jit_') -> list[dict]:
  """The executed ops of a `jax.profiler` trace written with
  `create_perfetto_trace=True`: {'op', 'device', 'start', 'end'} (s).

  XLA:CPU records an event when an op starts (its duration covers the
  launch only: a convolution may run on the thread pool after it) and an
  'end: <op>' event when it completes, on whichever thread completes it,
  with no device. The k-th start of an op is paired with its k-th end; a
  pairing across devices would swap equal ops, which changes no total.
  """
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f'No perfetto_trace.json.gz under {trace_dir}.')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for e in events:
    if e.get('ph') != 'X':
      continue
    args = e.get('args', {})
    if 'hlo_op' in args:
      if str(args.get('hlo_module', '')).startswith(module_prefix):
        starts[args['hlo_op']].append(
            (e['ts'] * 1e-6, int(args.get('device_ordinal', 0))))
    elif e['name'].startswith('end: '):
      ends[e['name'][len('end: '):]].append(e['ts'] * 1e-6)
  executed = []
  for op, op_starts in starts.items():
    op_starts.sort()
    op_ends = sorted(ends.get(op, []))
    for k, (start, device) in enumerate(op_starts):
      end = next((t for t in op_ends[k:k + 1] if t >= start), start)
      executed.append({'op': op, 'device': device, 'start': start,
                       'end': end})
  return executed


def wall_shares(executed: list[dict],
                contains: dict[str, frozenset[str]] | None = None
                ) -> dict[str, float]:
  """Seconds of wall-clock time per op name, over all executions: at each
  instant the ops running share it equally, so the total is the time during
  which any op ran (ops of both devices and concurrent ops of one device
  never count twice). An op that runs others (`contains`: a conditional's
  branch ops) gets only the instants when none of them runs on its device:
  its own work, not theirs."""
  contains = contains or {}
  boundaries = []
  for i, e in enumerate(executed):
    boundaries += [(e['start'], 1, i), (e['end'], -1, i)]
  boundaries.sort(key=lambda b: (b[0], b[1]))
  shares = collections.defaultdict(float)
  active, last = set(), None
  for t, kind, i in boundaries:
    if active and last is not None and t > last:
      running = [j for j in active if not _runs_inner_op(j, active, executed,
                                                          contains)]
      share = (t - last) / len(running)
      for j in running:
        shares[executed[j]['op']] += share
    last = t
    if kind > 0:
      active.add(i)
    else:
      active.discard(i)
  return shares


def _runs_inner_op(index: int, active: set[int], executed: list[dict],
                   contains: dict[str, frozenset[str]]) -> bool:
  """Whether the op execution `index` is running one of its inner ops now
  (one of `active` on its device)."""
  inner = contains.get(executed[index]['op'])
  device = executed[index]['device']
  return bool(inner) and any(
      executed[j]['op'] in inner and executed[j]['device'] == device
      for j in active if j != index)


def attribute(ops: dict[str, Op], executed: list[dict], steps: int,
              kernels: dict[str, tuple[int, ...]]) -> dict:
  """Per step: wall-clock seconds by (category, pass) (`wall_shares`), the
  time any op ran, and each convolution layer's seconds and multiply-adds
  (both devices) by pass; `kernels` maps layer paths
  ('backbone/stage1_block0/conv1') to kernel shapes."""
  devices = sorted({e['device'] for e in executed}) or [0]
  by_category = collections.defaultdict(float)
  layers = collections.defaultdict(lambda: collections.defaultdict(float))
  executions = collections.Counter(e['op'] for e in executed)
  top_ops = []
  contains = {name: op.contains for name, op in ops.items() if op.contains}
  for name, seconds in wall_shares(executed, contains).items():
    op = ops.get(name)
    category, direction = (classify(op, ops) if op is not None
                           else ('other network', 'forward'))
    by_category[(category, direction)] += seconds / steps
    top_ops.append({'op': name, 'opcode': op.opcode if op else None,
                    'category': category, 'pass': direction,
                    'seconds': seconds / steps,
                    'source': op.op_names[0] if op and op.op_names else None})
    layer = conv_layer(op) if op is not None else None
    if layer is not None:
      layers[layer][f'{direction}_s'] += seconds / steps
      layers[layer][f'{direction}_macs'] += (op.macs * executions[name]
                                             / steps)
  # A layer's geometry: its kernel's (`kernels`), and the batch, size and
  # stride of its forward convolution over the whole feature map (a sparse
  # layer's other convolutions run on gathered tiles).
  full_map = {}
  for op in ops.values():
    layer, geometry = conv_layer(op), op.conv_geometry
    if (layer is None or geometry is None or layer not in kernels
        or any('transpose(' in n for n in op.op_names)):
      continue
    size = geometry['batch'] * geometry['height'] * geometry['width']
    if size > full_map.get(layer, (0, None))[0]:
      full_map[layer] = (size, geometry)
  for layer, (_, geometry) in full_map.items():
    kernel = kernels[layer]
    layers[layer]['shape'] = dict(geometry, kernel=kernel[0],
                                  channels_in=kernel[2],
                                  channels_out=kernel[3])
  top_ops.sort(key=lambda o: -o['seconds'])
  return {'top_ops': top_ops[:25], 'devices': len(devices),
          'busy_s': sum(by_category.values()),
          'categories': {f'{c}|{d}': s for (c, d), s in by_category.items()},
          'layers': {k: dict(v) for k, v in layers.items()}}


def shape_table(layers: dict, devices: int) -> list[dict]:
  """The convolution layers grouped by shape: time, multiply-adds, the
  machine's GFLOP/s forward and backward."""
  groups = collections.OrderedDict()
  for layer, record in sorted(layers.items()):
    shape = record.get('shape')
    if shape is None:
      continue
    key = (shape['height'], shape['width'], shape['channels_in'],
           shape['channels_out'], shape['kernel'], shape['stride'])
    group = groups.setdefault(key, {
        'shape': dict(shape, batch=shape['batch'] * devices), 'layers': 0,
        'forward_s': 0.0, 'backward_s': 0.0, 'forward_macs': 0.0,
        'backward_macs': 0.0})
    group['layers'] += 1
    for k in ('forward_s', 'backward_s', 'forward_macs', 'backward_macs'):
      group[k] += record.get(k, 0.0)
  for group in groups.values():
    for direction in ('forward', 'backward'):
      seconds = group[f'{direction}_s']
      group[f'{direction}_gflops'] = (
          2 * group[f'{direction}_macs'] / seconds / 1e9 if seconds else None)
  return list(groups.values())


def torch_conv_gflops(torch, shape: dict, repeats: int) -> dict:
  """PyTorch's GFLOP/s on one convolution, forward and backward (input
  gradient unless it reads the images, and weight gradient), channels_last,
  median of `repeats` after one warm-up."""
  n, h, w = shape['batch'], shape['height'], shape['width']
  cin, cout, k, s = (shape['channels_in'], shape['channels_out'],
                     shape['kernel'], shape['stride'])
  conv = torch.nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False).to(
      memory_format=torch.channels_last)
  x = torch.randn(n, cin, h, w).to(memory_format=torch.channels_last)
  x.requires_grad_(cin != 3)
  out_hw = (h + s - 1) // s, (w + s - 1) // s
  macs_forward = n * out_hw[0] * out_hw[1] * cout * cin * k * k
  macs_backward = macs_forward * (2 if cin != 3 else 1)
  forward, backward = [], []
  for i in range(repeats + 1):
    start = time.perf_counter()
    y = conv(x)
    middle = time.perf_counter()
    y.backward(torch.ones_like(y))
    end = time.perf_counter()
    if i:
      forward.append(middle - start)
      backward.append(end - middle)
  return {'forward_gflops': 2 * macs_forward / statistics.median(forward) / 1e9,
          'backward_gflops': (2 * macs_backward / statistics.median(backward)
                              / 1e9)}


def _protocol_step():
  from experiments.common import step_timing  # pylint: disable=g-import-not-at-top
  config = repo.protocol_config()
  if FLAGS['width'].present:
    config.model.width = FLAGS.width
  step, state, batch = step_timing.build_step(config)
  return step, state, batch, (f"CPU protocol CDG step: SimCLR, width "
                              f"{config.model.width}, "
                              f"{config.data.image_size}x"
                              f"{config.data.image_size}, batch "
                              f"{config.batch_size} images")


def kernel_shapes(params) -> dict[str, tuple[int, ...]]:
  """{layer path: kernel shape} of every 4-D `kernel` in a parameter tree."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, 'key', str(k)) for k in path]
    if keys[-1] == 'kernel' and len(leaf.shape) == 4:
      shapes['/'.join(keys[:-1])] = tuple(leaf.shape)
  return shapes


def profile(step, state, batch, repeats: int, donated: bool) -> dict:
  """Untraced median step time, then a traced run's attribution. A `donated`
  step is fed its own output state; any other starts from `state` each time
  (as the peer benchmark times it)."""
  import jax  # pylint: disable=g-import-not-at-top
  holder = [state]

  def call():
    new_state, metrics = step(holder[0], batch)
    # The whole output: a step that starts from the same state each time
    # must not overlap the next one.
    jax.block_until_ready((new_state, metrics))
    if donated:
      holder[0] = new_state

  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  trace_dir = tempfile.mkdtemp(prefix='profile_step_')
  try:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(repeats):
      call()
    jax.profiler.stop_trace()
    events = read_trace(trace_dir)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  ops = parse_hlo(step.lower(holder[0], batch).compile().as_text())
  result = attribute(ops, events, repeats, kernel_shapes(holder[0].params))
  result.update(step_s=statistics.median(times), first_step_s=first,
                outside_ops_s=max(0.0, statistics.median(times)
                                  - result['busy_s']))
  result['shapes'] = shape_table(result['layers'], result['devices'])
  return result


def _ms(value) -> str:
  return '-' if value is None else f'{1e3 * value:.1f}'


def _number(value, fmt='.1f') -> str:
  return '-' if value is None else format(value, fmt)


def write_report(result: dict, out: str, devices: dict | None = None) -> str:
  """Writes a new record of `result` into `out`, its Markdown beside it;
  returns the record's path."""
  return records.write_record(out, 'profile', result, render=render,
                              devices=devices)


def render(result: dict) -> str:
  """The Markdown of a profile record."""
  lines = ['# Where the train step\'s time goes', '',
           *records.header_lines(result),
           '', 'Wall-clock ms per step; ops running at once share the time '
           'equally, so the categories add up to "busy", the time any op '
           'ran; "outside ops": the rest of the step (dispatch, transfers, '
           'waiting). Method: experiments/benchmarks/profile_step.py\'s '
           'docstring.', '']
  for name, record in result['steps'].items():
    busy = record['busy_s']
    lines += [f"## {name}: {record['description']}", '',
              f"Step {_ms(record['step_s'])} ms wall-clock (median of "
              f"{result['repeats']} untraced), {record['devices']} "
              f"device(s), busy {_ms(busy)} ms, outside ops "
              f"{_ms(record['outside_ops_s'])} ms.", '',
              '| category | forward ms | backward ms | total ms | share of '
              'busy |', '| --- | --- | --- | --- | --- |']
    categories = record['categories']
    for category in CATEGORIES:
      forward = categories.get(f'{category}|forward', 0.0)
      backward = categories.get(f'{category}|backward', 0.0)
      if forward + backward == 0:
        continue
      lines.append(f'| {category} | {_ms(forward)} | {_ms(backward)} | '
                   f'{_ms(forward + backward)} | '
                   f'{100 * (forward + backward) / busy:.1f}% |')
    lines += ['', 'The ten longest ops (source: the first operation\'s '
              '`op_name`, shortened):', '',
              '| op | opcode | category | pass | ms | source |',
              '| --- | --- | --- | --- | --- | --- |']
    for top in record['top_ops'][:10]:
      source = (top['source'] or '-').replace('jit(train_step)/', '')
      lines.append(f"| {top['op']} | {top['opcode']} | {top['category']} | "
                   f"{top['pass']} | {_ms(top['seconds'])} | "
                   f"{source[-90:]} |")
    lines += ['', 'Convolution layers by shape (batch: both devices; '
              'GFLOP/s: the machine\'s; PyTorch: the same convolution, '
              'channels_last, whole batch):', '',
              '| shape (N, HxW, Cin->Cout, k, stride) | layers | forward ms '
              '| backward ms | GFLOP/s forward | GFLOP/s backward | PyTorch '
              'forward | PyTorch backward |',
              '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for group in record['shapes']:
      shape, peer = group['shape'], group.get('torch') or {}
      lines.append(
          f"| {shape['batch']}, {shape['height']}x{shape['width']}, "
          f"{shape['channels_in']}->{shape['channels_out']}, "
          f"{shape['kernel']}, {shape['stride']} | {group['layers']} | "
          f"{_ms(group['forward_s'])} | {_ms(group['backward_s'])} | "
          f"{_number(group['forward_gflops'])} | "
          f"{_number(group['backward_gflops'])} | "
          f"{_number(peer.get('forward_gflops'))} | "
          f"{_number(peer.get('backward_gflops'))} |")
    lines.append('')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = set(FLAGS.step_kinds) - {'protocol', 'dense64', 'masked64',
                                         'sparse64'}
  if unknown:
    raise app.UsageError(f'Unknown steps configs {sorted(unknown)}; expected '
                         f'protocol, dense64, masked64, sparse64.')
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu(FLAGS.cpu_devices)   # before JAX starts
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = None
  if FLAGS.torch and benchmark_peer.torch_available():
    import torch  # pylint: disable=g-import-not-at-top
  if torch is None:
    print(benchmark_peer.TORCH_MISSING if FLAGS.torch else
          'PyTorch column skipped (--notorch)', flush=True)
  else:
    torch.set_num_threads(os.cpu_count() or 1)
  steps = {}
  if 'protocol' in FLAGS.step_kinds:
    step, state, batch, description = _protocol_step()
    steps['protocol'] = (step, state, batch, description, True)
  wide = [n for n in ('dense64', 'masked64', 'sparse64')
          if n in FLAGS.step_kinds]
  if wide:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (FLAGS.batch_size, FLAGS.image_size,
                                   FLAGS.image_size, 3), np.uint8)
    labels = rng.integers(0, 10, (FLAGS.batch_size,)).astype(np.int32)
    half = benchmark_peer.JaxHalf(images, labels)
    for name in wide:
      step, state = half.steps[f"cdg_jax/{name.removesuffix('64')}"]
      steps[name] = (step, state, half.batch,
                     f"peer benchmark's cdg_jax {name.removesuffix('64')} "
                     f"step: SimCLR, width {FLAGS.width}, "
                     f"{FLAGS.image_size}x{FLAGS.image_size}, batch "
                     f"{FLAGS.batch_size} images, tile density "
                     f"{FLAGS.density} where gated", False)
  result = {'flags': {'step_kinds': FLAGS.step_kinds, 'width': FLAGS.width,
                      'image_size': FLAGS.image_size,
                      'batch_size': FLAGS.batch_size,
                      'density': FLAGS.density, 'tiles': FLAGS.tiles,
                      'cpu_devices': FLAGS.cpu_devices,
                      'torch': torch is not None},
            'repeats': FLAGS.repeats, 'steps': {}}
  devices = {name: records.devices_of(state)
             for name, (_, state, *_) in steps.items()}
  for name, (step, state, batch, description, donated) in steps.items():
    print(f'{name}: compiling, timing and tracing', flush=True)
    record = profile(step, state, batch, FLAGS.repeats, donated)
    record['description'] = description
    if torch is not None:
      for group in record['shapes']:
        group['torch'] = torch_conv_gflops(torch, group['shape'],
                                           FLAGS.repeats)
    result['steps'][name] = record
    print(f"{name}: step {record['step_s']:.3f} s, busy "
          f"{record['busy_s']:.3f} s", flush=True)
  first = next(iter(devices.values()), None)
  if first is not None and any(d['count'] != first['count']
                               for d in devices.values()):
    first = {**first, 'by_step': {n: d['count'] for n, d in devices.items()}}
  path = write_report(result, FLAGS.out, first)
  records.print_record(path)


if __name__ == '__main__':
  app.run(main)
