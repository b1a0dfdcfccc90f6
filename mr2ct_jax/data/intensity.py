"""Intensity mappings between stored units, the [0, 255] "unit" range and the model range.

Datasets store CT in Hounsfield units and MR in "MR-normalised units" (a body percentile =
100); the windows below are applied in the input pipeline so they can change without
re-preparing. Chain: HU/MR --window--> [0, 255] --> [-1, 1] (model). Every function is pure
numpy, returns float32 and is exact at the window edges (low -> 0 -> -1, high -> 255 -> 1).
The inverse functions do not clip, so out-of-range network outputs stay visible.
"""

from typing import Sequence

import numpy as np

from mr2ct_jax.data import volume as volume_lib

Window = Sequence[float]
PAPER_CT_WINDOW = (-150.0, 350.0)
PAPER_MR_WINDOW = (0.0, 100.0)


# A 4-knot window (a, b, c, d) maps [a, b] -> [0, 32], [b, c] -> [32, 223], [c, d] -> [223, 255]:
# the soft-tissue window [b, c] keeps 3/4 of the range while air (down to a) and bone (up to d)
# stay representable, e.g. (-1024, -150, 350, 2000) for an sCT that shows bone in HU.
_KNOT_LEVELS = {2: (0.0, 255.0), 4: (0.0, 32.0, 223.0, 255.0)}


def _window(window: Window) -> tuple[np.float32, np.float32]:
  low, high = float(window[0]), float(window[1])
  if not low < high:
    raise ValueError(f'window must be (low, high) with low < high, got {tuple(window)}')
  return np.float32(low), np.float32(high)


def _knots(window: Window) -> tuple[np.ndarray, np.ndarray]:
  """(values, levels) of a 4-knot window, checked."""
  values = np.asarray([float(w) for w in window], np.float64)
  if len(values) not in _KNOT_LEVELS or not np.all(np.diff(values) > 0):
    raise ValueError(f'window must be (low, high) or 4 increasing knots, got {tuple(window)}')
  return values, np.asarray(_KNOT_LEVELS[len(values)])


def check_window(window: Window) -> None:
  """Raises ValueError unless `window` is (low, high) or 4 increasing knots."""
  _knots(window)


def window_to_unit(x: np.ndarray, window: Window) -> np.ndarray:
  """Clips `x` to `window` and maps it to [0, 255]: linearly for (low, high), piecewise
  linearly through the knot levels for a 4-knot window."""
  if len(window) != 2:
    values, levels = _knots(window)
    return np.interp(np.asarray(x, np.float64), values, levels).astype(np.float32)
  low, high = _window(window)
  x = np.clip(np.asarray(x, np.float32), low, high)
  # Divide first: (high - low) / (high - low) == 1 exactly, so `high` maps to exactly 255.
  return ((x - low) / (high - low) * np.float32(255.0)).astype(np.float32)


def unit_to_window(x: np.ndarray, window: Window) -> np.ndarray:
  """Inverse of `window_to_unit` inside the window: [0, 255] -> [low, high] (no clipping:
  beyond the ends the first/last segment's slope continues)."""
  if len(window) != 2:
    values, levels = _knots(window)
    x = np.asarray(x, np.float64)
    out = np.interp(x, levels, values)
    below, above = x < levels[0], x > levels[-1]
    slope_lo = (values[1] - values[0]) / (levels[1] - levels[0])
    slope_hi = (values[-1] - values[-2]) / (levels[-1] - levels[-2])
    out = np.where(below, values[0] + (x - levels[0]) * slope_lo, out)
    out = np.where(above, values[-1] + (x - levels[-1]) * slope_hi, out)
    return out.astype(np.float32)
  low, high = _window(window)
  return (np.asarray(x, np.float32) / np.float32(255.0) * (high - low) + low).astype(np.float32)


def ct_to_unit(hu: np.ndarray, window: Window = PAPER_CT_WINDOW) -> np.ndarray:
  """CT in HU -> [0, 255], clipped to the window (paper: [-150, 350] HU)."""
  return window_to_unit(hu, window)


def unit_to_ct(x: np.ndarray, window: Window = PAPER_CT_WINDOW) -> np.ndarray:
  """[0, 255] -> HU within the CT window."""
  return unit_to_window(x, window)


def mr_to_unit(mr: np.ndarray, window: Window = PAPER_MR_WINDOW) -> np.ndarray:
  """MR-normalised units -> [0, 255], clipped to the window (paper: [0, 100])."""
  return window_to_unit(mr, window)


def unit_to_mr(x: np.ndarray, window: Window = PAPER_MR_WINDOW) -> np.ndarray:
  """[0, 255] -> MR-normalised units within the MR window."""
  return unit_to_window(x, window)


def unit_to_model(x: np.ndarray) -> np.ndarray:
  """[0, 255] -> model range [-1, 1]: x / 127.5 - 1."""
  return (np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def model_to_unit(y: np.ndarray) -> np.ndarray:
  """Model range [-1, 1] -> [0, 255]: (y + 1) * 127.5."""
  return ((np.asarray(y, np.float32) + np.float32(1.0)) * np.float32(127.5)).astype(np.float32)


def ct_hu_to_model(hu: np.ndarray, window: Window = PAPER_CT_WINDOW) -> np.ndarray:
  """CT in HU -> model range (window, then [-1, 1])."""
  return unit_to_model(ct_to_unit(hu, window))


def model_to_ct_hu(y: np.ndarray, window: Window = PAPER_CT_WINDOW) -> np.ndarray:
  """Model output -> HU (the inverse of `ct_hu_to_model` inside the window)."""
  return unit_to_ct(model_to_unit(y), window)


def mr_to_model(mr: np.ndarray, window: Window = PAPER_MR_WINDOW) -> np.ndarray:
  """MR-normalised units -> model range."""
  return unit_to_model(mr_to_unit(mr, window))


def model_to_mr(y: np.ndarray, window: Window = PAPER_MR_WINDOW) -> np.ndarray:
  """Model output -> MR-normalised units."""
  return unit_to_mr(model_to_unit(y), window)


def normalise_mr(array: np.ndarray, mask: np.ndarray | None, percentile: float = 99.5,
                 target: float = 100.0, path: str = '') -> np.ndarray:
  """Scales MR so the `percentile` percentile of the body voxels becomes `target` (100).

  MR has no absolute unit; a robust high percentile of the body is a stable anchor that
  ignores a few hot voxels (vessels, artefacts).

  Args:
    array: MR voxels (any shape).
    mask: body mask of the same shape; None uses the voxels > 0.
    percentile: in (0, 100], e.g. config.data.mr_percentile.
    target: value the percentile maps to.
    path: named in error messages.

  Returns:
    float32 array in MR-normalised units.
  """
  array = np.asarray(array, np.float32)
  if not 0 < percentile <= 100:
    raise ValueError(f'percentile must be in (0, 100], got {percentile}')
  check_not_constant(array, path, 'MR')
  if mask is None:
    mask = array > 0
  mask = np.asarray(mask, bool)
  if mask.shape != array.shape:
    raise volume_lib.VolumeError(f'{path}: mask shape {mask.shape} != MR shape {array.shape}')
  values = array[mask]
  if values.size == 0:
    raise volume_lib.VolumeError(f'{path}: empty body mask, cannot normalise the MR')
  anchor = float(np.percentile(values, percentile))
  if not anchor > 0:
    raise volume_lib.VolumeError(f'{path}: the {percentile} percentile of the body is '
                                 f'{anchor:.4g}; expected a positive MR intensity')
  return (array * np.float32(target / anchor)).astype(np.float32)


def check_not_constant(array: np.ndarray, path: str, modality: str) -> None:
  """Raises VolumeError when every voxel has one value (an all-zero export, a blank volume).

  Its threshold mask would be all body or none: nothing to anchor or to translate.
  """
  if array.size and float(np.min(array)) == float(np.max(array)):
    raise volume_lib.VolumeError(f'{path}: every voxel is {float(array.flat[0]):g}; a '
                                 f'constant volume holds no {modality} image')


def check_ct_is_hu(array: np.ndarray, path: str) -> None:
  """Raises VolumeError if a CT is obviously not in Hounsfield units.

  A CT of the body has air around or inside it (about -1000 HU), so its minimum is far
  below -500; an 8-bit export ([0, 255]) or raw stored values without the rescale intercept
  (minimum >= 0) are rejected.
  """
  array = np.asarray(array)
  low, high = float(np.min(array)), float(np.max(array))
  if low >= 0 and high <= 255:
    raise volume_lib.VolumeError(
        f'{path}: does not look like Hounsfield units (values in [{low:.4g}, {high:.4g}], '
        'an 8-bit image?); export the CT in HU')
  if low > -500:
    raise volume_lib.VolumeError(
        f'{path}: does not look like Hounsfield units (minimum {low:.4g} > -500, no air '
        'around the body; missing rescale intercept?)')
  # Padding outside the scan circle may be -2048, -3024 or -32768, so no lower bound.
  if high > 1e5:
    raise volume_lib.VolumeError(
        f'{path}: does not look like Hounsfield units (maximum {high:.4g} > 100000)')


# A CT's air: at least this share of the voxels in [-1200, -500] HU, with the spread of
# values that noise gives (more than _AIR_MIN_DISTINCT distinct values).
_AIR_HU = (-1200.0, -500.0)
_AIR_MIN_FRACTION = 0.05
_AIR_MIN_DISTINCT = 20


def check_mr_is_not_hu(array: np.ndarray, path: str) -> None:
  """Raises VolumeError if an "MR" is obviously a CT in Hounsfield units.

  Translated as an MR, a CT would give a plausible-looking but meaningless sCT. What gives a
  CT away is its air: a sizeable share of the voxels near -1000 HU with noise's spread of
  values. A legitimate MR is not refused for a few strongly negative voxels (ringing from
  Lanczos or B-spline resampling) or for a constant padding value (-1024 or -32768 after
  registration to a CT grid).
  """
  flat = np.asarray(array).ravel()
  air = flat[(flat >= _AIR_HU[0]) & (flat <= _AIR_HU[1])]
  if air.size < _AIR_MIN_FRACTION * flat.size:
    return
  if np.unique(air[::max(1, air.size // 100_000)]).size <= _AIR_MIN_DISTINCT:
    return  # a padding value, not air
  raise volume_lib.VolumeError(
      f'{path}: looks like a CT in Hounsfield units, not an MR ({air.size / flat.size:.0%} of '
      'its voxels lie in [-1200, -500], as air in HU); a CT translates the other way '
      '(--direction=ct2mr)')
