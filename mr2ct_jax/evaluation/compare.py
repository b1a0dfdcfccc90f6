"""Paired t-tests between two evaluations of the same test patients (JAX-free).

`python -m mr2ct_jax.evaluate --compare A B` runs `compare`; it reads only the per-volume
tables, so it imports neither JAX nor the models.
"""

import os
from typing import Any

from mr2ct_jax import atomic
from mr2ct_jax.evaluation import reports

def compare(dir_a: str, dir_b: str, output: str | None = None, *,
            overwrite: bool = False) -> dict[str, Any]:
  """Paired t-tests per metric between two evaluation directories (matched by patient id).

  Args:
    dir_a, dir_b: outputs of `evaluate` on the same test volumes (A: baseline, B: new).
    output: directory for compare.md / compare.json (created if missing); None: dir_b.
    overwrite: replace existing compare.md / compare.json.

  Returns:
    {'a', 'b', 'patients', 'results': [{metric, n, mean_a, sd_a, mean_b, sd_b, diff, t, p}],
     'markdown'}; the Markdown table is also printed.

  Raises:
    reports.ReportError: a missing per_volume.json, differing patient sets, existing outputs,
      an `output` that cannot be created.
  """
  rows_a = reports.read_rows_json(os.path.join(dir_a, 'per_volume.json'))
  rows_b = reports.read_rows_json(os.path.join(dir_b, 'per_volume.json'))
  results = reports.paired_ttests(rows_a, rows_b, where_a=dir_a, where_b=dir_b)
  markdown = reports.ttest_markdown(results, dir_a, dir_b)
  output = dir_b if output is None else output
  atomic.check_writable(output, folder=True, error=reports.ReportError)
  paths = [os.path.join(output, name) for name in ('compare.md', 'compare.json')]
  for path in paths:
    if os.path.exists(path) and not overwrite:
      raise reports.ReportError(f'{path}: already exists (pass --overwrite to replace it)')
  os.makedirs(output, exist_ok=True)
  out = {'a': dir_a, 'b': dir_b, 'patients': sorted(str(r['patient_id']) for r in rows_a),
         'test': 'scipy.stats.ttest_rel(B, A), two-sided; diff = mean(B - A)',
         'results': [{k: reports.json_number(v) for k, v in r.items()} for r in results],
         'markdown': markdown}
  reports.write_json(paths[1], out)
  atomic.write_text(paths[0], markdown)
  print(markdown, flush=True)
  return out
