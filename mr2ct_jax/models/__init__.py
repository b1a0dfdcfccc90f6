"""Networks: ResNet generator and PatchGAN discriminator (flax linen)."""
