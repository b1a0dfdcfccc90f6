"""Hostile volumes at the reader: one rule for single slices, trustworthy DICOM geometry and
pixel data, and the size budget checked before any voxel is read."""

import logging
import os
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mr2ct_jax.data import volume
from test_volume_io import _error, _sitk_image, _write, write_dicom_series


def _set_element(data: bytes, group: int, element: int, value: bytes | None) -> bytes:
  """`data` (an implicit-VR little-endian DICOM file) with one element replaced or removed."""
  key = struct.pack('<HH', group, element)
  at = data.find(key)
  length = struct.unpack('<I', data[at + 4:at + 8])[0]
  if value is None:
    return data[:at] + data[at + 8 + length:]
  value += b' ' * (len(value) % 2)
  return data[:at] + key + struct.pack('<I', len(value)) + value + data[at + 8 + length:]


def _damaged_series(tmp_path, edit, only=None):
  folder = tmp_path / 'series'
  write_dicom_series(str(folder), _sitk_image(), '1.2.826.0.1.3680043.2.1125.31')
  for path in sorted(folder.iterdir()):
    if only is None or path.name == only:
      path.write_bytes(edit(path.read_bytes()))
  return folder


@pytest.mark.parametrize('value', [b'nan\\nan\\nan', None])
def test_dicom_without_trustworthy_slice_positions_is_refused(tmp_path, value):
  folder = _damaged_series(tmp_path, lambda d: _set_element(d, 0x0020, 0x0032, value))
  _error(folder, 's000.dcm has (no usable|a non-finite) ImagePositionPatient.*geometry is '
                 'unknown')


def test_dicom_slice_with_short_pixel_data_is_refused(tmp_path):
  def shorten(data):
    at = data.rfind(struct.pack('<HH', 0x7FE0, 0x0010))
    return data[:at] + struct.pack('<HHI', 0x7FE0, 0x0010, 40) + data[at + 8:at + 8 + 40]
  folder = _damaged_series(tmp_path, shorten, only='s002.dcm')
  _error(folder, r's002.dcm holds 40 bytes of pixel data, 7 x 6 voxels need 84; the file is '
                 'damaged')


def test_single_slices_are_refused_by_one_rule(tmp_path):
  write_dicom_series(str(tmp_path / 'one'), _sitk_image()[:, :, :1],
                     '1.2.826.0.1.3680043.2.1125.32')
  _error(tmp_path / 'one', r'got shape \(6, 7, 1\): a volume needs at least 2 voxels along '
                           'every axis')
  _write(tmp_path / 'slice.nii.gz', np.zeros((8, 9, 1)))
  _error(tmp_path / 'slice.nii.gz', r'got shape \(8, 9, 1\): a volume needs at least 2 voxels')
  _write(tmp_path / 'dot.nii.gz', np.zeros((1, 1, 1)))
  _error(tmp_path / 'dot.nii.gz', r'got shape \(1, 1, 1\)')


def test_voxel_budget_refuses_before_loading_and_can_be_lifted(tmp_path):
  """1024^3 int16 at 0.3 mm (a plausible 307 mm field of view): 2^30 voxels, 4 GiB as float32,
  declared by a header over a tiny file; refused before any voxel is read."""
  path = _write(tmp_path / 'h.nii', np.zeros((4, 4, 2)), np.diag([0.3, 0.3, 0.3, 1.0]),
                dtype=np.int16)
  data = bytearray(open(path, 'rb').read())
  data[42:48] = np.asarray([1024] * 3, '<i2').tobytes()
  open(path, 'wb').write(bytes(data))
  _error(path, r'1,073,741,824 voxels \(shape \(1024, 1024, 1024\), 4.0 GiB as float32\) exceed '
               'the limit .*pass --allow_large_volumes')
  with pytest.raises(volume.VolumeError, match='cannot read NIfTI'):  # past the check: no data
    volume.read_volume(path, allow_large=True)


def test_whole_body_length_passes_but_a_metre_wide_field_of_view_does_not(tmp_path):
  long = _write(tmp_path / 'long.nii.gz', np.zeros((2, 2, 900)), np.diag([1.0, 1.0, 2.0, 1.0]))
  assert volume.read_volume(long).shape == (2, 2, 900)  # 1.8 m along one axis: a whole body
  wide = _write(tmp_path / 'wide.nii.gz', np.zeros((4, 4, 2)), np.diag([250.0, 240.0, 1.0, 1.0]))
  _error(wide, r'implausible geometry: .* field of view \[1000.0, 960.0, 2.0\] mm')
  assert volume.read_volume(wide, allow_large=True).shape == (4, 4, 2)


def test_symlink_loop_in_a_folder_is_skipped(tmp_path, caplog):
  _write(tmp_path / 'a.nii.gz', np.zeros((2, 2, 2)))
  os.symlink(tmp_path / 'loop', tmp_path / 'loop')
  with caplog.at_level(logging.WARNING):
    assert volume.list_volumes(str(tmp_path)) == [str(tmp_path / 'a.nii.gz')]
  _error(tmp_path / 'loop', 'no such file or folder|symbolic links')


def test_a_dicom_file_gdcm_cannot_parse_is_not_silently_left_out(tmp_path):
  folder = _damaged_series(tmp_path, lambda d: d[:len(d) - 100], only='s003.dcm')
  _error(folder, r'1 DICOM file\(s\) are not part of the series \(unreadable or damaged\): '
                 's003.dcm')


def _element(group: int, elem: int, vr: str, value: bytes | str) -> bytes:
  """One explicit-VR little-endian data element."""
  value = value.encode() if isinstance(value, str) else value
  value += (b'\0' if vr == 'UI' else b' ') * (len(value) % 2)
  if vr in ('OB', 'SQ'):
    return struct.pack('<HH2sHI', group, elem, vr.encode(), 0, len(value)) + value
  return struct.pack('<HH2sH', group, elem, vr.encode(), len(value)) + value


def _part10(sop_class: str, body: bytes) -> bytes:
  """A Part-10 DICOM file (explicit VR little endian) of `sop_class` holding `body`."""
  meta = (_element(2, 1, 'OB', b'\0\1') + _element(2, 2, 'UI', sop_class) +
          _element(2, 3, 'UI', '1.2.3.4.5') + _element(2, 0x10, 'UI', '1.2.840.10008.1.2.1'))
  return (b'\0' * 128 + b'DICM' + _element(2, 0, 'UL', struct.pack('<I', len(meta))) + meta +
          body)


_DICOMDIR_BODY = (_element(4, 0x1130, 'CS', '') + _element(4, 0x1200, 'UL', bytes(4)) +
                  _element(4, 0x1202, 'UL', bytes(4)) + _element(4, 0x1212, 'US', bytes(2)) +
                  _element(4, 0x1220, 'SQ', b''))
_SR_BODY = (_element(8, 0x16, 'UI', '1.2.840.10008.5.1.4.1.1.88.11') +
            _element(8, 0x18, 'UI', '1.2.3.4.6') + _element(8, 0x60, 'CS', 'SR') +
            _element(0x20, 0xd, 'UI', '1.2.3.9') + _element(0x20, 0xe, 'UI', '1.2.3.10'))


@pytest.mark.parametrize('name, sop_class, body', [
    ('DICOMDIR', '1.2.840.10008.1.3.10', _DICOMDIR_BODY),          # Media Storage Directory
    ('report.dcm', '1.2.840.10008.5.1.4.1.1.88.11', _SR_BODY)])    # Basic Text SR
def test_a_dicom_object_without_an_image_beside_the_series_is_ignored_with_a_warning(
    tmp_path, caplog, name, sop_class, body):
  folder = tmp_path / 'series'
  write_dicom_series(str(folder), _sitk_image(), '1.2.826.0.1.3680043.2.1125.32')
  expected = volume.read_volume(str(folder))
  (folder / name).write_bytes(_part10(sop_class, body))
  with caplog.at_level(logging.WARNING):
    got = volume.read_volume(str(folder))
  np.testing.assert_array_equal(got.array, expected.array)
  np.testing.assert_array_equal(got.affine, expected.affine)
  assert [r.getMessage() for r in caplog.records if 'without an image' in r.getMessage()] == [
      f'{folder / name}: a DICOM object without an image (SOP class {sop_class}, e.g. a '
      'DICOMDIR or a report) beside the series; ignored']


@pytest.mark.parametrize('cut', [150, 154, 160])
def test_a_slice_cut_inside_its_meta_header_is_named_as_damaged(tmp_path, cut):
  # Cut inside a long-length element's header of the file meta: reading the SOP class must
  # not fail on the short buffer (a struct.error traceback before this was fixed).
  folder = tmp_path / 'series'
  write_dicom_series(str(folder), _sitk_image(), '1.2.826.0.1.3680043.2.1125.33')
  (folder / 'cut.dcm').write_bytes(_part10('1.2.840.10008.5.1.4.1.1.4', b'')[:cut])
  _error(folder, r'1 DICOM file\(s\) are not part of the series \(unreadable or damaged\): '
                 'cut.dcm')


def test_pixel_values_that_spell_the_pixel_data_tag_are_not_mistaken_for_it(tmp_path):
  """Voxels 32736, 16 are the bytes e0 7f 10 00 of the PixelData tag: still a valid file."""
  array = (np.arange(5 * 7 * 6).reshape(5, 7, 6) % 50).astype(np.int16)
  array[2, 3, 1:3] = (32736, 16)
  image = sitk.GetImageFromArray(array)
  image.SetSpacing((0.7, 0.9, 2.5))
  write_dicom_series(str(tmp_path / 's'), image, '1.2.826.0.1.3680043.2.1125.33')
  assert volume.read_volume(str(tmp_path / 's')).shape == (6, 7, 5)


def test_dicom_gantry_tilt_is_refused_not_read_as_a_straight_stack(tmp_path):
  # Each slice 2.5 mm along the normal (x here) and 1 mm in-plane (y): a tilted stack.
  def tilt(path):
    k = int(path.name[1:4])
    position = f'{10 + 2.5 * k}\\{-20 + 1.0 * k}\\30'.encode()
    path.write_bytes(_set_element(path.read_bytes(), 0x0020, 0x0032, position))
  folder = tmp_path / 'series'
  write_dicom_series(str(folder), _sitk_image(), '1.2.826.0.1.3680043.2.1125.34')
  for path in sorted(folder.iterdir()):
    tilt(path)
  _error(folder, r'slice positions drift 4 mm in-plane over the stack \(more than half a '
                 r'pixel, 0.35 mm: a gantry tilt')


def test_dicom_without_pixel_spacing_is_refused(tmp_path):
  folder = _damaged_series(tmp_path, lambda d: _set_element(d, 0x0028, 0x0030, None))
  _error(folder, r's000.dcm has no usable PixelSpacing \(0028,0030\): None; the voxel size is '
                 'unknown')


def test_dicom_slices_of_another_spacing_or_size_are_refused(tmp_path):
  folder = _damaged_series(tmp_path, lambda d: _set_element(d, 0x0028, 0x0030, b'0.45\\0.35'),
                           only='s003.dcm')
  _error(folder, r's003.dcm has PixelSpacing \[0.45, 0.35\], s000.dcm \[0.9, 0.7\]; one '
                 'series has one voxel size')
  other = tmp_path / 'sizes'
  write_dicom_series(str(other), _sitk_image(), '1.2.826.0.1.3680043.2.1125.35')
  small = _sitk_image()[1:, :, :]
  write_dicom_series(str(tmp_path / 'small'), small, '1.2.826.0.1.3680043.2.1125.35')
  os.replace(tmp_path / 'small' / 's002.dcm', other / 's002.dcm')
  _error(other, r's002.dcm is 7 x 5 voxels, s000.dcm is 7 x 6; one series has one slice size')


@pytest.mark.parametrize('slice_mm,decimals', [(1.0, 2), (5.0, 1)])
def test_a_double_oblique_stack_with_rounded_positions_is_read(tmp_path, slice_mm, decimals):
  # Scanners and anonymisers store positions to 0.01-0.1 mm: that rounding is not a tilt.
  def rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r
  direction = rotation(0, 12.0) @ rotation(1, 20.0)
  array = (np.arange(40 * 7 * 6).reshape(40, 7, 6) % 200).astype(np.int16)
  image = sitk.GetImageFromArray(array)
  image.SetSpacing((0.7, 0.9, slice_mm))
  image.SetOrigin((10.123456, -20.987654, 30.55555))
  image.SetDirection(tuple(direction.ravel()))
  folder = tmp_path / 'oblique'
  write_dicom_series(str(folder), image, '1.2.826.0.1.3680043.2.1125.36')
  for k, path in enumerate(sorted(folder.iterdir())):
    point = image.TransformIndexToPhysicalPoint((0, 0, k))
    rounded = '\\'.join(f'{v:.{decimals}f}' for v in point).encode()
    path.write_bytes(_set_element(path.read_bytes(), 0x0020, 0x0032, rounded))
  vol = volume.read_volume(str(folder))
  assert vol.shape == (6, 7, 40)


def test_a_header_without_orientation_is_read_with_a_warning(tmp_path, caplog):
  img = nib.Nifti1Image(np.ones((4, 5, 3), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
  img.set_sform(None, code=0)
  img.set_qform(None, code=0)
  nib.save(img, str(tmp_path / 'old.nii'))
  _write(tmp_path / 'fine.nii', np.ones((4, 5, 3)))
  with caplog.at_level(logging.WARNING):
    vol = volume.read_volume(str(tmp_path / 'fine.nii'))
  assert 'no orientation' not in caplog.text
  with caplog.at_level(logging.WARNING):
    vol = volume.read_volume(str(tmp_path / 'old.nii'))
  assert f'{tmp_path / "old.nii"}: its header gives no orientation' in caplog.text
  np.testing.assert_allclose(vol.spacing, [2.0, 2.0, 3.0])  # pixdim still gives the grid
