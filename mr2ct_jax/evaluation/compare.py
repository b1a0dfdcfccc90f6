"""Paired t-tests between two evaluations of the same test patients (JAX-free).

`python -m mr2ct_jax.evaluate --compare A B` runs `compare`; it reads only the per-volume
tables and the summaries, so it imports neither JAX nor the models.

Same data only: each evaluation's summary.json records the fingerprint of the data it scored
(`mr2ct_jax.evaluation.fingerprint`); two results whose fingerprints differ, or one without a
fingerprint (an output of an older version), are refused with one line, unless
--allow_different_data, which compares them anyway and records `same_data: false` (or null:
unknown) in compare.json and a warning line in compare.md.
"""

import json
import os
from typing import Any

from mr2ct_jax import atomic
from mr2ct_jax.evaluation import fingerprint as fingerprint_lib
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import unpaired


def read_summary(directory: str) -> dict[str, Any]:
  """summary.json of an evaluation output ({} if it has none).

  Raises:
    reports.ReportError: `directory` does not exist, or its summary.json cannot be read or
      is not an object.
  """
  if not os.path.isdir(directory):
    raise reports.ReportError(f'{directory}: no such evaluation folder')
  path = os.path.join(directory, 'summary.json')
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise reports.ReportError(f'{path}: cannot read JSON: {e}') from e
  if not isinstance(summary, dict):
    raise reports.ReportError(f'{path}: expected a JSON object')
  return summary


def read_fingerprint(directory: str) -> dict[str, Any] | None:
  """The data fingerprint of an evaluation output (summary.json), or None if it has none."""
  fp = read_summary(directory).get('fingerprint')
  return fp if isinstance(fp, dict) and 'sha256' in fp else None


def _unpaired_fingerprints(directory: str) -> dict[str, dict[str, Any]]:
  """The fingerprints of the unpaired test splits an evaluation scored (split -> fp)."""
  found = read_summary(directory).get('fingerprint_unpaired')
  return dict(found) if isinstance(found, dict) else {}


def same_data(dir_a: str, dir_b: str, allow_different_data: bool = False) -> bool | None:
  """True if both outputs scored the same data; False/None (unknown) only when allowed.

  The paired test split's fingerprint and those of the unpaired splits (when scored) must
  all be equal; an output that scored only unpaired splits has no paired fingerprint.

  Raises:
    fingerprint.FingerprintError: the fingerprints differ or one is missing, unless
      `allow_different_data`.
  """
  fps_a, fps_b = _unpaired_fingerprints(dir_a), _unpaired_fingerprints(dir_b)
  fp_a, fp_b = read_fingerprint(dir_a), read_fingerprint(dir_b)
  try:
    if fp_a is not None or fp_b is not None or not (fps_a or fps_b):
      fingerprint_lib.check_same_data(fp_a, fp_b, dir_a, dir_b)
    if set(fps_a) != set(fps_b):
      raise fingerprint_lib.FingerprintError(
          f'{dir_a} and {dir_b} scored different unpaired test splits ({sorted(fps_a)} vs '
          f'{sorted(fps_b)}); compare results of the same test data')
    for split in sorted(fps_a):
      fingerprint_lib.check_same_data(fps_a[split], fps_b[split], f'{dir_a} ({split})',
                                      f'{dir_b} ({split})')
  except fingerprint_lib.FingerprintError as e:
    if not allow_different_data:
      raise fingerprint_lib.FingerprintError(
          f'{e} (or pass --allow_different_data)') from e
    return None if fp_a is None or fp_b is None else False
  return True


def compare(dir_a: str, dir_b: str, output: str | None = None, *,
            overwrite: bool = False, allow_different_data: bool = False) -> dict[str, Any]:
  """Paired t-tests per metric between two evaluation directories (matched by patient id).

  Args:
    dir_a, dir_b: outputs of `evaluate` on the same test volumes (A: baseline, B: new).
    output: directory for compare.md / compare.json (created if missing); None: dir_b.
    overwrite: replace existing compare.md / compare.json.
    allow_different_data: compare even if the data fingerprints differ or are missing.

  Returns:
    {'a', 'b', 'same_data', 'patients', 'results': [{metric, n, mean_a, sd_a, mean_b, sd_b,
     diff, t, p}], 'markdown'}; the Markdown table is also printed.

  Raises:
    fingerprint.FingerprintError: the two results were made on different data (or one has
      no fingerprint), unless `allow_different_data`.
    reports.ReportError: a missing per_volume.json, differing patient sets, existing outputs,
      an `output` that cannot be created.
  """
  output = dir_b if output is None else output
  atomic.check_writable(output, folder=True, error=reports.ReportError)  # before any work
  same = same_data(dir_a, dir_b, allow_different_data)
  rows_a = reports.read_rows_json(os.path.join(dir_a, 'per_volume.json'))
  rows_b = reports.read_rows_json(os.path.join(dir_b, 'per_volume.json'))
  results = reports.paired_ttests(rows_a, rows_b, where_a=dir_a, where_b=dir_b)
  markdown = reports.ttest_markdown(results, dir_a, dir_b) if results else ''
  # The unpaired test volumes' MI (Fig. 4): MR rows and CT rows, each matched by patient.
  unpaired_results = unpaired.compare(dir_a, dir_b)
  if unpaired_results:
    table = reports.ttest_markdown(unpaired_results, dir_a, dir_b).replace(
        '# Paired t-tests (scipy.stats.ttest_rel, B vs A)',
        '## Unpaired test volumes: MI, paired t-tests by patient (MR and CT rows apart)')
    markdown = (markdown + '\n' + table) if markdown else table
  results = results + unpaired_results
  out = {'a': dir_a, 'b': dir_b, 'same_data': same,
         'patients': sorted(str(r['patient_id']) for r in rows_a),
         'test': 'scipy.stats.ttest_rel(B, A), two-sided; diff = mean(B - A)',
         'results': [{k: reports.json_number(v) for k, v in r.items()} for r in results],
         'markdown': markdown}
  write_comparison(output, out, overwrite)
  print(out['markdown'], flush=True)
  return out


def write_comparison(output: str, out: dict[str, Any], overwrite: bool) -> None:
  """Writes compare.json (`out`) and compare.md (out['markdown'], with a warning line added
  when out['same_data'] is not True) into `output`.

  Raises:
    reports.ReportError: existing files without `overwrite`, an `output` that cannot be made.
  """
  if out['same_data'] is not True:
    out['markdown'] += ('\nWarning: compared with --allow_different_data; the two results were '
                        + ('scored on different data.\n' if out['same_data'] is False else
                           'not both fingerprinted, the data may differ.\n'))
  atomic.check_writable(output, folder=True, error=reports.ReportError)
  paths = [os.path.join(output, name) for name in ('compare.md', 'compare.json')]
  for path in paths:
    if os.path.exists(path) and not overwrite:
      raise reports.ReportError(f'{path}: already exists (pass --overwrite to replace it)')
  os.makedirs(output, exist_ok=True)
  reports.write_json(paths[1], out)
  atomic.write_text(paths[0], out['markdown'])
