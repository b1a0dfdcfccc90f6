"""SynthRAD2023 task-1 image metrics (MAE, PSNR, SSIM) exactly as the challenge computes them.

Follows the challenge's published evaluation code, SynthRAD2023/metrics
`functions/image_metrics.py` (`ImageMetrics.score_patient`, commit fe7e385 "non-negative and
masked SSIM fix", the newest version of that file), step by step:

- Inputs: the CT (ground truth), the sCT and the mask, each cast to float32 (the challenge's
  `SimpleITK.CastImageFilter` to sitkFloat32); the mask is binarised as `mask > 0`.
- MAE = sum(|CT * mask - sCT * mask|) / sum(mask) in HU, on the values as given (the
  challenge does NOT clip for MAE).
- PSNR: both clipped to [-1024, 3000] HU, the voxels with mask == 1 selected, then
  `skimage.metrics.peak_signal_noise_ratio(ct, sct, data_range=4024)`, i.e.
  10 log10(4024^2 / MSE) with the MSE over the mask; identical images give +inf.
- SSIM: both clipped to [-1024, 3000] HU, voxels outside the mask set to -1024, both shifted
  by +1024 (values in [0, 4024]: SSIM's luminance term is not shift-invariant), then
  `skimage.metrics.structural_similarity(ct, sct, data_range=4024, full=True)` on the whole
  3-D volume with scikit-image's defaults (7x7x7 uniform window, K1 0.01, K2 0.03, sample
  covariance); the SSIM map and the mask are both cropped by pad = 3 voxels on every side
  (`skimage.util.crop`, as skimage crops for its own mean) and the map averaged over the
  cropped mask in float64.

The challenge's `score_patient` passes the SimpleITK mask image (not its array) to `ssim`; the
intent, and what this module does, is the mask's voxels. The challenge reads arrays with
SimpleITK ([z, y, x]); this module takes arrays in any axis order: the window and the crop are
the same along every axis, so the result does not depend on it (up to float rounding).
"""

import warnings

import numpy as np
from skimage import metrics as skmetrics
from skimage import util as skutil

HU_RANGE = (-1024.0, 3000.0)     # the challenge's fixed "dynamic range"
DATA_RANGE = HU_RANGE[1] - HU_RANGE[0]  # 4024
SSIM_CROP = 3                    # the challenge's `pad`: (7 - 1) // 2
SSIM_WIN_SIZE = 7                # scikit-image's default window (every axis must be >= 7)
METRIC_KEYS = ('synthrad_mae', 'synthrad_psnr', 'synthrad_ssim')


def _prepare(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float32 CT and sCT and the float64 0/1 mask of the challenge; checks shapes."""
  ct, sct = np.asarray(ct, np.float32), np.asarray(sct, np.float32)
  mask = np.asarray(mask, np.float32)
  if ct.shape != sct.shape or mask.shape != ct.shape:
    raise ValueError(f'synthrad: shapes differ: CT {ct.shape}, sCT {sct.shape}, mask '
                     f'{mask.shape}')
  return ct, sct, np.where(mask > 0, 1., 0.)


def mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """The challenge's MAE in HU inside the mask (no clipping); NaN for an empty mask."""
  ct, sct, mask = _prepare(ct, sct, mask)
  if not mask.any():
    return float('nan')
  return float(np.sum(np.abs(ct * mask - sct * mask)) / mask.sum())


def _clip(x: np.ndarray) -> np.ndarray:
  return np.clip(x, HU_RANGE[0], HU_RANGE[1])


def psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """The challenge's PSNR (dB): clipped to [-1024, 3000], MSE over the mask, range 4024."""
  ct, sct, mask = _prepare(ct, sct, mask)
  if not mask.any():
    return float('nan')
  keep = mask == 1
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # MSE 0 -> inf, as the challenge gets
    value = skmetrics.peak_signal_noise_ratio(_clip(ct)[keep], _clip(sct)[keep],
                                              data_range=DATA_RANGE)
  return float(value)


def ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """The challenge's masked 3-D SSIM (see the module docstring).

  Returns:
    The SSIM map's mean over the mask after the 3-voxel crop; NaN if no mask voxel lies
    inside the crop.

  Raises:
    ValueError: an axis shorter than the 7-voxel window.
  """
  ct, sct, mask = _prepare(ct, sct, mask)
  if ct.ndim != 3 or min(ct.shape) < SSIM_WIN_SIZE:
    raise ValueError(f'synthrad SSIM needs a 3-D volume of at least {SSIM_WIN_SIZE} voxels '
                     f'along every axis (its window), got shape {ct.shape}')
  lo = HU_RANGE[0]
  ct = np.where(mask == 0, lo, _clip(ct)) - lo
  sct = np.where(mask == 0, lo, _clip(sct)) - lo
  _, ssim_map = skmetrics.structural_similarity(ct, sct, data_range=DATA_RANGE, full=True)
  inside = skutil.crop(mask, SSIM_CROP).astype(bool)
  if not inside.any():
    return float('nan')
  return float(skutil.crop(ssim_map, SSIM_CROP)[inside].mean(dtype=np.float64))


def synthrad_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """{'synthrad_mae', 'synthrad_psnr', 'synthrad_ssim'} of one patient (challenge's way).

  Args:
    ct: the real CT in HU, 3-D, in its own geometry.
    sct: the synthetic CT in HU on the CT's voxel grid.
    mask: the evaluation mask on the same grid (voxels > 0 are inside).
  """
  return {'synthrad_mae': mae(ct, sct, mask), 'synthrad_psnr': psnr(ct, sct, mask),
          'synthrad_ssim': ssim(ct, sct, mask)}
