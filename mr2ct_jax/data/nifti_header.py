"""What a NIfTI header says beyond nibabel's affine: spatial units, voxel type, raw pixdim, qform.

Kept apart from `volume` (which turns these answers into `VolumeError`s) so that module stays
about reading and writing; nothing here depends on it.
"""

import contextlib
from typing import Iterator

import nibabel as nib
import numpy as np

# NIfTI xyzt_units spatial codes (xyzt_units % 8) -> mm: 1 metre, 2 mm, 3 micron. 0 (unknown)
# and invalid codes are taken as mm, what unit-less files in practice hold.
_UNIT_TO_MM = {1: 1000.0, 2: 1.0, 3: 1e-3}
# A qform holds a rotation and voxel sizes only; affines whose direction columns deviate from
# orthonormal by more than this (shears) are written as sform only. float32 headers and
# scanner-rounded direction cosines stay far below it; 1e-4 is 0.1 mm over a metre.
_QFORM_TOL = 1e-4


def mm_per_unit(header: nib.Nifti1Header) -> float:
  """Millimetres per spatial unit of the header (metres 1000, microns 0.001, unknown 1)."""
  return _UNIT_TO_MM.get(int(header['xyzt_units']) % 8, 1.0)


def voxel_type_problem(dtype: np.dtype) -> str | None:
  """Why voxels of `dtype` are not a real scalar image (None if they are)."""
  if dtype.kind == 'c':  # nibabel would silently drop the imaginary part
    return 'complex data; a real scalar image is expected'
  if dtype.names:  # RGB24 / RGBA32 voxels are records of channels
    return (f'expected a scalar (single-channel) image, got {len(dtype.names)} channels per '
            f'voxel ({"".join(dtype.names)})')
  return None


@contextlib.contextmanager
def without_pixdim_repair_warning() -> Iterator[None]:
  """Hides nibabel's 'pixdim[1,2,3] should be ...' warning while loading.

  `raw_zooms` lets the reader report bad pixdim as its own one-line error, and when the
  sform defines the affine pixdim is unused, so nibabel's extra line only adds noise.
  """
  def keep(record) -> bool:
    return not record.getMessage().startswith('pixdim[1,2,3]')
  nib.imageglobals.logger.addFilter(keep)
  try:
    yield
  finally:
    nib.imageglobals.logger.removeFilter(keep)


def raw_zooms(path: str, img: nib.Nifti1Image) -> np.ndarray | None:
  """Spatial pixdim as stored (file units), when the affine is built from it (else None).

  nibabel silently repairs zero/negative pixdim on load (to 1 / abs); we would rather say the
  header is broken than guess a spacing.
  """
  header = img.header
  if header['sform_code'] > 0:
    return None  # the affine comes from the sform; its column norms are checked instead
  with nib.openers.ImageOpener(path) as f:
    raw = type(header).from_fileobj(f, check=False)
  return np.asarray(raw['pixdim'][1:4], np.float64)


def qform_representable(affine: np.ndarray) -> bool:
  """True if the affine is a rotation/reflection times voxel sizes (no shear)."""
  matrix = np.asarray(affine, np.float64)[:3, :3]
  columns = matrix / np.linalg.norm(matrix, axis=0)
  return bool(np.allclose(columns.T @ columns, np.eye(3), atol=_QFORM_TOL))
