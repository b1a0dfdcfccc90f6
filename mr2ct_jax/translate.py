"""Whole-volume translation: MR -> synthetic CT NIfTI in HU (or CT -> synthetic MR).

  python -m mr2ct_jax.translate --workdir=runs/gc --input=patient_mr.nii.gz \
      --output=patient_sct.nii.gz
  python -m mr2ct_jax.translate --workdir=runs/gc --input=MR_DIR/ --output=SCT_DIR/ \
      [--direction=ct2mr] [--step=N] [--overwrite | --skip_existing]
  python -m mr2ct_jax.translate --npz=g_ct.npz --input=... --output=...

Per volume: read (NIfTI or DICOM series), optional N4 (MR, when the run used it), axial
slices on the network grid at config.data.spacing_mm, the body mask, the intensity mapping
to [-1, 1], the generator in fixed-size batches, the inverse mapping (HU or MR units), air
outside the body, then back to the input's own voxel grid: the output has the input's shape
and affine. The network grid is sized per volume to the whole resampled field of view
(rounded up to a multiple of 4), so nothing of the user's image is cropped away.
"""

import dataclasses
import os
import sys
from typing import Callable, Sequence

from absl import flags
import ml_collections
import numpy as np
import tqdm

from mr2ct_jax import atomic
from mr2ct_jax import cli_flags
from mr2ct_jax.data import intensity
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import volume as volume_lib

ApplyFn = Callable[[np.ndarray], np.ndarray]
# Value outside the body: air for a synthetic CT, background for a synthetic MR.
AIR_HU = -1024.0
MR_BACKGROUND = 0.0
# The generator downsamples twice (stride 2), so slice sides must be multiples of 4; a side
# of 16 leaves the 4x4 bottleneck that the residual blocks' reflection padding needs.
GRID_MULTIPLE = 4
MIN_GRID = 16


class TranslateError(ValueError):
  """Translation cannot proceed (bad input/output path); the message starts with the path."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One volume to translate: read `input_path`, write `output_path`."""
  input_path: str
  output_path: str


def grid_size(vol: volume_lib.Volume, spacing_mm: float) -> int:
  """Network slice side covering the whole in-plane FOV at `spacing_mm`, a multiple of 4.

  The in-plane axes are canonical (RAS+) axes 0 and 1; their extent after resampling is
  (n - 1) * voxel / spacing_mm + 1 pixels (the grid starts on voxel 0 and covers the last).
  """
  array_ras, affine_ras, _ = orientation.to_canonical(
      (np.empty(vol.array.shape, np.uint8), vol.affine))
  voxel = np.linalg.norm(affine_ras[:3, :3], axis=0)
  extent = max(int(np.ceil((array_ras.shape[a] - 1) * voxel[a] / spacing_mm - 1e-6)) + 1
               for a in range(2))
  return max(MIN_GRID, -(-extent // GRID_MULTIPLE) * GRID_MULTIPLE)


def translate_slices(apply_fn: ApplyFn, slices: np.ndarray, batch_size: int,
                     progress: bool = False, desc: str = 'slices') -> np.ndarray:
  """Runs the generator on [N, H, W] model-range slices in batches of min(`batch_size`, N).

  Within a volume every call gets the same batch size, the last batch padded with zero
  slices (their outputs dropped), so a jitted generator compiles once per batch shape; a
  volume with fewer slices than `batch_size` runs as one batch of exactly its slices rather
  than padded up to it (which cost memory and time in proportion to `batch_size`).

  Returns:
    float32 [N, H, W] in the model range.
  """
  slices = np.asarray(slices, np.float32)
  n = slices.shape[0]
  batch_size = max(1, min(batch_size, n))
  out = np.empty_like(slices)
  with tqdm.tqdm(total=n, desc=desc, unit='slice', disable=not progress, leave=False) as bar:
    for start in range(0, n, batch_size):
      batch = slices[start:start + batch_size]
      count = batch.shape[0]
      if count < batch_size:
        batch = np.concatenate(
            [batch, np.zeros((batch_size - count,) + batch.shape[1:], np.float32)])
      result = np.asarray(apply_fn(batch[..., None]), np.float32)
      out[start:start + count] = result[:count, ..., 0]
      bar.update(count)
  return out


def translate_volume(vol: volume_lib.Volume, apply_fn: ApplyFn,
                     config: ml_collections.ConfigDict, direction: str = 'mr2ct',
                     batch_size: int | None = None, progress: bool = False) -> np.ndarray:
  """Translates one volume; returns the result on the input's voxel grid.

  Args:
    vol: the input (MR for 'mr2ct', CT in HU for 'ct2mr'), any orientation and spacing.
    apply_fn: generator, NHWC [-1, 1] -> [-1, 1] (from `generator_source.load_generator`).
    config: the training run's config (data.spacing_mm, windows, mr_percentile, n4).
    direction: 'mr2ct' or 'ct2mr'.
    batch_size: slices per generator call (default config.eval.batch_size).
    progress: show a progress bar over slices.

  Returns:
    float32 array of `vol.array.shape`: HU for 'mr2ct' (AIR_HU outside the body), MR-normalised
    units for 'ct2mr' (0 outside the body).

  Raises:
    volume_lib.VolumeError: the input is unusable (empty body, a CT not in HU...).
  """
  data = config.data
  batch_size = int(batch_size or config.eval.batch_size)
  if direction == 'mr2ct':
    if data.n4:
      vol = preprocess.n4_correct(vol)
    modality = 'mr'
  elif direction == 'ct2mr':
    intensity.check_ct_is_hu(vol.array, vol.path)
    modality = 'ct'
  else:
    raise ValueError(f'direction={direction!r}: must be mr2ct or ct2mr')

  size = grid_size(vol, data.spacing_mm)
  slices, geom = preprocess.to_network_grid(vol, data.spacing_mm, size)
  if max(geom.resampled_shape) > size:  # defensive: never crop the user's FOV
    size = -(-max(geom.resampled_shape) // GRID_MULTIPLE) * GRID_MULTIPLE
    slices, geom = preprocess.to_network_grid(vol, data.spacing_mm, size)
  body = mask_lib.body_mask(slices, modality=modality, slice_axis=0)
  if not body.any():
    raise volume_lib.VolumeError(f'{vol.path}: empty body mask; is this a {modality.upper()}?')

  if direction == 'mr2ct':
    mr = intensity.normalise_mr(slices, body, data.mr_percentile, path=vol.path)
    model_in = intensity.mr_to_model(mr, data.mr_window)
  else:
    model_in = intensity.ct_hu_to_model(slices, data.ct_window)
  model_out = translate_slices(apply_fn, model_in, batch_size, progress=progress,
                               desc=os.path.basename(vol.path) or 'slices')

  out_fill = AIR_HU if direction == 'mr2ct' else MR_BACKGROUND
  if direction == 'mr2ct':
    result = intensity.model_to_ct_hu(model_out, data.ct_window)
  else:
    result = intensity.model_to_mr(model_out, data.mr_window)
  # Mask on the network grid first so interpolation back to the input grid blends tissue
  # with air at the body edge (not with whatever the generator made of the background), then
  # mask on the input grid so every voxel outside the body is exactly the fill value.
  result = np.where(body, result, np.float32(out_fill))
  result = preprocess.from_network_grid(result, geom, fill=out_fill)
  body_in = preprocess.from_network_grid(body.astype(np.float32), geom, fill=0.0) >= 0.5
  return np.where(body_in, result, np.float32(out_fill)).astype(np.float32)


def output_name(input_path: str) -> str:
  """'p01.nii.gz' / 'p01.nii' / DICOM folder 'p01/' -> 'p01.nii.gz'."""
  return volume_lib.volume_id(input_path) + '.nii.gz'


def is_single_volume(input_path: str, output_path: str) -> bool:
  """Whether `input_path` is one volume (a file, or any input with a NIfTI output name)."""
  return os.path.isfile(input_path) or volume_lib.is_nifti_path(output_path)


def plan(input_path: str, output_path: str, overwrite: bool = False,
         skip_existing: bool = False) -> list[Job]:
  """Pairs inputs with outputs and checks them all before any work starts.

  One volume (a NIfTI file, or any input with an output ending in .nii/.nii.gz, e.g. a DICOM
  series folder) -> one output file. Otherwise `input_path` is a folder of volumes
  (`list_volumes`) and `output_path` a folder that receives '<input name>.nii.gz' each.
  With `skip_existing`, volumes whose output exists are left out (to finish an interrupted
  folder run) instead of being an error.

  Raises:
    TranslateError / volume_lib.VolumeError: missing input, a folder without volumes, an
      output that exists (without `overwrite`), clashing output names.
  """
  if not os.path.exists(input_path):
    raise TranslateError(f'{input_path}: no such input file or folder')
  if is_single_volume(input_path, output_path):
    if (os.path.isdir(input_path) and not volume_lib.is_dicom_dir(input_path)
        and any(volume_lib.is_nifti_path(name) and not name.startswith('.')
                for name in os.listdir(input_path))):
      raise TranslateError(f'{input_path}: is a folder of NIfTI volumes; give an output folder '
                           f'(not {output_path}) to translate them all')
    if not volume_lib.is_nifti_path(output_path):
      raise TranslateError(f'{output_path}: output for one volume must end in .nii or .nii.gz')
    if os.path.isdir(output_path):
      raise TranslateError(f'{output_path}: is a folder; name the output file')
    jobs = [Job(input_path, output_path)]
  else:
    if os.path.isfile(output_path):
      raise TranslateError(f'{output_path}: is a file; a folder input needs an output folder')
    inputs = volume_lib.list_volumes(input_path)
    jobs = [Job(path, os.path.join(output_path, output_name(path))) for path in inputs]
    names = [job.output_path for job in jobs]
    if len(set(names)) != len(names):
      dup = sorted({n for n in names if names.count(n) > 1})[0]
      raise TranslateError(f'{dup}: two inputs map to this output name (e.g. a.nii and '
                           f'a.nii.gz); rename one')
  for job in jobs:
    # realpath: an output folder that is a link to the input folder is the input folder.
    if os.path.realpath(job.output_path) == os.path.realpath(job.input_path):
      raise TranslateError(f'{job.output_path}: output would replace its own input')
  if skip_existing and not overwrite:
    jobs = [job for job in jobs if not os.path.exists(job.output_path)]
  for job in jobs:
    if os.path.exists(job.output_path) and not overwrite:
      raise TranslateError(f'{job.output_path}: already exists (pass --overwrite to replace '
                           f'it, or --skip_existing to keep it)')
  return jobs


def translate(source: str, input_path: str, output_path: str, *, direction: str = 'mr2ct',
              step: int | None = None, overwrite: bool = False, skip_existing: bool = False,
              batch_size: int | None = None, backend: str = 'jax',
              progress: bool = True) -> list[str]:
  """Translates a volume or a folder of volumes with a trained generator.

  In a folder, an input that cannot be read or used (`volume_lib.VolumeError`) is reported on
  stderr and skipped, the others are still translated, and a TranslateError counting the
  skipped ones is raised at the end.

  Args:
    source: training workdir or exported .npz.
    input_path: NIfTI file, DICOM series folder, or a folder of those.
    output_path: .nii/.nii.gz for one volume, or a folder for a folder input.
    direction: 'mr2ct' (synthetic CT, int16 HU) or 'ct2mr' (synthetic MR, float32).
    step: checkpoint step (workdir sources; None = latest).
    overwrite: replace existing outputs.
    skip_existing: leave out volumes whose output already exists (folder runs).
    batch_size: slices per generator call (default config.eval.batch_size).
    backend: 'jax' or 'numpy' forward.
    progress: progress bars over volumes and slices.

  Returns:
    The written output paths.

  Raises:
    TranslateError, volume_lib.VolumeError, generator_source.SourceError: one-line messages.
  """
  # Imported here so `plan`/`translate_volume` stay usable without loading jax/flax.
  from mr2ct_jax import generator_source  # pylint: disable=g-import-not-at-top
  generator_source.network_for(direction)
  # Fail fast, before loading the model.
  jobs = plan(input_path, output_path, overwrite, skip_existing)
  if not jobs:  # --skip_existing and every output exists
    return []
  apply_fn, config, _ = generator_source.load_generator(source, direction, step, backend)
  dtype = np.int16 if direction == 'mr2ct' else np.float32
  folder = not is_single_volume(input_path, output_path)
  written, skipped = [], []
  for job in tqdm.tqdm(jobs, desc='volumes', unit='vol', disable=not progress or len(jobs) < 2):
    try:
      vol = volume_lib.read_volume(job.input_path)
      result = translate_volume(vol, apply_fn, config, direction, batch_size,
                                progress=progress)
    except volume_lib.VolumeError as e:
      if not folder:
        raise
      # One bad file must not cost the rest of a folder run.
      print(f'skipped: {e}', file=sys.stderr)
      skipped.append(job.input_path)
      continue
    # file_shape: the input's own shape, trailing singleton axes ([X, Y, Z, 1]) included.
    volume_lib.write_nifti(job.output_path, result.reshape(vol.file_shape), vol.affine,
                           dtype=dtype, overwrite=overwrite)
    written.append(job.output_path)
  if skipped:
    raise TranslateError(f'{input_path}: {len(skipped)} of {len(jobs)} volumes skipped (listed '
                         f'above); {len(written)} written to {output_path}')
  return written


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: see cli_flags.
  fv = flags.FlagValues()
  cli_flags.define_generator_source_flags(fv)
  flags.DEFINE_string('input', None, 'NIfTI file, DICOM series folder, or a folder of them.',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'Output .nii.gz (one volume) or folder.', flag_values=fv)
  flags.DEFINE_enum('direction', 'mr2ct', ['mr2ct', 'ct2mr'],
                    'mr2ct: synthetic CT (HU, int16); ct2mr: synthetic MR (float32).',
                    flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Slices per generator call (default: '
                       'config.eval.batch_size).', lower_bound=1, flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.', flag_values=fv)
  flags.DEFINE_bool('skip_existing', False, 'Folder input: leave out volumes whose output '
                    'exists (finish an interrupted run).', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show progress bars.', flag_values=fv)
  return fv


def _run(fv: flags.FlagValues) -> None:
  # Before the model loads: an output that cannot be created (its parent is a file, a
  # read-only or virtual file system) is one line, not a traceback after the translation.
  atomic.check_writable(fv.output, folder=not is_single_volume(fv.input, fv.output))
  written = translate(cli_flags.generator_source(fv), fv.input, fv.output,
                      direction=fv.direction, step=fv.step, overwrite=fv.overwrite,
                      skip_existing=fv.skip_existing, batch_size=fv.batch_size,
                      backend=fv.backend, progress=fv.progress)
  if not written:
    print(f'nothing to do: every output in {fv.output} exists (--skip_existing)')
    return
  print(f'wrote {len(written)} volume(s): ' + (written[0] if len(written) == 1 else
                                              os.path.dirname(written[0])))


def _known_errors() -> tuple[type[Exception], ...]:
  from mr2ct_jax import generator_source  # pylint: disable=g-import-not-at-top  (jax/flax)
  return (TranslateError, volume_lib.VolumeError, generator_source.SourceError)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return cli_flags.run(fv, argv, 'mr2ct_jax.translate', lambda: _run(fv), errors=_known_errors,
                       required=('input', 'output'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
