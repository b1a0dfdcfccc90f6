"""Exact values of the loss functions (LSGAN, L1 terms, gradient correlation)."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from mr2ct_jax.training import losses

# A hand-worked 3x3 case. Rows are the x axis (axis 1 of NHWC), columns the y axis.
A = np.array([[1., 2., 4.],
              [0., 3., 5.],
              [2., 2., 7.]])
B = np.array([[0., 0., 1.],
              [1., 0., 0.],
              [0., 2., 0.]])
# g[i] = a[i+1] - a[i-1] with replicate padding (a[-1] = a[0], a[3] = a[2]), worked by hand.
A_GX = np.array([[-1., 1., 1.], [1., 0., 3.], [2., -1., 2.]])
A_GY = np.array([[1., 3., 2.], [3., 5., 2.], [0., 5., 5.]])
B_GX = np.array([[1., 0., -1.], [0., 2., -1.], [-1., 2., 0.]])
B_GY = np.array([[0., 1., 1.], [-1., -1., 0.], [2., 0., -2.]])


def _nhwc(*arrays: np.ndarray) -> jnp.ndarray:
  """Stacks 2-D arrays into a [B, H, W, 1] float32 batch."""
  return jnp.asarray(np.stack(arrays)[..., None], jnp.float32)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
  """Textbook zero-normalised cross-correlation (float64, no eps)."""
  da, db = a - a.mean(), b - b.mean()
  return float((da * db).sum() / np.sqrt((da * da).sum() * (db * db).sum()))


def _random_images(seed: int, batch: int = 2, size: int = 8) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 1)),
                     jnp.float32)


def test_lsgan_values():
  d_fake = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  # G: mean((d - 1)^2) = (1 + 0 + 1 + 4) / 4.
  assert float(losses.lsgan_generator_loss(d_fake)) == pytest.approx(1.5)
  d_real = jnp.array([1.0, 0.0, 3.0])
  # D: 0.5 * (mean((r - 1)^2) + mean(f^2)) = 0.5 * ((0 + 1 + 4) / 3 + (0 + 1 + 4 + 1) / 4).
  expected = 0.5 * (5 / 3 + 6 / 4)
  assert float(losses.lsgan_discriminator_loss(d_real, d_fake)) == pytest.approx(expected)
  # A perfect discriminator has zero loss; a perfectly fooled generator too.
  assert float(losses.lsgan_discriminator_loss(jnp.ones(4), jnp.zeros(4))) == 0.0
  assert float(losses.lsgan_generator_loss(jnp.ones(4))) == 0.0


def test_l1_values():
  rec = jnp.array([[0.5, -0.5], [1.0, 0.0]])
  orig = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  assert float(losses.cycle_l1(rec, orig)) == pytest.approx(0.5)
  assert float(losses.identity_l1(rec, orig)) == pytest.approx(0.5)
  assert float(losses.cycle_l1(orig, orig)) == 0.0


def test_image_gradients_hand_computed():
  gx, gy = losses.image_gradients(_nhwc(A, B))
  np.testing.assert_array_equal(gx[..., 0], np.stack([A_GX, B_GX]))
  np.testing.assert_array_equal(gy[..., 0], np.stack([A_GY, B_GY]))


def test_gradient_correlation_hand_computed():
  a, b = _nhwc(A), _nhwc(B)
  expected_signed = 0.5 * (_ncc(A_GX, B_GX) + _ncc(A_GY, B_GY))
  expected_magnitude = 0.5 * (_ncc(abs(A_GX), abs(B_GX)) + _ncc(abs(A_GY), abs(B_GY)))
  assert expected_signed != pytest.approx(expected_magnitude)  # the case tells them apart
  np.testing.assert_allclose(losses.gradient_correlation(a, b, signed=True), [expected_signed],
                             rtol=1e-5)
  np.testing.assert_allclose(losses.gradient_correlation(a, b), [expected_magnitude], rtol=1e-5)


def test_gradient_correlation_identity_and_negation():
  a = _random_images(0)
  np.testing.assert_allclose(losses.gradient_correlation(a, a), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(losses.gradient_correlation(a, a, signed=True), [1.0, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.gradient_correlation(a, -a), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(losses.gradient_correlation(a, -a, signed=True), [-1.0, -1.0],
                             rtol=1e-6)


@pytest.mark.parametrize('scale,offset', [(3.0, 0.5), (0.25, -2.0), (-2.0, 1.0)])
def test_gradient_correlation_affine_invariance(scale, offset):
  a, b = _random_images(1), _random_images(2)
  base = losses.gradient_correlation(a, b)
  np.testing.assert_allclose(losses.gradient_correlation(a, scale * b + offset), base,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.gradient_correlation(scale * a + offset, b), base,
                             rtol=1e-5, atol=1e-6)
  signed = losses.gradient_correlation(a, b, signed=True)
  np.testing.assert_allclose(losses.gradient_correlation(a, scale * b + offset, signed=True),
                             np.sign(scale) * signed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('signed', [False, True])
def test_gradient_correlation_constant_image_is_zero_with_finite_gradient(signed):
  const = jnp.full((2, 8, 8, 1), 0.3, jnp.float32)
  other = _random_images(3)
  # Zero gradients carry no evidence of correlation: GC is defined as 0 there.
  np.testing.assert_array_equal(losses.gradient_correlation(const, other, signed), [0.0, 0.0])
  np.testing.assert_array_equal(losses.gradient_correlation(const, const, signed), [0.0, 0.0])
  loss_fn = lambda x, y: losses.gc_loss(x, y, x, y, signed=signed)
  for x, y in ((const, other), (other, const), (const, const)):
    assert float(loss_fn(x, y)) == pytest.approx(1.0)
    for grad in jax.grad(loss_fn, argnums=(0, 1))(x, y):
      assert bool(jnp.all(jnp.isfinite(grad)))


def test_gc_loss_value():
  x_ct, y_mr = _random_images(4), _random_images(5)
  g_mr_of_x, g_ct_of_y = _random_images(6), _random_images(7)
  gc_ct = losses.gradient_correlation(x_ct, g_mr_of_x)
  gc_mr = losses.gradient_correlation(y_mr, g_ct_of_y)
  expected = 0.5 * (np.mean(1 - gc_ct) + np.mean(1 - gc_mr))
  assert float(losses.gc_loss(x_ct, g_mr_of_x, y_mr, g_ct_of_y)) == pytest.approx(expected)
  # Translations that keep every edge (up to an affine intensity map) cost nothing.
  assert float(losses.gc_loss(x_ct, 1 - 2 * x_ct, y_mr, 0.5 * y_mr + 0.1)) == pytest.approx(
      0.0, abs=1e-6)


@pytest.mark.parametrize('signed', [False, True])
def test_gc_loss_gradient_check(signed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(8)
    args = [jnp.asarray(rng.uniform(-1, 1, (2, 6, 6, 1))) for _ in range(4)]
    fn = lambda *a: losses.gc_loss(*a, signed=signed)
    jax.test_util.check_grads(fn, args, order=1, modes=('fwd', 'rev'), eps=1e-6)
