"""Body masks: threshold, keep the body's connected components, fill holes per slice.

CT uses a fixed HU threshold (air is about -1000 HU, fat about -100). MR has no absolute
unit, so its threshold is Otsu's, kept between 5% and 20% of the 99th percentile: Otsu
alone may split fat from muscle when the body fills the field of view, and a fixed fraction
alone may fall into the noise floor of a dim scan.

Which components are body: in CT only the largest, because the couch and cushions lie above
the threshold but apart from the patient. MR shows no couch, and an arm beside the trunk or
one thigh apart from the other below the pelvis is anatomy to translate, so an MR's mask
(`pieces`, the default for MR) keeps every component of at least MR_MIN_COMPONENT_FRACTION
of the largest (fiducials and noise specks are far smaller; a ghost or wrap-around artefact
that large would be kept too). `prepare` keeps the largest piece of an MR as well
(`pieces=False`): its masks score the paired test subjects, whose CT may not cover an arm,
and datasets prepared by earlier versions stay comparable.
"""

import numpy as np
from scipy import ndimage
import SimpleITK as sitk

CT_BODY_THRESHOLD_HU = -500.0
MR_FRACTION_RANGE = (0.05, 0.2)
# An adult arm is ~5-10% of the trunk's volume; a skin marker well under 0.1%.
MR_MIN_COMPONENT_FRACTION = 0.03


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold (maximum between-class variance) of `values`, by SimpleITK."""
  values = np.asarray(values, np.float32).reshape(1, -1)
  if values.min() == values.max():
    return float(values.min())
  otsu = sitk.OtsuThresholdImageFilter()
  otsu.SetNumberOfHistogramBins(bins)
  otsu.Execute(sitk.GetImageFromArray(values))
  return float(otsu.GetThreshold())


def mr_threshold(array: np.ndarray) -> float:
  """The MR foreground threshold: Otsu clipped to MR_FRACTION_RANGE x the 99th percentile."""
  array = np.asarray(array)
  p99 = float(np.percentile(array, 99))
  return float(np.clip(otsu_threshold(array), MR_FRACTION_RANGE[0] * p99,
                       MR_FRACTION_RANGE[1] * p99))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(face-connected component label per voxel, voxel count per label; label 0, the
  background, counts 0)."""
  labels, _ = ndimage.label(mask)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest face-connected component of a boolean mask (all False if empty)."""
  labels, sizes = _components(mask)
  if not sizes.any():
    return np.zeros(mask.shape, bool)
  return labels == int(np.argmax(sizes))


def components_of_at_least(mask: np.ndarray, fraction: float) -> np.ndarray:
  """The face-connected components of `mask` of at least `fraction` x the largest's size."""
  labels, sizes = _components(mask)
  if not sizes.any():
    return np.zeros(mask.shape, bool)
  keep = sizes >= fraction * sizes.max()
  keep[0] = False
  return keep[labels]


def fill_holes_per_slice(mask: np.ndarray, slice_axis: int = 2) -> np.ndarray:
  """Fills holes in every 2-D slice along `slice_axis` (a 2-D mask is one slice)."""
  mask = np.asarray(mask, bool)
  if mask.ndim == 2:
    return ndimage.binary_fill_holes(mask)
  moved = np.moveaxis(mask, slice_axis, 0)
  filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
  return np.moveaxis(filled, 0, slice_axis)


def body_mask(array: np.ndarray, threshold: float | None = None, modality: str = 'ct',
              slice_axis: int = 2, pieces: bool | None = None) -> np.ndarray:
  """Body mask of a CT (HU) or MR volume or slice (CT: the largest component; MR: by default
  every component of at least MR_MIN_COMPONENT_FRACTION of it).

  Args:
    array: 3-D volume (slices along `slice_axis`; canonical volumes: axis 2) or a 2-D slice.
    threshold: foreground threshold; None: -500 HU for CT, `mr_threshold` for MR.
    modality: 'ct' or 'mr'.
    slice_axis: axis of the slices whose holes are filled (0 for [N, H, W] slice stacks).
    pieces: keep every component of at least MR_MIN_COMPONENT_FRACTION of the largest (True)
      or only the largest (False); None: True for MR, False for CT.

  Returns:
    bool array of the input's shape; all False if nothing exceeds the threshold.
  """
  array = np.asarray(array)
  if array.ndim not in (2, 3):
    raise ValueError(f'body_mask expects a 2-D or 3-D array, got shape {array.shape}')
  if threshold is None:
    if modality == 'ct':
      threshold = CT_BODY_THRESHOLD_HU
    elif modality == 'mr':
      threshold = mr_threshold(array)
    else:
      raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
  if pieces is None:
    pieces = modality == 'mr'
  if pieces:
    mask = components_of_at_least(array > threshold, MR_MIN_COMPONENT_FRACTION)
  else:
    mask = largest_component(array > threshold)
  return fill_holes_per_slice(mask, slice_axis)
