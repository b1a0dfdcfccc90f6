"""70x70 PatchGAN discriminator of the CycleGAN reference (`NLayerDiscriminator`)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mr2ct_jax.models import layers
from mr2ct_jax.models import options
from mr2ct_jax.models.generator import KERNEL_INIT

Array = jax.Array

DISC_NORMS = options.DISC_NORMS


class PatchDiscriminator(nn.Module):
  """C64 (no norm) - C128 - C256 - C512 (stride 1) - 1-channel logits; LeakyReLU 0.2.

  All convs are 4x4 with zero padding 1; the first `num_layers` have stride 2. Parameters
  (1 input channel, ndf=64, 3 layers): 2,762,689, as the reference. Logits are float32.
  `conv_impl` picks the conv code path (`options.CONV_IMPLS`), not the function.
  `norm` is 'instance' (the reference) or 'none': on small images the last maps are a few
  pixels wide, and normalising them per image removes most of what tells a real image from
  a fake (measured on the 64 px phantom: README, Quality).
  """
  ndf: int = 64
  num_layers: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  norm: str = 'instance'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps NHWC images [B, H, W, C] to patch logits [B, h, w, 1] (h = H/8 - 2 for 3 layers)."""
    conv = lambda f, stride, name: layers.Conv(f, 4, stride=stride, pad=1, dtype=self.dtype,
                                               kernel_init=KERNEL_INIT, conv_impl=self.conv_impl,
                                               name=name)
    if self.norm not in DISC_NORMS:
      raise ValueError(f'disc_norm={self.norm!r}: must be one of {DISC_NORMS}')
    normalise = layers.instance_norm if self.norm == 'instance' else (lambda v: v)
    y = x.astype(self.dtype)
    y = nn.leaky_relu(conv(self.ndf, 2, 'conv_0')(y), 0.2)
    for i in range(1, self.num_layers + 1):
      # The reference caps the width at 8 * ndf; the last of these layers has stride 1.
      features = self.ndf * min(2 ** i, 8)
      stride = 2 if i < self.num_layers else 1
      y = conv(features, stride, f'conv_{i}')(y)
      y = nn.leaky_relu(normalise(y), 0.2)
    y = conv(1, 1, 'logits')(y)
    return y.astype(jnp.float32)
