"""Dice overlap of label maps (pure NumPy), the paper's segmentation metric."""

from collections.abc import Mapping, Sequence

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
  """Dice coefficient 2 |P & T| / (|P| + |T|) of one label value.

  P = (pred == label), T = (truth == label), over all voxels of the two equally shaped arrays.

  Args:
    pred: predicted label map (any integer dtype/shape).
    truth: ground-truth label map of the same shape.
    label: the structure's label value.

  Returns:
    Dice in [0, 1]. If the structure is absent from both maps the overlap is undefined and NaN
    is returned (not 1): a volume without the structure says nothing about how well it is
    segmented, and NaN is left out of the mean ± sd (`reports.describe` counts it). A
    structure present in only one of the maps gives 0.

  Raises:
    ValueError: the shapes differ.
  """
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f'dice: prediction shape {pred.shape} != truth shape {truth.shape}')
  p, t = pred == label, truth == label
  total = int(p.sum()) + int(t.sum())
  if total == 0:
    return float('nan')
  return 2.0 * int(np.logical_and(p, t).sum()) / total


def dice_per_label(pred: np.ndarray, truth: np.ndarray,
                   labels: Mapping[int, str] | Sequence[int]) -> dict:
  """{name (or label value): Dice} for each label, see `dice`."""
  names = labels if isinstance(labels, Mapping) else {int(k): int(k) for k in labels}
  return {name: dice(pred, truth, int(label)) for label, name in names.items()}


def dice_in_truth(pred: np.ndarray, truth: np.ndarray,
                  labels: Mapping[int, str]) -> dict:
  """{name: Dice} over the structures the ground truth contains; NaN for the others.

  The score a report uses: a ground truth drawn for only some structures (the paper's MR had
  4 of the U-Net's 22) says nothing about the others, so a structure absent from `truth` has
  no Dice (NaN, left out of means and t-tests) even where the prediction holds it. A structure
  in `truth` that the prediction misses scores 0.
  """
  truth = np.asarray(truth)
  present = set(int(v) for v in np.unique(truth))
  return {name: dice(pred, truth, int(label)) if int(label) in present else float('nan')
          for label, name in labels.items()}
