"""Networks: ResNet generator and PatchGAN discriminator (flax linen)."""

import jax.numpy as jnp
import ml_collections

from mr2ct_jax.config_checks import CONV_IMPLS
from mr2ct_jax.config_checks import DEFAULT_CONV_IMPL
from mr2ct_jax.models.discriminator import PatchDiscriminator
from mr2ct_jax.models.generator import ResnetGenerator

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def build(model_config: ml_collections.ConfigDict) -> tuple[ResnetGenerator, PatchDiscriminator]:
  """Returns (generator, discriminator) modules for `config.model`.

  Both translation directions use the same architecture (1 channel in and out), so one
  module of each kind serves G_ct/G_mr and D_ct/D_mr with separate parameters.
  """
  if model_config.dtype not in _DTYPES:
    raise ValueError(f'config.model.dtype={model_config.dtype!r}: must be one of '
                     f'{sorted(_DTYPES)}')
  dtype = _DTYPES[model_config.dtype]
  conv_impl = model_config.get('conv_impl', DEFAULT_CONV_IMPL)  # configs saved before it
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'config.model.conv_impl={conv_impl!r}: must be one of {CONV_IMPLS}')
  generator = ResnetGenerator(ngf=model_config.ngf, num_res_blocks=model_config.num_res_blocks,
                              out_channels=1, dtype=dtype, conv_impl=conv_impl)
  discriminator = PatchDiscriminator(ndf=model_config.ndf,
                                     num_layers=model_config.num_disc_layers, dtype=dtype,
                                     conv_impl=conv_impl)
  return generator, discriminator
