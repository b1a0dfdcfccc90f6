"""The paper's study as one command: GC on/off x training-set size, MI, segmentation, report.

Usage:
  python -m mr2ct_jax.experiments.paper --preset=cpu_small --workdir=runs/paper   # 2 CPU cores
  python -m mr2ct_jax.experiments.paper --preset=paper --data=DATA --workdir=runs/paper \\
      --cells=gc_large
  python -m mr2ct_jax.experiments.paper --preset=paper --data=DATA --workdir=runs/paper \\
      --report_only

Cells: gc_small, nogc_small, gc_large, nogc_large (the paper's {20+20, 302+613 volumes} x
{GC on, off}), gc_signed_large (signed GC), mr_baseline (k-fold MR-only U-Net) and real_ct
(gc_large's U-Net fed the paired test subjects' real CT: the upper bound of synthesis; run it
after gc_large's seed 0). Each synthesis cell trains, evaluates the paired test subjects
(Table 1), the unpaired MI (Fig. 4) and the 2-channel segmentation Dice on the labeled MR
(Fig. 6).

Presets: tiny (tests, about a minute), cpu_small (the phantom, about 90 minutes on 2 cores),
paper (the paper's sizes and schedule; --data required).

Seeds: --seeds=N trains every synthesis cell with N seeds (seed 0 in cells/<cell>, seed k in
cells/<cell>_seed<k>); the report averages each cell's finished seeds per patient, shows how
far the cell means move between seeds, and tests on those averages. Rerunning a finished
one-seed study with --seeds=2 adds the second seed only (5 more synthesis runs, about as
long again as those cells took).

Reruns skip finished cells and resume interrupted ones. Several processes (or hosts sharing
the filesystem) may run different --cells into one workdir: each cell is locked by the
process running it, the phantom is built once under a lock (or pass --data). Every run ends
by rebuilding WORKDIR/report/report.md from whatever cells have finished.

Exit status: 0 when every selected cell has finished; 75 (EX_TEMPFAIL) when a selected cell
waits for one it needs that has not finished (real_ct before gc_large: rerun once gc_large is
done, e.g. by the job that runs it); 1 with one `error:` line for bad input.
"""

import sys
from collections.abc import Sequence

from absl import flags

from mr2ct_jax.cli import commands
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import presets

COMMAND = 'mr2ct_jax.experiments.paper'


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_enum('preset', None, list(presets.PRESETS), 'Study size.', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Study directory (cells/, report/).', flag_values=fv)
  flags.DEFINE_string('data', None, 'Prepared dataset (default: the built-in phantom under '
                      'WORKDIR/phantom; required for --preset=paper).', flag_values=fv)
  flags.DEFINE_string('cells', None, 'Comma-separated cells to run (default: all): '
                      + ', '.join(presets.CELL_NAMES) + '; <cell>@<k> runs seed k of a '
                      'synthesis cell alone.', flag_values=fv)
  flags.DEFINE_integer('seeds', 1, 'Training seeds per synthesis cell (0 .. N-1; a cell\'s '
                       'numbers are the mean over its finished seeds). --cells=<cell>@<k> runs '
                       'seed k alone.', flag_values=fv)
  flags.DEFINE_bool('report_only', False, 'Run no cell; rebuild the report.', flag_values=fv)
  return fv


def _known_errors() -> tuple[type[Exception], ...]:
  # Called only after a failure, when the modules that raise them are loaded.
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import labels  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.segmentation import run as seg_run  # pylint: disable=g-import-not-at-top
  return (presets.PresetError, layout.StudyError, config_checks.ConfigError,
          dataset.DatasetError, reports.ReportError, checkpointing.CheckpointError,
          generators.SourceError, labels.SegDataError, seg_run.SegmentationError)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line 'error: ...'."""
  fv = _define_flags()

  def body() -> None:
    # Imported here: --help and flag errors must not wait for JAX and the models.
    from mr2ct_jax.experiments import study  # pylint: disable=g-import-not-at-top
    try:
      study.run(fv.preset, fv.workdir, fv.data, fv.cells, fv.report_only, fv.seeds)
    except layout.CellsWaiting as e:
      print(f'waiting: {e}', file=sys.stderr)
      raise SystemExit(commands.EXIT_NOT_FINISHED) from e

  return commands.run(fv, argv, COMMAND, body, errors=_known_errors,
                      required=('preset', 'workdir'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
