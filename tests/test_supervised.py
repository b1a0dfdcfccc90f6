"""The paired supervised reference: pairs from the phantom, L1 training, export, evaluation."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax.data import dataset
from mr2ct_jax.data import pipeline
from mr2ct_jax.experiments import supervised
from mr2ct_jax.inference import numpy_generator


@pytest.fixture(scope='module')
def config(test_config):
  config = ml_collections.ConfigDict(test_config.to_dict())
  config.train.num_steps = 30
  config.train.log_every = 10
  config.optim.lr = 2e-3
  return config


@pytest.fixture(scope='module')
def run_dir(config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sup'))
  supervised.run(config, workdir)
  return workdir


def test_pairs_are_the_runs_training_mr_subjects_with_their_ct(run_dir, config):
  pairs = os.path.join(run_dir, supervised.PAIRED_DIR, 'data')
  meta = dataset.load_meta(pairs)
  # The test config's phantom: training MR subjects phantom000-001, CT 002-003.
  assert sorted(meta['splits']['test']['patients']) == ['phantom000', 'phantom001']
  mr, ct, patients = supervised.paired_slices(pairs, config)
  assert patients == ['phantom000', 'phantom001']
  assert mr.shape == ct.shape and mr.shape[1:] == (32, 32)
  assert mr.dtype == ct.dtype == np.float32
  assert -1.0 <= mr.min() and mr.max() <= 1.0 and -1.0 <= ct.min() and ct.max() <= 1.0
  # The MR of a pair is the very MR the CycleGAN trains on (same subject, grid and noise).
  main = os.path.join(run_dir, 'phantom', 'data')
  trained_on = np.stack([e['image'] for e in dataset.load_split(main, 'train_mr',
                                                               patients=['phantom000'])])
  paired = next(dataset.iterate_volumes(pairs, 'test'))
  assert paired['patient_id'] == 'phantom000'
  np.testing.assert_array_equal(paired['image'], trained_on)


def test_training_lowers_the_l1_and_the_export_is_evaluated(run_dir, config):
  export = numpy_generator.read_export(os.path.join(run_dir, supervised.EXPORT_FILE))
  assert list(export.params) == ['g_ct']
  assert export.meta['supervised_on'] == ['phantom000', 'phantom001']
  assert export.meta['step'] == config.train.num_steps
  with open(os.path.join(run_dir, 'eval', 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  mae = summary['metrics']['mae_hu']
  assert summary['patients'] == ['phantom005'] and mae['n'] == 1 and np.isfinite(mae['mean'])
  # The L1 on the training pairs: the trained G_ct against its initialisation.
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  mr, ct, _ = supervised.paired_slices(os.path.join(run_dir, supervised.PAIRED_DIR, 'data'),
                                       config)
  gan = state_lib.build(config)
  init = state_lib.init_params(gan, 32, jax.random.PRNGKey(config.seed))['g_ct']
  trained = traverse_util.unflatten_dict(export.params['g_ct'], sep='/')
  l1 = lambda p: float(np.mean(np.abs(
      gan.generator.apply({'params': p}, mr[..., None])[..., 0] - ct)))
  assert l1(trained) < 0.6 * l1(init)


def test_a_finished_run_is_not_retrained(run_dir, config, capsys):
  npz = os.path.join(run_dir, supervised.EXPORT_FILE)
  before = os.stat(npz).st_mtime_ns
  summary = supervised.run(config, run_dir)
  assert os.stat(npz).st_mtime_ns == before
  assert 'MAE in body' in capsys.readouterr().out
  with open(os.path.join(run_dir, 'eval', 'summary.json'), encoding='utf-8') as f:
    assert summary == json.load(f)  # the finished run's summary, as a fresh run returns it
  assert summary['step'] == config.train.num_steps


def test_a_rerun_with_other_steps_trains_and_evaluates_again(run_dir, config, tmp_path):
  workdir = str(tmp_path / 'sup')
  shutil.copytree(run_dir, workdir)
  longer = ml_collections.ConfigDict(config.to_dict())
  longer.train.num_steps = config.train.num_steps + 2
  summary = supervised.run(longer, workdir)
  export = numpy_generator.read_export(os.path.join(workdir, supervised.EXPORT_FILE))
  assert export.meta['step'] == summary['step'] == config.train.num_steps + 2


def test_a_rerun_with_another_model_is_refused(run_dir, config, tmp_path):
  workdir = str(tmp_path / 'sup')
  shutil.copytree(run_dir, workdir)
  wider = ml_collections.ConfigDict(config.to_dict())
  wider.model.ngf = 2 * config.model.ngf
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'config.json: this workdir holds a run with a different config.model'):
    supervised.run(wider, workdir)
  export = numpy_generator.read_export(os.path.join(workdir, supervised.EXPORT_FILE))
  assert export.meta['step'] == config.train.num_steps  # left as it was


def test_pairs_that_are_test_patients_are_refused(run_dir, config):
  data = os.path.join(run_dir, 'phantom', 'data')  # its test split is the evaluated one
  with pytest.raises(supervised.SupervisedError, match="'phantom005' is also a test patient"):
    supervised.paired_slices(data, config, exclude=['phantom005'])
  with pytest.raises(SystemExit, match='error: .*nothing: data dir does not exist'):
    supervised.main(['supervised', '--config=configs/gc.py:test',
                     f'--workdir={os.path.join(run_dir, "other")}',
                     f'--paired_data={os.path.join(run_dir, "nothing")}'])


def test_crop_and_flip_moves_a_pair_together():
  rng = np.random.default_rng(3)
  a = rng.uniform(-1, 1, (16, 16)).astype(np.float32)
  b = (a + 1) / 2 - 1  # keeps the padding value -1
  for seed in range(8):
    x, y = pipeline.crop_and_flip([a, b], 16, 3, True, np.random.default_rng(seed))
    np.testing.assert_allclose(y, (x + 1) / 2 - 1)  # the same crop and flip for both
    single, = pipeline.crop_and_flip([a], 16, 3, True, np.random.default_rng(seed))
    np.testing.assert_array_equal(single, x)  # the unpaired Augment's draw
  assert x.shape == (16, 16, 1)
  with pytest.raises(dataset.DatasetError, match=r'slice of shape \(8, 8\)'):
    pipeline.crop_and_flip([a, a[:8, :8]], 16, 3, True, rng)


def test_with_ema_decay_the_reference_returns_the_parameter_average(run_dir, config):
  # After one update (t = 0) the average is d0 * init + (1 - d0) * params with
  # d0 = min(decay, 1 / 10): the CycleGAN's averaging rule (state.ema_update).
  import jax  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  mr, ct, _ = supervised.paired_slices(os.path.join(run_dir, supervised.PAIRED_DIR, 'data'),
                                       config)
  one_step = ml_collections.ConfigDict(config.to_dict())
  one_step.train.num_steps = 1
  one_step.train.ema_decay = 0.0
  last = supervised.train_generator(one_step, mr, ct)
  one_step.train.ema_decay = 0.999
  average = supervised.train_generator(one_step, mr, ct)
  init = state_lib.init_params(state_lib.build(config), 32,
                               jax.random.PRNGKey(config.seed))['g_ct']
  expected = jax.tree.map(lambda i, p: 0.1 * i + 0.9 * p, init, last)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
               average, expected)
  assert not np.allclose(jax.tree.leaves(average)[0], jax.tree.leaves(last)[0])
