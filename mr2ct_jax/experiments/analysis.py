"""The study's questions as paired comparisons of cells, each with a rule-made verdict.

Each question compares pairs of series (A, then B: B - A is the effect) on every metric both
have: Table 1's metrics on the paired test subjects, MI of the unpaired test volumes (both
directions), and Dice per structure on the labeled MR (or, for the real-CT question, on the
paired test subjects). `comparisons` returns one row per (question, pair, metric).
"""

from collections.abc import Mapping
from typing import Any

from mr2ct_jax.evaluation import reports
from mr2ct_jax.experiments import collect
from mr2ct_jax.experiments import stats

# (key, title, [(A, B), ...], helped, hurt): the words of the verdict when B is better / worse.
QUESTIONS = (
    ('more_data', 'More training data (large vs small set)',
     (('nogc_small', 'nogc_large'), ('gc_small', 'gc_large')), 'helped', 'hurt'),
    ('gc', 'GC loss (on vs off)',
     (('nogc_small', 'gc_small'), ('nogc_large', 'gc_large')), 'helped', 'hurt'),
    ('signed', 'Signed GC vs GC on gradient magnitudes (large set)',
     (('gc_large', 'gc_signed_large'),), 'signed better', 'signed worse'),
    ('baseline', 'Via synthesis (GC, large set) vs the MR-only U-Net',
     (('mr_baseline', 'gc_large'),), 'synthesis better', 'synthesis worse'),
    ('upper_bound', 'Real CT vs sCT as the U-Net\'s CT channel (paired test subjects)',
     ((collect.REAL_SCT, 'real_ct'),), 'real CT better', 'real CT worse'),
)
MI_LABELS = {'mr': 'mi_mr_sct', 'ct': 'mi_ct_smr'}


def metric_label(source: str, metric: str) -> str:
  """How a metric is named in the report."""
  if source == 'dice':
    return f'Dice {metric.replace("_", " ")}'
  if source == 'mi':
    return reports.metric_info(MI_LABELS[metric]).label
  return reports.metric_info(metric).label


def higher_is_better(source: str, metric: str) -> bool:
  """Whether a larger value of the metric is better."""
  if source in ('dice', 'mi'):
    return True
  return reports.metric_info(metric).higher_is_better


def series(results: Mapping[str, Any], source: str, name: str) -> dict[str, dict[str, float]]:
  """metric -> {patient: value} of one series for one kind of numbers ({} if absent)."""
  return dict(results.get(source, {}).get(name, {}))


def num_seeds(results: Mapping[str, Any], name: str) -> int:
  """How many finished seeds a series averages (1 for the baseline and real-CT series)."""
  return max(1, len(results.get('by_seed', {}).get(name, {})))


def comparisons(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every comparison of every question whose two series have finished.

  A synthesis cell's series are its per-patient means over its finished seeds; each row
  records how many seeds each side averaged ('seeds': 'A/B').
  """
  rows = []
  for key, title, pairs, helped, hurt in QUESTIONS:
    for a, b in pairs:
      for source in ('paired', 'mi', 'dice'):
        sa, sb = series(results, source, a), series(results, source, b)
        for metric in [m for m in sa if m in sb]:
          result = stats.compare(sa[metric], sb[metric])
          rows.append({'question': key, 'title': title, 'a': a, 'b': b, 'source': source,
                       'metric': metric, 'label': metric_label(source, metric),
                       'seeds': f'{num_seeds(results, a)}/{num_seeds(results, b)}',
                       **result, 'verdict': stats.verdict(
                           result, higher_is_better(source, metric), helped=helped, hurt=hurt)})
  return rows
