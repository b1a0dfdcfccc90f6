"""Paths that may be object storage (gs://, s3://...): one place that tells them apart.

A local path is handled exactly as before (os, shutil). A URL goes through etils `epath`,
whose gs:// backend is fsspec (`pip install gcsfs`; s3:// needs s3fs). Object stores have no
folders and no rename: an object appears whole when its upload completes, so outputs are
built locally and uploaded (`upload_file`, `upload_tree`) instead of renamed into place.
"""

import contextlib
import os
import shutil
import tempfile
from typing import IO, Any, Iterator


PathLike = str | os.PathLike

# The fsspec package that serves each URL scheme, named in the error when it is missing.
_PACKAGES = {'gs': 'gcsfs', 'gcs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs'}


class StorageError(OSError):
  """A URL that cannot be used here (its filesystem package is missing); names the URL."""


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/..., s3://...) rather than a local path."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """The absolute form of a local path; a URL unchanged (without a trailing slash).

  Needs no filesystem package: commands name their outputs before checking the backend.
  """
  path = os.fspath(path)
  if is_remote(path):
    scheme, rest = path.split('://', 1)
    return f'{scheme}://{rest.rstrip("/")}'
  return os.path.abspath(path)


def join(path: PathLike, *names: str) -> str:
  """`os.path.join` for local paths and URLs alike."""
  return os.path.join(os.fspath(path), *names)


def _backend_error(scheme: str) -> str | None:
  """Why fsspec cannot serve `scheme` (its package is not installed), or None.

  Not cached: fsspec's registry decides each time (a test registers a stand-in for gs://).
  """
  import fsspec  # pylint: disable=g-import-not-at-top  (epath's URL backend; local paths skip it)
  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as e:
    return str(e)
  return None


def check_backend(path: PathLike) -> None:
  """Raises StorageError unless the filesystem of URL `path` is installed (local: nothing).

  Without the check, the first use of a gs:// path fails deep inside Orbax or TFDS.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme = path.split('://', 1)[0]
  why = _backend_error(scheme)
  if why is not None:
    package = _PACKAGES.get(scheme)
    hint = f'pip install {package}' if package else why
    extra = ' (or pip install "mr2ct_jax[gcs]")' if package == 'gcsfs' else ''
    raise StorageError(f'{path}: {scheme}:// paths need {package or "an fsspec filesystem"}; '
                       f'{hint}{extra}')


def as_path(path: PathLike) -> Any:
  """An epath.Path: os operations for a local path, fsspec for a URL.

  Raises:
    StorageError: the URL's filesystem package (gcsfs for gs://) is not installed.
  """
  check_backend(path)
  # Imported here: etils pulls in jax, which the light commands (translate...) never load.
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def exists(path: PathLike) -> bool:
  """Whether `path` exists (a local dangling link counts, as os.path.lexists)."""
  if not is_remote(path):
    return os.path.lexists(path)
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  """`os.path.isdir`; for a URL, whether objects lie under the prefix `path/`."""
  return os.path.isdir(path) if not is_remote(path) else as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  """`os.path.isfile`; for a URL, whether the object `path` exists."""
  return os.path.isfile(path) if not is_remote(path) else as_path(path).is_file()


def listdir(path: PathLike) -> list[str]:
  """The names in folder `path` (`os.listdir`; for a URL, the next level of its prefix)."""
  if not is_remote(path):
    return os.listdir(path)
  return [p.name for p in as_path(path).iterdir()]


def makedirs(path: PathLike) -> None:
  """Creates folder `path` and its parents (on an object store: nothing to create)."""
  if is_remote(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def open_file(path: PathLike, mode: str = 'r', **kwargs: Any) -> IO[Any]:
  """`open` for local paths; for a URL, the remote object (text modes UTF-8)."""
  if not is_remote(path):
    return open(path, mode, **kwargs)
  if 'b' not in mode:
    return as_path(path).open(mode, encoding=kwargs.get('encoding', 'utf-8'))
  return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
  """The whole content of file or object `path` (e.g. for readers that seek, as zip's)."""
  with open_file(path, 'rb') as f:
    return f.read()


def rmtree(path: PathLike) -> None:
  """Deletes folder `path` and everything in it (for a URL, every object under it)."""
  if is_remote(path):
    as_path(path).rmtree()
  else:
    shutil.rmtree(path)


def upload_file(local: PathLike, remote: PathLike) -> None:
  """Copies the local file `local` to the URL `remote` in one upload (whole or not at all)."""
  with open(local, 'rb') as src, as_path(remote).open('wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)


def upload_tree(local: PathLike, remote: PathLike) -> None:
  """Copies the local folder `local` to the URL `remote` (replacing what is there).

  The top folder's own files are uploaded last: commands mark a complete output with such a
  file (dataset_meta.json, summary.json), so a reader never takes a partial upload for a
  complete one. An existing `remote` is deleted first; it is missing for the upload's time.
  """
  local = os.fspath(local)
  if exists(remote):
    rmtree(remote)
  top = []
  for folder, _, files in os.walk(local):
    relative = os.path.relpath(folder, local)
    for name in sorted(files):
      if relative == '.':
        top.append(name)
      else:
        upload_file(os.path.join(folder, name), join(remote, relative, name))
  for name in top:
    upload_file(os.path.join(local, name), join(remote, name))


def download(remote: PathLike, local: PathLike) -> None:
  """Copies the URL `remote` to the local path `local`: one object, or every object under
  the prefix `remote/` into the folder `local` (created, with its parents).

  Raises:
    FileNotFoundError: nothing lies at `remote`.
  """
  remote, local = os.fspath(remote), os.fspath(local)
  if isfile(remote):
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    with as_path(remote).open('rb') as src, open(local, 'wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  elif isdir(remote):
    os.makedirs(local, exist_ok=True)
    for name in listdir(remote):
      download(join(remote, name), os.path.join(local, name))
  else:
    raise FileNotFoundError(f'{remote}: no such object or prefix')


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """Yields a local path holding what `path` holds: `path` itself when it is local, else a
  download of the object or folder into a temporary folder (same base name), deleted after.

  For readers that need local files (nibabel, SimpleITK's DICOM reader).

  Raises:
    FileNotFoundError: nothing lies at the URL `path`.
  """
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  url = absolute(path)
  folder = tempfile.mkdtemp(prefix='mr2ct_jax-download-')
  try:
    local = os.path.join(folder, os.path.basename(url))
    download(url, local)
    yield local
  finally:
    shutil.rmtree(folder, ignore_errors=True)
