"""What a NIfTI header says beyond nibabel's affine: spatial units, voxel type, raw pixdim, qform.

Kept apart from `volume` (which turns these answers into `VolumeError`s) so that module stays
about reading and writing; nothing here depends on it.
"""

import contextlib
import logging
import threading
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


class _Collect(logging.Handler):
  """Keeps the records it is handed."""

  def __init__(self) -> None:
    super().__init__(logging.DEBUG)
    self.records: list[logging.LogRecord] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.records.append(record)


# nibabel's logger is process-wide: one load at a time swaps its handlers.
_NIBABEL_LOG_LOCK = threading.Lock()


@contextlib.contextmanager
def nibabel_log_collected() -> Iterator[list[logging.LogRecord]]:
  """Collects what nibabel logs while loading, instead of printing it.

  nibabel prints its header repairs ('qform_code 7 not valid; setting to 0') on its own
  handler and again through the root logger, two lines without the file's name before our
  own one-line error. The caller reports the collected records with the path (at their own
  level), or drops them when it raises (the exception says what went wrong). The
  'pixdim[1,2,3] should be ...' repair is left out: `raw_zooms` reports bad pixdim as its
  own error, and when the sform defines the affine pixdim is unused. The list is complete
  once the block has ended.
  """
  logger = nib.imageglobals.logger
  collect = _Collect()
  with _NIBABEL_LOG_LOCK:
    handlers, propagate = list(logger.handlers), logger.propagate
    for handler in handlers:
      logger.removeHandler(handler)
    logger.addHandler(collect)
    logger.propagate = False
    try:
      yield collect.records
    finally:
      logger.removeHandler(collect)
      for handler in handlers:
        logger.addHandler(handler)
      logger.propagate = propagate
      collect.records[:] = [r for r in collect.records
                            if not r.getMessage().startswith('pixdim[1,2,3]')]


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
