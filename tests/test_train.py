"""The training loop: end to end through main, resume continues the same run, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax.inference import generators

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_main(workdir, *overrides, check=True):
  """Runs `python -m mr2ct_jax.main` in a fresh process (8 fake CPU devices, via env)."""
  cmd = [sys.executable, '-m', 'mr2ct_jax.main', '--config=configs/gc.py:test',
         f'--workdir={workdir}', *overrides]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, encoding='utf-8', timeout=600,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
  if check and result.returncode != 0:
    raise AssertionError(f'main failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """The `test` config trained end to end (4 steps) through main, with evaluation."""
  workdir = tmp_path_factory.mktemp('run') / 'straight'
  result = _run_main(workdir)
  return workdir, result


def test_main_end_to_end(trained_run):
  workdir, result = trained_run
  assert 'step 4/4' in result.stdout
  assert 'steps/s' in result.stdout and 'ETA' in result.stdout
  config = json.loads((workdir / 'config.json').read_text(encoding='utf-8'))
  assert config['data']['image_size'] == 32
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  events = list((workdir / 'tb').glob('events.out.tfevents.*'))
  assert events, 'no TensorBoard event file'
  # Evaluation after training wrote its report.
  assert (workdir / 'eval' / 'summary.md').exists()


def test_tensorboard_has_losses_and_images(trained_run):
  workdir, _ = trained_run
  scalars, images = _read_event_tags(workdir / 'tb')
  for tag in ('loss/g_total', 'loss/gc', 'loss/cycle', 'loss/d_ct', 'loss/d_mr', 'lr',
              'perf/steps_per_sec'):
    assert tag in scalars
  assert {'samples/mr_to_ct', 'samples/ct_to_mr'} <= images


def _read_event_tags(logdir):
  """(scalar tags, image tags) of TensorBoard event files, read without TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars, images = set(), set()
  for path in logdir.glob('events.out.tfevents.*'):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], 'little')
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        (images if value.HasField('image') else scalars).add(value.tag)
  return scalars, images


def test_resume_continues_the_same_run(trained_run, tmp_path):
  """4 steps straight == 2 steps, then a fresh process restoring and running 2 more."""
  straight_dir, _ = trained_run
  resumed_dir = tmp_path / 'resumed'
  # Pre-empted after step 2 (its checkpoint), then the same command again in a new process.
  code = ('import sys; sys.path.insert(0, %r)\n'
          'from configs import gc\nfrom mr2ct_jax.training import loop as train\n'
          'config = gc.get_config("test")\nconfig.eval.after_training = False\n'
          'train.train(config, %r, stop_after=2)\n') % (str(REPO), str(resumed_dir))
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True, timeout=600)
  assert sorted(os.listdir(resumed_dir / 'checkpoints')) == ['2']
  result = _run_main(resumed_dir, '--config.eval.after_training=False')
  assert 'Resumed from' in result.stdout and 'at step 2' in result.stdout

  straight, step_a = generators.restore_all_params(str(straight_dir))
  resumed, step_b = generators.restore_all_params(str(resumed_dir))
  assert step_a == step_b == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_bad_config_value_is_one_line(tmp_path):
  result = _run_main(tmp_path / 'bad', '--config.loss.gc_weight=-1', check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.loss.gc_weight=-1.0: must be >= 0 (a loss weight)')


def test_unknown_config_key_is_rejected(tmp_path):
  result = _run_main(tmp_path / 'bad', '--config.loss.gc_wieght=0.1', check=False)
  assert result.returncode != 0
  assert 'gc_wieght' in result.stderr


def test_resume_refuses_a_different_model(trained_run, tmp_path):
  workdir, _ = trained_run
  result = _run_main(workdir, '--config.model.ngf=8', check=False)
  assert result.returncode == 1
  assert 'different config.model' in result.stderr


@pytest.mark.parametrize('key, value', [('seed', 1), ('train.batch_size', 16),
                                        ('train.pool_size', 8)])
def test_resume_refuses_another_seed_batch_or_pool_and_leaves_config_json(
    tmp_path, test_config, key, value):
  # Each would not continue the run: another pool size failed in the checkpoint restore
  # (blamed on the files), another seed or batch size resumed silently as another run.
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.save_config(str(tmp_path), test_config)
  before = (tmp_path / 'config.json').read_text(encoding='utf-8')
  changed = test_config.copy_and_resolve_references()
  section, _, field = key.rpartition('.')
  setattr(changed[section] if section else changed, field, value)
  old = test_config[section][field] if section else test_config[field]
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf'config.{key}={old}, not {value}; pass --config.{key}={old} to '
                           'continue it, or use another --workdir'):
    checkpointing.save_config(str(tmp_path), changed)
  assert (tmp_path / 'config.json').read_text(encoding='utf-8') == before
  longer = test_config.copy_and_resolve_references()
  longer.train.num_steps = 10  # the schedule's length may change on resume
  checkpointing.save_config(str(tmp_path), longer)


def test_missing_data_dir_is_named(tmp_path):
  missing = tmp_path / 'no_such_data'
  result = _run_main(tmp_path / 'run', f'--config.data.dir={missing}', check=False)
  assert result.returncode == 1
  assert str(missing) in result.stderr
  assert not (tmp_path / 'run').exists()  # no empty workdir left behind
  (tmp_path / 'mine').mkdir()  # a folder the user made stays, empty or not
  assert _run_main(tmp_path / 'mine', f'--config.data.dir={missing}', check=False).returncode == 1
  assert (tmp_path / 'mine').is_dir()


def test_a_workdir_that_is_a_file_or_lies_under_one_is_a_one_line_config_error(
    tmp_path, test_config):
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine', encoding='utf-8')
  for workdir, message in [(a_file, 'notes.txt: a file, not a folder'),
                           (a_file / 'run', 'notes.txt/run: cannot create it: Not a directory')]:
    with pytest.raises(config_checks.ConfigError, match=message):
      train.train(test_config, str(workdir))
  assert a_file.read_text(encoding='utf-8') == 'mine'  # the user's file is untouched


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A NaN loss at step 3 stops the run naming the step and the term; step 2's checkpoint
  (the last good one) stays and no checkpoint of the bad step is written."""
  from configs import gc  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  real_make = step_lib.make_train_step

  def make_poisoned(gan, config, mesh):
    step_fn = real_make(gan, config, mesh)

    def poisoned(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 3:
        metrics = dict(metrics, **{'loss/g_total': float('nan')})
      return state, metrics
    return poisoned

  monkeypatch.setattr(step_lib, 'make_train_step', make_poisoned)
  config = gc.get_config('test')
  config.train.log_every = 1
  config.eval.after_training = False
  workdir = tmp_path / 'nan'
  with pytest.raises(train.NonFiniteLossError, match=r'^step 3: loss/g_total is nan'):
    train.train(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']


@pytest.mark.parametrize('process_index', [0, 1])
def test_multi_host_phantom_is_built_by_process_0_before_the_others_read_it(
    process_index, test_config, tmp_path, monkeypatch):
  from mr2ct_jax.data import resolve as train_lib  # pylint: disable=g-import-not-at-top
  events = []
  monkeypatch.setattr(train_lib.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(train_lib.jax, 'process_index', lambda: process_index)
  monkeypatch.setattr(train_lib.multihost_utils, 'sync_global_devices',
                      lambda name: events.append('barrier'))
  monkeypatch.setattr(train_lib.writer, 'prepare_phantom',
                      lambda directory, config: events.append(('prepare', directory)) or 'data')
  assert train_lib.resolve_data_dir(test_config, str(tmp_path)) == 'data'
  build = ('prepare', os.path.join(str(tmp_path), 'phantom'))
  # Process 0 builds, then all meet; afterwards every process opens the (finished) build.
  assert events == ([build, 'barrier', build] if process_index == 0 else ['barrier', build])


def test_resume_accepts_another_conv_path(tmp_path, test_config):
  """conv_impl changes how a run computes, not what: resuming may switch it."""
  workdir = str(tmp_path / 'run')
  checkpointing.save_config(workdir, test_config)
  switched = ml_collections.ConfigDict(test_config.to_dict())
  switched.model.conv_impl = 'matmul'
  checkpointing.save_config(workdir, switched)
  assert checkpointing.load_config(workdir).model.conv_impl == 'matmul'
  switched.model.ngf = 8
  with pytest.raises(checkpointing.CheckpointError, match='different config.model'):
    checkpointing.save_config(workdir, switched)
