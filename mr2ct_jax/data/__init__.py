"""Volume I/O, preprocessing, the built-in phantom, TFDS datasets and the input pipeline."""
