"""The kNN-versus-linear analysis: its statistics against hand-made features
whose answers are known, and its feature transforms."""

import os

import numpy as np
import pytest

from experiments.analysis import knn_vs_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_statistics_of_isotropic_and_of_one_dominant_dimension():
  rng = np.random.default_rng(0)
  isotropic = rng.normal(size=(20000, 8))
  stats = knn_vs_linear.feature_statistics(isotropic, pairs=4000)
  # Eight equal variances: the variance spreads over all eight directions.
  assert stats['participation_ratio'] == pytest.approx(8.0, rel=0.02)
  assert stats['largest_over_median_variance'] == pytest.approx(1.0, abs=0.05)
  assert stats['mean_dimension_std'] == pytest.approx(1.0, rel=0.02)
  assert stats['mean_l2_norm'] == pytest.approx(np.sqrt(8), rel=0.05)
  assert abs(stats['mean_pair_cosine']) < 0.03   # random directions
  assert stats['dead_dimensions'] == 0
  # One dimension with std 10, one constant, six unit: the dominant one holds
  # 100 / (100 + 6) of the variance (top 1% of 8 dimensions is one of them),
  # eigenvalues (100, 1 x6, 0): participation 106^2 / (100^2 + 6).
  skewed = isotropic.copy()
  skewed[:, 0] *= 10.0
  skewed[:, 1] = 3.0
  stats = knn_vs_linear.feature_statistics(skewed, pairs=4000)
  assert stats['top1pct_variance_share'] == pytest.approx(100 / 106, rel=0.02)
  assert stats['participation_ratio'] == pytest.approx(106 ** 2 / 10006,
                                                       rel=0.03)
  assert stats['largest_over_median_variance'] == pytest.approx(100, rel=0.05)
  assert stats['dead_dimensions'] == 1
  # Positive features (like pooled ReLU outputs) point alike: for
  # half-normal dimensions the mean cosine is near E|x|^2 / E[x^2] = 2/pi.
  stats = knn_vs_linear.feature_statistics(np.abs(isotropic), pairs=4000)
  assert stats['mean_pair_cosine'] == pytest.approx(2 / np.pi, abs=0.05)
  assert stats['zero_fraction'] == 0.0
  # Exact zeros are counted.
  with_zeros = np.abs(isotropic) * (isotropic > -0.5)
  stats = knn_vs_linear.feature_statistics(with_zeros, pairs=4000)
  assert stats['zero_fraction'] == pytest.approx(np.mean(isotropic <= -0.5),
                                                 abs=1e-12)


def test_transforms_center_and_standardise_with_the_bank_statistics():
  rng = np.random.default_rng(1)
  bank = rng.normal(loc=5.0, scale=[1.0, 4.0], size=(1000, 2))
  queries = rng.normal(size=(10, 2))
  raw_bank, raw_queries = knn_vs_linear.transformed('raw', bank, queries)
  assert raw_bank is bank and raw_queries is queries
  centred_bank, centred_queries = knn_vs_linear.transformed('centred', bank,
                                                            queries)
  np.testing.assert_allclose(centred_bank.mean(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(centred_queries, queries - bank.mean(0))
  std_bank, std_queries = knn_vs_linear.transformed('standardised', bank,
                                                    queries)
  np.testing.assert_allclose(std_bank.std(0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(std_queries,
                             (queries - bank.mean(0)) / bank.std(0),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="'sphered'"):
    knn_vs_linear.transformed('sphered', bank, queries)


def test_whitening_gives_the_bank_unit_covariance_and_drops_flat_directions():
  rng = np.random.default_rng(2)
  mixing = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
  bank = rng.normal(size=(5000, 3)) @ mixing + 7.0   # rank 2: one flat axis
  queries = rng.normal(size=(4, 3)) @ mixing
  white_bank, white_queries = knn_vs_linear.transformed('whitened', bank,
                                                        queries)
  assert white_bank.shape == (5000, 2) and white_queries.shape == (4, 2)
  np.testing.assert_allclose(np.cov(white_bank, rowvar=False), np.eye(2),
                             atol=1e-4)
  np.testing.assert_allclose(white_bank.mean(0), 0.0, atol=1e-4)
  # The queries go through the same map: a query equal to a bank row lands
  # on that row's whitened point.
  again, _ = knn_vs_linear.transformed('whitened', bank, bank[:3])
  _, same = knn_vs_linear.transformed('whitened', bank, bank[:3])
  np.testing.assert_allclose(same, again[:3], atol=1e-4)
