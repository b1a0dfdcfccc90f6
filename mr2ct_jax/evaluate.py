"""Evaluates trained generators on the paired test split; compares two evaluations.

Usage:
  python -m mr2ct_jax.evaluate --workdir=runs/gc [--data=DATA_DIR] [--output=runs/gc/eval]
  python -m mr2ct_jax.evaluate --npz=g.npz --data=DATA_DIR --output=eval_npz
  python -m mr2ct_jax.evaluate --compare runs/nogc/eval runs/gc/eval   # paired t-tests

For every test patient, sCT = G_ct(MR) is compared with the registered CT, and sMR = G_mr(CT)
is computed for MI(real CT, sMR). Metrics (definitions in `mr2ct_jax.metrics`):
  mae_255, psnr_255  the paper's MAE / PSNR: both CTs windowed with config.data.ct_window to
                     [0, 255], over the evaluated region (`valid`, see below), whole volume
  ssim               Gaussian SSIM on the 0-255 scale, per slice inside `valid`, slice mean
  mae_hu             MAE in HU inside the body mask (= SynthRAD2023 MAE, no clipping)
  psnr_synthrad,     SynthRAD2023: clip to [-1024, 3000] HU, data range 4024, inside the mask
  ssim_synthrad
  mi_mr_sct,         MI (nats, 64x64 bins over [0, 255]) between real MR and sCT and between
  mi_ct_smr          real CT and sMR, per slice inside `valid`, averaged over slices (Fig. 4)
Regions: voxels outside the MR/CT common field of view (FOV) are never evaluated.
  `mask` (the test split's body mask AND common FOV) for mae_hu and the SynthRAD metrics;
  `valid` = the common FOV for the paper's 0-255 MAE/PSNR, SSIM and MI (the paper computes
  them over the whole common-FOV volume, air included). A record's `fov` array is used when
  present; otherwise the FOV is the set of whole slices in which `mask` is non-empty, which
  is how `mr2ct_jax.data.prepare` defines the common FOV (slices where the registered CT has
  tissue).

Outputs (written to a temporary directory, renamed when complete): per_volume.csv/.json,
per_slice.csv, summary.md, summary.json, figures/<patient>.png (MR | sCT | CT | |error|
panels), figures/metrics_boxplot.png, figures/mi_boxplot.png. An existing output is refused
unless --overwrite, which replaces only an earlier evaluation output (one with
per_volume.json); the output may never be, or contain, the workdir, export or data dir read.
"""

import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from mr2ct_jax import atomic
from mr2ct_jax import cli_flags
from mr2ct_jax import evaluation_core
from mr2ct_jax import report_figures
from mr2ct_jax import reports

METRIC_KEYS = evaluation_core.METRIC_KEYS
PER_VOLUME_FIELDS = ('patient_id', 'num_slices', 'region', 'valid_voxels',
                     'mask_voxels') + METRIC_KEYS
PER_SLICE_FIELDS = ('patient_id', 'slice_index', 'valid_voxels', 'mask_voxels') + METRIC_KEYS
# Scoring of single volumes, used here and by other modules (segmentation, tests).
ApplyFn = evaluation_core.ApplyFn
EvaluateError = evaluation_core.EvaluateError
translate_slices = evaluation_core.translate_slices
evaluate_volumes = evaluation_core.evaluate_volumes
# Every evaluation output holds this file (and --compare reads it): --overwrite may replace a
# folder only if it has it.
OWN_FILE = 'per_volume.json'


def region_note(regions: set[str]) -> str:
  """The summary's sentence on which voxels each metric used."""
  fov = ('the record\'s common-FOV array' if regions == {'fov'} else
         'the whole slices inside the MR/CT common field of view (slices where the test mask '
         'is non-empty)')
  return (f'Regions: 0-255 MAE/PSNR, SSIM and MI over {fov}, as in the paper; MAE in HU and '
          'the SynthRAD metrics inside the body mask (AND common FOV). Voxels outside the '
          'common FOV are never evaluated.')


def write_outputs(out_dir: str, per_volume: list[dict[str, Any]],
                  per_slice: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
  """Writes the tables, summaries and box plots into `out_dir`; returns the summary dict."""
  keys = [k for k in METRIC_KEYS if per_volume and k in per_volume[0]]
  reports.write_csv(os.path.join(out_dir, 'per_volume.csv'), per_volume,
                    [f for f in PER_VOLUME_FIELDS if f in per_volume[0]])
  reports.write_json(os.path.join(out_dir, 'per_volume.json'), reports.rows_to_json(per_volume))
  reports.write_csv(os.path.join(out_dir, 'per_slice.csv'), per_slice,
                    [f for f in PER_SLICE_FIELDS if f in per_slice[0]])
  meta = {**meta, 'region_note': region_note({r.get('region', 'fov_slices')
                                                for r in per_volume})}
  notes = [meta['region_note'],
           'SSIM: Gaussian window (sigma 1.5, 11x11), K1 0.01, K2 0.03, per slice; SynthRAD '
           'SSIM uses the same window (the challenge script uses a 7x7x7 uniform one).',
           'MI in nats, 64x64-bin joint histogram over [0, 255] of both windowed images, per '
           'slice inside the evaluated region, mean over slices.']
  if 'mi_ct_smr' not in keys:
    notes.append('MI(real CT, sMR) not computed: the source has no CT->MR generator.')
  title = f"Evaluation of {meta['source']}" + (f" (step {meta['step']})"
                                               if meta.get('step') is not None else '')
  markdown = reports.summary_markdown(per_volume, keys, title=title, notes=notes)
  with open(os.path.join(out_dir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(markdown)
  stats = reports.summarize(per_volume, keys)
  summary = {**meta, 'num_volumes': len(per_volume), 'num_slices': len(per_slice),
             'patients': [r['patient_id'] for r in per_volume],
             'metrics': {k: {**stats[k].to_json(), 'label': reports.METRICS[k].label,
                             'unit': reports.METRICS[k].unit} for k in keys},
             'summary_markdown': markdown}
  reports.write_json(os.path.join(out_dir, 'summary.json'), summary)
  figure_dir = os.path.join(out_dir, 'figures')
  report_figures.metric_boxplots(os.path.join(figure_dir, 'metrics_boxplot.png'), per_volume,
                          [k for k in keys if k not in reports.MI_METRICS])
  mi_rows = [r for r in per_volume if all(k in r for k in reports.MI_METRICS)]
  if mi_rows:
    report_figures.mi_boxplot(os.path.join(figure_dir, 'mi_boxplot.png'), mi_rows)
  return summary


def _resolve_data_dir(source: str, kind: str, data_dir: str | None,
                      config: ml_collections.ConfigDict) -> str:
  if data_dir:
    return data_dir
  if config.data.dir:
    return config.data.dir
  if kind == 'workdir':
    # Same rule as training: the built-in phantom under WORKDIR/phantom (reused if prepared).
    from mr2ct_jax import train  # pylint: disable=g-import-not-at-top  (train imports us)
    return train.resolve_data_dir(config, source)
  raise EvaluateError(f'{source}: the export\'s config has no data.dir; pass --data=DATA_DIR')


def _check_data_matches(data_dir: str, config: ml_collections.ConfigDict) -> None:
  """The generator only works on slices prepared like its training data (scale, intensity)."""
  from mr2ct_jax.data import prepare  # pylint: disable=g-import-not-at-top
  mismatch = prepare.settings_mismatch(data_dir, config)
  if mismatch is not None:
    raise EvaluateError(mismatch)


def _check_apart(output_dir: str, source: str, data_dir: str | None) -> None:
  """The output must not be, nor contain, the workdir / export or the data dir it reads."""
  atomic.check_apart(output_dir, {'--workdir' if os.path.isdir(source) else '--npz': source,
                                  '--data': data_dir}, inside_ok=True, error=EvaluateError)


def _load_generators(source: str, step: int | None, backend: str
                     ) -> tuple[ApplyFn, ApplyFn | None, ml_collections.ConfigDict, Any]:
  """(G_ct, G_mr or None, the run's config, G_ct's GeneratorInfo); both from one step."""
  from mr2ct_jax import generator_source  # pylint: disable=g-import-not-at-top  (jax/flax)
  sct_fn, config, info = generator_source.load_generator(source, 'mr2ct', step, backend)
  try:
    smr_fn, _, _ = generator_source.load_generator(source, 'ct2mr', info.step if
                                                   info.kind == 'workdir' else step, backend)
  except generator_source.SourceError as e:
    if info.kind != 'npz':
      raise
    # An export may hold only G_ct; everything but MI(real CT, sMR) can still be computed.
    logging.warning('%s; skipping MI(real CT, sMR)', e)
    smr_fn = None
  return sct_fn, smr_fn, config, info


def evaluate(source: str, data_dir: str | None, output_dir: str, *, step: int | None = None,
             overwrite: bool = False, backend: str = 'jax',
             progress: bool = True) -> dict[str, Any]:
  """Evaluates a run (or export) on the paired test split and writes the reports.

  Args:
    source: a training workdir or an .npz written by `mr2ct_jax.export`.
    data_dir: prepared dataset with a `test` split; None: the run config's data.dir, or for a
      workdir with data.dir='' the phantom prepared under WORKDIR/phantom.
    output_dir: directory to create (see the module docstring for its files).
    step: checkpoint step (None: the latest).
    overwrite: replace an existing output_dir written by an earlier evaluation.
    backend: 'jax' or 'numpy' generator forward.
    progress: show a progress bar.

  Returns:
    The summary (also in summary.json): metric -> {mean, sd, n, n_inf, n_nan, ...}, patients,
    source, step, data_dir, output_dir, and the Markdown table ('summary_markdown'), which is
    also printed.

  Raises:
    EvaluateError / reports.ReportError / generator_source.SourceError / data errors: one line.
  """
  output_dir = os.path.abspath(output_dir)
  # Fail before loading anything; the output may lie inside the workdir (WORKDIR/eval).
  _check_apart(output_dir, source, data_dir)
  reports.check_output_dir(output_dir, overwrite, OWN_FILE)
  sct_fn, smr_fn, config, info = _load_generators(source, step, backend)
  data_dir = _resolve_data_dir(source, info.kind, data_dir, config)
  _check_apart(output_dir, source, data_dir)  # data.dir of the run's config
  from mr2ct_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TFDS is slow)
  if not pipeline.has_split(data_dir, 'test'):
    raise EvaluateError(f'{data_dir}: dataset has no paired `test` split to evaluate on')
  _check_data_matches(data_dir, config)
  meta = {'source': source, 'kind': info.kind, 'step': info.step, 'data_dir': data_dir,
          'output_dir': output_dir, 'ct_window': list(config.data.ct_window),
          'mr_window': list(config.data.mr_window)}
  with reports.atomic_output_dir(output_dir, overwrite, OWN_FILE) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    per_volume, per_slice = evaluate_volumes(pipeline.iterate_volumes(data_dir, 'test'), sct_fn,
                                             smr_fn, config, figure_dir=figure_dir,
                                             progress=progress)
    if not per_volume:
      raise EvaluateError(f'{data_dir}: the test split holds no volumes')
    summary = write_outputs(tmp, per_volume, per_slice, meta)
  print(summary['summary_markdown'], flush=True)
  print(f'Evaluation written to {output_dir}', flush=True)
  return summary


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


def _define_flags() -> flags.FlagValues:
  # A private FlagValues (see cli_flags): train.py imports this module next to main's flags.
  fv = flags.FlagValues()
  cli_flags.define_generator_source_flags(fv)
  flags.DEFINE_string('data', None, 'Prepared dataset directory with a paired `test` split. '
                      'Default: the run config\'s data.dir, or the phantom under '
                      'WORKDIR/phantom.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Output directory (default WORKDIR/eval). With '
                      '--compare: where compare.md/json go (default: the second directory).',
                      flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.', flag_values=fv)
  flags.DEFINE_bool('compare', False, 'Compare two evaluation directories given as arguments: '
                    '--compare A B (paired t-tests, B vs A).', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show a progress bar.', flag_values=fv)
  return fv


def _known_errors() -> tuple[type[Exception], ...]:
  """Error types that carry a one-line message for the user (from modules already loaded).

  Looked up in sys.modules so `--compare` does not import JAX just to name exception types;
  cli_flags calls this after the failure, when the modules are loaded.
  """
  errors: list[type[Exception]] = [EvaluateError, reports.ReportError]
  for module, name in (('mr2ct_jax.generator_source', 'SourceError'),
                       ('mr2ct_jax.checkpointing', 'CheckpointError'),
                       ('mr2ct_jax.data.volume', 'VolumeError'),
                       ('mr2ct_jax.data.volume', 'DatasetError'),
                       ('mr2ct_jax.data.pipeline', 'DatasetError')):
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
      errors.append(cls)
  return tuple(errors)


def _run(fv: flags.FlagValues, args: list[str]) -> None:
  if fv.compare:
    if len(args) != 2:
      raise EvaluateError('--compare needs exactly two evaluation directories: --compare A B')
    compare(args[0], args[1], fv.output, overwrite=fv.overwrite)
    return
  if args:
    raise EvaluateError(f'unexpected arguments {args} (flags are --name=value)')
  source = cli_flags.generator_source(fv, ' (or --compare A B)')
  output = fv.output
  if output is None:
    if fv.npz is not None:
      raise EvaluateError('--output is required with --npz')
    output = os.path.join(fv.workdir, 'eval')
  evaluate(source, fv.data, output, step=fv.step, overwrite=fv.overwrite, backend=fv.backend,
           progress=fv.progress)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return cli_flags.run(fv, argv, 'mr2ct_jax.evaluate', lambda args: _run(fv, args),
                       errors=_known_errors, positional=True, doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
