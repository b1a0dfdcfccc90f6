"""What a NIfTI header says beyond its voxels, read and written faithfully: spatial units,
voxel types, the file's shape (trailing singleton axes) and the qform of oblique and sheared
affines."""

import warnings

import nibabel as nib
import numpy as np
import pytest

from mr2ct_jax.data import preprocess
from mr2ct_jax.data import volume
from test_volume_io import _affine, _error, _patch_header, _write


def _world(affine, units):
  """The affine in mm, for comparing physical geometry across files of different units."""
  return np.diag([{'meter': 1000.0, 'mm': 1.0, 'micron': 1e-3}[units]] * 3 + [1.0]) @ affine


@pytest.mark.parametrize('units', ['meter', 'micron'])
@pytest.mark.parametrize('qform_only', [False, True])
def test_spatial_units_read_in_mm_and_written_with_same_geometry(tmp_path, units, qform_only):
  array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  mm = _affine() @ np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS, as scanners write
  in_units = np.linalg.inv(_world(np.eye(4), units)) @ mm
  img = nib.Nifti1Image(array, in_units)
  img.header.set_xyzt_units(units, 'sec')
  if qform_only:  # the affine then comes from pixdim/quaternion: pixdim is in file units too
    img.set_sform(None, code=0)
    img.set_qform(in_units, code=1)
  nib.save(img, tmp_path / 'u.nii.gz')
  vol = volume.read_volume(str(tmp_path / 'u.nii.gz'))
  np.testing.assert_allclose(vol.affine, mm, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(vol.spacing, [0.8, 1.2, 2.5], rtol=1e-5)
  out = nib.load(_write(tmp_path / 'o.nii.gz', vol.array, vol.affine))
  out_units = out.header.get_xyzt_units()[0]
  assert out_units == 'mm'
  np.testing.assert_allclose(_world(out.affine, out_units), _world(img.affine, units),
                             rtol=1e-6, atol=1e-4)


def test_unknown_units_are_mm(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), _affine()), tmp_path / 'x.nii')
  assert nib.load(tmp_path / 'x.nii').header.get_xyzt_units()[0] == 'unknown'
  np.testing.assert_allclose(volume.read_volume(str(tmp_path / 'x.nii')).affine, _affine(),
                             atol=1e-6)


@pytest.mark.parametrize('spacing,units', [((1000.0, 1000.0, 5.0), 'mm'),  # header typo
                                           ((5000.0, 5000.0, 5000.0), 'unknown')])  # µm as mm
def test_implausible_field_of_view(tmp_path, spacing, units):
  img = nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.diag([*spacing, 1.0]))
  img.header.set_xyzt_units(units)
  nib.save(img, tmp_path / 'big.nii.gz')
  msg = _error(tmp_path / 'big.nii.gz', 'implausible geometry')
  assert f'voxel spacing [{spacing[0]}' in msg and 'field of view [' in msg
  # Volumes built in memory are stopped before resampling to the huge grid, too.
  with pytest.raises(volume.VolumeError, match='mem: implausible geometry'):
    preprocess.to_network_grid(volume.Volume(np.zeros((4, 4, 2), np.float32),
                                             np.diag([*spacing, 1.0]), 'mem'), 1.0, 16)


def test_huge_claimed_shape_fails_before_loading(tmp_path):
  path = _write(tmp_path / 'h.nii', np.zeros((4, 4, 2)), np.diag([5.0, 5.0, 5.0, 1.0]))
  data = bytearray(open(path, 'rb').read())
  data[42:48] = np.asarray([30000] * 3, '<i2').tobytes()  # dim[1:4]; the file stays tiny
  open(path, 'wb').write(bytes(data))
  assert '(30000, 30000, 30000)' in _error(path, 'implausible geometry')


def test_complex_rejected_without_warning(tmp_path):
  nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.complex64) * (1 + 1j), _affine()),
           tmp_path / 'c.nii.gz')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    msg = _error(tmp_path / 'c.nii.gz', 'complex data; a real scalar image is expected')
  assert msg == f'{tmp_path}/c.nii.gz: complex data; a real scalar image is expected'


def test_rgb_rejected_as_not_scalar(tmp_path):
  rgb = np.zeros((2, 3, 4), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
  nib.save(nib.Nifti1Image(rgb, _affine()), tmp_path / 'rgb.nii.gz')
  _error(tmp_path / 'rgb.nii.gz',
         r'expected a scalar \(single-channel\) image, got 3 channels per voxel \(RGB\)$')


def test_negative_pixdim_is_one_line_without_nibabel_warning(tmp_path, capfd):
  path = str(tmp_path / 'p.nii')
  img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), _affine())
  img.set_sform(None, code=0)
  nib.save(img, path)
  _patch_header(path, 80, (-0.8, 1.2, 2.5))
  _error(path, 'voxel spacing must be finite and > 0')
  assert 'pixdim' not in capfd.readouterr().err


@pytest.mark.parametrize('shape', [(2, 3, 4, 1), (2, 3, 4, 1, 1)])
def test_file_shape_keeps_trailing_singletons(tmp_path, shape):
  array = np.arange(24, dtype=np.float32).reshape(shape)
  nib.save(nib.Nifti1Image(array, _affine()), tmp_path / 's.nii.gz')
  vol = volume.read_volume(str(tmp_path / 's.nii.gz'))
  assert vol.shape == (2, 3, 4) and vol.file_shape == shape
  out = _write(tmp_path / 'o.nii.gz', vol.array.reshape(vol.file_shape), vol.affine)
  assert nib.load(out).shape == shape


def test_sheared_affine_written_as_sform_only(tmp_path):
  sheared = _affine()
  sheared[0, 1] = 2.0
  img = nib.load(_write(tmp_path / 's.nii.gz', np.zeros((2, 3, 4)), sheared))
  assert int(img.header['qform_code']) == 0 and int(img.header['sform_code']) == 1
  np.testing.assert_allclose(img.get_sform(), sheared, atol=1e-5)
  np.testing.assert_allclose(volume.read_volume(str(tmp_path / 's.nii.gz')).affine, sheared,
                             atol=1e-5)


def test_oblique_affine_keeps_matching_qform(tmp_path):
  oblique = _affine()
  c, s = np.cos(0.3), np.sin(0.3)
  oblique[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ oblique[:3, :3]
  img = nib.load(_write(tmp_path / 'o.nii.gz', np.zeros((2, 3, 4)), oblique))
  assert int(img.header['qform_code']) == 1
  np.testing.assert_allclose(img.get_qform(), oblique, atol=1e-5)
  np.testing.assert_allclose(img.get_sform(), oblique, atol=1e-5)
