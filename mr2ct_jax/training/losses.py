"""Pure loss functions of the CycleGAN + gradient-consistency objective.

Images are NHWC arrays in the model range [-1, 1]. Every function is a plain jnp function
(jit-, grad- and vmap-friendly) with no state.

The objective (Hiasa et al. 2018, Eqs. 1-5, with the LSGAN form of the CycleGAN reference):
  L_G = lsgan_g(D_CT(G_CT(y))) + lsgan_g(D_MR(G_MR(x)))
        + lambda_cyc * L_cycle + lambda_GC * L_GC (+ lambda_idt * L_identity)
  L_D = lsgan_d(D_CT(x), D_CT(pool(G_CT(y)))), likewise for D_MR,
with x a CT and y an MR image.
"""

import jax
import jax.numpy as jnp


def lsgan_generator_loss(d_fake: jax.Array) -> jax.Array:
  """Least-squares GAN loss of a generator: mean((D(fake) - 1)^2).

  Args:
    d_fake: discriminator logits on synthesised images, any shape.

  Returns:
    A scalar.
  """
  return jnp.mean(jnp.square(d_fake - 1.0))


def lsgan_discriminator_loss(d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
  """Least-squares GAN loss of a discriminator, halved as in the CycleGAN reference.

  0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2)); the halving slows D relative to G.

  Args:
    d_real: discriminator logits on real images.
    d_fake: discriminator logits on (pooled) synthesised images.

  Returns:
    A scalar.
  """
  return 0.5 * (jnp.mean(jnp.square(d_real - 1.0)) + jnp.mean(jnp.square(d_fake)))


def cycle_l1(reconstructed: jax.Array, original: jax.Array) -> jax.Array:
  """Cycle-consistency L1: mean |G_back(G_forth(a)) - a| over all pixels and the batch."""
  return jnp.mean(jnp.abs(reconstructed - original))


def identity_l1(same_domain_output: jax.Array, original: jax.Array) -> jax.Array:
  """Identity L1: mean |G_CT(ct) - ct| (a generator fed its own target domain)."""
  return jnp.mean(jnp.abs(same_domain_output - original))


def image_gradients(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Central-difference gradients along x (axis 1) and y (axis 2), replicate padding.

  Matches the 'default' kernel [-1, 0, +1] of yuta-hi/pytorch_similarity
  (`GradientCorrelation2d`): g[i] = a[i+1] - a[i-1], with a[-1] = a[0] and a[n] = a[n-1] at
  the borders (so a border gradient is a one-sided difference). No 1/2 factor: the
  correlation below is scale invariant.

  Args:
    images: [B, H, W, C].

  Returns:
    (gx, gy), each [B, H, W, C].
  """
  if images.ndim != 4:
    raise ValueError(f'image_gradients: expected [B, H, W, C], got shape {images.shape}')
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  gx = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
  gy = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
  return gx, gy


def normalized_cross_correlation(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Zero-normalised cross-correlation per sample and channel, averaged over channels.

  NCC = sum(da * db) / sqrt((sum(da^2) + eps) * (sum(db^2) + eps)), da = a - mean(a) over
  H and W. Each variance gets its own eps (rather than the reference's
  `/ (sqrt(sxx * syy) + eps)`), which keeps the value in [-1, 1] and the gradient finite
  where an image is constant: the reference form differentiates sqrt at 0 there, which is
  NaN under autodiff. For a constant input the numerator is exactly 0, so NCC = 0 ("no
  evidence of correlation"). For non-constant inputs the eps perturbs the value by about
  eps / sum(da^2), far below float32 resolution for any real image.

  Args:
    a: [B, H, W, C].
    b: [B, H, W, C].
    eps: added to each sum of squared deviations.

  Returns:
    [B] correlations in [-1, 1].
  """
  da = a - jnp.mean(a, axis=(1, 2), keepdims=True)
  db = b - jnp.mean(b, axis=(1, 2), keepdims=True)
  sab = jnp.sum(da * db, axis=(1, 2))
  saa = jnp.sum(da * da, axis=(1, 2))
  sbb = jnp.sum(db * db, axis=(1, 2))
  ncc = sab * jax.lax.rsqrt((saa + eps) * (sbb + eps))
  return jnp.mean(ncc, axis=-1)


def gradient_correlation(a: jax.Array, b: jax.Array, signed: bool = False,
                         eps: float = 1e-8) -> jax.Array:
  """Gradient correlation GC(A, B) = 0.5 * [NCC(gx A, gx B) + NCC(gy A, gy B)] per sample.

  Args:
    a: [B, H, W, C].
    b: [B, H, W, C].
    signed: False (default) correlates gradient magnitudes |gx|, |gy| as the first author's
      public code does, so edges with inverted MR/CT contrast still count as agreement;
      True uses the paper's literal signed gradients (GC(A, -A) = -1).
    eps: see `normalized_cross_correlation`.

  Returns:
    [B] values in [-1, 1]; 1 for identical images, 0 where either image is constant.
  """
  ax, ay = image_gradients(a)
  bx, by = image_gradients(b)
  if not signed:
    ax, ay, bx, by = jnp.abs(ax), jnp.abs(ay), jnp.abs(bx), jnp.abs(by)
  return 0.5 * (normalized_cross_correlation(ax, bx, eps) +
                normalized_cross_correlation(ay, by, eps))


def gc_loss(x_ct: jax.Array, g_mr_of_x: jax.Array, y_mr: jax.Array, g_ct_of_y: jax.Array,
            signed: bool = False, eps: float = 1e-8) -> jax.Array:
  """Gradient-consistency loss of Eq. (5): each input against its own translation.

  L_GC = 0.5 * [mean(1 - GC(x, G_MR(x))) + mean(1 - GC(y, G_CT(y)))].

  Args:
    x_ct: real CT batch.
    g_mr_of_x: G_MR(x), the synthetic MR of that batch.
    y_mr: real MR batch.
    g_ct_of_y: G_CT(y), the synthetic CT of that batch.
    signed: see `gradient_correlation`.
    eps: see `normalized_cross_correlation`.

  Returns:
    A scalar in [0, 2].
  """
  gc_ct = gradient_correlation(x_ct, g_mr_of_x, signed, eps)
  gc_mr = gradient_correlation(y_mr, g_ct_of_y, signed, eps)
  return 0.5 * (jnp.mean(1.0 - gc_ct) + jnp.mean(1.0 - gc_mr))
