"""MI on the unpaired test splits (Fig. 4) and its paired t-tests between two evaluations."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from configs import gc
from mr2ct_jax.data import intensity
from mr2ct_jax.evaluation import metrics
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import unpaired


def _volumes(seed, n, kind):
  rng = np.random.default_rng(seed)
  vols = []
  for i in range(n):
    base = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
    image = base * 120.0 if kind == 'mr' else base * 1400.0 - 1000.0
    vols.append({'patient_id': f'{kind}{i}', 'image': image})
  return vols


def _invert(x):  # a "generator": model range in, model range out
  return -0.8 * np.asarray(x) + 0.05 * np.sin(7 * np.asarray(x))


@pytest.fixture
def config():
  c = gc.get_config('test')
  c.data.ct_window = (-1024.0, 2000.0)  # trained with a wide window: MI still uses the paper's
  return c


def test_mi_per_volume_equals_a_direct_computation(config):
  vols = {'test_mr': _volumes(0, 2, 'mr'), 'test_ct': _volumes(1, 3, 'ct')}
  results = unpaired.score(vols, _invert, _invert, config)
  assert [r['patient_id'] for r in results['mr']] == ['mr0', 'mr1']
  assert [r['patient_id'] for r in results['ct']] == ['ct0', 'ct1', 'ct2']
  mr = vols['test_mr'][1]['image']
  sct_hu = intensity.model_to_ct_hu(_invert(intensity.mr_to_model(mr, (0.0, 100.0))),
                                    config.data.ct_window)
  expected = np.mean([metrics.mutual_information(
      intensity.mr_to_unit(mr[k], (0.0, 100.0)), intensity.ct_to_unit(sct_hu[k], (-150.0, 350.0)),
      range_a=(0, 255), range_b=(0, 255)) for k in range(3)])
  assert results['mr'][1]['mi'] == pytest.approx(expected, rel=1e-6)
  ct = vols['test_ct'][2]['image']
  smr = intensity.model_to_mr(_invert(intensity.ct_hu_to_model(ct, config.data.ct_window)),
                              config.data.mr_window)
  expected = np.mean([metrics.mutual_information(
      intensity.ct_to_unit(ct[k], (-150.0, 350.0)), intensity.mr_to_unit(smr[k], (0.0, 100.0)),
      range_a=(0, 255), range_b=(0, 255)) for k in range(3)])
  assert results['ct'][2]['mi'] == pytest.approx(expected, rel=1e-6)
  assert results['mr'][0]['num_slices'] == 3
  # Without G_mr the CT rows are left out.
  assert set(unpaired.score(vols, _invert, None, config)) == {'mr'}


def test_written_outputs_and_compare_equal_scipy(tmp_path, config):
  vols = {'test_mr': _volumes(0, 3, 'mr'), 'test_ct': _volumes(1, 3, 'ct')}
  a = unpaired.score(vols, _invert, _invert, config)
  b = unpaired.score(vols, lambda x: np.tanh(2 * np.asarray(x)), _invert, config)
  for name, res in (('a', a), ('b', b)):
    os.makedirs(tmp_path / name / 'figures')
    section = unpaired.write(str(tmp_path / name), res)
    assert section.startswith('## Unpaired test volumes')
  assert os.path.getsize(tmp_path / 'a' / 'figures' / 'unpaired_mi_boxplot.png') > 1000
  with open(tmp_path / 'a' / 'unpaired.json', encoding='utf-8') as f:
    rows = json.load(f)
  assert [(r['direction'], r['patient_id']) for r in rows][:2] == [('mr', 'mr0'), ('mr', 'mr1')]
  assert unpaired.read(str(tmp_path / 'a')) == {k: [dict(r) for r in v] for k, v in a.items()}
  results = unpaired.compare(str(tmp_path / 'a'), str(tmp_path / 'b'))
  mr, ct = results
  assert (mr['metric'], ct['metric']) == ('mi_mr_sct', 'mi_ct_smr')
  expected = stats.ttest_rel([r['mi'] for r in b['mr']], [r['mi'] for r in a['mr']])
  assert mr['t'] == pytest.approx(expected.statistic, rel=1e-12)
  assert mr['p'] == pytest.approx(expected.pvalue, rel=1e-12)
  assert mr['n'] == 3 and mr['set'] == 'unpaired'
  assert ct['diff'] == 0.0  # the same G_mr: no difference


def test_compare_refuses_unmatched_unpaired_sets(tmp_path, config):
  a = unpaired.score({'test_mr': _volumes(0, 2, 'mr')}, _invert, None, config)
  b = unpaired.score({'test_mr': _volumes(0, 3, 'mr')}, _invert, None, config)
  for name, res in (('a', a), ('b', b)):
    os.makedirs(tmp_path / name / 'figures')
    unpaired.write(str(tmp_path / name), res)
  with pytest.raises(reports.ReportError, match=r"patient ids differ .*only in B: \['mr2'\]"):
    unpaired.compare(str(tmp_path / 'a'), str(tmp_path / 'b'))
  os.makedirs(tmp_path / 'c')
  with pytest.raises(reports.ReportError, match='has no unpaired.json'):
    unpaired.compare(str(tmp_path / 'a'), str(tmp_path / 'c'))
  assert unpaired.compare(str(tmp_path / 'c'), str(tmp_path / 'c')) == []


def test_nan_slices_are_a_one_line_error(config):
  vols = _volumes(0, 1, 'mr')
  vols[0]['image'][1, 2, 3] = np.nan
  with pytest.raises(reports.ReportError, match=r'^test_mr patient mr0: the prepared slices'):
    unpaired.score({'test_mr': vols}, _invert, None, config)
