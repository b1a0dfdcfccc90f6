"""The study driver: prepare the data once, run the selected cells (skipping finished ones,
leaving cells another process holds), then rebuild the report from every finished cell."""

import os

from mr2ct_jax import storage
from mr2ct_jax import tb_logging
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import presets
from mr2ct_jax.experiments import report


def prepare_data(preset: presets.Preset, workdir: str, data: str | None) -> str:
  """The prepared dataset of the study: `data`, else the phantom built once under WORKDIR.

  The phantom is built under a lock: parallel processes on one workdir wait for the first
  one's build and then reuse it (`writer.prepare_phantom` is idempotent).
  """
  if data:
    return storage.absolute(data)
  if preset.needs_data:
    raise presets.PresetError(f'--preset={preset.name} needs --data=DATA (a prepared dataset)')
  # JAX-free callers (--report_only) never get here with a phantom to build.
  from mr2ct_jax.data import writer  # pylint: disable=g-import-not-at-top
  with layout.locked(workdir, 'data', wait=True):
    return writer.prepare_phantom(os.path.join(workdir, 'phantom'), presets.base_config(preset))


def data_label(workdir: str, data: str | None) -> str:
  """How the report names the dataset."""
  return storage.absolute(data) if data else f'the built-in phantom ({workdir}/phantom)'


def run(preset_name: str, workdir: str, data: str | None = None, cells: str | None = None,
        report_only: bool = False, seeds: int = 1) -> str:
  """Runs the study (or only rebuilds its report); returns the report.md path.

  Args:
    preset_name: 'tiny', 'cpu_small' or 'paper'.
    workdir: the study directory (layout: `layout`).
    data: a prepared dataset (None: the phantom under WORKDIR/phantom; the paper preset needs
      one).
    cells: comma-separated cell names (None: all), or `<cell>@<k>` for one seed.
    report_only: run nothing, rebuild the report.
    seeds: training seeds per synthesis cell (0 .. seeds - 1; seed 0 is the cell's own
      directory, so a study run with one seed gains seeds when rerun with more).

  Raises:
    CellsWaiting: a selected cell was left out because a cell it needs has not finished
      (the report is written first).
    PresetError, StudyError and the errors of training, evaluation and segmentation.
  """
  preset = presets.get_preset(preset_name)
  selected = presets.select_runs(cells, seeds)
  if storage.is_remote(workdir):
    # The per-cell locks are flock()s and the markers are renamed into place: object stores
    # have neither. (--data may be a URL: cells read it through the storage layer.)
    raise layout.StudyError(
        f'--workdir={workdir}: a study workdir must be a local or shared POSIX filesystem '
        '(its cell locks need flock); --data may be a gs:// URL')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  layout.check_study_file(workdir, preset.name, data)
  if not report_only:
    data_dir = prepare_data(preset, workdir, data)
    # Imported only when cells run: --report_only and --help stay JAX-free.
    from mr2ct_jax.experiments import cell as cell_lib  # pylint: disable=g-import-not-at-top
    waiting = []
    for run_ in selected:
      name, needs = run_.name, run_.cell.needs
      if layout.done_info(workdir, name) is not None:
        tb_logging.log_line(f'Cell {name}: finished earlier; skipped.')
        continue
      if needs and layout.done_info(workdir, needs) is None:
        tb_logging.log_line(f'Cell {name}: needs {needs} (its seed 0), which has not '
                            'finished; skipped (run it, then this one).')
        waiting.append(f'{name} (needs {needs})')
        continue
      with layout.locked(workdir, name, wait=False) as mine:
        if not mine:
          tb_logging.log_line(f'Cell {name}: another process runs it; skipped.')
          continue
        if layout.done_info(workdir, name) is None:  # it may have finished meanwhile
          tb_logging.log_line(f'Cell {name}: running.')
          cell_lib.run_cell(preset, run_, workdir, data_dir)
  path = report.build(workdir, preset.name, data_label(workdir, data))
  tb_logging.log_line(f'Report written to {path}')
  if not report_only and waiting:
    # Not done: a job scheduler must not count this job as finished (see paper.main).
    raise layout.CellsWaiting(f'{", ".join(waiting)} not run: what it needs has not '
                              'finished; run the same command again once it has')
  return path
