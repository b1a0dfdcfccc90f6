"""SynthRAD2023 metrics of the paired evaluation, on the sCT in the CT's own geometry.

For every test patient the MR file recorded by `prepare` (dataset_meta.json) is translated
exactly as `translate` does it (`inference.volumes.translate_volume`: the run's
preprocessing, the whole field of view, the sCT on the MR's own voxels, -1024 HU outside the
body), and the sCT is scored against the recorded registered CT file with
`mr2ct_jax.evaluation.synthrad` (the challenge's MAE, PSNR, SSIM) inside the recorded mask
file, else the body mask of the CT (`mask.body_mask(ct, modality='ct')`, as `prepare` and
`evaluate --sct_dir` compute it). The paired CT of a prepared test split lies on its MR's grid
(`prepare` checks it), so the MR's geometry is the CT's.

A patient whose recorded MR or CT file no longer exists gets NaN for these metrics (the
summary says how many); a volume with an axis shorter than SSIM's 7-voxel window gets NaN
SSIM.
"""

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.evaluation import synthrad
from mr2ct_jax.inference import volumes as volumes_lib

NAN_ROW = {k: float('nan') for k in synthrad.METRIC_KEYS}


def recorded_files(meta: Mapping[str, Any], split: str, pid: str) -> dict[str, str]:
  """role -> source file of a prepared patient (from dataset_meta.json; {} if unrecorded)."""
  patients = meta.get('splits', {}).get(split, {}).get('patients', {})
  return dict(patients.get(pid, {}).get('files', {}))


def patient_metrics(files: Mapping[str, str], sct_fn: scoring.ApplyFn,
                    config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """The SynthRAD metrics of one patient; None if its recorded MR or CT file is gone.

  Raises:
    scoring.EvaluateError / volume_lib.VolumeError: a file changed since `prepare` (grids
      differ, empty mask); one line naming the file.
  """
  if not all(files.get(role) and os.path.exists(files[role]) for role in ('mr', 'ct')):
    return None
  mr = volume_lib.read_volume(files['mr'])
  ct = volume_lib.read_volume(files['ct'])
  if mr.shape != ct.shape or not np.allclose(mr.affine, ct.affine, atol=1e-3):
    raise scoring.EvaluateError(f'{ct.path}: no longer on the grid of its MR {mr.path}; '
                                'prepare the data again')
  if files.get('mask') and os.path.exists(files['mask']):
    mask_vol = volume_lib.read_volume(files['mask'])
    if mask_vol.shape != ct.shape:
      raise scoring.EvaluateError(f'{mask_vol.path}: shape {mask_vol.shape}, its CT has '
                                  f'{ct.shape}; prepare the data again')
    mask = mask_vol.array > 0
  else:
    mask = mask_lib.body_mask(ct.array, modality='ct')
  if not mask.any():
    raise scoring.EvaluateError(f'{files.get("mask") or ct.path}: empty evaluation mask')
  sct = volumes_lib.translate_volume(mr, sct_fn, config)
  if min(ct.shape) < synthrad.SSIM_WIN_SIZE:
    return {'synthrad_mae': synthrad.mae(ct.array, sct, mask),
            'synthrad_psnr': synthrad.psnr(ct.array, sct, mask), 'synthrad_ssim': float('nan')}
  return synthrad.synthrad_metrics(ct.array, sct, mask)


def add_metrics(rows: list[dict[str, Any]], meta: Mapping[str, Any], split: str,
                sct_fn: scoring.ApplyFn, config: ml_collections.ConfigDict) -> int:
  """Adds the SynthRAD metrics to each per-volume row (in place); returns how many are NaN
  because the patient's source files are gone."""
  missing = 0
  for row in rows:
    values = patient_metrics(recorded_files(meta, split, row['patient_id']), sct_fn, config)
    if values is None:
      missing += 1
    row.update(NAN_ROW if values is None else values)
  return missing
