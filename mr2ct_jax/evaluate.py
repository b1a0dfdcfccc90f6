"""Evaluates trained generators on the paired test split; compares two evaluations.

Usage:
  python -m mr2ct_jax.evaluate --workdir=runs/gc [--data=DATA_DIR] [--output=runs/gc/eval]
  python -m mr2ct_jax.evaluate --npz=g.npz --data=DATA_DIR --output=eval_npz
  python -m mr2ct_jax.evaluate --compare runs/nogc/eval runs/gc/eval   # paired t-tests
  python -m mr2ct_jax.evaluate --compare runs/nogc/seg/eval runs/gc/seg/eval  # Dice t-tests
  python -m mr2ct_jax.evaluate --sct_dir=SCT --ct_dir=CT [--mask_dir=MASK] --output=OUT

--compare on two segmentation evaluations runs `python -m mr2ct_jax.segmentation.compare`
(paired t-tests of Dice per structure, see there). Two evaluations of different data (their
fingerprints differ) are refused unless --allow_different_data.

--sct_dir mode: the SynthRAD2023 task-1 metrics (synthrad_mae, synthrad_psnr, synthrad_ssim)
of any folder of sCT NIfTI against the CTs in their own geometry, as the challenge's code
computes them; matching by patient id, masks and outputs are described in
`mr2ct_jax.evaluation.sct_folder`, the formulas in `mr2ct_jax.evaluation.synthrad`.

For every test patient, sCT = G_ct(MR) is compared with the registered CT, and sMR = G_mr(CT)
is computed for MI(real CT, sMR). Metrics (definitions in `mr2ct_jax.evaluation.metrics`):
  mae_255, psnr_255  the paper's MAE / PSNR: both CTs windowed with the paper's CT window
                     [-150, 350] HU to [0, 255] (whatever config.data.ct_window the run was
                     trained with), over the evaluated region (`valid`, see below)
  ssim               Gaussian SSIM on the 0-255 scale, per slice inside `valid`, slice mean
  mae_hu             MAE in HU inside the body mask, on the network grid (no clipping)
  psnr_hu_grid,      clip to [-1024, 3000] HU, data range 4024, inside the mask, on the
  ssim_hu_grid       network grid, 2-D Gaussian SSIM: NOT the SynthRAD2023 metrics
  synthrad_mae,      SynthRAD2023 task 1 as the challenge's code computes them, on the sCT
  synthrad_psnr,     that `translate` makes from the recorded MR file, in the CT's own
  synthrad_ssim      geometry (`mr2ct_jax.evaluation.native`; NaN if the files are gone)
  mi_mr_sct,         MI (nats, 64x64 bins over [0, 255], paper windows) between real MR and
  mi_ct_smr          sCT and between real CT and sMR, per slice inside `valid`, slice mean
Regions: voxels outside the MR/CT common field of view (FOV) are never evaluated.
  `mask` (the test split's body mask AND common FOV) for mae_hu, psnr_hu_grid, ssim_hu_grid;
  `valid` = the common FOV for the paper's 0-255 MAE/PSNR, SSIM and MI (the paper computes
  them over the whole common-FOV volume, air included). A record's `fov` array is used when
  present; otherwise the FOV is the S levels (the patient's S axis: whole axial slices, rows
  of coronal/sagittal slices, by the dataset's plane) at which `mask` is non-empty, which is
  how `mr2ct_jax.data.prepare_volumes.ct_fov` cuts the mask, AND the network pixels inside
  the volume's own extent (its recorded geometry): padding is never scored.

Outputs (written to a temporary directory, renamed when complete): per_volume.csv/.json,
per_slice.csv, summary.md, summary.json (with 'fingerprint': the test split's data
fingerprint, `mr2ct_jax.evaluation.fingerprint`), figures/<patient>.png (MR | sCT | CT | |error|
panels), figures/metrics_boxplot.png, figures/mi_boxplot.png. An existing output is refused
unless --overwrite, which replaces only an earlier evaluation output (one with
per_volume.json); the output may never be, or contain, the workdir, export or data dir read.
--compare refuses two outputs whose data fingerprints differ, or one without a fingerprint
(made by an older version), unless --allow_different_data.
"""

import os
import sys
from collections.abc import Sequence

from absl import flags

from mr2ct_jax.cli import commands
from mr2ct_jax.evaluation import compare
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.segmentation import compare as seg_compare


def _define_flags() -> flags.FlagValues:
  # A private FlagValues (see mr2ct_jax.cli.commands).
  fv = flags.FlagValues()
  commands.define_generator_source_flags(fv)
  flags.DEFINE_string('data', None, 'Prepared dataset directory with a paired `test` split. '
                      'Default: the run config\'s data.dir, or the phantom under '
                      'WORKDIR/phantom.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Output directory (default WORKDIR/eval). With '
                      '--compare: where compare.md/json go (default: the second directory).',
                      flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.', flag_values=fv)
  flags.DEFINE_bool('compare', False, 'Compare two evaluation directories given as arguments: '
                    '--compare A B (paired t-tests, B vs A).', flag_values=fv)
  flags.DEFINE_bool('allow_different_data', False, 'With --compare: compare even if the two '
                    'results were scored on different (or unfingerprinted) data.',
                    flag_values=fv)
  flags.DEFINE_string('sct_dir', None, 'Folder of sCT NIfTI to score with the SynthRAD2023 '
                      'metrics against --ct_dir (no generator needed).', flag_values=fv)
  flags.DEFINE_string('ct_dir', None, 'With --sct_dir: the CTs, matched by patient id.',
                      flag_values=fv)
  flags.DEFINE_string('mask_dir', None, 'With --sct_dir: evaluation masks by patient id '
                      '(default: the body mask of each CT).', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show a progress bar.', flag_values=fv)
  return fv


def _known_errors() -> tuple[type[Exception], ...]:
  """Error types that carry a one-line message for the user (from modules already loaded).

  Looked up in sys.modules so `--compare` does not import JAX just to name exception types;
  `commands.run` calls this after the failure, when the modules are loaded.
  """
  errors: list[type[Exception]] = [scoring.EvaluateError, reports.ReportError,
                                   fingerprint.FingerprintError]
  for module, name in (('mr2ct_jax.inference.generators', 'SourceError'),
                       ('mr2ct_jax.checkpointing', 'CheckpointError'),
                       ('mr2ct_jax.data.volume', 'VolumeError'),
                       ('mr2ct_jax.data.dataset', 'DatasetError'),
                       ('mr2ct_jax.evaluation.fingerprint', 'FingerprintError')):
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
      errors.append(cls)
  return tuple(errors)


def _run(fv: flags.FlagValues, args: list[str]) -> None:
  if fv.compare:
    if len(args) != 2:
      raise scoring.EvaluateError(
          '--compare needs exactly two evaluation directories: --compare A B')
    # Segmentation outputs hold Dice per structure, not the synthesis metrics.
    if any(seg_compare.is_segmentation_output(d) for d in args):
      seg_compare.compare(args[0], args[1], fv.output, overwrite=fv.overwrite,
                          allow_different_data=fv.allow_different_data)
    else:
      compare.compare(args[0], args[1], fv.output, overwrite=fv.overwrite,
                      allow_different_data=fv.allow_different_data)
    return
  if args:
    raise scoring.EvaluateError(f'unexpected arguments {args} (flags are --name=value)')
  if fv.sct_dir is not None or fv.ct_dir is not None or fv.mask_dir is not None:
    _run_sct_dir(fv)
    return
  source = commands.generator_source(fv, ' (or --compare A B)')
  output = fv.output
  if output is None:
    if fv.npz is not None:
      raise scoring.EvaluateError('--output is required with --npz')
    output = os.path.join(fv.workdir, 'eval')
  # Imported here, not at the top: `--compare` and `--help` must not load JAX and the models.
  from mr2ct_jax.evaluation import paired  # pylint: disable=g-import-not-at-top
  paired.evaluate(source, fv.data, output, step=fv.step, overwrite=fv.overwrite,
                  backend=fv.backend, progress=fv.progress)


def _run_sct_dir(fv: flags.FlagValues) -> None:
  for name in ('sct_dir', 'ct_dir', 'output'):
    if not fv[name].value:
      raise scoring.EvaluateError(f'--{name} is required with --sct_dir/--ct_dir/--mask_dir')
  if fv.workdir is not None or fv.npz is not None:
    raise scoring.EvaluateError('--sct_dir scores existing sCT files: give no --workdir/--npz')
  # Imported here, not at the top: --compare and --help need neither scikit-image nor the
  # volume readers (SimpleITK).
  from mr2ct_jax.evaluation import sct_folder  # pylint: disable=g-import-not-at-top
  sct_folder.evaluate_folder(fv.sct_dir, fv.ct_dir, fv.mask_dir, fv.output,
                             overwrite=fv.overwrite, progress=fv.progress)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return commands.run(fv, argv, 'mr2ct_jax.evaluate', lambda args: _run(fv, args),
                      errors=_known_errors, positional=True, doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
