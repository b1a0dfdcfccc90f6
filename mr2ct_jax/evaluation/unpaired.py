"""MI on the unpaired test splits (the paper's Fig. 4): MR vs its sCT, CT vs its sMR.

Where no registered pair exists, the paper measures how much of the input's structure a
translation keeps by the mutual information between each real image and its translation:
for every unpaired test MR (split `test_mr`) MI(MR, sCT = G_ct(MR)), for every unpaired test
CT (split `test_ct`) MI(CT, sMR = G_mr(CT)), each the mean over slices of the slice's MI
(`metrics.slice_mutual_information`: 64 x 64 bins over [0, 255] of both images put on the
0-255 scale with the paper's windows, CT [-150, 350] HU and MR [0, 100], whatever windows the
run was trained with, so values compare between runs). Whole slices are used: an unpaired
volume has no other field of view.

`score` translates and scores; `write` puts unpaired.json / unpaired.csv and the box plot
figures/unpaired_mi_boxplot.png into an evaluation output; `compare` runs the paired t-tests
of two evaluations (MR rows and CT rows separately, matched by patient).
"""

import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
import tqdm

from mr2ct_jax.data import intensity
from mr2ct_jax.evaluation import figures as report_figures
from mr2ct_jax.evaluation import metrics
from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import slices as slices_lib

FILE = 'unpaired.json'
# split -> (direction key, the metric's name in rows and reports.METRICS).
SPLITS = {'test_mr': ('mr', 'mi_mr_sct'), 'test_ct': ('ct', 'mi_ct_smr')}
_MI_RANGE = (0.0, 255.0)
FIELDS = ('patient_id', 'num_slices', 'mi')


def _volume_mi(volume: Mapping[str, Any], split: str, apply_fn: slices_lib.ApplyFn,
               config: ml_collections.ConfigDict) -> dict[str, Any]:
  """One unpaired test volume's row: {'patient_id', 'num_slices', 'mi'}."""
  pid = volume['patient_id']
  image = np.asarray(volume['image'], np.float32)
  if image.ndim != 3 or not image.size:
    raise reports.ReportError(f'{split} patient {pid}: expected [slices, H, W] slices, got '
                              f'{image.shape}')
  if not np.all(np.isfinite(image)):
    raise reports.ReportError(f'{split} patient {pid}: the prepared slices hold NaN/Inf')
  batch = int(config.eval.batch_size)
  if split == 'test_mr':
    out = slices_lib.translate_slices(
        apply_fn, intensity.mr_to_model(image, config.data.mr_window), batch)
    real = intensity.mr_to_unit(image, intensity.PAPER_MR_WINDOW)
    fake = intensity.ct_to_unit(intensity.model_to_ct_hu(out, config.data.ct_window),
                                intensity.PAPER_CT_WINDOW)
  else:
    out = slices_lib.translate_slices(
        apply_fn, intensity.ct_hu_to_model(image, config.data.ct_window), batch)
    real = intensity.ct_to_unit(image, intensity.PAPER_CT_WINDOW)
    fake = intensity.mr_to_unit(intensity.model_to_mr(out, config.data.mr_window),
                                intensity.PAPER_MR_WINDOW)
  values = metrics.slice_mutual_information(real, fake, None, range_a=_MI_RANGE,
                                            range_b=_MI_RANGE)
  return {'patient_id': pid, 'num_slices': int(image.shape[0]), 'mi': float(np.mean(values))}


def score(volumes: Mapping[str, Iterable[Mapping[str, Any]]], sct_fn: slices_lib.ApplyFn,
          smr_fn: slices_lib.ApplyFn | None, config: ml_collections.ConfigDict, *,
          progress: bool = False) -> dict[str, list[dict[str, Any]]]:
  """MI of each unpaired test volume with its translation.

  Args:
    volumes: split ('test_mr' / 'test_ct') -> its volumes (`dataset.iterate_volumes`).
    sct_fn: G_ct; smr_fn: G_mr, or None (then the CT rows are not computed).
    config: the run's config (data windows, eval.batch_size).
    progress: show a progress bar.

  Returns:
    {'mr': rows, 'ct': rows} for the splits given; rows sorted by patient id.
  """
  out = {}
  for split, vols in volumes.items():
    direction, _ = SPLITS[split]
    apply_fn = sct_fn if split == 'test_mr' else smr_fn
    if apply_fn is None:
      continue
    rows = [_volume_mi(v, split, apply_fn, config)
            for v in tqdm.tqdm(vols, desc=f'MI {split}', unit='volume', disable=not progress)]
    out[direction] = sorted(rows, key=lambda r: str(r['patient_id']))
  return out


def summary_markdown(results: Mapping[str, list[dict[str, Any]]]) -> str:
  """The unpaired section of summary.md: mean ± SD of each direction's MI."""
  body = []
  for direction, metric in (v for v in SPLITS.values()):
    rows = results.get(direction)
    if rows:
      stats = reports.describe([r['mi'] for r in rows])
      body.append([reports.metric_info(metric).label, reports.fmt_stats(stats, 3),
                   str(len(rows))])
  return ('## Unpaired test volumes (MI, the paper\'s Fig. 4)\n\n'
          + reports.md_table(['Metric', 'mean ± SD (nats)', 'volumes'], body) + '\n\n'
          'Per volume: the mean over slices of MI(real, translated), 64 x 64 bins over the '
          'paper\'s 0-255 windows, whole slices. Per-volume values in unpaired.csv.\n')


def write(out_dir: str, results: Mapping[str, list[dict[str, Any]]]) -> str:
  """Writes unpaired.json / unpaired.csv (rows with a 'direction' field, 'mr' or 'ct') and
  figures/unpaired_mi_boxplot.png; returns the Markdown section for summary.md."""
  rows = [{'direction': d, **r} for d, rs in results.items() for r in rs]
  reports.write_json(os.path.join(out_dir, FILE), reports.rows_to_json(rows))
  reports.write_csv(os.path.join(out_dir, 'unpaired.csv'), rows, ('direction',) + FIELDS)
  series = {reports.metric_info(m).label: [r['mi'] for r in results.get(d, [])]
            for d, m in SPLITS.values() if results.get(d)}
  report_figures.named_boxplot(os.path.join(out_dir, 'figures', 'unpaired_mi_boxplot.png'),
                               series, ylabel='MI (nats)',
                               title='MI of unpaired test volumes, mean over slices')
  return summary_markdown(results)


def read(eval_dir: str) -> dict[str, list[dict[str, Any]]] | None:
  """The unpaired results ({'mr': rows, 'ct': rows}) of an evaluation output, or None."""
  path = os.path.join(eval_dir, FILE)
  if not os.path.isfile(path):
    return None
  out: dict[str, list[dict[str, Any]]] = {}
  for row in reports.read_rows_json(path):
    direction = row.pop('direction', None)
    if direction not in ('mr', 'ct') or 'mi' not in row or 'patient_id' not in row:
      raise reports.ReportError(f'{path}: a row lacks direction mr/ct, patient_id or mi')
    out.setdefault(direction, []).append(row)
  return out


def compare(dir_a: str, dir_b: str) -> list[dict[str, Any]]:
  """Paired t-tests of the unpaired MI of two evaluations (B vs A), one per direction.

  MR rows and CT rows are tested separately, each matched by patient id (`reports.
  paired_ttests`). Evaluations without unpaired results give no rows; one with and one
  without is an error (they did not score the same data).

  Raises:
    reports.ReportError: one has unpaired results and the other not, or patient sets differ.
  """
  a, b = read(dir_a), read(dir_b)
  if a is None and b is None:
    return []
  if (a is None) != (b is None):
    have, lack = (dir_a, dir_b) if b is None else (dir_b, dir_a)
    raise reports.ReportError(f'{lack}: has no {FILE} but {have} has; the two evaluations '
                              'did not score the same unpaired test volumes')
  results = []
  for direction, metric in SPLITS.values():
    if direction not in a and direction not in b:
      continue
    rows_a = [{'patient_id': r['patient_id'], metric: r['mi']} for r in a.get(direction, [])]
    rows_b = [{'patient_id': r['patient_id'], metric: r['mi']} for r in b.get(direction, [])]
    results += reports.paired_ttests(rows_a, rows_b, [metric],
                                     where_a=f'{dir_a} ({direction} unpaired)',
                                     where_b=f'{dir_b} ({direction} unpaired)')
  for r in results:
    r['set'] = 'unpaired'
  return results
