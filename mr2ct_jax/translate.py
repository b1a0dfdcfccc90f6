"""Whole-volume translation: MR -> synthetic CT NIfTI in HU (or CT -> synthetic MR).

  python -m mr2ct_jax.translate --workdir=runs/gc --input=patient_mr.nii.gz \
      --output=patient_sct.nii.gz
  python -m mr2ct_jax.translate --workdir=runs/gc --input=MR_DIR/ --output=SCT_DIR/ \
      [--direction=ct2mr] [--step=N] [--overwrite | --skip_existing]
  python -m mr2ct_jax.translate --npz=g_ct.npz --input=... --output=...
  python -m mr2ct_jax.translate --workdir=runs/gc --input=MR_DIR_OR_VOLUME --output=OUT_DIR/ \
      --output_format=dicom

Each volume is read (NIfTI or DICOM series), preprocessed as the run's dataset was (N4,
spacing, slice plane, MR percentile: recorded in the run's config.json), translated on the
network grid and mapped back to its own voxels (`mr2ct_jax.inference.volumes`), and written
with the input's shape and affine under a temporary name that is renamed when complete.

`--input` and `--output` may be gs:// URLs (with gcsfs installed): a remote input is
downloaded whole into a temporary folder first (nibabel and SimpleITK read local files;
messages name the URL), and each output file or series folder is built locally and uploaded
when complete, as an object store has no rename.

`--output_format=dicom` (synthetic CT only) writes each volume as a CT DICOM series for
treatment planning systems: `--output` is then always a folder, which receives one folder
`<id>_sct/` per input volume (`<id>` = the input's name without suffix) holding one .dcm file
per slice (`mr2ct_jax.data.dicom_write`: the input's geometry converted to DICOM's LPS, new
UIDs, int16 pixels with HU through RescaleSlope/RescaleIntercept, patient and study tags copied
from a DICOM input, else PatientID = `<id>`). Each series folder is built under a temporary name
and renamed when complete; `--overwrite` replaces only a folder of DICOM files (or an empty one).
"""

import contextlib
import dataclasses
import os
import sys
from typing import Sequence

from absl import flags
import numpy as np
import tqdm

from mr2ct_jax import atomic
from mr2ct_jax import storage
from mr2ct_jax.cli import commands
from mr2ct_jax.data import dicom
from mr2ct_jax.data import dicom_write
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.inference import volumes

OUTPUT_FORMATS = ('nifti', 'dicom')
# Suffix of the folder a DICOM series output gets: '<id>_sct/'.
DICOM_SUFFIX = '_sct'


class TranslateError(ValueError):
  """Translation cannot proceed (bad input/output path); the message starts with the path."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One volume to translate: read `input_path`, write `output_path`."""
  input_path: str
  output_path: str


def output_name(input_path: str, output_format: str = 'nifti') -> str:
  """'p01.nii.gz' / 'p01.nii' / DICOM folder 'p01/' -> 'p01.nii.gz' (nifti) or 'p01_sct' (dicom)."""
  suffix = DICOM_SUFFIX if output_format == 'dicom' else '.nii.gz'
  return volume_lib.volume_id(input_path) + suffix


def is_single_volume(input_path: str, output_path: str) -> bool:
  """Whether `input_path` is one volume (a file, or any input with a NIfTI output name)."""
  return os.path.isfile(input_path) or volume_lib.is_nifti_path(output_path)


def _dicom_jobs(input_path: str, output_path: str) -> list[Job]:
  """One '<output>/<id>_sct' series folder per input volume (a file, a series or a folder)."""
  if storage.isfile(output_path) or volume_lib.is_nifti_path(output_path):
    raise TranslateError(f'{output_path}: --output_format=dicom writes series folders; give an '
                         'output folder')
  inputs = [input_path] if os.path.isfile(input_path) else volume_lib.list_volumes(input_path)
  return [Job(path, storage.join(output_path, output_name(path, 'dicom'))) for path in inputs]


def _check_replaceable_series(path: str) -> None:
  """--overwrite replaces a DICOM series folder (or an empty one), never anything else."""
  if not storage.isdir(path):
    raise TranslateError(f'{path}: exists and is not a folder; --overwrite replaces only a '
                         'DICOM series folder')
  if storage.is_remote(path):  # read no objects: a series this command wrote is all .dcm
    is_series = all(name.lower().endswith(dicom.SUFFIXES) for name in storage.listdir(path))
  else:
    is_series = not os.listdir(path) or dicom.is_dicom_dir(path)
  if not is_series:
    raise TranslateError(f'{path}: not a DICOM series folder; refusing to replace it even with '
                         '--overwrite')


def plan(input_path: str, output_path: str, overwrite: bool = False,
         skip_existing: bool = False, output_format: str = 'nifti') -> list[Job]:
  """Pairs inputs with outputs and checks them all before any work starts.

  One volume (a NIfTI file, or any input with an output ending in .nii/.nii.gz, e.g. a DICOM
  series folder) -> one output file. Otherwise `input_path` is a folder of volumes
  (`list_volumes`) and `output_path` a folder that receives '<input name>.nii.gz' each.
  With `skip_existing`, volumes whose output exists are left out (to finish an interrupted
  folder run) instead of being an error. With `output_format='dicom'`, `output_path` is a
  folder that receives one series folder '<input name>_sct' per input volume.

  Raises:
    TranslateError / volume_lib.VolumeError: missing input, a folder without volumes, an
      output that exists (without `overwrite`), clashing output names, both `overwrite`
      and `skip_existing`.
  """
  if overwrite and skip_existing:
    raise TranslateError('--overwrite and --skip_existing contradict each other (replace '
                         'existing outputs, or keep them): pass one')
  if not os.path.exists(input_path):
    raise TranslateError(f'{input_path}: no such input file or folder')
  if output_format not in OUTPUT_FORMATS:
    raise TranslateError(f'--output_format={output_format}: must be one of '
                         f'{", ".join(OUTPUT_FORMATS)}')
  if output_format == 'dicom':
    jobs = _dicom_jobs(input_path, output_path)
  elif is_single_volume(input_path, output_path):
    if (os.path.isdir(input_path) and not dicom.is_dicom_dir(input_path)
        and any(volume_lib.is_nifti_path(name) and not name.startswith('.')
                for name in os.listdir(input_path))):
      raise TranslateError(f'{input_path}: is a folder of NIfTI volumes; give an output folder '
                           f'(not {output_path}) to translate them all')
    if not volume_lib.is_nifti_path(output_path):
      raise TranslateError(f'{output_path}: output for one volume must end in .nii or .nii.gz')
    if volume_lib.volume_id(output_path)[:1] in ('', '.'):
      # '.nii.gz' alone would be a hidden file, which folder listings (ours too) skip.
      raise TranslateError(f'{output_path}: the output file needs a name before .nii/.nii.gz '
                           '(a name starting with "." is hidden)')
    if storage.isdir(output_path):
      raise TranslateError(f'{output_path}: is a folder; name the output file')
    jobs = [Job(input_path, output_path)]
  else:
    if storage.isfile(output_path):
      raise TranslateError(f'{output_path}: is a file; a folder input needs an output folder')
    inputs = volume_lib.list_volumes(input_path)
    jobs = [Job(path, storage.join(output_path, output_name(path))) for path in inputs]
  names = [job.output_path for job in jobs]
  if len(set(names)) != len(names):  # NIfTI files or series folders alike
    dup = sorted({n for n in names if names.count(n) > 1})[0]
    raise TranslateError(f'{dup}: two inputs map to this output name (e.g. a.nii and '
                         f'a.nii.gz); rename one')
  for job in jobs:
    # realpath: an output folder that is a link to the input folder is the input folder.
    if (not storage.is_remote(job.output_path)
        and os.path.realpath(job.output_path) == os.path.realpath(job.input_path)):
      raise TranslateError(f'{job.output_path}: output would replace its own input')
  exists = {job.output_path: storage.exists(job.output_path) for job in jobs}
  if skip_existing:
    jobs = [job for job in jobs if not exists[job.output_path]]
  for job in jobs:
    if exists[job.output_path] and not overwrite:
      raise TranslateError(f'{job.output_path}: already exists (pass --overwrite to replace '
                           f'it, or --skip_existing to keep it)')
    if exists[job.output_path] and output_format == 'dicom':
      _check_replaceable_series(job.output_path)
  return jobs


def translate(source: str, input_path: str, output_path: str, *, direction: str = 'mr2ct',
              step: int | None = None, overwrite: bool = False, skip_existing: bool = False,
              batch_size: int | None = None, backend: str = 'jax',
              progress: bool = True, allow_large: bool = False,
              output_format: str = 'nifti', flip_average: bool | None = None) -> list[str]:
  """Translates a volume or a folder of volumes with a trained generator.

  In a folder, an input that cannot be read or used (`volume_lib.VolumeError`) is reported on
  stderr and skipped, the others are still translated, and a TranslateError counting the
  skipped ones is raised at the end.

  Args:
    source: training workdir or exported .npz.
    input_path: NIfTI file, DICOM series folder, or a folder of those (a local path or a
      URL such as gs://bucket/mr/).
    output_path: .nii/.nii.gz for one volume, or a folder for a folder input (always a
      folder for DICOM output, which receives '<id>_sct/' series folders); local or a URL.
    direction: 'mr2ct' (synthetic CT, int16 HU) or 'ct2mr' (synthetic MR, float32).
    step: checkpoint step (workdir sources; None = latest).
    overwrite: replace existing outputs.
    skip_existing: leave out volumes whose output already exists (folder runs).
    batch_size: slices per generator call (default config.eval.batch_size).
    backend: 'jax' or 'numpy' forward.
    progress: progress bars over volumes and slices.
    allow_large: accept volumes over the size bounds of `mr2ct_jax.data.volume_checks`.
    output_format: 'nifti' or 'dicom' (a CT DICOM series per volume; mr2ct only).
    flip_average: average each slice's output with that of its left-right mirror (None: as
      the run's config.eval.flip_average says; `inference.slices.flip_averaged`).

  Returns:
    The written output paths (files, or series folders for DICOM).

  Raises:
    TranslateError, volume_lib.VolumeError, generators.SourceError: one-line messages.
  """
  # Imported here, not at the top: JAX and flax take seconds to load, and `--help`, flag
  # errors and `plan` should not wait for them.
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  generators.network_for(direction)
  if output_format == 'dicom' and direction != 'mr2ct':
    raise TranslateError(f'{output_path}: --output_format=dicom writes synthetic CT only; use '
                         'nifti for --direction=ct2mr')
  with contextlib.ExitStack() as stack:
    local_input, shown_input = input_path, None
    if storage.is_remote(input_path):
      # nibabel and SimpleITK read local files: a gs:// input (a volume, a series or a folder
      # of them) is downloaded whole into a temporary folder first; messages name the URL.
      try:
        storage.check_backend(input_path)
        local_input = stack.enter_context(storage.local_copy(input_path))
      except FileNotFoundError as e:
        raise TranslateError(f'{input_path}: no such input file or folder') from e
      except storage.StorageError as e:
        raise TranslateError(str(e)) from e
      shown_input = storage.absolute(input_path)
    return _translate(source, local_input, output_path, direction, step, overwrite,
                      skip_existing, batch_size, backend, progress, allow_large, output_format,
                      flip_average, shown_input=shown_input)


def _translate(source: str, input_path: str, output_path: str, direction: str,
               step: int | None, overwrite: bool, skip_existing: bool,
               batch_size: int | None, backend: str, progress: bool, allow_large: bool,
               output_format: str, flip_average: bool | None,
               shown_input: str | None = None) -> list[str]:
  """`translate` of a local input; messages say `shown_input` (a URL) for `input_path`."""
  # Imported here, as in `translate`: JAX takes seconds to load.
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  shown = (lambda text: text.replace(input_path, shown_input)) if shown_input else str
  try:
    # Fail fast, before loading the model.
    jobs = plan(input_path, output_path, overwrite, skip_existing, output_format)
  except (TranslateError, volume_lib.VolumeError) as e:
    raise type(e)(shown(str(e))) from e
  if not jobs:  # --skip_existing and every output exists
    return []
  apply_fn, config, _ = generators.load_generator(source, direction, step, backend,
                                                  flip_average)
  dtype = np.int16 if direction == 'mr2ct' else np.float32
  if output_format == 'dicom':
    folder = not (os.path.isfile(input_path) or dicom.is_dicom_dir(input_path))
  else:
    folder = not is_single_volume(input_path, output_path)
  batch = int(batch_size or config.eval.batch_size)
  estimate = volumes.TimeEstimate(apply_fn, batch) if progress else None
  written, skipped = [], []
  for job in tqdm.tqdm(jobs, desc='volumes', unit='vol', disable=not progress or len(jobs) < 2):
    try:
      vol = volume_lib.read_volume(job.input_path, allow_large)
      if output_format == 'dicom':  # before the translation's work: a sheared affine
        dicom_write.check_representable(job.input_path, vol.affine)
      if estimate is not None:
        _announce(shown(job.input_path), vol, config, estimate)
      result = volumes.translate_volume(vol, apply_fn, config, direction, batch_size,
                                        progress=progress)
    except volume_lib.VolumeError as e:
      if not folder:
        raise volume_lib.VolumeError(shown(str(e))) from e
      # One bad file must not cost the rest of a folder run.
      print(f'skipped: {shown(str(e))}', file=sys.stderr)
      skipped.append(job.input_path)
      continue
    if output_format == 'dicom':
      _write_series(job, result, vol.affine)
    else:
      # file_shape: the input's own shape, trailing singleton axes ([X, Y, Z, 1]) included.
      volume_lib.write_nifti(job.output_path, result.reshape(vol.file_shape), vol.affine,
                             dtype=dtype, overwrite=overwrite, xform_code=vol.xform_code)
    written.append(job.output_path)
  if skipped:
    raise TranslateError(f'{shown(input_path)}: {len(skipped)} of {len(jobs)} volumes skipped '
                         f'(listed above); {len(written)} written to {output_path}')
  return written


def _write_series(job: Job, hu: np.ndarray, affine: np.ndarray) -> None:
  """Writes one CT DICOM series folder, complete or not at all (plan checked `--overwrite`)."""
  tags = dicom_write.source_tags(job.input_path) if os.path.isdir(job.input_path) else {}
  with atomic.building_dir(job.output_path) as tmp:
    try:
      dicom_write.write_ct_series(tmp, hu, affine, volume_lib.volume_id(job.input_path), tags)
    except RuntimeError as e:  # GDCM's write failures (a full disk...) name the temporary file
      raise atomic.OutputError(f'{job.output_path}: cannot write the DICOM series ('
                               f'{" ".join(str(e).split())[-200:]})') from e


# Volumes whose estimated generator time is above this get a line before they start.
ANNOUNCE_AFTER_S = 20.0


def _announce(path: str, vol: volume_lib.Volume, config, estimate: volumes.TimeEstimate) -> None:
  """Prints the work and its estimated time before a long volume starts."""
  num_slices, side = volumes.network_work(vol, float(config.data.spacing_mm), config.data.plane)
  seconds = estimate.seconds(num_slices, side)
  if seconds >= ANNOUNCE_AFTER_S:
    minutes, secs = divmod(int(round(seconds)), 60)
    print(f'{path}: {num_slices} slices of {side}x{side} on the network grid; estimated '
          f'{minutes}:{secs:02d} (min:s) on this machine', file=sys.stderr, flush=True)


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: see commands.
  fv = flags.FlagValues()
  commands.define_generator_source_flags(fv)
  flags.DEFINE_string('input', None, 'NIfTI file, DICOM series folder, or a folder of them.',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'Output .nii.gz (one volume) or folder.', flag_values=fv)
  flags.DEFINE_enum('direction', 'mr2ct', ['mr2ct', 'ct2mr'],
                    'mr2ct: synthetic CT (HU, int16); ct2mr: synthetic MR (float32).',
                    flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Slices per generator call (default: '
                       'config.eval.batch_size).', lower_bound=1, flag_values=fv)
  flags.DEFINE_enum('output_format', 'nifti', list(OUTPUT_FORMATS),
                    'nifti: one .nii.gz per volume; dicom: a CT DICOM series folder <id>_sct/ '
                    'per volume inside --output (synthetic CT only).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.', flag_values=fv)
  flags.DEFINE_bool('skip_existing', False, 'Folder input: leave out volumes whose output '
                    'exists (finish an interrupted run).', flag_values=fv)
  flags.DEFINE_bool('flip_average', None, 'Average each slice\'s output with that of its '
                    'left-right mirror (test-time augmentation, twice the generator time); '
                    'unset: as the run\'s config.eval.flip_average says.', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show progress bars.', flag_values=fv)
  flags.DEFINE_bool('allow_large_volumes', False, 'Accept volumes whose field of view or voxel '
                    'count exceeds the bounds for a body scan (they are refused by default).',
                    flag_values=fv)
  return fv


def _run(fv: flags.FlagValues) -> None:
  # Before the model loads: an output that cannot be created (its parent is a file, a
  # read-only or virtual file system) is one line, not a traceback after the translation.
  folder = fv.output_format == 'dicom' or not is_single_volume(fv.input, fv.output)
  atomic.check_writable(fv.output, folder=folder)
  written = translate(commands.generator_source(fv), fv.input, fv.output,
                      direction=fv.direction, step=fv.step, overwrite=fv.overwrite,
                      skip_existing=fv.skip_existing, batch_size=fv.batch_size,
                      backend=fv.backend, progress=fv.progress,
                      allow_large=fv.allow_large_volumes, output_format=fv.output_format,
                      flip_average=fv.flip_average)
  if not written:
    print(f'nothing to do: every output in {fv.output} exists (--skip_existing)')
    return
  print(f'wrote {len(written)} volume(s): ' + (written[0] if len(written) == 1 else
                                               os.path.dirname(written[0])))


def _known_errors() -> tuple[type[Exception], ...]:
  # Called only after a failure; importing here keeps `--help` free of JAX (see `translate`).
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  return (TranslateError, volume_lib.VolumeError, generators.SourceError)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return commands.run(fv, argv, 'mr2ct_jax.translate', lambda: _run(fv), errors=_known_errors,
                      required=('input', 'output'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
