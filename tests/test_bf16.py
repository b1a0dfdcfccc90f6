"""model.dtype='bfloat16': every conv a bf16 x bf16 -> f32 matmul (but Winograd's kernel
gradient, float32: test_winograd), training as in float32.

Checked on the lowered programs (no convolution left, every 16-bit dot accumulating in
float32, float32 programs free of bfloat16) and on three CycleGAN steps from one init.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mr2ct_jax import parallel
from mr2ct_jax.models import layers
from mr2ct_jax.models import options
from mr2ct_jax.models.discriminator import PatchDiscriminator
from mr2ct_jax.models.generator import ResnetGenerator
from mr2ct_jax.training import state as train_state
from mr2ct_jax.training import step as step_lib

_DOT = re.compile(r'stablehlo\.dot_general.*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)'
                  r'\s*->\s*tensor<[^>]*x(\w+)>')


def _ops(text: str) -> tuple[int, dict[tuple[str, str, str], int]]:
  """(convolutions, {(lhs, rhs, result) element types: count} of the dots) in StableHLO."""
  dots = {}
  for match in _DOT.finditer(text):
    dots[match.groups()] = dots.get(match.groups(), 0) + 1
  return text.count('stablehlo.convolution'), dots


@pytest.fixture(autouse=True)
def winograd_at_tiny_widths(monkeypatch):
  # The tiny test networks' res blocks (ngf=8: 32 channels, wider than the im2col
  # threshold) take Winograd too.
  monkeypatch.setattr(layers, 'WINOGRAD_MIN_CHANNELS', 16)


@pytest.mark.parametrize('conv_impl', ['matmul', 'winograd'])
@pytest.mark.parametrize('net', ['generator', 'discriminator'])
def test_bf16_forward_and_gradients_are_matmuls_accumulating_in_f32(conv_impl, net):
  x = jnp.zeros((1, 32, 32, 1))
  make = {'generator': lambda **kw: ResnetGenerator(ngf=8, num_res_blocks=1, **kw),
          'discriminator': lambda **kw: PatchDiscriminator(ndf=4, num_layers=2, **kw)}[net]
  counts = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module = make(dtype=dtype, conv_impl=conv_impl)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    loss = lambda p, module=module: jnp.mean(module.apply(p, x) ** 2)
    text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    counts[dtype] = _ops(text)
    layers_count = sum(name[-1] == 'kernel' for name in
                       traverse_util.flatten_dict(params['params']))
    if dtype == jnp.float32:
      assert 'bf16' not in text  # the float32 programs are untouched
  convs, dots = counts[jnp.bfloat16]
  assert convs == 0
  assert {k for k in dots if 'bf16' in k} == {('bf16', 'bf16', 'f32')}
  # Each conv layer's forward and kernel gradient at least; the float32 matmuls of the bf16
  # program are Winograd's tile transforms and its kernel gradient (XLA:CPU's bf16 dot is
  # slow at that shape).
  assert dots[('bf16', 'bf16', 'f32')] >= 2 * layers_count
  assert (('f32', 'f32', 'f32') in dots) == (conv_impl == 'winograd' and net == 'generator')


def test_auto_takes_winograd_on_the_cpu_in_both_precisions():
  for dtype in options.DTYPE_NAMES:
    assert options.resolve_conv_impl('auto', 'cpu', dtype) == 'winograd'
    assert options.resolve_conv_impl('auto', 'gpu', dtype) == 'matmul'
  assert layers.check_conv_impl('auto', 'cpu', jnp.bfloat16) == 'winograd'
  assert layers.check_conv_impl('matmul', 'cpu', 'bfloat16') == 'matmul'


def _train(config, batches):
  """Three steps from the same init; (initial params, final state, metrics per step, text)."""
  gan = train_state.build(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = jax.jit(lambda rng: train_state.create(gan, config, rng))(jax.random.PRNGKey(0))
  init = jax.device_get(state.params)
  lowered = step_lib.make_train_step(gan, config, mesh).lower(
      state, parallel.shard_batch(batches[0], mesh))
  text, step = lowered.as_text(), lowered.compile()
  history = []
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return init, jax.device_get(state), history, text


def test_bf16_training_agrees_with_float32(test_config):
  rng = np.random.default_rng(0)
  batches = [{k: rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32) for k in ('mr', 'ct')}
             for _ in range(3)]
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = test_config.copy_and_resolve_references()
    config.train.batch_size, config.train.num_steps = 2, 1000
    # ngf=8: res blocks wide enough for Winograd (the fixture); one stride-2 D layer.
    config.model.dtype, config.model.ngf, config.model.num_disc_layers = dtype, 8, 1
    config.model.conv_impl = 'auto'  # the matmul/Winograd paths (the test variant: 'xla')
    runs[dtype] = _train(config, batches)
  init, state32, losses32, text32 = runs['float32']
  init16, state16, losses16, text16 = runs['bfloat16']
  # The bf16 step really computes in bf16: its convs are bf16 matmuls, float32's are not.
  assert _ops(text16)[1].get(('bf16', 'bf16', 'f32'), 0) > 50 and _ops(text16)[0] == 0
  assert 'bf16' not in text32
  # Parameters and optimiser state stay float32; same init.
  assert {leaf.dtype for leaf in jax.tree.leaves((state16.params, state16.opt_state))
          if np.issubdtype(leaf.dtype, np.floating)} == {np.dtype(np.float32)}
  assert all(np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init16)))
  # Losses within 1% at every step (measured: worst 0.12%; at ngf=16, two D layers: 1.4%),
  # but not equal.
  for step32, step16 in zip(losses32, losses16):
    for key in step32:
      assert step16[key] == pytest.approx(step32[key], rel=0.01, abs=1e-6), key
  assert any(losses16[-1][k] != losses32[-1][k] for k in losses32[-1] if k != 'lr')
  # The parameters moved the same way: the updates of all kernels point the same direction.
  flat = lambda tree: traverse_util.flatten_dict(tree, sep='/')
  p0, p32, p16 = flat(init), flat(state32.params), flat(state16.params)
  kernels = sorted(k for k in p0 if k.endswith('kernel'))
  d32 = np.concatenate([(p32[k] - p0[k]).ravel() for k in kernels])
  d16 = np.concatenate([(p16[k] - p0[k]).ravel() for k in kernels])
  cosine = float(d32 @ d16 / np.linalg.norm(d32) / np.linalg.norm(d16))
  # Measured 0.82 (Adam's normalised steps amplify bf16 noise in the small gradients);
  # unrelated directions would be ~0.
  assert cosine > 0.6, cosine
