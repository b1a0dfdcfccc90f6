"""Evaluation reports: CSV/JSON/Markdown tables and paired t-tests (figures: `figures`).

Conventions for numbers in every table:
- mean ± sd over volumes, sd with ddof=1 (sample standard deviation); with a single value the
  sd is undefined (NaN) and tables show the mean alone.
- +inf (PSNR of identical images) and NaN (metric undefined, e.g. an empty region) are left out
  of means and t-tests; the tables say how many values were left out.
- JSON is strict: inf/-inf are written as the strings "inf"/"-inf" and NaN as null;
  `read_rows_json` turns them back into floats.
"""

import contextlib
import csv
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from mr2ct_jax import atomic
from mr2ct_jax import storage


@dataclasses.dataclass(frozen=True)
class MetricInfo:
  """How a metric is labelled and printed."""
  label: str
  unit: str
  decimals: int
  higher_is_better: bool


# Keys of the per-volume / per-slice records written by `mr2ct_jax.evaluate`, in table order.
METRICS: dict[str, MetricInfo] = {
    'mae_255': MetricInfo('MAE (0-255, paper)', '', 3, False),
    'psnr_255': MetricInfo('PSNR (0-255, paper)', 'dB', 3, True),
    'ssim': MetricInfo('SSIM (0-255)', '', 4, True),
    'mae_hu': MetricInfo('MAE in body (HU, network grid)', 'HU', 1, False),
    'psnr_hu_grid': MetricInfo('PSNR (HU [-1024, 3000], network grid)', 'dB', 3, True),
    'ssim_hu_grid': MetricInfo('SSIM (HU [-1024, 3000], 2-D, network grid)', '', 4, True),
    'mi_mr_sct': MetricInfo('MI(real MR, sCT)', 'nats', 4, True),
    'mi_ct_smr': MetricInfo('MI(real CT, sMR)', 'nats', 4, True),
    # SynthRAD2023 task 1 on the CT's own grid (`evaluate --sct_dir`, `evaluation.synthrad`).
    'synthrad_mae': MetricInfo('MAE (SynthRAD2023)', 'HU', 1, False),
    'synthrad_psnr': MetricInfo('PSNR (SynthRAD2023)', 'dB', 3, True),
    'synthrad_ssim': MetricInfo('SSIM (SynthRAD2023)', '', 4, True),
}
MI_METRICS = ('mi_mr_sct', 'mi_ct_smr')


class ReportError(ValueError):
  """A report cannot be written or read; the message names the path."""


# ---- Atomic outputs ------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool = False,
                      own_file: str | None = None) -> Iterator[str]:
  """Yields a temporary sibling directory that replaces `output_dir` when the block succeeds.

  A failed or killed run leaves `output_dir` untouched (the temp dir is removed on errors).

  Args:
    output_dir: the output folder.
    overwrite: replace an existing `output_dir` (see `check_output_dir`).
    own_file: see `check_output_dir`.

  Raises:
    ReportError: see `check_output_dir`.
  """
  output_dir = storage.absolute(output_dir)
  check_output_dir(output_dir, overwrite, own_file)
  with atomic.building_dir(output_dir) as tmp:
    yield tmp


def check_output_dir(output_dir: str, overwrite: bool, own_file: str | None = None) -> None:
  """Raises ReportError unless `output_dir` can be (re)placed: called before any work.

  Args:
    output_dir: the output folder.
    overwrite: replace an existing `output_dir`.
    own_file: a file every output of the command holds (e.g. 'per_volume.json'); given, an
      existing non-empty `output_dir` without it is refused even with `overwrite`.

  Raises:
    ReportError: it exists (without `overwrite`), is not a folder, is not an earlier output
      (`own_file`), or cannot be created.
  """
  if own_file is not None:
    atomic.check_replaceable(output_dir, overwrite, own_file, 'an earlier evaluation output',
                             error=ReportError)
  elif storage.exists(output_dir) and not overwrite:
    raise ReportError(f'{output_dir}: already exists (pass --overwrite to replace it)')
  if storage.exists(output_dir) and not storage.isdir(output_dir):
    raise ReportError(f'{output_dir}: exists and is not a directory')
  atomic.check_writable(output_dir, error=ReportError)


# ---- Numbers -------------------------------------------------------------------------------

def json_number(value: Any) -> Any:
  """A float for strict JSON: finite as is, +-inf as 'inf'/'-inf', NaN as None."""
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if math.isnan(value):
      return None
    if math.isinf(value):
      return 'inf' if value > 0 else '-inf'
    return value
  if isinstance(value, np.integer):
    return int(value)
  return value


def _from_json_number(value: Any) -> Any:
  if value is None:
    return float('nan')
  if value in ('inf', '-inf'):
    return float(value)
  return value


@dataclasses.dataclass(frozen=True)
class Stats:
  """mean ± sd of the finite values; n used, n_inf (+-inf) and n_nan left out."""
  mean: float
  sd: float
  n: int
  n_inf: int
  n_nan: int

  def to_json(self) -> dict[str, Any]:
    return {k: json_number(v) for k, v in dataclasses.asdict(self).items()}


def describe(values: Sequence[float]) -> Stats:
  """mean and sample sd (ddof=1; NaN for one value) of the finite values, counting the rest."""
  arr = np.asarray(values, dtype=np.float64)
  finite = arr[np.isfinite(arr)]
  n_inf = int(np.isinf(arr).sum())
  n_nan = int(np.isnan(arr).sum())
  if not finite.size:
    return Stats(float('nan'), float('nan'), 0, n_inf, n_nan)
  sd = float(finite.std(ddof=1)) if finite.size > 1 else float('nan')
  return Stats(float(finite.mean()), sd, int(finite.size), n_inf, n_nan)


def fmt(value: float, decimals: int = 3) -> str:
  """A number for a table: 'inf', 'nan' or fixed decimals."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return 'nan'
  if math.isinf(value):
    return 'inf' if value > 0 else '-inf'
  return f'{value:.{decimals}f}'


def fmt_stats(s: Stats, decimals: int = 3) -> str:
  """'mean ± sd' plus a note of left-out values, e.g. '15.014 ± 0.330 (1 inf excluded)'.

  A single value (n = 1) is shown as its mean alone.
  """
  text = fmt(s.mean, decimals)
  if s.n > 1:
    text += f' ± {fmt(s.sd, decimals)}'
  notes = []
  if s.n_inf:
    notes.append(f'{s.n_inf} inf excluded')
  if s.n_nan:
    notes.append(f'{s.n_nan} nan excluded')
  return text + (f' ({", ".join(notes)})' if notes else '')


def metric_info(key: str) -> MetricInfo:
  """How `key` is labelled and printed (a plain default for unknown keys)."""
  return METRICS.get(key, MetricInfo(key, '', 4, True))


# ---- Tables --------------------------------------------------------------------------------

def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
  """Writes rows as CSV (atomic); floats with full precision, inf as 'inf', NaN empty."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction='ignore')
  writer.writeheader()
  for row in rows:
    out = {}
    for key in fieldnames:
      value = row.get(key)
      if isinstance(value, (float, np.floating)):
        value = '' if math.isnan(value) else repr(float(value))
      out[key] = value
    writer.writerow(out)
  atomic.write_text(path, buf.getvalue())


def write_json(path: str, obj: Any) -> None:
  """Writes strict JSON (atomic); call `json_number` on floats that may be inf/NaN first."""
  atomic.write_text(path, json.dumps(obj, indent=2, allow_nan=False) + '\n')


def rows_to_json(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Rows with inf/NaN floats made strict-JSON safe (see `json_number`)."""
  return [{k: json_number(v) for k, v in row.items()} for row in rows]


def read_rows_json(path: str) -> list[dict[str, Any]]:
  """Reads a list of per-volume rows written by `write_json(rows_to_json(...))`."""
  try:
    with open(path, encoding='utf-8') as f:
      rows = json.load(f)
  except FileNotFoundError as e:
    raise ReportError(f'{path}: not found (is this an evaluation output directory?)') from e
  except (OSError, json.JSONDecodeError) as e:
    raise ReportError(f'{path}: cannot read JSON: {e}') from e
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise ReportError(f'{path}: expected a JSON list of per-volume objects')
  return [{k: _from_json_number(v) for k, v in row.items()} for row in rows]


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, Stats]:
  """Stats over volumes for each metric key present in the rows."""
  return {m: describe([float(r[m]) for r in rows]) for m in metrics if rows and m in rows[0]}


def md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  """A Markdown table of text cells (one list per row)."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in body]
  return '\n'.join(lines)


def summary_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                     title: str = 'Evaluation', notes: Sequence[str] = ()) -> str:
  """Markdown like the paper's Table 1: metric rows with mean ± sd, then one row per patient.

  Args:
    rows: per-volume records, each with 'patient_id' and the metric keys.
    metrics: metric keys, in table order.
    title: heading.
    notes: extra lines printed under the tables (e.g. which region was evaluated).
  """
  stats_by_metric = summarize(rows, metrics)
  metrics = [m for m in metrics if m in stats_by_metric]
  summary_body = []
  for m in metrics:
    info = metric_info(m)
    summary_body.append([info.label, info.unit or '-', fmt_stats(stats_by_metric[m], info.decimals),
                         str(stats_by_metric[m].n)])
  text = [f'# {title}', '', f'{len(rows)} volume(s). Mean ± SD over volumes (SD with ddof=1).', '',
          md_table(['Metric', 'Unit', 'Mean ± SD', 'N'], summary_body), '', '## Per patient', '']
  patient_body = [[str(r['patient_id'])]
                  + [fmt(float(r[m]), metric_info(m).decimals) for m in metrics]
                  for r in rows]
  patient_body.append(['**Average ± SD**'] + [fmt_stats(stats_by_metric[m], metric_info(m).decimals)
                                              for m in metrics])
  text.append(md_table(['Patient'] + [metric_info(m).label for m in metrics], patient_body))
  all_notes = ['PSNR of identical images is inf; inf values are shown per patient and left out '
               'of the mean ± SD (the count is noted).'] + list(notes)
  text += ['', '## Notes', ''] + [f'- {n}' for n in all_notes]
  return '\n'.join(text) + '\n'


# ---- Paired t-tests ------------------------------------------------------------------------

def paired_ttests(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                  metrics: Sequence[str] | None = None, where_a: str = 'A',
                  where_b: str = 'B') -> list[dict[str, Any]]:
  """Paired t-test (scipy.stats.ttest_rel) of B against A for each metric, matched by patient.

  For each metric the pairs where both values are finite are used: mean ± sd of A and of B,
  difference = mean(B - A), t and two-sided p of `ttest_rel(B, A)` (positive t: B larger).
  Fewer than 2 pairs gives t = p = NaN.

  Raises:
    ReportError: the two sets of patient ids differ, or a patient id repeats.
  """
  by_a = _by_patient(rows_a, where_a)
  by_b = _by_patient(rows_b, where_b)
  if set(by_a) != set(by_b):
    only_a = sorted(set(by_a) - set(by_b))
    only_b = sorted(set(by_b) - set(by_a))
    raise ReportError(f'{where_a} vs {where_b}: patient ids differ (only in A: {only_a}, '
                      f'only in B: {only_b}); a paired test needs the same test volumes')
  ids = sorted(by_a)
  if metrics is None:
    metrics = [m for m in METRICS if m in by_a[ids[0]] and m in by_b[ids[0]]] if ids else []
  results = []
  for m in metrics:
    missing = [p for p in ids if m not in by_a[p] or m not in by_b[p]]
    if missing:
      raise ReportError(f'{where_a} vs {where_b}: metric {m!r} missing for patient {missing[0]}')
    a = np.array([float(by_a[p][m]) for p in ids])
    b = np.array([float(by_b[p][m]) for p in ids])
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size >= 2:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # zero-variance differences -> nan/inf
        res = stats.ttest_rel(b, a)
      t, p = float(res.statistic), float(res.pvalue)
    else:
      t = p = float('nan')
    results.append({
        'metric': m, 'n': int(a.size), 'n_excluded': int((~keep).sum()),
        'mean_a': describe(a).mean, 'sd_a': describe(a).sd,
        'mean_b': describe(b).mean, 'sd_b': describe(b).sd,
        'diff': float(np.mean(b - a)) if a.size else float('nan'), 't': t, 'p': p})
  return results


def _by_patient(rows: Sequence[Mapping[str, Any]], where: str) -> dict[str, Mapping[str, Any]]:
  out = {}
  for row in rows:
    if 'patient_id' not in row:
      raise ReportError(f'{where}: a per-volume row has no patient_id')
    pid = str(row['patient_id'])
    if pid in out:
      raise ReportError(f'{where}: patient id {pid!r} appears twice')
    out[pid] = row
  return out


def ttest_markdown(results: Sequence[Mapping[str, Any]], name_a: str, name_b: str) -> str:
  """The paired t-test table (Markdown): mean ± sd of A and B, B - A, t, p, n."""
  body = []
  for r in results:
    d = metric_info(r['metric']).decimals
    body.append([metric_info(r['metric']).label,
                 f"{fmt(r['mean_a'], d)} ± {fmt(r['sd_a'], d)}",
                 f"{fmt(r['mean_b'], d)} ± {fmt(r['sd_b'], d)}",
                 fmt(r['diff'], d), fmt(r['t'], 3), _fmt_p(r['p']),
                 str(r['n']) + (f" ({r['n_excluded']} excl.)" if r['n_excluded'] else '')])
  header = ['Metric', f'A: {name_a}', f'B: {name_b}', 'B - A', 't', 'p', 'N']
  return (f'# Paired t-tests (scipy.stats.ttest_rel, B vs A)\n\nA = {name_a}\n\nB = {name_b}\n\n'
          + md_table(header, body) + '\n\nPairs with a non-finite value (inf PSNR) are '
          'excluded; mean ± SD over the remaining volumes (ddof=1).\n')


def _fmt_p(p: float) -> str:
  if math.isnan(p):
    return 'nan'
  return f'{p:.2e}' if p < 1e-3 else f'{p:.4f}'
