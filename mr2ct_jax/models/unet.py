"""2-D U-Net (Ronneberger et al., MICCAI 2015) for the downstream segmentation.

Contracting path: per level two 3x3 conv + ReLU, then 2x2 max pooling; the filters double per
level (base_filters * 2**level, level 0..depth). Expanding path: 2x2 up-convolution (stride-2
transposed conv) halving the filters, concatenation with the skip of the same level, two 3x3
conv + ReLU. A 1x1 conv gives per-class logits. Unlike the original, the 3x3 convs are 'SAME'
padded, so the output has the input's size (the slices are 256x256 and the labels cover them
entirely; the original's valid convs would need an overlap-tile strategy). Weights are drawn
from N(0, 2/fan_in) as in the paper (He normal), biases zero. No normalisation layers, as in
the original: the model is a pure function of its parameters (no batch statistics to carry).

Parameters (f = base_filters, f_i = f * 2**i, c = in_channels, k = num_classes, d = depth):
  encoder level 0:      9 c f + f + 9 f^2 + f
  encoder level i >= 1: 9 f_{i-1} f_i + f_i + 9 f_i^2 + f_i
  decoder level i < d:  4 f_{i+1} f_i + f_i  (up-conv)  + 18 f_i^2 + f_i + 9 f_i^2 + f_i
  head:                 f k + k
`param_count` evaluates this formula.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def param_count(in_channels: int, num_classes: int, base_filters: int, depth: int) -> int:
  """Number of parameters of `UNet(...)`, from the closed formula in the module docstring."""
  f = [base_filters * 2 ** i for i in range(depth + 1)]
  total = 9 * in_channels * f[0] + f[0] + 9 * f[0] ** 2 + f[0]
  for i in range(1, depth + 1):
    total += 9 * f[i - 1] * f[i] + f[i] + 9 * f[i] ** 2 + f[i]
  for i in range(depth):
    total += 4 * f[i + 1] * f[i] + f[i] + 18 * f[i] ** 2 + f[i] + 9 * f[i] ** 2 + f[i]
  return total + f[0] * num_classes + num_classes


class DoubleConv(nn.Module):
  """Two 3x3 'SAME' conv + ReLU layers with `features` filters."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies both convolutions to NHWC `x`."""
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding='SAME', dtype=self.dtype,
                  kernel_init=KERNEL_INIT, name=f'conv_{i}')(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """Ronneberger's U-Net with 'SAME' convolutions; returns float32 logits [B, H, W, classes].

  Attributes:
    num_classes: output channels (label values 0..num_classes-1; 0 = background).
    base_filters: filters of the first level (the paper: 64).
    depth: number of 2x2 poolings (the paper: 4, i.e. 64 -> 1024 filters); H and W must be
      divisible by 2**depth.
    in_channels: expected input channels (2: CT-like and MR-like images); checked at call
      time so a wrongly stacked input fails with its shape named.
    dtype: compute dtype (e.g. bfloat16); parameters and logits stay float32.
  """
  num_classes: int = 5
  base_filters: int = 64
  depth: int = 4
  in_channels: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Segments NHWC images [B, H, W, in_channels] into logits [B, H, W, num_classes]."""
    step = 2 ** self.depth
    if (x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % step
        or x.shape[2] % step):
      raise ValueError(f'UNet: input must be [B, H, W, {self.in_channels}] with H, W divisible '
                       f'by 2**depth={step}, got {x.shape}')
    y = x.astype(self.dtype)
    skips = []
    for level in range(self.depth + 1):
      if level:
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
      y = DoubleConv(self.base_filters * 2 ** level, dtype=self.dtype, name=f'down_{level}')(y)
      skips.append(y)
    for level in reversed(range(self.depth)):
      features = self.base_filters * 2 ** level
      y = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID', dtype=self.dtype,
                           kernel_init=KERNEL_INIT, name=f'upconv_{level}')(y)
      y = jnp.concatenate([skips[level], y], axis=-1)
      y = DoubleConv(features, dtype=self.dtype, name=f'up_{level}')(y)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=KERNEL_INIT,
                     name='head')(y)
    return logits.astype(jnp.float32)
