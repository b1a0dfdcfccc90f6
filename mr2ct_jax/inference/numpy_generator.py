"""Pure-NumPy forward pass of the ResNet generator, from an .npz written by `mr2ct_jax.export`.

This module imports nothing but NumPy and the standard library, so downstream tools (e.g. a
segmentation pipeline) can run a trained generator without JAX: copy this file and the .npz.

    gen = numpy_generator.load('g_ct.npz', direction='mr2ct')
    sct = gen(mr_batch)   # float32 [B, H, W, 1] in [-1, 1] -> [B, H, W, 1] in [-1, 1]

The .npz holds one flat array per parameter, named '<network>/<layer>/<param>' (network
'g_ct' = MR->CT, 'g_mr' = CT->MR; layers 'stem', 'down_0', 'down_1', 'res_<i>/conv_<j>',
'up_0', 'up_1', 'head' as in `mr2ct_jax.models.generator`), the training config as a JSON
string under '__config__', and the intensity mapping (windows, MR percentile, spacing, step)
as JSON under '__meta__'. Layers follow the CycleGAN reference: reflection padding, instance
norm without affine (biased variance, eps 1e-5), PyTorch-semantics transposed convolutions
(k=3, stride 2, padding 1, output_padding 1).
"""

import dataclasses
import json
import os
import re
import zipfile
from typing import IO, Any

import numpy as np

CONFIG_KEY = '__config__'
META_KEY = '__meta__'
FORMAT_VERSION = 1
NETWORKS = {'mr2ct': 'g_ct', 'ct2mr': 'g_mr'}
_EPS = 1e-5
# Bytes of im2col patches materialised at once: bounds memory at large slices/batches while
# keeping each matmul big enough to run at BLAS speed.
_PATCH_BUDGET = 64 << 20


class ExportError(ValueError):
  """An .npz is not a usable generator export; the message starts with the path."""


@dataclasses.dataclass
class Export:
  """Contents of an export .npz.

  Attributes:
    params: network name ('g_ct'/'g_mr') -> {'stem/kernel': array, ...} (float32).
    config: the training config as a plain dict.
    meta: intensity mapping and provenance: 'ct_window', 'mr_window', 'mr_percentile',
      'spacing_mm', 'image_size', 'n4', 'plane' (slice plane), 'step', 'networks',
      'format_version'.
  """
  params: dict[str, dict[str, np.ndarray]]
  config: dict[str, Any]
  meta: dict[str, Any]


def read_export(path: str, fileobj: IO[bytes] | None = None) -> Export:
  """Reads an export .npz (no pickle); raises ExportError with a one-line message.

  Args:
    path: the file; with `fileobj`, only the name the messages give (e.g. a gs:// URL).
    fileobj: an open, seekable binary file to read instead of opening `path`.
  """
  source: str | IO[bytes] = path if fileobj is None else fileobj
  if fileobj is None and not os.path.isfile(path):
    raise ExportError(f'{path}: no such export file')
  if not zipfile.is_zipfile(source):  # np.load would try it as a pickle and say so
    raise ExportError(f'{path}: not a .npz (zip) file; expected a file written by '
                      f'mr2ct_jax.export')
  if fileobj is not None:
    fileobj.seek(0)
  try:
    with np.load(source, allow_pickle=False) as data:
      arrays = {name: data[name] for name in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f'{path}: not a readable .npz ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""})') from e
  for key in (CONFIG_KEY, META_KEY):
    if key not in arrays:
      raise ExportError(f'{path}: no {key} entry; not written by mr2ct_jax.export')
  try:
    config = json.loads(str(arrays.pop(CONFIG_KEY)))
    meta = json.loads(str(arrays.pop(META_KEY)))
  except json.JSONDecodeError as e:
    raise ExportError(f'{path}: corrupt {CONFIG_KEY}/{META_KEY} JSON ({e})') from e
  if not isinstance(config, dict) or not isinstance(meta, dict):
    raise ExportError(f'{path}: {CONFIG_KEY}/{META_KEY} must be JSON objects; not written by '
                      'mr2ct_jax.export')
  for section in ('data', 'model'):
    if not isinstance(config.get(section), dict):
      raise ExportError(f'{path}: its config has no {section!r} section; not written by '
                        'mr2ct_jax.export')
  if meta.get('format_version') != FORMAT_VERSION:
    raise ExportError(f'{path}: export format {meta.get("format_version")!r} is not the '
                      f'supported version {FORMAT_VERSION}')
  params: dict[str, dict[str, np.ndarray]] = {}
  for name, array in arrays.items():
    network, sep, rest = name.partition('/')
    if not sep:
      raise ExportError(f'{path}: unexpected entry {name!r} (want <network>/<layer>/<param>)')
    params.setdefault(network, {})[rest] = np.asarray(array, np.float32)
  if not params:
    raise ExportError(f'{path}: holds no generator parameters')
  return Export(params=params, config=config, meta=meta)


def reflect_pad(x: np.ndarray, pad: int) -> np.ndarray:
  """Reflection-pads H and W of NHWC `x` (PyTorch ReflectionPad2d: edge not repeated)."""
  return np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None,
           stride: int = 1) -> np.ndarray:
  """VALID cross-correlation of NHWC `x` with an HWIO `kernel` via im2col + matmul.

  Args:
    x: float32 [B, H, W, Cin], already padded.
    kernel: [kh, kw, Cin, Cout] (flax layout).
    bias: [Cout] or None.
    stride: spatial stride.

  Returns:
    float32 [B, (H - kh) // stride + 1, (W - kw) // stride + 1, Cout].
  """
  b, h, w, cin = x.shape
  kh, kw, kcin, cout = kernel.shape
  if kcin != cin:
    raise ValueError(f'conv2d: input has {cin} channels, kernel expects {kcin}')
  ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
  # [B, H-kh+1, W-kw+1, Cin, kh, kw] view; the kernel is reordered to (Cin, kh, kw) rows.
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::stride, ::stride]
  kmat = np.ascontiguousarray(kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout),
                              np.float32)
  out = np.empty((b, ho, wo, cout), np.float32)
  rows = max(1, _PATCH_BUDGET // (4 * wo * cin * kh * kw))
  for i in range(b):
    for r in range(0, ho, rows):
      patches = windows[i, r:r + rows].reshape(-1, cin * kh * kw)
      out[i, r:r + rows] = (patches @ kmat).reshape(-1, wo, cout)
  if bias is not None:
    out += bias.astype(np.float32)
  return out


def upconv2x(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """PyTorch ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1) on NHWC `x`.

  Input pixel (m, n) adds x[m, n] @ kernel[ky, kx] to output pixel (2m - 1 + ky, 2n - 1 + kx);
  the scatter runs as 9 matmuls into a buffer with a one-pixel border that is cropped.

  Args:
    x: float32 [B, H, W, Cin].
    kernel: [3, 3, Cin, Cout]; kernel[ky, kx, i, o] == torch weight[i, o, ky, kx].
    bias: [Cout].

  Returns:
    float32 [B, 2H, 2W, Cout].
  """
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  flat = x.reshape(-1, cin)
  buf = np.zeros((b, 2 * h + 1, 2 * w + 1, cout), np.float32)
  for ky in range(3):
    for kx in range(3):
      contrib = (flat @ kernel[ky, kx].astype(np.float32)).reshape(b, h, w, cout)
      buf[:, ky:ky + 2 * h:2, kx:kx + 2 * w:2] += contrib
  return buf[:, 1:, 1:] + bias.astype(np.float32)


def instance_norm(x: np.ndarray) -> np.ndarray:
  """Per image and channel normalisation over H, W (statistics accumulated in float64)."""
  x64 = x.astype(np.float64)
  mean = x64.mean(axis=(1, 2), keepdims=True)
  centred = x64 - mean
  var = np.square(centred).mean(axis=(1, 2), keepdims=True)
  return (centred / np.sqrt(var + _EPS)).astype(np.float32)


def _relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0.0, out=x)


class NumpyGenerator:
  """The ResNet generator forward in NumPy; call it on float32 NHWC batches in [-1, 1]."""

  def __init__(self, params: dict[str, np.ndarray], num_res_blocks: int | None = None):
    """Args:
      params: flat {'stem/kernel': array, ...} of one generator.
      num_res_blocks: residual blocks; inferred from the parameter names when None.
    """
    self.params = {name: np.asarray(value, np.float32) for name, value in params.items()}
    found = {int(m.group(1)) for name in self.params
             if (m := re.match(r'res_(\d+)/', name))}
    inferred = max(found) + 1 if found else 0
    if num_res_blocks is not None and num_res_blocks != inferred:
      raise ValueError(f'NumpyGenerator: {num_res_blocks} residual blocks requested but the '
                       f'parameters hold {inferred}')
    self.num_res_blocks = inferred
    needed = ['stem', 'down_0', 'down_1', 'up_0', 'up_1', 'head'] + [
        f'res_{i}/conv_{j}' for i in range(inferred) for j in range(2)]
    for layer in needed:
      for param in ('kernel', 'bias'):
        if f'{layer}/{param}' not in self.params:
          raise ValueError(f'NumpyGenerator: missing parameter {layer}/{param}')

  def _w(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
    return self.params[f'{layer}/kernel'], self.params[f'{layer}/bias']

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """Translates float32 [B, H, W, C] (H, W divisible by 4) to [B, H, W, 1] in [-1, 1]."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f'NumpyGenerator: input must be [B, H, W, C] with H, W divisible by 4, '
                       f'got {x.shape}')
    y = _relu(instance_norm(conv2d(reflect_pad(x, 3), *self._w('stem'))))
    for i in range(2):
      padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
      y = _relu(instance_norm(conv2d(padded, *self._w(f'down_{i}'), stride=2)))
    for i in range(self.num_res_blocks):
      r = _relu(instance_norm(conv2d(reflect_pad(y, 1), *self._w(f'res_{i}/conv_0'))))
      r = instance_norm(conv2d(reflect_pad(r, 1), *self._w(f'res_{i}/conv_1')))
      y = y + r
    for i in range(2):
      y = _relu(instance_norm(upconv2x(y, *self._w(f'up_{i}'))))
    y = conv2d(reflect_pad(y, 3), *self._w('head'))
    return np.tanh(y).astype(np.float32)


def load(path: str, direction: str = 'mr2ct') -> NumpyGenerator:
  """Loads the generator for `direction` ('mr2ct' or 'ct2mr') from an export .npz."""
  if direction not in NETWORKS:
    raise ExportError(f'{path}: direction={direction!r} must be one of {tuple(NETWORKS)}')
  export = read_export(path)
  network = NETWORKS[direction]
  if network not in export.params:
    raise ExportError(f'{path}: export has no generator {network!r} for {direction} '
                      f'(has {sorted(export.params)})')
  try:
    return NumpyGenerator(export.params[network],
                          num_res_blocks=export.config.get('model', {}).get('num_res_blocks'))
  except ValueError as e:
    raise ExportError(f'{path}: {e}') from e
