"""Dispatches `python -m mr2ct_jax.bench NAME [flags]` to `mr2ct_jax.bench.NAME.main(argv)`."""

import importlib
import sys
from typing import Sequence

from mr2ct_jax import bench
from mr2ct_jax.cli import hugepages


def main(argv: Sequence[str]) -> int:
  """Runs one benchmark; argv = [program, NAME, flags...]."""
  if len(argv) < 2 or argv[1] not in bench.COMMANDS:
    got = repr(argv[1]) if len(argv) > 1 else 'nothing'
    raise SystemExit(f'usage: python -m mr2ct_jax.bench {{{"|".join(bench.COMMANDS)}}} '
                     f'[flags] (got {got})')
  name = argv[1]
  # Imported lazily: each benchmark pulls in its own heavy dependencies.
  module = importlib.import_module(f'mr2ct_jax.bench.{name}')
  return module.main([f'mr2ct_jax.bench {name}', *argv[2:]]) or 0


if __name__ == '__main__':
  # Benchmarks time what `mr2ct_jax.main` runs, so they get its allocator setting too (the
  # PyTorch reference child process inherits it).
  hugepages.reexec_with_hugepages()
  sys.exit(main(sys.argv))
