r"""Prepares folders of MR / CT volumes as a TFDS slice dataset (array_record).

  python -m mr2ct_jax.data.prepare --mr_dir=MR --ct_dir=CT [--labeled_dir=LAB] \
      [--paired_dir=PAIRED] --out=DATA_DIR [--config=configs/gc.py] [--n4] [--overwrite]

Every volume is preprocessed once: read (NIfTI or DICOM series folder) -> [N4 for MR] ->
canonical RAS+, in-plane resampling to config.data.spacing_mm, centre crop/pad to
config.data.image_size -> body mask -> MR normalisation (the config.data.mr_percentile
percentile of the body = 100) or a check that the CT is in Hounsfield units. One example per
axial slice is written; windows are applied later by the input pipeline.

Folder layouts:
  --mr_dir, --ct_dir   one volume per patient: <id>.nii.gz, <id>.nii or a DICOM series
                       folder <id>/ (the patient id is the name without suffix).
  --labeled_dir        CT with label maps: <id>_ct.nii.gz + <id>_label.nii.gz
                       (labels: 0 background, 1..K structures; uint8).
  --paired_dir         paired test subjects: <id>_mr.nii.gz, <id>_ct.nii.gz (the same
                       subject's CT registered to the MR grid: same shape and affine),
                       optional <id>_mask.nii.gz (body mask) and <id>_label.nii.gz.
The built-in phantom (`python -m mr2ct_jax.data.phantom OUT`) writes exactly this layout
under OUT/mr, OUT/ct, OUT/labeled and OUT/paired.

A patient id belongs to exactly one split (test, then train_mr, train_ct, labeled); a bad
file is skipped with a one-line warning "PATH: reason" and counted in the closing summary.

The per-patient steps are in `mr2ct_jax.data.prepare_volumes`; this module assembles the
dataset, reads it back (`load_meta`, `load_geometry`) and prepares the built-in phantom.

Output (DATA_DIR, built in a temporary sibling directory and renamed when complete):
  mr2ct_slices/1.0.0/    the TFDS dataset: splits train_mr, train_ct, [labeled], [test]
  geometry/<id>.json     SliceGeometry per patient (maps slices back to the input volume)
  dataset_meta.json      preprocessing values, patients and record index per split
DATA_DIR must lie apart from the input folders; an existing one is replaced only with
--overwrite, and only if it is a dataset prepared earlier (it holds dataset_meta.json).
"""

import dataclasses
import json
import logging as std_logging
import os
import shutil
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax import cli_flags
from mr2ct_jax import config_checks
from mr2ct_jax.data import prepare_volumes
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import tfds_builder
from mr2ct_jax.data import volume as volume_lib

META_FILE = 'dataset_meta.json'
GEOMETRY_DIR = 'geometry'
FORMAT_VERSION = 1
PHANTOM_STAMP = 'phantom.json'
DatasetError = volume_lib.DatasetError


# ---------------------------------------------------------------------------------------
# The whole dataset.


def _record_index(data_dir: str, split: str) -> dict[str, list[int]]:
  """patient id -> record indices of its slices in slice order (TFDS shuffles records)."""
  source = tfds_builder.data_source(data_dir, split)
  found: dict[str, dict[int, int]] = {}
  for i in range(len(source)):
    example = source[i]
    pid = example['patient_id']
    pid = pid.decode() if isinstance(pid, bytes) else str(pid)
    found.setdefault(pid, {})[int(example['slice_index'])] = i
  return {pid: [slices[k] for k in sorted(slices)] for pid, slices in found.items()}


def _write_json(path: str, obj: Any) -> None:
  atomic.write_json(path, obj, indent=1, sort_keys=True)


def _build(tmp: str, inputs: prepare_volumes.Inputs, s: prepare_volumes.Settings,
           warn: Callable[[str], None]) -> dict[str, Any]:
  """Preprocesses all patients into `tmp` and writes the dataset; returns the meta dict."""
  os.makedirs(os.path.join(tmp, GEOMETRY_DIR))
  prepared: dict[str, list[tfds_builder.PreparedPatient]] = {}
  sources: dict[str, dict[str, dict[str, str]]] = {}
  for split in prepare_volumes.SPLIT_ORDER:
    for pid, files in inputs.get(split, {}).items():
      try:
        arrays, geom = prepare_volumes.process_patient(split, files, s)
      except (prepare_volumes.Skipped, volume_lib.VolumeError) as e:
        warn(str(e))  # e.g. corrupt, not in HU: 'PATH: why'
        continue
      except RuntimeError as e:  # SimpleITK (N4) failures carry no path
        warn(f'{next(iter(files.values()))}: {" ".join(str(e).split())}')
        continue
      folder = os.path.join(tmp, 'prepared', split)
      os.makedirs(folder, exist_ok=True)
      path = os.path.join(folder, f'{len(prepared.get(split, []))}.npz')
      np.savez(path, **arrays)
      _write_json(os.path.join(tmp, GEOMETRY_DIR, f'{pid}.json'), geom.to_dict())
      prepared.setdefault(split, []).append(tfds_builder.PreparedPatient(pid, path))
      sources.setdefault(split, {})[pid] = {
          'files': {r: os.path.abspath(p) for r, p in files.items()},
          'num_slices': int(arrays['image'].shape[0])}
  for split, flag in (('train_mr', 'mr_dir'), ('train_ct', 'ct_dir')):
    if not prepared.get(split):
      modality = split[-2:].upper()
      raise DatasetError(f'--{flag}: no usable {modality} volume (all skipped, see the '
                         'warnings above)')
  tfds_builder.build(tmp, s.image_size, prepared)
  splits = {}
  for split, patients in sources.items():
    index = _record_index(tmp, split)
    for pid, info in patients.items():
      info['records'] = index[pid]
    splits[split] = {'num_examples': sum(len(v) for v in index.values()),
                     'patients': patients}
  shutil.rmtree(os.path.join(tmp, 'prepared'))
  shutil.rmtree(os.path.join(tmp, 'downloads'), ignore_errors=True)
  return {'format_version': FORMAT_VERSION, 'tfds_dir': os.path.relpath(
      tfds_builder.builder_dir(tmp), tmp), **dataclasses.asdict(s), 'splits': splits}


def prepare(mr_dir: str, ct_dir: str, out_dir: str, labeled_dir: str | None = None,
            paired_dir: str | None = None, *, spacing_mm: float, image_size: int,
            mr_percentile: float, n4: bool, overwrite: bool = False) -> str:
  """Builds the slice dataset of the given folders in `out_dir` (atomically).

  Args:
    mr_dir: unpaired MR volumes (train_mr).
    ct_dir: unpaired CT volumes in HU (train_ct).
    out_dir: the data dir to create (config.data.dir for training).
    labeled_dir: optional `<id>_ct` + `<id>_label` volumes (labeled split).
    paired_dir: optional `<id>_mr`, `<id>_ct` [, `<id>_mask`, `<id>_label`] (test split).
    spacing_mm: in-plane pixel size of the slices.
    image_size: slices are image_size x image_size.
    mr_percentile: percentile of the MR body voxels mapped to 100.
    n4: N4 bias correction of every MR (training and test).
    overwrite: replace an existing `out_dir` written by `prepare` (or an empty folder).

  Returns:
    `out_dir`.

  Raises:
    DatasetError: missing/empty folder, no usable MR or CT volume, `out_dir` exists (or with
      `overwrite`: is not a prepared dataset), is/contains/lies inside an input folder, or
      cannot be created.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  # Before reading any volume: --overwrite replaces out_dir wholesale, so it must not be (or
  # hold, or lie in) an input folder, nor anything but an earlier dataset.
  atomic.check_apart(out_dir, {'--mr_dir': mr_dir, '--ct_dir': ct_dir,
                               '--labeled_dir': labeled_dir, '--paired_dir': paired_dir},
                     error=DatasetError)
  atomic.check_replaceable(out_dir, overwrite, META_FILE, 'a prepared dataset',
                           error=DatasetError)
  atomic.check_writable(out_dir, error=DatasetError)
  settings = prepare_volumes.Settings(float(spacing_mm), int(image_size), float(mr_percentile),
                                      bool(n4))
  skipped: list[str] = []

  def warn(message: str) -> None:
    skipped.append(message)
    logging.warning('%s', message)

  inputs = prepare_volumes.collect_inputs(
      {'train_mr': mr_dir, 'train_ct': ct_dir, 'labeled': labeled_dir, 'test': paired_dir},
      warn)

  with atomic.building_dir(out_dir) as tmp:
    meta = _build(tmp, inputs, settings, warn)
    meta['skipped'] = skipped
    _write_json(os.path.join(tmp, META_FILE), meta)
  counts = {k: len(v['patients']) for k, v in meta['splits'].items()}
  summary = (f'prepared {counts.get("train_mr", 0)} MR, {counts.get("train_ct", 0)} CT volumes'
             + (f', {counts["labeled"]} labeled' if 'labeled' in counts else '')
             + (f', {counts["test"]} paired test subjects' if 'test' in counts else '')
             + (f'; skipped {len(skipped)} (see above)' if skipped else '; skipped none')
             + f' -> {out_dir}')
  logging.info('%s', summary)
  print(summary, file=sys.stderr)
  return out_dir


# ---------------------------------------------------------------------------------------
# Reading back what prepare wrote.


def load_meta(data_dir: str) -> dict[str, Any]:
  """dataset_meta.json of a prepared data dir.

  Raises:
    DatasetError: the dir is missing or was not written by `prepare`.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DatasetError(f'{data_dir}: data dir does not exist (run python -m '
                       'mr2ct_jax.data.prepare, or leave config.data.dir empty for the phantom)')
  path = os.path.join(data_dir, META_FILE)
  if not os.path.isfile(path):
    raise DatasetError(f'{data_dir}: not a prepared data dir (no {META_FILE}; run python -m '
                       'mr2ct_jax.data.prepare)')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path}: unreadable ({e})') from e
  if meta.get('format_version') != FORMAT_VERSION:
    raise DatasetError(f'{path}: format_version {meta.get("format_version")!r}, this code reads '
                       f'{FORMAT_VERSION}; prepare the data again')
  return meta


def load_geometry(data_dir: str, patient_id: str) -> preprocess.SliceGeometry:
  """The SliceGeometry of one prepared patient."""
  path = os.path.join(os.fspath(data_dir), GEOMETRY_DIR, f'{patient_id}.json')
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: no geometry for patient {patient_id!r}')
  with open(path, encoding='utf-8') as f:
    return preprocess.SliceGeometry.from_dict(json.load(f))


def settings_mismatch(data_dir: str, config: ml_collections.ConfigDict) -> str | None:
  """Why a prepared data dir does not suit a generator trained with `config`, or None.

  A generator only works on slices prepared like its training data (scale, intensity), so
  spacing_mm, image_size and mr_percentile of the data dir must equal config.data's.

  Returns:
    A one-line message naming the first differing value, or None if all match.
  """
  meta = load_meta(data_dir)
  for key in ('spacing_mm', 'image_size', 'mr_percentile'):
    if key in meta and not np.isclose(float(meta[key]), float(config.data[key])):
      return (f'{data_dir}: prepared with {key}={meta[key]} but the generators were trained '
              f'with data.{key}={config.data[key]}; prepare it with the run\'s config')
  return None


# ---------------------------------------------------------------------------------------
# The built-in phantom.


def _phantom_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  data = config.data
  return {'format_version': FORMAT_VERSION, 'seed': int(config.seed),
          'phantom': {k: int(v) for k, v in data.phantom.items()},
          'spacing_mm': float(data.spacing_mm), 'image_size': int(data.image_size),
          'mr_percentile': float(data.mr_percentile), 'n4': bool(data.n4)}


def prepare_phantom(directory: str, config: ml_collections.ConfigDict) -> str:
  """Generates the phantom (config.data.phantom, config.seed) and prepares it; idempotent.

  Layout: `directory/raw` (the phantom's NIfTI folders), `directory/data` (the prepared
  dataset), `directory/phantom.json` (the parameters both were made with). A complete build
  with the same parameters is reused; anything else is rebuilt.

  Returns:
    The data dir (`directory/data`).
  """
  from mr2ct_jax.data import phantom  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(os.fspath(directory))
  raw, data_dir = os.path.join(directory, 'raw'), os.path.join(directory, 'data')
  stamp = os.path.join(directory, PHANTOM_STAMP)
  params = _phantom_params(config)
  if os.path.isfile(stamp) and os.path.isfile(os.path.join(data_dir, META_FILE)):
    with open(stamp, encoding='utf-8') as f:
      try:
        if json.load(f) == params:
          return data_dir
      except ValueError:
        pass
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(stamp):
    os.remove(stamp)  # the stamp is written last: no stamp = incomplete
  for path in (raw, data_dir):
    if os.path.exists(path):
      shutil.rmtree(path)
  p = config.data.phantom
  # phantom.generate writes atomically itself (temporary sibling, then rename).
  phantom.generate(raw, num_train_mr=p.num_train_mr, num_train_ct=p.num_train_ct,
                   num_labeled=p.num_labeled, num_test=p.num_test,
                   num_slices=p.num_slices, seed=config.seed)
  prepare(os.path.join(raw, 'mr'), os.path.join(raw, 'ct'), data_dir,
          labeled_dir=os.path.join(raw, 'labeled'), paired_dir=os.path.join(raw, 'paired'),
          spacing_mm=params['spacing_mm'], image_size=params['image_size'],
          mr_percentile=params['mr_percentile'], n4=params['n4'], overwrite=True)
  _write_json(stamp, params)
  return data_dir


# ---------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: importing this module (train.py does) adds no global flags.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', cli_flags.default_config_path(),
      'Config file (configs/gc.py[:variant]); uses data.spacing_mm, data.image_size, '
      'data.mr_percentile and data.n4.', flag_values=fv, lock_config=True)
  flags.DEFINE_string('mr_dir', None, 'Folder of unpaired MR volumes.', flag_values=fv)
  flags.DEFINE_string('ct_dir', None, 'Folder of unpaired CT volumes (HU).', flag_values=fv)
  flags.DEFINE_string('labeled_dir', None, 'Optional folder of <id>_ct + <id>_label volumes.',
                      flag_values=fv)
  flags.DEFINE_string('paired_dir', None, 'Optional folder of paired test subjects: <id>_mr, '
                      '<id>_ct (registered to the MR), optional <id>_mask, <id>_label.',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'Data dir to create (config.data.dir for training).',
                      flag_values=fv)
  flags.DEFINE_bool('n4', None, 'N4 bias correction of MR (default: config.data.n4).',
                    flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out (only a dataset prepared '
                    'earlier, or an empty folder).', flag_values=fv)
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
  data = fv.config.data
  prepare(fv.mr_dir, fv.ct_dir, fv.out, labeled_dir=fv.labeled_dir, paired_dir=fv.paired_dir,
          spacing_mm=data.spacing_mm, image_size=data.image_size,
          mr_percentile=data.mr_percentile, n4=data.n4 if fv.n4 is None else fv.n4,
          overwrite=fv.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return cli_flags.run(fv, argv, 'mr2ct_jax.data.prepare', lambda: _run(fv),
                       errors=(volume_lib.VolumeError, DatasetError, config_checks.ConfigError),
                       required=('mr_dir', 'ct_dir', 'out'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
