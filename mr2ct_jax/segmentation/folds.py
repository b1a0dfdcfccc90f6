"""Folds of a cross-validation by patient (JAX-free)."""

from collections.abc import Sequence

import numpy as np

from mr2ct_jax.segmentation import labels


def fold_split(patients: Sequence[str], folds: int, seed: int,
               where: str = 'the labeled MR') -> list[list[str]]:
  """Deals the patients into `folds` folds: a seeded random order, patient i to fold i mod k.

  Every patient is in exactly one fold; fold sizes differ by at most one.

  Raises:
    SegDataError: fewer than 2 folds, or more folds than patients.
  """
  patients = sorted(str(p) for p in patients)
  if int(folds) < 2:
    raise labels.SegDataError(f'folds={folds}: the cross-validation needs at least 2 folds')
  if int(folds) > len(patients):
    raise labels.SegDataError(f'{where}: {folds} folds but only {len(patients)} labeled MR '
                              f'volume(s); use at most {len(patients)} folds (--folds or '
                              'config.seg.baseline_folds)')
  order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xF01D]).permutation(len(patients))
  return [sorted(patients[j] for j in order[i::int(folds)]) for i in range(int(folds))]
