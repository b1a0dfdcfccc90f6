"""Model settings that configs name, checkable without importing JAX or flax.

`mr2ct_jax.config_checks` validates configs with these (prepare checks a config too, and must
start fast); the layers resolve the conv code path with `resolve_conv_impl`.
"""

# The conv code path: how a conv is computed, never what (see `mr2ct_jax.models.layers`).
# Discriminator norms (config.model.disc_norm): the reference's instance norm, or none.
DISC_NORMS = ('instance', 'none')
CONV_IMPLS = ('auto', 'winograd', 'matmul', 'xla')
# Compute dtypes of the networks (parameters stay float32).
DTYPE_NAMES = ('float32', 'bfloat16', 'float16')


# 'auto' on CPUs per compute dtype: Winograd in both precisions. The CycleGAN train step
# (`python -m mr2ct_jax.bench train`, batch 1, no GC) at 128^2 on an Intel Xeon with AVX-512,
# AVX512-BF16 and AMX-BF16 (2 cores, shared with other jobs: load ~5, the f32 2048^3 matmul
# ceiling at 33-78 GFLOP/s instead of ~300, so only the ordering is meaningful), seconds:
#   float32:  winograd 8.05, matmul 13.38
#   bfloat16: winograd 6.34, matmul 10.77, xla 29.34 (XLA's bf16 convolutions)
# In bfloat16 both matmul paths run bf16 x bf16 -> f32 matmuls (Winograd's kernel gradient
# in float32 since 2026-12-08: faster on the CPU at its shape); Winograd's 2.25x fewer
# multiplications in the res blocks outweigh its float32 tile transforms. At 256^2 only
# bfloat16 winograd was timed (48.9 s, with a test compiling alongside: no comparison).
# float16 follows bfloat16 (same code path; untimed).
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
