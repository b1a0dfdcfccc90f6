"""Winograd F(m x m, 3 x 3): the residual blocks' 3x3 stride-1 convolutions in fewer FLOPs.

A 3x3 VALID correlation of an input tile of (m + 2)^2 pixels gives m^2 outputs; Lavin & Gray
(2016) compute it as  Y = A^T [(G g G^T) * (B^T d B)] A  (elementwise product in the
(m + 2)^2 "Winograd domain"), so summed over input channels the conv becomes (m + 2)^2
independent matmuls  M[k] = V[k] @ U[k]  of every tile's transformed input V[k] [tiles, Cin]
with the transformed kernel U[k] [Cin, Cout]: (m + 2)^2 / (9 m^2) of the direct conv's
multiplications, 1/2.25 for m = 2 and 1/4 for m = 4. The backward pass uses the same
transforms read the other way (every step is linear):

    dM[k] = (A dY A^T)[k]      dV[k] = dM[k] @ U[k]^T      dU[k] = V[k]^T @ dM[k]
    d_kernel = G^T dU G        d_input = overlap-add of the tiles of B dV B^T

so the input gradient and the kernel gradient get the same saving. Each transform is one
small-K matmul with the Kronecker product of the 1-D transform matrices; the (m + 2)^2
batched matmuls carry the arithmetic.
Results agree with the direct conv to float32 rounding (relative ~1e-6 for m = 2, ~1e-5
for m = 4: the m = 4 transforms have entries up to 8).

In bfloat16 (m = 2 only) the transformed tiles and kernel are rounded to bfloat16 and the
forward matmuls and the input gradient's accumulate in float32 (`preferred_element_type`):
the matrix units' fast path. Their float32 results go through the output transforms and the
overlap-add in float32 and are rounded to bfloat16 once. The kernel gradient's matmuls,
which contract over every tile, run in float32: XLA:CPU's bfloat16 dot is slower at that
shape than its float32 one (README, Benchmarks).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from mr2ct_jax.models import conv_ops

Array = jax.Array

# (B^T, G, A^T) for F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray, 2016; points 0, +-1, +-2).
_TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
TILES = tuple(_TRANSFORMS)


def _kron(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The 2-D transforms as matrices on flattened tiles: (B^T x B^T, G x G, A^T x A^T)."""
  bt, g, at = (np.asarray(mat, np.float64) for mat in _TRANSFORMS[tile])
  return np.kron(bt, bt), np.kron(g, g), np.kron(at, at)


def _transform(mat: np.ndarray, stacked: Array, dtype: Any = None) -> Array:
  """[J, ...] = `mat` [J, K] applied along the leading axis of `stacked` [K, ...].

  One matmul with a small K: a single memory-bound pass that XLA compiles as one op (sums
  of shifted slices would compile to (m + 2)^2 loops and a concatenate per transform, which
  compile far slower). In float32, then rounded once to `dtype` (default: `stacked`'s).
  """
  k = stacked.shape[0]
  out = jnp.dot(jnp.asarray(mat, jnp.float32), stacked.reshape(k, -1).astype(jnp.float32),
                precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  dtype = stacked.dtype if dtype is None else dtype
  if dtype != jnp.float32:
    # Else XLA:CPU folds the rounding into the dot, whose 16-bit-output kernel is slow.
    out = lax.optimization_barrier(out)
  return out.astype(dtype).reshape(mat.shape[0], *stacked.shape[1:])


def _batched_matmul(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """The (m + 2)^2 matmuls a[k] . b[k] contracting a's axis contract[0] with b's contract[1].

  16-bit inputs give a float32 result (float32 accumulation).
  """
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                         preferred_element_type=conv_ops.accumulation(a, b))


def _check(xp: Array, kernel: Array, tile: int) -> None:
  if tile not in _TRANSFORMS:
    raise ValueError(f'conv3x3_valid: tile must be one of {TILES}, got {tile}')
  if tile == 4 and jnp.finfo(xp.dtype).bits < 32:
    # Its transformed tiles are ~100x the input: 8 mantissa bits left ~4% errors.
    raise ValueError(f'conv3x3_valid: tile 4 needs float32 or wider, got {xp.dtype}')
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or xp.ndim != 4:
    raise ValueError(f'conv3x3_valid: need xp [B, H, W, Cin] and kernel [3, 3, Cin, Cout], '
                     f'got {xp.shape} and {kernel.shape}')


def _grid(h: int, w: int, tile: int) -> tuple[int, int]:
  """Tile rows and columns covering an h x w output."""
  return -(-h // tile), -(-w // tile)


def _input_transform(xp: Array, tile: int, dtype: Any = None) -> Array:
  """V [(m + 2)^2, B * rows * cols, Cin]: every input tile in the Winograd domain, in `xp`'s
  dtype (the batched matmuls' input); cut and transformed in float32, which XLA:CPU's
  elementwise ops run natively (its bfloat16 ones convert around every op)."""
  dtype = xp.dtype if dtype is None else dtype
  xp = xp.astype(jnp.float32)
  b, hp, wp, cin = xp.shape
  h, w = hp - 2, wp - 2
  rows, cols = _grid(h, w, tile)
  # Zeros past the bottom/right edge so that the output divides into whole tiles.
  xpt = jnp.pad(xp, ((0, 0), (0, rows * tile - h), (0, cols * tile - w), (0, 0)))
  # The (m + 2)^2 pixels of every input tile: tiles[(u, v), b, r, c] = xpt[b, m r + u, m c + v].
  tiles = jnp.stack([xpt[:, u:u + tile * (rows - 1) + 1:tile, v:v + tile * (cols - 1) + 1:tile]
                     for u in range(tile + 2) for v in range(tile + 2)])
  bb = _kron(tile)[0]
  return _transform(bb, tiles, dtype).reshape(len(bb), b * rows * cols, cin)


def _forward(xp: Array, kernel: Array, tile: int) -> tuple[Array, Array]:
  """(y, U): the conv's output and the transformed kernel U [(m + 2)^2, Cin, Cout]."""
  _check(xp, kernel, tile)
  _, gg, aa = _kron(tile)
  b, hp, wp, cin = xp.shape
  cout = kernel.shape[-1]
  h, w = hp - 2, wp - 2
  rows, cols = _grid(h, w, tile)
  v = _input_transform(xp, tile)
  u = _transform(gg, kernel.reshape(9, cin, cout))
  m = _batched_matmul(v, u, (2, 1))                                    # [a^2, tiles, Cout]
  # y[b, m r + i, m c + j] = (A^T M A)[(i, j)] of tile (r, c).
  y = _transform(aa, m).reshape(tile, tile, b, rows, cols, cout).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(b, rows * tile, cols * tile, cout)[:, :h, :w].astype(xp.dtype), u


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_valid(xp: Array, kernel: Array, tile: int = 2) -> Array:
  """VALID stride-1 correlation of NHWC `xp` with an HWIO 3x3 `kernel`, by Winograd.

  Args:
    xp: [B, H + 2, W + 2, Cin], already padded (reflect or zero) by the caller.
    kernel: [3, 3, Cin, Cout], of `xp`'s dtype.
    tile: output tile side m (`TILES`): 2 (2.25x fewer multiplications) or 4 (4x; float32
      only).

  Returns:
    [B, H, W, Cout], equal to `lax.conv_general_dilated(xp, kernel, (1, 1), 'VALID')` up to
    rounding (float32: ~1e-6 relative for m = 2; bfloat16: ~1.6x the direct conv's error).
    Any H, W: the tiles past the edge see zeros and are cropped.
  """
  return _forward(xp, kernel, tile)[0]


def _conv3x3_fwd(xp, kernel, tile):
  """Saves the input and U; the input's transform V (4x the input for m = 2) is recomputed
  in the backward pass rather than held through the whole generator."""
  y, u = _forward(xp, kernel, tile)
  return y, (xp, u)  # u has the kernel's dtype


def _conv3x3_bwd(tile, residuals, dy):
  """The adjoint of every linear step of `_forward`, in reverse order."""
  xp, u = residuals
  bb, gg, aa = _kron(tile)
  alpha = tile + 2
  b, hp, wp, cin = xp.shape
  h, w = hp - 2, wp - 2
  rows, cols = _grid(h, w, tile)
  cout = dy.shape[-1]
  dtype = u.dtype  # the compute dtype: the batched matmuls' inputs
  pad_to_tiles = ((0, 0), (0, rows * tile - h), (0, cols * tile - w), (0, 0))
  dy = jnp.pad(dy.astype(jnp.float32), pad_to_tiles)
  # dy_tiles[(i, j), b, r, c] = dy[b, m r + i, m c + j].
  dy_tiles = dy.reshape(b, rows, tile, cols, tile, cout).transpose(2, 4, 0, 1, 3, 5)
  dm = _transform(aa.T, dy_tiles.reshape(tile * tile, -1, cout), jnp.float32)  # [a^2, tiles, Cout]
  dv = _batched_matmul(dm.astype(dtype), u, (2, 2))                    # [a^2, tiles, Cin]
  # The kernel gradient contracts over the tiles (K = B * rows * cols, large): XLA:CPU's
  # bfloat16 dot is slower than its float32 one at that shape (25 against 15 ms for 16
  # [256, 1024] x [1024, 256] on an AVX512-BF16 EPYC), so it runs in float32.
  du = _batched_matmul(_input_transform(xp, tile, jnp.float32), dm, (1, 1))  # [a^2, Cin, Cout]
  d_kernel = _transform(gg.T, du).reshape(3, 3, cin, cout)
  d_tiles = _transform(bb.T, dv).reshape(alpha, alpha, b, rows, cols, cin)
  # Overlap-add, the adjoint of cutting the tiles: tile pixel (p, q) of tile (r, c) came
  # from xpt[:, m r + p, m c + q].
  hpt, wpt = rows * tile + 2, cols * tile + 2
  zero = jnp.zeros((), d_tiles.dtype)
  d_xp = None
  for p in range(alpha):
    for q in range(alpha):
      part = lax.pad(d_tiles[p, q], zero,
                     ((0, 0, 0), (p, hpt - p - tile * (rows - 1) - 1, tile - 1),
                      (q, wpt - q - tile * (cols - 1) - 1, tile - 1), (0, 0, 0)))
      d_xp = part if d_xp is None else d_xp + part
  return d_xp[:, :hp, :wp].astype(xp.dtype), d_kernel.astype(u.dtype)


conv3x3_valid.defvjp(_conv3x3_fwd, _conv3x3_bwd)
