"""SynthRAD2023 metrics of the paired evaluation, on the sCT in the CT's own geometry.

For every test patient the MR file recorded by `prepare` (dataset_meta.json) is translated
exactly as `translate` does it (`inference.volumes.translate_volume`: the run's
preprocessing, the whole field of view, the sCT on the MR's own voxels, -1024 HU outside the
body), and the sCT is scored against the recorded registered CT file with
`mr2ct_jax.evaluation.synthrad` (the challenge's MAE, PSNR, SSIM) inside the recorded mask
file, else the body mask of the CT (`mask.body_mask(ct, modality='ct')`, as `prepare` and
`evaluate --sct_dir` compute it). The paired CT of a prepared test split lies on its MR's grid
(`prepare` checks it), so the MR's geometry is the CT's.

A patient whose recorded MR, CT or mask file no longer exists, or one of them changed since
`prepare` (its sha256 differs from the one recorded), gets NaN for these metrics (logged; the
summary says how many); a volume with an axis shorter than SSIM's 7-voxel window gets NaN
SSIM.
"""

import os
from collections.abc import Mapping
from typing import Any

from absl import logging
import ml_collections

from mr2ct_jax.data import checksums
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.evaluation import synthrad
from mr2ct_jax.inference import volumes as volumes_lib

NAN_ROW = {k: float('nan') for k in synthrad.METRIC_KEYS}


def recorded_files(meta: Mapping[str, Any], split: str, pid: str) -> dict[str, str]:
  """role -> source file of a prepared patient (from dataset_meta.json; {} if unrecorded)."""
  patients = meta.get('splits', {}).get(split, {}).get('patients', {})
  return dict(patients.get(pid, {}).get('files', {}))


def recorded_hashes(meta: Mapping[str, Any], split: str, pid: str) -> dict[str, str]:
  """role -> sha256 of a prepared patient's source file when prepared ({} if unrecorded)."""
  patients = meta.get('splits', {}).get(split, {}).get('patients', {})
  return dict(patients.get(pid, {}).get('sha256', {}))


SCORED_ROLES = ('mr', 'ct', 'mask')  # the recorded files these metrics read


def unusable_sources(files: Mapping[str, str],
                     hashes: Mapping[str, str] | None = None) -> list[str]:
  """Why a patient's recorded files cannot be scored (empty: they can): its MR or CT file,
  or a recorded mask, is gone, or one of them changed since `prepare` (its sha256 differs
  from the one recorded), which would score another volume than the prepared one. Other
  recorded files (a label map) are not read here and not checked."""
  recorded = [role for role in SCORED_ROLES if files.get(role) or role in ('mr', 'ct')]
  problems = [f'{files.get(role) or role}: gone' for role in recorded
              if not (files.get(role) and os.path.exists(files[role]))]
  if problems:
    return problems
  hashes = hashes or {}
  return [f'{files[role]}: changed since the data were prepared' for role in recorded
          if role in hashes and checksums.source_sha256(files[role]) != hashes[role]]


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
  if files.get('mask'):
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
  """`vol` on `mr`'s voxels (reordered if stored in another voxel order, as `prepare`
  accepts); EvaluateError when its grid is no longer the MR's."""
  reordered = orientation.onto_grid_of(mr, vol)
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
