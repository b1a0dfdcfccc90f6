"""Writes prepared data dirs: folders of MR / CT volumes, or the built-in phantom.

`prepare` preprocesses every volume once (the per-patient steps are in
`mr2ct_jax.data.prepare_volumes`) and writes the TFDS slice dataset, the per-patient
geometry and the meta that `mr2ct_jax.data.dataset` reads back, building it in a temporary
sibling directory that is renamed when complete (a gs:// output: in a local temporary folder,
then uploaded, dataset_meta.json last). `prepare_phantom` generates and prepares the phantom
(`mr2ct_jax.data.resolve` decides when a run needs it).
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax import storage
from mr2ct_jax.data import checksums
from mr2ct_jax.data import dataset
from mr2ct_jax.data import prepare_volumes
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import tfds_builder
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.data.dataset import DatasetError
from mr2ct_jax.data.phantom import cohort

PHANTOM_STAMP = 'phantom.json'


def _record_index(patients: list[tfds_builder.PreparedPatient],
                  num_slices: dict[str, int]) -> dict[str, list[int]]:
  """patient id -> record indices of its slices: records keep the order they were written in
  (the builder disables TFDS's shuffling), patient after patient, slice after slice."""
  index, start = {}, 0
  for patient in patients:
    count = num_slices[patient.patient_id]
    index[patient.patient_id] = list(range(start, start + count))
    start += count
  return index


def _write_json(path: str, obj: Any) -> None:
  atomic.write_json(path, obj, indent=1, sort_keys=True)


def _build(tmp: str, inputs: prepare_volumes.Inputs, s: prepare_volumes.Settings,
           warn: Callable[[str], None], allow_large: bool) -> dict[str, Any]:
  """Preprocesses all patients into `tmp` and writes the dataset; returns the meta dict."""
  prepared: dict[str, list[tfds_builder.PreparedPatient]] = {}
  sources: dict[str, dict[str, dict[str, str]]] = {}
  for split in prepare_volumes.SPLIT_ORDER:
    for pid, files in inputs.get(split, {}).items():
      try:
        arrays, geom = prepare_volumes.process_patient(split, files, s, allow_large)
      except (prepare_volumes.Skipped, volume_lib.VolumeError, RuntimeError) as e:
        line = str(e) if not isinstance(e, RuntimeError) else (  # SimpleITK: no path
            f'{next(iter(files.values()))}: {" ".join(str(e).split())}')
        if split in dataset.EVAL_SPLITS:  # e.g. corrupt, not in HU, off the MR grid
          raise DatasetError(prepare_volumes.evaluation_refusal(split, line)) from e
        warn(line)
        continue
      folder = os.path.join(tmp, 'prepared', split)
      os.makedirs(folder, exist_ok=True)
      path = os.path.join(folder, f'{len(prepared.get(split, []))}.npz')
      np.savez(path, **arrays)
      geometry = dataset.geometry_path(tmp, pid, split)
      os.makedirs(os.path.dirname(geometry), exist_ok=True)
      _write_json(geometry, geom.to_dict())
      prepared.setdefault(split, []).append(tfds_builder.PreparedPatient(pid, path))
      sources.setdefault(split, {})[pid] = {
          'files': {r: os.path.abspath(p) for r, p in files.items()},
          'num_slices': int(arrays['image'].shape[0])}
      if split in dataset.EVAL_SPLITS:  # re-read by the evaluation: notice later edits
        sources[split][pid]['sha256'] = {r: checksums.source_sha256(p) for r, p in files.items()}
  for split, flag in (('train_mr', 'mr_dir'), ('train_ct', 'ct_dir')):
    if not prepared.get(split):
      modality = split[-2:].upper()
      raise DatasetError(f'--{flag}: no usable {modality} volume (all skipped, see the '
                         'warnings above)')
  tfds_builder.build(tmp, s.image_size, prepared)
  splits = {}
  for split, patients in sources.items():
    index = _record_index(prepared[split], {pid: info['num_slices']
                                            for pid, info in patients.items()})
    for pid, info in patients.items():
      info['records'] = index[pid]
    splits[split] = {'num_examples': sum(len(v) for v in index.values()),
                     'patients': patients}
  shutil.rmtree(os.path.join(tmp, 'prepared'))
  shutil.rmtree(os.path.join(tmp, 'downloads'), ignore_errors=True)
  return {'format_version': dataset.FORMAT_VERSION, 'tfds_dir': os.path.relpath(
      tfds_builder.builder_dir(tmp), tmp), **dataclasses.asdict(s), 'splits': splits}


def prepare(mr_dir: str, ct_dir: str, out_dir: str, labeled_dir: str | None = None,
            paired_dir: str | None = None, *, spacing_mm: float, image_size: int,
            mr_percentile: float, n4: bool, plane: str = 'axial', overwrite: bool = False,
            allow_large: bool = False, val_dir: str | None = None,
            test_mr_dir: str | None = None, test_ct_dir: str | None = None,
            labeled_mr_dir: str | None = None) -> str:
  """Builds the slice dataset of the given folders in `out_dir` (atomically).

  Args:
    mr_dir: unpaired MR volumes (train_mr).
    ct_dir: unpaired CT volumes in HU (train_ct).
    out_dir: the data dir to create (config.data.dir for training); a gs:// URL is built
      locally and uploaded.
    labeled_dir: optional `<id>_ct` + `<id>_label` volumes (labeled split).
    paired_dir: optional `<id>_mr`, `<id>_ct` [, `<id>_mask`, `<id>_label`] (test split).
    spacing_mm: in-plane pixel size of the slices.
    image_size: slices are image_size x image_size.
    mr_percentile: percentile of the MR body voxels mapped to 100.
    n4: N4 bias correction of every MR (training and test).
    plane: slice plane, 'axial', 'coronal' or 'sagittal' (taken in patient space).
    overwrite: replace an existing `out_dir` written by `prepare` (or an empty folder).
    allow_large: accept volumes over the size bounds of `volume_checks`.
    val_dir: optional paired validation subjects, laid out like `paired_dir` (val split).
    test_mr_dir, test_ct_dir: optional unpaired test volumes, one per patient (test_mr,
      test_ct splits).
    labeled_mr_dir: optional `<id>_mr` + `<id>_label` volumes (labeled_mr split).

  Returns:
    `out_dir`.

  Raises:
    DatasetError: missing/empty folder, no usable MR or CT volume, an evaluation subject that
      is also a training subject (`prepare_volumes.collect_inputs`), `out_dir` exists (or
      with `overwrite`: is not a prepared dataset), is/contains/lies inside an input folder,
      or cannot be created.
  """
  dirs = {'train_mr': mr_dir, 'train_ct': ct_dir, 'labeled': labeled_dir, 'test': paired_dir,
          'val': val_dir, 'test_mr': test_mr_dir, 'test_ct': test_ct_dir,
          'labeled_mr': labeled_mr_dir}
  out_dir = storage.absolute(out_dir)
  # Before reading any volume: --overwrite replaces out_dir wholesale, so it must not be (or
  # hold, or lie in) an input folder, nor anything but an earlier dataset.
  atomic.check_apart(out_dir, {f'--{prepare_volumes.SPLIT_FLAG[k]}': v
                               for k, v in dirs.items()}, error=DatasetError)
  atomic.check_replaceable(out_dir, overwrite, dataset.META_FILE, 'a prepared dataset',
                           error=DatasetError)
  atomic.check_writable(out_dir, error=DatasetError)
  if plane not in preprocess.PLANES:
    raise DatasetError(f'plane={plane!r}: must be one of {preprocess.PLANES}')
  settings = prepare_volumes.Settings(float(spacing_mm), int(image_size), float(mr_percentile),
                                      bool(n4), str(plane))
  skipped: list[str] = []

  def warn(message: str) -> None:
    skipped.append(message)
    logging.warning('%s', message)

  inputs = prepare_volumes.collect_inputs(dirs, warn)

  with atomic.building_dir(out_dir) as tmp:
    meta = _build(tmp, inputs, settings, warn, allow_large)
    meta['skipped'] = skipped
    _write_json(os.path.join(tmp, dataset.META_FILE), meta)
  counts = {k: len(v['patients']) for k, v in meta['splits'].items()}
  described = {'labeled': 'labeled CT', 'test': 'paired test subjects',
               'val': 'validation subjects', 'test_mr': 'unpaired test MR',
               'test_ct': 'unpaired test CT', 'labeled_mr': 'labeled MR'}
  summary = (f'prepared {counts.get("train_mr", 0)} MR, {counts.get("train_ct", 0)} CT volumes'
             + ''.join(f', {counts[k]} {what}' for k, what in described.items() if k in counts)
             + (f'; skipped {len(skipped)} (see above)' if skipped else '; skipped none')
             + f' -> {out_dir}')
  logging.info('%s', summary)
  print(summary, file=sys.stderr)
  return out_dir


def preparation_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The preprocessing a new dataset is prepared with: config.data.<key> where set, else
  config.data.prepare_defaults.<key> (for `prepare` and the built-in phantom)."""
  data = config.data
  values = {}
  for key in dataset.PREPROCESSING_KEYS:
    value = data.get(key)
    values[key] = data.prepare_defaults[key] if value is None else value
  return {'spacing_mm': float(values['spacing_mm']), 'image_size': int(values['image_size']),
          'mr_percentile': float(values['mr_percentile']), 'n4': bool(values['n4']),
          'plane': str(values['plane'])}


def _phantom_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  data = config.data
  return {'format_version': dataset.FORMAT_VERSION, 'seed': int(config.seed),
          'phantom': {k: int(v) for k, v in data.phantom.items()},
          **preparation_settings(config)}


def prepare_phantom(directory: str, config: ml_collections.ConfigDict) -> str:
  """Generates the phantom (config.data.phantom, config.seed) and prepares it; idempotent.

  The preprocessing is `preparation_settings(config)`.

  Layout: `directory/raw` (the phantom's NIfTI folders), `directory/data` (the prepared
  dataset), `directory/phantom.json` (the parameters both were made with). A complete build
  with the same parameters is reused; anything else is rebuilt.

  A gs:// `directory` is built in a local temporary folder and uploaded (phantom.json last);
  its meta then names raw files of that deleted folder, so evaluation skips the metrics
  on the original volumes (`evaluation.native`) for it.

  Returns:
    The data dir (`directory/data`).
  """
  if storage.is_remote(directory):
    return _prepare_remote_phantom(storage.absolute(directory), config)
  directory = os.path.abspath(os.fspath(directory))
  raw, data_dir = os.path.join(directory, 'raw'), os.path.join(directory, 'data')
  stamp = os.path.join(directory, PHANTOM_STAMP)
  params = _phantom_params(config)
  if os.path.isfile(stamp) and os.path.isfile(os.path.join(data_dir, dataset.META_FILE)):
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
  extra = {key: int(p.get(key, 0))
           for key in ('num_val', 'num_test_mr', 'num_test_ct', 'num_labeled_mr')}
  # cohort.generate writes atomically itself (temporary sibling, then rename).
  cohort.generate(raw, num_train_mr=p.num_train_mr, num_train_ct=p.num_train_ct,
                  num_labeled=p.num_labeled, num_test=p.num_test,
                  num_slices=p.num_slices, seed=config.seed, **extra)
  folder = lambda name, count: os.path.join(raw, name) if count else None
  prepare(os.path.join(raw, 'mr'), os.path.join(raw, 'ct'), data_dir,
          labeled_dir=os.path.join(raw, 'labeled'), paired_dir=os.path.join(raw, 'paired'),
          val_dir=folder('val', extra['num_val']),
          test_mr_dir=folder('test_mr', extra['num_test_mr']),
          test_ct_dir=folder('test_ct', extra['num_test_ct']),
          labeled_mr_dir=folder('labeled_mr', extra['num_labeled_mr']),
          spacing_mm=params['spacing_mm'], image_size=params['image_size'],
          mr_percentile=params['mr_percentile'], n4=params['n4'], plane=params['plane'],
          overwrite=True)
  _write_json(stamp, params)
  return data_dir


def _prepare_remote_phantom(directory: str, config: ml_collections.ConfigDict) -> str:
  """`prepare_phantom` for a URL: reuses a complete upload with the same parameters."""
  data_dir, stamp = storage.join(directory, 'data'), storage.join(directory, PHANTOM_STAMP)
  if storage.isfile(stamp) and storage.isfile(storage.join(data_dir, dataset.META_FILE)):
    with storage.open_file(stamp, encoding='utf-8') as f:
      try:
        if json.load(f) == _phantom_params(config):
          return data_dir
      except ValueError:
        pass
  with tempfile.TemporaryDirectory(prefix='mr2ct_jax_phantom_') as local:
    built = os.path.join(local, 'phantom')
    prepare_phantom(built, config)
    storage.upload_tree(built, directory)  # top-level phantom.json last: the stamp
  return data_dir
