"""DICOM series folders (SimpleITK / GDCM): finding them, checking every slice, reading one.

A series is refused, with one line naming the folder, when its geometry cannot be trusted or
its voxels are incomplete: several series or orientations in one folder, slices without (or
with non-finite) ImagePositionPatient / ImageOrientationPatient or PixelSpacing (ITK would
invent an origin and 1 mm spacings and present them as fact), slices of different sizes or
pixel spacings, duplicate or irregular slice positions, positions that drift in-plane by more
than half a pixel over the stack (a gantry tilt, which an affine built from the slice normal
would drop), a slice whose PixelData is shorter than Rows x Columns x BitsAllocated (its
voxels would be read as garbage), a file GDCM cannot parse (it would be left out of the
series silently; a DICOM object whose SOP class holds no image beside the slices, a DICOMDIR
or a report, is ignored with a warning instead), or a declared size over the voxel budget
(checked before the voxels are read; the field of view and the 2-voxel rule of
`volume_checks` follow once the series is read).
"""

import os
import struct

from absl import logging
import numpy as np
import SimpleITK as sitk

from mr2ct_jax.data import volume_checks
from mr2ct_jax.data.volume_checks import VolumeError

SUFFIXES = ('.dcm', '.dicom', '.ima')
# ITK reports physical points in LPS; nibabel affines are RAS: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_PIXEL_DATA_TAG = struct.pack('<HH', 0x7FE0, 0x0010)
# In-plane drift of slice positions always allowed (positions are often stored to 0.1 mm).
_POSITION_PRECISION_MM = 0.2


def looks_like_dicom_file(path: str) -> bool:
  """A DICOM suffix, or a Part-10 file (128-byte preamble, then 'DICM')."""
  if path.lower().endswith(SUFFIXES):
    return True
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:132] == b'DICM'
  except OSError:
    return False


def is_dicom_dir(path: str) -> bool:
  """True if `path` is a folder that directly holds at least one DICOM file."""
  if not os.path.isdir(path):
    return False
  for entry in sorted(os.scandir(path), key=lambda e: e.name):
    if entry.is_file() and not entry.name.startswith('.') and looks_like_dicom_file(entry.path):
      return True
  return False


def sitk_to_ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
  """A SimpleITK image -> (array [I, J, K] in ITK index order, RAS+ affine)."""
  array = sitk.GetArrayFromImage(image)  # [k, j, i]
  array = np.transpose(array, tuple(range(array.ndim))[::-1])
  dim = image.GetDimension()
  direction = np.asarray(image.GetDirection(), np.float64).reshape(dim, dim)
  affine = np.eye(4)
  affine[:dim, :dim] = direction @ np.diag(image.GetSpacing())
  affine[:dim, 3] = image.GetOrigin()
  affine[:3] = _LPS_TO_RAS @ affine[:3]
  return array, affine


def _tag(reader: sitk.ImageFileReader, tag: str) -> list[float] | None:
  if not reader.HasMetaDataKey(tag):
    return None
  try:
    return [float(v) for v in reader.GetMetaData(tag).strip().split('\\')]
  except ValueError:
    return None


# Uncompressed little-endian transfer syntaxes (implicit, explicit VR): only their PixelData
# length can be checked against Rows x Columns; a decoder checks the compressed ones.
_PLAIN_SYNTAXES = ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1')


def _pixel_data_length(path: str) -> tuple[int, int]:
  """(declared length of the PixelData element, bytes the file holds after its header).

  The tag's 4 bytes may also occur inside the pixel values, so the element is the occurrence
  whose declared length ends exactly at the end of the file; without one (a truncated file),
  the first occurrence counts.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise VolumeError(f'{path}: cannot read it: {e.strerror}') from e
  found = []
  at = data.find(_PIXEL_DATA_TAG)
  while at >= 0:
    if data[at + 4:at + 6] in (b'OB', b'OW'):  # explicit VR: 2 reserved bytes, 4-byte length
      length, start = struct.unpack('<I', data[at + 8:at + 12])[0], at + 12
    else:  # implicit VR: 4-byte length
      length, start = struct.unpack('<I', data[at + 4:at + 8])[0], at + 8
    available = len(data) - start
    if length == available or length + 1 == available:  # (an odd length is padded)
      return length, available
    found.append((length, available))
    at = data.find(_PIXEL_DATA_TAG, at + 1)
  return found[0] if found else (0, 0)


# SOP classes of DICOM objects that hold no image (DICOM PS3.4 Annex B): a DICOMDIR, structured
# reports and key-object selections, presentation states, encapsulated documents, raw data and
# registrations, RT structure sets and plans. A prefix ending in '.' covers a family.
_NON_IMAGE_SOP_CLASSES = ('1.2.840.10008.1.3.10', '1.2.840.10008.5.1.4.1.1.88.',
                          '1.2.840.10008.5.1.4.1.1.11.', '1.2.840.10008.5.1.4.1.1.104.',
                          '1.2.840.10008.5.1.4.1.1.66', '1.2.840.10008.5.1.4.1.1.66.',
                          '1.2.840.10008.5.1.4.1.1.481.3', '1.2.840.10008.5.1.4.1.1.481.5')
_LONG_LENGTH_VRS = (b'OB', b'OD', b'OF', b'OL', b'OV', b'OW', b'SQ', b'SV', b'UC', b'UN',
                    b'UR', b'UT', b'UV')


def _media_storage_sop_class(path: str) -> str | None:
  """MediaStorageSOPClassUID (0002,0002) of a Part-10 file's meta header (None: none found).

  The meta group is always explicit VR little endian, whatever the data set's syntax.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read(4096)
  except OSError:
    return None
  if data[128:132] != b'DICM':
    return None
  at = 132
  while at + 8 <= len(data):
    group, element = struct.unpack('<HH', data[at:at + 4])
    if group != 0x0002:
      return None
    vr = data[at + 4:at + 6]
    if vr in _LONG_LENGTH_VRS:
      if at + 12 > len(data):  # cut inside the element's header: a damaged file
        return None
      length, start = struct.unpack('<I', data[at + 8:at + 12])[0], at + 12
    else:
      length, start = struct.unpack('<H', data[at + 6:at + 8])[0], at + 8
    if element == 0x0002:
      return data[start:start + length].decode('ascii', 'replace').strip(' \0')
    at = start + length
  return None


def _non_image_sop_class(path: str) -> str | None:
  """The SOP class of a DICOM object that holds no image (a DICOMDIR, a report...), else None.

  A damaged image keeps its image SOP class and is refused as damaged, even when the cut
  removed its pixel data.
  """
  sop_class = _media_storage_sop_class(path)
  if sop_class is not None and any(
      sop_class == uid or (uid.endswith('.') and sop_class.startswith(uid))
      for uid in _NON_IMAGE_SOP_CLASSES):
    return sop_class
  return None


def _slice_info(path: str) -> dict:
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise VolumeError(f'{path}: unreadable DICOM header: {" ".join(str(e).split())}') from e
  bits = _tag(reader, '0028|0100')
  syntax = (reader.GetMetaData('0002|0010').strip(' \0')
            if reader.HasMetaDataKey('0002|0010') else '')
  return {'orientation': _tag(reader, '0020|0037'), 'position': _tag(reader, '0020|0032'),
          'spacing': _tag(reader, '0028|0030'), 'size': reader.GetSize(),
          'components': reader.GetNumberOfComponents(),
          'bytes_per_voxel': int(bits[0]) // 8 if bits else None,
          'plain': syntax in _PLAIN_SYNTAXES or not syntax}


def _check_pixel_data(folder: str, path: str, info: dict) -> None:
  if not info['plain'] or info['bytes_per_voxel'] is None:
    return  # compressed or big-endian: its decoder checks the length
  declared, available = _pixel_data_length(path)
  cols, rows = info['size'][:2]
  frames = info['size'][2] if len(info['size']) > 2 else 1
  needed = cols * rows * frames * max(1, info['components']) * info['bytes_per_voxel']
  if min(declared, available) < needed:
    raise VolumeError(f'{folder}: {os.path.basename(path)} holds {min(declared, available)} '
                      f'bytes of pixel data, {rows} x {cols} voxels need {needed}; the file is '
                      'damaged')


def check_slices(folder: str, files: list[str], allow_large: bool = False) -> None:
  """Refuses a series whose slice geometry or pixel data cannot be trusted (see the module)."""
  infos = [_slice_info(f) for f in files]
  cols, rows = infos[0]['size'][:2]
  frames = sum(info['size'][2] if len(info['size']) > 2 else 1 for info in infos)
  volume_checks.check_size(folder, (cols, rows, frames), allow_large)
  if infos[0]['components'] != 1:
    raise VolumeError(f'{folder}: expected a scalar (grey-level) image, got '
                      f'{infos[0]["components"]} components per voxel')
  if len(files) == 1 and frames > 1:
    # A multi-frame file keeps its geometry per frame; ITK reads it from there.
    _check_pixel_data(folder, files[0], infos[0])
    return
  for path, info in zip(files, infos):
    name = os.path.basename(path)
    orient, pos = info['orientation'], info['position']
    if orient is None or pos is None or len(orient) != 6 or len(pos) != 3:
      raise VolumeError(f'{folder}: {name} has no usable ImagePositionPatient/'
                        'ImageOrientationPatient; the slice geometry is unknown')
    if not np.all(np.isfinite(orient + pos)):
      raise VolumeError(f'{folder}: {name} has a non-finite ImagePositionPatient/'
                        f'ImageOrientationPatient ({pos}, {orient}); the slice geometry is '
                        'unknown')
    spacing = info['spacing']
    if spacing is None or len(spacing) != 2 or not all(np.isfinite(v) and v > 0
                                                       for v in spacing):
      raise VolumeError(f'{folder}: {name} has no usable PixelSpacing (0028,0030): '
                        f'{spacing}; the voxel size is unknown')
    if info['size'][:2] != infos[0]['size'][:2]:
      raise VolumeError(f'{folder}: {name} is {info["size"][1]} x {info["size"][0]} voxels, '
                        f'{os.path.basename(files[0])} is {rows} x {cols}; one series has '
                        'one slice size')
    if np.max(np.abs(np.subtract(spacing, infos[0]['spacing']))) > 1e-4 * max(spacing):
      raise VolumeError(f'{folder}: {name} has PixelSpacing {spacing}, '
                        f'{os.path.basename(files[0])} {infos[0]["spacing"]}; one series has '
                        'one voxel size')
    _check_pixel_data(folder, path, info)
  orients = np.asarray([info['orientation'] for info in infos])
  if np.max(np.abs(orients - orients[0])) > 1e-3:
    n = len(np.unique(np.round(orients, 3), axis=0))
    raise VolumeError(f'{folder}: DICOM series mixes {n} slice orientations; '
                      'put each orientation in its own folder')
  if len(files) < 2:
    return
  normal = np.cross(orients[0, :3], orients[0, 3:])
  positions = np.asarray([info['position'] for info in infos])
  positions = positions[np.argsort(positions @ normal)]
  steps = np.diff(positions @ normal)
  if np.min(steps) <= 1e-3:
    raise VolumeError(f'{folder}: DICOM series has {int(np.sum(steps <= 1e-3))} duplicate slice '
                      'positions (zero slice spacing); is it several acquisitions in one folder?')
  if np.max(steps) - np.min(steps) > max(0.01, 0.05 * np.median(steps)):
    raise VolumeError(f'{folder}: DICOM slice spacing is not uniform ({np.min(steps):.3g} to '
                      f'{np.max(steps):.3g} mm); missing slices?')
  # Slices must stack along their normal: a gantry tilt (or any shear) moves each slice
  # in-plane too, which a volume affine built from the normal alone would silently drop.
  # Measured as each slice's in-plane offset from the first slice's normal line, so the
  # rounding of stored positions (0.01-0.1 mm) stays far below the bound, while a tilt
  # adds up over the stack: off by more than half a pixel somewhere is refused.
  offsets = positions - positions[0]
  in_plane = offsets - (offsets @ normal)[:, None] * normal
  drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
  bound = max(0.5 * float(min(infos[0]['spacing'])), _POSITION_PRECISION_MM)
  if drift > bound:
    raise VolumeError(f'{folder}: DICOM slice positions drift {drift:.3g} mm in-plane over the '
                      f'stack (more than half a pixel, {bound:.3g} mm: a gantry tilt or sheared '
                      'stack); resample it to an orthogonal stack first')


def read_series(folder: str, allow_large: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """The one DICOM series in `folder`: (voxels [I, J, K], RAS+ affine in mm), checked.

  Raises:
    VolumeError: see the module docstring; and anything `volume_checks.check_geometry` refuses.
  """
  try:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
  except RuntimeError as e:
    raise VolumeError(f'{folder}: cannot scan for DICOM series: {" ".join(str(e).split())}') from e
  if not series:
    raise VolumeError(f'{folder}: no readable DICOM series in the folder')
  if len(series) > 1:
    raise VolumeError(f'{folder}: folder holds {len(series)} DICOM series ({", ".join(series)}); '
                      'put each series in its own folder')
  files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
  # GDCM leaves out the files it cannot parse: a damaged slice must not silently vanish.
  present = [entry.path for entry in os.scandir(folder) if entry.is_file()
             and not entry.name.startswith('.') and looks_like_dicom_file(entry.path)]
  left_out = sorted(set(map(os.path.abspath, present)) - set(map(os.path.abspath, files)))
  for path in list(left_out):
    # A DICOMDIR, a structured report or a presentation state beside the slices is a valid
    # DICOM object without an image: not a slice that went missing.
    sop_class = _non_image_sop_class(path)
    if sop_class:
      logging.warning('%s: a DICOM object without an image (SOP class %s, e.g. a DICOMDIR or '
                      'a report) beside the series; ignored', path, sop_class)
      left_out.remove(path)
  if left_out:
    names = ', '.join(os.path.basename(p) for p in left_out[:3])
    raise VolumeError(f'{folder}: {len(left_out)} DICOM file(s) are not part of the series '
                      f'(unreadable or damaged): {names}{", ..." if len(left_out) > 3 else ""}')
  check_slices(folder, files, allow_large)
  try:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
  except RuntimeError as e:
    raise VolumeError(f'{folder}: cannot read DICOM series: {" ".join(str(e).split())}') from e
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise VolumeError(f'{folder}: expected a scalar (grey-level) image, got '
                      f'{image.GetNumberOfComponentsPerPixel()} components per voxel')
  return sitk_to_ras(image)
