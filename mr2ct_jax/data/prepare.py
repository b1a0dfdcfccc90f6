r"""Prepares folders of MR / CT volumes as a TFDS slice dataset (array_record).

  python -m mr2ct_jax.data.prepare --mr_dir=MR --ct_dir=CT [--labeled_dir=LAB] \
      [--paired_dir=PAIRED] [--val_dir=VAL] [--test_mr_dir=TMR] [--test_ct_dir=TCT] \
      [--labeled_mr_dir=LMR] --out=DATA_DIR [--config=configs/gc.py] [--n4] \
      [--plane=axial|coronal|sagittal] [--overwrite]

Every volume is preprocessed once: read (NIfTI or DICOM series folder) -> [N4 for MR] ->
canonical RAS+, slices of the plane (--plane; axial slices run along the patient's S axis,
coronal along A, sagittal along R, whatever the stored voxel order), in-plane resampling to
spacing_mm, centre crop/pad to image_size -> body mask -> MR normalisation (the
mr_percentile percentile of the body = 100) or a check that the CT is in Hounsfield units.
The values are config.data.<key> where set, else config.data.prepare_defaults.<key>; they are
recorded in dataset_meta.json, and a run trained on the dataset takes them from there. One
example per slice is written; windows are applied later by the input pipeline.

Folder layouts:
  --mr_dir, --ct_dir   one volume per patient: <id>.nii.gz, <id>.nii or a DICOM series
                       folder <id>/ (the patient id is the name without suffix).
  --labeled_dir        CT with label maps: <id>_ct.nii.gz + <id>_label.nii.gz
                       (labels: 0 background, 1..K structures; uint8).
  --paired_dir         paired test subjects: <id>_mr.nii.gz, <id>_ct.nii.gz (the same
                       subject's CT registered to the MR grid: same shape and affine),
                       optional <id>_mask.nii.gz (body mask) and <id>_label.nii.gz.
  --val_dir            paired validation subjects (scored while training), as --paired_dir.
  --test_mr_dir,       unpaired test volumes, one per patient as --mr_dir / --ct_dir (MI of
  --test_ct_dir        MR vs sCT and CT vs sMR, the paper's Fig. 4).
  --labeled_mr_dir     MR with label maps, no CT: <id>_mr.nii.gz + <id>_label.nii.gz on the
                       MR grid (segmentation test set, the paper's Fig. 6).
The built-in phantom (`python -m mr2ct_jax.data.phantom OUT`) writes exactly this layout
under OUT/mr, OUT/ct, OUT/labeled, OUT/paired, OUT/val, OUT/test_mr, OUT/test_ct and
OUT/labeled_mr.

Splits and subjects (patients are matched by id): training splits (train_mr, train_ct,
labeled) may share patients: CycleGAN training is unpaired, and a labeled CT may also be an
unlabeled one. An evaluation subject (test, val, test_mr, test_ct, labeled_mr) that is also in
a training split is an error naming both files, and so is a validation subject that is also a
test subject. A bad training file is skipped with a one-line warning "PATH: reason" and
counted in the closing summary; in an evaluation split any unusable file (unreadable, not in
HU, a label map, mask or CT off its MR's grid, an empty mask, a subject missing its CT, a
volume whose name is not <id>_<role>) stops prepare with that line: an evaluation subject is
never left out. Files that are not volumes (a .json sidecar, a README) are skipped with a
warning everywhere.

The command reads the flags; `mr2ct_jax.data.writer` builds the dataset (per-patient steps
in `mr2ct_jax.data.prepare_volumes`) and `mr2ct_jax.data.dataset` reads it back.

Output (DATA_DIR, built in a temporary sibling directory and renamed when complete):
  mr2ct_slices/1.0.0/    the TFDS dataset: splits train_mr, train_ct and those of the
                         optional folders given (labeled, test, val, test_mr, test_ct,
                         labeled_mr)
  geometry/<split>/<id>.json   SliceGeometry per patient (maps slices back to the input)
  dataset_meta.json      preprocessing values, patients and record index per split
DATA_DIR must lie apart from the input folders; an existing one is replaced only with
--overwrite, and only if it is a dataset prepared earlier (it holds dataset_meta.json).
"""

import logging as std_logging
import sys
from typing import Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from mr2ct_jax import config_checks
from mr2ct_jax.cli import commands
from mr2ct_jax.data import dataset
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.data import writer


def _define_flags() -> flags.FlagValues:
  # A private FlagValues (see mr2ct_jax.cli.commands).
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', commands.default_config_path(),
      'Config file (configs/gc.py[:variant]); uses data.spacing_mm, data.image_size, '
      'data.mr_percentile, data.n4 and data.plane (data.prepare_defaults for those unset).',
      flag_values=fv, lock_config=True)
  flags.DEFINE_string('mr_dir', None, 'Folder of unpaired MR volumes.', flag_values=fv)
  flags.DEFINE_string('ct_dir', None, 'Folder of unpaired CT volumes (HU).', flag_values=fv)
  flags.DEFINE_string('labeled_dir', None, 'Optional folder of <id>_ct + <id>_label volumes.',
                      flag_values=fv)
  flags.DEFINE_string('paired_dir', None, 'Optional folder of paired test subjects: <id>_mr, '
                      '<id>_ct (registered to the MR), optional <id>_mask, <id>_label.',
                      flag_values=fv)
  flags.DEFINE_string('val_dir', None, 'Optional folder of paired validation subjects, laid '
                      'out as --paired_dir (scored every config.eval.every steps).',
                      flag_values=fv)
  flags.DEFINE_string('test_mr_dir', None, 'Optional folder of unpaired test MR volumes.',
                      flag_values=fv)
  flags.DEFINE_string('test_ct_dir', None, 'Optional folder of unpaired test CT volumes (HU).',
                      flag_values=fv)
  flags.DEFINE_string('labeled_mr_dir', None, 'Optional folder of <id>_mr + <id>_label volumes '
                      '(segmentation test set).', flag_values=fv)
  flags.DEFINE_string('out', None, 'Data dir to create (config.data.dir for training); a '
                      'gs:// URL is built locally, then uploaded (needs gcsfs).',
                      flag_values=fv)
  flags.DEFINE_bool('n4', None, 'N4 bias correction of MR (default: config.data.n4).',
                    flag_values=fv)
  flags.DEFINE_enum('plane', None, list(preprocess.PLANES), 'Slice plane (default: '
                    'config.data.plane).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out (only a dataset prepared '
                    'earlier, or an empty folder).', flag_values=fv)
  flags.DEFINE_bool('allow_large_volumes', False, 'Accept volumes whose field of view or voxel '
                    'count exceeds the bounds for a body scan (they are refused by default).',
                    flag_values=fv)
  return fv


def _log_warnings_to_stderr() -> None:
  """Skipped files as plain "warning: PATH: reason" lines on stderr (then the summary)."""
  handler = std_logging.StreamHandler(sys.stderr)
  handler.setFormatter(std_logging.Formatter('warning: %(message)s'))
  handler.setLevel(std_logging.WARNING)
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(handler)
  absl_logger.propagate = False


def _run(fv: flags.FlagValues) -> None:
  _log_warnings_to_stderr()
  # The same checks as training, so a dataset is never built with values a run rejects.
  config_checks.validate(fv.config)
  settings = writer.preparation_settings(fv.config)
  for key in ('n4', 'plane'):
    if fv[key].value is not None:
      settings[key] = fv[key].value
  writer.prepare(fv.mr_dir, fv.ct_dir, fv.out, labeled_dir=fv.labeled_dir,
                 paired_dir=fv.paired_dir, val_dir=fv.val_dir, test_mr_dir=fv.test_mr_dir,
                 test_ct_dir=fv.test_ct_dir, labeled_mr_dir=fv.labeled_mr_dir, **settings,
                 overwrite=fv.overwrite, allow_large=fv.allow_large_volumes)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return commands.run(fv, argv, 'mr2ct_jax.data.prepare', lambda: _run(fv),
                      errors=(volume_lib.VolumeError, dataset.DatasetError,
                              config_checks.ConfigError),
                      required=('mr_dir', 'ct_dir', 'out'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
