"""Evaluation reports: CSV/JSON/Markdown tables, PNG figures and paired t-tests.

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
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
from matplotlib import pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


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
    'mae_hu': MetricInfo('MAE in body (HU, = SynthRAD MAE)', 'HU', 1, False),
    'psnr_synthrad': MetricInfo('PSNR (SynthRAD)', 'dB', 3, True),
    'ssim_synthrad': MetricInfo('SSIM (SynthRAD)', '', 4, True),
    'mi_mr_sct': MetricInfo('MI(real MR, sCT)', 'nats', 4, True),
    'mi_ct_smr': MetricInfo('MI(real CT, sMR)', 'nats', 4, True),
}
MI_METRICS = ('mi_mr_sct', 'mi_ct_smr')


class ReportError(ValueError):
  """A report cannot be written or read; the message names the path."""


# ---- Atomic outputs ------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory that replaces `output_dir` when the block succeeds.

  A failed or killed run leaves `output_dir` untouched (the temp dir is removed on errors).

  Raises:
    ReportError: `output_dir` exists and overwrite is False.
  """
  output_dir = os.path.abspath(output_dir)
  check_output_dir(output_dir, overwrite)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.tmp-', dir=parent)
  try:
    yield tmp
    if os.path.exists(output_dir):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.old-', dir=parent)
      os.replace(output_dir, os.path.join(old, 'x'))
      os.replace(tmp, output_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_output_dir(output_dir: str, overwrite: bool) -> None:
  """Raises ReportError if `output_dir` exists and may not be replaced."""
  if os.path.exists(output_dir) and not overwrite:
    raise ReportError(f'{output_dir}: output exists; pass --overwrite to replace it')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ReportError(f'{output_dir}: exists and is not a directory')


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8', newline='') as f:
    f.write(text)
  os.replace(tmp, path)


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


def _info(key: str) -> MetricInfo:
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
  _atomic_write_text(path, buf.getvalue())


def write_json(path: str, obj: Any) -> None:
  """Writes strict JSON (atomic); call `json_number` on floats that may be inf/NaN first."""
  _atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + '\n')


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


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
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
    info = _info(m)
    summary_body.append([info.label, info.unit or '-', fmt_stats(stats_by_metric[m], info.decimals),
                         str(stats_by_metric[m].n)])
  text = [f'# {title}', '', f'{len(rows)} volume(s). Mean ± SD over volumes (SD with ddof=1).', '',
          _md_table(['Metric', 'Unit', 'Mean ± SD', 'N'], summary_body), '', '## Per patient', '']
  patient_body = [[str(r['patient_id'])] + [fmt(float(r[m]), _info(m).decimals) for m in metrics]
                  for r in rows]
  patient_body.append(['**Average ± SD**'] + [fmt_stats(stats_by_metric[m], _info(m).decimals)
                                              for m in metrics])
  text.append(_md_table(['Patient'] + [_info(m).label for m in metrics], patient_body))
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
    d = _info(r['metric']).decimals
    body.append([_info(r['metric']).label,
                 f"{fmt(r['mean_a'], d)} ± {fmt(r['sd_a'], d)}",
                 f"{fmt(r['mean_b'], d)} ± {fmt(r['sd_b'], d)}",
                 fmt(r['diff'], d), fmt(r['t'], 3), _fmt_p(r['p']),
                 str(r['n']) + (f" ({r['n_excluded']} excl.)" if r['n_excluded'] else '')])
  header = ['Metric', f'A: {name_a}', f'B: {name_b}', 'B - A', 't', 'p', 'N']
  return (f'# Paired t-tests (scipy.stats.ttest_rel, B vs A)\n\nA = {name_a}\n\nB = {name_b}\n\n'
          + _md_table(header, body) + '\n\nPairs with a non-finite value (inf PSNR) are '
          'excluded; mean ± SD over the remaining volumes (ddof=1).\n')


def _fmt_p(p: float) -> str:
  if math.isnan(p):
    return 'nan'
  return f'{p:.2e}' if p < 1e-3 else f'{p:.4f}'


# ---- Figures -------------------------------------------------------------------------------

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
  for r, k in enumerate(rows):
    err = np.abs(np.clip(sct_hu[k], *ct_window) - np.clip(ct_hu[k], *ct_window))
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
               label=f'absolute error (HU), CT window [{ct_window[0]:g}, {ct_window[1]:g}]')
  fig.suptitle(title, fontsize=11)
  _save(fig, path)


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
    _box(ax, [values], [''])
    info = _info(m)
    left_out = int((~np.isfinite(values)).sum())
    ax.set_title(info.label + (f'\n({left_out} non-finite left out)' if left_out else ''),
                 fontsize=10)
    ax.set_ylabel(info.unit or 'value')
  for j in range(len(metrics), nrows * ncols):
    axes[j // ncols, j % ncols].axis('off')
  fig.suptitle(f'{title} (n = {len(rows)} volumes)', fontsize=11)
  _save(fig, path)


def mi_boxplot(path: str, rows: Sequence[Mapping[str, Any]],
               title: str = 'Mutual information, mean over slices') -> None:
  """Box plot of per-volume MI in both directions (the paper's Fig. 4a)."""
  fig, ax = plt.subplots(figsize=(5.5, 4.2), layout='constrained')
  series = [np.array([float(r[m]) for r in rows]) for m in MI_METRICS]
  _box(ax, series, [_info(m).label for m in MI_METRICS])
  ax.set_ylabel('MI (nats)')
  ax.set_title(f'{title} (n = {len(rows)} volumes)', fontsize=10)
  _save(fig, path)


def _box(ax: Any, series: Sequence[np.ndarray], labels: Sequence[str]) -> None:
  finite = [s[np.isfinite(s)] for s in series]
  positions = np.arange(1, len(series) + 1)
  ax.boxplot([f if f.size else [np.nan] for f in finite], positions=positions, widths=0.5,
             showmeans=True)
  rng = np.random.default_rng(0)  # fixed jitter: figures are reproducible
  for pos, f in zip(positions, finite):
    ax.scatter(pos + rng.uniform(-0.08, 0.08, f.size), f, s=14, alpha=0.7, zorder=3)
  ax.set_xticks(positions, labels)
  ax.grid(axis='y', alpha=0.3)


def _save(fig: Any, path: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}.png'
  try:
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
