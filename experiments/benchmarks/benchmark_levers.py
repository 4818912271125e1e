r"""Train-step time under XLA:CPU options and device counts, and their numerics.

  python -m experiments.benchmarks.benchmark_levers  # ~20 min, 2 cores
  python -m experiments.benchmarks.benchmark_levers --steps=2 --repeats=1 \
      --steps_configs=protocol --levers=default,onednn_custom_call \
      --out=/tmp/levers                                       # a quick check

Times the train step of each `--steps_configs` entry under each lever of
`--levers` (see LEVERS), every lever in a process of its own (XLA's flags
are read once, when its CPU backend starts), the levers in turn within every
repeat so that ratios compare like with like on a machine whose speed
drifts. Each process compiles the step, runs one step, then times `--steps`
steps (median). The loss after those steps, from the same state and batch,
shows whether a lever changes numerics (0 difference: bit-identical).

  protocol  the CPU protocol's CDG step: SimCLR, CIFAR ResNet-18 width 16,
            16x16, batch 256 images (`configs/cpu_protocol.py:simclr_cifar10`,
            synthetic images of that shape);
  dense64   the dense SimCLR step of CIFAR ResNet-18 width 64, 32x32, batch
            128 images (the peer benchmark's dense step).

Each run writes a new record into `--out` (`results/levers/<date>-<cpu>.json`,
`records.py`: machine, versions, command and date in its header; its
`devices` and `xla_flags` are those the 'default' lever's processes
reported, each lever's own are in the figures) and its Markdown beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

from absl import app
from absl import flags

from experiments.common import records
from experiments.common import repo
from experiments.common.repo import REPO_ROOT

# name -> (XLA_FLAGS added for CPU, host devices: 0 = one per core,
#          environment variables set).
_XLA_CONV = {'CDG_JAX_CONV_FORMULATION': 'xla'}
_YNN_CONV = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'
_MALLOC_KEEP = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
LEVERS = {
    'default': ('', 0, {}),
    'one_device': ('', 1, {}),
    'onednn_custom_call': ('--xla_cpu_experimental_onednn_custom_call=true', 0,
                           {}),
    'use_onednn': ('--xla_cpu_use_onednn=true', 0, {}),
    'onednn_both': ('--xla_cpu_use_onednn=true '
                    '--xla_cpu_experimental_onednn_custom_call=true', 0, {}),
    'xnnpack': ('--xla_cpu_use_xnnpack=true', 0, {}),
    # XLA's convolution everywhere (the default picks per shape:
    # `cdg_jax.gating.ops.auto_formulation`).
    'conv_xla': ('', 0, _XLA_CONV),
    'conv_xla_one_device': ('', 1, _XLA_CONV),
    'conv_patches': ('', 0, {'CDG_JAX_CONV_FORMULATION': 'patches'}),
    # XLA:CPU's own default, YNNPACK's convolution kernels (the project's
    # default, `cdg_jax.run.parallel.configure_cpu`, uses XLA's own): with
    # the per-shape formulation, and with XLA's convolution everywhere (the
    # main branch before issue 40).
    'ynn_conv': (_YNN_CONV, 0, {}),
    'ynn_conv_xla': (_YNN_CONV, 0, _XLA_CONV),
    # glibc's allocator (tunables are read when a process starts). The step's
    # large buffers (a width-64 activation is 32 MiB per device) are mmap'd
    # and unmapped every step: each step faults in fresh pages.
    # Transparent huge pages for malloc's memory (the kernel's 'madvise'
    # mode): 2 MiB pages, 512x fewer faults.
    'malloc_hugetlb': ('', 0, {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}),
    # No mmap'd chunks and no trimming: freed buffers stay mapped for reuse.
    'malloc_no_mmap': ('', 0, {'GLIBC_TUNABLES': _MALLOC_KEEP}),
    'malloc_no_mmap_hugetlb': ('', 0, {
        'GLIBC_TUNABLES': _MALLOC_KEEP + ':glibc.malloc.hugetlb=1'}),
    # The same in one arena: threads' arenas are mmap'd heaps, which grow
    # and shrink by mapping whatever the tunables say.
    'malloc_one_arena': ('', 0, {
        'GLIBC_TUNABLES': _MALLOC_KEEP + ':glibc.malloc.arena_max=1'}),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags: defined when run, not on import (tests import the
  module beside other benchmarks that define `--repeats`, `--out`)."""
  flags.DEFINE_list('levers', list(LEVERS),
                    f'Levers to time: {list(LEVERS)}.')
  flags.DEFINE_list('steps_configs', ['protocol', 'dense64'],
                    'Steps to time: protocol, dense64.')
  flags.DEFINE_integer('steps', 4, 'Timed steps per process.')
  flags.DEFINE_integer('repeats', 2, 'Processes per lever and step.')
  flags.DEFINE_string('out', os.path.join(REPO_ROOT, 'experiments', 'results',
                                          'levers'),
                      'Folder of the records: each run writes a new '
                      '<date>-<cpu>.json (records.py) and its .md.')
  # Internal: set in the child processes.
  flags.DEFINE_string('child', '', 'Time this steps config in this process.')


def _config(name: str):
  from cdg_jax.run import config_lib  # pylint: disable=g-import-not-at-top
  if name == 'protocol':
    return repo.protocol_config()
  if name == 'dense64':
    config = config_lib.recipe_config('simclr', 'cifar10')
    config = config_lib.apply_variants(config, 'dense')
    config.batch_size = 128
    config.num_steps = 1000
    return config
  raise ValueError(f'Unknown steps config {name!r}; expected protocol or '
                   f'dense64.')


def _child(name: str) -> dict:
  from cdg_jax.run import parallel  # pylint: disable=g-import-not-at-top
  # The project's flags where the lever does not set its own.
  parallel.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.common import step_timing  # pylint: disable=g-import-not-at-top
  result = step_timing.time_step(_config(name), FLAGS.steps)
  result['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  result['backend'] = jax.default_backend()
  return result


def _run_child(name: str, lever: str) -> dict:
  extra, devices, variables = LEVERS[lever]
  devices = devices or os.cpu_count() or 1
  # The lever's flags after the user's own, which the benchmark keeps.
  env = dict(os.environ, **variables)
  env['XLA_FLAGS'] = ' '.join(filter(None, (
      env.get('XLA_FLAGS', ''), extra,
      f'--xla_force_host_platform_device_count={devices}')))
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, (REPO_ROOT,
                                                    env.get('PYTHONPATH'))))
  start = time.time()
  process = subprocess.run(
      repo.module_command(__spec__.name) + [f'--child={name}',
                                            f'--steps={FLAGS.steps}'],
      env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  if process.returncode != 0:
    return {'error': process.stderr.strip().splitlines()[-1:] or ['?'],
            'wall_s': time.time() - start}
  lines = [l for l in process.stdout.splitlines() if l.startswith('{')]
  return {**json.loads(lines[-1]), 'wall_s': time.time() - start}


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
  """Per steps config and lever: median step time over the repeats, the
  median of the per-repeat ratios to 'default' (above 1: faster), and the
  loss difference to 'default'."""
  table = {}
  for name, by_lever in runs.items():
    base = by_lever.get('default', [])
    table[name] = {}
    for lever, results in by_lever.items():
      good = [r for r in results if 'error' not in r]
      if not good:
        table[name][lever] = {'error': results[0].get('error')}
        continue
      ratios = [b['median_step_s'] / r['median_step_s']
                for b, r in zip(base, results)
                if 'error' not in b and 'error' not in r]
      losses = [r['loss'] for r in good]
      table[name][lever] = {
          'median_step_s': statistics.median(r['median_step_s'] for r in good),
          'speedup_vs_default': statistics.median(ratios) if ratios else None,
          'loss': losses[0],
          'loss_diff_vs_default': (losses[0] - base[0]['loss']
                                   if base and 'error' not in base[0]
                                   else None),
          'first_step_s': statistics.median(r['first_step_s'] for r in good),
          # None for results written before the count was recorded.
          'minor_faults_per_step': (
              statistics.median(r['minor_faults_per_step'] for r in good)
              if all(r.get('minor_faults_per_step') is not None
                     for r in good) else None),
      }
  return table


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(_child(FLAGS.child)), flush=True)
    return
  unknown = [l for l in FLAGS.levers if l not in LEVERS]
  if unknown:
    raise app.UsageError(f'Unknown --levers {unknown}; expected any of '
                         f'{list(LEVERS)}.')
  levers = ['default'] + [l for l in FLAGS.levers if l != 'default']
  runs: dict[str, dict[str, list[dict]]] = {
      name: {lever: [] for lever in levers} for name in FLAGS.steps_configs}
  for repeat in range(FLAGS.repeats):
    for name in FLAGS.steps_configs:
      for lever in levers:
        result = _run_child(name, lever)
        runs[name][lever].append(result)
        shown = (f'{result["median_step_s"]:.3f} s/step' if 'error' not in
                 result else f'failed: {result["error"]}')
        print(f'[repeat {repeat + 1}/{FLAGS.repeats}] {name} {lever}: '
              f'{shown}', flush=True)
  path = write_report(runs, FLAGS.out, {
      'levers': FLAGS.levers, 'steps_configs': FLAGS.steps_configs,
      'steps': FLAGS.steps, 'repeats': FLAGS.repeats})
  records.print_record(path)


def devices_and_flags(runs: dict[str, dict[str, list[dict]]]
                       ) -> tuple[dict, str | None]:
  """The header's devices (the 'default' lever's processes', with every
  lever's count under 'by_lever') and XLA flags (the 'default' lever's)."""
  by_lever, default_flags = {}, None
  for by_name in runs.values():
    for lever, results in by_name.items():
      for result in results:
        if 'devices' in result:
          by_lever.setdefault(lever, result['devices'])
        if lever == 'default' and default_flags is None:
          default_flags = result.get('xla_flags')
  return {'platform': 'cpu', 'count': by_lever.get('default'),
          'processes': 1, 'by_lever': by_lever}, default_flags


def write_report(runs: dict[str, dict[str, list[dict]]], out: str,
                 flag_values: dict) -> str:
  """Writes a new record of the processes' results `runs` (steps config ->
  lever -> one result per repeat) and their summary into `out`, its
  Markdown beside it; returns the record's path."""
  used = {lever for by_lever in runs.values() for lever in by_lever}
  devices, xla_flags = devices_and_flags(runs)
  return records.write_record(
      out, 'levers',
      {'flags': flag_values,
       # What each lever set (XLA flags added, host devices: 0 = one per
       # core, environment variables).
       'levers': {lever: {'xla_flags': LEVERS[lever][0],
                          'host_devices': LEVERS[lever][1],
                          'environment': LEVERS[lever][2]}
                  for lever in LEVERS if lever in used},
       'summary': summarise(runs), 'runs': runs},
      render=render, devices=devices, xla_flags=xla_flags)


def render(record: dict) -> str:
  """The Markdown of a levers record."""
  f_ = record['flags']
  lines = ['# XLA:CPU levers', '', *records.header_lines(record), '',
           f'Median of {f_["steps"]} steps per process, {f_["repeats"]} '
           f'processes per lever, levers in turn; speed-up: median of the '
           f'per-repeat ratios to the default (above 1: faster); loss '
           f'difference after the timed steps (0: bit-identical).', '',
           '| step | lever | XLA flags, devices, environment | step (s) | speed-up | '
           'loss difference | first step (s) | minor page faults per step |',
           '| --- |' + ' --- |' * 7]
  for name, by_lever in record['summary'].items():
    for lever, row in by_lever.items():
      lever_setting = record.get('levers', {}).get(lever, {})
      setting = ', '.join(
          [lever_setting.get('xla_flags') or '-',
           str(lever_setting.get('host_devices') or 'one per core')]
          + [f'{k}={v}' for k, v in
             (lever_setting.get('environment') or {}).items()])
      if 'error' in row:
        lines.append(f'| {name} | {lever} | {setting} | failed: '
                     f'{row["error"]} | | | | |')
        continue
      speedup = ('-' if row['speedup_vs_default'] is None
                 else f'{row["speedup_vs_default"]:.2f}x')
      diff = ('-' if row['loss_diff_vs_default'] is None
              else f'{row["loss_diff_vs_default"]:.2e}')
      lines.append(f'| {name} | {lever} | {setting} | '
                   f'{row["median_step_s"]:.3f} | {speedup} | {diff} | '
                   f'{row["first_step_s"]:.1f} | '
                   + ('-' if row['minor_faults_per_step'] is None
                      else f'{row["minor_faults_per_step"]:.0f}') + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  define_flags()
  app.run(main)
