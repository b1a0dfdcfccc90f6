"""The one batched slice translator, and every caller going through it the same way."""

import numpy as np
import pytest

from mr2ct_jax.data import intensity
from mr2ct_jax.data import volume
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.inference import slices
from mr2ct_jax.inference import volumes
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import evaluate as seg_eval

BATCH = 2
NUM_SLICES = 5  # 3 batches of 2, the last one padded


class Recorder:
  """A per-slice 'generator' (each output slice depends on its input slice only) that keeps
  every batch it is called with."""

  def __init__(self):
    self.batches = []

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    self.batches.append(np.array(batch))
    return np.tanh(0.8 * batch + 0.1 * np.roll(batch, 1, axis=1)).astype(np.float32)

  def check_padding(self, shape: tuple[int, ...]):
    """Every call had the same shape and the padding of the last batch was -1."""
    assert [b.shape for b in self.batches] == [shape] * 3
    np.testing.assert_array_equal(self.batches[-1][NUM_SLICES % BATCH:], slices.PAD_VALUE)


@pytest.fixture
def config(test_config):
  config = test_config.copy_and_resolve_references()
  config.eval.batch_size = BATCH
  config.seg.eval_batch_size = BATCH
  return config


@pytest.fixture
def mr():
  rng = np.random.default_rng(0)
  body = np.zeros((NUM_SLICES, 16, 16), bool)
  body[:, 3:13, 2:14] = True
  return np.where(body, rng.uniform(20, 90, body.shape), 0).astype(np.float32)


def test_run_batched_pads_with_air_and_keeps_order():
  x = np.random.default_rng(1).uniform(-1, 1, (NUM_SLICES, 3, 4, 2)).astype(np.float32)
  seen = []
  out = slices.run_batched(lambda b: seen.append(b.copy()) or b.sum(-1), x, BATCH)
  np.testing.assert_allclose(out, x.sum(-1), rtol=1e-6)
  assert [b.shape for b in seen] == [(BATCH, 3, 4, 2)] * 3
  np.testing.assert_array_equal(seen[-1][1:], -1.0)
  with pytest.raises(ValueError, match='returned 1 outputs for a batch of 2'):
    slices.run_batched(lambda b: b[:1], x, BATCH)
  with pytest.raises(ValueError, match='generator returned shape'):
    slices.translate_slices(lambda b: b[..., 0], x[..., 0], BATCH)


def test_evaluation_and_segmentation_translate_slices_as_the_translator_does(config, mr,
                                                                             monkeypatch):
  model_in = intensity.mr_to_model(mr, config.data.mr_window)
  direct_fn = Recorder()
  direct = slices.translate_slices(direct_fn, model_in, BATCH)
  direct_fn.check_padding((BATCH, 16, 16, 1))

  # Segmentation's U-Net input: channel 0 is sCT = G_ct(MR), through the same loop.
  seg_fn = Recorder()
  inputs = seg_data.mr_inputs(mr, seg_fn, config)
  seg_fn.check_padding((BATCH, 16, 16, 1))
  np.testing.assert_array_equal(inputs[..., 0], direct)

  # Evaluation: the sCT it scores.
  scored = {}
  real = scoring.volume_metrics

  def keep_sct(mr_, ct, sct_hu, *args):
    scored['sct_hu'] = sct_hu
    return real(mr_, ct, sct_hu, *args)

  monkeypatch.setattr(scoring, 'volume_metrics', keep_sct)
  eval_fn = Recorder()
  record = {'patient_id': 'p0', 'image': mr, 'paired': np.full(mr.shape, 40.0, np.float32),
            'mask': mr > 0}
  scoring.evaluate_volumes([record], eval_fn, None, config)
  eval_fn.check_padding((BATCH, 16, 16, 1))
  np.testing.assert_array_equal(scored['sct_hu'],
                                intensity.model_to_ct_hu(direct, config.data.ct_window))

  # Segmentation's prediction loop over two-channel inputs.
  predict_fn = Recorder()
  truth = np.zeros(mr.shape, np.uint8)
  truth[:, 5:9, 5:9] = 1
  seg_eval.evaluate_volumes([{'patient_id': 'p0', 'image': mr, 'label': truth}],
                            seg_eval.synthesis_inputs(seg_fn, config),
                            lambda b: predict_fn(b)[..., 0] > 0, {1: 'a'}, num_classes=2,
                            batch_size=int(config.seg.eval_batch_size))
  predict_fn.check_padding((BATCH, 16, 16, 2))


def test_translate_volume_runs_the_same_loop(config, mr):
  """A volume already on the network grid: translate sees the same batches, padded alike."""
  spacing = float(config.data.spacing_mm)
  vol = volume.Volume(np.transpose(mr, (1, 2, 0)), np.diag([spacing] * 3 + [1.0]), 'mem')
  fn = Recorder()
  volumes.translate_volume(vol, fn, config, batch_size=BATCH)
  fn.check_padding((BATCH, 16, 16, 1))
  model_in = np.concatenate(fn.batches)[:NUM_SLICES, ..., 0]
  again = Recorder()
  slices.translate_slices(again, model_in, BATCH)
  for a, b in zip(fn.batches, again.batches):
    np.testing.assert_array_equal(a, b)
