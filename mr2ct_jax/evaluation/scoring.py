"""Scoring of paired test volumes: translate the slices, compute the metrics of one volume.

The metric definitions and evaluated regions are described in `mr2ct_jax.evaluate` (the
command, its outputs and the comparison of two evaluations); the formulas are in
`mr2ct_jax.evaluation.metrics`. Every function here works on in-memory arrays, no files but the
optional panel figure per volume.
"""

import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
import tqdm

from mr2ct_jax.data import intensity
from mr2ct_jax.data import preprocess
from mr2ct_jax.evaluation import figures as report_figures
from mr2ct_jax.evaluation import metrics
from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import slices as slices_lib

ApplyFn = slices_lib.ApplyFn

METRIC_KEYS = tuple(reports.METRICS)
MI_RANGE = (0.0, 255.0)  # fixed histogram range: MI values are comparable between models
ERROR_MAX_HU = 500.0     # top of the |error| colour scale in the panels
# The paper's windows (Hiasa et al. 2018; configs/gc.py 'paper'): the 0-255 MAE/PSNR, SSIM and
# MI always use them, whatever data.ct_window / mr_window a run was trained with, so every run
# reports the paper's metric (the run's windows only map the generator's range).
PAPER_CT_WINDOW = (-150.0, 350.0)
PAPER_MR_WINDOW = (0.0, 100.0)


class EvaluateError(ValueError):
  """Evaluation cannot run; the one-line message names the path or patient."""


def _patient_id(value: Any) -> str:
  """A record's patient id as text (TFDS gives bytes, possibly in a 0-d/1-element array)."""
  if isinstance(value, np.ndarray):
    value = value.reshape(-1)[0] if value.size else ''
  if isinstance(value, bytes):
    value = value.decode('utf-8')
  return str(value)


def fov_levels(mask: np.ndarray, plane: str = 'axial') -> np.ndarray:
  """bool [N, H, W]: the S levels (patient's S axis) at which `mask` has any voxel.

  `prepare` ANDs the test mask with the CT's field of view along S (`prepare_volumes.ct_fov`),
  so these levels are the common FOV: whole slices for axial stacks, rows of the slices'
  S axis for coronal and sagittal ones.
  """
  axes = preprocess.check_plane(plane)
  s_axis = (axes[2], axes[0], axes[1]).index(2)  # the S axis in the [N, H, W] stack
  others = tuple(a for a in range(3) if a != s_axis)
  return np.broadcast_to(mask.any(axis=others, keepdims=True), mask.shape)


def check_volume(volume: Mapping[str, Any], pid: str,
                  plane: str = 'axial') -> tuple[np.ndarray, ...]:
  """(MR, CT, mask, valid) of a paired (test or val) record, checked; EvaluateError names `pid`.

  `valid` is the record's 'fov' array when present; else the mask's S levels (`fov_levels`)
  AND, when the record has an 'inside' array (network pixels inside the original volume,
  `SliceGeometry.valid_mask`), those pixels: padding around the volume is never scored.
  """
  for key in ('image', 'paired', 'mask'):
    if key not in volume:
      raise EvaluateError(f'test patient {pid}: record has no {key!r} array')
  mr = np.asarray(volume['image'], np.float32)
  ct = np.asarray(volume['paired'], np.float32)
  mask = np.asarray(volume['mask']).astype(bool)
  if 'fov' in volume:
    valid = np.asarray(volume['fov']).astype(bool)
  else:
    if mask.ndim != 3:
      raise EvaluateError(f'test patient {pid}: expected [slices, H, W] arrays, got '
                          f'{mask.shape}')
    valid = fov_levels(mask, plane)
    if 'inside' in volume:
      inside = np.asarray(volume['inside']).astype(bool)
      if inside.shape != mask.shape:
        raise EvaluateError(f'test patient {pid}: its geometry gives {inside.shape} network '
                            f'pixels, the record has {mask.shape}')
      valid = valid & inside
  for key, array in (('paired', ct), ('mask', mask), ('fov', valid)):
    if array.shape != mr.shape:
      raise EvaluateError(f'test patient {pid}: {key!r} has shape {array.shape}, image has '
                          f'{mr.shape}')
  if mr.ndim != 3:
    raise EvaluateError(f'test patient {pid}: expected [slices, H, W] arrays, got {mr.shape}')
  if not np.any(ct):
    raise EvaluateError(f'test patient {pid}: the paired CT is all zeros (not a paired test '
                        'split?)')
  return mr, ct, mask, valid


def volume_metrics(mr: np.ndarray, ct_hu: np.ndarray, sct_hu: np.ndarray,
                   smr: np.ndarray | None, mask: np.ndarray,
                   valid: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]]]:
  """Metrics of one volume and of each of its slices.

  Args:
    mr: real MR `[N, H, W]` (MR-normalised units).
    ct_hu: registered real CT (HU).
    sct_hu: synthetic CT (HU).
    smr: synthetic MR from the real CT (MR units), or None (MI(CT, sMR) not computed).
    mask: body mask (AND common FOV).
    valid: region of the 0-255 metrics, SSIM and MI (on the paper's windows).

  Returns:
    (volume record, list of slice records), keys as `reports.METRICS`.
  """
  ct_window, mr_window = PAPER_CT_WINDOW, PAPER_MR_WINDOW
  ct_unit = intensity.ct_to_unit(ct_hu, ct_window)
  sct_unit = intensity.ct_to_unit(sct_hu, ct_window)
  mr_unit = intensity.mr_to_unit(mr, mr_window)
  ssim_map = metrics.ssim_map(ct_unit, sct_unit, data_range=255.0)
  synthrad_map = metrics.synthrad_ssim_map(ct_hu, sct_hu, mask)
  ssim_slices = metrics.masked_slice_means(ssim_map, valid)
  synthrad_slices = metrics.masked_slice_means(synthrad_map, mask)
  mi_kwargs = dict(range_a=MI_RANGE, range_b=MI_RANGE)
  mi_mr_sct = metrics.slice_mutual_information(mr_unit, sct_unit, valid, **mi_kwargs)
  if smr is not None:
    smr_unit = intensity.mr_to_unit(smr, mr_window)
    mi_ct_smr = metrics.slice_mutual_information(ct_unit, smr_unit, valid, **mi_kwargs)

  def finite_mean(values: list[float]) -> float:
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float('nan')

  vol = {
      'mae_255': metrics.mae(ct_unit, sct_unit, valid),
      'psnr_255': metrics.psnr(ct_unit, sct_unit, valid, data_range=255.0),
      'ssim': finite_mean(ssim_slices),
      'mae_hu': metrics.synthrad_mae(ct_hu, sct_hu, mask),
      'psnr_hu_grid': metrics.synthrad_psnr(ct_hu, sct_hu, mask),
      'ssim_hu_grid': (float(synthrad_map[mask].mean()) if mask.any() else float('nan')),
      'mi_mr_sct': finite_mean(mi_mr_sct),
  }
  if smr is not None:
    vol['mi_ct_smr'] = finite_mean(mi_ct_smr)
  slices = []
  for k in range(mr.shape[0]):
    row = {
        'slice_index': k,
        'valid_voxels': int(valid[k].sum()),
        'mask_voxels': int(mask[k].sum()),
        'mae_255': metrics.mae(ct_unit[k], sct_unit[k], valid[k]),
        'psnr_255': metrics.psnr(ct_unit[k], sct_unit[k], valid[k], data_range=255.0),
        'ssim': ssim_slices[k],
        'mae_hu': metrics.synthrad_mae(ct_hu[k], sct_hu[k], mask[k]),
        'psnr_hu_grid': metrics.synthrad_psnr(ct_hu[k], sct_hu[k], mask[k]),
        'ssim_hu_grid': synthrad_slices[k],
        'mi_mr_sct': mi_mr_sct[k],
    }
    if smr is not None:
      row['mi_ct_smr'] = mi_ct_smr[k]
    slices.append(row)
  return vol, slices


def _translate(mr: np.ndarray, ct: np.ndarray, sct_fn: ApplyFn, smr_fn: ApplyFn | None,
               mr_window, ct_window, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(sCT in HU, sMR in MR units or None) of one test volume."""
  sct = slices_lib.translate_slices(sct_fn, intensity.mr_to_model(mr, mr_window), batch_size)
  if smr_fn is None:
    return intensity.model_to_ct_hu(sct, ct_window), None
  smr = slices_lib.translate_slices(smr_fn, intensity.ct_hu_to_model(ct, ct_window), batch_size)
  return intensity.model_to_ct_hu(sct, ct_window), intensity.model_to_mr(smr, mr_window)


def evaluate_volumes(volumes: Iterable[Mapping[str, Any]], sct_fn: ApplyFn,
                     smr_fn: ApplyFn | None, config: ml_collections.ConfigDict, *,
                     figure_dir: str | None = None, progress: bool = False,
                     plane: str = 'axial') -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Translates and scores each test volume; optionally writes its panel figure.

  Args:
    volumes: records with 'patient_id' and `[N, H, W]` arrays 'image' (MR units), 'paired'
      (registered CT, HU), 'mask' (body & common FOV), optionally 'fov' (the evaluated
      region) or 'inside' (network pixels inside the original volume); see `check_volume`.
    sct_fn: G_ct, NHWC [-1, 1] -> [-1, 1]; smr_fn: G_mr, or None to skip MI(CT, sMR).
    config: the run's config (data windows, eval.batch_size).
    figure_dir: if set, writes `<figure_dir>/<patient_id>.png` per volume.
    progress: show a progress bar over volumes.
    plane: the slices' plane (the dataset's), for the S levels of the common FOV.

  Returns:
    (per-volume records, per-slice records), in the order of `volumes`.
  """
  ct_window, mr_window = config.data.ct_window, config.data.mr_window
  batch_size = int(config.eval.batch_size)
  per_volume, per_slice = [], []
  seen = set()
  for volume in tqdm.tqdm(volumes, desc='evaluate', unit='volume', disable=not progress):
    pid = _patient_id(volume.get('patient_id', f'volume{len(per_volume)}'))
    if pid in seen:
      raise EvaluateError(f'test patient {pid}: appears twice in the test split')
    seen.add(pid)
    mr, ct, mask, valid = check_volume(volume, pid, plane)
    try:
      sct_hu, smr = _translate(mr, ct, sct_fn, smr_fn, mr_window, ct_window, batch_size)
    except ValueError as e:  # the generator's output does not fit its input
      raise EvaluateError(f'test patient {pid}: {e}') from e
    vol, slices = volume_metrics(mr, ct, sct_hu, smr, mask, valid)
    per_volume.append({'patient_id': pid, 'num_slices': int(mr.shape[0]),
                       'region': 'fov' if 'fov' in volume else 'fov_levels',
                       'valid_voxels': int(valid.sum()), 'mask_voxels': int(mask.sum()), **vol})
    per_slice.extend({'patient_id': pid, **row} for row in slices)
    if figure_dir is not None:
      title = (f"{pid}: MAE {reports.fmt(vol['mae_255'])} (0-255), "
               f"PSNR {reports.fmt(vol['psnr_255'])} dB, MAE {reports.fmt(vol['mae_hu'], 1)} HU"
               f" in body")
      report_figures.volume_panel(os.path.join(figure_dir, f'{_safe_name(pid)}.png'), mr,
                                  sct_hu, ct, valid, title=title, mr_window=mr_window,
                                  ct_window=ct_window, error_max_hu=ERROR_MAX_HU)
  return per_volume, per_slice


def _safe_name(pid: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in pid) or 'volume'
