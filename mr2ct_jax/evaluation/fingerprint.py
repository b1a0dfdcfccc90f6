"""What data an evaluation scored, so that two results are compared only on the same data.

Every evaluation output (synthesis, segmentation, sCT folders) records `fingerprint(...)`;
`--compare` refuses two results whose fingerprints differ (`check_same_data`).
"""

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from mr2ct_jax.data import checksums

PREPROCESSING_KEYS = ('spacing_mm', 'image_size', 'mr_percentile', 'n4', 'plane')


class FingerprintError(ValueError):
  """Two results were made on different data (one line naming what differs)."""


def fingerprint(meta: Mapping[str, Any] | None, split: str,
                patients: Iterable[str]) -> dict[str, Any]:
  """The fingerprint of scoring `patients` of `split` of a prepared dataset.

  Args:
    meta: the dataset's meta (`dataset.load_meta`), or None for data outside a prepared
      dataset (e.g. an sCT folder scored against a CT folder).
    split: the split, or a free-form name of what was scored (e.g. 'sct_dir').
    patients: the patient ids scored.

  Returns:
    {'split', 'patients' (sorted), 'preprocessing' (the meta's values), 'sha256'}: the hash
    covers the other three and the per-patient input files' names, slice counts and (where
    `prepare` recorded them) content hashes.
  """
  meta = dict(meta or {})
  pids = sorted(str(p) for p in patients)
  preprocessing = {k: meta[k] for k in PREPROCESSING_KEYS if k in meta}
  recorded = meta.get('splits', {}).get(split, {}).get('patients', {})
  inputs = {pid: {'num_slices': recorded[pid].get('num_slices'),
                  'files': sorted(str(f).rsplit('/', 1)[-1]
                                  for f in recorded[pid].get('files', {}).values())}
            for pid in pids if pid in recorded}
  for pid, info in inputs.items():
    if recorded[pid].get('sha256'):  # datasets prepared before hashes were recorded have none
      info['sha256'] = dict(recorded[pid]['sha256'])
  body = {'split': split, 'patients': pids, 'preprocessing': preprocessing, 'inputs': inputs}
  digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode('utf-8')).hexdigest()
  return {'split': split, 'patients': pids, 'preprocessing': preprocessing, 'sha256': digest}


def files_fingerprint(split: str, files: Mapping[str, Sequence[str]],
                      preprocessing: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The fingerprint of scoring reference files in place (no prepared dataset).

  Args:
    split: what was scored (e.g. 'sct_dir').
    files: patient id -> the reference files scored for it (e.g. its CT and mask); the hash
      covers each file's base name and the sha256 of its bytes, so renamed folders still
      match and edited files do not.
    preprocessing: how the reference was used (e.g. {'mask': 'ct_body_mask'}).

  Returns:
    {'split', 'patients' (sorted), 'preprocessing', 'sha256'}, like `fingerprint`.
  """
  pids = sorted(str(p) for p in files)
  preprocessing = dict(preprocessing or {})
  inputs = {pid: sorted([os.path.basename(str(f)), checksums.file_sha256(str(f))]
                        for f in files[pid])
            for pid in pids}
  body = {'split': split, 'patients': pids, 'preprocessing': preprocessing, 'inputs': inputs}
  digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode('utf-8')).hexdigest()
  return {'split': split, 'patients': pids, 'preprocessing': preprocessing, 'sha256': digest}


def check_same_data(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None,
                    name_a: str, name_b: str) -> None:
  """Raises FingerprintError unless the two fingerprints are equal (both must exist)."""
  for fp, name in ((a, name_a), (b, name_b)):
    if not fp:
      raise FingerprintError(f'{name}: records no data fingerprint (made by an older version); '
                             'evaluate it again to compare')
  if a['sha256'] == b['sha256']:
    return
  if a['split'] != b['split']:
    why = f"split {a['split']!r} vs {b['split']!r}"
  elif a['patients'] != b['patients']:
    only_a = sorted(set(a['patients']) - set(b['patients']))
    only_b = sorted(set(b['patients']) - set(a['patients']))
    why = f'patients differ (only in the first: {only_a[:5]}, only in the second: {only_b[:5]})'
  elif a['preprocessing'] != b['preprocessing']:
    why = f"preprocessing {a['preprocessing']} vs {b['preprocessing']}"
  else:
    why = 'the input files differ'
  raise FingerprintError(f'{name_a} and {name_b} were scored on different data ({why}); '
                         'compare results of the same test data')
