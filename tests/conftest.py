"""Test set-up: 8 fake CPU devices for the data-parallel paths (set before jax is imported)."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
