"""Models: exact parameter counts, shapes, and the fast layers against naive references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gc
from mr2ct_jax.models import cyclegan
from mr2ct_jax.models import conv_ops
from mr2ct_jax.models import layers
from mr2ct_jax.models.discriminator import PatchDiscriminator
from mr2ct_jax.models.generator import ResnetGenerator

_DN = ('NHWC', 'HWIO', 'NHWC')


def _random_variables(module, x, seed=0, scale=1.0):
  """Variables of `module` for input `x`, drawn with numpy.

  `module.init` under jit compiles one threefry normal per parameter, which takes minutes on
  XLA:CPU; the layers under test do not care where the values come from.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * scale), shapes)


def _count(params) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def _torch_conv_transpose(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """PyTorch ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1) by scattering.

  Input pixel (a, c) adds x[a, c] @ kernel[kh, kw] to output (2a - 1 + kh, 2c - 1 + kw);
  outputs outside [0, 2H) x [0, 2W) are dropped.
  """
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h, 2 * w, kernel.shape[3]), np.float64)
  for a in range(h):
    for c in range(w):
      for kh in range(3):
        for kw in range(3):
          i, j = 2 * a - 1 + kh, 2 * c - 1 + kw
          if 0 <= i < 2 * h and 0 <= j < 2 * w:
            out[:, i, j] += x[:, a, c].astype(np.float64) @ kernel[kh, kw]
  return out


def _naive_conv_transpose(x, kernel):
  """The same layer through XLA's dilated-input transposed conv."""
  return jax.lax.conv_transpose(x, jnp.swapaxes(kernel, 2, 3), (2, 2), ((1, 2), (1, 2)),
                                dimension_numbers=_DN, transpose_kernel=True)


def _naive_instance_norm(x):
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5)


def _naive_generator(params, x, num_res_blocks):
  """The ResNet generator written plainly: jnp.pad reflect, lax convs, lax.conv_transpose."""
  def conv(p, y, stride=1, padding='VALID'):
    return jax.lax.conv_general_dilated(y, p['kernel'], (stride, stride), padding,
                                        dimension_numbers=_DN) + p['bias']
  reflect = lambda y, n: jnp.pad(y, ((0, 0), (n, n), (n, n), (0, 0)), mode='reflect')
  relu_in = lambda y: jax.nn.relu(_naive_instance_norm(y))
  y = relu_in(conv(params['stem'], reflect(x, 3)))
  for i in range(2):
    y = relu_in(conv(params[f'down_{i}'], y, 2, ((1, 1), (1, 1))))
  for i in range(num_res_blocks):
    p = params[f'res_{i}']
    r = relu_in(conv(p['conv_0'], reflect(y, 1)))
    y = y + _naive_instance_norm(conv(p['conv_1'], reflect(r, 1)))
  for i in range(2):
    p = params[f'up_{i}']
    y = relu_in(_naive_conv_transpose(y, p['kernel']) + p['bias'])
  return jnp.tanh(conv(params['head'], reflect(y, 3)))


def test_parameter_counts_match_reference():
  x = jnp.zeros((1, 64, 64, 1))
  generator, discriminator = cyclegan.build(gc.get_config().model)
  g = jax.eval_shape(generator.init, jax.random.key(0), x)
  d = jax.eval_shape(discriminator.init, jax.random.key(0), x)
  assert _count(g) == 11_365_633
  assert _count(d) == 2_762_689
  # The transposed conv keeps the reference layer's shape (and so its export semantics).
  assert g['params']['up_0']['kernel'].shape == (3, 3, 256, 128)


def test_output_shapes_and_dtypes():
  x = jnp.linspace(-1, 1, 2 * 32 * 32).reshape(2, 32, 32, 1)
  generator = ResnetGenerator(ngf=4, num_res_blocks=1)
  discriminator = PatchDiscriminator(ndf=4)
  g_params = _random_variables(generator, x, 0, 0.02)
  d_params = _random_variables(discriminator, x, 1, 0.02)
  y = jax.jit(generator.apply)(g_params, x)
  assert y.shape == (2, 32, 32, 1) and y.dtype == jnp.float32
  assert float(jnp.abs(y).max()) <= 1.0
  logits = jax.jit(discriminator.apply)(d_params, x)
  assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32  # 32/8 - 2
  big = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  assert jax.eval_shape(discriminator.apply, d_params, big).shape == (1, 30, 30, 1)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  x = jnp.linspace(-1, 1, 32 * 32).reshape(1, 32, 32, 1)
  generator = ResnetGenerator(ngf=4, num_res_blocks=1, dtype=jnp.bfloat16)
  params = _random_variables(generator, x, 0, 0.02)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  y16 = jax.jit(generator.apply)(params, x)
  y32 = jax.jit(ResnetGenerator(ngf=4, num_res_blocks=1).apply)(params, x)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, atol=0.1)
  logits = jax.jit(PatchDiscriminator(ndf=4, dtype=jnp.bfloat16).apply)(
      _random_variables(PatchDiscriminator(ndf=4), x, 1, 0.02), x)
  assert logits.dtype == jnp.float32


def test_discriminator_norm_none_keeps_the_parameters_and_the_input_scale():
  x = jnp.cos(jnp.arange(2 * 32 * 32, dtype=jnp.float32)).reshape(2, 32, 32, 1)
  variables = _random_variables(PatchDiscriminator(ndf=4), x, 1, 0.2)
  # Zero biases make every layer but the norm positively homogeneous (convs, LeakyReLU).
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if path[-1].key == 'bias' else v, variables)
  plain = PatchDiscriminator(ndf=4, norm='none')
  assert jax.tree.map(jnp.shape, jax.eval_shape(plain.init, jax.random.key(0), x)) == (
      jax.tree.map(jnp.shape, variables))
  # Instance norm forgets the input's scale; without a norm the logits scale with it.
  normed = PatchDiscriminator(ndf=4).apply
  np.testing.assert_allclose(normed(variables, 3 * x), normed(variables, x), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(plain.apply(variables, 3 * x), 3 * plain.apply(variables, x),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(plain.apply(variables, x), normed(variables, x), atol=1e-3)
  with pytest.raises(ValueError, match="disc_norm='batch'"):
    PatchDiscriminator(ndf=4, norm='batch').apply(variables, x)


def test_build_uses_config_fields(test_config):
  generator, discriminator = cyclegan.build(test_config.model)
  assert (generator.ngf, generator.num_res_blocks, generator.dtype) == (4, 1, jnp.float32)
  assert (discriminator.ndf, discriminator.num_layers) == (4, 3)
  config = gc.get_config('test')
  config.model.dtype = 'bfloat16'
  assert cyclegan.build(config.model)[0].dtype == jnp.bfloat16
  config.model.dtype = 'int8'
  with pytest.raises(ValueError, match='model.dtype'):
    cyclegan.build(config.model)


@pytest.mark.parametrize('pad', [1, 3])
def test_reflect_pad_equals_jnp_pad(pad):
  x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
  expected = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  np.testing.assert_array_equal(layers.reflect_pad(x, pad), expected)
  # Gradients too (the backward of the concatenation accumulates mirrored pixels).
  w = jnp.cos(jnp.arange(expected.size, dtype=jnp.float32)).reshape(expected.shape)
  g_fast = jax.grad(lambda v: jnp.sum(layers.reflect_pad(v, pad) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(
      jnp.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect') * w))(x)
  np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6)


def test_reflect_pad_rejects_too_large_pad():
  with pytest.raises(ValueError, match='reflect_pad'):
    layers.reflect_pad(jnp.zeros((1, 3, 3, 1)), 3)


def test_instance_norm_matches_definition():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3)) * 4 + 2
  np.testing.assert_allclose(layers.instance_norm(x), _naive_instance_norm(x), atol=1e-5)
  y = layers.instance_norm(x)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(1, 2)), 1, atol=1e-3)


@pytest.mark.parametrize('shape', [(2, 3, 4, 5), (1, 1, 1, 2), (1, 4, 2, 3)])
def test_upconv_equals_pytorch_semantics_and_lax_conv_transpose(shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = rng.standard_normal((3, 3, shape[3], 6)).astype(np.float32)
  y = jax.jit(layers.upconv2x)(x, kernel)
  np.testing.assert_allclose(y, _torch_conv_transpose(x, kernel), atol=1e-5)
  np.testing.assert_allclose(y, jax.jit(_naive_conv_transpose)(x, kernel), atol=1e-5)
  np.testing.assert_allclose(jax.jit(layers.xla_upconv2x)(x, kernel),
                             _torch_conv_transpose(x, kernel), atol=1e-5)


def test_upconv_gradients_equal_lax_conv_transpose():
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  w = jax.random.normal(jax.random.key(2), (2, 10, 8, 4))
  grad = lambda f: jax.jit(jax.grad(lambda a, k: jnp.sum(f(a, k) * w), argnums=(0, 1)))
  fast = grad(layers.upconv2x)(x, kernel)
  naive = grad(_naive_conv_transpose)(x, kernel)
  for f, n in zip(fast, naive):
    np.testing.assert_allclose(f, n, atol=1e-4)


def _scatter_conv_transpose(x, kernel, stride, pad, output_padding):
  """PyTorch conv_transpose2d by scattering: input (a, c) adds to (s a - p + i, s c - p + j)."""
  b, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  out_h = (h - 1) * stride - 2 * pad + kh + output_padding
  out_w = (w - 1) * stride - 2 * pad + kw + output_padding
  out = np.zeros((b, out_h, out_w, cout), np.float64)
  for a in range(h):
    for c in range(w):
      for i in range(kh):
        for j in range(kw):
          r, q = stride * a - pad + i, stride * c - pad + j
          if 0 <= r < out_h and 0 <= q < out_w:
            out[:, r, q] += x[:, a, c].astype(np.float64) @ kernel[i, j]
  return out


@pytest.mark.parametrize('k,stride,pad,output_padding', [(3, 2, 1, 1), (4, 2, 1, 0),
                                                         (3, 1, 1, 0), (5, 3, 2, 2),
                                                         (2, 2, 0, 0)])
def test_conv_transpose2d_values_and_gradients(k, stride, pad, output_padding):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 3, 5)).astype(np.float32)
  f = lambda a, w: conv_ops.conv_transpose2d(a, w, stride, pad, output_padding)
  y = jax.jit(f)(x, kernel)
  np.testing.assert_allclose(y, _scatter_conv_transpose(x, kernel, stride, pad,
                                                        output_padding), atol=1e-4)
  edge = ((k - 1 - pad, k - 1 - pad + output_padding),) * 2
  naive = lambda a, w: jax.lax.conv_transpose(a, jnp.swapaxes(w, 2, 3), (stride, stride),
                                              edge, dimension_numbers=_DN,
                                              transpose_kernel=True)
  weights = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grad = lambda g: jax.jit(jax.grad(lambda a, w: jnp.sum(g(a, w) * weights), argnums=(0, 1)))
  for fast, ref in zip(grad(f)(x, kernel), grad(naive)(x, kernel)):
    np.testing.assert_allclose(fast, ref, atol=1e-4)


@pytest.mark.parametrize('conv_impl', ['winograd', 'matmul', 'xla'])
def test_generator_equals_naive_reference(conv_impl):
  x = jax.random.uniform(jax.random.key(0), (2, 16, 20, 1), minval=-1, maxval=1)
  # ngf=16: res blocks of 64 channels, wide enough for the Winograd path.
  generator = ResnetGenerator(ngf=16, num_res_blocks=2, conv_impl=conv_impl)
  # Larger weights than the N(0, 0.02) init (tanh input std ~1) so every layer matters.
  variables = _random_variables(generator, x, 1, 0.1)
  naive_apply = lambda v, a: _naive_generator(v['params'], a, 2)
  fast = jax.jit(generator.apply)(variables, x)
  naive = jax.jit(naive_apply)(variables, x)
  np.testing.assert_allclose(fast, naive, atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(f(v, x) * x)))
  g_fast = grad(generator.apply)(variables)
  g_naive = grad(naive_apply)(variables)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_discriminator_conv_paths_agree_in_values_and_gradients():
  x = jax.random.uniform(jax.random.key(0), (2, 40, 36, 1), minval=-1, maxval=1)
  variables = _random_variables(PatchDiscriminator(ndf=4), x, 2, 0.1)
  outputs = {}
  for impl in ('matmul', 'xla'):
    apply = PatchDiscriminator(ndf=4, conv_impl=impl).apply
    loss = lambda v, a: jnp.sum(jnp.sin(apply(v, a)))
    outputs[impl] = (jax.jit(apply)(variables, x),
                     jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x))
  assert outputs['matmul'][0].shape == (2, 3, 2, 1)
  np.testing.assert_allclose(outputs['matmul'][0], outputs['xla'][0], atol=1e-5)
  for a, b in zip(jax.tree.leaves(outputs['matmul'][1]), jax.tree.leaves(outputs['xla'][1])):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_conv_impl_comes_from_the_config_and_bad_values_fail():
  assert layers.check_conv_impl('xla') == 'xla'
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    layers.check_conv_impl('cudnn')
  config = gc.get_config('test')
  assert cyclegan.build(config.model)[0].conv_impl == 'xla'  # the test variant's
  config.model.conv_impl = 'matmul'
  generator, discriminator = cyclegan.build(config.model)
  assert generator.conv_impl == discriminator.conv_impl == 'matmul'
  assert cyclegan.build(gc.get_config('quick').model)[0].conv_impl == 'auto'
  config.model.conv_impl = 'cudnn'
  with pytest.raises(ValueError, match='model.conv_impl'):
    cyclegan.build(config.model)
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    jax.eval_shape(ResnetGenerator(ngf=4, num_res_blocks=1, conv_impl='cudnn').init,
                   jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def test_generator_rejects_bad_input_shape():
  with pytest.raises(ValueError, match='divisible by 4'):
    jax.eval_shape(ResnetGenerator(ngf=4, num_res_blocks=1).init, jax.random.key(0),
                   jnp.zeros((1, 30, 32, 1)))


@pytest.mark.parametrize('x_shape,kernel_shape', [((2, 9, 8, 3), (3, 3, 3, 5)),
                                                  ((1, 12, 11, 2), (7, 7, 2, 4)),
                                                  ((1, 10, 9, 4), (7, 7, 4, 1))])
def test_valid_convs_and_gradients_equal_lax_conv(x_shape, kernel_shape):
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  conv = layers.conv_to_one_channel if kernel_shape[-1] == 1 else layers.conv_valid
  naive = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), 'VALID', dimension_numbers=_DN)
  y = jax.jit(conv)(x, kernel)
  np.testing.assert_allclose(y, naive(x, kernel), atol=1e-4)
  w = jax.random.normal(jax.random.key(2), y.shape)
  grad = lambda f: jax.jit(jax.grad(lambda a, k: jnp.sum(f(a, k) * w), argnums=(0, 1)))
  for fast, ref in zip(grad(conv)(x, kernel), grad(naive)(x, kernel)):
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=1e-5)
