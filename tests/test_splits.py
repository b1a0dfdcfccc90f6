"""Evaluation splits (val, test_mr, test_ct, labeled_mr), the overlap rule, training subsets."""

import json
import os

import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax.data import dataset
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import prepare_volumes
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import resolve
from mr2ct_jax.data import volume
from mr2ct_jax.data import writer
from mr2ct_jax.data.phantom import cohort

import synthetic_volumes as synth
from configs import gc


def tiny_config():
  return gc.get_config('test')


KW = dict(spacing_mm=5.0, image_size=32, mr_percentile=99.5, n4=False)


def _link(src_dir, names, dst_dir, renames=None):
  os.makedirs(dst_dir, exist_ok=True)
  for name in names:
    os.symlink(os.path.join(src_dir, name), os.path.join(dst_dir, (renames or {}).get(name, name)))
  return str(dst_dir)


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp('raw')
  dirs = synth.make(str(root), num_mr=3, num_ct=4, num_labeled=2, num_test=2)
  # Unpaired test volumes, a labeled MR and a validation pair, each of other subjects.
  write = synth.write
  for d in ('test_mr', 'test_ct', 'labeled_mr', 'val'):
    os.makedirs(root / d)
  write(f'{root}/test_mr/u0.nii.gz', synth.mr_array(40), synth.affine(synth.MR_SPACING),
        np.uint16)
  write(f'{root}/test_ct/u1.nii.gz', synth.ct_array(41), synth.affine(synth.CT_SPACING, True),
        np.int16)
  write(f'{root}/test_ct/u2.nii.gz', synth.ct_array(42), synth.affine(synth.CT_SPACING, True),
        np.int16)
  mr = synth.mr_array(43)
  label = np.zeros(synth.SHAPE, np.uint8)
  label[10:20, 10:20, :] = 3
  write(f'{root}/labeled_mr/lm0_mr.nii.gz', mr, synth.affine(synth.MR_SPACING), np.uint16)
  write(f'{root}/labeled_mr/lm0_label.nii.gz', label, synth.affine(synth.MR_SPACING), np.uint8)
  # The second paired subject becomes the validation subject v1.
  for role in ('mr', 'ct', 'mask', 'label'):
    os.rename(os.path.join(dirs[3], f't1_{role}.nii.gz'), root / 'val' / f'v1_{role}.nii.gz')
  return {'mr': dirs[0], 'ct': dirs[1], 'labeled': dirs[2], 'paired': dirs[3],
          **{d: str(root / d) for d in ('test_mr', 'test_ct', 'labeled_mr', 'val')}}


def _prepare(raw, out, **dirs):
  args = dict(labeled_dir=raw['labeled'], paired_dir=raw['paired'], val_dir=raw['val'],
              test_mr_dir=raw['test_mr'], test_ct_dir=raw['test_ct'],
              labeled_mr_dir=raw['labeled_mr'])
  args.update(dirs)
  return writer.prepare(raw['mr'], raw['ct'], str(out), **args, **KW)


@pytest.fixture(scope='module')
def data_dir(raw, tmp_path_factory):
  return _prepare(raw, tmp_path_factory.mktemp('p') / 'data')


def test_every_split_is_prepared_with_its_arrays(data_dir, raw):
  meta = dataset.load_meta(data_dir)
  patients = {s: sorted(v['patients']) for s, v in meta['splits'].items()}
  assert patients == {'train_mr': ['mr0', 'mr1', 'mr2'], 'train_ct': ['ct0', 'ct1', 'ct2', 'ct3'],
                      'labeled': ['lab0', 'lab1'], 'test': ['t0'], 'val': ['v1'],
                      'test_mr': ['u0'], 'test_ct': ['u1', 'u2'], 'labeled_mr': ['lm0']}
  (u0,) = dataset.iterate_volumes(data_dir, 'test_mr')
  expected, _ = preprocess.to_network_grid(
      volume.read_volume(os.path.join(raw['test_mr'], 'u0.nii.gz')), 5.0, 32)
  assert u0['image'].shape == expected.shape and u0['mask'].any()
  assert u0['image'].max() > 50  # normalised MR (percentile -> 100), not raw intensities
  u1, _ = dataset.iterate_volumes(data_dir, 'test_ct')
  np.testing.assert_array_equal(u1['image'], preprocess.to_network_grid(
      volume.read_volume(os.path.join(raw['test_ct'], 'u1.nii.gz')), 5.0, 32, -1024.0)[0])
  (lm0,) = dataset.iterate_volumes(data_dir, 'labeled_mr')
  assert set(np.unique(lm0['label'])) == {0, 3} and lm0['image'].max() > 50
  (v1,) = dataset.iterate_volumes(data_dir, 'val')
  (t0,) = dataset.iterate_volumes(data_dir, 'test')
  assert v1['paired'].max() == 700.0 and v1['mask'].any() and t0['paired'].max() == 700.0
  geom = dataset.load_geometry(data_dir, 'u1', 'test_ct')
  assert geom.to_dict() == preprocess.to_network_grid(volume.read_volume(
      os.path.join(raw['test_ct'], 'u1.nii.gz')), 5.0, 32)[1].to_dict()


def test_training_splits_may_share_patients(raw, tmp_path):
  """A labeled CT that is also an unlabeled CT, and the MR and CT of one patient, all train;
  each keeps its own geometry."""
  ct_dir = _link(raw['ct'], ['ct0.nii.gz'], tmp_path / 'ct')
  os.symlink(os.path.join(raw['labeled'], 'lab0_ct.nii.gz'), os.path.join(ct_dir, 'lab0.nii.gz'))
  os.symlink(os.path.join(raw['ct'], 'ct1.nii.gz'), os.path.join(ct_dir, 'mr0.nii.gz'))
  out = writer.prepare(raw['mr'], ct_dir, str(tmp_path / 'd'), labeled_dir=raw['labeled'], **KW)
  meta = dataset.load_meta(out)
  assert sorted(meta['splits']['train_ct']['patients']) == ['ct0', 'lab0', 'mr0']
  assert 'mr0' in meta['splits']['train_mr']['patients']
  assert 'lab0' in meta['splits']['labeled']['patients']
  mr_geom = dataset.load_geometry(out, 'mr0', 'train_mr')
  ct_geom = dataset.load_geometry(out, 'mr0', 'train_ct')
  assert mr_geom.to_dict() != ct_geom.to_dict()  # MR and CT grids differ
  assert meta['skipped'] == []


@pytest.mark.parametrize('split,flag', [('test_mr', 'test_mr_dir'), ('test_ct', 'test_ct_dir'),
                                        ('labeled_mr', 'labeled_mr_dir'), ('val', 'val_dir')])
def test_an_evaluation_subject_in_training_is_a_one_line_error(raw, tmp_path, split, flag):
  src = {'test_mr': (raw['test_mr'], 'u0.nii.gz'), 'test_ct': (raw['test_ct'], 'u1.nii.gz'),
         'labeled_mr': (raw['labeled_mr'], 'lm0_mr.nii.gz'),
         'val': (raw['val'], 'v1_mr.nii.gz')}[split]
  pid = src[1].split('_')[0].split('.')[0]
  train = 'ct' if split == 'test_ct' else 'mr'
  folder = _link(raw[train], sorted(os.listdir(raw[train])), tmp_path / train)
  os.symlink(os.path.join(*src), os.path.join(folder, f'{pid}.nii.gz'))
  mr_dir, ct_dir = (folder, raw['ct']) if train == 'mr' else (raw['mr'], folder)
  with pytest.raises(dataset.DatasetError) as e:
    writer.prepare(mr_dir, ct_dir, str(tmp_path / 'd'), **{flag: src[0]}, **KW)
  message = str(e.value)
  assert '\n' not in message
  assert f"patient {pid!r} of the {split!r} split (--{flag})" in message
  assert os.path.join(folder, f'{pid}.nii.gz') in message
  assert f'train_{train}' in message and not os.path.exists(tmp_path / 'd')


def test_a_validation_subject_that_is_a_test_subject_is_an_error(raw, tmp_path):
  val = _link(raw['paired'], sorted(os.listdir(raw['paired'])), tmp_path / 'val')
  with pytest.raises(dataset.DatasetError, match=r"patient 't0' of the 'val' split .* 'test'"):
    writer.prepare(raw['mr'], raw['ct'], str(tmp_path / 'd'), paired_dir=raw['paired'],
                   val_dir=val, **KW)


def test_a_labeled_mr_whose_label_grid_differs_is_a_one_line_error(raw, tmp_path):
  folder = _link(raw['labeled_mr'], ['lm0_mr.nii.gz'], tmp_path / 'lmr')
  synth.write(os.path.join(folder, 'lm0_label.nii.gz'), np.zeros((20, 36, 5), np.uint8),
              synth.affine(synth.MR_SPACING), np.uint8)
  with pytest.raises(dataset.DatasetError) as e:
    writer.prepare(raw['mr'], raw['ct'], str(tmp_path / 'd'), labeled_mr_dir=folder, **KW)
  message = str(e.value)
  assert '\n' not in message and not os.path.exists(tmp_path / 'd')
  assert message.startswith(os.path.join(folder, 'lm0_label.nii.gz') + ': label map is not on')
  assert '--labeled_mr_dir' in message


def test_a_labeled_ct_whose_label_grid_differs_is_skipped(raw, tmp_path):
  """Training data: the subject is left out with one warning line (as other bad files)."""
  folder = _link(raw['labeled'], ['lab0_ct.nii.gz'], tmp_path / 'lab')
  synth.write(os.path.join(folder, 'lab0_label.nii.gz'), np.zeros((20, 36, 5), np.uint8),
              synth.affine(synth.CT_SPACING, True), np.uint8)
  out = writer.prepare(raw['mr'], raw['ct'], str(tmp_path / 'd'), labeled_dir=folder, **KW)
  assert 'labeled' not in dataset.load_meta(out)['splits']
  (line,) = dataset.load_meta(out)['skipped']
  assert line.startswith(os.path.join(folder, 'lab0_label.nii.gz') + ': label map is not on')


# ---- Training subsets ------------------------------------------------------------------


def test_subsets_are_seeded_nested_and_checked():
  meta = {'splits': {'train_mr': {'patients': {f'p{i:02d}': {} for i in range(40)}}}}
  subsets = {n: dataset.training_subset(meta, 'train_mr', n, seed=0) for n in (5, 20, 40)}
  assert len(subsets[5]) == 5 and len(subsets[20]) == 20 and subsets[40] == sorted(
      meta['splits']['train_mr']['patients'])
  assert set(subsets[5]) < set(subsets[20]) < set(subsets[40])
  assert subsets[20] == dataset.training_subset(meta, 'train_mr', 20, seed=0)  # deterministic
  assert subsets[20] != dataset.training_subset(meta, 'train_mr', 20, seed=1)
  assert dataset.training_subset(meta, 'train_mr', 0, seed=3) == subsets[40]
  with pytest.raises(dataset.DatasetError,
                     match=r'^config.data.num_train_mr=41: D has only 40 train_mr patients$'):
    dataset.training_subset(meta, 'train_mr', 41, seed=0, where='D')


def test_a_run_records_its_subset_and_trains_only_on_it(data_dir):
  config = tiny_config()
  config.data.num_train_mr, config.data.num_train_ct = 2, 3
  config = resolve.resolve_training_subset(config, data_dir)
  chosen = config.data.train_patients
  assert len(chosen['train_mr']) == 2 and len(chosen['train_ct']) == 3
  assert set(chosen['train_mr']) <= {'mr0', 'mr1', 'mr2'}
  # Recorded in config.json, and the same again on resume (also from the saved config).
  as_json = json.loads(checkpointing.config_to_json(config))
  assert as_json['data']['train_patients'] == {k: list(v) for k, v in chosen.items()}
  again = resolve.resolve_training_subset(config, data_dir)
  assert again.data.train_patients == chosen
  # The pipeline reads only those patients' slices.
  meta = dataset.load_meta(data_dir)
  expected = sum(meta['splits']['train_mr']['patients'][p]['num_slices']
                 for p in chosen['train_mr'])
  source = dataset.load_split(data_dir, 'train_mr', patients=list(chosen['train_mr']))
  assert len(source) == expected
  assert {ex['patient_id'].decode() for ex in source} == set(chosen['train_mr'])
  with pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                       process_count=1) as it:
    batch = next(it)
  assert batch['mr'].shape[1:] == (32, 32, 1)


def test_a_recorded_subset_that_the_data_no_longer_gives_is_refused(data_dir):
  config = tiny_config()
  config.data.num_train_mr = 2
  config = resolve.resolve_training_subset(config, data_dir)
  config.data.train_patients = {'train_mr': ['mr0', 'nobody'], 'train_ct': ['ct0']}
  with pytest.raises(dataset.DatasetError, match='train_patients lists other patients'):
    resolve.resolve_training_subset(config, data_dir)


def test_negative_subset_sizes_are_config_errors():
  config = tiny_config()
  config.data.num_train_ct = -1
  with pytest.raises(config_checks.ConfigError, match=r'config.data.num_train_ct=-1'):
    config_checks.validate(config, num_devices=1)


def test_the_phantom_prepares_the_new_splits(tmp_path):
  config = tiny_config()
  p = config.data.phantom
  p.num_val, p.num_test_mr, p.num_test_ct, p.num_labeled_mr = 1, 1, 2, 1
  data_dir = writer.prepare_phantom(str(tmp_path / 'phantom'), config)
  meta = dataset.load_meta(data_dir)
  assert {s: len(v['patients']) for s, v in meta['splits'].items()} == {
      'train_mr': 2, 'train_ct': 2, 'labeled': 1, 'test': 1, 'val': 1, 'test_mr': 1,
      'test_ct': 2, 'labeled_mr': 1}
  # The sets after paired/ take new subject indices: the original ones are unchanged.
  assert cohort.split_indices(2, 2, 1, 1, 1, 1, 2, 1) == {
      'mr': [0, 1], 'ct': [2, 3], 'labeled': [4], 'paired': [5], 'val': [6], 'test_mr': [7],
      'test_ct': [8, 9], 'labeled_mr': [10]}
  (lm,) = dataset.iterate_volumes(data_dir, 'labeled_mr')
  assert set(np.unique(lm['label'])) - {0} and lm['mask'].any()


def _paired_with(raw, tmp_path, edit):
  """A copy (links) of the paired folder whose subject t1 `edit` breaks; the folder."""
  folder = _link(raw['paired'], [n for n in sorted(os.listdir(raw['paired']))
                                 if n.startswith('t0_')], tmp_path / 'paired')
  edit(folder)
  return folder


def _write_t1(raw, folder, roles, **replace):
  """Subject t1 in `folder`: the validation subject's files of `roles`, arrays of others."""
  for role in roles:
    os.symlink(os.path.join(raw['val'], f'v1_{role}.nii.gz'),
               os.path.join(folder, f't1_{role}.nii.gz'))
  for role, array in replace.items():
    synth.write(os.path.join(folder, f't1_{role}.nii.gz'), array, synth.affine(synth.MR_SPACING),
                array.dtype)


@pytest.mark.parametrize('case,match', [
    ('no ct', r"t1_mr.nii.gz: patient 't1' has no ct file \(<id>_ct.nii.gz\)"),
    ('fractional label', r't1_label.nii.gz: a label map must hold integers in \[0, 255\]'),
    ('empty mask', r't1_mask.nii.gz: empty evaluation mask'),
    ('misnamed', r't1_seg.nii.gz: name is not <id>_<role>'),
])
def test_an_unusable_evaluation_subject_stops_prepare(raw, tmp_path, case, match):
  # Skipped with a warning, the test split would quietly hold one subject fewer.
  shape = synth.SHAPE
  edits = {
      'no ct': lambda f: _write_t1(raw, f, ['mr']),
      'fractional label': lambda f: _write_t1(raw, f, ['mr', 'ct', 'mask'],
                                              label=np.full(shape, 0.5, np.float32)),
      'empty mask': lambda f: _write_t1(raw, f, ['mr', 'ct'], mask=np.zeros(shape, np.uint8)),
      'misnamed': lambda f: _write_t1(raw, f, ['mr', 'ct']) or os.symlink(
          os.path.join(raw['val'], 'v1_label.nii.gz'), os.path.join(f, 't1_seg.nii.gz')),
  }
  folder = _paired_with(raw, tmp_path, edits[case])
  with pytest.raises(dataset.DatasetError, match=match) as e:
    writer.prepare(raw['mr'], raw['ct'], str(tmp_path / 'd'), paired_dir=folder, **KW)
  message = str(e.value)
  assert '\n' not in message and not os.path.exists(tmp_path / 'd')
  assert message.endswith('(--paired_dir: an evaluation subject is never left out; fix or '
                          'remove it)') and '; skipped' not in message


def test_files_that_are_not_volumes_in_an_evaluation_folder_are_only_warned_about(raw, tmp_path,
                                                                                  caplog):
  folder = _link(raw['paired'], sorted(os.listdir(raw['paired'])), tmp_path / 'paired')
  (tmp_path / 'paired' / 't0_mr.json').write_text('{}', encoding='utf-8')  # dcm2niix sidecar
  (tmp_path / 'paired' / 'README.txt').write_text('test subjects', encoding='utf-8')
  out = writer.prepare(raw['mr'], raw['ct'], str(tmp_path / 'd'), paired_dir=folder, **KW)
  assert list(dataset.load_meta(out)['splits']['test']['patients']) == ['t0']
  assert 't0_mr.json: not a volume' in caplog.text and 'README.txt: not a volume' in caplog.text


def test_an_off_grid_paired_ct_says_whether_shape_or_affine_differs():
  mr = volume.Volume(np.zeros((4, 5, 3), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]),
                     'mr.nii')
  shifted = np.diag([2.0, 2.0, 3.0, 1.0])
  shifted[0, 3] = 5.0
  cases = [(volume.Volume(np.zeros((4, 5, 2), np.float32), mr.affine, 'ct.nii'),
            r'ct\.nii: not on the grid of mr\.nii \(shape \(4, 5, 2\) vs \(4, 5, 3\)\)'),
           (volume.Volume(np.zeros((4, 5, 3), np.float32), shifted, 'ct.nii'),
            r'\(same shape, affines differ by up to 5 \(mm or direction cosines\)\); a paired')]
  for ct, message in cases:
    with pytest.raises(prepare_volumes.Skipped, match=message):
      prepare_volumes.check_same_grid(mr, ct)
  prepare_volumes.check_same_grid(mr, volume.Volume(mr.array, mr.affine + 1e-5, 'ct.nii'))


def _stored_otherwise(path, out):
  """`path` rewritten on the same world grid with x reversed and the S axis first."""
  vol = volume.read_volume(path)
  flip_s_first = np.array([[0, -1, 0, vol.shape[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0],
                           [0, 0, 0, 1]], np.float64)
  stored = np.ascontiguousarray(vol.array[::-1].transpose(2, 0, 1))
  return volume.write_nifti(out, stored, vol.affine @ flip_s_first, np.float32)


def test_a_paired_ct_and_mask_in_another_voxel_order_prepare_and_score_as_the_originals(
    raw, tmp_path):
  # The test subject t0's CT and body mask stored otherwise: the same prepared arrays, and
  # the evaluation's native-grid metrics (which re-read the source files) the same numbers.
  from mr2ct_jax.evaluation import native  # pylint: disable=g-import-not-at-top
  folder = _link(raw['paired'], ['t0_mr.nii.gz', 't0_label.nii.gz'], tmp_path / 'paired')
  for role in ('ct', 'mask'):
    _stored_otherwise(os.path.join(raw['paired'], f't0_{role}.nii.gz'),
                      os.path.join(folder, f't0_{role}.nii.gz'))
  original = _link(raw['paired'], [n for n in os.listdir(raw['paired']) if n.startswith('t0_')],
                   tmp_path / 'original')
  dirs = [writer.prepare(raw['mr'], raw['ct'], str(tmp_path / name), paired_dir=paired, **KW)
          for name, paired in (('d_other', folder), ('d_original', original))]
  splits = [dataset.load_split(d, 'test') for d in dirs]
  assert len(splits[0]) == len(splits[1]) > 0
  for a, b in zip(*([s[i] for i in range(len(s))] for s in splits)):
    for key in ('image', 'paired', 'mask', 'label'):
      np.testing.assert_array_equal(a[key], b[key])
  metrics = [native.patient_metrics(native.recorded_files(dataset.load_meta(d), 'test', 't0'),
                                    lambda x: -np.asarray(x), tiny_config()) for d in dirs]
  assert metrics[0] == pytest.approx(metrics[1], nan_ok=True)
  assert not np.isnan(metrics[0]['synthrad_mae'])


def test_a_paired_ct_of_the_mr_grid_in_another_voxel_order_is_reordered_onto_it():
  mr = volume.Volume(np.zeros((4, 5, 3), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]), 'mr.nii')
  ct_on_mr = np.arange(60, dtype=np.float32).reshape(4, 5, 3)
  # Stored LPS (x and y reversed) and with the S axis first: the same world grid.
  lps_s_first = np.diag([2.0, 2.0, 3.0, 1.0]) @ np.array(
      [[0, -1, 0, 3], [0, 0, -1, 4], [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)
  stored = np.ascontiguousarray(ct_on_mr[::-1, ::-1].transpose(2, 0, 1))
  ct = prepare_volumes.check_same_grid(mr, volume.Volume(stored, lps_s_first, 'ct.nii'))
  np.testing.assert_array_equal(ct.array, ct_on_mr)
  np.testing.assert_array_equal(ct.affine, mr.affine)
  assert ct.path == 'ct.nii'
  # One voxel larger along x in the world: another grid, refused as before.
  with pytest.raises(prepare_volumes.Skipped, match='not on the grid of mr.nii'):
    prepare_volumes.check_same_grid(mr, volume.Volume(stored, lps_s_first * [[1.1], [1], [1],
                                                                             [1]], 'ct.nii'))
