"""Intensity windows: exact values at the edges, inverses, MR normalisation, the HU check."""

import numpy as np
import pytest

from mr2ct_jax.data import intensity
from mr2ct_jax.data import volume


def test_ct_window_edges_exact():
  hu = np.array([-3000.0, -151.0, -150.0, 100.0, 350.0, 351.0, 3000.0], np.float32)
  unit = intensity.ct_to_unit(hu, (-150.0, 350.0))
  assert unit.dtype == np.float32
  np.testing.assert_array_equal(unit, [0, 0, 0, 127.5, 255, 255, 255])
  np.testing.assert_array_equal(intensity.ct_hu_to_model(hu), [-1, -1, -1, 0, 1, 1, 1])


def test_model_range_exact():
  np.testing.assert_array_equal(intensity.unit_to_model(np.array([0.0, 127.5, 255.0])),
                                [-1, 0, 1])
  np.testing.assert_array_equal(intensity.model_to_unit(np.array([-1.0, 0.0, 1.0])),
                                [0, 127.5, 255])


@pytest.mark.parametrize('window', [(-150.0, 350.0), (-1024.0, 2000.0)])
def test_ct_inverse(window):
  hu = np.linspace(window[0], window[1], 101, dtype=np.float32)
  model = intensity.ct_hu_to_model(hu, window)
  assert model[0] == -1 and model[-1] == 1
  np.testing.assert_array_equal(intensity.model_to_ct_hu(np.array([-1.0, 1.0]), window), window)
  np.testing.assert_allclose(intensity.model_to_ct_hu(model, window), hu, atol=1e-3)


def test_wide_window_keeps_bone():
  hu = np.array([350.0, 1000.0, 1500.0])
  assert len(np.unique(intensity.ct_to_unit(hu, (-150.0, 350.0)))) == 1  # the paper's: lost
  assert np.all(np.diff(intensity.ct_to_unit(hu, (-1024.0, 2000.0))) > 0)


def test_mr_window():
  mr = np.array([-5.0, 0.0, 50.0, 100.0, 130.0])
  np.testing.assert_array_equal(intensity.mr_to_unit(mr), [0, 0, 127.5, 255, 255])
  np.testing.assert_array_equal(intensity.mr_to_model(mr), [-1, -1, 0, 1, 1])
  np.testing.assert_allclose(intensity.model_to_mr(intensity.mr_to_model(mr[1:4])), mr[1:4],
                             atol=1e-4)


def test_bad_window():
  with pytest.raises(ValueError, match='low < high'):
    intensity.ct_to_unit(np.zeros(2), (350.0, -150.0))


def test_normalise_mr():
  rng = np.random.default_rng(0)
  array = np.zeros((10, 10, 10), np.float32)
  mask = np.zeros(array.shape, bool)
  mask[2:8, 2:8, 2:8] = True
  array[mask] = rng.uniform(100, 900, mask.sum())
  array[0, 0, 0] = 1e6  # a hot voxel outside the body does not move the anchor
  out = intensity.normalise_mr(array, mask, 99.5)
  assert out.dtype == np.float32
  np.testing.assert_allclose(np.percentile(out[mask], 99.5), 100.0, rtol=1e-5)
  scale = out[2, 2, 2] / array[2, 2, 2]
  np.testing.assert_allclose(out, array * scale, rtol=1e-5)  # a pure scale
  np.testing.assert_allclose(np.percentile(intensity.normalise_mr(array[2:8, 2:8, 2:8], None),
                                           99.5), 100.0, rtol=1e-5)


def test_normalise_mr_errors():
  ramp = np.arange(8.0).reshape(2, 2, 2)
  with pytest.raises(volume.VolumeError, match='^a.nii: empty body mask'):
    intensity.normalise_mr(ramp, np.zeros((2, 2, 2), bool), path='a.nii')
  with pytest.raises(volume.VolumeError, match='^a.nii: the 99.5 percentile'):
    intensity.normalise_mr(-ramp, np.ones((2, 2, 2), bool), path='a.nii')
  for constant in (0.0, 100.0):
    with pytest.raises(volume.VolumeError,
                       match=f'^a.nii: every voxel is {constant:g}; a constant volume'):
      intensity.normalise_mr(np.full((2, 2, 2), constant), None, path='a.nii')


@pytest.mark.parametrize('low,high', [(-1024.0, 1800.0), (-1000.0, 400.0), (-3024.0, 3071.0),
                                      (-32768.0, 2000.0)])
def test_check_ct_is_hu_accepts(low, high):
  intensity.check_ct_is_hu(np.array([low, 40.0, high]), 'ct.nii.gz')


@pytest.mark.parametrize('low,high,why', [(0.0, 255.0, '8-bit'), (12.0, 200.0, '8-bit'),
                                          (0.0, 4095.0, 'rescale intercept'),
                                          (-200.0, 1500.0, 'minimum -200')])
def test_check_ct_is_hu_rejects(low, high, why):
  with pytest.raises(volume.VolumeError, match=f'^ct.nii.gz: does not look like Hounsfield.*{why}'):
    intensity.check_ct_is_hu(np.array([low, 40.0, high]), 'ct.nii.gz')


def test_a_four_knot_ct_window_keeps_soft_tissue_and_bone():
  """(-1024, -150, 350, 2000): soft tissue on [32, 223], air and bone in the outer levels."""
  window = (-1024.0, -150.0, 350.0, 2000.0)
  hu = np.array([-3000.0, -1024.0, -587.0, -150.0, 100.0, 350.0, 1175.0, 2000.0, 4000.0])
  unit = intensity.window_to_unit(hu, window)
  np.testing.assert_allclose(unit, [0, 0, 16, 32, 127.5, 223, 239, 255, 255], atol=1e-4)
  inside = hu[1:-1]
  np.testing.assert_allclose(intensity.model_to_ct_hu(intensity.ct_hu_to_model(inside, window),
                                                      window), inside, atol=1e-3)
  # Beyond the range the end segments' slopes continue (network outputs stay visible).
  np.testing.assert_allclose(intensity.unit_to_window(np.array([-16.0, 271.0]), window),
                             [-1024.0 - 16 * 874 / 32, 2000.0 + 16 * 1650 / 32], rtol=1e-6)
  with pytest.raises(ValueError, match='4 increasing knots'):
    intensity.window_to_unit(hu, (-1024.0, 350.0, -150.0, 2000.0))


def test_an_mr_is_told_from_a_ct_by_its_air_not_by_a_few_negative_voxels():
  rng = np.random.default_rng(0)
  mr = np.abs(rng.normal(300, 80, (40, 40, 6))).astype(np.float32)
  ringing = mr.copy()
  ringing[::7, ::7, :] = -650.0            # Lanczos overshoot at edges: a few voxels
  padded = mr.copy()
  padded[:15] = -1024.0                    # registered to a CT grid: a constant pad
  for array in (mr, ringing, padded):
    intensity.check_mr_is_not_hu(array, 'mr.nii.gz')
  ct = np.where(rng.random((40, 40, 6)) < 0.4, rng.normal(-1000, 20, (40, 40, 6)),
                rng.normal(40, 60, (40, 40, 6)))
  message = r'^ct\.nii\.gz: looks like a CT in Hounsfield units, not an MR \([34][0-9]% of its'
  with pytest.raises(volume.VolumeError, match=message):
    intensity.check_mr_is_not_hu(ct, 'ct.nii.gz')
