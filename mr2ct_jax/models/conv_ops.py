"""A convolution whose backward pass is im2col matmuls, for XLA:CPU.

XLA:CPU's forward convs (YNNPACK) run close to matmul speed when they are padded, but its
gradient convs are uneven: a stride-2 conv's kernel gradient becomes a dilated convolution,
the input gradient of a strided conv a conv over a zero-dilated input, and kernel gradients
in general run well below matmul speed. `conv2d` keeps XLA's forward conv (a full im2col +
matmul forward is no faster) and writes the VJP as two matmuls plus col2im:

    cols     = concat_{i, j} xp[:, i::s, j::s]   [B*Ho*Wo, kh*kw*Cin], xp = zero-padded input
    d_kernel = cols^T @ dy    (a dot_general contracting the pixel axis: no transpose copy)
    d_cols   = dy @ kernel^T  -> d_xp = sum_{i, j} (d_cols[..., (i, j), :] scattered back
                                 to the window offset (i, j) with stride s)

The scatter of each tap is an `lax.pad` (low = offset, interior = stride - 1), so col2im is
one fused elementwise loop. `cols` is rebuilt in the backward pass rather than saved: it is
kh*kw times the input, and rebuilding it is a copy, cheap next to the matmul. Reflect padding
is left to the caller (autodiff handles its adjoint); zero padding is the `pad` argument.

`conv_transpose2d` is the same pair of maps read the other way round: a transposed conv is
the input gradient of a strided conv, so its forward is one matmul to kh*kw taps plus
col2im (an overlap-add), and its backward is im2col of the output gradient plus two matmuls.
Every pixel costs exactly kh*kw taps and the matmuls are wide (N = kh*kw*Cout), where XLA
lowers a strided `conv_transpose` to a conv over a zero-dilated input (stride^2 times the
arithmetic) whose gradients take XLA:CPU's slow conv paths.

In a 16-bit compute dtype (bfloat16, float16) every conv here is matmuls, the forward too:
XLA:CPU's bfloat16 convolution runs at a fraction of its bfloat16 matmul speed (on a Xeon with
AMX-BF16, ~220 against ~1,450 GFLOP/s, issue 16), so the forward is im2col + one matmul. Every
matmul takes 16-bit inputs and accumulates in float32 (`preferred_element_type`); col2im sums
and the result stay float32 until one final rounding to the compute dtype. In float32 the
programs are unchanged (XLA's forward conv, float32 matmuls).
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


def low_precision(dtype: jnp.dtype) -> bool:
  """Whether `dtype` is a 16-bit float whose matmuls accumulate in float32 here."""
  return jnp.dtype(dtype).itemsize < 4


def accumulation(*arrays: Array) -> jnp.dtype | None:
  """`preferred_element_type` for a dot of `arrays`: float32 if any is 16-bit, else None.

  None keeps the float32 programs exactly as they were (XLA's default result type).
  """
  return jnp.float32 if any(low_precision(a.dtype) for a in arrays) else None


def _matmul(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """2-D dot contracting a's axis contract[0] with b's axis contract[1] (no transposes).

  16-bit inputs give a float32 result (float32 accumulation).
  """
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=accumulation(a, b))


Pad = int | tuple[tuple[int, int], tuple[int, int]]


def _pairs(pad: Pad) -> tuple[tuple[int, int], tuple[int, int]]:
  """`pad` as ((top, bottom), (left, right))."""
  return ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad


def _zero_pad(x: Array, pad: Pad) -> Array:
  (t, b), (l, r) = _pairs(pad)
  return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0))) if t or b or l or r else x


def _forward(x: Array, kernel: Array, stride: int, pad: Pad) -> Array:
  if low_precision(x.dtype):
    # im2col + one matmul: XLA:CPU's 16-bit convs are far slower than its 16-bit matmuls.
    kh, kw, cin, cout = kernel.shape
    xp = _zero_pad(x, pad)
    b, hp, wp, _ = xp.shape
    y = _matmul(im2col(xp, kh, kw, stride), kernel.reshape(kh * kw * cin, cout), (1, 0))
    shape = (b, _out_size(hp, kh, stride), _out_size(wp, kw, stride), cout)
    return y.reshape(shape).astype(x.dtype)
  if _pairs(pad) == ((0, 0), (0, 0)) and stride == 1:
    # XLA:CPU runs an unpadded conv much slower than a padded one: pad one zero row at
    # the bottom and drop its output row (the same numbers).
    return lax.conv_general_dilated(x, kernel, (1, 1), ((0, 1), (0, 0)),
                                    dimension_numbers=_DN)[:, :-1]
  return lax.conv_general_dilated(x, kernel, (stride, stride), _pairs(pad),
                                  dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, stride: int = 1, pad: Pad = 0) -> Array:
  """Conv of NHWC `x` with HWIO `kernel`, `stride` and zero padding `pad`.

  `pad` is an int (every side) or ((top, bottom), (left, right)), hashable as it is a static
  argument. Returns [B, (H + top + bottom - kh) // stride + 1, ..., Cout]. Forward: XLA's
  conv in float32, im2col + a float32-accumulating matmul in 16-bit dtypes. Backward: the
  im2col matmuls + col2im of the module docstring.
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


def _transpose_geometry(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                        pad: int, output_padding: int) -> tuple[int, int, int, int]:
  """(full_h, full_w, out_h, out_w): the overlap-add canvas and the cropped output size."""
  kh, kw = kernel_shape[:2]
  h, w = x_shape[1:3]
  full_h, full_w = (h - 1) * stride + kh, (w - 1) * stride + kw
  return (full_h, full_w, full_h - 2 * pad + output_padding,
          full_w - 2 * pad + output_padding)


def _crop_or_pad(z: Array, start: int, size_h: int, size_w: int) -> Array:
  """z[:, start:start + size_h, start:start + size_w], zero-extended past the end."""
  extra_h = max(0, start + size_h - z.shape[1])
  extra_w = max(0, start + size_w - z.shape[2])
  if extra_h or extra_w:
    z = jnp.pad(z, ((0, 0), (0, extra_h), (0, extra_w), (0, 0)))
  return z[:, start:start + size_h, start:start + size_w]


def _taps_by_input(kernel: Array) -> Array:
  """HWIO kernel [kh, kw, Cin, Cout] -> [kh*kw*Cout, Cin], rows in im2col's (i, j, c) order."""
  kh, kw, cin, cout = kernel.shape
  return kernel.transpose(0, 1, 3, 2).reshape(kh * kw * cout, cin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_transpose2d(x: Array, kernel: Array, stride: int, pad: int,
                     output_padding: int = 0) -> Array:
  """PyTorch `conv_transpose2d` of NHWC `x` with `kernel` [kh, kw, Cin, Cout], no bias.

  kernel[i, j, c, o] == torch weight[c, o, i, j]. Output [B, (H - 1) * stride - 2 pad + kh +
  output_padding, ..., Cout], as `nn.ConvTranspose2d(stride, padding, output_padding)`.
  """
  b, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  full_h, full_w, out_h, out_w = _transpose_geometry(x.shape, kernel.shape, stride, pad,
                                                     output_padding)
  taps = _matmul(x.reshape(b * h * w, cin), _taps_by_input(kernel), (1, 1))
  full = col2im(taps, (b, full_h, full_w, cout), kh, kw, stride)
  return _crop_or_pad(full, pad, out_h, out_w).astype(x.dtype)


def _conv_transpose2d_fwd(x, kernel, stride, pad, output_padding):
  return conv_transpose2d(x, kernel, stride, pad, output_padding), (x, kernel)


def _conv_transpose2d_bwd(stride, pad, output_padding, residuals, dy):
  x, kernel = residuals
  b, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  full_h, full_w, _, _ = _transpose_geometry(x.shape, kernel.shape, stride, pad,
                                             output_padding)
  # The output gradient placed back on the overlap-add canvas (zero where output was cropped).
  d_full = jnp.pad(dy, ((0, 0), (pad, 0), (pad, 0), (0, 0)))
  d_full = _crop_or_pad(d_full, 0, full_h, full_w)
  cols = im2col(d_full, kh, kw, stride)                       # [B*H*W, kh*kw*Cout]
  dx = _matmul(cols, _taps_by_input(kernel), (1, 0)).reshape(x.shape)
  d_taps = _matmul(cols, x.reshape(b * h * w, cin), (0, 0))   # [kh*kw*Cout, Cin]
  d_kernel = d_taps.reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


conv_transpose2d.defvjp(_conv_transpose2d_fwd, _conv_transpose2d_bwd)
