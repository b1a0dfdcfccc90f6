"""What the benchmarks share: the --config flag, the machine's CPU name, the JSON report."""

import platform
from typing import Any

from absl import flags
from ml_collections import config_flags

from mr2ct_jax import atomic
from mr2ct_jax.cli import commands


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


def write_report(path: str, report: dict[str, Any]) -> None:
  """Writes the JSON report to a temporary name, then renames it."""
  atomic.write_json(path, report, indent=1, default=str)
