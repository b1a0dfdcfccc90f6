"""Validation while training: val/* scalars and the panel in TensorBoard, resume still exact."""

import jax
import numpy as np
import pytest

from mr2ct_jax import config_checks
from mr2ct_jax.data import dataset
from mr2ct_jax.data import writer
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.inference import generators
from mr2ct_jax.training import loop
from mr2ct_jax.training import state as state_lib
from mr2ct_jax.training import validation

NUM_STEPS = 4


def _config(test_config, data_dir, every=2):
  config = test_config.copy_and_resolve_references()
  config.data.phantom.num_val = 1
  config.data.dir = data_dir
  config.eval.after_training = False
  config.eval.every = every
  config.train.num_steps = NUM_STEPS
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, test_config):
  config = test_config.copy_and_resolve_references()
  config.data.phantom.num_val = 1
  return writer.prepare_phantom(str(tmp_path_factory.mktemp('phantom_val')), config)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, test_config, data_dir):
  """An uninterrupted run with validation every 2 steps; records the splits it read."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  read = []
  real = dataset.load_split
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(dataset, 'load_split', lambda d, split, *a, **k: read.append(split) or
                  real(d, split, *a, **k))
    loop.train(_config(test_config, data_dir), str(workdir))
  return workdir, read


def _events(logdir):
  """{tag: {step: value}} for scalars and {tag: {step: (height, width)}} for images."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars, images = {}, {}
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        if value.HasField('image'):
          images.setdefault(value.tag, {})[event.step] = (value.image.height, value.image.width)
        else:
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars, images


def test_validation_scalars_and_panel_in_tensorboard(straight, test_config, data_dir):
  workdir, read = straight
  scalars, images = _events(workdir / 'tb')
  for key in validation.KEYS:
    assert sorted(scalars[f'val/{key}']) == [2, 4], key
  # The panel MR | sCT | CT: three 32-px slices with two 2-px gutters.
  assert images[validation.IMAGE_TAG] == {2: (32, 100), 4: (32, 100)}
  # The step-4 scores are those of the evaluation code on the final G_ct (the test config's
  # windows are the paper's), for the one val subject.
  config = _config(test_config, data_dir)
  sct_fn, _, _ = generators.load_generator(str(workdir), 'mr2ct')
  volumes = dataset.with_extent(dataset.iterate_volumes(data_dir, 'val'), data_dir, 'val')
  per_volume, _ = scoring.evaluate_volumes(volumes, sct_fn, None, config)
  assert len(per_volume) == 1 and per_volume[0]['mae_hu'] > 1.0
  for key in validation.KEYS:
    np.testing.assert_allclose(scalars[f'val/{key}'][4], per_volume[0][key], rtol=1e-4,
                               err_msg=key)
  assert scalars['val/mae_hu'][2] != scalars['val/mae_hu'][4]  # scored with the params of then
  # Training read its training splits and the val split, never the test split.
  assert 'val' in read and 'test' not in read, read


def test_resumed_run_with_validation_equals_the_uninterrupted_one(straight, test_config,
                                                                  data_dir, tmp_path, capsys):
  workdir = tmp_path / 'resumed'
  config = _config(test_config, data_dir)
  loop.train(config, str(workdir), stop_after=2)  # pre-empted after step 2 and its validation
  loop.train(config, str(workdir))
  out = capsys.readouterr().out
  assert 'Resumed from' in out and 'step 4 validation (1 subjects): mae_hu=' in out
  a, step_a = generators.restore_all_params(str(straight[0]))
  b, step_b = generators.restore_all_params(str(workdir))
  assert step_a == step_b == NUM_STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # Both halves validated: the resumed run's events hold step 2 and step 4.
  scalars, _ = _events(workdir / 'tb')
  assert sorted(scalars['val/mae_hu']) == [2, 4]
  straight_scalars, _ = _events(straight[0] / 'tb')
  assert scalars['val/mae_hu'] == straight_scalars['val/mae_hu']


def test_without_a_val_split_validation_is_skipped_with_one_line(test_config, data_dir,
                                                                 monkeypatch, capsys):
  config = _config(test_config, data_dir)
  gan = state_lib.build(config)
  real = dataset.has_split
  monkeypatch.setattr(dataset, 'has_split', lambda d, split: split != 'val' and real(d, split))
  validator = validation.Validator(config, data_dir, gan.generator)
  assert not validator.active and not validator.due(2)
  lines = capsys.readouterr().out.splitlines()
  assert lines == [f"{data_dir}: no 'val' split (prepare --val_dir); validation while "
                   'training skipped.']
  # Off (eval.every = 0): nothing loaded, nothing said.
  off = validation.Validator(_config(test_config, data_dir, every=0), data_dir, gan.generator)
  assert not off.active and capsys.readouterr().out == ''


def test_mean_scores_leave_out_infinite_psnr():
  rows = [{'mae_hu': 10.0, 'mae_255': 2.0, 'psnr_255': float('inf'), 'ssim': 0.5,
           'mi_mr_sct': 0.25},
          {'mae_hu': 30.0, 'mae_255': 4.0, 'psnr_255': 20.0, 'ssim': 0.7, 'mi_mr_sct': 0.75}]
  want = {'val/mae_hu': 20.0, 'val/mae_255': 3.0, 'val/psnr_255': 20.0, 'val/ssim': 0.6,
          'val/mi_mr_sct': 0.5}
  assert validation.mean_scores(rows) == pytest.approx(want, rel=1e-12)


def test_bad_eval_every_is_named(test_config):
  config = test_config.copy_and_resolve_references()
  config.eval.every = -1
  with pytest.raises(config_checks.ConfigError, match='eval.every'):
    config_checks.validate(config, num_devices=8)
