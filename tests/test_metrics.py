"""Metrics pinned on hand-computed arrays."""

import math

import numpy as np
import pytest

from mr2ct_jax.evaluation import metrics


def test_mae_mse_psnr_known_values():
  a = np.array([[0., 10.], [20., 30.]])
  b = np.array([[2., 10.], [14., 30.]])
  assert metrics.mae(a, b) == pytest.approx((2 + 0 + 6 + 0) / 4)
  assert metrics.mse(a, b) == pytest.approx((4 + 0 + 36 + 0) / 4)
  # PSNR = 20 log10(255 / sqrt(10)).
  assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255 / math.sqrt(10.0)))
  assert metrics.psnr(a, b) == pytest.approx(38.130803608679, abs=1e-9)
  # Uniform error of 1 gray level: 20 log10(255) = 48.1308...
  assert metrics.psnr(a, a + 1) == pytest.approx(48.13080360867910, abs=1e-9)


def test_mask_restricts_region():
  a = np.zeros((2, 3))
  b = np.array([[1., 100., 3.], [0., 0., 0.]])
  mask = np.array([[True, False, True], [False, False, False]])
  assert metrics.mae(a, b, mask) == pytest.approx(2.0)
  assert metrics.mse(a, b, mask) == pytest.approx(5.0)
  assert math.isnan(metrics.mae(a, b, np.zeros_like(mask)))
  assert math.isnan(metrics.psnr(a, b, np.zeros_like(mask)))


def test_identical_images():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, (3, 24, 24))
  assert metrics.mae(img, img) == 0.0
  assert metrics.psnr(img, img) == math.inf
  assert metrics.ssim(img, img) == 1.0
  assert np.all(metrics.ssim_map(img, img, 255.0) == 1.0)


def test_shape_mismatch_is_one_line_error():
  with pytest.raises(ValueError, match='shape mismatch'):
    metrics.mae(np.zeros((2, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match='mask shape'):
    metrics.mae(np.zeros((2, 2)), np.zeros((2, 2)), np.ones((2, 3), bool))


def _reference_ssim_at(a, b, i, j, data_range, sigma=1.5, radius=5):
  """SSIM at pixel (i, j) (away from the border) by the textbook formula, explicit window."""
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  w = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
  w /= w.sum()
  pa = a[i - radius:i + radius + 1, j - radius:j + radius + 1]
  pb = b[i - radius:i + radius + 1, j - radius:j + radius + 1]
  mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
  var_a = (w * (pa - mu_a) ** 2).sum()
  var_b = (w * (pb - mu_b) ** 2).sum()
  cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                      (var_a + var_b + c2))


def test_ssim_matches_reference_formula_on_perturbed_image():
  rng = np.random.default_rng(1)
  a = rng.uniform(0, 255, (20, 20))
  b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
  smap = metrics.ssim_map(a, b, data_range=255.0)
  for i, j in [(5, 5), (10, 7), (14, 14), (9, 12)]:
    assert smap[i, j] == pytest.approx(_reference_ssim_at(a, b, i, j, 255.0), rel=1e-10)
  value = metrics.ssim(a, b)
  assert 0.0 < value < 1.0
  assert value == pytest.approx(smap.mean())


def test_ssim_constant_shift_known_value():
  # b = a + d with a constant: the structure terms are 1, only luminance changes, so in the
  # interior SSIM = (2 mu (mu + d) + C1) / (mu^2 + (mu + d)^2 + C1) with mu the local mean.
  a = np.full((16, 16), 100.0)
  b = a + 20.0
  c1 = (0.01 * 255) ** 2
  expected = (2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1)
  assert metrics.ssim(a, b) == pytest.approx(expected, rel=1e-12)
  assert expected == pytest.approx(24006.5025 / 24406.5025, abs=1e-12)  # 0.98361


def test_ssim_volume_is_mean_over_slices_inside_mask():
  rng = np.random.default_rng(2)
  a = rng.uniform(0, 255, (3, 16, 16))
  b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
  mask = np.zeros(a.shape, bool)
  mask[0, 2:8, 2:8] = True
  mask[2, 5:12, 3:9] = True  # slice 1 empty: skipped
  per_slice = [metrics.ssim(a[k], b[k], mask[k]) for k in (0, 2)]
  assert metrics.ssim(a, b, mask) == pytest.approx(np.mean(per_slice))
  # Slices are independent (no filtering across slices).
  assert metrics.ssim_map(a, b, 255.0)[1] == pytest.approx(metrics.ssim_map(a[1], b[1], 255.0))


def test_mutual_information_self_equals_entropy_and_beats_noise():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 8, (64, 64)).astype(float)  # 8 equiprobable levels
  h = metrics.entropy(img, bins=8)
  assert h == pytest.approx(math.log(8), abs=0.01)
  assert metrics.mutual_information(img, img, bins=8) == pytest.approx(h, abs=1e-12)
  # Default 64 bins too: MI(x, x) = H(x) with the same binning.
  smooth = rng.normal(size=(64, 64))
  assert metrics.mutual_information(smooth, smooth) == pytest.approx(metrics.entropy(smooth),
                                                                     abs=1e-12)
  noise = rng.integers(0, 8, (64, 64)).astype(float)
  mi_noise = metrics.mutual_information(img, noise, bins=8)
  assert 0.0 <= mi_noise < 0.05 < h
  # Invariant to an intensity inversion (MR/CT contrast differs): same MI as with itself.
  assert metrics.mutual_information(img, 7 - img, bins=8) == pytest.approx(h, abs=1e-12)


def test_mutual_information_hand_computed():
  # Joint distribution of pairs (0,0),(0,1),(1,1),(1,1): p = [[1/4,1/4],[0,1/2]].
  a = np.array([0., 0., 1., 1.])
  b = np.array([0., 1., 1., 1.])
  p = np.array([[0.25, 0.25], [0.0, 0.5]])
  px, py = p.sum(1), p.sum(0)
  expected = sum(p[i, j] * math.log(p[i, j] / (px[i] * py[j]))
                 for i in range(2) for j in range(2) if p[i, j] > 0)
  assert metrics.mutual_information(a, b, bins=2) == pytest.approx(expected, abs=1e-12)
  assert expected == pytest.approx(0.215762, abs=1e-6)


def test_mean_slice_mutual_information_averages_slices():
  rng = np.random.default_rng(4)
  a = rng.integers(0, 4, (3, 16, 16)).astype(float)
  b = rng.integers(0, 4, (3, 16, 16)).astype(float)
  per_slice = [metrics.mutual_information(a[k], b[k], bins=4) for k in range(3)]
  assert metrics.mean_slice_mutual_information(a, b, bins=4) == pytest.approx(np.mean(per_slice))


def test_synthrad_clipping_and_mask():
  ct = np.array([[-2000., 0.], [4000., 100.]])
  sct = np.array([[-1024., 0.], [3000., 110.]])
  mask = np.array([[True, True], [True, False]])
  # MAE: no clipping -> (976 + 0 + 1000) / 3.
  assert metrics.synthrad_mae(ct, sct, mask) == pytest.approx(1976 / 3)
  # PSNR: both clipped to [-1024, 3000] -> identical inside the mask.
  assert metrics.synthrad_psnr(ct, sct, mask) == math.inf
  ct2 = ct.copy()
  ct2[0, 1] = 10.0
  assert metrics.synthrad_psnr(ct2, sct, mask) == pytest.approx(
      20 * math.log10(4024 / math.sqrt(100 / 3)))


def test_synthrad_ssim_sets_outside_mask_to_air():
  rng = np.random.default_rng(5)
  ct = rng.uniform(-1000, 1500, (2, 16, 16))
  mask = np.zeros(ct.shape, bool)
  mask[:, 4:12, 4:12] = True
  sct = ct.copy()
  sct[~mask] = rng.uniform(-1000, 1500, (~mask).sum())  # differences outside the mask only
  # Outside the mask both become -1024, so the images are identical: SSIM 1.
  assert metrics.synthrad_ssim(ct, sct, mask) == pytest.approx(1.0, abs=1e-12)
  sct_in = ct + 200.0 * mask
  value = metrics.synthrad_ssim(ct, sct_in, mask)
  assert 0.0 < value < 1.0
  # Equals the plain SSIM of the prepared (clipped, masked, shifted) volumes inside the mask.
  prep = lambda x: np.where(mask, np.clip(x, -1024, 3000), -1024) + 1024
  smap = metrics.ssim_map(prep(ct), prep(sct_in), data_range=4024.0)
  assert value == pytest.approx(smap[mask].mean())
