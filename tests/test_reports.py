"""Reports: tables, inf handling, paired t-tests against scipy, figures, atomic outputs."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from mr2ct_jax.evaluation import figures as report_figures
from mr2ct_jax.evaluation import reports


def _rows(values_by_metric, ids=('p1', 'p2', 'p3', 'p4')):
  return [{'patient_id': pid, **{m: v[i] for m, v in values_by_metric.items()}}
          for i, pid in enumerate(ids)]


def test_describe_excludes_inf_and_nan():
  s = reports.describe([1.0, 3.0, math.inf, math.nan])
  assert (s.mean, s.n, s.n_inf, s.n_nan) == (2.0, 2, 1, 1)
  assert s.sd == pytest.approx(math.sqrt(2.0))  # ddof=1
  assert math.isnan(reports.describe([5.0]).sd)
  assert reports.fmt_stats(reports.describe([5.0])) == "5.000"
  assert math.isnan(reports.describe([math.inf]).mean)
  assert reports.fmt_stats(s, 2) == '2.00 ± 1.41 (1 inf excluded, 1 nan excluded)'


def test_paper_table_numbers():
  # Table 1 of the paper, 20 volumes w/o GC, PSNR: the mean is reproduced.
  s = reports.describe([14.797, 15.734, 14.510])
  assert reports.fmt(s.mean) == '15.014'


def test_paired_ttests_equal_scipy():
  rng = np.random.default_rng(0)
  a = {'mae_255': rng.normal(30, 2, 4), 'psnr_255': rng.normal(15, 0.5, 4)}
  b = {'mae_255': a['mae_255'] - rng.normal(1, 0.5, 4), 'psnr_255': a['psnr_255'] + 0.3 +
       rng.normal(0, 0.1, 4)}
  rows_a = _rows(a)
  rows_b = _rows(b)[::-1]  # order must not matter: matched by patient id
  results = {r['metric']: r for r in reports.paired_ttests(rows_a, rows_b)}
  assert list(results) == ['mae_255', 'psnr_255']
  for m in a:
    ref = stats.ttest_rel(b[m], a[m])
    assert results[m]['t'] == pytest.approx(ref.statistic, rel=1e-12)
    assert results[m]['p'] == pytest.approx(ref.pvalue, rel=1e-12)
    assert results[m]['diff'] == pytest.approx(np.mean(b[m] - a[m]))
    assert results[m]['mean_a'] == pytest.approx(np.mean(a[m]))
    assert results[m]['sd_b'] == pytest.approx(np.std(b[m], ddof=1))
    assert results[m]['n'] == 4
  md = reports.ttest_markdown(list(results.values()), 'runs/nogc/eval', 'runs/gc/eval')
  assert '| MAE (0-255, paper) |' in md and 'runs/gc/eval' in md


def test_paired_ttests_drop_inf_pairs_and_reject_different_patients():
  rows_a = _rows({'psnr_255': [10.0, 11.0, 12.0, math.inf]})
  rows_b = _rows({'psnr_255': [10.5, 11.2, 12.9, 13.0]})
  (r,) = reports.paired_ttests(rows_a, rows_b)
  ref = stats.ttest_rel([10.5, 11.2, 12.9], [10.0, 11.0, 12.0])
  assert (r['n'], r['n_excluded']) == (3, 1)
  assert r['p'] == pytest.approx(ref.pvalue)
  with pytest.raises(reports.ReportError, match=r"only in A: \['p4'\]"):
    reports.paired_ttests(rows_a, rows_b[:3])


def test_summary_markdown_has_patient_rows_and_inf_note():
  rows = _rows({'mae_255': [30.121, 26.927, 33.651, 0.0],
                'psnr_255': [14.797, 15.734, 14.510, math.inf]})
  md = reports.summary_markdown(rows, ['mae_255', 'psnr_255'], title='T')
  assert md.startswith('# T')
  assert '| p1 | 30.121 | 14.797 |' in md
  assert '| p4 | 0.000 | inf |' in md
  assert '15.014 ± 0.640 (1 inf excluded)' in md  # mean and sd over the 3 finite values
  assert 'left out' in md


def test_json_round_trip_of_non_finite(tmp_path):
  rows = [{'patient_id': 'a', 'psnr_255': math.inf, 'ssim': math.nan, 'mae_255': 1.5}]
  path = str(tmp_path / 'rows.json')
  reports.write_json(path, reports.rows_to_json(rows))
  text = open(path, encoding='utf-8').read()
  json.loads(text)  # strict JSON
  assert '"inf"' in text and 'null' in text
  back = reports.read_rows_json(path)
  assert back[0]['psnr_255'] == math.inf and math.isnan(back[0]['ssim'])
  with pytest.raises(reports.ReportError, match='not found'):
    reports.read_rows_json(str(tmp_path / 'missing.json'))


def test_write_csv(tmp_path):
  path = str(tmp_path / 't.csv')
  reports.write_csv(path, [{'patient_id': 'a', 'x': 0.1, 'y': math.inf, 'z': math.nan}],
                    ['patient_id', 'x', 'y', 'z'])
  assert open(path, encoding='utf-8').read().splitlines() == ['patient_id,x,y,z', 'a,0.1,inf,']


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_figures_are_valid_pngs(tmp_path):
  from matplotlib import image as mpimg
  rng = np.random.default_rng(0)
  ct = rng.uniform(-1000, 1000, (5, 32, 32))
  valid = np.zeros(ct.shape, bool)
  valid[1:4, 4:28, 4:28] = True
  panel = str(tmp_path / 'panel.png')
  report_figures.volume_panel(panel, rng.uniform(0, 100, ct.shape), ct + 50, ct, valid,
                              title='p1', mr_window=(0, 100), ct_window=(-150, 350))
  rows = _rows({'mae_255': [1., 2., 3., 4.], 'psnr_255': [1., 2., math.inf, 3.],
                'mi_mr_sct': [.1, .2, .3, .4], 'mi_ct_smr': [.2, .3, .4, .5]})
  box = str(tmp_path / 'box.png')
  report_figures.metric_boxplots(box, rows, ['mae_255', 'psnr_255'])
  mi = str(tmp_path / 'mi.png')
  report_figures.mi_boxplot(mi, rows)
  for path in (panel, box, mi):
    assert _is_png(path)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert report_figures.pick_slices(valid) == [1, 2, 3]


def test_atomic_output_dir(tmp_path):
  out = str(tmp_path / 'eval')
  with reports.atomic_output_dir(out) as tmp:
    open(os.path.join(tmp, 'a.txt'), 'w', encoding='utf-8').write('1')
  assert os.listdir(out) == ['a.txt']
  with pytest.raises(reports.ReportError, match='--overwrite'):
    with reports.atomic_output_dir(out):
      pass
  with pytest.raises(RuntimeError):  # a failed run leaves the old output untouched
    with reports.atomic_output_dir(out, overwrite=True) as tmp:
      open(os.path.join(tmp, 'b.txt'), 'w', encoding='utf-8').write('2')
      raise RuntimeError('killed')
  assert os.listdir(out) == ['a.txt']
  with reports.atomic_output_dir(out, overwrite=True) as tmp:
    open(os.path.join(tmp, 'b.txt'), 'w', encoding='utf-8').write('2')
  assert os.listdir(out) == ['b.txt']
  assert sorted(os.listdir(tmp_path)) == ['eval']  # no temp dirs left behind


def test_atomic_building_dir_keeps_target_on_failure(tmp_path):
  """mr2ct_jax.atomic: a failed build leaves the old target and no temporary directory."""
  from mr2ct_jax import atomic  # pylint: disable=g-import-not-at-top
  target = tmp_path / 'out'
  with atomic.building_dir(str(target)) as tmp:
    (tmp_path / tmp / 'v1.txt').write_text('1', encoding='utf-8')
  with pytest.raises(KeyboardInterrupt):
    with atomic.building_dir(str(target)) as tmp:
      open(os.path.join(tmp, 'v2.txt'), 'w', encoding='utf-8').close()
      raise KeyboardInterrupt  # a killed run
  assert sorted(os.listdir(tmp_path)) == ['out']
  assert os.listdir(target) == ['v1.txt']
  with atomic.building_dir(str(target)) as tmp:
    open(os.path.join(tmp, 'v3.txt'), 'w', encoding='utf-8').close()
  assert os.listdir(target) == ['v3.txt'] and sorted(os.listdir(tmp_path)) == ['out']
