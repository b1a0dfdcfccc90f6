"""The single-modality MR baseline: folds by patient, k-fold CV end to end, errors."""

import json
import os

import pytest

from mr2ct_jax.data import writer
from mr2ct_jax.evaluation import reports
from mr2ct_jax.segmentation import baseline
from mr2ct_jax.segmentation import labels

PROG = 'mr2ct_jax.segmentation.baseline'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fold_split_by_patient_covers_every_volume_once():
  patients = [f'p{i:02d}' for i in range(11)]
  folds = baseline.fold_split(patients, 5, seed=3)
  assert len(folds) == 5 and sorted(len(f) for f in folds) == [2, 2, 2, 2, 3]
  dealt = [p for fold in folds for p in fold]
  assert sorted(dealt) == patients and len(set(dealt)) == len(patients)
  assert baseline.fold_split(patients[::-1], 5, seed=3) == folds  # the order given is irrelevant
  assert baseline.fold_split(patients, 5, seed=4) != folds
  assert baseline.fold_split(['a', 'b'], 2, seed=0) in (([['a'], ['b']]), [['b'], ['a']])
  with pytest.raises(labels.SegDataError,
                     match=r'^the labeled MR: 4 folds but only 3 labeled MR volume\(s\); use '
                           r'at most 3 folds'):
    baseline.fold_split(['a', 'b', 'c'], 4, seed=0)
  with pytest.raises(labels.SegDataError, match='at least 2 folds'):
    baseline.fold_split(['a', 'b', 'c'], 1, seed=0)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, test_config):
  """The tiny phantom with 3 paired test subjects (the labeled MR of the fallback)."""
  config = test_config.copy_and_resolve_references()
  config.data.phantom.num_test = 3
  return writer.prepare_phantom(str(tmp_path_factory.mktemp('base') / 'phantom'), config)


def test_baseline_cross_validation_end_to_end(data_dir, test_config, tmp_path, capsys):
  config = test_config.copy_and_resolve_references()
  config.seg.num_classes = None  # from the labeled MR
  out = str(tmp_path / 'base')
  summary = baseline.run(config, data_dir, out, folds=3, steps=2)
  assert summary['split'] == 'test'  # no labeled_mr split: the paired test split's MR
  assert summary['num_classes'] == 5 and summary['unet_steps'] == [2, 2, 2]
  folds = summary['folds']
  assert sorted(p for f in folds for p in f) == summary['patients'] == sorted(summary['patients'])
  assert all(len(f) == 1 for f in folds)
  rows = reports.read_rows_json(os.path.join(out, 'eval', 'per_volume.json'))
  assert sorted(r['patient_id'] for r in rows) == summary['patients']
  for row in rows:
    assert folds[row['fold']] == [row['patient_id']]  # tested by the U-Net that left it out
    for name in ('pelvis', 'femur', 'gluteus_medius', 'gluteus_minimus'):
      assert 0.0 <= row[f'dice_{name}'] <= 1.0
  assert summary['fingerprint']['split'] == 'test'
  assert 'Paper (5-fold MR U-Net, 10 MR)' in capsys.readouterr().out
  figures = sorted(os.listdir(os.path.join(out, 'eval', 'figures')))
  assert figures == ['dice_boxplot.png'] + sorted(f'{p}.png' for p in summary['patients'])
  info = json.load(open(os.path.join(out, 'baseline.json'), encoding='utf-8'))
  assert info['folds'] == folds and info['seg']['num_classes'] == 5
  assert sorted(os.listdir(out)) == ['baseline.json', 'eval', 'fold_0', 'fold_1', 'fold_2']

  # A rerun with other folds in the same directory is refused (its checkpoints differ).
  with pytest.raises(labels.SegDataError, match='other folds'):
    baseline.run(config, data_dir, out, folds=2, steps=2, overwrite=True)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_baseline_errors_are_one_line(data_dir, test_config, tmp_path):
  out = f'--output={tmp_path / "b"}'
  config = f'--config={REPO}/configs/gc.py:test'
  for argv, message in [
      ([f'--data={data_dir}', out, config, '--folds=4'],
       r"^error: .* \('test' split\): 4 folds but only 3 labeled MR volume\(s\)"),
      ([f'--data={tmp_path / "nodata"}', out, config], 'nodata: data dir does not exist'),
      ([out], r'^error: --data is required'),
      ([f'--data={data_dir}', out, config, '--num_processes=2'],
       r'^error: --num_processes needs --jax_distributed$')]:
    with pytest.raises(SystemExit, match=message) as exc:
      baseline.main([PROG] + argv)
    assert '\n' not in str(exc.value)
  for key, value, message in [
      ('num_classes', 3, r'^config.seg.num_classes=3: .*_label.nii.gz has label value 4'),
      ('label_table', str(tmp_path / 'none.txt'),
       r'^config.seg.label_table=.*none.txt: cannot read')]:
    config = test_config.copy_and_resolve_references()
    config.seg[key] = value
    with pytest.raises(ValueError, match=message):
      baseline.run(config, data_dir, str(tmp_path / 'b'), folds=2, steps=1)
  assert not os.path.exists(tmp_path / 'b')


@pytest.fixture(scope='module')
def labeled_mr_dir(tmp_path_factory, test_config):
  """The tiny phantom with 3 labeled MR (MR + label map, no CT) and 1 paired test subject."""
  config = test_config.copy_and_resolve_references()
  config.data.phantom.num_labeled_mr = 3
  return writer.prepare_phantom(str(tmp_path_factory.mktemp('lmr') / 'phantom'), config)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_synthesis_run_with_a_label_table_compares_with_the_baseline(
    labeled_mr_dir, test_config, tmp_path):
  data_dir = labeled_mr_dir
  import tiny_run  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import compare as seg_compare  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import run as seg_run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  tiny_run.make_workdir(workdir, test_config, step=2)
  table = tmp_path / 'labels.txt'
  table.write_text('1 os_coxae\n2 femur\n3 gmed\n4 gmin\n')
  seg = test_config.seg.copy_and_resolve_references()
  seg.num_classes = None
  seg.label_table = str(table)
  summary = seg_run.run(workdir, data_dir, str(tmp_path / 'seg'), steps=2, seg_config=seg)
  # Tested on the labeled MR (not the paired test split), as the paper's Fig. 6.
  assert summary['num_classes'] == 5 and summary['split'] == 'labeled_mr'
  meta = json.load(open(os.path.join(data_dir, 'dataset_meta.json'), encoding='utf-8'))
  assert summary['patients'] == sorted(meta['splits']['labeled_mr']['patients'])
  assert len(summary['patients']) == 3
  assert summary['structures'] == {'1': 'os_coxae', '2': 'femur', '3': 'gmed', '4': 'gmin'}
  run_info = json.load(open(tmp_path / 'seg' / 'run.json', encoding='utf-8'))
  assert run_info['seg']['num_classes'] == 5

  config = test_config.copy_and_resolve_references()
  config.seg.label_table = str(table)
  base = baseline.run(config, data_dir, str(tmp_path / 'base'), folds=2, steps=1)
  assert base['split'] == 'labeled_mr' and sorted(map(len, base['folds'])) == [1, 2]
  assert base['fingerprint'] == summary['fingerprint']
  out = seg_compare.compare(str(tmp_path / 'base' / 'eval'), str(tmp_path / 'seg' / 'eval'))
  assert [r['metric'] for r in out['results']] == ['dice_os_coxae', 'dice_femur', 'dice_gmed',
                                                   'dice_gmin', 'dice_mean']
  assert all(r['n'] == 3 for r in out['results'])
