"""Segmentation via synthesis: Dice, U-Net, losses, sampler, training, the CLI end to end."""

import json
import math
import re
import os
import signal
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax import preemption
from mr2ct_jax import config_checks
from mr2ct_jax.evaluation import reports
from mr2ct_jax.models import unet
from mr2ct_jax.segmentation import __main__ as seg_cli
from mr2ct_jax.segmentation import run as seg_run
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import dice
from mr2ct_jax.segmentation import losses
from mr2ct_jax.segmentation import train as seg_train
from mr2ct_jax import parallel
from mr2ct_jax.data import writer

import tiny_run

PROG = 'mr2ct_jax.segmentation'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---- Dice ------------------------------------------------------------------------------


def test_dice_pinned_values():
  a = np.zeros((2, 4, 4), np.uint8)
  a[0, :2, :2] = 1  # 4 voxels of label 1
  a[1, 0, 0] = 2
  assert dice.dice(a, a, 1) == 1.0 and dice.dice(a, a, 2) == 1.0
  b = np.zeros_like(a)
  b[0, 2:, 2:] = 1  # disjoint from a's label 1
  assert dice.dice(a, b, 1) == 0.0
  c = np.zeros_like(a)
  c[0, :2, 1:3] = 1  # 4 voxels, 2 shared with a: 2 * 2 / (4 + 4)
  assert dice.dice(c, a, 1) == pytest.approx(0.5)
  d = np.zeros_like(a)
  d[0, 0, :3] = 1  # 3 voxels, 2 shared: 2 * 2 / (3 + 4)
  assert dice.dice(d, a, 1) == pytest.approx(4 / 7)
  # Absent from both: undefined (NaN, left out of means); present in one only: 0.
  assert math.isnan(dice.dice(a, a, 3))
  assert dice.dice(a, np.zeros_like(a), 2) == 0.0
  assert dice.dice(np.zeros_like(a), a, 2) == 0.0
  scores = dice.dice_per_label(c, a, {1: 'pelvis', 2: 'femur'})
  assert scores['pelvis'] == pytest.approx(0.5) and scores['femur'] == 0.0
  with pytest.raises(ValueError, match='shape'):
    dice.dice(a, a[0], 1)


# ---- Config ----------------------------------------------------------------------------


def test_seg_config_defaults_and_checks():
  from configs import gc  # pylint: disable=g-import-not-at-top
  seg = gc.get_config().seg  # the paper: 64 filters, 4 poolings, Adam 1e-4 for 1e5 steps
  # Classes from the labeled data, names from the phantom's table, 5 folds for the baseline.
  assert (seg.base_filters, seg.depth, seg.num_classes) == (64, 4, None)
  assert (seg.label_table, seg.baseline_folds) == (None, 5)
  assert (seg.lr, seg.num_steps, seg.dice_loss_weight) == (1e-4, 100_000, 0.0)
  for key, value, message in [('depth', 6, 'config.seg.depth=6: 2**depth must divide'),
                              ('num_classes', 1, 'config.seg.num_classes=1'),
                              ('baseline_folds', 1, 'config.seg.baseline_folds=1'),
                              ('lr', 0.0, 'config.seg.lr=0.0'),
                              ('dice_loss_weight', -1.0, 'config.seg.dice_loss_weight'),
                              ('batch_size', 0, 'config.seg.batch_size=0'),
                              ('dtype', 'float64', 'config.seg.dtype')]:
    config = gc.get_config('test')
    config.seg[key] = value
    with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
      config_checks.validate(config)
  config = gc.get_config('test')
  config.seg.batch_size = 6
  with pytest.raises(config_checks.ConfigError, match=r'seg.batch_size=6: .* devices \(8\)'):
    seg_train.check_batch(config, 8, 1)


# ---- U-Net and losses -------------------------------------------------------------------


def test_unet_param_count_and_shapes():
  x = jax.ShapeDtypeStruct((3, 32, 32, 2), jnp.float32)
  # Ronneberger's U-Net (1 channel in, 2 classes, 64 filters, 4 poolings, padded convs).
  paper = unet.UNet(num_classes=2, base_filters=64, depth=4, in_channels=1)
  shapes = jax.eval_shape(paper.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  assert _count(shapes) == unet.param_count(1, 2, 64, 4) == 31_030_658
  for classes, filters, depth in ((5, 4, 2), (5, 8, 3), (3, 2, 1)):
    model = unet.UNet(num_classes=classes, base_filters=filters, depth=depth)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert _count(variables) == unet.param_count(2, classes, filters, depth)
    out = jax.eval_shape(model.apply, variables, x)
    assert out.shape == (3, 32, 32, classes) and out.dtype == jnp.float32
  half = unet.UNet(num_classes=5, base_filters=4, depth=2, dtype=jnp.bfloat16)
  variables = jax.eval_shape(half.init, jax.random.PRNGKey(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))  # params stay fp32
  assert jax.eval_shape(half.apply, variables, x).dtype == jnp.float32
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(half.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 30, 30, 2), jnp.float32))
  with pytest.raises(ValueError, match=r'\[B, H, W, 2\]'):
    jax.eval_shape(half.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))


def test_init_params_is_he_normal(test_config):
  model = seg_train.build(test_config.seg).model
  params = seg_train.init_params(model, 32, seed=0)
  assert _count(params) == unet.param_count(2, 5, 4, 2)
  kernel = params['down_1']['conv_1']['kernel']  # 3x3x8 fan-in
  assert kernel.std() == pytest.approx(math.sqrt(2 / 72), rel=0.15)
  assert not params['down_1']['conv_1']['bias'].any()
  again = seg_train.init_params(model, 32, seed=0)
  np.testing.assert_array_equal(again['head']['kernel'], params['head']['kernel'])


def test_losses_pinned():
  labels = jnp.asarray([[[0, 1], [2, 3]]])
  uniform = jnp.zeros((1, 2, 2, 4))
  assert float(losses.cross_entropy(uniform, labels)) == pytest.approx(math.log(4), rel=1e-6)
  perfect = 50.0 * jax.nn.one_hot(labels, 4)
  assert float(losses.cross_entropy(perfect, labels)) < 1e-6
  assert float(losses.soft_dice(perfect, labels)) == pytest.approx(1.0, abs=1e-6)
  # Uniform probabilities 1/4: per class (2 * 1/4 + 1) / (4 * 1/4 + 1 + 1) = 0.5.
  assert float(losses.soft_dice(uniform, labels)) == pytest.approx(0.5, rel=1e-6)
  total, terms = losses.segmentation_loss(uniform, labels, 2.0)
  assert float(total) == pytest.approx(math.log(4) + 2 * 0.5, rel=1e-6)
  assert float(terms['loss/dice']) == pytest.approx(0.5, rel=1e-6)


# ---- Data -------------------------------------------------------------------------------


def _labeled_set(num=6, size=32, seed=0) -> seg_data.LabeledSet:
  """Slices whose CT channel encodes the label (label / 4) and sMR its negative."""
  rng = np.random.default_rng(seed)
  label = np.zeros((num, size, size), np.uint8)
  for i in range(num):
    x, y = rng.integers(4, size - 12, 2)
    label[i, x:x + 8, y:y + 6] = 1 + i % 4
    label[i, x + 2:x + 4, y:y + 3] = 2
  ct = (label / 4).astype(np.float16)
  return seg_data.LabeledSet(ct=ct, smr=-ct, label=label)


def test_sample_batch_is_deterministic_and_consistent():
  labeled = _labeled_set()
  kw = dict(seed=3, batch_size=8, pad=4, flip_lr=True)
  a = seg_data.sample_batch(labeled, step=5, **kw)
  b = seg_data.sample_batch(labeled, step=5, **kw)
  c = seg_data.sample_batch(labeled, step=6, **kw)
  assert a['image'].shape == (8, 32, 32, 2) and a['image'].dtype == np.float32
  assert a['label'].shape == (8, 32, 32) and a['label'].dtype == np.int32
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])
  # Images and labels get the same crop and flip: inside the slice, CT = label / 4.
  inside = a['image'][..., 0] != -1.0
  np.testing.assert_allclose(a['image'][..., 0][inside], a['label'][inside] / 4, atol=1e-3)
  np.testing.assert_array_equal(a['image'][..., 1][inside], -a['image'][..., 0][inside])
  assert (a['label'][~inside] == 0).all()


# ---- Training ---------------------------------------------------------------------------


def test_training_reduces_loss_on_a_fixed_batch(test_config):
  config = test_config  # seg.lr 1e-3; the same jitted step as the CLI test below
  mesh = parallel.make_mesh()  # 8 fake devices: one slice per device
  batch = seg_data.sample_batch(_labeled_set(), seed=0, step=0, batch_size=8, pad=0,
                                flip_lr=False)
  seg_model = seg_train.build(config.seg)
  state = seg_train.create_state(seg_model, config, mesh)
  step_fn = seg_train.make_train_step(seg_model, float(config.seg.dice_loss_weight), mesh)
  sharded = parallel.shard_batch(batch, mesh)
  history = []
  for _ in range(20):
    state, metrics = step_fn(state, sharded)
    history.append(float(metrics['loss/total']))
  assert int(state.step) == 20
  assert all(math.isfinite(v) for v in history)
  # The loss falls steadily (the 4-filter U-Net learns slowly, but every step helps here).
  assert sum(b < a for a, b in zip(history, history[1:])) >= 17, history
  assert history[-1] < 0.9 * history[0], history


# ---- The command end to end -------------------------------------------------------------


@pytest.fixture(scope='module')
def setup(tmp_path_factory, test_config):
  """A tiny CycleGAN workdir (random generators) and the prepared tiny phantom."""
  root = tmp_path_factory.mktemp('seg')
  workdir = str(root / 'run')
  tiny_run.make_workdir(workdir, test_config, step=2)
  data_dir = writer.prepare_phantom(str(root / 'phantom'), test_config)
  return workdir, data_dir, root


def test_cli_end_to_end_and_resume(setup, capsys):
  workdir, data_dir, root = setup
  out = str(root / 'seg')
  assert seg_cli.main([PROG, f'--workdir={workdir}', f'--data={data_dir}', f'--output={out}',
                       '--steps=2']) == 0
  printed = capsys.readouterr().out
  assert '| pelvis |' in printed and 'gluteus minimus' in printed
  assert 'steps/s' in printed and 'ETA' in printed
  ev = os.path.join(out, 'eval')
  assert sorted(os.listdir(ev)) == ['figures', 'per_volume.csv', 'per_volume.json',
                                    'summary.json', 'summary.md']
  (row,) = reports.read_rows_json(os.path.join(ev, 'per_volume.json'))
  for key in ('dice_pelvis', 'dice_femur', 'dice_gluteus_medius', 'dice_gluteus_minimus'):
    assert 0.0 <= row[key] <= 1.0
  figures = sorted(os.listdir(os.path.join(ev, 'figures')))
  assert figures == ['dice_boxplot.png', f"{row['patient_id']}.png"]
  for name in figures:
    with open(os.path.join(ev, 'figures', name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  summary = json.load(open(os.path.join(ev, 'summary.json'), encoding='utf-8'))
  assert summary['unet_step'] == 2 and summary['generator_step'] == 2
  assert summary['dice']['pelvis']['n'] == 1
  assert summary['fingerprint']['patients'] == summary['patients']  # for evaluate --compare
  cache = os.listdir(os.path.join(out, 'cache'))
  assert cache == ['labeled_g2.npz']

  # The evaluation exists: refused without --overwrite, before any work.
  with pytest.raises(SystemExit, match='--overwrite'):
    seg_cli.main([PROG, f'--workdir={workdir}', f'--data={data_dir}', f'--output={out}',
                  '--steps=4'])

  # Resume to step 4 (what the same command with --steps=4 runs before evaluating) equals an
  # uninterrupted run to step 4: batches are a function of the step, Adam's state is restored.
  config = _config_with_steps(workdir, 4)
  labeled = seg_data.load_labeled_set(data_dir, config, None,
                                      cache_path=os.path.join(out, 'cache', 'labeled_g2.npz'),
                                      generator_step=2)  # from the cache: no generator runs
  seg_train.train(config, out, labeled)
  assert 'resumed from' in capsys.readouterr().out
  resumed, step = seg_train.restore_params(out, config)
  assert step == 4
  straight_dir = str(root / 'straight')
  seg_train.train(config, straight_dir, labeled)
  straight, _ = seg_train.restore_params(straight_dir, config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               resumed, straight)
  assert sorted(os.listdir(os.path.join(out, 'checkpoints'))) == ['2', '4']
  assert not [n for n in os.listdir(out) if n.startswith('.eval')]  # no temp dirs left


def test_an_output_is_not_resumed_with_another_workdir_or_training_setting(setup, test_config):
  # Before: accepted silently, the cached sMR of the first workdir's G_mr reused for the
  # second's run and the evaluation labelled with the second workdir.
  workdir, data_dir, root = setup
  out = str(root / 'seg_reuse')
  args = [PROG, f'--data={data_dir}', f'--output={out}', '--steps=2']
  assert seg_cli.main([*args, f'--workdir={workdir}']) == 0
  other = str(root / 'other_run')
  tiny_run.make_workdir(other, test_config, step=2)
  before = open(os.path.join(out, 'run.json'), encoding='utf-8').read()
  with pytest.raises(SystemExit, match=re.escape(
      f"this segmentation run has workdir='{workdir}', not '{other}'")) as exc:
    seg_cli.main([*args, f'--workdir={other}', '--overwrite'])
  assert str(exc.value).startswith('error: ') and '\n' not in str(exc.value)
  faster = test_config.seg.copy_and_resolve_references()
  faster.lr = 0.5
  with pytest.raises(seg_run.SegmentationError,
                     match=re.escape('this segmentation run has seg.lr=0.01, not 0.5')):
    seg_run.run(workdir, data_dir, out, steps=2, overwrite=True, seg_config=faster)
  assert open(os.path.join(out, 'run.json'), encoding='utf-8').read() == before


def test_a_run_refused_on_its_labels_leaves_no_output_folder(setup, test_config):
  # The labeled CT hold labels 1..4: two classes cannot hold them. The sMR cache written
  # before that check used to stay behind in the new output folder.
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  workdir, data_dir, root = setup
  out = root / 'seg_refused'
  too_few = test_config.seg.copy_and_resolve_references()
  too_few.num_classes = 2
  with pytest.raises(config_checks.ConfigError, match='num_classes'):
    seg_run.run(workdir, data_dir, str(out), steps=2, seg_config=too_few)
  assert not out.exists()
  out.mkdir()  # a folder the user made stays, whatever this run wrote in it
  (out / 'mine.txt').write_text('x')
  with pytest.raises(config_checks.ConfigError, match='num_classes'):
    seg_run.run(workdir, data_dir, str(out), steps=2, seg_config=too_few)
  assert (out / 'mine.txt').exists()


def test_sigterm_stops_training_with_a_checkpoint_and_resume_continues(
    setup, tmp_path, monkeypatch):
  workdir, _, _ = setup
  config = _config_with_steps(workdir, 4)
  config.seg.checkpoint_every = 100  # the checkpoint of step 2 is the stop's own
  rng = np.random.default_rng(0)
  shape = (6, 32, 32)
  labeled = seg_data.LabeledSet(ct=rng.uniform(-1, 1, shape).astype(np.float16),
                                smr=rng.uniform(-1, 1, shape).astype(np.float16),
                                label=rng.integers(0, 5, shape).astype(np.uint8))
  real_make = seg_train.make_train_step

  def make_signalling(seg_model, dice_weight, mesh):
    step_fn = real_make(seg_model, dice_weight, mesh)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process
      return state, metrics
    return step

  monkeypatch.setattr(seg_train, 'make_train_step', make_signalling)
  out = str(tmp_path / 'seg')
  with pytest.raises(preemption.Preempted, match='^segmentation training stopped at step 2, '
                     'checkpoint saved; run the same command to resume$'):
    seg_train.train(config, out, labeled)
  assert sorted(os.listdir(os.path.join(out, 'checkpoints'))) == ['2']
  monkeypatch.undo()
  seg_train.train(config, out, labeled)
  resumed, step = seg_train.restore_params(out, config)
  assert step == 4
  seg_train.train(config, str(tmp_path / 'straight'), labeled)
  straight, _ = seg_train.restore_params(str(tmp_path / 'straight'), config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed, straight)


def _config_with_steps(workdir: str, steps: int) -> ml_collections.ConfigDict:
  config = checkpointing.load_config(workdir)
  config.seg.num_steps = steps
  return config


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections loader
def test_cli_errors_are_one_line(setup, tmp_path, capsys):
  workdir, data_dir, _ = setup
  no_labeled = str(tmp_path / 'data')
  shutil.copytree(data_dir, no_labeled)
  meta_path = os.path.join(no_labeled, 'dataset_meta.json')
  meta = json.load(open(meta_path, encoding='utf-8'))
  del meta['splits']['labeled']
  json.dump(meta, open(meta_path, 'w', encoding='utf-8'))
  out = f'--output={tmp_path / "seg"}'
  for argv, message in [
      ([f'--workdir={tmp_path / "nope"}', out], 'nope'),
      ([f'--workdir={workdir}', f'--data={no_labeled}', out], "no 'labeled' split"),
      ([f'--workdir={workdir}', f'--data={tmp_path / "missing"}', out], 'missing'),
      ([f'--workdir={workdir}', f'--data={data_dir}', out, '--steps=0'], 'seg.num_steps'),
      ([f'--workdir={workdir}', out, f'--config={REPO}/configs/gc.py:bogus'], 'unknown variant'),
      ([out], '--workdir is required'),
      (['--bogus'], 'bogus')]:
    with pytest.raises(SystemExit, match=message) as exc:
      seg_cli.main([PROG] + argv)
    assert str(exc.value).startswith('error: ') and '\n' not in str(exc.value)
  assert not os.path.exists(tmp_path / 'seg' / 'checkpoints')
  assert seg_cli.main([PROG, '--help']) == 0
  assert '--workdir' in capsys.readouterr().out
