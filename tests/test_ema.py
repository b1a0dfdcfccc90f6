"""The generators' parameter averages (train.ema_decay): the update, training, resume, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import export as export_lib
from mr2ct_jax.inference import generators
from mr2ct_jax.inference import numpy_generator
from mr2ct_jax.training import loop
from mr2ct_jax.training import state as state_lib

DECAY = 0.5


def test_ema_update_follows_the_warm_up_then_the_decay():
  ema = {'g_ct': {'w': jnp.ones(3)}}
  params = {'g_ct': {'w': jnp.zeros(3)}, 'd_ct': {'w': jnp.full(3, 7.0)}}
  # d = min(decay, (1 + t) / (10 + t)): 0.1 at t = 0, 0.91 at t = 90, then the decay.
  for step, weight in ((0, 0.1), (90, 0.91), (10_000, 0.99)):
    out = state_lib.ema_update(ema, params, jnp.int32(step), 0.99)
    assert set(out) == {'g_ct'}  # only the averaged networks, never the discriminators
    np.testing.assert_allclose(out['g_ct']['w'], weight, rtol=1e-6)


def test_inference_params_prefer_the_averages():
  raw = {'g_ct': 1, 'g_mr': 2, 'd_ct': 3, 'd_mr': 4}
  assert state_lib.inference_params(raw) == raw
  averaged = state_lib.inference_params({**raw, state_lib.EMA: {'g_ct': 10, 'g_mr': 20}})
  assert averaged == {'g_ct': 10, 'g_mr': 20, 'd_ct': 3, 'd_mr': 4}


def test_bad_decay_is_named(test_config):
  config = test_config.copy_and_resolve_references()
  config.train.ema_decay = 1.0
  with pytest.raises(config_checks.ConfigError, match=r'train\.ema_decay=1\.0: must be in'):
    config_checks.validate(config, num_devices=8)


def _config(test_config, decay=DECAY):
  config = test_config.copy_and_resolve_references()
  config.train.ema_decay = decay
  config.train.checkpoint_every = 1  # every step's state, to check the average step by step
  config.train.keep_checkpoints = 10
  config.eval.after_training = False
  return config


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory, test_config):
  workdir = tmp_path_factory.mktemp('ema') / 'run'
  loop.train(_config(test_config), str(workdir))
  return workdir


def _raw_states(workdir):
  """{step: raw params (with 'ema')} of every checkpoint of the run."""
  config = checkpointing.load_config(str(workdir))
  gan = state_lib.build(config)
  abstract = jax.eval_shape(lambda: state_lib.create(gan, config, jax.random.PRNGKey(0)))
  abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  try:
    return {step: checkpointing.restore(manager, step, abstract)[0].params
            for step in manager.all_steps()}
  finally:
    manager.close()


def test_training_keeps_the_average_of_each_step(ema_run, test_config):
  states = _raw_states(ema_run)
  steps = sorted(states)
  assert steps == list(range(1, test_config.train.num_steps + 1))
  for step in steps[1:]:
    previous, current = states[step - 1], states[step]
    weight = min(DECAY, step / (9 + step))  # (1 + t) / (10 + t) with t = step - 1
    for name in state_lib.GENERATORS:
      expected = jax.tree.map(lambda e, p: weight * e + (1 - weight) * p,
                              previous[state_lib.EMA][name], current[name])
      for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(current[state_lib.EMA][name])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  last = states[steps[-1]]
  assert not np.array_equal(last['g_ct']['stem']['kernel'],
                            last[state_lib.EMA]['g_ct']['stem']['kernel'])


def test_translation_and_export_use_the_average(ema_run, tmp_path):
  last = _raw_states(ema_run)[4]
  params, step = generators.restore_all_params(str(ema_run))
  assert step == 4 and state_lib.EMA not in params
  for name in state_lib.GENERATORS:
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(last[state_lib.EMA][name])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(params['d_ct']), jax.tree.leaves(last['d_ct'])):
    np.testing.assert_array_equal(a, b)  # discriminators: the step's own weights
  path = str(tmp_path / 'g.npz')
  meta = export_lib.export(str(ema_run), path, direction='both')
  assert meta['weights'] == 'ema'
  exported = numpy_generator.read_export(path)
  np.testing.assert_array_equal(exported.params['g_ct']['stem/kernel'],
                                last[state_lib.EMA]['g_ct']['stem']['kernel'])


def test_resume_continues_the_average(ema_run, tmp_path, test_config):
  resumed = tmp_path / 'resumed'
  loop.train(_config(test_config), str(resumed), stop_after=2)
  loop.train(_config(test_config), str(resumed))
  straight, resumed_params = _raw_states(ema_run)[4], _raw_states(resumed)[4]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed_params)):
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_another_decay(ema_run, test_config):
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'ema_decay=0.5, not 0.0; pass --config.train.ema_decay=0.5 to '
                           'continue it'):
    loop.train(_config(test_config, decay=0.0), str(ema_run))
