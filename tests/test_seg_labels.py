"""Segmentation reports: Dice over the ground truth's structures, label checks and tables,
Dice t-tests equal to scipy's, the Fig. 7 panels (all without training)."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from mr2ct_jax import config_checks
from mr2ct_jax import evaluate as evaluate_cli
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports
from mr2ct_jax.segmentation import compare as seg_compare
from mr2ct_jax.segmentation import dice
from mr2ct_jax.segmentation import evaluate as seg_eval
from mr2ct_jax.segmentation import labels

NAMES = {1: 'pelvis', 2: 'femur', 3: 'gluteus_medius', 4: 'gluteus_minimus'}


def _volume(pid, truth):
  return {'patient_id': pid, 'image': np.full(truth.shape, 50.0, np.float32), 'label': truth}


def _mr_only(mr):
  return mr[..., None] / 100.0, [('MR', mr, (0.0, 100.0))]


def test_dice_only_over_structures_in_the_ground_truth():
  truth = np.zeros((2, 4, 4), np.uint8)
  truth[0, :2, :2] = 1      # 4 voxels of pelvis
  truth[1, 0, :2] = 3       # 2 voxels of gluteus medius; no femur, no minimus
  pred = np.zeros_like(truth)
  pred[0, :2, 1:3] = 1      # 2 of 4 shared: 2 * 2 / 8
  pred[1, 3, 3] = 2         # femur predicted, absent from the truth: no Dice, not 0
  scores = dice.dice_in_truth(pred, truth, NAMES)
  assert scores['pelvis'] == 0.5
  assert scores['gluteus_medius'] == 0.0  # in the truth, missed
  assert math.isnan(scores['femur']) and math.isnan(scores['gluteus_minimus'])

  # Two patients: p1 lacks gluteus medius; no one has the minimus (no column at all).
  other = np.zeros_like(truth)
  other[0, :2, :2] = 1
  other[1, :2, :2] = 2
  fixed = {'p0': pred, 'p1': other}
  rows, reported = seg_eval.evaluate_volumes(
      [_volume('p0', truth), _volume('p1', other)], _mr_only,
      {'p0': lambda x: fixed['p0'][:len(x)], 'p1': lambda x: fixed['p1'][:len(x)]}, NAMES,
      num_classes=5, batch_size=2, extra={'p0': {'fold': 0}, 'p1': {'fold': 1}})
  assert reported == {1: 'pelvis', 2: 'femur', 3: 'gluteus_medius'}
  p0, p1 = rows
  assert set(p0) == {'patient_id', 'fold', 'num_slices', 'truth_voxels', 'dice_pelvis',
                     'dice_femur', 'dice_gluteus_medius', 'dice_mean'}
  assert (p0['fold'], p0['truth_voxels'], p0['dice_pelvis']) == (0, 6, 0.5)
  assert math.isnan(p0['dice_femur']) and p0['dice_mean'] == 0.25  # mean of 0.5 and 0
  assert (p1['dice_pelvis'], p1['dice_femur'], p1['dice_mean']) == (1.0, 1.0, 1.0)
  assert math.isnan(p1['dice_gluteus_medius'])
  stats_ = reports.summarize(rows, ['dice_femur', 'dice_gluteus_medius'])
  assert (stats_['dice_femur'].n, stats_['dice_femur'].n_nan) == (1, 1)


def test_empty_and_out_of_range_label_maps_are_refused_naming_the_file():
  empty = np.zeros((2, 4, 4), np.uint8)
  source = lambda pid: f'/data/{pid}_label.nii.gz'
  with pytest.raises(labels.SegDataError,
                     match=r'^/data/p7_label.nii.gz \(test patient p7\): the label map is '
                           r'empty') as e:
    seg_eval.evaluate_volumes([_volume('p7', empty)], _mr_only, lambda x: x[..., 0] * 0,
                              NAMES, num_classes=5, batch_size=2, source=source)
  assert '\n' not in str(e.value)
  big = empty.copy()
  big[0, 0, 0] = 7
  with pytest.raises(labels.SegDataError, match=r'^/data/p8_label.nii.gz \(test patient p8\): '
                     r'label value 7, but the U-Net has 5 classes \(0..4\)'):
    seg_eval.check_eval_labels([_volume('p8', big)], 5, source)
  assert labels.check_label_map(big, 8, 'x') == 7
  # Training label maps: the classes come from the largest value, a set value is checked.
  maxima = {'/d/a_label.nii': 4, '/d/b_label.nii': 21}
  assert labels.resolve_num_classes(None, maxima) == 22
  assert labels.resolve_num_classes(30, maxima) == 30
  with pytest.raises(config_checks.ConfigError,
                     match=r'^config.seg.num_classes=5: /d/b_label.nii has label value 21, so '
                           r'at least 22 classes'):
    labels.resolve_num_classes(5, maxima)
  with pytest.raises(labels.SegDataError, match='hold no structure'):
    labels.resolve_num_classes(None, {'/d/a': 0})
  meta = {'splits': {'labeled_mr': {'patients': {'p1': {'files': {
      'mr': '/in/p1_mr.nii.gz', 'label': '/in/p1_label.nii.gz'}}}}}}
  assert labels.source_file(meta, 'labeled_mr', 'p1') == '/in/p1_label.nii.gz'
  assert labels.source_file(meta, 'labeled_mr', 'p1', 'mr') == '/in/p1_mr.nii.gz'
  assert labels.source_file(meta, 'test', 'p2') == 'test patient p2'


def test_label_tables(tmp_path):
  text = tmp_path / 'labels.txt'
  text.write_text('# value name\n0 background\n1 pelvis\n\n2 femur\n22 sacrum bone\n')
  table = labels.parse_label_table(str(text))
  assert table == {1: 'pelvis', 2: 'femur', 22: 'sacrum bone'}
  # Saved with a byte-order mark and CRLF line ends, as Windows Notepad writes it.
  notepad = tmp_path / 'notepad.txt'
  notepad.write_bytes(b'\xef\xbb\xbf10 pelvis\r\n20 femur\r\n')
  assert labels.parse_label_table(str(notepad)) == {10: 'pelvis', 20: 'femur'}
  as_json = tmp_path / 'labels.json'
  as_json.write_text(json.dumps({'1': 'pelvis', '3': 'gluteus_medius'}))
  assert labels.parse_label_table(str(as_json)) == {1: 'pelvis', 3: 'gluteus_medius'}
  as_json.write_bytes(b'\xef\xbb\xbf' + json.dumps({'4': 'sacrum'}).encode())
  assert labels.parse_label_table(str(as_json)) == {4: 'sacrum'}
  names = labels.structure_names(4, {1: 'pelvis', 3: 'gmed'})
  assert names == {1: 'pelvis', 2: 'label_2', 3: 'gmed'}
  assert labels.structure_names(5) == NAMES
  assert labels.label_table({'label_table': None}) == NAMES
  assert labels.label_table({'label_table': str(text)}) == table
  bad = tmp_path / 'bad.txt'
  where = f'config.seg.label_table={bad}'
  for content, message in [('1 pelvis\nfemur\n', 'line 2: expected "<value> <name>"'),
                           ('x pelvis\n', "line 1: label value 'x' is not an integer"),
                           ('300 big\n', 'line 1: label value 300 outside 0..255'),
                           ('1 a\n1 b\n', 'line 2: label value 1 appears twice'),
                           ('1 a\n2 a\n', "line 2: structure name 'a' appears twice"),
                           ('0 background\n', 'names no structure')]:
    bad.write_text(content)
    with pytest.raises(config_checks.ConfigError) as e:
      labels.parse_label_table(str(bad))
    assert str(e.value).startswith(f'{where}: {message}'), str(e.value)
  bad_json = tmp_path / 'bad.json'
  bad_json.write_text('[1, 2]')
  with pytest.raises(config_checks.ConfigError, match=r'expected a JSON object'):
    labels.parse_label_table(str(bad_json))
  with pytest.raises(config_checks.ConfigError, match=r'^config.seg.label_table=.*missing'
                     r'.txt: cannot read'):
    labels.parse_label_table(str(tmp_path / 'missing.txt'))


def _write_eval(directory, dice_rows, names, fp):
  os.makedirs(directory)
  rows = [{'patient_id': pid, **{f'dice_{n}': v for n, v in zip(names, values)}}
          for pid, values in dice_rows.items()]
  for row in rows:
    finite = [v for k, v in row.items() if k.startswith('dice_') and np.isfinite(v)]
    row['dice_mean'] = float(np.mean(finite))
  reports.write_json(os.path.join(directory, 'per_volume.json'), reports.rows_to_json(rows))
  reports.write_json(os.path.join(directory, 'summary.json'), {
      'kind': seg_eval.KIND, 'structures': {str(i + 1): n for i, n in enumerate(names)},
      'fingerprint': fp})
  return rows


def test_dice_ttests_equal_scipy_matched_by_patient(tmp_path, capsys):
  names = ['pelvis', 'femur']
  fp = fingerprint.fingerprint({}, 'labeled_mr', ['a', 'b', 'c', 'd'])
  a = _write_eval(tmp_path / 'A', {'a': (0.70, 0.80), 'b': (0.75, 0.85), 'c': (0.60, np.nan),
                                   'd': (0.72, 0.90)}, names, fp)
  # B lists the patients in another order: the pairs are by patient id, not by position.
  b = _write_eval(tmp_path / 'B', {'d': (0.80, 0.93), 'c': (0.71, 0.5), 'b': (0.79, 0.86),
                                   'a': (0.78, 0.88)}, names, fp)
  assert evaluate_cli.main(['evaluate', '--compare', str(tmp_path / 'A'),
                            str(tmp_path / 'B')]) == 0
  assert '| dice_pelvis |' in capsys.readouterr().out
  out = json.load(open(tmp_path / 'B' / 'compare.json', encoding='utf-8'))
  by = {r['metric']: r for r in out['results']}
  assert list(by) == ['dice_pelvis', 'dice_femur', 'dice_mean']
  va = {r['patient_id']: r for r in a}
  vb = {r['patient_id']: r for r in b}
  ids = sorted(va)
  expected = stats.ttest_rel([vb[p]['dice_pelvis'] for p in ids],
                             [va[p]['dice_pelvis'] for p in ids])
  assert by['dice_pelvis']['t'] == float(expected.statistic)
  assert by['dice_pelvis']['p'] == float(expected.pvalue)
  assert by['dice_pelvis']['n'] == 4
  # Femur: patient c's ground truth has none (NaN in A): left out of that test only.
  keep = ['a', 'b', 'd']
  expected = stats.ttest_rel([vb[p]['dice_femur'] for p in keep],
                             [va[p]['dice_femur'] for p in keep])
  assert (by['dice_femur']['n'], by['dice_femur']['n_excluded']) == (3, 1)
  assert by['dice_femur']['t'] == float(expected.statistic)
  assert by['dice_femur']['p'] == float(expected.pvalue)
  assert 'Dice NaN' in out['markdown']

  # Different data, or different structures: refused with one line.
  other = _write_eval(tmp_path / 'C', {'a': (0.7, 0.8), 'b': (0.7, 0.8), 'c': (0.7, 0.8),
                                       'e': (0.7, 0.8)}, names,
                      fingerprint.fingerprint({}, 'labeled_mr', ['a', 'b', 'c', 'e']))
  assert other
  with pytest.raises(fingerprint.FingerprintError, match='scored on different data'):
    seg_compare.compare(str(tmp_path / 'A'), str(tmp_path / 'C'))
  _write_eval(tmp_path / 'D', {p: (0.7, 0.8) for p in 'abcd'}, ['pelvis', 'sacrum'], fp)
  with pytest.raises(SystemExit, match=r'^error: .*report different structures'):
    seg_compare.main(['compare', str(tmp_path / 'A'), str(tmp_path / 'D'),
                      f'--output={tmp_path / "out"}'])


def test_fig7_panels_written(tmp_path):
  truth = np.zeros((4, 32, 32), np.uint8)
  truth[1:3, 8:16, 8:16] = 1
  truth[1:3, 20:24, 4:12] = 2
  pred = truth.copy()
  pred[2, 25:28, 25:28] = 21  # a structure only predicted (the paper's 22 labels)
  mr = np.random.default_rng(0).uniform(0, 100, truth.shape).astype(np.float32)
  path = tmp_path / 'p0.png'
  from mr2ct_jax.segmentation import figures  # pylint: disable=g-import-not-at-top
  figures.label_panels(str(path), [('MR', mr, (0, 100)), ('sCT', mr / 50 - 1, (-1, 1))],
                       pred, truth, NAMES, title='p0')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  colors = figures.label_colors([1, 2, 21])
  assert len(set(colors.values())) == 3
