"""Winograd F(m x m, 3 x 3) convolution: values and both gradients against XLA's conv."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr2ct_jax.models import layers
from mr2ct_jax.models import winograd

_DN = ('NHWC', 'HWIO', 'NHWC')


def _direct(xp, kernel):
  return jax.lax.conv_general_dilated(xp, kernel, (1, 1), 'VALID', dimension_numbers=_DN,
                                      precision=jax.lax.Precision.HIGHEST)


# Output sizes that do and do not divide into tiles, a single row, and a single pixel.
@pytest.mark.parametrize('tile', winograd.TILES)
@pytest.mark.parametrize('out_hw', [(8, 8), (7, 10), (1, 5), (1, 1)])
def test_values_and_gradients_equal_the_direct_conv(tile, out_hw):
  rng = np.random.default_rng(0)
  xp = jnp.asarray(rng.standard_normal((2, out_hw[0] + 2, out_hw[1] + 2, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
  y = jax.jit(winograd.conv3x3_valid, static_argnums=2)(xp, kernel, tile)
  reference = _direct(xp, kernel)
  assert y.shape == (2, *out_hw, 7)
  # Relative to the outputs' size (~7 here): F(4x4) transforms have entries up to 8.
  tolerance = 2e-6 if tile == 2 else 2e-5
  np.testing.assert_allclose(y, reference, atol=tolerance * 10)
  weights = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grad = lambda f: jax.jit(jax.grad(lambda a, k: jnp.sum(f(a, k) * weights), argnums=(0, 1)))
  fast = grad(lambda a, k: winograd.conv3x3_valid(a, k, tile))(xp, kernel)
  slow = grad(_direct)(xp, kernel)
  for got, want in zip(fast, slow):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=tolerance * 20)


def test_hand_computed_single_tile():
  # One 4x4 input (a single F(2x2) tile), one channel, kernel of ones: each output is the sum
  # of its 3x3 window.
  xp = jnp.arange(16.0).reshape(1, 4, 4, 1)
  y = winograd.conv3x3_valid(xp, jnp.ones((3, 3, 1, 1)), 2)
  np.testing.assert_allclose(y[0, :, :, 0], [[45.0, 54.0], [81.0, 90.0]])


@pytest.mark.parametrize('differentiated', [False, True])
def test_bad_tile_and_kernel_fail_clearly(differentiated):
  xp = jnp.zeros((1, 6, 6, 2))
  conv = winograd.conv3x3_valid
  if differentiated:  # the checks also guard the custom VJP's forward pass
    conv = lambda a, k, t: jax.grad(lambda k2: jnp.sum(winograd.conv3x3_valid(a, k2, t)))(k)
  with pytest.raises(ValueError, match='tile must be one of'):
    conv(xp, jnp.zeros((3, 3, 2, 2)), 3)
  with pytest.raises(ValueError, match=r'kernel \[3, 3, Cin, Cout\], got \(1, 6, 6, 2\) and '
                                       r'\(5, 5, 2, 2\)'):
    conv(xp, jnp.zeros((5, 5, 2, 2)), 2)


def test_bfloat16_keeps_dtypes_and_bfloat16_accuracy():
  tile = 2
  rng = np.random.default_rng(1)
  xp = jnp.asarray(rng.standard_normal((1, 10, 9, 64)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 64, 8)) / 24, jnp.float32)
  reference = _direct(xp, kernel)
  low = lambda a: a.astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda a, k: winograd.conv3x3_valid(a, k, tile), low(xp), low(kernel))
  dx, dk = vjp(jnp.ones_like(y))
  assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
  # bfloat16 keeps 8 bits: ~0.4% per rounding, a few roundings deep.
  error = np.max(np.abs(np.asarray(y, np.float32) - reference)) / np.max(np.abs(reference))
  assert error < 0.02
  with pytest.raises(ValueError, match='tile 4 needs float32 or wider, got bfloat16'):
    winograd.conv3x3_valid(low(xp), low(kernel), 4)


def test_bfloat16_matmuls_take_bf16_inputs_except_the_kernel_gradients():
  """Forward and input gradient: bf16 x bf16 -> f32 batched matmuls; the kernel gradient,
  which contracts over every tile (XLA:CPU's slow bf16 shape), f32 x f32."""
  low = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda a, k: jnp.sum(winograd.conv3x3_valid(a, k, 2).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(low((1, 10, 10, 64)), low((3, 3, 64, 8)))
  batched = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general'
             and e.params['dimension_numbers'][1] == ((0,), (0,))]  # the 16 Winograd matmuls
  operand_dtypes = sorted(tuple(str(v.aval.dtype) for v in e.invars) for e in batched)
  assert operand_dtypes == [('bfloat16', 'bfloat16')] * 2 + [('float32', 'float32')]
  kernel_grad = next(e for e in batched if e.invars[0].aval.dtype == jnp.float32)
  assert kernel_grad.params['dimension_numbers'][0] == ((1,), (1,))  # over the tiles
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in batched)


def test_auto_picks_winograd_on_cpu_and_matmul_elsewhere():
  assert layers.check_conv_impl('auto', 'cpu') == 'winograd'
  assert layers.check_conv_impl('auto', 'gpu') == 'matmul'
  assert layers.check_conv_impl('auto', 'tpu') == 'matmul'
  assert layers.check_conv_impl('xla', 'cpu') == 'xla'
  assert layers.check_conv_impl('auto') == 'winograd'  # the tests run on the CPU


def test_reflect_conv_uses_winograd_only_on_its_path():
  """The res-block conv runs Winograd under 'winograd' and direct convs under 'matmul'."""
  x = jnp.zeros((1, 8, 8, 64))
  jaxprs = {}
  for impl in ('winograd', 'matmul'):
    conv = layers.ReflectConv(64, 3, 1, conv_impl=impl)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    jaxprs[impl] = str(jax.make_jaxpr(conv.apply)(variables, x))
  # Winograd's (m + 2)^2 = 16 batched matmuls; the direct path has a conv and no dot.
  assert 'dot_general' in jaxprs['winograd'] and 'conv_general_dilated' not in jaxprs['winograd']
  assert 'conv_general_dilated' in jaxprs['matmul'] and 'dot_general' not in jaxprs['matmul']
  # Narrower convs gain nothing from Winograd and stay direct.
  narrow = layers.ReflectConv(32, 3, 1, conv_impl='winograd')
  x = jnp.zeros((1, 8, 8, 32))
  jaxpr = str(jax.make_jaxpr(narrow.apply)(jax.eval_shape(narrow.init, jax.random.key(0), x), x))
  assert 'conv_general_dilated' in jaxpr and 'dot_general' not in jaxpr


def test_large_float32_convs_take_the_4x4_tile():
  """F(4x4) from WINOGRAD4_MIN_PIXELS output pixels in float32; F(2x2) below and in bfloat16."""
  big = (2, 66, 66, 64)  # 2 x 64 x 64 = 8192 output pixels
  assert layers.winograd_tile(big, jnp.float32) == 4
  assert layers.winograd_tile((1, 66, 66, 64), jnp.float32) == 2  # training at batch 1
  assert layers.winograd_tile(big, jnp.bfloat16) == 2  # F(4x4) loses bfloat16's digits
  # The chosen tile shows in the program: F(4x4)'s Winograd domain has 6^2 = 36 points
  # (36 batched matmuls), F(2x2)'s 4^2 = 16 (and its output tiles 2^2 = 4).
  conv = layers.ReflectConv(64, 3, 1, conv_impl='winograd')
  for shape, has_36 in (((2, 64, 64, 64), True), ((1, 64, 64, 64), False)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    text = str(jax.make_jaxpr(conv.apply)(variables, x))
    leading = {int(n) for n in re.findall(r':f32\[(\d+),[\d,]*\] = dot_general', text)}
    assert (36 in leading) == has_36 and 16 in leading, (shape, leading)
  # ... and its values equal the direct conv's to float32 rounding.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 64, 64, 64)), jnp.float32)
  variables = conv.init(jax.random.key(1), x)
  direct = layers.ReflectConv(64, 3, 1, conv_impl='xla').apply(variables, x)
  np.testing.assert_allclose(conv.apply(variables, x), direct, rtol=2e-4, atol=2e-4)
