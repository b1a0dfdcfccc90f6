"""Model settings that configs name, checkable without importing JAX or flax.

`mr2ct_jax.config_checks` validates configs with these (prepare checks a config too, and must
start fast); the layers resolve the conv code path with `resolve_conv_impl`.
"""

# The conv code path: how a conv is computed, never what (see `mr2ct_jax.models.layers`).
CONV_IMPLS = ('auto', 'winograd', 'matmul', 'xla')
# Compute dtypes of the networks (parameters stay float32).
DTYPE_NAMES = ('float32', 'bfloat16', 'float16')


def resolve_conv_impl(conv_impl: str, backend: str) -> str:
  """The concrete conv code path for `conv_impl` on `backend` ('cpu', 'gpu', 'tpu', ...).

  'auto' is the path that measured fastest on the backend (README, Benchmarks): 'winograd' on
  CPUs, 'matmul' elsewhere.

  Raises:
    ValueError: `conv_impl` is not one of CONV_IMPLS.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r}: must be one of {CONV_IMPLS}')
  if conv_impl != 'auto':
    return conv_impl
  return 'winograd' if backend == 'cpu' else 'matmul'
