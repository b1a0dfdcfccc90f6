"""Figures of the segmentation evaluation: Dice box plot and MR contour overlays (PNG)."""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mr2ct_jax import reports  # also selects matplotlib's file-only Agg backend
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,g-bad-import-order

_COLORS = ('#e41a1c', '#377eb8', '#4daf4a', '#ff7f00', '#984ea3', '#a65628', '#f781bf')


def dice_boxplot(path: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                 names: Sequence[str], title: str) -> None:
  """One box per structure (volumes as points) of per-volume Dice; NaN left out."""
  fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2.5, 4.2), layout='constrained')
  series = [np.array([float(r[k]) for r in rows], np.float64) for k in keys]
  finite = [s[np.isfinite(s)] for s in series]
  positions = np.arange(1, len(keys) + 1)
  ax.boxplot([f if f.size else [np.nan] for f in finite], positions=positions, widths=0.5,
             showmeans=True)
  rng = np.random.default_rng(0)  # fixed jitter: reproducible figures
  for pos, f in zip(positions, finite):
    ax.scatter(pos + rng.uniform(-0.08, 0.08, f.size), f, s=14, alpha=0.7, zorder=3)
  ax.set_xticks(positions, [n.replace('_', ' ') for n in names])
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel('Dice')
  ax.grid(axis='y', alpha=0.3)
  ax.set_title(f'{title} (n = {len(rows)} volumes)', fontsize=10)
  _save(fig, path)


def overlay(path: str, mr: np.ndarray, pred: np.ndarray, truth: np.ndarray,
            names: Mapping[int, str], *, title: str, mr_window: Sequence[float],
            num_slices: int = 3) -> None:
  """MR slices with true (solid) and predicted (dashed) contours of each structure.

  Args:
    path: output .png.
    mr: [N, H, W] MR (MR units); pred, truth: [N, H, W] label maps.
    names: label value -> structure name (background excluded).
    title: figure title (patient and Dice).
    mr_window: display range of the MR.
    num_slices: rows, spread over the slices holding true labels.
  """
  rows = reports.pick_slices(truth > 0, num_slices)
  fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 4.2), squeeze=False,
                           layout='constrained')
  for c, k in enumerate(rows):
    ax = axes[0, c]
    # Stored slices are (R->, A->); rot90 shows anterior up, as the other report figures.
    ax.imshow(np.rot90(mr[k]), cmap='gray', vmin=mr_window[0], vmax=mr_window[1],
              interpolation='nearest')
    for i, (label, _) in enumerate(sorted(names.items())):
      color = _COLORS[i % len(_COLORS)]
      for mask, style in ((truth[k] == label, 'solid'), (pred[k] == label, 'dashed')):
        if mask.any():
          ax.contour(np.rot90(mask.astype(np.float32)), levels=[0.5], colors=[color],
                     linestyles=style, linewidths=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f'slice {k}', fontsize=10)
  handles = [plt.Line2D([], [], color=_COLORS[i % len(_COLORS)], label=name.replace('_', ' '))
             for i, (_, name) in enumerate(sorted(names.items()))]
  handles += [plt.Line2D([], [], color='k', linestyle='solid', label='truth'),
              plt.Line2D([], [], color='k', linestyle='dashed', label='prediction')]
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 6), fontsize=8)
  fig.suptitle(title, fontsize=10)
  _save(fig, path)


def _save(fig: Any, path: str) -> None:
  """Writes the figure to a temporary name, then renames it (atomic); closes the figure."""
  tmp = f'{path}.tmp-{os.getpid()}.png'
  try:
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
