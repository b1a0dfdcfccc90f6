"""Benchmarks: `python -m mr2ct_jax.bench pipeline|train|torch_reference [flags]`.

`pipeline` and `train` write a JSON report; `torch_reference` (the PyTorch step that `train`
compares against when PyTorch is installed) prints one JSON line.
"""

COMMANDS = ('pipeline', 'train', 'torch_reference')
