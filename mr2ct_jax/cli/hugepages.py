"""Transparent huge pages for XLA:CPU's per-step buffers, set up by re-executing the CLI.

XLA:CPU mallocs a fresh temporary buffer for every execution of a compiled program (over a
gigabyte for the 128^2 train step) and frees it afterwards. glibc serves such a block with a
new mmap, so the kernel faults it in again 4 KiB at a time on every step. With the glibc
tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on
those mappings (madvise), which cuts the page faults by orders of magnitude (the effect on the
step time is in the README's Benchmarks section).

Tunables are read once, when the process starts, so the command-line tools re-execute
themselves with the setting before they import JAX. Only the CLIs do this: importing the
library (a notebook, a test) changes nothing in the process. Set MR2CT_JAX_HUGEPAGES=0 to
turn it off; the re-executed process sees MR2CT_JAX_HUGEPAGES=1 and does not loop.
"""

from collections.abc import Mapping
import os
import platform
import sys

ENV_VAR = 'MR2CT_JAX_HUGEPAGES'
TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_supports_hugetlb() -> bool:
  libc, version = platform.libc_ver()
  if libc != 'glibc':
    return False
  try:
    major, minor = (int(part) for part in version.split('.')[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _kernel_offers_thp(setting_path: str = _THP_SETTING) -> bool:
  """Whether transparent huge pages are enabled in 'always' or 'madvise' mode."""
  try:
    with open(setting_path, encoding='ascii') as f:
      setting = f.read()
  except OSError:
    return False
  return '[always]' in setting or '[madvise]' in setting


def tunables_with_hugetlb(current: str | None) -> str | None:
  """GLIBC_TUNABLES with the huge-page setting added, or None if it already has one."""
  if current and 'glibc.malloc.hugetlb' in current:
    return None
  return f'{current}:{TUNABLE}' if current else TUNABLE


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process should re-execute itself with the huge-page tunable."""
  if environ.get(ENV_VAR) is not None or sys.platform != 'linux':
    return False
  if tunables_with_hugetlb(environ.get('GLIBC_TUNABLES')) is None:
    return False
  return _glibc_supports_hugetlb() and _kernel_offers_thp()


def reexec_with_hugepages() -> None:
  """Replaces this process with the same command line plus `glibc.malloc.hugetlb=1`.

  Call it first thing under `if __name__ == '__main__'` of a CLI started as
  `python -m ...`, before JAX is imported. Returns without doing anything when `wanted()`
  is False (not Linux/glibc >= 2.35, huge pages off in the kernel, the user already chose a
  hugetlb tunable, MR2CT_JAX_HUGEPAGES is set).
  """
  if not wanted():
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = tunables_with_hugetlb(env.get('GLIBC_TUNABLES'))
  env[ENV_VAR] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's own options (-u, -X ...) as well as `-m module`.
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    return  # Could not re-execute (e.g. no sys.executable): run on, just without the tunable.


def environ_without_reexec(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """`environ` as the user had it before `reexec_with_hugepages` added the tunable.

  For child processes that should run as they would by default (the PyTorch reference of
  `bench train`), not with this package's allocator setting.
  """
  env = dict(environ)
  if env.pop(ENV_VAR, None) != '1':
    return dict(environ)
  tunables = env.get('GLIBC_TUNABLES', '')
  original = tunables[:-len(TUNABLE)].rstrip(':') if tunables.endswith(TUNABLE) else tunables
  if original:
    env['GLIBC_TUNABLES'] = original
  else:
    env.pop('GLIBC_TUNABLES', None)
  return env
