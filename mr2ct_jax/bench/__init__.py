"""Benchmarks: `python -m mr2ct_jax.bench pipeline|train|translate|layers|torch_reference|summary`.

`pipeline`, `train`, `translate` and `layers` (each conv layer alone, float32 against
bfloat16) write a JSON report; `torch_reference` (the PyTorch step
or generator inference that `train` and `translate` compare against when PyTorch is
installed) prints one JSON line; `summary` tabulates `train` reports (launch/gpu_bench.sh).
"""

COMMANDS = ('pipeline', 'train', 'translate', 'layers', 'torch_reference', 'summary')
