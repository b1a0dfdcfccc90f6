"""Image-similarity metrics for synthetic CT/MR (pure NumPy + scipy.ndimage).

Every function takes arrays of the same shape (2-D slices or 3-D volumes `[N, H, W]` stacked by
slice, axis 0 = slice) and an optional boolean `mask` (region the metric is computed in; None =
every pixel). Results are Python floats, computed in float64.

Conventions (the paper, Hiasa et al. 2018, section 3.1, and the SynthRAD2023 task-1 challenge):
- "0-255 scale": both CT volumes windowed with the config's CT window to [0, 255]
  (`mr2ct_jax.data.intensity.ct_to_unit`, clipped) before `mae` / `psnr` / `ssim`.
- PSNR = 20 log10(data_range / sqrt(MSE)); identical images give +inf (not capped: callers
  report it as `inf` and leave it out of means, see `mr2ct_jax.evaluation.reports`).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma),
  K1 = 0.01, K2 = 0.03, population (not sample) statistics; computed per 2-D slice; borders are
  handled by reflection so the SSIM map has the image's shape and can be averaged inside a mask.
- Mutual information in nats (natural log) from a joint histogram (64 bins per image).
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# SynthRAD2023 task 1: HU range both volumes are clipped to before PSNR / SSIM.
SYNTHRAD_HU_RANGE = (-1024.0, 3000.0)

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> the 11x11 window of Wang et al.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MI_BINS = 64


def _pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Validates shapes and returns float64 copies (and a bool mask)."""
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f'metrics: shape mismatch {a.shape} vs {b.shape}')
  if mask is not None:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != a.shape:
      raise ValueError(f'metrics: mask shape {mask.shape} does not match images {a.shape}')
  return a, b, mask


def _select(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  return x.ravel() if mask is None else x[mask]


def mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean absolute error mean(|a - b|) over `mask` (all pixels if None); NaN if mask is empty."""
  a, b, mask = _pair(a, b, mask)
  diff = _select(np.abs(a - b), mask)
  return float(diff.mean()) if diff.size else float('nan')


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean squared error mean((a - b)^2) over `mask`; NaN if mask is empty."""
  a, b, mask = _pair(a, b, mask)
  diff = _select((a - b) ** 2, mask)
  return float(diff.mean()) if diff.size else float('nan')


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
         data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB: 20 log10(data_range / sqrt(MSE)) over `mask`.

  The paper's definition with data_range = 255 on the 0-255 scale. Identical images (MSE = 0)
  give +inf; an empty mask gives NaN.
  """
  err = mse(a, b, mask)
  if np.isnan(err):
    return float('nan')
  if err == 0.0:
    return float('inf')
  return float(20.0 * np.log10(data_range / np.sqrt(err)))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float, *, sigma: float = SSIM_SIGMA,
             k1: float = SSIM_K1, k2: float = SSIM_K2) -> np.ndarray:
  """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, slice by slice.

  SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
  C1 = (k1 L)^2, C2 = (k2 L)^2, L = data_range; local means/(co)variances are Gaussian-weighted
  (sigma, truncated at 3.5 sigma: 11x11 for sigma 1.5), borders reflected.

  Args:
    a, b: 2-D `[H, W]` or 3-D `[N, H, W]` arrays; a 3-D input is filtered in-plane only
      (each slice independently, axis 0 = slice), i.e. 2-D SSIM per slice.
    data_range: L, the dynamic range of the images (255 on the 0-255 scale).

  Returns:
    float64 array of a's shape; exactly 1 where a == b.
  """
  a, b, _ = _pair(a, b, None)
  if a.ndim not in (2, 3):
    raise ValueError(f'metrics.ssim_map: expected 2-D or 3-D arrays, got shape {a.shape}')
  sigmas = (sigma, sigma) if a.ndim == 2 else (0.0, sigma, sigma)  # 0: no filtering over slices

  def blur(x: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigmas, mode='reflect', truncate=SSIM_TRUNCATE)

  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return num / den


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
         data_range: float = 255.0) -> float:
  """Mean SSIM: the `ssim_map` averaged over `mask` (all pixels if None).

  For a 3-D volume this is the mean over slices of each slice's masked mean SSIM (slices with
  an empty mask are skipped), the usual "2-D SSIM averaged over slices". NaN if nothing is
  inside the mask.
  """
  a, b, mask = _pair(a, b, mask)
  smap = ssim_map(a, b, data_range)
  if a.ndim == 2:
    values = _select(smap, mask)
    return float(values.mean()) if values.size else float('nan')
  finite = [v for v in masked_slice_means(smap, mask) if not np.isnan(v)]
  return float(np.mean(finite)) if finite else float('nan')


def masked_slice_means(values: np.ndarray, mask: np.ndarray | None) -> list[float]:
  """Per-slice mean of a `[N, H, W]` map inside `mask` (NaN for slices with an empty mask)."""
  out = []
  for k in range(values.shape[0]):
    sel = _select(values[k], None if mask is None else mask[k])
    out.append(float(sel.mean()) if sel.size else float('nan'))
  return out


def entropy(a: np.ndarray, mask: np.ndarray | None = None, bins: int = MI_BINS,
            value_range: Sequence[float] | None = None) -> float:
  """Shannon entropy in nats of the `bins`-bin histogram of `a` inside `mask`.

  Uses the same binning as `mutual_information`, so MI(a, a) == entropy(a).
  """
  a, _, mask = _pair(a, a, mask)
  values = _select(a, mask)
  if not values.size:
    return float('nan')
  hist, _ = np.histogram(values, bins=bins, range=_range(values, value_range))
  p = hist[hist > 0] / values.size
  return float(-(p * np.log(p)).sum())


def _range(values: np.ndarray, value_range: Sequence[float] | None) -> tuple[float, float]:
  if value_range is not None:
    return float(value_range[0]), float(value_range[1])
  lo, hi = float(values.min()), float(values.max())
  return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)  # constant image: one occupied bin


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
                       bins: int = MI_BINS, range_a: Sequence[float] | None = None,
                       range_b: Sequence[float] | None = None) -> float:
  """Mutual information I(A; B) in nats from the joint histogram of the pixels inside `mask`.

  MI = sum_ij p_ij log(p_ij / (p_i p_j)), with `bins` x `bins` equal-width bins over `range_a`
  and `range_b` (default: each image's own min..max inside the mask). MI(a, a) equals
  `entropy(a)`; MI with independent noise tends to 0 (a small positive bias from finite
  samples). Modality-independent, so it compares MR with CT (the paper's Fig. 4).
  """
  a, b, mask = _pair(a, b, mask)
  va, vb = _select(a, mask), _select(b, mask)
  if not va.size:
    return float('nan')
  joint, _, _ = np.histogram2d(va, vb, bins=bins,
                               range=(_range(va, range_a), _range(vb, range_b)))
  pxy = joint / va.size
  px = pxy.sum(axis=1, keepdims=True)
  py = pxy.sum(axis=0, keepdims=True)
  nz = pxy > 0
  return float((pxy[nz] * np.log(pxy[nz] / (px @ py)[nz])).sum())


def mean_slice_mutual_information(a: np.ndarray, b: np.ndarray,
                                  mask: np.ndarray | None = None, **kwargs) -> float:
  """`mutual_information` of each slice of `[N, H, W]` volumes, averaged over slices.

  The paper's Fig. 4 ("the mean of each slice of MI"); slices with an empty mask are skipped.
  kwargs go to `mutual_information`.
  """
  values = slice_mutual_information(a, b, mask, **kwargs)
  finite = [v for v in values if not np.isnan(v)]
  return float(np.mean(finite)) if finite else float('nan')


def slice_mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None,
                             **kwargs) -> list[float]:
  """Per-slice `mutual_information` of `[N, H, W]` volumes (NaN for slices with empty mask)."""
  a, b, mask = _pair(a, b, mask)
  return [mutual_information(a[k], b[k], None if mask is None else mask[k], **kwargs)
          for k in range(a.shape[0])]


def _synthrad_prepare(ct: np.ndarray, sct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  lo, hi = SYNTHRAD_HU_RANGE
  return np.clip(np.asarray(ct, np.float64), lo, hi), np.clip(np.asarray(sct, np.float64), lo, hi)


def synthrad_mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """Mean |CT - sCT| in HU inside the mask, without clipping (as SynthRAD2023's MAE).

  These `synthrad_*` functions serve the network-grid metrics of the paired evaluation
  (mae_hu, psnr_hu_grid, ssim_hu_grid); the challenge's exact computation on the CT's own
  grid is `mr2ct_jax.evaluation.synthrad`.
  """
  return mae(ct, sct, mask)


def synthrad_psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """SynthRAD2023 PSNR: both clipped to [-1024, 3000] HU, MSE inside the mask, range 4024."""
  ct, sct = _synthrad_prepare(ct, sct)
  return psnr(ct, sct, mask, data_range=SYNTHRAD_HU_RANGE[1] - SYNTHRAD_HU_RANGE[0])


def synthrad_ssim_map(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """SSIM map with SynthRAD2023's preprocessing (see `synthrad_ssim`)."""
  ct, sct = _synthrad_prepare(ct, sct)
  mask = np.asarray(mask).astype(bool)
  lo, hi = SYNTHRAD_HU_RANGE
  ct = np.where(mask, ct, lo) - lo   # outside the mask -> -1024, then shift to >= 0 as the
  sct = np.where(mask, sct, lo) - lo  # challenge does (SSIM's luminance term is not shift-free)
  return ssim_map(ct, sct, data_range=hi - lo)


def synthrad_ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
  """SynthRAD2023-style SSIM: clip both to [-1024, 3000] HU, set voxels outside the mask to
  -1024, shift by +1024, SSIM with data range 4024, the map averaged over all voxels inside
  the mask (voxel-weighted, as the challenge does; NaN for an empty mask).

  Difference from the challenge's script: the window is this module's 2-D Gaussian one
  (per slice) instead of scikit-image's default 7x7x7 uniform 3-D window (which needs >= 7
  slices) and there is no 3-voxel crop, so values are close to, not identical with, the
  challenge's (`mr2ct_jax.evaluation.synthrad` computes those).
  """
  smap = synthrad_ssim_map(ct, sct, mask)
  values = smap[np.asarray(mask).astype(bool)]
  return float(values.mean()) if values.size else float('nan')
