"""Paired evaluation: the paper's windows whatever the run's, and the FOV of each plane."""

import copy

import numpy as np
import pytest

from mr2ct_jax.data import intensity
from mr2ct_jax.data import prepare_volumes
from mr2ct_jax.evaluation import scoring


def _record(num=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  mr = rng.uniform(10, 90, (num, size, size)).astype(np.float32)
  ct = (-150 + 5 * mr).astype(np.float32)  # [-100, 300] HU, inside the paper's CT window
  mask = np.ones(mr.shape, np.uint8)
  return {'patient_id': 'p0', 'image': mr, 'paired': ct, 'mask': mask}


def _sct_fn(ct_hu, delta_hu, ct_window):
  """A generator whose sCT is exactly CT + delta_hu (HU) under the run's CT window."""
  return lambda x: intensity.ct_hu_to_model(ct_hu + delta_hu, ct_window)[..., None]


def test_paper_window_whatever_the_run_window(test_config):
  assert scoring.PAPER_CT_WINDOW == (-150.0, 350.0)
  import configs.gc  # pylint: disable=g-import-not-at-top  (conftest puts the repo on the path)
  paper = configs.gc.get_config('paper')
  assert tuple(paper.data.ct_window) == scoring.PAPER_CT_WINDOW
  assert tuple(paper.data.mr_window) == scoring.PAPER_MR_WINDOW
  wide = copy.deepcopy(test_config)
  with wide.unlocked():
    wide.data.ct_window = (-1024.0, 2000.0)
  rec = _record()
  results = {}
  for name, config in (('paper', test_config), ('wide', wide)):
    fn = _sct_fn(rec['paired'], 25.0, config.data.ct_window)
    (row,), _ = scoring.evaluate_volumes([rec], fn, None, config)
    results[name] = row
  # +25 HU on the paper's 500 HU window = 12.75 on the 0-255 scale; the wide window would
  # give 25 * 255 / 3024 = 2.108 if the metric followed the run's window.
  for row in results.values():
    assert row['mae_255'] == pytest.approx(12.75, abs=1e-3)
    assert row['mae_hu'] == pytest.approx(25.0, abs=1e-2)
  assert results['wide']['psnr_255'] == pytest.approx(results['paper']['psnr_255'], abs=1e-3)
  assert results['wide']['mi_mr_sct'] == pytest.approx(results['paper']['mi_mr_sct'], abs=1e-3)


@pytest.mark.parametrize('plane', ['axial', 'coronal', 'sagittal'])
def test_fov_levels_match_prepare_ct_fov(plane):
  """The S levels of the test mask are prepare's ct_fov, for slices of every plane."""
  rng = np.random.default_rng(1)
  ct = rng.uniform(-100, 100, (6, 10, 12)).astype(np.float32)
  s_axis = {'axial': 0, 'coronal': 2, 'sagittal': 2}[plane]
  index = [slice(None)] * 3
  index[s_axis] = slice(0, 2)  # the CT's FOV misses two S levels: air there
  ct[tuple(index)] = -1024.0
  fov = prepare_volumes.ct_fov(ct, plane)
  body = ct > -500
  mask = body & fov
  levels = scoring.fov_levels(mask, plane)
  np.testing.assert_array_equal(levels, np.broadcast_to(fov, ct.shape))
  expected = ct.size - ct.size // ct.shape[s_axis] * 2
  assert int(levels.sum()) == expected


def test_region_is_fov_levels_inside_the_volume(test_config):
  """Coronal slices: rows of missing S levels and network padding are never scored."""
  rec = _record(num=4, size=16)
  rec['mask'][:, :, :3] = 0   # coronal slices: S is the W axis; three levels outside the FOV
  inside = np.zeros(rec['mask'].shape, bool)
  inside[:, 2:14, :] = True   # the volume's own extent on the network grid
  rec['inside'] = inside
  rec['paired'][:, :2] = -1024.0  # padding of the CT: would add error if it were scored
  config = copy.deepcopy(test_config)
  fn = _sct_fn(rec['paired'], 25.0, config.data.ct_window)
  (row,), _ = scoring.evaluate_volumes([rec], fn, None, config, plane='coronal')
  assert row['region'] == 'fov_levels' and row['valid_voxels'] == 4 * 12 * 13
  assert row['mae_255'] == pytest.approx(12.75, abs=1e-3)
  (axial,), _ = scoring.evaluate_volumes([rec], fn, None, config, plane='axial')
  assert axial['valid_voxels'] == 4 * 12 * 16  # axial: whole slices of the mask
