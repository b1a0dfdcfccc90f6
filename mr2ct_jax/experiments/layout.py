"""Where a study keeps its files, the per-cell locks and the "cell finished" markers.

Layout of a study workdir (JAX-free to read, so the report can be rebuilt anywhere):
  study.json              the preset and data dir the study was started with (a rerun with
                          another preset or dataset is refused)
  phantom/                the built-in phantom, prepared once (when no --data is given)
  locks/<name>.lock       flock()ed by the process running that run (or preparing data)
  cells/<name>/           a cell's run: the CycleGAN workdir (checkpoints, config.json),
                          eval/ (Table 1 metrics + unpaired.json), seg/ (U-Net, seg/eval),
                          samples.npz (slices for the Fig. 5 panel), cell.json (done marker);
                          <name> is the cell's for seed 0, <cell>_seed<k> for seed k
  report/                 report.md, report.json (every number the report shows), figures/

A run counts as finished only when cells/<name>/cell.json exists: it is written (atomically)
last, after training reached its num_steps and every evaluation output of the cell was written.
"""

import contextlib
import fcntl
import json
import os
import zipfile
from collections.abc import Iterator
from typing import Any

from mr2ct_jax import atomic
from mr2ct_jax import storage

STUDY_FILE = 'study.json'
DONE_FILE = 'cell.json'


def cell_dir(workdir: str, name: str) -> str:
  """The directory of cell `name`."""
  return os.path.join(workdir, 'cells', name)


def report_dir(workdir: str) -> str:
  """Where report.md and its figures are written."""
  return os.path.join(workdir, 'report')


def read_json(path: str) -> Any | None:
  """The JSON object at `path`, or None when there is no file (a broken one is an error)."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise StudyError(f'{path}: unreadable ({e})') from e


class StudyError(ValueError):
  """The study cannot proceed; the one-line message names the file or flag."""


def done_info(workdir: str, name: str) -> dict[str, Any] | None:
  """The done marker of a finished cell, or None while it is not finished."""
  return read_json(os.path.join(cell_dir(workdir, name), DONE_FILE))


def mark_done(workdir: str, name: str, info: dict[str, Any]) -> None:
  """Writes the done marker of a cell (the last thing a cell does)."""
  atomic.write_json(os.path.join(cell_dir(workdir, name), DONE_FILE), info, indent=2,
                    sort_keys=True)


def latest_checkpoint_step(run_dir: str) -> int | None:
  """The largest finished Orbax step under RUN_DIR/checkpoints (temporary dirs ignored)."""
  folder = os.path.join(run_dir, 'checkpoints')
  if not os.path.isdir(folder):
    return None
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()]
  return max(steps) if steps else None


@contextlib.contextmanager
def locked(workdir: str, name: str, *, wait: bool) -> Iterator[bool]:
  """Holds locks/<name>.lock for the block; yields False (without waiting) if another holds it.

  flock() locks vanish with the process that held them, so a killed run never leaves a stale
  lock; on network filesystems flock needs their lock support (NFSv4, Lustre with flock).
  """
  folder = os.path.join(workdir, 'locks')
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f'{name}.lock'), 'a', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(workdir: str, name: str) -> bool:
  """Whether another process holds the lock of `name` now (a cell in progress)."""
  with locked(workdir, name, wait=False) as got:
    return not got


def check_study_file(workdir: str, preset: str, data: str | None) -> None:
  """Records (first run) or checks (reruns) the preset and data dir of the study."""
  path = os.path.join(workdir, STUDY_FILE)
  info = {'preset': preset, 'data': storage.absolute(data) if data else None}
  with locked(workdir, 'study', wait=True):
    recorded = read_json(path)
    if recorded is None:
      atomic.write_json(path, info, indent=2, sort_keys=True)
    elif recorded != info:
      raise StudyError(f'{path}: this study was started with preset {recorded.get("preset")!r} '
                       f'and data {recorded.get("data")!r}, not {preset!r} and {info["data"]!r}; '
                       'use another --workdir')


class CellsWaiting(Exception):
  """Selected cells were left out because a cell they need has not finished (not an error:
  the command exits 75, EX_TEMPFAIL, so a scheduler runs it again)."""


@contextlib.contextmanager
def finished_outputs(out: str) -> Iterator[None]:
  """Turns an unreadable output of a finished cell (deleted, truncated, edited) into one
  StudyError line that says how to redo the cell, instead of a traceback or a bare
  'cannot read' that every rerun repeats (a finished cell is never run again)."""
  try:
    yield
  except StudyError:
    raise
  except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
    # (reports.ReportError is a ValueError: a JSON that cannot be read or is not a table.)
    detail = ' '.join(str(e).split()) or type(e).__name__
    raise StudyError(f'{out}: a finished cell whose outputs cannot be read ({detail}); '
                     'remove this folder and rerun to run the cell again') from e
