"""Safe outputs: checked before any work, and appearing complete or not at all.

Everything a command writes goes to a temporary sibling first and is renamed into place when
complete, so a killed run, a full disk or an exception never leaves a half-written output.
The `check_*` functions let a command refuse a bad output location at start (before loading a
model or reading data): one it cannot create, one that overlaps its inputs, or an existing
folder that `--overwrite` would wrongly delete. Failures of the writes themselves are reported
as `OutputError`s naming the output, not the temporary sibling.

An output on object storage (gs://...) has no rename: it is written to a local temporary
file or folder and uploaded when complete (`storage.upload_file`, `storage.upload_tree`), an
object appearing whole when its upload ends. Local outputs take the rename path unchanged.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Mapping
from typing import IO, Any, Iterator

from mr2ct_jax import storage

Path = str | os.PathLike


class OutputError(ValueError):
  """An output location that cannot or must not be written; the message starts with the path."""


def _failed(path: str, e: OSError) -> OutputError:
  # The user named `path`; the temporary sibling that actually failed means nothing to them.
  if isinstance(e, storage.StorageError):  # names the URL and the package to install
    return OutputError(str(e))
  return OutputError(f'{path}: cannot write it ({e.strerror or e})')


def _within(path: str, folder: str) -> bool:
  """Whether `path` lies strictly inside `folder` (both absolute, normalised)."""
  if storage.is_remote(path) or storage.is_remote(folder):
    return path.startswith(folder.rstrip('/') + '/')
  return path != folder and os.path.commonpath([path, folder]) == folder


def _check_writable_remote(path: str, folder: bool, error: type[Exception]) -> None:
  """The checks a URL allows before any work: its filesystem is installed and it is not an
  object where a folder is needed (access rights show at the first upload)."""
  try:
    storage.check_backend(path)
  except storage.StorageError as e:
    raise error(str(e)) from e
  if folder and storage.isfile(path):
    raise error(f'{path}: exists and is not a folder')


def check_writable(path: Path, *, folder: bool = False,
                   error: type[Exception] = OutputError) -> None:
  """Raises `error` unless `path` can be created (with its missing parent folders).

  The nearest existing ancestor must be a folder in which this process can create entries.
  That is tested by creating and removing an empty temporary folder there: permission bits,
  read-only mounts, /proc and /sys (writable to root by os.access, yet refusing a mkdir) all
  answer a real mkdir truthfully.

  Args:
    path: the output file, or folder, to be written.
    folder: files are written inside `path` (which may exist already); otherwise `path`
      itself (or a temporary sibling of it) is created in its parent.
    error: exception type to raise (a command's own error type).
  """
  if storage.is_remote(path):
    _check_writable_remote(storage.absolute(path), folder, error)
    return
  path = os.path.abspath(os.fspath(path))
  ancestor = path if folder else os.path.dirname(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    if ancestor == path:
      raise error(f'{path}: exists and is not a folder')
    raise error(f'{path}: cannot be created: {ancestor} is not a folder')
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.write-check-', dir=ancestor))
  except OSError as e:
    raise error(f'{path}: cannot be created ({e.strerror or e}: {ancestor})') from e


def check_apart(output: Path, inputs: Mapping[str, Path | None], *, inside_ok: bool = False,
                error: type[Exception] = OutputError) -> None:
  """Raises `error` if `output` is, contains or (unless `inside_ok`) lies inside an input.

  Replacing such an output would delete (or, while building it, feed on) the data it reads.
  Symbolic links are resolved, so a link to an input counts as the input.

  Args:
    output: the path a command creates or replaces.
    inputs: flag name ('--mr_dir') -> the path given (None or '': not given).
    inside_ok: allow `output` inside an input (e.g. evaluate's default WORKDIR/eval).
    error: exception type to raise.
  """
  out = _resolved(output)
  for name, given in inputs.items():
    if not given:
      continue
    src = _resolved(given)
    if out == src:
      relation = 'is'
    elif _within(src, out):
      relation = 'contains'
    elif _within(out, src) and not inside_ok:
      relation = 'is inside'
    else:
      continue
    raise error(f'{os.fspath(output)}: the output {relation} the input {name}={os.fspath(given)};'
                ' choose an output location apart from the inputs')


def _resolved(path: Path) -> str:
  """Links resolved for a local path; a URL (which has no links) normalised."""
  return storage.absolute(path) if storage.is_remote(path) else os.path.realpath(path)


def check_replaceable(path: Path, overwrite: bool, own_file: str, what: str, *,
                      error: type[Exception] = OutputError) -> None:
  """Raises `error` unless `path` is absent, or `overwrite` and it is this command's output.

  `--overwrite` replaces a whole folder, so it is honoured only for a folder the command wrote
  earlier (recognised by `own_file`, which it always writes) or an empty one: a mistyped
  output must not delete a training run, a dataset or raw data.

  Args:
    path: the output folder.
    overwrite: the user asked to replace an existing output.
    own_file: a file name that every complete output of the command holds.
    what: the output's kind for the message, e.g. 'a prepared dataset'.
    error: exception type to raise.
  """
  path = os.fspath(path)
  if not storage.exists(path):
    return
  if not overwrite:
    raise error(f'{path}: already exists (pass --overwrite to replace it)')
  if not storage.isdir(path):
    raise error(f'{path}: exists and is not a folder; --overwrite replaces only {what}')
  if storage.listdir(path) and not storage.isfile(storage.join(path, own_file)):
    raise error(f'{path}: not {what} (no {own_file}); refusing to replace it even with '
                '--overwrite')


def _temp_stem(path: str) -> str:
  """The start of a temporary sibling's name: '.' + the target's name, cut so that the
  suffixes added to it stay within a file system's 255-byte name limit."""
  name = os.path.basename(path)
  while len(name.encode('utf-8')) > 200:
    name = name[:-1]
  return f'.{name}'


def _umask() -> int:
  """The process's umask: from /proc (Linux), else by setting it and restoring it at once
  (which another thread creating a file in between would see)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def writing(path: str, mode: str = 'w') -> Iterator[IO[Any]]:
  """Yields a file object on a temporary sibling that becomes `path` when the block succeeds.

  Args:
    path: the file to write.
    mode: 'w' (UTF-8 text, newlines as written) or 'wb'.

  Raises:
    OutputError: a write fails (full disk, no permission...); the message names `path`.
  """
  if storage.is_remote(path):
    # No rename on object storage: a local temporary file, uploaded whole when complete.
    storage.check_backend(path)
    fd, tmp = tempfile.mkstemp(prefix=f'{_temp_stem(path)}.', suffix='.tmp')
    os.close(fd)
    finish = lambda: storage.upload_file(tmp, path)
  else:
    # Hidden and unique: a folder listing skips it, and two writers never share one.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f'{_temp_stem(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
    finish = lambda: os.replace(tmp, path)
  text = {'encoding': 'utf-8', 'newline': ''} if 'b' not in mode else {}
  try:
    try:
      with open(tmp, mode, **text) as f:
        yield f
      finish()
    except OSError as e:
      raise _failed(path, e) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary sibling and a rename."""
  with writing(path) as f:
    f.write(text)


def write_json(path: str, obj: Any, **dumps_kwargs: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (keyword arguments go to json.dumps)."""
  write_text(path, json.dumps(obj, **dumps_kwargs) + '\n')


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
  """SIGINT and SIGTERM that arrive inside the block are delivered when it ends.

  For the two renames of `replace_dir`, which a signal must not split: between them the old
  output is only in a hidden sibling. Python runs signal handlers in the main thread whatever
  thread the signal hits, so the handlers are swapped for recorders there (elsewhere
  `signal.signal` is not allowed, and the block runs unprotected).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught: list[int] = []
  handlers = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    handlers[sig] = signal.getsignal(sig)
    if handlers[sig] is not None:  # None: installed outside Python; left alone
      signal.signal(sig, lambda signum, frame: caught.append(signum))
  try:
    yield
  finally:
    for sig, handler in handlers.items():
      if handler is not None:
        signal.signal(sig, handler)
    _deliver(caught)


def _deliver(signals: list[int]) -> None:
  """Raises each signal in turn; one whose handler raises (KeyboardInterrupt, a stop
  exception) does not keep the later ones from being delivered."""
  if signals:
    try:
      signal.raise_signal(signals[0])
    finally:
      _deliver(signals[1:])


def replace_dir(completed: str, target: str) -> None:
  """Moves the finished directory `completed` to `target`, replacing what is there.

  An existing `target` is first moved aside (one rename), so `target` is never missing its
  old or its new contents for longer than two renames; SIGINT/SIGTERM wait until both are
  done and the old contents deleted. If the second rename fails, the old contents are moved
  back (if that fails too, the error names the hidden folder that keeps them). A URL
  `target` is uploaded instead (`storage.upload_tree`: what was there is deleted first, the
  top folder's files go last).
  """
  if storage.is_remote(target):
    storage.upload_tree(completed, target)
    shutil.rmtree(completed, ignore_errors=True)
    return
  if not os.path.exists(target):
    os.replace(completed, target)
    return
  parent = os.path.dirname(os.path.abspath(target))
  with _signals_deferred():
    old = tempfile.mkdtemp(prefix=f'{_temp_stem(target)}.old-', dir=parent)
    previous = os.path.join(old, 'previous')
    try:
      os.replace(target, previous)
    except OSError:
      os.rmdir(old)
      raise
    try:
      os.replace(completed, target)
    except OSError as e:
      try:
        os.replace(previous, target)
      except OSError as restore_error:
        raise OSError(e.errno, f'{e.strerror or e}; the previous contents of {target} are kept '
                      f'in {previous}') from restore_error
      with contextlib.suppress(OSError):
        os.rmdir(old)
      raise
    # Inside the deferral too, so that a signal's default action (the process ends) leaves
    # no hidden copy of the old output behind.
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def removed_if_left_empty(folder: str) -> Iterator[None]:
  """Removes the local `folder`, and the parent folders created with it, if the block fails
  before anything is written in them and they did not exist before: a run that stops at a
  bad input leaves no empty workdir behind (one that wrote something, e.g. a built phantom,
  keeps it for the rerun)."""
  missing = []
  if not storage.is_remote(folder):
    path = os.path.abspath(folder)  # normalised: 'a/b/../c' is 'a/c'
    while not os.path.lexists(path):
      missing.append(path)
      path = os.path.dirname(path)
  try:
    yield
  except BaseException:
    for path in missing:  # the deepest first; stops at the first that is not empty
      try:
        os.rmdir(path)
      except OSError:
        break
    raise


@contextlib.contextmanager
def building_dir(target: str) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes `target` when the block succeeds.

  On any exception (including KeyboardInterrupt) the temporary directory is removed and
  `target` is left as it was.

  Raises:
    OutputError: the temporary directory cannot be created or renamed (errors inside the
      block, which may come from reading inputs, pass through unchanged).
  """
  remote = storage.is_remote(target)
  target = storage.absolute(target)
  parent = os.path.dirname(target)
  try:
    if remote:  # built in the local temporary folder, then uploaded (`replace_dir`)
      storage.check_backend(target)
      tmp = tempfile.mkdtemp(prefix=f'{_temp_stem(target)}.tmp-')
    else:
      os.makedirs(parent, exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=f'{_temp_stem(target)}.tmp-', dir=parent)
    # mkdtemp makes 0700 whatever the umask; the finished folder gets the mode any new
    # folder would (others can read a prepared dataset or a DICOM series, e.g. a TPS).
    os.chmod(tmp, 0o777 & ~_umask())
  except OSError as e:
    raise _failed(target, e) from e
  try:
    yield tmp
    try:
      replace_dir(tmp, target)
    except OSError as e:
      raise _failed(target, e) from e
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
