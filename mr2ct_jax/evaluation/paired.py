"""Evaluation of trained generators on the test splits: translate, score, report.

`evaluate` is the job behind `python -m mr2ct_jax.evaluate` and the end of training: for every
paired test patient sCT = G_ct(MR) is compared with the registered CT and sMR = G_mr(CT) is
computed for MI(real CT, sMR) (`scoring`); every unpaired test MR / CT (splits test_mr,
test_ct) is scored by MI with its translation (`unpaired`, the paper's Fig. 4). The tables,
summaries and figures are written into an output folder that appears complete or not at all. The metrics and regions are described in
`mr2ct_jax.evaluate`.
"""

import math
import os
from typing import Any

from absl import logging
import ml_collections

from mr2ct_jax import atomic
from mr2ct_jax import storage
from mr2ct_jax.data import dataset
from mr2ct_jax.data import resolve
from mr2ct_jax.evaluation import figures as report_figures
from mr2ct_jax.evaluation import fingerprint as fingerprint_lib
from mr2ct_jax.evaluation import native
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.evaluation import synthrad
from mr2ct_jax.evaluation import unpaired
from mr2ct_jax.inference import generators

METRIC_KEYS = scoring.METRIC_KEYS
PER_VOLUME_FIELDS = ('patient_id', 'num_slices', 'region', 'valid_voxels',
                     'mask_voxels') + METRIC_KEYS
PER_SLICE_FIELDS = ('patient_id', 'slice_index', 'valid_voxels', 'mask_voxels') + METRIC_KEYS
ApplyFn = scoring.ApplyFn
EvaluateError = scoring.EvaluateError
# Every evaluation output holds this file (and --compare reads it): --overwrite may replace a
# folder only if it has it.
OWN_FILE = 'per_volume.json'


def region_note(regions: set[str]) -> str:
  """The summary's sentence on which voxels each metric used."""
  fov = ('the record\'s common-FOV array' if regions == {'fov'} else
         'the MR/CT common field of view: the S levels where the test mask is non-empty '
         '(whole axial slices, rows of coronal/sagittal ones) inside the volume\'s own '
         'extent (padding of the network grid excluded)')
  return (f'Regions: 0-255 MAE/PSNR, SSIM and MI over {fov}, as in the paper; MAE in HU and '
          'the HU-range PSNR/SSIM inside the body mask (AND common FOV). Voxels outside the '
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
  meta = {**meta, 'region_note': region_note({r.get('region', 'fov_levels')
                                              for r in per_volume})}
  notes = [meta['region_note'],
           f'0-255 scale: the paper\'s windows, CT {list(scoring.PAPER_CT_WINDOW)} HU and MR '
           f'{list(scoring.PAPER_MR_WINDOW)}, whatever windows the run was trained with.',
           'SSIM: Gaussian window (sigma 1.5, 11x11), K1 0.01, K2 0.03, per slice. psnr_hu_grid '
           '/ ssim_hu_grid: HU clipped to [-1024, 3000], range 4024, on the network grid with '
           'that 2-D SSIM; they are NOT the SynthRAD2023 metrics.',
           'MI in nats, 64x64-bin joint histogram over [0, 255] of both windowed images, per '
           'slice inside the evaluated region, mean over slices.']
  if 'synthrad_mae' in keys:
    notes.append('SynthRAD2023 metrics (MAE, PSNR, SSIM as the challenge\'s code computes them) '
                 'of the sCT that `translate` makes from each recorded MR file, on the CT\'s '
                 'own grid, inside the recorded mask file or the CT\'s body mask'
                 + (f"; {meta['synthrad_missing']} patient(s) NaN: their source files are "
                    'gone or changed since the data were prepared (see the log)'
                    if meta.get('synthrad_missing') else '') + '.')
    thin = sum(1 for r in per_volume
               if math.isnan(r['synthrad_ssim']) and not math.isnan(r['synthrad_mae']))
    if thin:
      notes.append(f'SSIM (SynthRAD2023) NaN for {thin} volume(s): fewer than '
                   f'{synthrad.SSIM_WIN_SIZE} voxels along an axis (the challenge\'s SSIM '
                   'window does not fit), or no mask voxel left inside its 3-voxel crop.')
  if meta.get('flip_average'):
    notes.append('Each sCT and sMR slice is the average of G(x) and the mirror of '
                 'G(mirrored x), the left-right flip of the training augmentation '
                 '(config.eval.flip_average).')
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
  if kind == 'npz' and not (data_dir or config.data.dir):
    raise EvaluateError(f'{source}: the export\'s config has no data.dir; pass --data=DATA_DIR')
  # Same rule as training: the built-in phantom under WORKDIR/phantom (reused if prepared).
  return resolve.resolve_data_dir(config, source, data_dir)


def _check_data_matches(data_dir: str, config: ml_collections.ConfigDict) -> None:
  """The generator only works on slices prepared like its training data (scale, intensity)."""
  mismatch = dataset.settings_mismatch(data_dir, config)
  if mismatch is not None:
    raise EvaluateError(mismatch)


def _check_apart(output_dir: str, source: str, data_dir: str | None) -> None:
  """The output must not be, nor contain, the workdir / export or the data dir it reads."""
  atomic.check_apart(output_dir, {'--workdir' if storage.isdir(source) else '--npz': source,
                                  '--data': data_dir}, inside_ok=True, error=EvaluateError)


def _load_generators(source: str, step: int | None, backend: str
                     ) -> tuple[ApplyFn, ApplyFn | None, ml_collections.ConfigDict, Any]:
  """(G_ct, G_mr or None, the run's config, G_ct's GeneratorInfo); both from one step."""
  sct_fn, config, info = generators.load_generator(source, 'mr2ct', step, backend)
  try:
    smr_fn, _, _ = generators.load_generator(source, 'ct2mr', info.step if
                                             info.kind == 'workdir' else step, backend)
  except generators.SourceError as e:
    if info.kind != 'npz':
      raise
    # An export may hold only G_ct; everything but MI(real CT, sMR) can still be computed.
    logging.warning('%s; skipping MI(real CT, sMR)', e)
    smr_fn = None
  return sct_fn, smr_fn, config, info


def _write_without_pairs(out_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
  """summary.md/json and an empty per_volume.json for a dataset without a paired test split
  (only unpaired test volumes: the paper's second experiment)."""
  reports.write_json(os.path.join(out_dir, OWN_FILE), [])
  markdown = (f"# Evaluation of {meta['source']}\n\nThe dataset has no paired test split: "
              'no MAE/PSNR against a registered CT.\n')
  summary = {**meta, 'num_volumes': 0, 'patients': [], 'metrics': {},
             'summary_markdown': markdown}
  atomic.write_text(os.path.join(out_dir, 'summary.md'), markdown)
  reports.write_json(os.path.join(out_dir, 'summary.json'), summary)
  return summary


def _add_unpaired(out_dir: str, summary: dict[str, Any], data_dir: str,
                  data_meta: dict[str, Any], splits: list[str], sct_fn: ApplyFn,
                  smr_fn: ApplyFn | None, config: ml_collections.ConfigDict,
                  progress: bool) -> dict[str, Any]:
  """Scores the unpaired test splits (`unpaired`), adds their section to summary.md/json."""
  results = unpaired.score({s: dataset.iterate_volumes(data_dir, s) for s in splits}, sct_fn,
                           smr_fn, config, progress=progress)
  section = unpaired.write(out_dir, results)
  if smr_fn is None and 'test_ct' in splits:
    section += '\nMI(real CT, sMR) of the unpaired CT not computed: no CT->MR generator.\n'
  summary = {**summary, 'summary_markdown': summary['summary_markdown'] + '\n' + section,
             'unpaired': {d: {**reports.describe([r['mi'] for r in rows]).to_json(),
                              'patients': [r['patient_id'] for r in rows]}
                          for d, rows in results.items()},
             'fingerprint_unpaired': {
                 split: fingerprint_lib.fingerprint(
                     data_meta, split, [r['patient_id'] for r in results[direction]])
                 for split, (direction, _) in unpaired.SPLITS.items()
                 if direction in results}}
  atomic.write_text(os.path.join(out_dir, 'summary.md'), summary['summary_markdown'])
  reports.write_json(os.path.join(out_dir, 'summary.json'), summary)
  return summary


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
    source, step, data_dir, output_dir, fingerprint (of the test split scored), and the
    Markdown table ('summary_markdown'), which is
    also printed.

  Raises:
    EvaluateError / reports.ReportError / generators.SourceError / data errors: one line.
  """
  output_dir = storage.absolute(output_dir)
  # Fail before loading anything; the output may lie inside the workdir (WORKDIR/eval).
  _check_apart(output_dir, source, data_dir)
  reports.check_output_dir(output_dir, overwrite, OWN_FILE)
  sct_fn, smr_fn, config, info = _load_generators(source, step, backend)
  data_dir = _resolve_data_dir(source, info.kind, data_dir, config)
  _check_apart(output_dir, source, data_dir)  # data.dir of the run's config
  unpaired_splits = [s for s in unpaired.SPLITS if dataset.has_split(data_dir, s)]
  has_test = dataset.has_split(data_dir, 'test')
  if not has_test and not unpaired_splits:
    raise EvaluateError(f'{data_dir}: dataset has no paired `test` split and no unpaired '
                        '`test_mr`/`test_ct` split to evaluate on')
  _check_data_matches(data_dir, config)
  data_meta = dataset.load_meta(data_dir)
  meta = {'source': source, 'kind': info.kind, 'step': info.step, 'data_dir': data_dir,
          'flip_average': info.flip_average,
          'output_dir': output_dir, 'ct_window': list(config.data.ct_window),
          'mr_window': list(config.data.mr_window),
          'metric_ct_window': list(scoring.PAPER_CT_WINDOW),
          'metric_mr_window': list(scoring.PAPER_MR_WINDOW)}
  with reports.atomic_output_dir(output_dir, overwrite, OWN_FILE) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    if has_test:
      per_volume, per_slice = scoring.evaluate_volumes(
          dataset.with_extent(dataset.iterate_volumes(data_dir, 'test'), data_dir, 'test'), sct_fn, smr_fn,
          config, figure_dir=figure_dir, progress=progress,
          plane=dataset.preprocessing(data_meta)['plane'])
      if not per_volume:
        raise EvaluateError(f'{data_dir}: the test split holds no volumes')
      meta['synthrad_missing'] = native.add_metrics(per_volume, data_meta, 'test', sct_fn,
                                                    config)
      meta['fingerprint'] = fingerprint_lib.fingerprint(
          data_meta, 'test', [r['patient_id'] for r in per_volume])
      summary = write_outputs(tmp, per_volume, per_slice, meta)
    else:
      summary = _write_without_pairs(tmp, meta)
    if unpaired_splits:
      summary = _add_unpaired(tmp, summary, data_dir, data_meta, unpaired_splits, sct_fn,
                              smr_fn, config, progress)
  print(summary['summary_markdown'], flush=True)
  print(f'Evaluation written to {output_dir}', flush=True)
  return summary
