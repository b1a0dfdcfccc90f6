"""The jitted CycleGAN step: metrics, learning, determinism, 1 vs 8 devices, the schedule.

Compiling the step dominates the cost, so the compiled functions are module-scoped and every
test starts from a fresh copy of one initial state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr2ct_jax.models import cyclegan
from mr2ct_jax.training import state as train_state
from mr2ct_jax.training import step as step_lib
from mr2ct_jax import parallel

BATCH = 8


def _config(test_config, **loss_overrides):
  """The `test` variant with batch 8, a long schedule and the given config.loss fields."""
  config = test_config.copy_and_resolve_references()
  config.unlock()
  config.train.batch_size = BATCH
  config.train.num_steps = 1000  # the test variant's 4 steps would decay the lr to 0 at once
  config.model.conv_impl = 'auto'  # the product's default conv path (the test variant: 'xla')
  for key, value in loss_overrides.items():
    config.loss[key] = value
  return config


@pytest.fixture(scope='module')
def setup(test_config):
  config = _config(test_config)
  gan = train_state.build(config)
  create = jax.jit(lambda rng: train_state.create(gan, config, rng))
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {k: rng.uniform(-1, 1, (BATCH, size, size, 1)).astype(np.float32)
           for k in ('mr', 'ct')}
  mesh8 = parallel.make_mesh()
  assert mesh8.size == 8
  mesh1 = parallel.make_mesh(jax.devices()[:1])
  return {
      'config': config, 'create': create, 'batch': batch,
      'mesh8': mesh8, 'step8': step_lib.make_train_step(gan, config, mesh8),
      'mesh1': mesh1, 'step1': step_lib.make_train_step(gan, config, mesh1),
      'sample': step_lib.make_sample_fn(gan),
  }


def _run(setup, mesh_name: str, num_steps: int, seed: int = 0):
  """Runs `num_steps` steps on the fixed batch from a state created from `seed`."""
  mesh, step = setup[mesh_name], setup[mesh_name.replace('mesh', 'step')]
  state = jax.device_put(setup['create'](jax.random.PRNGKey(seed)),
                         parallel.replicated(mesh))
  batch = parallel.shard_batch(setup['batch'], mesh)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  leaves_a, tree_a = jax.tree.flatten_with_path(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_metrics_and_state_after_one_step(setup):
  state, (metrics,) = _run(setup, 'mesh8', 1)
  assert set(metrics) == set(step_lib.METRIC_KEYS)
  for key, value in metrics.items():
    assert np.shape(value) == () and np.isfinite(value), key
  loss = setup['config'].loss
  expected_total = (metrics['loss/gan_ct'] + metrics['loss/gan_mr'] +
                    loss.cycle_weight * metrics['loss/cycle'] + loss.gc_weight * metrics['loss/gc'])
  assert metrics['loss/g_total'] == pytest.approx(expected_total, rel=1e-5)
  assert metrics['loss/identity'] == 0.0
  assert metrics['lr'] == pytest.approx(setup['config'].optim.lr)
  assert int(state.step) == 1
  pool_size = setup['config'].train.pool_size
  for pool in state.pools.values():
    assert int(pool.count) == min(pool_size, BATCH)
  assert set(state.params) == {'g_ct', 'g_mr', 'd_ct', 'd_mr'}
  assert set(state.opt_state) == {'g', 'd'}


def test_losses_decrease_on_a_fixed_batch(setup):
  _, history = _run(setup, 'mesh8', 20)
  first, last = history[0], history[-1]
  print({k: (float(first[k]), float(last[k])) for k in first})
  for key in ('loss/g_total', 'loss/d_ct', 'loss/d_mr', 'loss/cycle'):
    assert last[key] < first[key], (key, first[key], last[key])


def test_same_seed_same_state(setup):
  state_a, history_a = _run(setup, 'mesh8', 2)
  state_b, history_b = _run(setup, 'mesh8', 2)
  _assert_trees_equal(state_a, state_b)
  _assert_trees_equal(history_a, history_b)
  state_c, _ = _run(setup, 'mesh8', 0, seed=1)
  assert not np.array_equal(state_a.params['g_ct']['stem']['kernel'],
                            state_c.params['g_ct']['stem']['kernel'])


def test_one_device_equals_eight_devices(setup):
  """The step computes the same numbers with the batch split over 8 devices or on 1.

  Compared after 2 steps: every loss, the pools, the generators' outputs and all conv
  kernels. Not compared: the biases of convolutions followed by instance norm, whose
  gradient is exactly zero in exact arithmetic; Adam normalises their float rounding noise
  into +-lr steps, different on each layout (they cannot change any output, which the
  output comparison checks).
  """
  state8, history8 = _run(setup, 'mesh8', 2)
  state1, history1 = _run(setup, 'mesh1', 2)
  assert len(state8.params['g_ct']['stem']['kernel'].sharding.device_set) == 8
  _assert_trees_equal(history1, history8, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(state1.pools, state8.pools, rtol=0, atol=1e-5)
  assert int(state1.step) == int(state8.step) == 2
  np.testing.assert_array_equal(state1.rng, state8.rng)
  kernels = lambda params: [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                            if path[-1].key == 'kernel']
  # 1/20 of the 2-step update (2 * lr): rounding differences, not a different update.
  _assert_trees_equal(kernels(state1.params), kernels(state8.params), rtol=0, atol=2e-5)
  # Outputs in [-1, 1]: the float rounding of the per-device gradient sums, amplified by
  # Adam where a gradient nearly cancels, moves them by ~1e-4; a real layout dependence
  # (statistics over the device-local batch, different pool draws) moves them by ~0.1.
  sample = setup['sample']
  _assert_trees_equal(sample(state1.params, setup['batch']), sample(state8.params, setup['batch']),
                      rtol=0, atol=1e-3)


def test_sample_fn(setup):
  params = setup['create'](jax.random.PRNGKey(0)).params
  batch = setup['batch']  # full batch: the compiled shape is reused by other tests
  images = setup['sample'](params, batch)
  assert set(images) == {'mr', 'fake_ct', 'rec_mr', 'ct', 'fake_mr', 'rec_ct'}
  for value in images.values():
    assert value.shape == (BATCH, *batch['mr'].shape[1:])
    assert float(jnp.max(jnp.abs(value))) <= 1.0
  np.testing.assert_array_equal(images['mr'], batch['mr'])


def test_learning_rate_schedule(test_config):
  config = _config(test_config)
  config.train.num_steps = 200
  config.optim.lr = 2e-4
  config.optim.decay_start_fraction = 0.5
  schedule = train_state.learning_rate_schedule(config)
  for step, expected in ((0, 2e-4), (50, 2e-4), (100, 2e-4), (150, 1e-4), (200, 0.0),
                         (250, 0.0)):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12), step
  config.optim.decay_start_fraction = 1.0
  assert float(train_state.learning_rate_schedule(config)(200)) == pytest.approx(2e-4, rel=1e-6)


def _traced_step(config, fuse_pairs: bool = False):
  """The jaxpr and output shapes of the step for `config`, traced without compiling."""
  gen, disc = cyclegan.build(config.model)
  loss = config.loss
  step = functools.partial(
      step_lib.train_step, gen=gen, disc=disc,
      tx=train_state.make_optimizers(config.optim, train_state.learning_rate_schedule(config)),
      learning_rate_fn=train_state.learning_rate_schedule(config),
      cycle_weight=loss.cycle_weight, gc_weight=loss.gc_weight,
      identity_weight=loss.identity_weight, gc_signed=loss.gc_signed, gc_eps=loss.gc_eps,
      fuse_pairs=fuse_pairs)
  state = jax.eval_shape(
      lambda: train_state.create(train_state.build(config), config, jax.random.PRNGKey(0)))
  size = config.data.image_size
  batch = {k: jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32) for k in ('mr', 'ct')}
  return jax.make_jaxpr(step, return_shape=True)(state, batch)


def _count_convs(jaxpr) -> int:
  return str(jaxpr).count('conv_general_dilated')


def test_identity_and_gc_off_variants_trace(test_config):
  """Without GC and with identity the step traces with the same metrics, and a zero
  identity weight saves two generator passes (tracing only, no compile: the default
  variant's values are covered by the tests above; signed GC by test_losses)."""
  def small(**overrides):
    config = _config(test_config, **overrides)
    config.data.image_size = 16  # small and few layers: tracing time grows with both
    config.model.num_res_blocks = 0
    config.model.num_disc_layers = 1
    return config
  base_jaxpr, _ = _traced_step(small())
  jaxpr, (state, metrics) = _traced_step(small(identity_weight=1.5, gc_weight=0.0,
                                               gc_signed=True))
  assert set(metrics) == set(step_lib.METRIC_KEYS)
  assert all(m.shape == () for m in metrics.values())
  assert state.step.shape == ()
  # The identity term costs two extra generator passes and their backward.
  assert _count_convs(jaxpr) > _count_convs(base_jaxpr)


def test_fused_pairs_equal_separate_calls(test_config):
  """`train.fuse_pairs` (each G and D pair as one vmapped program) computes the numbers of
  the separate calls: every metric, the pools and the generators' outputs after 2 steps on 8
  devices, with the identity term on so that its pair runs too."""
  results, convs = {}, {}
  for fuse in (False, True):
    config = _config(test_config, identity_weight=0.5)
    config.train.fuse_pairs = fuse
    gan = train_state.build(config)
    mesh = parallel.make_mesh()
    step = step_lib.make_train_step(gan, config, mesh)
    state = jax.device_put(jax.jit(lambda rng: train_state.create(gan, config, rng))(
        jax.random.PRNGKey(0)), parallel.replicated(mesh))
    rng = np.random.default_rng(0)
    size = config.data.image_size
    batch = {k: rng.uniform(-1, 1, (BATCH, size, size, 1)).astype(np.float32)
             for k in ('mr', 'ct')}
    # The config key reaches the step: the fused program has half the convolutions.
    convs[fuse] = step.lower(state, parallel.shard_batch(batch, mesh)).as_text().count(
        'convolution(')
    history = []
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
      history.append(jax.device_get(metrics))
    results[fuse] = state, history, step_lib.make_sample_fn(gan)(state.params, batch)
  assert 0 < convs[True] < convs[False], convs
  (state0, history0, sample0), (state1, history1, sample1) = results[False], results[True]
  assert history0[0]['loss/identity'] > 0
  _assert_trees_equal(history0, history1, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(state0.pools, state1.pools, rtol=0, atol=1e-5)
  # As across device counts (above): Adam turns rounding differences into ~1e-4 moves.
  _assert_trees_equal(sample0, sample1, rtol=0, atol=1e-3)


def test_fused_pairs_halve_the_traced_convs(test_config):
  """Fused, each pair's convs are traced once (vmapped over the two networks), not twice."""
  config = _config(test_config)
  config.data.image_size = 16
  config.model.num_res_blocks = 0
  config.model.num_disc_layers = 1
  config.model.conv_impl = 'xla'  # lax convs, so the jaxpr names every conv
  separate, _ = _traced_step(config, fuse_pairs=False)
  fused, _ = _traced_step(config, fuse_pairs=True)
  assert _count_convs(fused) > 0
  assert _count_convs(fused) * 2 == _count_convs(separate)
