"""Test set-up: two host CPU devices, so multi-device tests can compare 1 vs 2.

XLA reads the flag when JAX initialises its backends, so it is set here, before
any test module imports JAX. Single-device code is unaffected: uncommitted
arrays live on device 0.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
