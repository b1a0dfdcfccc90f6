"""Reading/writing NIfTI and DICOM volumes, and every bad input that reading must reject."""

import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume


def _affine(spacing=(0.8, 1.2, 2.5), origin=(10.0, -20.0, 30.0)):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _write(path, array, affine=None, dtype=np.float32):
  return volume.write_nifti(str(path), array, _affine() if affine is None else affine, dtype)


def write_dicom_series(folder, image, series_uid, prefix='s', orientation_of=None):
  """Writes a 3-D SimpleITK image as one DICOM file per slice (tags as a scanner would)."""
  os.makedirs(folder, exist_ok=True)
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  d = image.GetDirection()
  for k in range(image.GetDepth()):
    row_col = orientation_of(k) if orientation_of else (d[0], d[3], d[6], d[1], d[4], d[7])
    sl = image[:, :, k]
    for tag, value in [('0008|0060', 'CT'), ('0020|000e', series_uid),
                       ('0020|000d', '1.2.826.0.1.3680043.2.1125.1'),
                       ('0020|0037', '\\'.join(str(v) for v in row_col)),
                       ('0020|0032', '\\'.join(str(v) for v in
                                               image.TransformIndexToPhysicalPoint((0, 0, k)))),
                       ('0020|0013', str(k + 1)), ('0008|0018', f'{series_uid}.{k + 1}')]:
      sl.SetMetaData(tag, value)
    writer.SetFileName(os.path.join(folder, f'{prefix}{k:03d}.dcm'))
    writer.Execute(sl)


def _sitk_image(direction=(0, 0, 1, 1, 0, 0, 0, 1, 0)):
  array = (np.arange(5 * 7 * 6).reshape(5, 7, 6) * 3 - 100).astype(np.int16)  # [k, j, i]
  image = sitk.GetImageFromArray(array)
  image.SetSpacing((0.7, 0.9, 2.5))
  image.SetOrigin((10.0, -20.0, 30.0))
  image.SetDirection(direction)
  return image


def _error(path, match):
  with pytest.raises(volume.VolumeError, match=match) as info:
    volume.read_volume(str(path))
  assert str(info.value).startswith(str(path))
  assert '\n' not in str(info.value)
  return str(info.value)


# ---- NIfTI -------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['v.nii', 'v.nii.gz'])
def test_nifti_round_trip(tmp_path, name):
  array = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
  path = _write(tmp_path / name, array)
  vol = volume.read_volume(path)
  assert vol.array.dtype == np.float32 and vol.path == path
  np.testing.assert_array_equal(vol.array, array)
  np.testing.assert_allclose(vol.affine, _affine(), atol=1e-6)
  np.testing.assert_allclose(vol.spacing, [0.8, 1.2, 2.5], rtol=1e-6)
  assert volume.volume_id(path) == 'v'
  assert os.listdir(tmp_path) == [name]  # no temporary left behind


def test_write_int16_rounds_and_clips(tmp_path):
  array = np.array([-40000.0, -1.6, -0.4, 0.5001, 2.5, 1e6]).reshape(1, 2, 3)
  written = nib.load(_write(tmp_path / 'c.nii.gz', array, dtype=np.int16))  # one slice: raw
  assert written.get_data_dtype() == np.int16
  np.testing.assert_array_equal(np.asarray(written.dataobj).ravel(), [-32768, -2, 0, 1, 2, 32767])


def test_write_refuses_existing_and_nan(tmp_path):
  path = _write(tmp_path / 'e.nii.gz', np.zeros((2, 2, 2)))
  with pytest.raises(volume.VolumeError, match='already exists'):
    _write(path, np.ones((2, 2, 2)))
  volume.write_nifti(path, np.ones((2, 2, 2)), _affine(), overwrite=True)
  assert volume.read_volume(path).array.min() == 1
  with pytest.raises(volume.VolumeError, match=f'{tmp_path}/n.nii.gz: cannot write 1 NaN'):
    _write(tmp_path / 'n.nii.gz', np.array([np.nan, 1.0]).reshape(1, 1, 2), dtype=np.int16)


def test_trailing_singleton_axes_squeeze(tmp_path):
  array = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1, 1)
  nib.save(nib.Nifti1Image(array, _affine()), tmp_path / 's.nii.gz')
  vol = volume.read_volume(str(tmp_path / 's.nii.gz'))
  assert vol.shape == (2, 3, 4)
  np.testing.assert_array_equal(vol.array, array[..., 0, 0])


# ---- Bad input: reading ------------------------------------------------------------------

def test_missing_path(tmp_path):
  _error(tmp_path / 'nope.nii.gz', 'no such file')


@pytest.mark.parametrize('name', ['notes.nii.gz', 'notes.nii'])
def test_text_file_named_nifti(tmp_path, name):
  (tmp_path / name).write_text('patient list\n' * 40, encoding='utf-8')
  _error(tmp_path / name, 'cannot read NIfTI')


def test_other_extension_is_not_a_volume(tmp_path):
  (tmp_path / 'notes.txt').write_text('hello', encoding='utf-8')
  _error(tmp_path / 'notes.txt', 'not a volume')


def test_truncated_gzip(tmp_path):
  path = _write(tmp_path / 't.nii.gz', np.random.default_rng(0).normal(size=(20, 20, 20)))
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  _error(path, 'corrupt, truncated or not an image')


def test_corrupt_gzip_stream(tmp_path):
  path = str(tmp_path / 'c.nii.gz')
  raw = gzip.compress(b'\x00' * 2000)
  open(path, 'wb').write(raw[:20] + bytes(b ^ 0xFF for b in raw[20:]))
  _error(path, 'cannot read NIfTI')


def _gzip_nifti_bytes(tmp_path):
  """A stored-deflate (level 0) .nii.gz, so a byte of the voxels can be changed in place."""
  array = np.arange(16 * 16 * 4, dtype=np.float32).reshape(16, 16, 4)
  path = _write(tmp_path / 'plain.nii', array)
  return array, gzip.compress(open(path, 'rb').read(), compresslevel=0)


def test_gzip_crc_mismatch_is_refused_not_read_with_changed_voxels(tmp_path):
  # nibabel reads only the bytes the image needs: without checking the stream to its end a
  # flipped voxel byte loaded silently (found by a hostile-input sweep).
  array, data = _gzip_nifti_bytes(tmp_path)
  flipped = bytearray(data)
  flipped[-100] ^= 0x40  # inside the last voxels, before the 8-byte trailer
  path = tmp_path / 'flipped.nii.gz'
  path.write_bytes(bytes(flipped))
  assert not np.array_equal(np.asarray(nib.load(path).dataobj), array)  # nibabel: no error
  _error(path, r'flipped.nii.gz: cannot read NIfTI \(corrupt, truncated or not an image\): '
         'CRC check failed')


def test_gzip_without_its_trailer_is_refused(tmp_path):
  array, data = _gzip_nifti_bytes(tmp_path)
  path = tmp_path / 'cut.nii.gz'
  path.write_bytes(data[:-8])
  np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), array)  # nibabel: no error
  _error(path, 'cut.nii.gz: cannot read NIfTI .*ended before the end-of-stream marker')


def test_nibabel_header_repairs_become_one_warning_naming_the_file(tmp_path, capfd, caplog):
  data = bytearray(open(_write(tmp_path / 'plain.nii', np.ones((4, 4, 4))), 'rb').read())
  data[252:254] = np.int16(7).tobytes()  # qform_code 7 is no NIfTI code: nibabel sets it to 0
  path = str(tmp_path / 'codes.nii.gz')
  open(path, 'wb').write(gzip.compress(bytes(data)))
  capfd.readouterr()
  with caplog.at_level(logging.WARNING):
    volume.read_volume(path)
  assert not capfd.readouterr().err  # nothing printed by nibabel's own handler
  repaired = [r.getMessage() for r in caplog.records if 'nibabel repaired' in r.getMessage()]
  assert repaired == [f'{path}: nibabel repaired its header: qform_code 7 not valid; '
                      'setting to 0']
  assert not [r for r in caplog.records if r.name.startswith('nibabel')]


def test_2d_volume(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), tmp_path / 'a.nii.gz')
  _error(tmp_path / 'a.nii.gz', r'expected a 3-D volume, got shape \(8, 9\)')


def test_4d_volume(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / 'b.nii')
  _error(tmp_path / 'b.nii', r'expected a 3-D volume, got shape \(4, 4, 3, 2\)')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(tmp_path, bad):
  array = np.zeros((3, 3, 3), np.float32)
  array[0, 0, :2] = bad
  nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / 'n.nii.gz')
  assert '2 of 27 voxels are NaN or Inf' in _error(tmp_path / 'n.nii.gz', 'NaN or Inf')


def _patch_header(path, offset, values):
  data = bytearray(open(path, 'rb').read())
  data[offset:offset + 4 * len(values)] = np.asarray(values, '<f4').tobytes()
  open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('pixdim', [(1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, np.nan, 1.0)])
def test_bad_pixdim_spacing(tmp_path, pixdim):
  path = str(tmp_path / 'p.nii')
  img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), None)  # affine from pixdim
  img.header.set_qform(None, code=0)
  nib.save(img, path)
  _patch_header(path, 80, pixdim)  # pixdim[1:4] at byte 80 (little endian)
  _error(path, 'voxel spacing must be finite and > 0')


def test_nan_in_the_sform_origin_is_named_as_such(tmp_path):
  path = _write(tmp_path / 'o.nii', np.zeros((3, 4, 5)))
  _patch_header(path, 292, [np.nan])  # srow_x[3], the x origin: the spacing stays valid
  _error(path, 'affine holds NaN or Inf in its origin')


def test_nan_in_the_qform_quaternion_is_named_as_such(tmp_path):
  img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), _affine())
  img.set_qform(_affine(), code=1)
  img.set_sform(None, code=0)  # the qform defines the affine
  path = str(tmp_path / 'q.nii')
  nib.save(img, path)
  _patch_header(path, 256, [np.nan])  # quatern_b; pixdim (the spacing) is fine
  _error(path, 'affine holds NaN or Inf in its directions and voxel sizes')


def test_zero_column_sform(tmp_path):
  path = _write(tmp_path / 'z.nii', np.zeros((3, 4, 5)))
  _patch_header(path, 296, [0, 0, 0, 0])  # srow_y
  _error(path, 'voxel spacing must be finite and > 0')


# ---- DICOM -------------------------------------------------------------------------------

@pytest.mark.parametrize('direction', [(0, 0, 1, 1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)])
def test_dicom_series_matches_nifti(tmp_path, direction):
  image = _sitk_image(direction)
  write_dicom_series(str(tmp_path / 'series'), image, '1.2.826.0.1.3680043.2.1125.7')
  sitk.WriteImage(image, str(tmp_path / 'ref.nii.gz'))  # ITK converts LPS -> RAS itself
  dcm = volume.read_volume(str(tmp_path / 'series'))
  ref = volume.read_volume(str(tmp_path / 'ref.nii.gz'))
  assert dcm.shape == (6, 7, 5) and dcm.array.dtype == np.float32
  np.testing.assert_array_equal(dcm.array, ref.array)
  np.testing.assert_allclose(dcm.affine, ref.affine, atol=1e-5)
  np.testing.assert_allclose(dcm.spacing, [0.7, 0.9, 2.5], rtol=1e-6)
  # Independent check of the LPS -> RAS conversion: voxel (1, 2, 3) in world coordinates.
  lps = image.TransformIndexToPhysicalPoint((1, 2, 3))
  np.testing.assert_allclose((dcm.affine @ [1, 2, 3, 1])[:3], [-lps[0], -lps[1], lps[2]],
                             atol=1e-5)


def test_dicom_left_handed_direction_same_canonical(tmp_path):
  # DICOM stacks slices along row x column, so a left-handed ITK image comes back with its
  # slice order reversed: a different storage of the same geometry.
  image = _sitk_image((0, 0, 1, 1, 0, 0, 0, -1, 0))
  write_dicom_series(str(tmp_path / 'series'), image, '1.2.826.0.1.3680043.2.1125.8')
  sitk.WriteImage(image, str(tmp_path / 'ref.nii.gz'))
  dcm = orientation.to_canonical(volume.read_volume(str(tmp_path / 'series')))
  ref = orientation.to_canonical(volume.read_volume(str(tmp_path / 'ref.nii.gz')))
  np.testing.assert_array_equal(dcm[0], ref[0])
  np.testing.assert_allclose(dcm[1], ref[1], atol=1e-5)


def test_dicom_mixed_series(tmp_path):
  folder = str(tmp_path / 'mixed')
  write_dicom_series(folder, _sitk_image(), '1.2.826.0.1.3680043.2.1125.21', prefix='a')
  write_dicom_series(folder, _sitk_image(), '1.2.826.0.1.3680043.2.1125.22', prefix='b')
  _error(folder, 'folder holds 2 DICOM series')


def test_dicom_mixed_orientations(tmp_path):
  folder = str(tmp_path / 'orient')
  write_dicom_series(folder, _sitk_image(), '1.2.826.0.1.3680043.2.1125.23',
                     orientation_of=lambda k: (0, 1, 0, 0, 0, 1) if k < 3 else (1, 0, 0, 0, 1, 0))
  _error(folder, 'mixes 2 slice orientations')


def test_dicom_duplicate_slices(tmp_path):
  folder = str(tmp_path / 'dup')
  write_dicom_series(folder, _sitk_image(), '1.2.826.0.1.3680043.2.1125.24', prefix='a')
  write_dicom_series(folder, _sitk_image(), '1.2.826.0.1.3680043.2.1125.24', prefix='b')
  _error(folder, 'duplicate slice positions')


def test_single_dicom_file_and_folder_without_dicom(tmp_path):
  write_dicom_series(str(tmp_path / 's'), _sitk_image(), '1.2.826.0.1.3680043.2.1125.25')
  _error(tmp_path / 's' / 's000.dcm', 'pass the folder')
  (tmp_path / 'empty').mkdir()
  _error(tmp_path / 'empty', 'no DICOM files')


def test_garbage_dicom_file_in_folder(tmp_path):
  (tmp_path / 'series').mkdir()
  (tmp_path / 'series' / 'x.dcm').write_bytes(os.urandom(600))
  _error(tmp_path / 'series', 'no readable DICOM series')


def test_write_nifti_checks(tmp_path):
  with pytest.raises(volume.VolumeError, match='must end in .nii or .nii.gz'):
    volume.write_nifti(str(tmp_path / 'a.img'), np.zeros((2, 2, 2)), np.eye(4))
  with pytest.raises(volume.VolumeError, match='affine must be 4x4'):
    volume.write_nifti(str(tmp_path / 'a.nii'), np.zeros((2, 2, 2)), np.eye(3))
  path = volume.write_nifti(str(tmp_path / 'new' / 'm.nii.gz'), np.ones((2, 2, 2), bool),
                            np.eye(4), dtype=np.uint8)
  assert nib.load(path).get_data_dtype() == np.uint8


# ---- list_volumes ------------------------------------------------------------------------

def test_list_volumes(tmp_path, caplog):
  _write(tmp_path / 'b.nii.gz', np.zeros((2, 2, 2)))
  _write(tmp_path / 'a.nii', np.zeros((2, 2, 2)))
  write_dicom_series(str(tmp_path / 'c_dicom'), _sitk_image(), '1.2.826.0.1.3680043.2.1125.26')
  (tmp_path / 'readme.txt').write_text('x', encoding='utf-8')
  (tmp_path / 'other').mkdir()
  (tmp_path / '.hidden.nii.gz').write_text('x', encoding='utf-8')
  with caplog.at_level(logging.WARNING):
    found = volume.list_volumes(str(tmp_path))
  assert found == [str(tmp_path / n) for n in ('a.nii', 'b.nii.gz', 'c_dicom')]
  assert 'ignored 2 entries' in caplog.text and 'readme.txt' in caplog.text


def test_list_volumes_dicom_folder_itself(tmp_path):
  write_dicom_series(str(tmp_path), _sitk_image(), '1.2.826.0.1.3680043.2.1125.27')
  assert volume.list_volumes(str(tmp_path)) == [str(tmp_path)]


def test_list_volumes_missing_and_empty(tmp_path):
  with pytest.raises(volume.VolumeError, match=f'^{tmp_path}/gone: no such folder'):
    volume.list_volumes(str(tmp_path / 'gone'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(volume.VolumeError, match=f'^{tmp_path}/empty: no NIfTI files'):
    volume.list_volumes(str(tmp_path / 'empty'))
  (tmp_path / 'empty' / 'x.txt').write_text('x', encoding='utf-8')
  with pytest.raises(volume.VolumeError, match=r'1 other entries ignored'):
    volume.list_volumes(str(tmp_path / 'empty'))
