"""The unpaired grain pipeline: sharding, determinism, state restore, augmentation, errors."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mr2ct_jax.data import intensity
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import dataset
from mr2ct_jax.data import writer

import synthetic_volumes as synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  raw = synth.make(str(tmp_path_factory.mktemp('raw')), num_mr=2, num_ct=3, num_labeled=0,
                   num_test=0)
  return writer.prepare(raw[0], raw[1], str(tmp_path_factory.mktemp('p') / 'data'),
                        spacing_mm=5.0, image_size=32, mr_percentile=99.5, n4=False)


@pytest.fixture
def config(test_config):
  config = ml_collections.ConfigDict(test_config.to_dict())
  config.train.batch_size = 4
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b) == ['ct', 'mr']
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_batches_shape_dtype_and_range(config, data_dir):
  it = pipeline.make_unpaired_iterator(config, data_dir, process_index=0, process_count=1)
  for batch in _take(it, 3):
    for k in ('mr', 'ct'):
      assert batch[k].shape == (4, 32, 32, 1) and batch[k].dtype == np.float32
      assert batch[k].min() >= -1.0 and batch[k].max() <= 1.0
      assert batch[k].min() == -1.0  # background
  assert it.info['local_batch'] == 4 and it.info['pad'] == round(30 / 256 * 32)


def test_state_restore_reproduces_the_next_batches(config, data_dir):
  # Prefetching threads (config.data.prefetch) read ahead: the state must still be exact.
  config.data.prefetch = 3
  it = pipeline.make_unpaired_iterator(config, data_dir, process_index=0, process_count=1)
  _take(it, 5)  # past one epoch of the 10-slice MR shard (batch 4)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 7)
  restored = pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                             process_count=1)
  _take(restored, 2)  # a different position, then restore
  restored.set_state(state)
  _assert_same(_take(restored, 7), expected)
  with pytest.raises(dataset.DatasetError, match='not a version-1'):
    restored.set_state({'streams': {}})


def test_deterministic_from_seed(config, data_dir):
  a = _take(pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                            process_count=1), 4)
  b = _take(pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                            process_count=1), 4)
  _assert_same(a, b)
  config.seed = config.seed + 1
  c = _take(pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                            process_count=1), 4)
  assert not all(np.array_equal(x['mr'], y['mr']) for x, y in zip(a, c))
  # The two streams are independent: the MR order is not the CT order.
  assert _streams_differ(a)


def _streams_differ(batches):
  """MR and CT batches come from different shuffles (their orders are not the same)."""
  return any(not np.array_equal(b['mr'] == -1, b['ct'] == -1) for b in batches)


def test_shards_are_disjoint_and_cover_the_split():
  """4 simulated processes: each reads its own slices, together all of them, once per epoch."""
  n = 23
  source = [{'image': np.full((8, 8), float(i), np.float32)} for i in range(n)]
  window = (0.0, float(n - 1))
  seen = []
  for index in range(4):
    augment = pipeline.Augment('mr', window, size=8, pad=0, flip_lr=False)
    stream = iter(pipeline.make_stream(source, augment, seed=0, batch_size=1,
                                       process_index=index, process_count=4, prefetch=2))
    shard_size = len(range(index, n, 4))
    values = []
    for _ in range(shard_size):
      model = next(stream)[0, 0, 0, 0]
      values.append(int(round(float(intensity.unit_to_mr(intensity.model_to_unit(model),
                                                         window)))))
    assert len(set(values)) == shard_size  # a permutation of the shard in one epoch
    seen.append(set(values))
  for i in range(4):
    for j in range(i + 1, 4):
      assert not seen[i] & seen[j]
  assert set.union(*seen) == set(range(n))


def test_per_process_iterators_split_the_batch(config, data_dir):
  sizes = []
  for index in range(4):
    it = pipeline.make_unpaired_iterator(config, data_dir, process_index=index, process_count=4)
    assert next(it)['mr'].shape == (1, 32, 32, 1)  # local batch = 4 / 4
    sizes.append(it.info['shard_sizes'])
  meta = dataset.load_meta(data_dir)
  for k, split in pipeline.TRAIN_SPLITS.items():
    assert sum(s[k] for s in sizes) == meta['splits'][split]['num_examples']
  with pytest.raises(ValueError, match='config.train.batch_size=4'):
    pipeline.make_unpaired_iterator(config, data_dir, process_index=0, process_count=3)


def test_crop_and_flip():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 100, (16, 16)).astype(np.float32)
  windowed = intensity.mr_to_model(image, (0.0, 100.0))
  plain = pipeline.Augment('mr', (0.0, 100.0), size=16, pad=0, flip_lr=False)
  np.testing.assert_array_equal(plain.random_map({'image': image}, rng)[..., 0], windowed)
  flip = pipeline.Augment('mr', (0.0, 100.0), size=16, pad=0, flip_lr=True)
  outs = [flip.random_map({'image': image}, rng)[..., 0] for _ in range(20)]
  assert all(np.array_equal(o, windowed) or np.array_equal(o, windowed[::-1]) for o in outs)
  assert any(np.array_equal(o, windowed[::-1]) for o in outs)
  crop = pipeline.Augment('mr', (0.0, 100.0), size=16, pad=3, flip_lr=False)
  padded = np.pad(windowed, 3, constant_values=-1.0)
  offsets = set()
  for _ in range(30):
    out = crop.random_map({'image': image}, rng)
    assert out.shape == (16, 16, 1) and out.dtype == np.float32
    match = [(x, y) for x in range(7) for y in range(7)
             if np.array_equal(padded[x:x + 16, y:y + 16], out[..., 0])]
    assert match
    offsets.add(match[0])
  assert len(offsets) > 5


def test_ct_window_is_applied():
  hu = np.array([[-1024.0, -150.0], [100.0, 2000.0]], np.float32)
  paper = pipeline.Augment('ct', (-150.0, 350.0), size=2, pad=0, flip_lr=False)
  out = paper.random_map({'image': hu}, np.random.default_rng(0))[..., 0]
  np.testing.assert_allclose(out, [[-1.0, -1.0], [0.0, 1.0]], atol=1e-6)
  wide = pipeline.Augment('ct', (-1024.0, 2000.0), size=2, pad=0, flip_lr=False)
  out = wide.random_map({'image': hu}, np.random.default_rng(0))[..., 0]
  assert out[0, 0] == -1.0 and out[1, 1] == 1.0 and -1 < out[1, 0] < 1


def test_data_dir_errors(config, data_dir, tmp_path):
  missing = str(tmp_path / 'missing')
  with pytest.raises(dataset.DatasetError, match=f'{missing}: data dir does not exist'):
    pipeline.make_unpaired_iterator(config, missing, process_index=0, process_count=1)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(dataset.DatasetError, match='not a prepared data dir'):
    pipeline.make_unpaired_iterator(config, str(tmp_path / 'empty'), process_index=0,
                                    process_count=1)
  config.data.image_size = 64
  with pytest.raises(dataset.DatasetError,
                     match=r'image_size=32 but config.data.image_size=64'):
    pipeline.make_unpaired_iterator(config, data_dir, process_index=0, process_count=1)


def test_missing_training_split_is_named(config, data_dir, tmp_path):
  meta = dataset.load_meta(data_dir)
  broken = tmp_path / 'broken'
  broken.mkdir()
  del meta['splits']['train_ct']
  (broken / dataset.META_FILE).write_text(json.dumps(meta), encoding='utf-8')
  with pytest.raises(dataset.DatasetError, match=f'{broken}: no train_ct split'):
    pipeline.make_unpaired_iterator(config, str(broken), process_index=0, process_count=1)


def test_bench_pipeline_cli(data_dir, tmp_path):
  output = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'mr2ct_jax.bench', 'pipeline', '--size=32',
       f'--data_dir={data_dir}', '--num_batches=5', '--warmup=1', f'--output={output}'],
      cwd=REPO, capture_output=True, encoding='utf-8', timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['slices_per_s'] > 0 and report['size'] == 32
  assert report['machine']['cpu_count'] >= 1 and report['config']['data']['image_size'] == 32
  bad = subprocess.run([sys.executable, '-m', 'mr2ct_jax.bench', 'nope'], cwd=REPO,
                       capture_output=True, encoding='utf-8', timeout=120)
  assert bad.returncode != 0 and 'usage: python -m mr2ct_jax.bench' in bad.stderr


def test_truncated_record_file_is_a_one_line_dataset_error(data_dir, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(data_dir, broken)
  records = sorted(str(p) for p in broken.rglob('*train_mr.array_record*'))
  assert records
  with open(records[0], 'r+b') as f:
    f.truncate(200)
  with pytest.raises(dataset.DatasetError,
                     match=f"{broken}: the 'train_mr' split cannot be read .*prepare the data "
                           f"again"):
    list(dataset.iterate_volumes(str(broken), 'train_mr'))


def test_record_indices_that_disagree_with_the_records_are_refused(data_dir, tmp_path):
  """Records are written in patient, then slice order, and the meta says where each patient's
  slices are; a meta that points elsewhere must fail, not silently mix patients."""
  broken = tmp_path / 'broken'
  shutil.copytree(data_dir, broken)
  meta = dataset.load_meta(str(broken))
  patients = meta['splits']['train_mr']['patients']
  first = sorted(patients)[0]
  patients[first]['records'] = patients[first]['records'][::-1]
  (broken / dataset.META_FILE).write_text(json.dumps(meta), encoding='utf-8')
  with pytest.raises(dataset.DatasetError, match=f'patient {first} .* disagree, prepare the '
                                                 'data again'):
    list(dataset.iterate_volumes(str(broken), 'train_mr'))
