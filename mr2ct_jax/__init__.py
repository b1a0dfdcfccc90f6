"""mr2ct_jax: unpaired MR->CT synthesis with a gradient-consistency CycleGAN (JAX/Flax)."""
