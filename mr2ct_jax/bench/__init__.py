"""Benchmarks: `python -m mr2ct_jax.bench pipeline|train [flags]` (each writes a JSON report)."""

COMMANDS = ('pipeline', 'train')
