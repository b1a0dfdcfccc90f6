"""Benchmarks: `python -m mr2ct_jax.bench pipeline|train|translate|torch_reference [flags]`.

`pipeline`, `train` and `translate` write a JSON report; `torch_reference` (the PyTorch step
or generator inference that `train` and `translate` compare against when PyTorch is
installed) prints one JSON line.
"""

COMMANDS = ('pipeline', 'train', 'translate', 'torch_reference')
