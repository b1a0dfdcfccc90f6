"""Paired t-tests of Dice per structure between two segmentation evaluations (JAX-free).

Usage:
  python -m mr2ct_jax.segmentation.compare A/eval B/eval [--output=DIR] [--overwrite]
  python -m mr2ct_jax.evaluate --compare A/eval B/eval     # the same, for segmentation outputs

A and B are `eval/` directories of `python -m mr2ct_jax.segmentation` or of
`python -m mr2ct_jax.segmentation.baseline` (e.g. without and with the GC loss, 20 vs 300
training volumes, or via synthesis vs the single-modality baseline). For each structure both
report, `scipy.stats.ttest_rel(B, A)` (two-sided; positive t: B higher) over the patients,
matched by patient id; a patient whose ground truth lacks the structure (Dice NaN) is left out
of that structure's test, and the table says how many. The two must have scored the same
patients of the same data (their recorded data fingerprints must be equal) and report the
same structures. Outputs: OUTPUT/compare.md and compare.json (OUTPUT: default B).
"""

import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from mr2ct_jax import atomic
from mr2ct_jax.cli import commands
from mr2ct_jax.evaluation import compare as eval_compare
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports

COMMAND = 'mr2ct_jax.segmentation.compare'
KIND = 'segmentation'  # = segmentation.evaluate.KIND (that module imports JAX)


read_summary = eval_compare.read_summary


def is_segmentation_output(eval_dir: str) -> bool:
  """Whether `eval_dir` was written by a segmentation evaluation."""
  return read_summary(eval_dir).get('kind') == KIND


def _structures(summary: dict[str, Any], where: str) -> list[str]:
  structures = summary.get('structures')
  if summary.get('kind') != KIND or not isinstance(structures, dict):
    raise reports.ReportError(f'{where}: not a segmentation evaluation (its summary.json '
                              'names no structures); evaluate it with this version')
  return [structures[k] for k in sorted(structures, key=int)]


def compare(dir_a: str, dir_b: str, output: str | None = None, *,
            overwrite: bool = False, allow_different_data: bool = False) -> dict[str, Any]:
  """Paired t-tests of Dice per structure (and of dice_mean) of B against A.

  Args:
    dir_a, dir_b: segmentation evaluation directories (A: baseline, B: new).
    output: directory for compare.md / compare.json (created if missing); None: dir_b.
    overwrite: replace existing compare.md / compare.json.
    allow_different_data: compare even if the data fingerprints differ or one is missing
      (compare.json then records same_data false / null).

  Returns:
    {'a', 'b', 'patients', 'structures', 'same_data', 'test', 'results': [{metric, n, n_excluded, mean_a,
    sd_a, mean_b, sd_b, diff, t, p}], 'markdown'}; the table is also printed.

  Raises:
    reports.ReportError: a missing/unreadable output, differing structures or patients,
      existing outputs.
    fingerprint.FingerprintError: the two were scored on different data.
  """
  summary_a, summary_b = read_summary(dir_a), read_summary(dir_b)
  names_a = _structures(summary_a, dir_a)
  names_b = _structures(summary_b, dir_b)
  output = dir_b if output is None else output
  atomic.check_writable(output, folder=True, error=reports.ReportError)  # before any work
  same = eval_compare.same_data(dir_a, dir_b, allow_different_data)
  if names_a != names_b:
    raise reports.ReportError(f'{dir_a} vs {dir_b}: they report different structures '
                              f'({names_a} vs {names_b}); were they made with different '
                              'label tables?')
  rows_a = reports.read_rows_json(os.path.join(dir_a, 'per_volume.json'))
  rows_b = reports.read_rows_json(os.path.join(dir_b, 'per_volume.json'))
  metrics = [f'dice_{n}' for n in names_a] + ['dice_mean']
  results = reports.paired_ttests(rows_a, rows_b, metrics, where_a=dir_a, where_b=dir_b)
  markdown = reports.ttest_markdown(results, dir_a, dir_b).replace(
      'Pairs with a non-finite value (inf PSNR) are excluded',
      'Pairs where a ground truth lacks the structure (Dice NaN) are excluded')
  out = {'a': dir_a, 'b': dir_b, 'patients': sorted(str(r['patient_id']) for r in rows_a),
         'structures': names_a, 'same_data': same,
         'test': 'scipy.stats.ttest_rel(B, A), two-sided, per structure, matched by patient; '
                 'diff = mean(B - A)',
         'results': [{k: reports.json_number(v) for k, v in r.items()} for r in results],
         'markdown': markdown}
  eval_compare.write_comparison(output, out, overwrite)
  print(out['markdown'], flush=True)
  return out


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string('output', None, 'Where compare.md/json go (default: the second '
                      'directory).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace existing compare.md/json.', flag_values=fv)
  flags.DEFINE_bool('allow_different_data', False, 'Compare even if the two were scored on '
                    'different data (their fingerprints differ or one has none).',
                    flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line 'error: ...'."""
  fv = _define_flags()

  def body(args: list[str]) -> None:
    if len(args) != 2:
      raise SystemExit('error: give exactly two segmentation evaluation directories: A B')
    compare(args[0], args[1], fv.output, overwrite=fv.overwrite,
            allow_different_data=fv.allow_different_data)

  return commands.run(fv, argv, COMMAND, body, positional=True, doc=__doc__,
                      errors=(reports.ReportError, fingerprint.FingerprintError))


if __name__ == '__main__':
  sys.exit(main())
