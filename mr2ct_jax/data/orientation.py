"""Reorientation to the canonical RAS+ voxel order, as a pure axis permutation / flip.

No resampling happens: the closest RAS+ axis order of the affine is applied to the array
(nibabel's `as_closest_canonical` semantics), so the round trip is exact for voxels and
affine. Axial slices of a canonical array are `array[:, :, k]` (axis 2 = superior).
"""

from typing import Union

from absl import logging
import numpy as np
from nibabel import orientations

from mr2ct_jax.data import volume as volume_lib

_RAS = orientations.axcodes2ornt(('R', 'A', 'S'))


def canonical_transform(affine: np.ndarray) -> np.ndarray:
  """The nibabel orientation transform [3, 2] from the affine's voxel order to RAS+."""
  return orientations.ornt_transform(orientations.io_orientation(np.asarray(affine)), _RAS)


def invert_transform(ornt: np.ndarray) -> np.ndarray:
  """The orientation transform that undoes `ornt` (RAS+ back to the stored order)."""
  ornt = np.asarray(ornt, np.float64)
  inverse = np.zeros_like(ornt)
  for axis, (target, flip) in enumerate(ornt):
    inverse[int(target)] = (axis, flip)
  return inverse


def axcodes(affine: np.ndarray) -> str:
  """The stored orientation as a string such as 'RAS', 'LPS' or 'PIR'."""
  return ''.join(orientations.aff2axcodes(np.asarray(affine)))


def to_canonical(
    vol: Union[volume_lib.Volume, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reorders a volume's voxels to RAS+.

  Args:
    vol: a `Volume`, or an `(array, affine)` pair; arrays may have extra trailing axes.

  Returns:
    (array_ras, affine_ras, ornt_transform): the reordered (contiguous) array, its affine
    (same world coordinates for every voxel) and the transform `from_canonical` inverts.
  """
  if isinstance(vol, volume_lib.Volume):
    array, affine = vol.array, vol.affine
  else:
    array, affine = vol
  array, affine = np.asarray(array), np.asarray(affine, np.float64)
  ornt = canonical_transform(affine)
  array_ras = np.ascontiguousarray(orientations.apply_orientation(array, ornt))
  affine_ras = affine @ orientations.inv_ornt_aff(ornt, array.shape[:3])
  return array_ras, affine_ras, ornt


def from_canonical(array_ras: np.ndarray, ornt_transform: np.ndarray) -> np.ndarray:
  """Reorders a RAS+ array back to the stored voxel order (exact inverse of to_canonical)."""
  inverse = invert_transform(ornt_transform)
  return np.ascontiguousarray(orientations.apply_orientation(np.asarray(array_ras), inverse))


def from_canonical_affine(affine_ras: np.ndarray, ornt_transform: np.ndarray,
                          shape_ras: tuple[int, ...]) -> np.ndarray:
  """The stored-order affine from the canonical one (inverse of to_canonical's affine)."""
  inverse = invert_transform(ornt_transform)
  return np.asarray(affine_ras, np.float64) @ orientations.inv_ornt_aff(inverse, shape_ras[:3])


# Two grids are one when their affines agree to this (mm, or direction cosines).
GRID_ATOL_MM = 1e-3


def _canonical_grid(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...],
                                                                         np.ndarray]:
  """The RAS+ shape and affine of a grid (what `to_canonical` gives, without the voxels)."""
  ornt = canonical_transform(affine)
  shape_ras = [0, 0, 0]
  for axis, (target, _) in enumerate(ornt):
    shape_ras[int(target)] = shape[axis]
  return tuple(shape_ras), np.asarray(affine, np.float64) @ orientations.inv_ornt_aff(
      ornt, shape[:3])


def same_grid(a: volume_lib.Volume, b: volume_lib.Volume, atol: float = GRID_ATOL_MM) -> bool:
  """True when `a` and `b` have one shape and one affine (to `atol`) as stored."""
  return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)


def onto_grid_of(reference: volume_lib.Volume, other: volume_lib.Volume,
                 atol: float = GRID_ATOL_MM) -> volume_lib.Volume | None:
  """`other` on `reference`'s grid: itself when stored alike, its voxels reordered when it is
  the same world grid stored in another voxel order, None when the grids differ.

  A CT exported LPS beside its RAS MR, or a label map written with its axes swapped, holds
  the same voxels at the same world positions as an image on the reference grid; only the
  order of the axes and their directions differ. Then the voxels are permuted / flipped
  (no resampling) and the result carries `reference`'s affine. None when the grids differ
  in the world (shape or, beyond `atol` in mm or direction cosines, affine) after
  reorientation.
  """
  if same_grid(reference, other, atol):
    return other
  if len(reference.shape) != 3 or len(other.shape) != 3:
    return None
  ref_shape, ref_affine = _canonical_grid(reference.shape, reference.affine)
  other_shape, other_affine = _canonical_grid(other.shape, other.affine)
  if other_shape != ref_shape or not np.allclose(other_affine, ref_affine, atol=atol):
    return None
  logging.info('%s: the grid of %s stored in another voxel order (%s vs %s); reordered',
               other.path, reference.path, axcodes(other.affine), axcodes(reference.affine))
  other_ras, _, _ = to_canonical(other)
  return volume_lib.Volume(from_canonical(other_ras, canonical_transform(reference.affine)),
                           np.asarray(reference.affine, np.float64), other.path, other.squeezed,
                           other.allow_large, reference.xform_code)
