"""A convolution whose backward pass is im2col matmuls, for XLA:CPU.

XLA:CPU's forward convs (YNNPACK) run close to matmul speed when they are padded, but its
gradient convs are uneven: a stride-2 conv's kernel gradient becomes a dilated convolution,
the input gradient of a strided conv a conv over a zero-dilated input, and kernel gradients
in general run well below matmul speed. `conv2d` keeps XLA's forward conv (a full im2col +
matmul forward measured no faster here) and writes the VJP as two matmuls plus col2im:

    cols     = concat_{i, j} xp[:, i::s, j::s]   [B*Ho*Wo, kh*kw*Cin], xp = zero-padded input
    d_kernel = cols^T @ dy    (a dot_general contracting the pixel axis: no transpose copy)
    d_cols   = dy @ kernel^T  -> d_xp = sum_{i, j} (d_cols[..., (i, j), :] scattered back
                                 to the window offset (i, j) with stride s)

The scatter of each tap is an `lax.pad` (low = offset, interior = stride - 1), so col2im is
one fused elementwise loop. `cols` is rebuilt in the backward pass rather than saved: it is
kh*kw times the input, and rebuilding it is a copy, cheap next to the matmul. Reflect padding
is left to the caller (autodiff handles its adjoint); zero padding is the `pad` argument.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_DN = ('NHWC', 'HWIO', 'NHWC')


def _out_size(size: int, k: int, stride: int) -> int:
  return (size - k) // stride + 1


def im2col(xp: Array, kh: int, kw: int, stride: int) -> Array:
  """[B, Hp, Wp, C] -> [B*Ho*Wo, kh*kw*C], taps in (i, j, c) order (as an HWIO kernel)."""
  b, hp, wp, c = xp.shape
  ho, wo = _out_size(hp, kh, stride), _out_size(wp, kw, stride)
  taps = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
          for i in range(kh) for j in range(kw)]
  cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return cols.reshape(b * ho * wo, kh * kw * c)


def col2im(d_cols: Array, xp_shape: tuple[int, ...], kh: int, kw: int, stride: int) -> Array:
  """The adjoint of `im2col`: sums every tap's gradient back onto the padded input."""
  b, hp, wp, c = xp_shape
  ho, wo = _out_size(hp, kh, stride), _out_size(wp, kw, stride)
  d_cols = d_cols.reshape(b, ho, wo, kh, kw, c)
  zero = jnp.zeros((), d_cols.dtype)
  total = None
  for i in range(kh):
    for j in range(kw):
      # Tap (i, j) read xp[:, i + s*r, j + s*q]: put its gradient there, zeros elsewhere.
      hi_h = hp - (i + stride * (ho - 1) + 1)
      hi_w = wp - (j + stride * (wo - 1) + 1)
      part = lax.pad(d_cols[:, :, :, i, j], zero,
                     ((0, 0, 0), (i, hi_h, stride - 1), (j, hi_w, stride - 1), (0, 0, 0)))
      total = part if total is None else total + part
  return total


def _matmul(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """2-D dot contracting a's axis contract[0] with b's axis contract[1] (no transposes)."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())))


Pad = int | tuple[tuple[int, int], tuple[int, int]]


def _pairs(pad: Pad) -> tuple[tuple[int, int], tuple[int, int]]:
  """`pad` as ((top, bottom), (left, right))."""
  return ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad


def _zero_pad(x: Array, pad: Pad) -> Array:
  (t, b), (l, r) = _pairs(pad)
  return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0))) if t or b or l or r else x


def _forward(x: Array, kernel: Array, stride: int, pad: Pad) -> Array:
  if _pairs(pad) == ((0, 0), (0, 0)) and stride == 1:
    # XLA:CPU runs an unpadded conv ~2.5x slower than a padded one: pad one zero row at
    # the bottom and drop its output row (the same numbers).
    return lax.conv_general_dilated(x, kernel, (1, 1), ((0, 1), (0, 0)),
                                    dimension_numbers=_DN)[:, :-1]
  return lax.conv_general_dilated(x, kernel, (stride, stride), _pairs(pad),
                                  dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, stride: int = 1, pad: Pad = 0) -> Array:
  """Conv of NHWC `x` with HWIO `kernel`, `stride` and zero padding `pad`.

  `pad` is an int (every side) or ((top, bottom), (left, right)), hashable as it is a static
  argument. Returns [B, (H + top + bottom - kh) // stride + 1, ..., Cout]. Forward: XLA's conv. Backward:
  the im2col matmuls + col2im of the module docstring.
  """
  return _forward(x, kernel, stride, pad)


def _conv2d_fwd(x, kernel, stride, pad):
  return _forward(x, kernel, stride, pad), (x, kernel)


def _conv2d_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  xp = _zero_pad(x, pad)
  dy2 = dy.reshape(-1, cout)
  d_kernel = _matmul(im2col(xp, kh, kw, stride), dy2, (0, 0)).reshape(kernel.shape)
  d_xp = col2im(_matmul(dy2, kernel.reshape(kh * kw * cin, cout), (1, 1)), xp.shape,
                kh, kw, stride)
  h, w = x.shape[1:3]
  (top, _), (left, _) = _pairs(pad)
  dx = d_xp[:, top:top + h, left:left + w]
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
