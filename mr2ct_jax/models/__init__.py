"""The networks: ResNet generator, PatchGAN discriminator, U-Net, and their layers (flax linen).

`cyclegan.build(config.model)` builds the CycleGAN's two modules; `options` holds the model
settings a config check needs without importing JAX or flax.
"""
