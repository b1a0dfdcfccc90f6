"""CycleGAN training: losses, image pools, the train state, the jitted step and the loop."""
