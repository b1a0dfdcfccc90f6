"""The single-modality baseline of the paper's discussion: k-fold CV of a 1-channel MR U-Net.

Usage:
  python -m mr2ct_jax.segmentation.baseline --data=DATA --output=OUT [--folds=5]
      [--config=configs/gc.py[:variant]] [--steps=N] [--overwrite]
      [--jax_distributed [--coordinator_address=H:P --num_processes=N --process_id=I]]

The paper set its modality-independent result (U-Net trained on labeled CT + sMR, tested on
MR via sCT) beside a U-Net trained on labeled MR alone: "5-fold cross validation of MR
segmentation using 10 labeled MR volumes (i.e., trained with 8 MR volumes and tested on
remaining 2 MR volumes)". This module does that on the labeled MR of a prepared dataset: the
`labeled_mr` split (MR + label map) when the dataset has one, else the paired `test` split's MR
and label maps. The patients are dealt into k folds (seeded by config.seed: a random order,
then patient i to fold i mod k), so every labeled MR is tested exactly once, by the U-Net
trained on the other folds (real MR -> labels, one input channel, the same trainer, losses,
augmentation and config.seg hyper-parameters as the 2-channel U-Net). k is --folds, else
config.seg.baseline_folds (5); more folds than labeled MR is an error. The number of classes
and the structure names follow `labels` (config.seg.num_classes, config.seg.label_table).

The report has the format of the via-synthesis evaluation (`evaluate`): per_volume.csv/.json
(one row per patient, with its fold), summary.md/.json (Dice mean ± SD per structure, the
paper's baseline numbers beside), figures (MR | predicted labels | ground truth). It records
the same data fingerprint as a via-synthesis evaluation of the same split, so
`python -m mr2ct_jax.segmentation.compare BASELINE/eval RUN/seg/eval` gives paired t-tests
between the two.

Layout of OUTPUT:
  baseline.json          split, folds (patients per fold), seed, classes, seg config; a rerun
                         with other folds or another U-Net architecture is refused
  fold_<i>/checkpoints/  the fold's U-Net (Orbax; a rerun resumes), fold_<i>/tb/ TensorBoard
  eval/                  the evaluation (atomic; an existing one needs --overwrite)
"""

import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags
import ml_collections

from mr2ct_jax.cli import commands
from mr2ct_jax.cli import distributed
from mr2ct_jax.segmentation import folds as folds_lib

COMMAND = 'mr2ct_jax.segmentation.baseline'
fold_split = folds_lib.fold_split  # JAX-free, for a study driver


def run(config: ml_collections.ConfigDict, data_dir: str, output: str,
        folds: int | None = None, *, steps: int | None = None,
        overwrite: bool = False) -> dict[str, Any] | None:
  """Trains one 1-channel MR U-Net per fold and scores every labeled MR once (Dice).

  Args:
    config: a full config (configs/gc.py): its seg section, seed, data windows and
      augmentation; preprocessing fields left None are taken from the dataset.
    data_dir: a prepared dataset with a `labeled_mr` split, else a `test` split with labels.
    output: the baseline directory (layout: the module docstring).
    folds: number of folds (None: config.seg.baseline_folds, default 5).
    steps: train each fold to this step (default config.seg.num_steps).
    overwrite: replace an existing OUTPUT/eval.

  Returns:
    The evaluation summary (as `evaluate.write_outputs`, also OUTPUT/eval/summary.json), or
    None on processes other than 0. The summary table is printed.

  Raises:
    SegDataError, ConfigError, DatasetError, reports.ReportError, CheckpointError: one line.
  """
  # Imported here, not at the top: `--help` and flag errors should not wait for JAX.
  from mr2ct_jax.segmentation import baseline_run  # pylint: disable=g-import-not-at-top
  return baseline_run.run(config, data_dir, output, folds, steps=steps, overwrite=overwrite)


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string('data', None, 'Prepared dataset with a labeled_mr split (else a test '
                      'split with labels).', flag_values=fv)
  flags.DEFINE_string('output', None, 'Baseline directory.', flag_values=fv)
  flags.DEFINE_integer('folds', None, 'Folds (default config.seg.baseline_folds = 5).',
                       flag_values=fv)
  flags.DEFINE_integer('steps', None, 'Train each fold to this step (default '
                       'config.seg.num_steps).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing OUTPUT/eval.', flag_values=fv)
  distributed.define_flags(fv)
  config_flags.DEFINE_config_file(
      'config', commands.default_config_path(), 'Config file (configs/gc.py[:variant]); '
      'fields overridable: --config.seg.lr=...', flag_values=fv, lock_config=True)
  return fv


def _known_errors() -> tuple[type[Exception], ...]:
  # Called only after a failure, when `run` has loaded these.
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import train as seg_train  # pylint: disable=g-import-not-at-top
  return (folds_lib.labels.SegDataError, config_checks.ConfigError, dataset.DatasetError,
          reports.ReportError, checkpointing.CheckpointError, seg_train.NonFiniteLossError)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line 'error: ...'."""
  fv = _define_flags()

  def body() -> None:
    distributed.initialize(fv)  # several hosts: each trains its shard of every fold's batches
    run(fv.config, fv.data, fv.output, fv.folds, steps=fv.steps, overwrite=fv.overwrite)

  return commands.run(fv, argv, COMMAND, body, errors=_known_errors,
                      required=('data', 'output'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
