"""ResNet generator of the CycleGAN reference (Johnson et al. style, 9 residual blocks)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mr2ct_jax.models import layers

Array = jax.Array
# The reference initialises weights from N(0, 0.02) and biases at zero.
KERNEL_INIT = nn.initializers.normal(0.02)


class ResnetBlock(nn.Module):
  """x + IN(conv3x3(reflect1(ReLU(IN(conv3x3(reflect1(x)))))))."""
  features: int
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the block to NHWC `x` (channels == features)."""
    y = x
    for i in range(2):
      # A bias although instance norm cancels it: the reference has these parameters.
      y = layers.ReflectConv(self.features, 3, 1, dtype=self.dtype,
                             conv_impl=self.conv_impl, name=f'conv_{i}')(y)
      y = layers.instance_norm(y)
      if i == 0:
        y = nn.relu(y)
    return x + y


class ResnetGenerator(nn.Module):
  """MR<->CT generator: c7s1-ngf, d2ngf, d4ngf, R4ngf x num_res_blocks, u2ngf, ungf, c7s1-out.

  Parameters (1 in / 1 out, ngf=64, 9 blocks): 11,365,633, as the reference. Params are
  float32; `dtype` is the compute dtype (e.g. bfloat16); the output is float32 in [-1, 1].
  `conv_impl` picks the conv code path (`options.CONV_IMPLS`), not the function.
  """
  ngf: int = 64
  num_res_blocks: int = 9
  out_channels: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Translates NHWC images [B, H, W, C] (H, W divisible by 4) to [B, H, W, out_channels]."""
    if x.ndim != 4 or x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f'ResnetGenerator: input must be [B, H, W, C] with H, W divisible by 4, '
                       f'got {x.shape}')
    y = x.astype(self.dtype)
    impl = self.conv_impl
    y = layers.ReflectConv(self.ngf, 7, 3, dtype=self.dtype, conv_impl=impl, name='stem')(y)
    y = nn.relu(layers.instance_norm(y))
    for i in range(2):
      y = layers.Conv(self.ngf * 2 ** (i + 1), 3, stride=2, pad=1, dtype=self.dtype,
                      kernel_init=KERNEL_INIT, conv_impl=impl, name=f'down_{i}')(y)
      y = nn.relu(layers.instance_norm(y))
    for i in range(self.num_res_blocks):
      y = ResnetBlock(self.ngf * 4, dtype=self.dtype, conv_impl=impl, name=f'res_{i}')(y)
    for i in range(2):
      y = layers.UpConv2x(self.ngf * 2 ** (1 - i), dtype=self.dtype, conv_impl=impl,
                          name=f'up_{i}')(y)
      y = nn.relu(layers.instance_norm(y))
    y = layers.ReflectConv(self.out_channels, 7, 3, dtype=self.dtype, conv_impl=impl,
                           name='head')(y)
    return jnp.tanh(y.astype(jnp.float32))
