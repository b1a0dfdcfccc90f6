"""Content hashes of source files, so that a file changed after `prepare` is noticed.

`prepare` records the sha256 of every evaluation subject's source files (dataset_meta.json);
the evaluation re-reads those files (the SynthRAD2023 metrics translate the raw MR) and
compares the hashes first, and the data fingerprint covers them, so two results are never
compared as "the same data" when a source file changed in between.
"""

import hashlib
import os

from mr2ct_jax.data import dicom


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (read in 1 MiB blocks)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def source_sha256(path: str) -> str:
  """sha256 of a source volume: a file's bytes, or for a DICOM series folder the names and
  bytes of its DICOM files (sorted; hidden files, other files such as a README, and
  subfolders left out, as the reader leaves them out)."""
  if not os.path.isdir(path):
    return file_sha256(path)
  digest = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    member = os.path.join(path, name)
    if (name.startswith('.') or not os.path.isfile(member) or
        not dicom.looks_like_dicom_file(member)):
      continue
    digest.update(name.encode('utf-8') + b'\0' + file_sha256(member).encode('ascii'))
  return digest.hexdigest()
