"""Atomic outputs: files and directories appear complete or not at all.

Everything a command writes goes to a temporary sibling first and is renamed into place when
complete, so a killed run, a full disk or an exception never leaves a half-written output.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary sibling and a rename."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any, **dumps_kwargs: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (keyword arguments go to json.dumps)."""
  write_text(path, json.dumps(obj, **dumps_kwargs) + '\n')


def replace_dir(completed: str, target: str) -> None:
  """Moves the finished directory `completed` to `target`, replacing what is there.

  An existing `target` is first moved aside (one rename), so `target` is never missing its
  old or its new contents for longer than two renames.
  """
  if os.path.exists(target):
    parent = os.path.dirname(os.path.abspath(target))
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.old-', dir=parent)
    os.replace(target, os.path.join(old, 'previous'))
    os.replace(completed, target)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(completed, target)


@contextlib.contextmanager
def building_dir(target: str) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes `target` when the block succeeds.

  On any exception (including KeyboardInterrupt) the temporary directory is removed and
  `target` is left as it was.
  """
  target = os.path.abspath(target)
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.tmp-', dir=parent)
  try:
    yield tmp
    replace_dir(tmp, target)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
