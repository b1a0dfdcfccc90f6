"""Reading and writing 3-D volumes: NIfTI (nibabel) and DICOM series folders (`dicom`).

Every volume comes back as a `Volume`: a float32 array in stored voxel order and the
nibabel-style RAS+ voxel-to-world affine in mm (NIfTI files in metres or microns are scaled
on reading). Anything that would make a volume unusable (wrong dimensionality, a single slice,
complex or multi-channel voxels, NaN/Inf, zero or implausible spacing, an implausible size,
several DICOM series in one folder, a corrupt file) raises `VolumeError` with a one-line
message that starts with the offending path; header geometry and size are checked before the
voxels are loaded (`volume_checks`).
"""

import dataclasses
import gzip
import os

from absl import logging
from absl.logging import converter
import nibabel as nib
import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax import storage
from mr2ct_jax.data import dicom
from mr2ct_jax.data import nifti_header
from mr2ct_jax.data import volume_checks
from mr2ct_jax.data.volume_checks import VolumeError

NIFTI_SUFFIXES = ('.nii.gz', '.nii')


@dataclasses.dataclass
class Volume:
  """A 3-D scalar volume.

  Attributes:
    array: float32 [I, J, K] voxels in stored order.
    affine: float64 [4, 4] voxel index -> RAS+ world (mm), nibabel convention.
    path: where it was read from ('' for in-memory volumes).
    squeezed: trailing singleton axes of the file dropped from `array` ([X, Y, Z, 1] -> 1);
      outputs are reshaped to `file_shape` to keep the input's shape.
    allow_large: the user lifted the size bounds for it (`volume_checks`), which later
      processing honours too.
    xform_code: the NIfTI code of the space the affine maps to (1 scanner, 2 aligned to
      another scan, 3 Talairach, 4 MNI, 5 a template): a NIfTI input's sform (else qform)
      code, 1 for DICOM; outputs made on its grid keep it.
  """
  array: np.ndarray
  affine: np.ndarray
  path: str = ''
  squeezed: int = 0
  allow_large: bool = False
  xform_code: int = 1

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


def _volume(path: str, array: np.ndarray, affine: np.ndarray, squeezed: int,
            allow_large: bool, xform_code: int = 1) -> Volume:
  return Volume(volume_checks.checked_voxels(path, array, squeezed), affine, path, squeezed,
                allow_large, xform_code)


def _xform_code(header: nib.Nifti1Header) -> int:
  """The code of the space nibabel's affine maps to: the sform's if set, else the qform's,
  else 1 (scanner, what outputs of a header without orientation are labelled)."""
  for key in ('sform_code', 'qform_code'):
    if int(header[key]) > 0:
      return int(header[key])
  return 1


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32_voxels(path: str, img: nib.spatialimages.SpatialImage) -> np.ndarray:
  """The voxels (scl_slope/scl_inter applied) as float32; VolumeError if they overflow it.

  Integer data whose scaled range fits float32 (nearly every file) are read straight to
  float32. Float64 data, or a scaling that could exceed float32, are read in float64 first,
  so a value beyond float32 is named as such instead of turning into Inf (and then being
  reported as an Inf voxel the file lacks).
  """
  proxy = img.dataobj
  slope = float(getattr(proxy, 'slope', 1.0))
  inter = float(getattr(proxy, 'inter', 0.0))
  stored = img.get_data_dtype()
  if stored.kind in 'iub':
    info = np.iinfo(stored)
    bound = abs(slope) * max(abs(int(info.min)), int(info.max)) + abs(inter)
  else:
    bound = np.inf if stored.itemsize > 4 or slope != 1.0 or inter != 0.0 else 0.0
  if bound <= _FLOAT32_MAX:
    return np.asarray(proxy, dtype=np.float32)
  wide = np.asarray(proxy, dtype=np.float64)
  finite = np.isfinite(wide)  # Inf and NaN voxels are reported as such later
  largest = max(float(np.max(wide, where=finite, initial=0.0)),
                -float(np.min(wide, where=finite, initial=0.0)))
  if largest > _FLOAT32_MAX:
    raise VolumeError(f'{path}: voxel values up to {largest:.3g} exceed float32 (3.4e38); '
                      'a wrong scl_slope or raw values of another unit?')
  return wide.astype(np.float32)


def _check_gzip_stream(path: str) -> None:
  """Decompresses a gzip file to its end, where gzip checks the data's CRC-32 and length.

  nibabel reads only the bytes the image needs, so a flipped byte in the voxels or a file
  cut short by its 8-byte trailer would otherwise load without complaint (and with changed
  voxels). Raises what `gzip` raises (BadGzipFile, EOFError, zlib.error).
  """
  with gzip.open(path, 'rb') as f:
    while f.read(1 << 24):
      pass


def _read_nifti(path: str, allow_large: bool) -> Volume:
  try:
    with nifti_header.nibabel_log_collected() as repairs:
      img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      raise VolumeError(f'{path}: not a NIfTI image ({type(img).__name__})')
    for record in repairs:  # e.g. 'qform_code 7 not valid; setting to 0', at its own level
      logging.log(converter.standard_to_absl(record.levelno),
                  '%s: nibabel repaired its header: %s', path, record.getMessage())
    problem = nifti_header.voxel_type_problem(img.get_data_dtype())
    if problem:
      raise VolumeError(f'{path}: {problem}')
    if int(img.header['sform_code']) == 0 and int(img.header['qform_code']) == 0:
      # Not an error (old Analyze-era exports), but tools disagree on such files: nibabel
      # flips x (RAS+ from pixdim), ITK keeps identity directions and origin 0.
      logging.warning("%s: its header gives no orientation (sform and qform codes 0); read "
                      "with nibabel's default affine, which outputs store as scanner "
                      'coordinates (ITK-based viewers may show the input flipped against '
                      'them)', path)
    # Geometry in mm from here on: scale the world coordinates (rotation, zooms, origin).
    to_mm = nifti_header.mm_per_unit(img.header)
    affine = np.diag([to_mm] * 3 + [1.0]) @ img.affine
    zooms = nifti_header.raw_zooms(path, img)
    squeezed, affine = volume_checks.check_geometry(
        path, img.shape, affine, None if zooms is None else zooms * to_mm, allow_large)
    array = _float32_voxels(path, img)
    if path.lower().endswith('.gz'):
      _check_gzip_stream(path)
  except VolumeError:
    raise
  except Exception as e:  # nibabel raises many types for corrupt/truncated/non-image files.
    if isinstance(e, OSError) and e.errno is not None:  # the read itself failed
      raise VolumeError(f'{path}: cannot read it: {e.strerror}') from e
    # The line starts with the path already: nibabel's own mention of it becomes the name.
    msg = ' '.join(str(e).replace(path, os.path.basename(path)).split()) or type(e).__name__
    raise VolumeError(f'{path}: cannot read NIfTI (corrupt, truncated or not an image): '
                      f'{msg}') from e
  return _volume(path, array, affine, squeezed, allow_large, _xform_code(img.header))


def _read_dicom_dir(path: str, allow_large: bool) -> Volume:
  array, affine = dicom.read_series(path, allow_large)
  squeezed, affine = volume_checks.check_geometry(path, array.shape, affine,
                                                  allow_large=allow_large)
  return _volume(path, array, affine, squeezed, allow_large)


def read_volume(path: str, allow_large: bool = False) -> Volume:
  """Reads a .nii/.nii.gz file or a DICOM series folder.

  Trailing singleton axes beyond the third are squeezed (e.g. [X, Y, Z, 1]) and counted in
  `Volume.squeezed`. NIfTI spatial units are honoured (metres x1000, microns x0.001,
  unknown = mm), so the affine is always in mm.

  Args:
    path: a NIfTI file or a folder holding exactly one DICOM series.
    allow_large: lift the field-of-view and voxel-count bounds (`volume_checks`).

  Returns:
    The volume: float32 voxels in stored order and the RAS+ affine.

  Raises:
    VolumeError: missing path, not an image, corrupt file, not 3-D or a single slice, complex
      or multi-channel voxels, NaN/Inf voxels, zero/negative spacing, an implausible field of
      view or size, a DICOM series that `dicom.check_slices` refuses.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VolumeError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    if not dicom.is_dicom_dir(path):
      raise VolumeError(f'{path}: folder holds no DICOM files (expected one DICOM series)')
    return _read_dicom_dir(path, allow_large)
  if is_nifti_path(path):
    return _read_nifti(path, allow_large)
  if dicom.looks_like_dicom_file(path):
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
    try:
      if entry.is_dir():
        if dicom.is_dicom_dir(entry.path):
          found.append(entry.path)
        else:
          ignored.append(entry.name + '/')
      elif is_nifti_path(entry.name):
        found.append(entry.path)
      elif dicom.looks_like_dicom_file(entry.path):
        dicom_files += 1
      else:
        ignored.append(entry.name)
    except OSError as e:  # a symbolic-link loop, a vanished or unreadable entry
      ignored.append(f'{entry.name} ({e.strerror})')
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
                overwrite: bool = False, xform_code: int = 1) -> str:
  """Writes `array` as NIfTI atomically (temporary name in the same folder, then rename; a
  gs:// URL is written locally and uploaded whole).

  Float data written to an integer dtype is rounded and clipped to the dtype's range. The file
  is labelled in mm with `affine` as sform and, unless the affine is sheared (a qform cannot
  hold a shear), also as qform, both with `xform_code`; otherwise qform_code is 0. A volume
  read from a file in metres or microns therefore comes back in mm with the scaled affine:
  same physical geometry.

  Args:
    path: destination (.nii or .nii.gz); its folder is created if needed.
    array: voxels in the order the affine describes.
    affine: [4, 4] voxel -> RAS+ world (mm), e.g. `Volume.affine`.
    dtype: on-disk data type (int16 for CT in HU, uint8 for masks/labels, float32 ...).
    overwrite: replace an existing file; otherwise an existing path is an error.
    xform_code: the sform/qform code, the space the affine maps to (1 scanner; an output on
      an input's grid passes its `Volume.xform_code`, e.g. 4 for an MR registered to MNI).

  Returns:
    `path`.
  """
  path = os.fspath(path)
  if not is_nifti_path(path):
    raise VolumeError(f'{path}: output name must end in .nii or .nii.gz')
  if storage.exists(path) and not overwrite:
    raise VolumeError(f'{path}: already exists (pass overwrite=True to replace it)')
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise VolumeError(f'{path}: affine must be 4x4, got shape {affine.shape}')
  data = _cast(path, np.asarray(array), dtype)
  img = nib.Nifti1Image(data, affine)
  img.header.set_data_dtype(data.dtype)
  img.header.set_xyzt_units('mm', 'sec')
  if nifti_header.qform_representable(affine):
    img.set_qform(affine, code=int(xform_code))
  else:  # nibabel would store an orthogonal approximation that disagrees with the sform
    img.set_qform(None, code=0)
  img.set_sform(affine, code=int(xform_code))
  if not storage.is_remote(path):  # a URL is uploaded whole by atomic.writing
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic.writing(path, 'wb') as f:
    if path.lower().endswith('.gz'):
      # Streamed (no second copy of the volume in memory); mtime 0: the same bytes every time.
      with gzip.GzipFile(fileobj=f, mode='wb', compresslevel=1, mtime=0, filename='') as gz:
        img.to_stream(gz)
    else:
      img.to_stream(f)
  return path
