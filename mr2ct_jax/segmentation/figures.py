"""Figures of the segmentation evaluation: Dice box plot and label overlays (PNG, Fig. 7)."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Imported first: it selects matplotlib's file-only Agg backend.
from mr2ct_jax.evaluation import figures as report_figures
import matplotlib  # pylint: disable=g-bad-import-order
import matplotlib.patches  # noqa: F401  pylint: disable=unused-import
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,g-bad-import-order


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


def label_colors(values: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
  """A fixed RGBA colour per label value (tab20, then tab20b: 40 distinct colours, cycled)."""
  palette = (list(matplotlib.colormaps['tab20'].colors) +
             list(matplotlib.colormaps['tab20b'].colors))
  return {int(v): (*palette[(int(v) - 1) % len(palette)], 1.0) for v in values}


def _label_rgba(label: np.ndarray, colors: Mapping[int, Sequence[float]],
                alpha: float) -> np.ndarray:
  rgba = np.zeros(label.shape + (4,), np.float32)
  for value, color in colors.items():
    rgba[label == value] = (*color[:3], alpha)
  return rgba


def label_panels(path: str, images: Sequence[tuple[str, np.ndarray, Sequence[float]]],
                 pred: np.ndarray, truth: np.ndarray, names: Mapping[int, str], *, title: str,
                 num_slices: int = 2, alpha: float = 0.75) -> None:
  """The paper's Fig. 7 per subject: input images | predicted labels | ground truth.

  One row per slice (spread over the slices holding ground truth), one column per input image
  (e.g. MR and sCT), then the predicted and the true label maps in colour over the first
  image (greyed). Each label value has its colour (`label_colors`); the legend names every
  structure shown (`names`, else `label_<value>`).

  Args:
    path: output .png.
    images: (column title, [N, H, W] image, (display low, display high)) per input column.
    pred, truth: [N, H, W] label maps.
    names: label value -> structure name.
    title: figure title (patient and Dice).
    num_slices: rows.
    alpha: opacity of the label colours.
  """
  rows = report_figures.pick_slices(truth > 0, num_slices)
  shown = sorted({int(v) for v in np.unique(np.concatenate(
      [pred[rows].ravel(), truth[rows].ravel()])) if v})
  colors = label_colors(shown)
  columns = len(images) + 2
  fig, axes = plt.subplots(len(rows), columns, figsize=(2.8 * columns, 2.8 * len(rows) + 1.2),
                           squeeze=False, layout='constrained')
  base, base_window = images[0][1], images[0][2]
  for r, k in enumerate(rows):
    panels = [(t, img[k], w, None) for t, img, w in images]
    panels += [('predicted labels', base[k], base_window, pred[k]),
               ('ground truth', base[k], base_window, truth[k])]
    for c, (name, image, window, label) in enumerate(panels):
      ax = axes[r, c]
      # Stored slices are (R->, A->); rot90 shows anterior up, as the other report figures.
      ax.imshow(np.rot90(image), cmap='gray', vmin=window[0], vmax=window[1],
                interpolation='nearest', alpha=1.0 if label is None else 0.6)
      if label is not None:
        ax.imshow(np.rot90(_label_rgba(label, colors, alpha)), interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=10)
    axes[r, 0].set_ylabel(f'slice {k}', fontsize=9)
  handles = [matplotlib.patches.Patch(color=colors[v], label=names.get(v, f'label_{v}')
                                      .replace('_', ' ')) for v in shown]
  if handles:
    fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 6),
               fontsize=8)
  fig.suptitle(title, fontsize=10)
  report_figures.save_figure(fig, path)
