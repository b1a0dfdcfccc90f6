"""Model settings that configs name, checkable without importing JAX or flax.

`mr2ct_jax.config_checks` validates configs with these (prepare checks a config too, and must
start fast); the layers resolve the conv code path with `resolve_conv_impl`.
"""

# The conv code path: how a conv is computed, never what (see `mr2ct_jax.models.layers`).
CONV_IMPLS = ('auto', 'winograd', 'matmul', 'xla')
# Compute dtypes of the networks (parameters stay float32).
DTYPE_NAMES = ('float32', 'bfloat16', 'float16')


# 'auto' on CPUs per compute dtype.
AUTO_CPU = {'float32': 'winograd', 'bfloat16': 'winograd', 'float16': 'winograd'}


def resolve_conv_impl(conv_impl: str, backend: str, dtype: str = 'float32') -> str:
  """The concrete conv code path for `conv_impl` on `backend` ('cpu', 'gpu', 'tpu', ...).

  'auto' is the path that measured fastest on the backend for the compute `dtype` (one of
  DTYPE_NAMES): AUTO_CPU on CPUs, 'matmul' elsewhere.

  Raises:
    ValueError: `conv_impl` is not one of CONV_IMPLS.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r}: must be one of {CONV_IMPLS}')
  if conv_impl != 'auto':
    return conv_impl
  if backend != 'cpu':
    return 'matmul'
  return AUTO_CPU.get(dtype, 'winograd')
