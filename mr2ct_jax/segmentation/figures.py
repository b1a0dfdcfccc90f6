"""Figures of the segmentation evaluation: Dice box plot and MR contour overlays (PNG)."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mr2ct_jax.evaluation import figures as report_figures  # also selects matplotlib's file-only Agg backend
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,g-bad-import-order

_COLORS = ('#e41a1c', '#377eb8', '#4daf4a', '#ff7f00', '#984ea3', '#a65628', '#f781bf')


def dice_boxplot(path: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                 names: Sequence[str], title: str) -> None:
  """One box per structure (volumes as points) of per-volume Dice; NaN left out."""
  fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2.5, 4.2), layout='constrained')
  series = [np.array([float(r[k]) for r in rows], np.float64) for k in keys]
  report_figures.box_with_points(ax, series, [n.replace('_', ' ') for n in names])
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel('Dice')
  ax.set_title(f'{title} (n = {len(rows)} volumes)', fontsize=10)
  report_figures.save_figure(fig, path)


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
  rows = report_figures.pick_slices(truth > 0, num_slices)
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
  report_figures.save_figure(fig, path)

