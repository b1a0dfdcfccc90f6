"""SynthRAD2023 metrics of the paired evaluation, on the sCT in the CT's own geometry.

For every test patient the MR file recorded by `prepare` (dataset_meta.json) is translated
exactly as `translate` does it (`inference.volumes.translate_volume`: the run's
preprocessing, the whole field of view, the sCT on the MR's own voxels, -1024 HU outside the
body), and the sCT is scored against the recorded registered CT file with
`mr2ct_jax.evaluation.synthrad` (the challenge's MAE, PSNR, SSIM) inside the recorded mask
file, else the body mask of the CT (`mask.body_mask(ct, modality='ct')`, as `prepare` and
`evaluate --sct_dir` compute it). The paired CT of a prepared test split lies on its MR's grid
(`prepare` checks it), so the MR's geometry is the CT's.

A patient whose recorded MR or CT file no longer exists, or one of whose files changed since
`prepare` (its sha256 differs from the one recorded), gets NaN for these metrics (logged; the
summary says how many); a volume with an axis shorter than SSIM's 7-voxel window gets NaN
SSIM.
"""

import os
from collections.abc import Mapping
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from mr2ct_jax.data import checksums
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.evaluation import synthrad
from mr2ct_jax.inference import volumes as volumes_lib

NAN_ROW = {k: float('nan') for k in synthrad.METRIC_KEYS}
GRID_ATOL_MM = 1e-3  # as `prepare` compares a paired CT's grid with its MR's


def recorded_files(meta: Mapping[str, Any], split: str, pid: str) -> dict[str, str]:
  """role -> source file of a prepared patient (from dataset_meta.json; {} if unrecorded)."""
  patients = meta.get('splits', {}).get(split, {}).get('patients', {})
  return dict(patients.get(pid, {}).get('files', {}))


def recorded_hashes(meta: Mapping[str, Any], split: str, pid: str) -> dict[str, str]:
  """role -> sha256 of a prepared patient's source file when prepared ({} if unrecorded)."""
  patients = meta.get('splits', {}).get(split, {}).get('patients', {})
  return dict(patients.get(pid, {}).get('sha256', {}))


def unusable_sources(files: Mapping[str, str],
                     hashes: Mapping[str, str] | None = None) -> list[str]:
  """Why a patient's recorded files cannot be scored (empty: they can): its MR or CT file
  is gone, or a file's content changed since `prepare` (its sha256 differs from the one
  recorded), which would score the sCT of another volume than the prepared one."""
  problems = [f'{files.get(role) or role}: gone' for role in ('mr', 'ct')
              if not (files.get(role) and os.path.exists(files[role]))]
  if problems:
    return problems
  for role, digest in (hashes or {}).items():
    path = files.get(role)
    if path and os.path.exists(path) and checksums.source_sha256(path) != digest:
      problems.append(f'{path}: changed since the data were prepared')
  return problems


def patient_metrics(files: Mapping[str, str], sct_fn: scoring.ApplyFn,
                    config: ml_collections.ConfigDict,
                    hashes: Mapping[str, str] | None = None) -> dict[str, float] | None:
  """The SynthRAD metrics of one patient; None if its recorded MR or CT file is gone or a
  recorded file changed since `prepare` (`unusable_sources`, logged).

  Raises:
    scoring.EvaluateError / volume_lib.VolumeError: a file unusable on its own (grids
      differ, empty mask); one line naming the file.
  """
  problems = unusable_sources(files, hashes)
  if problems:
    logging.warning('SynthRAD2023 metrics left out (NaN): %s', '; '.join(problems))
    return None
  mr = volume_lib.read_volume(files['mr'])
  ct = volume_lib.read_volume(files['ct'])
  # `prepare` accepted a CT of the MR's grid stored in another voxel order: score it on the
  # MR's voxels, as the sCT is written.
  ct = _on_grid_of_mr(ct, mr)
  if files.get('mask') and os.path.exists(files['mask']):
    mask = _on_grid_of_mr(volume_lib.read_volume(files['mask']), mr).array > 0
  else:
    mask = mask_lib.body_mask(ct.array, modality='ct')
  if not mask.any():
    raise scoring.EvaluateError(f'{files.get("mask") or ct.path}: empty evaluation mask')
  sct = volumes_lib.translate_volume(mr, sct_fn, config)
  if min(ct.shape) < synthrad.SSIM_WIN_SIZE:
    return {'synthrad_mae': synthrad.mae(ct.array, sct, mask),
            'synthrad_psnr': synthrad.psnr(ct.array, sct, mask), 'synthrad_ssim': float('nan')}
  return synthrad.synthrad_metrics(ct.array, sct, mask)


def _on_grid_of_mr(vol: volume_lib.Volume, mr: volume_lib.Volume) -> volume_lib.Volume:
  """`vol` on `mr`'s voxels (reordered if stored in another voxel order); EvaluateError
  when its grid is no longer the MR's."""
  if vol.shape == mr.shape and np.allclose(vol.affine, mr.affine, atol=GRID_ATOL_MM):
    return vol
  reordered = orientation.onto_grid_of(mr, vol, GRID_ATOL_MM)
  if reordered is None:
    raise scoring.EvaluateError(f'{vol.path}: no longer on the grid of its MR {mr.path}; '
                                'prepare the data again')
  return reordered


def add_metrics(rows: list[dict[str, Any]], meta: Mapping[str, Any], split: str,
                sct_fn: scoring.ApplyFn, config: ml_collections.ConfigDict) -> int:
  """Adds the SynthRAD metrics to each per-volume row (in place); returns how many are NaN
  because the patient's source files are gone or changed since `prepare`."""
  missing = 0
  for row in rows:
    pid = row['patient_id']
    values = patient_metrics(recorded_files(meta, split, pid), sct_fn, config,
                             recorded_hashes(meta, split, pid))
    if values is None:
      missing += 1
    row.update(NAN_ROW if values is None else values)
  return missing
