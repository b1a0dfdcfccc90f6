"""A local stand-in for Google Cloud Storage: `gs://BUCKET/KEY` is the file ROOT/BUCKET/KEY.

Each library reaches gs:// its own way, and the stand-in answers each at its own door, so the
package's real code paths run with `gs://` strings:
  - etils epath (our own files, TFDS metadata, Orbax's directories) goes through fsspec's
    `gcs` protocol (gcsfs in production): an fsspec filesystem rooted in ROOT is registered.
  - Orbax's arrays go through tensorstore's `gcs` kvstore, which speaks HTTP to GCS: Orbax's
    one function that builds that spec (`gcs_utils.get_kvstore_for_gcs`) returns a `file`
    kvstore under ROOT instead, and its bucket probe (google-cloud-storage, for
    hierarchical-namespace buckets) answers "flat bucket".
  - array_record's C++ reader downloads gs:// objects over the GCS JSON API:
    CLOUD_STORAGE_EMULATOR_ENDPOINT points it at a small HTTP server serving ROOT (ranged
    GETs, all that reading needs).
"""

import importlib
import os
import re
import threading
import types
import urllib.parse
from http import server
from typing import Any, Iterator

import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


# The module (the package's `fsspec.registry` attribute is its read-only mapping instead).
_FSSPEC_REGISTRY = importlib.import_module('fsspec.registry')


class _RootedGcs(DirFileSystem):
  """fsspec `gs`/`gcs` filesystem whose objects are files under `root` (set per test)."""

  protocol = ('gs', 'gcs')
  root = ''
  cachable = False  # a new root per test

  def __init__(self, *args: Any, **kwargs: Any):
    del args, kwargs  # gcsfs's options (finalize_on_close...) mean nothing here
    # auto_mkdir: GCS has no folders; writing a/b/c needs no a/b first.
    super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))


class _Handler(server.BaseHTTPRequestHandler):
  """GET .../b/BUCKET/o/OBJECT[?alt=media] with an optional Range header, from `root`."""

  protocol_version = 'HTTP/1.1'
  root = ''

  def do_GET(self) -> None:  # pylint: disable=invalid-name
    match = re.search(r'/b/([^/]+)/o/([^?]+)', self.path)
    file = None
    if match:
      name = urllib.parse.unquote(match.group(2))
      file = os.path.join(self.root, match.group(1), name)
    if file is None or not os.path.isfile(file):
      self.send_response(404)
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    with open(file, 'rb') as f:
      payload = f.read()
    total, start, end, status = len(payload), 0, len(payload) - 1, 200
    wanted = self.headers.get('Range') or ''
    last = re.fullmatch(r'bytes=-(\d+)', wanted)
    span = re.fullmatch(r'bytes=(\d+)-(\d*)', wanted)
    if last:
      start, status = max(0, total - int(last.group(1))), 206
    elif span:
      start, status = int(span.group(1)), 206
      if span.group(2):
        end = min(total - 1, int(span.group(2)))
    data = payload[start:end + 1]
    self.send_response(status)
    self.send_header('Content-Type', 'application/octet-stream')
    self.send_header('Content-Range', f'bytes {start}-{end}/{total}')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args: Any) -> None:
    del args


@pytest.fixture
def bucket(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
  """Makes gs:// paths resolve under tmp_path/'bucket-root' for one test; yields that root."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  root = str(tmp_path / 'bucket-root')
  os.makedirs(root)
  monkeypatch.setattr(_RootedGcs, 'root', root)
  for protocol in ('gs', 'gcs'):
    # Restored (gcsfs's entry, or none) after the test.
    monkeypatch.setitem(_FSSPEC_REGISTRY._registry, protocol, _RootedGcs)
  # epath caches one filesystem per protocol: bypass that cache while the root is ours.
  backend_type = type(backend.fsspec_backend)
  monkeypatch.setattr(backend_type, '_get_filesystem',
                      backend_type._get_filesystem.__wrapped__)  # pylint: disable=protected-access

  def kvstore(path: str) -> dict[str, Any]:
    name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {'driver': 'file', 'path': os.path.join(root, name, key)}

  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', kvstore)
  monkeypatch.setattr(gcs_utils, 'get_bucket',
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))

  handler = type('Handler', (_Handler,), {'root': root})
  httpd = server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', f'http://127.0.0.1:{httpd.server_port}')
  try:
    yield root
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
