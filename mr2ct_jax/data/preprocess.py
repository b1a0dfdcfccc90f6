"""From a volume to network slices and back: reorient, resample in-plane, crop/pad, N4.

`to_network_grid` reorients to RAS+ (pure permutation), takes the slices of a plane in
patient space (`PLANE_AXES`: axial slices along S, coronal along A, sagittal along R, whatever
the stored voxel order), resamples the two in-plane axes to `spacing_mm` with linear
interpolation, and centre-crops/pads them to `size`; the slice axis is never resampled. The
resampled grid starts on voxel 0 and the crop/pad offset is an integer, so when the spacing
already equals `spacing_mm` and the volume fits, the slices hold the original voxels exactly.
`SliceGeometry` keeps everything `from_network_grid` needs to put network slices back into
the original voxel grid (shape and voxel order), so an sCT written with the input's affine
has the input's geometry.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
import SimpleITK as sitk

from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.data import volume_checks

# Slice plane -> canonical (RAS+) axes (in-plane axis 0, in-plane axis 1, slice axis). In-plane
# axis 0 is the patient's right->left axis for axial and coronal slices (the pipeline's LR
# flip reverses it); sagittal slices have no left-right axis.
PLANE_AXES = {'axial': (0, 1, 2), 'coronal': (0, 2, 1), 'sagittal': (1, 2, 0)}
PLANES = tuple(PLANE_AXES)


def check_plane(plane: str) -> tuple[int, int, int]:
  """The canonical axes of `plane` (ValueError naming the planes if it is not one)."""
  if plane not in PLANE_AXES:
    raise ValueError(f'plane={plane!r}: must be one of {PLANES}')
  return PLANE_AXES[plane]


def has_left_right_axis(plane: str) -> bool:
  """Whether in-plane axis 0 of the plane's slices is the patient's right->left axis."""
  return check_plane(plane)[0] == 0


def plane_order(array_ras: np.ndarray, plane: str) -> np.ndarray:
  """A canonical array with its axes in the plane's order (in-plane 0, in-plane 1, slice)."""
  return np.transpose(array_ras, check_plane(plane))


def canonical_order(array_plane: np.ndarray, plane: str) -> np.ndarray:
  """Inverse of `plane_order`."""
  return np.transpose(array_plane, np.argsort(check_plane(plane)))


@dataclasses.dataclass
class SliceGeometry:
  """How network slices [N, size, size] relate to the original volume.

  Network pixel p (per in-plane axis a) samples canonical voxel coordinate
  `(p + offset[a]) * zoom[a]` along canonical axis `PLANE_AXES[plane][a]`; slice n is
  canonical index n along the plane's slice axis (`PLANE_AXES[plane][2]`).

  Attributes:
    shape: the original volume's shape (stored voxel order).
    affine: the original volume's affine [4, 4].
    ornt: nibabel orientation transform stored order -> RAS+ [3, 2].
    canonical_shape: shape after reorientation (RAS+ axis order).
    zoom: canonical voxels per network pixel along the two in-plane axes (= spacing_mm /
      voxel size).
    resampled_shape: in-plane size of the resampled (uncropped) grid.
    offset: start of the size x size window in the resampled grid (negative: padding).
    spacing_mm: network pixel size.
    size: network slice size.
    pad_value: value of padded pixels.
    plane: 'axial', 'coronal' or 'sagittal' (`PLANE_AXES`).
  """
  shape: tuple[int, int, int]
  affine: np.ndarray
  ornt: np.ndarray
  canonical_shape: tuple[int, int, int]
  zoom: tuple[float, float]
  resampled_shape: tuple[int, int]
  offset: tuple[int, int]
  spacing_mm: float
  size: int
  pad_value: float
  plane: str = 'axial'  # geometry written before planes existed: axial

  @property
  def axes(self) -> tuple[int, int, int]:
    """Canonical axes (in-plane 0, in-plane 1, slice) of the plane."""
    return check_plane(self.plane)

  @property
  def plane_shape(self) -> tuple[int, int, int]:
    """The canonical shape in the plane's axis order (in-plane 0, in-plane 1, slice)."""
    return tuple(int(self.canonical_shape[a]) for a in self.axes)

  @property
  def num_slices(self) -> int:
    return int(self.canonical_shape[self.axes[2]])

  @property
  def canonical_affine(self) -> np.ndarray:
    """Affine of the canonical (RAS+) array."""
    return orientation.to_canonical((np.zeros(self.shape, np.uint8), self.affine))[1]

  def network_affine(self) -> np.ndarray:
    """Affine of the network grid as a volume [size, size, N] (slices stacked on axis 2)."""
    permute = np.zeros((4, 4))
    for plane_axis, canonical_axis in enumerate(self.axes):
      permute[canonical_axis, plane_axis] = 1.0
    permute[3, 3] = 1.0
    scale = np.diag([self.zoom[0], self.zoom[1], 1.0, 1.0])
    scale[:2, 3] = np.asarray(self.offset) * np.asarray(self.zoom)
    return self.canonical_affine @ permute @ scale

  def valid_mask(self) -> np.ndarray:
    """bool [N, size, size]: True where a network pixel lies inside the original volume."""
    inside = [(np.arange(self.size) + o >= 0) & (np.arange(self.size) + o < n)
              for o, n in zip(self.offset, self.resampled_shape)]
    plane = inside[0][:, None] & inside[1][None, :]
    return np.broadcast_to(plane, (self.num_slices, self.size, self.size)).copy()

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable dict (lists and Python numbers)."""
    d = dataclasses.asdict(self)
    d['affine'] = np.asarray(self.affine, float).tolist()
    d['ornt'] = np.asarray(self.ornt, float).tolist()
    for k in ('shape', 'canonical_shape', 'resampled_shape', 'offset'):
      d[k] = [int(v) for v in d[k]]
    d['zoom'] = [float(v) for v in self.zoom]
    d['spacing_mm'], d['size'] = float(self.spacing_mm), int(self.size)
    d['pad_value'] = float(self.pad_value)
    d['plane'] = str(self.plane)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'SliceGeometry':
    """Inverse of `to_dict`."""
    return cls(shape=tuple(int(v) for v in d['shape']),
               affine=np.asarray(d['affine'], np.float64),
               ornt=np.asarray(d['ornt'], np.float64),
               canonical_shape=tuple(int(v) for v in d['canonical_shape']),
               zoom=tuple(float(v) for v in d['zoom']),
               resampled_shape=tuple(int(v) for v in d['resampled_shape']),
               offset=tuple(int(v) for v in d['offset']),
               spacing_mm=float(d['spacing_mm']), size=int(d['size']),
               pad_value=float(d['pad_value']), plane=str(d.get('plane', 'axial')))


def plane_voxels(affine: np.ndarray, shape: tuple[int, ...],
                 plane: str = 'axial') -> tuple[np.ndarray, tuple[int, int, int]]:
  """(voxel sizes [3] along the plane's axes (in-plane 0, in-plane 1, slice), that shape)."""
  axes = check_plane(plane)
  array_ras, affine_ras, _ = orientation.to_canonical(
      (np.empty(tuple(shape)[:3], np.uint8), affine))
  voxel = np.linalg.norm(affine_ras[:3, :3], axis=0)
  return voxel[list(axes)], tuple(int(array_ras.shape[a]) for a in axes)


def _geometry(vol: volume_lib.Volume, spacing_mm: float, size: int, pad_value: float,
              plane: str) -> tuple[np.ndarray, SliceGeometry]:
  if not spacing_mm > 0 or size < 1:
    raise ValueError(f'spacing_mm must be > 0 and size >= 1, got {spacing_mm}, {size}')
  axes = check_plane(plane)
  # read_volume checks this already; in-memory volumes must not reach a huge resampled grid.
  volume_checks.check_field_of_view(vol.path, vol.array.shape, vol.affine, vol.allow_large)
  array_ras, affine_ras, ornt = orientation.to_canonical(vol)
  voxel = np.linalg.norm(affine_ras[:3, :3], axis=0)
  zoom = tuple(float(spacing_mm / voxel[axes[a]]) for a in range(2))
  if all(abs(z - 1.0) < 1e-6 for z in zoom):
    zoom = (1.0, 1.0)  # identical spacing up to header rounding: keep voxels exact
  # Enough resampled pixels to cover the last input voxel (edge-extended), so every input
  # voxel maps back inside the resampled grid.
  resampled = tuple(int(np.ceil((array_ras.shape[axes[a]] - 1) / zoom[a] - 1e-6)) + 1
                    for a in range(2))
  offset = tuple((n - size) // 2 for n in resampled)
  geom = SliceGeometry(
      shape=tuple(int(v) for v in vol.array.shape), affine=np.asarray(vol.affine, np.float64),
      ornt=ornt, canonical_shape=tuple(int(v) for v in array_ras.shape), zoom=zoom,
      resampled_shape=resampled, offset=offset, spacing_mm=float(spacing_mm), size=int(size),
      pad_value=float(pad_value), plane=plane)
  return array_ras, geom


def to_network_grid(vol: volume_lib.Volume, spacing_mm: float, size: int,
                    pad_value: float | None = None,
                    plane: str = 'axial') -> tuple[np.ndarray, SliceGeometry]:
  """Canonical slices of `plane` resampled to `spacing_mm` and centre-cropped/padded to `size`.

  Args:
    vol: the volume (any stored orientation).
    spacing_mm: in-plane pixel size of the network grid.
    size: slices are size x size.
    pad_value: value outside the volume; None: the volume's minimum.
    plane: 'axial' (slices along S), 'coronal' (along A) or 'sagittal' (along R).

  Returns:
    (slices float32 [N, size, size] with N = the canonical length along the plane's slice
    axis, geometry).
  """
  if pad_value is None:
    pad_value = float(np.min(vol.array))
  array_ras, geom = _geometry(vol, spacing_mm, size, pad_value, plane)
  zx, zy = geom.zoom
  ox, oy = geom.offset
  # Input coordinate = zoom * (p + offset): a diagonal affine, in one interpolation pass.
  # 'nearest' extends edges for the last (sub-voxel) resampled pixel; padding comes after.
  out = ndimage.affine_transform(
      plane_order(array_ras, plane).astype(np.float32), np.array([zx, zy, 1.0]),
      offset=np.array([zx * ox, zy * oy, 0.0]), output_shape=(size, size, geom.num_slices),
      order=1, mode='nearest')
  out[~geom.valid_mask()[0]] = pad_value
  return np.ascontiguousarray(np.transpose(out, (2, 0, 1)), dtype=np.float32), geom


def from_network_grid(slices: np.ndarray, geom: SliceGeometry, fill: float = 0.0) -> np.ndarray:
  """Maps network slices back to the original volume's shape and voxel order.

  Args:
    slices: [N, size, size] (e.g. synthetic CT in HU), N = geom.num_slices.
    geom: from `to_network_grid` on the original volume.
    fill: value for original voxels outside the cropped network window.

  Returns:
    float32 array of shape `geom.shape`, aligned with `geom.affine`.
  """
  slices = np.asarray(slices, np.float32)
  expected = (geom.num_slices, geom.size, geom.size)
  if slices.shape != expected:
    raise ValueError(f'slices have shape {slices.shape}, geometry expects {expected}')
  zx, zy = geom.zoom
  ox, oy = geom.offset
  # Network coordinate p = i / zoom - offset; outside [0, size - 1] -> fill.
  canonical = ndimage.affine_transform(
      np.transpose(slices, (1, 2, 0)), np.array([1.0 / zx, 1.0 / zy, 1.0]),
      offset=np.array([-ox, -oy, 0.0]), output_shape=geom.plane_shape, order=1,
      mode='constant', cval=float(fill))
  out = orientation.from_canonical(canonical_order(canonical, geom.plane), geom.ornt)
  assert out.shape == tuple(geom.shape), (out.shape, geom.shape)
  return out.astype(np.float32)


def n4_correct(vol: volume_lib.Volume, shrink_factor: int = 4,
               iterations: Sequence[int] = (50, 50, 30),
               mask: np.ndarray | None = None) -> volume_lib.Volume:
  """N4 bias-field correction of an MR volume (SimpleITK).

  The bias is fitted on a shrunk copy (fast) and its log field evaluated at full
  resolution, then divided out of the original voxels.

  Args:
    vol: MR volume (non-negative intensities).
    shrink_factor: fitting grid shrink per axis (limited so each axis keeps >= 4 voxels).
    iterations: maximum iterations per fitting level (its length = number of levels).
    mask: bool foreground mask of vol's shape; None: Otsu threshold of the volume.

  Returns:
    The corrected volume (same affine and path).
  """
  array = np.asarray(vol.array, np.float32)
  image = sitk.GetImageFromArray(np.transpose(np.maximum(array, 0), (2, 1, 0)))
  image.SetSpacing([float(s) for s in vol.spacing])
  if mask is None:
    mask_image = sitk.OtsuThreshold(image, 0, 1, 200)
  else:
    mask_image = sitk.GetImageFromArray(np.transpose(np.asarray(mask, np.uint8), (2, 1, 0)))
    mask_image.CopyInformation(image)
  mask_image = sitk.And(mask_image, sitk.Cast(image > 0, sitk.sitkUInt8))
  if not np.any(sitk.GetArrayViewFromImage(mask_image)):
    raise volume_lib.VolumeError(f'{vol.path}: N4 bias correction: empty foreground mask')
  factors = [int(max(1, min(shrink_factor, n // 4))) for n in image.GetSize()]
  corrector = sitk.N4BiasFieldCorrectionImageFilter()
  corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
  corrector.Execute(sitk.Shrink(image, factors), sitk.Shrink(mask_image, factors))
  log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
  corrected = array / np.exp(np.transpose(log_bias, (2, 1, 0)).astype(np.float32))
  return dataclasses.replace(vol, array=corrected.astype(np.float32))  # keeps file_shape
