"""TensorBoard event files (tensorboardX, no TensorFlow) and the training progress line."""

import os
import shutil
import tempfile
import time
from typing import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from mr2ct_jax import storage


def image_grid(rows: list[list[np.ndarray]]) -> np.ndarray:
  """Tiles 2-D images in [-1, 1] into one uint8 HxW grid (rows x columns, 2-px white gutters).

  Slices are stored (R->, A->); they are rotated so anterior is up, as a radiologist expects.
  """
  gutter = 2
  tiles = [[np.rot90(np.asarray(img, np.float32)) for img in row] for row in rows]
  h, w = tiles[0][0].shape
  n_rows, n_cols = len(tiles), max(len(row) for row in tiles)
  grid = np.ones((n_rows * (h + gutter) - gutter, n_cols * (w + gutter) - gutter), np.float32)
  for r, row in enumerate(tiles):
    for c, tile in enumerate(row):
      grid[r * (h + gutter):r * (h + gutter) + h, c * (w + gutter):c * (w + gutter) + w] = tile
  return np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)


class MetricWriter:
  """Writes scalars and images to WORKDIR/tb on JAX process 0 only (no-op elsewhere).

  A gs:// logdir: tensorboardX's own gs:// writer needs google-cloud-storage, so the events
  are written to a local temporary folder and each event file is uploaded whole (an object
  cannot be appended to) at every `flush`, `sync` and at `close`. TensorBoard reads the
  bucket.
  """

  def __init__(self, logdir: str):
    self._writer = None
    self._remote, self._local = None, None
    if jax.process_index() == 0:
      if storage.is_remote(logdir):
        storage.check_backend(logdir)
        self._remote, self._local = logdir, tempfile.mkdtemp(prefix='mr2ct_jax_tb_')
        logdir = self._local
      self._writer = SummaryWriter(logdir=logdir)

  def _upload(self) -> None:
    if self._remote is None:
      return
    for name in sorted(os.listdir(self._local)):
      path = os.path.join(self._local, name)
      if os.path.isfile(path):
        storage.upload_file(path, storage.join(self._remote, name))

  def sync(self) -> None:
    """A gs:// logdir: flushes and uploads the events so far (local logdir: nothing to do)."""
    if self._remote is not None:
      self.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes one scalar per key at `step`."""
    if self._writer is None:
      return
    for key, value in values.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def image(self, step: int, tag: str, grid: np.ndarray) -> None:
    """Writes a uint8 HxW grayscale image at `step`."""
    if self._writer is not None:
      self._writer.add_image(tag, grid, global_step=step, dataformats='HW')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._upload()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._upload()
      if self._local is not None:
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = self._remote = None


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours:d}:{minutes:02d}:{secs:02d}'


class Progress:
  """Measures steps/s between reports and formats 'step N/T | losses | steps/s | ETA'."""

  def __init__(self, start_step: int, total_steps: int):
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def rate(self, step: int) -> float:
    """Steps per second since the previous call (and resets the window)."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def line(self, step: int, rate: float, metrics: Mapping[str, float],
           compiling: bool = False) -> str:
    """The progress line for `step`, given steps/s `rate` and the latest metrics.

    With `compiling`, the window held XLA compilation, so its time is shown instead of a
    meaningless ETA.
    """
    shown = ' '.join(f'{k.split("/")[-1]}={v:.4f}' for k, v in metrics.items()
                     if k.startswith('loss/') and not (k == 'loss/identity' and v == 0))
    if compiling:
      return f'step {step}/{self._total} | {shown} | compiled and ran in {1 / rate:.1f} s'
    eta = (self._total - step) / rate if rate > 0 else float('inf')
    eta_text = _format_duration(eta) if np.isfinite(eta) else '?'
    return f'step {step}/{self._total} | {shown} | {rate:.2f} steps/s | ETA {eta_text}'


def log_line(text: str) -> None:
  """Prints a progress line on process 0 (stdout, so users see it without absl flags)."""
  if jax.process_index() == 0:
    print(text, flush=True)
