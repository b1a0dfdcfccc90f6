"""The numbers behind each verdict: paired t-test, mean difference with its 95% CI, Cohen's d_z.

`compare` pairs two cells' per-volume values by patient id and returns every number the
report prints; `verdict` words the result by a fixed rule, so no verdict is written by hand.
"""

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05


def compare(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
  """Paired comparison of B against A over the patients both have with finite values.

  Args:
    a, b: patient id -> value.

  Returns:
    {'n', 'mean_a', 'mean_b', 'diff' (mean of B - A), 'ci_low', 'ci_high' (95% CI of the mean
    difference from the t distribution with n - 1 degrees of freedom), 'd_z' (mean difference /
    SD of the differences), 't', 'p' (two-sided, scipy.stats.ttest_rel(B, A)), 'patients'}.
    With fewer than 2 pairs, or differences that are all equal, the statistics that need a
    spread are NaN.
  """
  ids = sorted(p for p in set(a) & set(b)
               if math.isfinite(float(a[p])) and math.isfinite(float(b[p])))
  va = np.array([float(a[p]) for p in ids], np.float64)
  vb = np.array([float(b[p]) for p in ids], np.float64)
  n = len(ids)
  nan = float('nan')
  out = {'n': n, 'patients': ids, 'mean_a': float(va.mean()) if n else nan,
         'mean_b': float(vb.mean()) if n else nan, 'diff': nan, 'ci_low': nan, 'ci_high': nan,
         'd_z': nan, 't': nan, 'p': nan}
  if not n:
    return out
  d = vb - va
  out['diff'] = float(d.mean())
  if n < 2:
    return out
  sd = float(d.std(ddof=1))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # zero-variance differences -> nan
    res = stats.ttest_rel(vb, va)
  out['t'], out['p'] = float(res.statistic), float(res.pvalue)
  if sd > 0:
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    out['ci_low'], out['ci_high'] = out['diff'] - half, out['diff'] + half
    out['d_z'] = out['diff'] / sd
  return out


def verdict(result: Mapping[str, Any], higher_is_better: bool, *, helped: str = 'helped',
            hurt: str = 'hurt') -> str:
  """The rule-made wording of a comparison (B against A).

  'not testable (n = N)' with fewer than 2 pairs, 'not testable (no spread)' when every
  difference is equal (or all values are); '<helped> (p<0.05)' /
  '<hurt> (p<0.05)' (p<0.01 when it is) when the paired t-test is significant, by the sign of
  the mean difference and the metric's direction; otherwise 'no significant difference'.
  """
  p = result['p']
  if result['n'] < 2:
    return f'not testable (n = {result["n"]})'
  if not math.isfinite(p):
    return 'not testable (no spread)'
  if p >= ALPHA:
    return 'no significant difference'
  better = (result['diff'] > 0) == higher_is_better
  level = '0.01' if p < 0.01 else '0.05'
  return f'{helped if better else hurt} (p<{level})'


def summary_counts(verdicts: Sequence[str]) -> dict[str, int]:
  """How many comparisons of a question came out each way ('helped', 'hurt', ...)."""
  counts: dict[str, int] = {}
  for v in verdicts:
    key = v.split(' (')[0]
    counts[key] = counts.get(key, 0) + 1
  return counts
