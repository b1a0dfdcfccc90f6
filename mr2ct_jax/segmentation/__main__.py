"""Segmentation via synthesis: train a 2-channel U-Net on labeled CT + sMR, test on MR.

Usage:
  python -m mr2ct_jax.segmentation --workdir=runs/gc [--data=DATA_DIR] [--output=runs/gc/seg]
      [--steps=N] [--overwrite] [--config=configs/gc.py:quick]

Uses the CycleGAN workdir's generators frozen: G_mr makes sMR for the labeled CT slices (once,
cached), the U-Net trains on (CT, sMR) with the run config's `seg` section (or that of
--config), then segments the labeled MR (the `labeled_mr` split, else the paired test split's
MR) from (sCT = G_ct(MR), MR) and reports Dice per structure present in the ground truth
(classes and names: mr2ct_jax.segmentation.labels; compare two runs with
python -m mr2ct_jax.segmentation.compare A/eval B/eval). Running it again resumes training from OUTPUT/checkpoints; the evaluation
goes to OUTPUT/eval (an existing one is replaced only with --overwrite).
"""

import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from mr2ct_jax.cli import commands
from mr2ct_jax.cli import distributed

COMMAND = 'mr2ct_jax.segmentation'


def _define_flags() -> flags.FlagValues:
  # A private FlagValues (see mr2ct_jax.cli.commands): importable next to other commands'.
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'CycleGAN training workdir (its generators are used).',
                      flag_values=fv)
  flags.DEFINE_string('data', None, 'Prepared dataset with `labeled` and `test` splits. '
                      "Default: the run config's data.dir, or the phantom under WORKDIR/phantom.",
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'Segmentation directory (default WORKDIR/seg).',
                      flag_values=fv)
  flags.DEFINE_integer('steps', None, 'Train to this step (default config.seg.num_steps).',
                       flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing OUTPUT/eval.', flag_values=fv)
  distributed.define_flags(fv)
  config_flags.DEFINE_config_file(
      'config', None, 'Optional config file whose `seg` section replaces the run\'s, e.g. '
      'configs/gc.py:quick (fields overridable: --config.seg.lr=...).', flag_values=fv,
      lock_config=True)
  return fv


def _known_errors() -> tuple[type[Exception], ...]:
  """Exception types whose message is a one-line explanation for the user."""
  # Called only after a failure, when `_run` has loaded these (see there).
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import volume  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import data as seg_data  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import run as seg_run  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import train as seg_train  # pylint: disable=g-import-not-at-top
  return (seg_run.SegmentationError, seg_data.SegDataError, config_checks.ConfigError,
          generators.SourceError, checkpointing.CheckpointError, reports.ReportError,
          volume.VolumeError, dataset.DatasetError, seg_train.NonFiniteLossError)


def _seg_section(fv: flags.FlagValues):
  """The `seg` section of --config (None without --config); one-line errors."""
  if not fv['config'].present:
    return None
  try:
    config = fv.config  # ml_collections loads the file lazily: errors surface here
    has_seg = 'seg' in config
  except (OSError, ValueError, flags.Error) as e:
    raise SystemExit(f'error: --config: {commands.last_line(e)}') from e
  if not has_seg:
    raise SystemExit(f'error: --config: {fv["config"].config_filename} has no seg section')
  return config.seg


def _run(fv: flags.FlagValues) -> None:
  seg_config = _seg_section(fv)
  distributed.initialize(fv)
  # Imported here, not at the top: JAX, flax and TFDS take seconds to load, and `--help` and
  # flag errors should not wait for them.
  from mr2ct_jax.segmentation import run as seg_run  # pylint: disable=g-import-not-at-top
  seg_run.run(fv.workdir, fv.data, fv.output, steps=fv.steps, overwrite=fv.overwrite,
              seg_config=seg_config)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line 'error: ...'."""
  fv = _define_flags()
  return commands.run(fv, argv, COMMAND, lambda: _run(fv), errors=_known_errors,
                      required=('workdir',), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
