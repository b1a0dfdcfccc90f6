"""What the benchmarks share: the --config flag, the machine's CPU and its ISA, the report."""

import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from mr2ct_jax import atomic
from mr2ct_jax.cli import commands
from mr2ct_jax.cli import hugepages


def define_config_flag(fv: flags.FlagValues) -> None:
  """--config, defaulting to this checkout's configs/gc.py."""
  config_flags.DEFINE_config_file('config', commands.default_config_path(),
                                  'Config file (configs/gc.py[:variant]).', flag_values=fv)


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (Linux), else `platform.processor()`."""
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
  except OSError:
    pass
  return cpu


# Report name -> the /proc/cpuinfo flag that says the CPU has it. 'avx512' is AVX-512
# Foundation; 'avx512_bf16' the AVX-512 bfloat16 dot products; 'amx' the AMX bfloat16 tiles
# (what XLA:CPU's and PyTorch's bfloat16 matmuls use when present).
CPU_FLAGS = {'avx2': 'avx2', 'avx512': 'avx512f', 'avx512_bf16': 'avx512_bf16',
             'amx': 'amx_bf16'}


def cpu_flags(cpuinfo: str = '/proc/cpuinfo') -> dict[str, bool | None]:
  """{'avx2', 'avx512', 'avx512_bf16', 'amx'}: whether the CPU has each (`CPU_FLAGS`).

  From the first 'flags' line of `cpuinfo` (Linux); None for each where it cannot be read.
  """
  try:
    with open(cpuinfo, encoding='utf-8') as f:
      line = next((row for row in f if row.startswith('flags')), None)
  except OSError:
    line = None
  if line is None:
    return {name: None for name in CPU_FLAGS}
  have = set(line.split(':', 1)[1].split())
  return {name: flag in have for name, flag in CPU_FLAGS.items()}


def jax_machine_info() -> dict[str, Any]:
  """Devices, CPU (model, ISA flags, cores, load) and library versions, for JAX benchmarks."""
  # Imported here: the pipeline benchmark reports its machine without importing JAX.
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {'jax': jax.__version__, 'flax': flax.__version__, 'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()], 'cpu': cpu_name(),
          'cpu_flags': cpu_flags(), 'cpu_count': os.cpu_count(),
          'load_average': load, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          # mr2ct_jax/cli/hugepages.py: set by the bench CLI (the PyTorch child runs without it).
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
          'platform': platform.platform(), 'python': platform.python_version()}


def write_report(path: str, report: dict[str, Any]) -> None:
  """Writes the JSON report to a temporary name, then renames it."""
  atomic.write_json(path, report, indent=1, default=str)


def pytorch_bf16(dtype: str) -> bool:
  """Whether the PyTorch reference runs under bfloat16 autocast for our compute `dtype`
  (float16 has no matching reference precision here: that one runs in float32)."""
  return dtype == 'bfloat16'


def run_pytorch_child(args: list[str]) -> dict[str, Any]:
  """Runs `python -m mr2ct_jax.bench.torch_reference ARGS` in a child process.

  The child runs as PyTorch's users run it: without the allocator tunable our bench CLI adds.

  Returns:
    Its JSON report (plus the child's GLIBC_TUNABLES), or {'skipped': why} when PyTorch is not
    installed or the child failed.
  """
  if importlib.util.find_spec('torch') is None:
    return {'skipped': 'PyTorch is not installed (pip install torch to compare)'}
  env = hugepages.environ_without_reexec()
  result = subprocess.run([sys.executable, '-m', 'mr2ct_jax.bench.torch_reference', *args],
                          capture_output=True, encoding='utf-8', check=False, env=env)
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ['no output'])[-1]
    return {'skipped': f'the PyTorch reference failed: {last}'}
  return {**json.loads(result.stdout.strip().splitlines()[-1]),
          'glibc_tunables': env.get('GLIBC_TUNABLES', '')}
