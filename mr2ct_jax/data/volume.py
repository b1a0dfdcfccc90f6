"""Reading and writing 3-D volumes: NIfTI (nibabel) and DICOM series folders (SimpleITK).

Every volume comes back as a `Volume`: a float32 array in stored voxel order and the
nibabel-style RAS+ voxel-to-world affine in mm (NIfTI files in metres or microns are scaled
on reading). Anything that would make a volume unusable (wrong dimensionality, complex or
multi-channel voxels, NaN/Inf, zero or implausible spacing, several DICOM series in one
folder, a corrupt file) raises `VolumeError` with a one-line message that starts with the
offending path; header geometry is checked before the voxels are loaded.
"""

import dataclasses
import os
import uuid

from absl import logging
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from mr2ct_jax.data import nifti_header

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
_DICOM_SUFFIXES = ('.dcm', '.dicom', '.ima')
# ITK reports physical points in LPS; nibabel affines are RAS: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Largest extent (mm) accepted along any voxel axis. The tallest recorded human was 2.72 m
# and the widest CT bores are under 1 m, so 3 m holds any body image; a header typo (1000 mm
# voxels) or a unit mix-up (microns read as mm) exceeds it by orders of magnitude, and
# resampling such a field of view to ~1 mm pixels would need tens of GB and minutes.
MAX_FOV_MM = 3000.0


class VolumeError(ValueError):
  """A volume (file or DICOM folder) cannot be used; the message starts with its path."""


@dataclasses.dataclass
class Volume:
  """A 3-D scalar volume.

  Attributes:
    array: float32 [I, J, K] voxels in stored order.
    affine: float64 [4, 4] voxel index -> RAS+ world (mm), nibabel convention.
    path: where it was read from ('' for in-memory volumes).
    squeezed: trailing singleton axes of the file dropped from `array` ([X, Y, Z, 1] -> 1);
      outputs are reshaped to `file_shape` to keep the input's shape.
  """
  array: np.ndarray
  affine: np.ndarray
  path: str = ''
  squeezed: int = 0

  @property
  def spacing(self) -> np.ndarray:
    """Voxel sizes in mm along the array axes (column norms of the affine)."""
    return np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape)

  @property
  def file_shape(self) -> tuple[int, ...]:
    """The shape as stored in the file, trailing singleton axes included."""
    return self.shape + (1,) * self.squeezed


def is_nifti_path(path: str) -> bool:
  """True for names ending in .nii or .nii.gz (case-insensitive)."""
  return path.lower().endswith(NIFTI_SUFFIXES)


def volume_id(path: str) -> str:
  """The volume's name without folder and NIfTI suffix ('a/b/p01.nii.gz' -> 'p01')."""
  name = os.path.basename(os.path.normpath(path))
  for suffix in NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _looks_like_dicom_file(path: str) -> bool:
  if path.lower().endswith(_DICOM_SUFFIXES):
    return True
  try:  # Part-10 files: 128-byte preamble then 'DICM'.
    with open(path, 'rb') as f:
      return f.read(132)[128:132] == b'DICM'
  except OSError:
    return False


def is_dicom_dir(path: str) -> bool:
  """True if `path` is a folder that directly holds at least one DICOM file."""
  if not os.path.isdir(path):
    return False
  for entry in sorted(os.scandir(path), key=lambda e: e.name):
    if entry.is_file() and not entry.name.startswith('.') and _looks_like_dicom_file(entry.path):
      return True
  return False


def _fmt(values: np.ndarray) -> list[float]:
  return np.round(np.asarray(values, np.float64), 4).tolist()


def check_field_of_view(path: str, shape: tuple[int, ...], affine: np.ndarray) -> None:
  """Raises VolumeError when the volume spans more than MAX_FOV_MM along a voxel axis."""
  spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
  fov = np.asarray(shape[:3], np.float64) * spacing
  if np.any(fov > MAX_FOV_MM):
    raise VolumeError(f'{path}: implausible geometry: voxel spacing {_fmt(spacing)} mm x shape '
                      f'{tuple(int(n) for n in shape[:3])} = field of view {_fmt(fov)} mm, over '
                      f'{MAX_FOV_MM:g} mm; check the header\'s voxel size and units')


def _check_geometry(path: str, shape: tuple[int, ...], affine: np.ndarray,
                    zooms: np.ndarray | None = None) -> tuple[int, np.ndarray]:
  """Validates shape and spacing (before loading voxels); returns (squeezed axes, affine)."""
  shape = tuple(int(n) for n in shape)
  squeezed = 0
  while len(shape) - squeezed > 3 and shape[len(shape) - squeezed - 1] == 1:
    squeezed += 1
  if len(shape) - squeezed != 3 or min(shape) < 1:
    raise VolumeError(f'{path}: expected a 3-D volume, got shape {shape}')
  affine = np.asarray(affine, dtype=np.float64)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  if zooms is not None:
    spacing = np.concatenate([np.asarray(zooms, np.float64)[:3], spacing])
  if not np.all(np.isfinite(affine)) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise VolumeError(f'{path}: voxel spacing must be finite and > 0, got '
                      f'{np.round(spacing[:3], 6).tolist()} mm')
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise VolumeError(f'{path}: the voxel-to-world affine is singular')
  check_field_of_view(path, shape, affine)
  return squeezed, affine


def _volume(path: str, array: np.ndarray, affine: np.ndarray, squeezed: int) -> Volume:
  """The checked Volume: trailing singleton axes dropped, no NaN/Inf voxels."""
  array = np.reshape(array, array.shape[:array.ndim - squeezed])
  bad = int(np.count_nonzero(~np.isfinite(array)))
  if bad:
    raise VolumeError(f'{path}: {bad} of {array.size} voxels are NaN or Inf')
  return Volume(np.ascontiguousarray(array, dtype=np.float32), affine, path, squeezed)


def _read_nifti(path: str) -> Volume:
  try:
    with nifti_header.without_pixdim_repair_warning():
      img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      raise VolumeError(f'{path}: not a NIfTI image ({type(img).__name__})')
    problem = nifti_header.voxel_type_problem(img.get_data_dtype())
    if problem:
      raise VolumeError(f'{path}: {problem}')
    # Geometry in mm from here on: scale the world coordinates (rotation, zooms, origin).
    to_mm = nifti_header.mm_per_unit(img.header)
    affine = np.diag([to_mm] * 3 + [1.0]) @ img.affine
    zooms = nifti_header.raw_zooms(path, img)
    squeezed, affine = _check_geometry(path, img.shape, affine,
                                       None if zooms is None else zooms * to_mm)
    array = np.asarray(img.dataobj, dtype=np.float32)
  except VolumeError:
    raise
  except Exception as e:  # nibabel raises many types for corrupt/truncated/non-image files.
    msg = ' '.join(str(e).replace(path, 'the file').split()) or type(e).__name__
    raise VolumeError(f'{path}: cannot read NIfTI (corrupt, truncated or not an image): '
                      f'{msg}') from e
  return _volume(path, array, affine, squeezed)


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


def _dicom_tag(reader: sitk.ImageFileReader, tag: str) -> list[float] | None:
  if not reader.HasMetaDataKey(tag):
    return None
  try:
    return [float(v) for v in reader.GetMetaData(tag).strip().split('\\')]
  except ValueError:
    return None


def _check_dicom_slices(path: str, files: list[str]) -> None:
  """Errors for mixed orientations or duplicate/irregular slice positions in one series."""
  orients, positions = [], []
  for f in files:
    reader = sitk.ImageFileReader()
    reader.SetFileName(f)
    reader.ReadImageInformation()
    orient, pos = _dicom_tag(reader, '0020|0037'), _dicom_tag(reader, '0020|0032')
    if orient is None or pos is None or len(orient) != 6 or len(pos) != 3:
      return  # No geometry tags to compare: leave it to ITK.
    orients.append(orient)
    positions.append(pos)
  orients = np.asarray(orients)
  if np.max(np.abs(orients - orients[0])) > 1e-3:
    n = len(np.unique(np.round(orients, 3), axis=0))
    raise VolumeError(f'{path}: DICOM series mixes {n} slice orientations; '
                      'put each orientation in its own folder')
  if len(files) < 2:
    return
  normal = np.cross(orients[0, :3], orients[0, 3:])
  steps = np.diff(np.sort(np.asarray(positions) @ normal))
  if np.min(steps) <= 1e-3:
    raise VolumeError(f'{path}: DICOM series has {int(np.sum(steps <= 1e-3))} duplicate slice '
                      'positions (zero slice spacing); is it several acquisitions in one folder?')
  if np.max(steps) - np.min(steps) > max(0.01, 0.05 * np.median(steps)):
    raise VolumeError(f'{path}: DICOM slice spacing is not uniform ({np.min(steps):.3g} to '
                      f'{np.max(steps):.3g} mm); missing slices?')


def _read_dicom_dir(path: str) -> Volume:
  try:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(path)
  except RuntimeError as e:
    raise VolumeError(f'{path}: cannot scan for DICOM series: {" ".join(str(e).split())}') from e
  if not series:
    raise VolumeError(f'{path}: no readable DICOM series in the folder')
  if len(series) > 1:
    raise VolumeError(f'{path}: folder holds {len(series)} DICOM series ({", ".join(series)}); '
                      'put each series in its own folder')
  files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series[0]))
  try:
    _check_dicom_slices(path, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
  except VolumeError:
    raise
  except RuntimeError as e:
    raise VolumeError(f'{path}: cannot read DICOM series: {" ".join(str(e).split())}') from e
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise VolumeError(f'{path}: expected a scalar (grey-level) image, got '
                      f'{image.GetNumberOfComponentsPerPixel()} components per voxel')
  array, affine = sitk_to_ras(image)
  if array.ndim != 3:
    raise VolumeError(f'{path}: expected a 3-D volume, got shape {tuple(array.shape)}')
  squeezed, affine = _check_geometry(path, array.shape, affine)
  return _volume(path, array, affine, squeezed)


def read_volume(path: str) -> Volume:
  """Reads a .nii/.nii.gz file or a DICOM series folder.

  Trailing singleton axes beyond the third are squeezed (e.g. [X, Y, Z, 1]) and counted in
  `Volume.squeezed`. NIfTI spatial units are honoured (metres x1000, microns x0.001,
  unknown = mm), so the affine is always in mm.

  Args:
    path: a NIfTI file or a folder holding exactly one DICOM series.

  Returns:
    The volume: float32 voxels in stored order and the RAS+ affine.

  Raises:
    VolumeError: missing path, not an image, corrupt file, not 3-D, complex or multi-channel
      voxels, NaN/Inf voxels, zero/negative spacing, a field of view over MAX_FOV_MM, several
      DICOM series or mixed orientations in one folder.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VolumeError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    if not is_dicom_dir(path):
      raise VolumeError(f'{path}: folder holds no DICOM files (expected one DICOM series)')
    return _read_dicom_dir(path)
  if is_nifti_path(path):
    return _read_nifti(path)
  if _looks_like_dicom_file(path):
    raise VolumeError(f'{path}: a single DICOM file; pass the folder holding the series')
  raise VolumeError(f'{path}: not a volume (expected .nii, .nii.gz or a DICOM series folder)')


def list_volumes(folder: str) -> list[str]:
  """Lists the volumes in `folder`: NIfTI files and DICOM series sub-folders, sorted.

  A folder that itself holds DICOM files (and no NIfTI) is one series: `[folder]`.
  Other files are ignored with a logged warning.

  Raises:
    VolumeError: the folder is missing, not a folder, or holds no volume.
  """
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise VolumeError(f'{folder}: no such folder')
  if not os.path.isdir(folder):
    raise VolumeError(f'{folder}: not a folder')
  found, ignored, dicom_files = [], [], 0
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if entry.name.startswith('.'):
      continue
    if entry.is_dir():
      if is_dicom_dir(entry.path):
        found.append(entry.path)
      else:
        ignored.append(entry.name + '/')
    elif is_nifti_path(entry.name):
      found.append(entry.path)
    elif _looks_like_dicom_file(entry.path):
      dicom_files += 1
    else:
      ignored.append(entry.name)
  if dicom_files and not found:
    return [folder]
  if dicom_files:
    ignored.append(f'{dicom_files} loose DICOM files')
  if ignored:
    logging.warning('%s: ignored %d entries that are not NIfTI files or DICOM series folders: %s',
                    folder, len(ignored), ', '.join(ignored[:5]) + (', ...' if len(ignored) > 5
                                                                    else ''))
  if not found:
    raise VolumeError(f'{folder}: no NIfTI files (.nii, .nii.gz) or DICOM series folders found'
                      + (f' ({len(ignored)} other entries ignored)' if ignored else ''))
  return found


def _cast(path: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype.kind in 'iu':
    if array.dtype.kind == 'f':
      bad = int(np.count_nonzero(~np.isfinite(array)))
      if bad:
        raise VolumeError(f'{path}: cannot write {bad} NaN/Inf voxels as {dtype.name}')
      info = np.iinfo(dtype)
      array = np.clip(np.rint(array), info.min, info.max)
    elif array.dtype.kind in 'iu':
      info = np.iinfo(dtype)
      array = np.clip(array, info.min, info.max)
  return array.astype(dtype)


def write_nifti(path: str, array: np.ndarray, affine: np.ndarray, dtype=np.int16,
                overwrite: bool = False) -> str:
  """Writes `array` as NIfTI atomically (temporary name in the same folder, then rename).

  Float data written to an integer dtype is rounded and clipped to the dtype's range. The file
  is labelled in mm with `affine` as sform and, unless the affine is sheared (a qform cannot
  hold a shear), also as qform; otherwise qform_code is 0. A volume read from a file in metres
  or microns therefore comes back in mm with the scaled affine: same physical geometry.

  Args:
    path: destination (.nii or .nii.gz); its folder is created if needed.
    array: voxels in the order the affine describes.
    affine: [4, 4] voxel -> RAS+ world (mm), e.g. `Volume.affine`.
    dtype: on-disk data type (int16 for CT in HU, uint8 for masks/labels, float32 ...).
    overwrite: replace an existing file; otherwise an existing path is an error.

  Returns:
    `path`.
  """
  path = os.fspath(path)
  if not is_nifti_path(path):
    raise VolumeError(f'{path}: output name must end in .nii or .nii.gz')
  if os.path.exists(path) and not overwrite:
    raise VolumeError(f'{path}: already exists (pass overwrite=True to replace it)')
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise VolumeError(f'{path}: affine must be 4x4, got shape {affine.shape}')
  data = _cast(path, np.asarray(array), dtype)
  img = nib.Nifti1Image(data, affine)
  img.header.set_data_dtype(data.dtype)
  img.header.set_xyzt_units('mm', 'sec')
  if nifti_header.qform_representable(affine):
    img.set_qform(affine, code=1)  # scanner coordinates
  else:  # nibabel would store an orthogonal approximation that disagrees with the sform
    img.set_qform(None, code=0)
  img.set_sform(affine, code=1)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Keep the suffix so nibabel compresses .nii.gz; the leading dot hides it from list_volumes.
  tmp = os.path.join(folder, f'.tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}')
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
