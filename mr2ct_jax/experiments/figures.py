"""The study's PNG figures, laid out as the paper's (JAX-free): Table 1 metrics, MI (Fig. 4),
Dice per structure (Fig. 6) as box plots per cell, and representative slices (Fig. 5)."""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Imported first: it selects matplotlib's file-only Agg backend.
from mr2ct_jax.evaluation import figures as report_figures
from matplotlib import pyplot as plt  # pylint: disable=g-bad-import-order

from mr2ct_jax.data import intensity
from mr2ct_jax.experiments import analysis
from mr2ct_jax.experiments import layout

_CT_WINDOW = intensity.PAPER_CT_WINDOW


def _panel_grid(path: str, panels: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]],
                ylabel: str, title: str, ylim: tuple[float, float] | None = None) -> None:
  """One subplot per (title, {series: {patient: value}}), a box per series."""
  cols = min(len(panels), 3)
  rows = (len(panels) + cols - 1) // cols
  width = max(3.0, 0.6 * max(len(s) for _, s in panels) + 1.2)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False,
                           layout='constrained')
  for i, (name, series) in enumerate(panels):
    ax = axes[i // cols, i % cols]
    values = [np.array(list(v.values()), np.float64) for v in series.values()]
    report_figures.box_with_points(ax, values, [s.replace('_', '\n') for s in series])
    ax.set_title(name, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis='x', labelsize=7)
    if ylim:
      ax.set_ylim(*ylim)
  for j in range(len(panels), rows * cols):
    axes[j // cols, j % cols].axis('off')
  fig.suptitle(title, fontsize=11)
  report_figures.save_figure(fig, path)


def table1_boxplots(path: str, results: Mapping[str, Any]) -> bool:
  """MAE / PSNR (0-255) and MAE (HU) per paired test subject, a box per cell."""
  cells = results['paired']
  if not cells:
    return False
  metrics = [m for m in ('mae_255', 'psnr_255', 'mae_hu') if any(m in c for c in cells.values())]
  panels = [(analysis.metric_label('paired', m), {c: v[m] for c, v in cells.items() if m in v})
            for m in metrics]
  _panel_grid(path, panels, 'value', 'Paired test subjects (Table 1)')
  return True


def mi_boxplots(path: str, results: Mapping[str, Any]) -> bool:
  """MI of the unpaired test volumes, one panel per direction, a box per cell (Fig. 4a)."""
  panels = []
  for direction in ('ct', 'mr'):
    series = {c: v[direction] for c, v in results['mi'].items() if v.get(direction)}
    if series:
      panels.append((analysis.metric_label('mi', direction), series))
  if not panels:
    return False
  _panel_grid(path, panels, 'MI (nats)', 'Unpaired test volumes (Fig. 4)')
  return True


def dice_boxplots(path: str, results: Mapping[str, Any]) -> bool:
  """Dice per structure, a box per cell (Fig. 6); real CT / sCT boxes are the paired subjects."""
  panels = []
  for structure in list(results['structures']) + ['mean']:
    series = {c: v[structure] for c, v in results['dice'].items() if v.get(structure)}
    if series:
      panels.append((f'Dice {structure.replace("_", " ")}', series))
  if not panels:
    return False
  _panel_grid(path, panels, 'Dice', 'Segmentation of MR (Fig. 6)', ylim=(-0.02, 1.02))
  return True


def _load(path: str) -> dict[str, np.ndarray]:
  """A finished cell's samples.npz (StudyError naming the cell if it cannot be read)."""
  with layout.finished_outputs(os.path.dirname(path)), np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def slices_figure(path: str, samples: Mapping[str, str], size: str,
                  max_patients: int = 3) -> bool:
  """MR | sCT without GC | sCT with GC (| signed GC) | real CT per paired test patient (Fig. 5).

  Needs the size's GC and no-GC cells; returns False (no figure) when one has not finished.
  """
  columns = [(f'nogc_{size}', 'sCT without GC'), (f'gc_{size}', 'sCT with GC')]
  if f'gc_signed_{size}' in samples:
    columns.append((f'gc_signed_{size}', 'sCT with signed GC'))
  if not all(c in samples for c, _ in columns[:2]):
    return False
  data = {c: _load(samples[c]) for c, _ in columns}
  first = data[columns[0][0]]
  count = min(max_patients, len(first['patient_id']))
  ncols = len(columns) + 2
  fig, axes = plt.subplots(count, ncols, figsize=(2.3 * ncols, 2.4 * count), squeeze=False,
                           layout='constrained')
  mr_window = tuple(float(v) for v in first['mr_window'])
  for i in range(count):
    shown = [('MR', first['mr'][i], mr_window)]
    shown += [(title, data[c]['sct_hu'][i], _CT_WINDOW) for c, title in columns]
    shown.append(('real CT', first['ct_hu'][i], _CT_WINDOW))
    for j, (title, image, window) in enumerate(shown):
      ax = axes[i, j]
      ax.imshow(np.asarray(image), cmap='gray', vmin=window[0], vmax=window[1])
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=9)
      if j == 0:
        ax.set_ylabel(f'{first["patient_id"][i]} (slice {int(first["slice_index"][i])})',
                      fontsize=8)
  fig.suptitle(f'Representative slices, {size} training set (CT window '
               f'{_CT_WINDOW[0]:g} to {_CT_WINDOW[1]:g} HU)', fontsize=10)
  report_figures.save_figure(fig, path)
  return True


def write_all(figure_dir: str, results: Mapping[str, Any]) -> dict[str, str]:
  """Writes every figure the finished cells allow; returns {figure key: file name}."""
  written = {}
  for key, fn in (('table1', table1_boxplots), ('mi', mi_boxplots), ('dice', dice_boxplots)):
    name = f'{key}_boxplot.png'
    if fn(os.path.join(figure_dir, name), results):
      written[key] = name
  for size in ('small', 'large'):
    name = f'slices_{size}.png'
    if slices_figure(os.path.join(figure_dir, name), results['samples'], size):
      written[f'slices_{size}'] = name
  return written
