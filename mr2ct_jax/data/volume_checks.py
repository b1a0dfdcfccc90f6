"""What makes a volume usable, checked from its header before the voxels are read.

A volume must be 3-D with at least 2 voxels along every axis (a single slice is a 2-D image,
whether it comes as NIfTI or as a one-file DICOM series), have finite positive voxel sizes and
a non-singular affine, and be plausible for a body scan: its field of view and its voxel count
are bounded, so a header typo (1000 mm voxels), a unit mix-up (microns read as mm, or mm
voxels labelled microns) or a declared size that inflates a small file to gigabytes is
refused at once instead of running for minutes and exhausting memory. `allow_large=True`
(the commands' --allow_large_volumes) lifts the size bounds for a real scan that exceeds
them.
"""

import numpy as np


class VolumeError(ValueError):
  """A volume (file or DICOM folder) cannot be used; the message starts with its path."""


# Field of view (mm) along the longest axis: a whole-body scan is under 2 m.
MAX_FOV_MM = 2000.0
# ... and along the other two: the widest CT bores are 85 cm, MR bores 70 cm.
MAX_CROSS_FOV_MM = 900.0
# ... and at least this along the longest axis: a 320 mm field of view whose header says
# microns reads as 0.32 mm; the smallest real scan of a joint still spans centimetres.
MIN_FOV_MM = 2.0
# Voxels: 2^29 (512 Mi) is 2 GiB as float32, e.g. 1024 x 1024 x 512; the processing holds
# several copies of a volume, so more would not fit a workstation anyway.
MAX_VOXELS = 2 ** 29
MIN_VOXELS_PER_AXIS = 2
OVERRIDE = '--allow_large_volumes'


def _fmt(values: np.ndarray) -> list[float]:
  return np.round(np.asarray(values, np.float64), 4).tolist()


def check_size(path: str, shape: tuple[int, ...], allow_large: bool = False) -> None:
  """Raises VolumeError for more than MAX_VOXELS voxels (unless `allow_large`)."""
  count = int(np.prod(np.asarray(shape, np.int64)))
  if count > MAX_VOXELS and not allow_large:
    raise VolumeError(f'{path}: {count:,} voxels (shape {tuple(int(n) for n in shape)}, '
                      f'{4 * count / 2**30:.1f} GiB as float32) exceed the limit of '
                      f'{MAX_VOXELS:,}; pass {OVERRIDE} if this is a real scan')


def check_field_of_view(path: str, shape: tuple[int, ...], affine: np.ndarray,
                        allow_large: bool = False) -> None:
  """Raises VolumeError when the field of view is implausible for a body scan.

  The longest extent may reach MAX_FOV_MM, the two others MAX_CROSS_FOV_MM (unless
  `allow_large`, which keeps only a hard bound of 10 m against unit mix-ups).
  """
  spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
  fov = np.asarray(shape[:3], np.float64) * spacing
  longest, *cross = sorted(fov, reverse=True)
  if longest < MIN_FOV_MM:
    raise VolumeError(f'{path}: implausible geometry: voxel spacing {_fmt(spacing)} mm x shape '
                      f'{tuple(int(n) for n in shape[:3])} = field of view {_fmt(fov)} mm '
                      f'(under {MIN_FOV_MM:g} mm along every axis); check the header\'s voxel '
                      'size and units (a header in microns for mm voxels?)')
  limits = (10_000.0, 10_000.0) if allow_large else (MAX_FOV_MM, MAX_CROSS_FOV_MM)
  if longest > limits[0] or max(cross) > limits[1]:
    raise VolumeError(f'{path}: implausible geometry: voxel spacing {_fmt(spacing)} mm x shape '
                      f'{tuple(int(n) for n in shape[:3])} = field of view {_fmt(fov)} mm '
                      f'(a body scan spans at most {limits[0]:g} mm along one axis and '
                      f'{limits[1]:g} mm along the others); check the header\'s voxel size '
                      f'and units' + ('' if allow_large else f', or pass {OVERRIDE}'))


def check_geometry(path: str, shape: tuple[int, ...], affine: np.ndarray,
                   zooms: np.ndarray | None = None,
                   allow_large: bool = False) -> tuple[int, np.ndarray]:
  """Validates shape, spacing and size before the voxels are loaded.

  Args:
    path: named in the errors.
    shape: the stored shape; trailing singleton axes beyond the third are allowed.
    affine: voxel -> world (mm).
    zooms: the header's own voxel sizes, checked too when given (NIfTI pixdim).
    allow_large: lift the field-of-view and voxel-count bounds.

  Returns:
    (number of squeezed trailing axes, affine as float64).

  Raises:
    VolumeError: not 3-D, an axis with fewer than 2 voxels, bad spacing, a singular affine,
      an implausible field of view or too many voxels.
  """
  shape = tuple(int(n) for n in shape)
  squeezed = 0
  while len(shape) - squeezed > 3 and shape[len(shape) - squeezed - 1] == 1:
    squeezed += 1
  spatial = shape[:len(shape) - squeezed]
  if len(spatial) != 3:
    raise VolumeError(f'{path}: expected a 3-D volume, got shape {shape}')
  if min(spatial) < MIN_VOXELS_PER_AXIS:
    raise VolumeError(f'{path}: expected a 3-D volume, got shape {shape}: a volume needs at '
                      f'least {MIN_VOXELS_PER_AXIS} voxels along every axis (a single slice '
                      'is a 2-D image)')
  affine = np.asarray(affine, dtype=np.float64)
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  if zooms is not None:
    spacing = np.concatenate([np.asarray(zooms, np.float64)[:3], spacing])
  bad_spacing = not np.all(np.isfinite(spacing)) or np.any(spacing <= 0)
  bad_zooms = zooms is not None and (not np.all(np.isfinite(spacing[:3])) or
                                     np.any(spacing[:3] <= 0))
  if not np.all(np.isfinite(affine[:3])) and not bad_zooms:  # a NaN pixdim is a bad spacing
    # A NaN origin or direction (e.g. a NaN in srow_x or the qform quaternion) can leave the
    # spacing finite: name the part of the geometry that is broken.
    part = ('its directions and voxel sizes' if not np.all(np.isfinite(affine[:3, :3]))
            else 'its origin')
    raise VolumeError(f'{path}: the voxel-to-world affine holds NaN or Inf in {part} '
                      f'(sform/qform of a NIfTI, position/orientation tags of a DICOM): '
                      f'{np.round(affine[:3], 6).tolist()}')
  if bad_spacing:
    raise VolumeError(f'{path}: voxel spacing must be finite and > 0, got '
                      f'{np.round(spacing[:3], 6).tolist()} mm')
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise VolumeError(f'{path}: the voxel-to-world affine is singular')
  check_field_of_view(path, shape, affine, allow_large)
  check_size(path, spatial, allow_large)
  return squeezed, affine


def checked_voxels(path: str, array: np.ndarray, squeezed: int) -> np.ndarray:
  """The voxels as contiguous float32, trailing singleton axes dropped, none NaN or Inf."""
  array = np.reshape(array, array.shape[:array.ndim - squeezed])
  bad = int(np.count_nonzero(~np.isfinite(array)))
  if bad:
    raise VolumeError(f'{path}: {bad} of {array.size} voxels are NaN or Inf')
  return np.ascontiguousarray(array, dtype=np.float32)
