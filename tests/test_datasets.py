"""prepare + the TFDS builder: build and read back, splits, metadata, bad input, CLI."""

import json
import logging
import os
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import pytest

from mr2ct_jax.data import preprocess
from mr2ct_jax.data import tfds_builder
from mr2ct_jax.data import volume
from mr2ct_jax.data import dataset
from mr2ct_jax.data import writer

import synthetic_volumes as synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, SPACING = 32, 5.0
KW = dict(spacing_mm=SPACING, image_size=SIZE, mr_percentile=99.5, n4=False)


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  return synth.make(str(tmp_path_factory.mktemp('raw')))


@pytest.fixture(scope='module')
def data_dir(raw, tmp_path_factory):
  return writer.prepare(*raw[:2], str(tmp_path_factory.mktemp('p') / 'data'),
                        labeled_dir=raw[2], paired_dir=raw[3], **KW)


def _pid(example):
  pid = example['patient_id']
  return pid.decode() if isinstance(pid, bytes) else pid


def test_build_and_read_back(data_dir, raw):
  meta = dataset.load_meta(data_dir)
  assert meta['image_size'] == SIZE and meta['spacing_mm'] == SPACING and not meta['n4']
  assert sorted(meta['splits']) == ['labeled', 'test', 'train_ct', 'train_mr']
  patients = {s: sorted(v['patients']) for s, v in meta['splits'].items()}
  assert patients == {'train_mr': ['mr0', 'mr1'], 'train_ct': ['ct0', 'ct1', 'ct2'],
                      'labeled': ['lab0'], 'test': ['t0']}
  # Every patient in exactly one split, every slice of a split from its own patients.
  seen = {}
  for split, ids in patients.items():
    source = dataset.load_split(data_dir, split)
    assert len(source) == meta['splits'][split]['num_examples']
    ids_read = {_pid(source[i]) for i in range(len(source))}
    assert ids_read == set(ids)
    for pid in ids:
      assert pid not in seen, (pid, split, seen.get(pid))
      seen[pid] = split
  example = dataset.load_split(data_dir, 'train_ct')[0]
  for key, dtype in (('image', np.float32), ('paired', np.float32), ('mask', np.uint8),
                     ('label', np.uint8)):
    assert example[key].shape == (SIZE, SIZE) and example[key].dtype == dtype, key
  assert 0 <= int(example['slice_index']) < int(example['num_slices'])


def test_slices_equal_preprocessing_of_the_input(data_dir, raw):
  """train_ct slices are the network grid of the input CT, in HU, in slice order."""
  vol = volume.read_volume(os.path.join(raw[1], 'ct1.nii.gz'))
  expected, geom = preprocess.to_network_grid(vol, SPACING, SIZE)
  (ct1,) = [v for v in dataset.iterate_volumes(data_dir, 'train_ct') if v['patient_id'] == 'ct1']
  np.testing.assert_array_equal(ct1['image'], expected)
  np.testing.assert_array_equal(ct1['slice_index'], np.arange(expected.shape[0]))
  assert ct1['image'].max() == 700.0 and ct1['image'].min() == -1000.0
  assert ct1['mask'].any() and not ct1['mask'][:, 0, 0].any()
  saved = dataset.load_geometry(data_dir, 'ct1', 'train_ct')
  assert saved.to_dict() == geom.to_dict()
  assert dataset.load_meta(data_dir)['splits']['train_ct']['patients']['ct1']['num_slices'] == 5


def test_mr_is_normalised_and_labels_stay_integers(data_dir):
  for mr in dataset.iterate_volumes(data_dir, 'train_mr'):
    body = mr['image'][mr['mask'].astype(bool)]
    assert np.percentile(body, 99.5) == pytest.approx(100.0, rel=1e-4)
  (lab,) = list(dataset.iterate_volumes(data_dir, 'labeled'))
  assert set(np.unique(lab['label'])) == {0, 1, 2}
  assert lab['image'][lab['label'] == 1].min() > 300  # labels stay on the bone


def test_paired_test_split(data_dir):
  (t0,) = list(dataset.iterate_volumes(data_dir, 'test'))
  assert t0['paired'].max() == 700.0  # registered CT in HU
  assert t0['image'].max() == pytest.approx(100.0)  # MR in normalised units
  # The CT's field of view ends one slice early: that slice is outside the evaluation mask.
  assert t0['mask'][:-1].any(axis=(1, 2)).all() and not t0['mask'][-1].any()
  assert set(np.unique(t0['label'])) == {0, 1}
  assert dataset.has_split(data_dir, 'test')


def test_optional_splits_are_only_written_with_data(raw, tmp_path, monkeypatch):
  scratch = tmp_path / 'scratch'  # the system temp folder, watched for leftovers
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  out = writer.prepare(raw[0], raw[1], str(tmp_path / 'd'), **KW)
  assert not os.listdir(scratch)  # TFDS's empty metadata folder is not left behind
  assert sorted(dataset.load_meta(out)['splits']) == ['train_ct', 'train_mr']
  assert sorted(tfds_builder.split_sizes(out)) == ['train_ct', 'train_mr']
  assert not dataset.has_split(out, 'test')
  with pytest.raises(dataset.DatasetError, match='no .test. split'):
    dataset.load_split(out, 'test')


def test_a_test_subject_in_a_training_folder_is_an_error(raw, tmp_path):
  mr_dir = tmp_path / 'mr'
  mr_dir.mkdir()
  for name in ('mr0.nii.gz', 'mr1.nii.gz'):
    os.symlink(os.path.join(raw[0], name), mr_dir / name)
  os.symlink(os.path.join(raw[1], 'ct0.nii.gz'), mr_dir / 't0.nii.gz')  # a test subject
  with pytest.raises(dataset.DatasetError) as e:
    writer.prepare(str(mr_dir), raw[1], str(tmp_path / 'd'), paired_dir=raw[3], **KW)
  message = str(e.value)
  assert '\n' not in message and "patient 't0' of the 'test' split" in message
  assert os.path.join(raw[3], 't0_ct.nii.gz') in message and str(mr_dir / 't0.nii.gz') in message
  assert not os.path.exists(tmp_path / 'd')


def test_dicom_series_folder_is_one_patient(raw, tmp_path):
  ct_dir = tmp_path / 'ct'
  ct_dir.mkdir()
  os.symlink(os.path.join(raw[1], 'ct0.nii.gz'), ct_dir / 'ct0.nii.gz')
  synth.write_dicom_ct(str(ct_dir / 'dcm7'), synth.ct_array(7))
  out = writer.prepare(raw[0], str(ct_dir), str(tmp_path / 'd'), **KW)
  assert sorted(dataset.load_meta(out)['splits']['train_ct']['patients']) == ['ct0', 'dcm7']
  expected, _ = preprocess.to_network_grid(volume.read_volume(str(ct_dir / 'dcm7')), SPACING,
                                           SIZE)
  (dcm,) = [v for v in dataset.iterate_volumes(out, 'train_ct') if v['patient_id'] == 'dcm7']
  np.testing.assert_array_equal(dcm['image'], expected)


# ---- Bad input -----------------------------------------------------------------------


def _bad_folder(raw, tmp_path):
  """An MR folder with one good volume and one of each kind of bad file."""
  folder = tmp_path / 'mr_bad'
  folder.mkdir()
  os.symlink(os.path.join(raw[0], 'mr0.nii.gz'), folder / 'good.nii.gz')
  (folder / 'notes.txt').write_text('not an image', encoding='utf-8')
  (folder / 'corrupt.nii.gz').write_bytes(b'\x1f\x8b\x08\x00garbage' * 10)
  aff = synth.affine(synth.MR_SPACING)
  synth.write(str(folder / 'flat.nii.gz'), np.ones((8, 8)), aff)
  synth.write(str(folder / 'series.nii.gz'), np.ones((8, 8, 4, 3)), aff)
  synth.write(str(folder / 'nan.nii.gz'), np.full((8, 8, 4), np.nan), aff)
  return folder


def test_bad_files_are_skipped_with_one_line_each(raw, tmp_path, caplog):
  folder = _bad_folder(raw, tmp_path)
  ct_dir = tmp_path / 'ct_bad'
  ct_dir.mkdir()
  os.symlink(os.path.join(raw[1], 'ct0.nii.gz'), ct_dir / 'ct0.nii.gz')
  synth.write(str(ct_dir / 'png_export.nii.gz'), np.clip(synth.ct_array(1) + 1000, 0, 255) / 4,
              synth.affine(synth.CT_SPACING), np.uint8)
  with caplog.at_level(logging.WARNING):
    out = writer.prepare(str(folder), str(ct_dir), str(tmp_path / 'd'), **KW)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for name, why in (('notes.txt', 'not a volume'), ('corrupt.nii.gz', 'cannot read'),
                    ('flat.nii.gz', '3-D'), ('series.nii.gz', '3-D'), ('nan.nii.gz', 'NaN'),
                    ('png_export.nii.gz', 'Hounsfield')):
    lines = [w for w in warnings if name in w]
    assert len(lines) == 1 and why in lines[0] and '\n' not in lines[0], (name, warnings)
    assert lines[0].startswith(str(folder if name != 'png_export.nii.gz' else ct_dir))
  meta = dataset.load_meta(out)
  assert list(meta['splits']['train_mr']['patients']) == ['good']
  assert list(meta['splits']['train_ct']['patients']) == ['ct0']
  assert len(meta['skipped']) == 6


def test_missing_and_empty_folders(raw, tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(dataset.DatasetError, match=f'{missing}: no such folder'):
    writer.prepare(missing, raw[1], str(tmp_path / 'd'), **KW)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(dataset.DatasetError, match=f'{empty}: empty folder'):
    writer.prepare(raw[0], str(empty), str(tmp_path / 'd'), **KW)
  assert sorted(os.listdir(tmp_path)) == ['empty']


def test_no_usable_volume_leaves_nothing_behind(raw, tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'a.txt').write_text('x', encoding='utf-8')
  out = tmp_path / 'd'
  with pytest.raises(dataset.DatasetError, match='no usable MR volume'):
    writer.prepare(str(bad), raw[1], str(out), **KW)
  assert sorted(os.listdir(tmp_path)) == ['bad']  # no out dir, no .tmp-* dir


def test_existing_output_needs_overwrite(raw, tmp_path):
  out = str(tmp_path / 'd')
  writer.prepare(raw[0], raw[1], out, **KW)
  with pytest.raises(dataset.DatasetError, match='already exists'):
    writer.prepare(raw[0], raw[1], out, **KW)
  writer.prepare(raw[0], raw[1], out, **dict(KW, image_size=16), overwrite=True)
  assert dataset.load_meta(out)['image_size'] == 16
  assert sorted(os.listdir(tmp_path)) == ['d']


def test_incomplete_labeled_and_paired_files_are_skipped(raw, tmp_path, caplog):
  lab = tmp_path / 'lab'
  lab.mkdir()
  os.symlink(os.path.join(raw[2], 'lab0_ct.nii.gz'), lab / 'lab0_ct.nii.gz')  # no label
  os.symlink(os.path.join(raw[2], 'lab0_label.nii.gz'), lab / 'x_seg.nii.gz')  # bad role
  out = writer.prepare(raw[0], raw[1], str(tmp_path / 'd'), labeled_dir=str(lab), **KW)
  assert 'labeled' not in dataset.load_meta(out)['splits']
  assert 'has no label file' in caplog.text and 'x_seg.nii.gz: name is not' in caplog.text


# ---- Phantom and command line ---------------------------------------------------------


def test_prepare_phantom_is_idempotent(test_config, tmp_path):
  data_dir = writer.prepare_phantom(str(tmp_path / 'ph'), test_config)
  meta = dataset.load_meta(data_dir)
  p = test_config.data.phantom
  assert len(meta['splits']['train_mr']['patients']) == p.num_train_mr
  assert len(meta['splits']['train_ct']['patients']) == p.num_train_ct
  assert sorted(meta['splits']) == ['labeled', 'test', 'train_ct', 'train_mr']
  stamp = os.path.join(tmp_path, 'ph', writer.PHANTOM_STAMP)
  mtime = os.path.getmtime(os.path.join(data_dir, dataset.META_FILE))
  assert writer.prepare_phantom(str(tmp_path / 'ph'), test_config) == data_dir
  assert os.path.getmtime(os.path.join(data_dir, dataset.META_FILE)) == mtime  # reused
  other = ml_collections.ConfigDict(test_config.to_dict())
  other.data.image_size = 16
  writer.prepare_phantom(str(tmp_path / 'ph'), other)  # parameters changed: rebuilt
  assert dataset.load_meta(data_dir)['image_size'] == 16
  with open(stamp, encoding='utf-8') as f:
    assert json.load(f)['image_size'] == 16


def test_prepare_cli_on_phantom(tmp_path):
  raw = tmp_path / 'raw'
  from mr2ct_jax.data.phantom import cohort as phantom  # pylint: disable=g-import-not-at-top
  phantom.generate(str(raw), num_train_mr=1, num_train_ct=1, num_labeled=1, num_test=1,
                   num_slices=4, seed=0)
  (raw / 'mr' / 'README.txt').write_text('not an image', encoding='utf-8')
  out = tmp_path / 'data'
  cmd = [sys.executable, '-m', 'mr2ct_jax.data.prepare', '--config=configs/gc.py:test',
         f'--mr_dir={raw / "mr"}', f'--ct_dir={raw / "ct"}', f'--labeled_dir={raw / "labeled"}',
         f'--paired_dir={raw / "paired"}', f'--out={out}']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, encoding='utf-8', timeout=300)
  assert result.returncode == 0, result.stderr
  assert f'{raw / "mr" / "README.txt"}: not a volume' in result.stderr
  assert 'prepared 1 MR, 1 CT volumes, 1 labeled CT, 1 paired test subjects; skipped 1' in (
      result.stderr)
  assert dataset.load_meta(str(out))['image_size'] == 32
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, encoding='utf-8', timeout=300)
  assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
      f'error: {out}: already exists (pass --overwrite to replace it)')
  help_text = subprocess.run([sys.executable, '-m', 'mr2ct_jax.data.prepare', '--help'],
                             cwd=REPO, capture_output=True, encoding='utf-8', timeout=120).stdout
  assert '<id>_ct.nii.gz + <id>_label.nii.gz' in help_text and '--paired_dir' in help_text
