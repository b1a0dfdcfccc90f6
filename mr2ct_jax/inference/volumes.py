"""One whole volume through a generator: MR -> synthetic CT in HU, or CT -> synthetic MR.

Per volume: N4 (MR, when the run's dataset was prepared with it), slices of the run's plane
(config.data.plane, taken in patient space: any stored orientation) on the network grid at
config.data.spacing_mm, the body mask, the intensity mapping to [-1, 1], the generator in
fixed-size batches (`slices.translate_slices`), the inverse mapping (HU or MR units), air
outside the body, then back to the input's own voxel grid: the result has the input's shape.
The network grid is sized per volume to the whole resampled field of view (rounded up to a
multiple of 4), so nothing of the user's image is cropped away.
"""

import os
import time

import ml_collections
import numpy as np

from mr2ct_jax.data import intensity
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.inference import slices as slices_lib

ApplyFn = slices_lib.ApplyFn
# Value outside the body: air for a synthetic CT, background for a synthetic MR.
AIR_HU = -1024.0
MR_BACKGROUND = 0.0
# The generator downsamples twice (stride 2), so slice sides must be multiples of 4; a side
# of 16 leaves the 4x4 bottleneck that the residual blocks' reflection padding needs.
GRID_MULTIPLE = 4
MIN_GRID = 16


def grid_size(vol: volume_lib.Volume, spacing_mm: float, plane: str = 'axial') -> int:
  """Network slice side covering the whole in-plane FOV at `spacing_mm`, a multiple of 4.

  The in-plane axes are the plane's canonical (RAS+) axes (`preprocess.PLANE_AXES`); their
  extent after resampling is (n - 1) * voxel / spacing_mm + 1 pixels (the grid starts on
  voxel 0 and covers the last).
  """
  voxel, shape = preprocess.plane_voxels(vol.affine, vol.array.shape, plane)
  extent = max(int(np.ceil((shape[a] - 1) * voxel[a] / spacing_mm - 1e-6)) + 1
               for a in range(2))
  return max(MIN_GRID, -(-extent // GRID_MULTIPLE) * GRID_MULTIPLE)


def network_work(vol: volume_lib.Volume, spacing_mm: float,
                 plane: str = 'axial') -> tuple[int, int]:
  """(slices, side) of the network grid `translate_volume` will run `vol` on."""
  _, shape = preprocess.plane_voxels(vol.affine, vol.array.shape, plane)
  return int(shape[2]), grid_size(vol, spacing_mm, plane)


class TimeEstimate:
  """Seconds a generator needs for a volume, from one timed batch on this machine.

  The first call runs the generator on a blank batch twice at that volume's grid (the first
  call compiles it, which the translation would do anyway) and times the second; other grid
  sizes scale with their pixel count.
  """

  def __init__(self, apply_fn: ApplyFn, batch_size: int):
    self._apply_fn, self._batch_size = apply_fn, int(batch_size)
    self._seconds_per_pixel: float | None = None

  def seconds(self, num_slices: int, side: int) -> float:
    """Estimated generator time for `num_slices` slices of side x side."""
    batch = max(1, min(self._batch_size, num_slices))
    if self._seconds_per_pixel is None:
      blank = np.full((batch, side, side, 1), -1.0, np.float32)
      self._apply_fn(blank)
      start = time.perf_counter()
      self._apply_fn(blank)
      self._seconds_per_pixel = (time.perf_counter() - start) / (batch * side * side)
    batches = -(-num_slices // batch)
    return batches * batch * side * side * self._seconds_per_pixel


def translate_volume(vol: volume_lib.Volume, apply_fn: ApplyFn,
                     config: ml_collections.ConfigDict, direction: str = 'mr2ct',
                     batch_size: int | None = None, progress: bool = False) -> np.ndarray:
  """Translates one volume; returns the result on the input's voxel grid.

  Args:
    vol: the input (MR for 'mr2ct', CT in HU for 'ct2mr'), any orientation and spacing.
    apply_fn: generator, NHWC [-1, 1] -> [-1, 1] (from `generators.load_generator`).
    config: the training run's config (data.spacing_mm, plane, windows, mr_percentile, n4:
      the preprocessing of its dataset, recorded when the run started).
    direction: 'mr2ct' or 'ct2mr'.
    batch_size: slices per generator call (default config.eval.batch_size).
    progress: show a progress bar over slices.

  Returns:
    float32 array of `vol.array.shape`: HU for 'mr2ct' (AIR_HU outside the body), MR-normalised
    units for 'ct2mr' (0 outside the body).

  Raises:
    volume_lib.VolumeError: the input is unusable (empty body, a CT not in HU...).
  """
  data = config.data
  batch_size = int(batch_size or config.eval.batch_size)
  if direction in ('mr2ct', 'ct2mr'):
    intensity.check_not_constant(vol.array, vol.path, direction[:2].upper())
  if direction == 'mr2ct':
    intensity.check_mr_is_not_hu(vol.array, vol.path)
    if data.n4:
      vol = preprocess.n4_correct(vol)
    modality = 'mr'
  elif direction == 'ct2mr':
    intensity.check_ct_is_hu(vol.array, vol.path)
    modality = 'ct'
  else:
    raise ValueError(f'direction={direction!r}: must be mr2ct or ct2mr')

  plane = data.plane
  size = grid_size(vol, data.spacing_mm, plane)
  slices, geom = preprocess.to_network_grid(vol, data.spacing_mm, size, plane=plane)
  if max(geom.resampled_shape) > size:  # defensive: never crop the user's FOV
    size = -(-max(geom.resampled_shape) // GRID_MULTIPLE) * GRID_MULTIPLE
    slices, geom = preprocess.to_network_grid(vol, data.spacing_mm, size, plane=plane)
  body = mask_lib.body_mask(slices, modality=modality, slice_axis=0)
  if not body.any():
    raise volume_lib.VolumeError(f'{vol.path}: empty body mask; is this a {modality.upper()}?')

  if direction == 'mr2ct':
    mr = intensity.normalise_mr(slices, body, data.mr_percentile, path=vol.path)
    model_in = intensity.mr_to_model(mr, data.mr_window)
  else:
    model_in = intensity.ct_hu_to_model(slices, data.ct_window)
  model_out = slices_lib.translate_slices(apply_fn, model_in, batch_size, progress=progress,
                                          desc=os.path.basename(vol.path) or 'slices')

  out_fill = AIR_HU if direction == 'mr2ct' else MR_BACKGROUND
  if direction == 'mr2ct':
    result = intensity.model_to_ct_hu(model_out, data.ct_window)
  else:
    result = intensity.model_to_mr(model_out, data.mr_window)
  # Mask on the network grid first so interpolation back to the input grid blends tissue
  # with air at the body edge (not with whatever the generator made of the background), then
  # mask on the input grid so every voxel outside the body is exactly the fill value.
  result = np.where(body, result, np.float32(out_fill))
  result = preprocess.from_network_grid(result, geom, fill=out_fill)
  body_in = preprocess.from_network_grid(body.astype(np.float32), geom, fill=0.0) >= 0.5
  return np.where(body_in, result, np.float32(out_fill)).astype(np.float32)
