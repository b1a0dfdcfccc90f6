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


def _fake_generators(monkeypatch, config, maps):
  from mr2ct_jax.inference import generators  # pylint: disable=import-outside-toplevel

  def fake_load(source, direction='mr2ct', step=None, backend='jax'):
    info = generators.GeneratorInfo(source=source, kind='workdir', direction=direction,
                                    network=generators.network_for(direction), step=4,
                                    backend=backend)
    return maps[direction], config, info

  monkeypatch.setattr(generators, 'load_generator', fake_load)


def test_evaluate_scores_the_unpaired_splits_and_compare_tests_them(tmp_path, monkeypatch):
  from mr2ct_jax.data import writer  # pylint: disable=import-outside-toplevel
  from mr2ct_jax.evaluation import compare  # pylint: disable=import-outside-toplevel
  from mr2ct_jax.evaluation import paired  # pylint: disable=import-outside-toplevel
  config = gc.get_config('test')
  config.data.phantom.num_test_mr, config.data.phantom.num_test_ct = 2, 2
  data_dir = writer.prepare_phantom(str(tmp_path / 'phantom'), config)
  runs = {'a': {'mr2ct': _invert, 'ct2mr': _invert},
          'b': {'mr2ct': lambda x: np.tanh(2 * np.asarray(x)), 'ct2mr': _invert}}
  for name, maps in runs.items():
    _fake_generators(monkeypatch, config, maps)
    summary = paired.evaluate(str(tmp_path), data_dir, str(tmp_path / name), progress=False)
    assert summary['unpaired']['mr']['n'] == 2 and summary['unpaired']['ct']['n'] == 2
    assert '## Unpaired test volumes' in summary['summary_markdown']
    assert set(summary['fingerprint_unpaired']) == {'test_mr', 'test_ct'}
  rows = unpaired.read(str(tmp_path / 'a'))
  assert len(rows['mr']) == 2 and all(r['mi'] > 0 for r in rows['mr'] + rows['ct'])
  with open(tmp_path / 'a' / 'summary.md', encoding='utf-8') as f:
    assert '## Unpaired test volumes' in f.read()
  out = compare.compare(str(tmp_path / 'a'), str(tmp_path / 'b'), str(tmp_path / 'cmp'))
  by_set = {(r.get('set', 'paired'), r['metric']): r for r in out['results']}
  assert ('unpaired', 'mi_mr_sct') in by_set and ('unpaired', 'mi_ct_smr') in by_set
  expected = stats.ttest_rel([r['mi'] for r in unpaired.read(str(tmp_path / 'b'))['mr']],
                             [r['mi'] for r in rows['mr']])
  assert by_set[('unpaired', 'mi_mr_sct')]['p'] == pytest.approx(expected.pvalue, rel=1e-12)
  assert 'Unpaired test volumes: MI' in out['markdown']
