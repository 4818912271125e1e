"""Test set-up: two host CPU devices, so multi-device tests can compare 1 vs 2.

XLA reads the flag when JAX initialises its backends, so it is set here, before
any test module imports JAX. Single-device code is unaffected: uncommitted
arrays live on device 0.
"""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2').strip()
# The tests' networks are tiny, so XLA's CPU backend optimisations cost far
# more compile time than they save run time (a smoke run: 54 s -> 35 s on the
# 2-core machine). Numerics shift by rounding only; every test compares runs
# compiled with the same flags or against references with a tolerance.
# Subprocesses inherit the flags; a test that needs another device count takes
# them from tests/xla_env.py with the count replaced.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
# For the same reason, XLA:CPU's older loop emitters instead of its MLIR
# fusion emitters: the smoke run's train step compiles in 4.2 s instead of
# 7.9 s, and the smoke run takes 23 s instead of 29 s (AMD EPYC, 2 cores,
# 2026-12-07). Rounding differs (the smoke run's kNN moves by a test image
# or two); nothing a test compares is compiled one way against the other.
if '--xla_cpu_use_fusion_emitters' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_cpu_use_fusion_emitters=false'
# The convolution kernels every program of the project uses
# (cdg_jax.run.parallel.configure_cpu).
_KERNELS_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
if _KERNELS_FLAG.split('=')[0] not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' ' + _KERNELS_FLAG
# XLA compilation dominates test time on CPU, and many tests compile the same
# computations again (an uninterrupted run beside its resumed twin, a
# subprocess beside the in-process check): a persistent compilation cache,
# shared with subprocesses through the environment and fresh for each test
# session, compiles each of them once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='cdg_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  # Removed by the process that made it (xdist workers inherit the variable).
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import launch  # pylint: disable=g-import-not-at-top,wrong-import-position

atexit.register(launch.kill_all)


@pytest.fixture(autouse=True)
def _no_program_outlives_its_test():
  """Kills what a test started and left running (a failed assertion, a
  timeout), so that it cannot hold cores, ports or locks for later tests."""
  yield
  launch.kill_all()
