"""The CycleGAN's networks: one generator and one discriminator architecture (flax linen)."""

import ml_collections

from mr2ct_jax.models import layers
from mr2ct_jax.models import options
from mr2ct_jax.models.discriminator import PatchDiscriminator
from mr2ct_jax.models.generator import ResnetGenerator


def build(model_config: ml_collections.ConfigDict) -> tuple[ResnetGenerator, PatchDiscriminator]:
  """Returns (generator, discriminator) modules for `config.model`.

  Both translation directions use the same architecture (1 channel in and out), so one
  module of each kind serves G_ct/G_mr and D_ct/D_mr with separate parameters.
  """
  try:
    dtype = layers.compute_dtype(model_config.dtype)
    options.resolve_conv_impl(model_config.conv_impl, 'cpu')  # fail here, not at init
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from e
  generator = ResnetGenerator(ngf=model_config.ngf, num_res_blocks=model_config.num_res_blocks,
                              out_channels=1, dtype=dtype, conv_impl=model_config.conv_impl)
  discriminator = PatchDiscriminator(ndf=model_config.ndf,
                                     num_layers=model_config.num_disc_layers, dtype=dtype,
                                     conv_impl=model_config.conv_impl,
                                     norm=model_config.get('disc_norm', 'instance'))
  return generator, discriminator
