"""Test set-up: 8 fake CPU devices for the data-parallel paths (set before jax is imported)."""

import os

# LLVM at -O0 for the tests' programs: compiling, not running, is most of the suite's time
# (tiny sizes), and -O0 compiles ~40% faster. It changes how XLA:CPU's kernels are optimised,
# not what they compute (XLA's own HLO passes, fusion and the cost analysis are the same; no
# fast math either way). MR2CT_JAX_TEST_XLA_OPT=1 keeps XLA's default level instead.
# Tests that give a child process XLA_FLAGS of its own start them with MR2CT_JAX_TEST_XLA_FLAGS.
os.environ['MR2CT_JAX_TEST_XLA_FLAGS'] = (
    '' if os.environ.get('MR2CT_JAX_TEST_XLA_OPT') == '1'
    else '--xla_backend_optimization_level=0')
os.environ['XLA_FLAGS'] = ' '.join(filter(None, (
    os.environ.get('XLA_FLAGS', ''), os.environ['MR2CT_JAX_TEST_XLA_FLAGS'],
    '--xla_force_host_platform_device_count=8')))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session, shared with the commands the tests start
# as subprocesses: the same tiny programs are compiled once instead of in every process.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mr2ct_jax_test_xla_')
  # Made once, by the process that first imports this file (pytest-xdist's workers inherit
  # it): that process removes it when the session ends.
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def test_config():
  """The tiny `test` variant of configs/gc.py."""
  import sys
  sys.path.insert(0, str(REPO))
  from configs import gc
  return gc.get_config('test')
