"""Layers the CycleGAN reference uses that flax lacks, with several code paths for the convs.

Every conv layer takes `conv_impl` (`options.CONV_IMPLS`); all of them compute the same
function with the same parameters (tests/test_models.py), so a checkpoint moves freely
between them. Which path is fastest where is measured in the README's Benchmarks section.

- 'matmul': the hand-written forms below: forward convs as XLA convolutions, backward
  passes as im2col matmuls (and a matmul-based stride-2 transposed conv), because XLA:CPU's
  gradient convolutions run at a fraction of matmul speed.
- 'winograd': 'matmul', except that the residual blocks' 3x3 convs (most of the arithmetic)
  run as Winograd F(2x2, 3x3) (`winograd.py`): 2.25x fewer multiplications in the forward
  pass and in both gradients, agreeing with the direct conv to float32 rounding.
- 'xla': XLA's own convolutions and their autodiff gradients (cuDNN on GPUs).
- 'auto' (the default): the path measured fastest on JAX's default backend for the compute
  dtype (`options.resolve_conv_impl`).

In a 16-bit compute dtype (`model.dtype='bfloat16'`) 'matmul' and 'winograd' compute every
conv, forward and both gradients, as matmuls with 16-bit inputs and float32 accumulation
(`conv_ops`, `winograd`): XLA:CPU's 16-bit convolutions are slow, its 16-bit matmuls use the
matrix units (AMX, AVX512-BF16). The res-block convs `conv_valid` would run as XLA convs go
through `conv_ops.conv2d` (im2col) instead. Parameters stay float32 (cast per layer).

The 'matmul' forms:

- `reflect_pad`: PyTorch `nn.ReflectionPad2d` (edge pixel not repeated).
- `Conv`: `nn.Conv` with zero padding and the same parameters, through `conv_ops.conv2d`
  (XLA's conv forward, im2col matmuls backward: XLA:CPU's strided gradient convs are slow).
- `ReflectConv`: reflect padding + stride-1 conv with bias, parameters as `nn.Conv`'s.
  XLA:CPU (YNNPACK convs) runs a convolution without padding much slower than the same one
  with padding, so the unpadded ("VALID") conv after a reflect pad is computed with one
  extra zero row at the bottom whose output row is dropped (`conv_valid`); its backward is
  hand-written too (padded input-gradient conv, kernel gradient as matmuls). A conv to a
  single output channel (the generator's last layer) is slower still, forward and backward,
  so it is written as one matmul to kh*kw planes plus shifted sums (`conv_to_one_channel`),
  with a hand-written backward of two matmuls. A conv from a narrow input (the 7x7 stem)
  goes through `conv_ops.conv2d`, whose im2col is small there.
- `instance_norm`: PyTorch `nn.InstanceNorm2d(affine=False)` (per image and channel, biased
  variance, eps 1e-5, no parameters); statistics in float32 whatever the compute dtype.
- `UpConv2x`: PyTorch `nn.ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`,
  through `conv_ops.conv_transpose2d` (a matmul to the 9 taps per input pixel and an
  overlap-add). XLA lowers a stride-2 transposed conv to a conv over a zero-dilated input,
  which does 4x the arithmetic and takes a slow path in the backward pass.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mr2ct_jax.models import conv_ops
from mr2ct_jax.models import options
from mr2ct_jax.models import winograd

Array = jax.Array
_DN = ('NHWC', 'HWIO', 'NHWC')
# Largest kh*kw*Cin for which `ReflectConv` uses `conv_ops.conv2d` (im2col backward).
_SMALL_IM2COL = 256


# Winograd output tile of the 'winograd' path: F(2x2, 3x3). F(4x4, 3x3) does fewer
# multiplications still, but its 36 matmuls of a quarter as many rows ran slower (README).
WINOGRAD_TILE = 2
# Fewest input channels for Winograd: its transforms cost per channel what the matmuls save
# per channel pair, so narrow convs gain nothing.
WINOGRAD_MIN_CHANNELS = 64
# F(4x4, 3x3) instead, in float32, for a conv with at least this many output pixels (batch
# x height x width): then its 36 matmuls have rows enough to run at the matmul ceiling, and
# it does 1/4 of the direct conv's multiplications against F(2x2)'s 1/2.25. Measured on
# generator inference at batch 8 (README, Benchmarks); training at batch 1 (4096 pixels
# per residual-block conv at 256^2) keeps F(2x2).
WINOGRAD4_MIN_PIXELS = 8192


def winograd_tile(padded_shape: tuple[int, ...], dtype: Any) -> int:
  """The Winograd output tile for a 3x3 conv of the padded NHWC input `padded_shape`."""
  b, hp, wp = padded_shape[:3]
  if jnp.dtype(dtype) == jnp.float32 and b * (hp - 2) * (wp - 2) >= WINOGRAD4_MIN_PIXELS:
    return 4
  return WINOGRAD_TILE


def check_conv_impl(conv_impl: str, backend: str | None = None,
                    dtype: Any = jnp.float32) -> str:
  """The concrete code path for `conv_impl` ('auto' resolved for `backend` and `dtype`).

  Args:
    conv_impl: one of `options.CONV_IMPLS`; anything else is a ValueError naming it.
    backend: 'cpu', 'gpu', 'tpu'...; None: JAX's default backend.
    dtype: the compute dtype (a dtype or one of `options.DTYPE_NAMES`).

  Returns:
    'winograd', 'matmul' or 'xla'.
  """
  return options.resolve_conv_impl(conv_impl, backend or jax.default_backend(),
                                   jnp.dtype(dtype).name)


_DTYPES = {name: jnp.dtype(name) for name in options.DTYPE_NAMES}


def compute_dtype(name: str) -> jnp.dtype:
  """The JAX compute dtype named `name` (one of `options.DTYPE_NAMES`)."""
  if name not in _DTYPES:
    raise ValueError(f'dtype={name!r}: must be one of {options.DTYPE_NAMES}')
  return _DTYPES[name]


def xla_conv(x: Array, kernel: Array, stride: int = 1, pad: int = 0) -> Array:
  """Zero-padded conv of NHWC `x` with HWIO `kernel` as one XLA convolution ('xla' path)."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=_DN)


def reflect_pad(x: Array, pad: int) -> Array:
  """Reflection-pads the two spatial axes of NHWC `x` by `pad` (like `nn.ReflectionPad2d`)."""
  if pad == 0:
    return x
  if pad >= min(x.shape[1], x.shape[2]):
    raise ValueError(f'reflect_pad: pad {pad} needs spatial size > pad, got {x.shape[1:3]}')
  # Concatenating mirrored slices; equal to jnp.pad(mode='reflect') but built from a single
  # concatenate per axis, which XLA fuses into one copy.
  top = jnp.flip(x[:, 1:pad + 1], axis=1)
  bottom = jnp.flip(x[:, -pad - 1:-1], axis=1)
  x = jnp.concatenate([top, x, bottom], axis=1)
  left = jnp.flip(x[:, :, 1:pad + 1], axis=2)
  right = jnp.flip(x[:, :, -pad - 1:-1], axis=2)
  return jnp.concatenate([left, x, right], axis=2)


def instance_norm(x: Array, eps: float = 1e-5) -> Array:
  """Normalises each image and channel of NHWC `x` over H, W (no affine parameters)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  centred = x32 - mean
  var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
  return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@jax.custom_vjp
def conv_valid(x: Array, kernel: Array) -> Array:
  """Stride-1 unpadded conv of NHWC `x` with HWIO `kernel` ([B, H-kh+1, W-kw+1, Cout]).

  Computed with a zero row appended at the bottom and its output row dropped: the same
  numbers, but XLA:CPU then takes its fast (padded) conv path. The backward pass is written
  out too: XLA:CPU's kernel-gradient convolution runs at a fraction of matmul speed, so the
  kernel gradient is kh matmuls of column-shifted copies of `x` with the output gradient.
  (A single im2col matmul, as in `conv_ops.conv2d`, was slower here: the res-block columns
  would be large.)
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 1), (0, 0)),
                                      dimension_numbers=_DN)[:, :-1]


def _conv_valid_fwd(x, kernel):
  return conv_valid(x, kernel), (x, kernel)


def _conv_valid_bwd(residuals, dy):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  h, w = dy.shape[1:3]
  # Input gradient: the full (padded, so fast) correlation of dy with the flipped kernel.
  # The kernel is read as HWOI rather than transposed: XLA:CPU's transposing copy of a
  # [3, 3, 256, 256] kernel took as long as a quarter of the conv.
  dx = jax.lax.conv_general_dilated(dy, jnp.flip(kernel, (0, 1)), (1, 1),
                                    ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                    dimension_numbers=('NHWC', 'HWOI', 'NHWC'))
  # Kernel gradient: cols[b, r, c, (j, i)] = x[b, r, c + j, i]; tap row t is the product of
  # dy with rows t..t+h of cols, contracted over batch and pixels.
  cols = jnp.concatenate([x[:, :, j:j + w] for j in range(kw)], axis=-1)
  rows = [jnp.einsum('bhwo,bhwk->ok', dy, cols[:, t:t + h]) for t in range(kh)]
  dk = jnp.stack(rows).reshape(kh, cout, kw, cin).transpose(0, 2, 3, 1)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


@jax.custom_vjp
def _one_channel(xp: Array, taps: Array) -> Array:
  """VALID conv of [B, H', W', C] with kh*kw taps [kh, kw, C] to [B, H, W] (1 channel)."""
  kh, kw, c = taps.shape
  b, hp, wp, _ = xp.shape
  h, w = hp - kh + 1, wp - kw + 1
  # planes[b, i, j] = xp . taps[i, j]: one matmul; the conv is the sum of shifted planes
  # (both float32 for 16-bit inputs, rounded once at the end).
  planes = jnp.einsum('bhwc,ijc->bijhw', xp, taps,
                      preferred_element_type=conv_ops.accumulation(xp, taps))
  rows = sum(planes[:, :, j, :, j:j + w] for j in range(kw))   # [B, kh, H', W]
  return sum(rows[:, i, i:i + h] for i in range(kh)).astype(xp.dtype)


def _one_channel_fwd(xp, taps):
  return _one_channel(xp, taps), (xp, taps)


def _one_channel_bwd(residuals, dy):
  xp, taps = residuals
  kh, kw, _ = taps.shape
  # shifted[b, i, j, h', w'] = dy[b, h' - i, w' - j]: the gradient of every plane.
  shifted = jnp.stack([
      jnp.stack([jnp.pad(dy, ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j))) for j in range(kw)],
                axis=1) for i in range(kh)], axis=1)
  acc = conv_ops.accumulation(shifted, taps)
  d_xp = jnp.einsum('bijhw,ijc->bhwc', shifted, taps, preferred_element_type=acc)
  d_taps = jnp.einsum('bijhw,bhwc->ijc', shifted, xp, preferred_element_type=acc)
  return d_xp.astype(xp.dtype), d_taps.astype(taps.dtype)


_one_channel.defvjp(_one_channel_fwd, _one_channel_bwd)


def conv_to_one_channel(x: Array, kernel: Array) -> Array:
  """`conv_valid` for a kernel [kh, kw, C, 1]: returns [B, H-kh+1, W-kw+1, 1]."""
  return _one_channel(x, kernel[..., 0])[..., None]


def add_bias(y: Array, bias: Array) -> Array:
  """`y + bias` in float32, rounded to y's dtype: the bias gradient (a sum over every pixel)
  is then summed in float32, where a 16-bit sum of thousands of terms loses most digits."""
  return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


class ReflectConv(nn.Module):
  """`nn.ReflectionPad2d(pad)` + `nn.Conv2d(features, kernel_size)` (stride 1, bias).

  Parameters `kernel` [k, k, Cin, features] and `bias` [features], as `nn.Conv`.
  """
  features: int
  kernel_size: int
  pad: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, Cin] to [B, H + 2 pad - k + 1, ..., features]."""
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.normal(0.02),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x = reflect_pad(x.astype(self.dtype), self.pad)
    kernel = kernel.astype(self.dtype)
    impl = check_conv_impl(self.conv_impl, dtype=self.dtype)
    if impl == 'xla':
      y = xla_conv(x, kernel)
    elif self.features == 1:
      y = conv_to_one_channel(x, kernel)
    elif k * k * x.shape[-1] <= _SMALL_IM2COL:
      # A narrow input (the stem: 1 or 2 channels, 7x7): its im2col is small, and the
      # backward as im2col matmuls beats `conv_valid`'s per-row kernel gradient and its
      # input-gradient conv to a single channel (README, Benchmarks).
      y = conv_ops.conv2d(x, kernel, 1, 0)
    elif impl == 'winograd' and k == 3 and x.shape[-1] >= WINOGRAD_MIN_CHANNELS:
      y = winograd.conv3x3_valid(x, kernel, winograd_tile(x.shape, self.dtype))
    elif conv_ops.low_precision(self.dtype):
      # `conv_valid` is an XLA conv forward and backward; in 16 bits that is the slow path.
      y = conv_ops.conv2d(x, kernel, 1, 0)
    else:
      y = conv_valid(x, kernel)
    return add_bias(y, bias)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k), strides=stride, padding=pad)` with bias, same parameters.

  Computed by `conv_ops.conv2d`, whose backward pass is im2col matmuls: XLA:CPU's own
  gradient convs of strided and wide convs run at a fraction of matmul speed.
  """
  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if check_conv_impl(self.conv_impl, dtype=self.dtype) == 'xla':
      y = xla_conv(x, kernel, self.stride, self.pad)
    else:
      y = conv_ops.conv2d(x, kernel, self.stride, self.pad)
    return add_bias(y, bias)


def xla_upconv2x(x: Array, kernel: Array) -> Array:
  """`upconv2x` as XLA's transposed conv: a conv of the 2x zero-dilated input ('xla' path).

  Output pixel 2a - 1 + i gets x[a] @ kernel[i]: the correlation of the dilated input,
  zero-padded by k - 1 - padding = 1 before and 1 + output_padding = 2 after, with the
  spatially flipped kernel.
  """
  return jax.lax.conv_general_dilated(x, jnp.flip(kernel, (0, 1)), (1, 1), ((1, 2), (1, 2)),
                                      lhs_dilation=(2, 2), dimension_numbers=_DN)


def upconv2x(x: Array, kernel: Array) -> Array:
  """Transposed conv, k=3, stride 2, padding 1, output_padding 1, in PyTorch semantics.

  Args:
    x: [B, H, W, Cin].
    kernel: [3, 3, Cin, Cout]; kernel[kh, kw, i, o] == torch weight[i, o, kh, kw].

  Returns:
    [B, 2H, 2W, Cout] (no bias), via `conv_ops.conv_transpose2d` (one matmul to the 9 taps
    and an overlap-add: exactly the transposed conv's arithmetic, in wide matmuls).
  """
  return conv_ops.conv_transpose2d(x, kernel, 2, 1, 1)


class UpConv2x(nn.Module):
  """`nn.ConvTranspose2d(features, 3, stride=2, padding=1, output_padding=1)` with bias.

  Parameters: `kernel` [3, 3, Cin, features] (kernel[kh, kw, i, o] == torch weight[i, o, kh,
  kw]) and `bias` [features], the same count as the PyTorch layer.
  """
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Upsamples [B, H, W, Cin] to [B, 2H, 2W, features]."""
    kernel = self.param('kernel', nn.initializers.normal(0.02),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl = check_conv_impl(self.conv_impl, dtype=self.dtype)
    up = xla_upconv2x if impl == 'xla' else upconv2x
    return add_bias(up(x, kernel), bias)
