"""experiments/benchmarks/benchmark_weight_gradient.py: the kernel gradient it
times from laid-out operands is the convolution's kernel gradient, and a
run on a tiny shape writes a record with every part."""

import jax
import jax.numpy as jnp
import numpy as np

from cdg_jax.run import parallel
from experiments.benchmarks import benchmark_weight_gradient as bench
from experiments.common import records


def test_kernel_gradient_from_laid_out_operands_is_the_kernel_gradient():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 6, 4)).astype(np.float32)
  g = rng.standard_normal((3, 5, 6, 2)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
  # By hand: dk[i, j, c, o] = sum_{n,h,w} x_padded[n, h+i, w+j, c] g[n, h, w, o].
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros_like(kernel)
  for i in range(3):
    for j in range(3):
      expected[i, j] = np.einsum('nhwc,nhwo->co', padded[:, i:i + 5, j:j + 6], g)
  functions = bench.part_functions()
  np.testing.assert_allclose(
      functions['kernel gradient'](x, kernel, g), expected, rtol=1e-4, atol=1e-4)
  for part in bench.KERNEL_GRADIENTS:
    np.testing.assert_allclose(functions[part](x, kernel, g), expected,
                               rtol=1e-4, atol=1e-4, err_msg=part)
  np.testing.assert_array_equal(functions['input to CHWN'](x, kernel, g),
                                np.transpose(x, (3, 1, 2, 0)))


def test_a_tiny_run_writes_a_record_with_every_part(tmp_path):
  shape = dict(batch=4, size=6, channels_in=8, channels_out=8, kernel=3,
               stride=1, layers=2)
  row = {'shape': shape, **bench.time_shape(shape, parallel.make_mesh(2), 2)}
  assert set(row['median_s']) == set(bench.PARTS)
  assert all(t > 0 for t in row['median_s'].values())
  assert set(row['kernel_gradient_relative_difference']) == set(
      bench.KERNEL_GRADIENTS)
  assert max(row['kernel_gradient_relative_difference'].values()) < 1e-5
  path = bench.write_report({'flags': {}, 'repeats': 2,
                             'parts': list(bench.PARTS), 'rows': [row]},
                            str(tmp_path), devices={'count': 2})
  record = records.read_record(path)
  assert record['record']['kind'] == 'weight_gradient'
  with open(records.markdown_path(path)) as f:
    table_row = [l for l in f.read().splitlines() if l.startswith('| 4, 6')]
  assert len(table_row) == 1 and table_row[0].count('|') == len(bench.PARTS) + 4
