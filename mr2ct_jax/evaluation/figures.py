"""Evaluation figures (PNG): MR | sCT | CT | error panels, metric and MI box plots.

Importing this module selects matplotlib's file-only Agg backend; the figures never need a
display. Shared by `mr2ct_jax.evaluate` and `mr2ct_jax.segmentation.figures`.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
from matplotlib import pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from mr2ct_jax import atomic  # noqa: E402
from mr2ct_jax.evaluation import reports  # noqa: E402


def pick_slices(valid: np.ndarray, count: int = 3) -> list[int]:
  """Up to `count` slice indices spread over the slices that have valid pixels (25/50/75 %)."""
  has = np.flatnonzero(np.asarray(valid).reshape(valid.shape[0], -1).any(axis=1))
  if not has.size:
    has = np.arange(valid.shape[0])
  fractions = [0.5] if count == 1 else np.linspace(0.25, 0.75, count)
  return sorted({int(has[int(round(f * (has.size - 1)))]) for f in fractions})


def _show(slice_2d: np.ndarray) -> np.ndarray:
  # Stored slices are [X, Y] = (R->, A->); rot90 puts anterior up for display.
  return np.rot90(slice_2d)


def volume_panel(path: str, mr: np.ndarray, sct_hu: np.ndarray, ct_hu: np.ndarray,
                 valid: np.ndarray, *, title: str, mr_window: Sequence[float],
                 ct_window: Sequence[float], error_max_hu: float = 500.0,
                 num_slices: int = 3) -> None:
  """PNG with rows of slices and columns MR | sCT | real CT | |sCT - CT| (HU, fixed scale).

  The error is computed after clipping both CTs to `ct_window`, i.e. the error the paper's
  0-255 metrics see, in HU: the generator's output only spans that window, so outside it
  (air, dense bone) the unclipped difference would show the window, not the synthesis.

  Args:
    path: output .png.
    mr, sct_hu, ct_hu: `[N, H, W]` volumes (MR units, HU, HU).
    valid: bool `[N, H, W]`, the evaluated region; the error outside it is shown white
      (like the paper's Fig. 3, where the CT has no corresponding region).
    title: figure title (patient id and metrics).
    mr_window, ct_window: display ranges of MR and of both CTs.
    error_max_hu: top of the error colour scale (same for every volume, so panels compare).
    num_slices: rows (slices spread over the valid slices).
  """
  rows = pick_slices(valid, num_slices)
  fig, axes = plt.subplots(len(rows), 4, figsize=(12.5, 3.0 * len(rows) + 0.6), squeeze=False,
                           layout='constrained')
  err_cmap = matplotlib.colormaps['inferno'].with_extremes(bad='white')
  err_img = None
  # Errors count over the whole range the sCT can take (a 4-knot window reaches bone); a
  # 4-knot window is shown from its soft-tissue low to its bone end, so bone is not white.
  err_range = (float(ct_window[0]), float(ct_window[-1]))
  ct_window = ct_window if len(ct_window) == 2 else (ct_window[1], ct_window[-1])
  for r, k in enumerate(rows):
    err = np.abs(np.clip(sct_hu[k], *err_range) - np.clip(ct_hu[k], *err_range))
    err = np.ma.masked_where(~valid[k], err)
    panels = [(mr[k], 'MR', 'gray', mr_window), (sct_hu[k], 'synthetic CT', 'gray', ct_window),
              (ct_hu[k], 'real CT (registered)', 'gray', ct_window),
              (err, '|sCT - CT| (HU, in CT window)', err_cmap, (0.0, error_max_hu))]
    for c, (img, name, cmap, window) in enumerate(panels):
      ax = axes[r, c]
      im = ax.imshow(_show(img), cmap=cmap, vmin=window[0], vmax=window[1],
                     interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=11)
      if c == 0:
        ax.set_ylabel(f'slice {k}', fontsize=10)
      if c == 3:
        err_img = im
  fig.colorbar(err_img, ax=axes[:, 3].tolist(), shrink=0.9,
               label=f'absolute error (HU), CT clipped to [{err_range[0]:g}, {err_range[1]:g}]')
  fig.suptitle(title, fontsize=11)
  save_figure(fig, path)


def metric_boxplots(path: str, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                    title: str = 'Per-volume metrics') -> None:
  """One PNG, one box plot (with the volumes as points) per metric; inf/NaN left out."""
  metrics = [m for m in metrics if rows and m in rows[0]]
  ncols = min(3, max(1, len(metrics)))
  nrows = max(1, math.ceil(len(metrics) / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False,
                           layout='constrained')
  for i, m in enumerate(metrics):
    ax = axes[i // ncols, i % ncols]
    values = np.array([float(r[m]) for r in rows])
    box_with_points(ax, [values], [''])
    info = reports.metric_info(m)
    left_out = int((~np.isfinite(values)).sum())
    ax.set_title(info.label + (f'\n({left_out} non-finite left out)' if left_out else ''),
                 fontsize=10)
    ax.set_ylabel(info.unit or 'value')
  for j in range(len(metrics), nrows * ncols):
    axes[j // ncols, j % ncols].axis('off')
  fig.suptitle(f'{title} (n = {len(rows)} volumes)', fontsize=11)
  save_figure(fig, path)


def mi_boxplot(path: str, rows: Sequence[Mapping[str, Any]],
               title: str = 'Mutual information, mean over slices') -> None:
  """Box plot of per-volume MI in both directions (the paper's Fig. 4a)."""
  fig, ax = plt.subplots(figsize=(5.5, 4.2), layout='constrained')
  series = [np.array([float(r[m]) for r in rows]) for m in reports.MI_METRICS]
  box_with_points(ax, series, [reports.metric_info(m).label for m in reports.MI_METRICS])
  ax.set_ylabel('MI (nats)')
  ax.set_title(f'{title} (n = {len(rows)} volumes)', fontsize=10)
  save_figure(fig, path)


def named_boxplot(path: str, series: Mapping[str, Sequence[float]], *, ylabel: str,
                  title: str) -> None:
  """Box plot (with the values as points) of each named series, n per box in its label."""
  fig, ax = plt.subplots(figsize=(1.6 + 1.9 * max(1, len(series)), 4.2), layout='constrained')
  values = [np.asarray(v, np.float64) for v in series.values()]
  box_with_points(ax, values, [f'{name}\n(n = {len(v)})' for name, v in zip(series, values)])
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  save_figure(fig, path)


def box_with_points(ax: Any, series: Sequence[np.ndarray], labels: Sequence[str]) -> None:
  """Box plots of the finite values of each series, the values as jittered points on top."""
  finite = [s[np.isfinite(s)] for s in series]
  positions = np.arange(1, len(series) + 1)
  ax.boxplot([f if f.size else [np.nan] for f in finite], positions=positions, widths=0.5,
             showmeans=True)
  rng = np.random.default_rng(0)  # fixed jitter: figures are reproducible
  for pos, f in zip(positions, finite):
    ax.scatter(pos + rng.uniform(-0.08, 0.08, f.size), f, s=14, alpha=0.7, zorder=3)
  ax.set_xticks(positions, labels)
  ax.grid(axis='y', alpha=0.3)


def save_figure(fig: Any, path: str) -> None:
  """Writes the figure as PNG through `atomic.writing` (complete or absent); closes it."""
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.writing(path, 'wb') as f:
      fig.savefig(f, format='png', dpi=100)
  finally:
    plt.close(fig)
