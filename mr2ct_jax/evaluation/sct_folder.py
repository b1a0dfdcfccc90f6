"""SynthRAD2023 task-1 metrics of a folder of sCT NIfTI against CTs in their own geometry.

`python -m mr2ct_jax.evaluate --sct_dir=DIR --ct_dir=DIR [--mask_dir=DIR] --output=OUT`
scores any folder of synthetic CTs (ours from `translate`, or another tool's) with
`mr2ct_jax.evaluation.synthrad` (MAE, PSNR, SSIM exactly as the challenge's code). JAX-free.

Matching: every .nii/.nii.gz file of a folder (other entries are ignored) is one patient. Its
id is the file name without folder and NIfTI suffix (`mr2ct_jax.data.volume.volume_id`),
with one trailing role suffix `_sct`, `_ct` or `_mask` (case-insensitive) removed:
`1PA001_sct.nii.gz`, `1PA001_ct.nii`, `1PA001_mask.nii.gz` and `1PA001.nii.gz` all are
patient `1PA001`. Every sCT needs a CT and every CT an sCT (the unmatched ids are named).

Mask: `<id>` in --mask_dir (every patient needs one; voxels > 0 are inside), else the body
mask computed from the CT as `prepare` computes it (`mask.body_mask(ct, modality='ct')`:
> -500 HU, largest component, holes filled per slice) on the CT's own grid.

Refused with one line naming the file: an empty folder, an sCT or mask whose shape or affine
differs from its CT's, an empty mask, NaN/Inf voxels (the volume reader), a CT not in HU, a
volume with an axis shorter than SSIM's 7-voxel window, two files of one patient id.

Outputs (a folder that appears complete or not at all; an existing one is replaced only with
--overwrite and only if it is an earlier evaluation output): per_volume.csv/.json (patient_id,
the three files, mask_voxels, synthrad_mae, synthrad_psnr, synthrad_ssim), summary.md and
summary.json, which records the data fingerprint (`fingerprint.files_fingerprint`: sha256 over
the sorted patient ids, each CT's and mask's base name and the sha256 of its bytes, and the
mask source), so `--compare` pairs only results of the same reference data.
"""

import os
from typing import Any

import numpy as np
import tqdm

from mr2ct_jax import atomic
from mr2ct_jax.data import intensity
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import fingerprint as fingerprint_lib
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.evaluation import synthrad

EvaluateError = scoring.EvaluateError
ROLE_SUFFIXES = ('_sct', '_ct', '_mask')  # '_sct' before '_ct': only one suffix is removed
OWN_FILE = 'per_volume.json'
PER_VOLUME_FIELDS = ('patient_id', 'sct_file', 'ct_file', 'mask_file', 'mask_voxels'
                     ) + synthrad.METRIC_KEYS
BODY_MASK = 'ct_body_mask'  # mask_file of a row whose mask was computed from its CT


def patient_id(path: str) -> str:
  """The patient id of a file: its volume id without one trailing role suffix."""
  name = volume_lib.volume_id(path)
  for suffix in ROLE_SUFFIXES:
    if name.lower().endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return name


def list_patients(folder: str, flag: str) -> dict[str, str]:
  """patient id -> NIfTI file of `folder` (sorted by id).

  Raises:
    EvaluateError: the folder is missing, holds no NIfTI file, or two files share an id.
  """
  if not os.path.isdir(folder):
    what = 'a file, not a folder' if os.path.exists(folder) else 'no such folder'
    raise EvaluateError(f'{folder}: {what} (--{flag})')
  found: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('.') or not volume_lib.is_nifti_path(name) or not os.path.isfile(path):
      continue
    pid = patient_id(path)
    if pid in found:
      raise EvaluateError(f'{path}: patient id {pid!r} also names {found[pid]} (--{flag})')
    found[pid] = path
  if not found:
    raise EvaluateError(f'{folder}: no NIfTI files (.nii, .nii.gz) found (--{flag})')
  return dict(sorted(found.items()))


def match(sct_dir: str, ct_dir: str, mask_dir: str | None
          ) -> dict[str, dict[str, str | None]]:
  """patient id -> {'sct', 'ct', 'mask' (None: body mask)}; every sCT has a CT and back.

  Raises:
    EvaluateError: see `list_patients`; unmatched sCT or CT ids; a CT without a mask file.
  """
  scts, cts = list_patients(sct_dir, 'sct_dir'), list_patients(ct_dir, 'ct_dir')
  masks = list_patients(mask_dir, 'mask_dir') if mask_dir else {}
  only_sct, only_ct = sorted(set(scts) - set(cts)), sorted(set(cts) - set(scts))
  if only_sct:
    raise EvaluateError(f'{scts[only_sct[0]]}: no CT for patient {only_sct[0]!r} in {ct_dir} '
                        f'(sCT ids without CT: {only_sct[:10]}; CT ids without sCT: '
                        f'{only_ct[:10]})')
  if only_ct:
    raise EvaluateError(f'{cts[only_ct[0]]}: no sCT for patient {only_ct[0]!r} in {sct_dir} '
                        f'(CT ids without sCT: {only_ct[:10]})')
  if mask_dir:
    missing = [p for p in cts if p not in masks]
    if missing:
      raise EvaluateError(f'{cts[missing[0]]}: no mask for patient {missing[0]!r} in '
                          f'{mask_dir} (ids without mask: {missing[:10]})')
  return {pid: {'sct': scts[pid], 'ct': cts[pid], 'mask': masks.get(pid)} for pid in cts}


def _on_ct_grid(vol: volume_lib.Volume, ct: volume_lib.Volume, what: str) -> volume_lib.Volume:
  """`vol` on its CT's grid: itself, or its voxels reordered when it is the CT's grid stored
  in another voxel order (e.g. an sCT written LPS beside a RAS CT); EvaluateError if not."""
  reordered = orientation.onto_grid_of(ct, vol)
  if reordered is not None:
    return reordered
  if sorted(vol.shape) != sorted(ct.shape):
    raise EvaluateError(f'{vol.path}: {what} has shape {vol.shape}, its CT {ct.path} has '
                        f'{ct.shape}; resample it to the CT\'s grid')
  raise EvaluateError(f'{vol.path}: {what} is not on the grid of its CT {ct.path} (shape '
                      f'{vol.shape} vs {ct.shape}, orientation {orientation.axcodes(vol.affine)}'
                      f' vs {orientation.axcodes(ct.affine)}, even after reordering the axes); '
                      'write it in the CT\'s geometry')


# Inside the body an sCT in HU has its median in soft tissue and some fat below -20 HU; an MR
# (or HU rescaled to [0, 1] or 8 bits) has neither. No rule on air: an sCT multiplied by the
# body mask (background 0) or cropped to the body is a legitimate sCT.
SCT_MEDIAN_HU = (-500.0, 500.0)
SCT_FAT_HU = -20.0
SCT_MIN_FAT_FRACTION = 0.005


def check_sct_is_hu(sct: volume_lib.Volume, body: np.ndarray) -> None:
  """Raises EvaluateError unless the sCT's voxels inside `body` look like Hounsfield units."""
  inside = sct.array[body]
  median = float(np.median(inside))
  fat = float(np.mean(inside < SCT_FAT_HU))
  if not SCT_MEDIAN_HU[0] < median < SCT_MEDIAN_HU[1] or fat < SCT_MIN_FAT_FRACTION:
    raise EvaluateError(
        f'{sct.path}: does not look like Hounsfield units inside the body (median '
        f'{median:.4g}, {fat:.1%} of it below {SCT_FAT_HU:g}; an sCT in HU has soft tissue near '
        '0-100 and fat near -100): an MR, or HU rescaled?')


def score_patient(files: dict[str, str | None]) -> dict[str, Any]:
  """The row of one patient: its files, mask_voxels and the SynthRAD metrics.

  Raises:
    EvaluateError / volume_lib.VolumeError: one line naming the file.
  """
  ct = volume_lib.read_volume(files['ct'])
  intensity.check_ct_is_hu(ct.array, ct.path)
  if min(ct.shape) < synthrad.SSIM_WIN_SIZE:
    raise EvaluateError(f'{ct.path}: shape {ct.shape}; the SynthRAD SSIM needs at least '
                        f'{synthrad.SSIM_WIN_SIZE} voxels along every axis')
  sct = volume_lib.read_volume(files['sct'])
  sct = _on_ct_grid(sct, ct, 'sCT')
  if files['mask'] is None:
    mask = mask_lib.body_mask(ct.array, modality='ct')
    if not mask.any():
      raise EvaluateError(f'{ct.path}: empty body mask (no voxel above '
                          f'{mask_lib.CT_BODY_THRESHOLD_HU} HU); pass --mask_dir')
  else:
    mask_vol = volume_lib.read_volume(files['mask'])
    mask_vol = _on_ct_grid(mask_vol, ct, 'mask')
    mask = mask_vol.array > 0
    if not mask.any():
      raise EvaluateError(f'{mask_vol.path}: empty mask (no voxel > 0)')
  check_sct_is_hu(sct, mask)
  return {'sct_file': files['sct'], 'ct_file': files['ct'],
          'mask_file': files['mask'] or BODY_MASK, 'mask_voxels': int(mask.sum()),
          **synthrad.synthrad_metrics(ct.array, sct.array, mask)}


def evaluate_folder(sct_dir: str, ct_dir: str, mask_dir: str | None, output_dir: str, *,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Scores every sCT of `sct_dir` against its CT and writes the reports into `output_dir`.

  Returns:
    The summary (also in summary.json): metric -> stats, patients, the folders, fingerprint,
    and the Markdown table ('summary_markdown'), which is also printed.

  Raises:
    EvaluateError / volume_lib.VolumeError / reports.ReportError: one line naming the file.
  """
  output_dir = os.path.abspath(output_dir)
  atomic.check_apart(output_dir, {'--sct_dir': sct_dir, '--ct_dir': ct_dir,
                                  '--mask_dir': mask_dir}, inside_ok=True, error=EvaluateError)
  reports.check_output_dir(output_dir, overwrite, OWN_FILE)
  patients = match(sct_dir, ct_dir, mask_dir)
  rows = []
  for pid, files in tqdm.tqdm(patients.items(), desc='synthrad', unit='volume',
                              disable=not progress):
    rows.append({'patient_id': pid, **score_patient(files)})
  mask_source = 'mask_dir' if mask_dir else BODY_MASK
  fp = fingerprint_lib.files_fingerprint(
      'sct_dir', {pid: [f for f in (files['ct'], files['mask']) if f]
                  for pid, files in patients.items()}, {'mask': mask_source})
  keys = list(synthrad.METRIC_KEYS)
  notes = ['SynthRAD2023 task-1 metrics as the challenge\'s image_metrics.py computes them, on '
           'the CT\'s own grid: MAE in HU inside the mask (unclipped); PSNR and SSIM after '
           'clipping to [-1024, 3000] HU, data range 4024; SSIM 3-D (7x7x7 uniform window) '
           'after the +1024 shift, its map averaged over the mask after a 3-voxel crop.',
           'Mask: ' + ('the files of ' + mask_dir if mask_dir else
                       'the body mask of each CT (> -500 HU, largest component, holes filled)')
           + '.']
  markdown = reports.summary_markdown(rows, keys, title=f'SynthRAD2023 metrics of {sct_dir}',
                                      notes=notes)
  stats = reports.summarize(rows, keys)
  summary = {'source': os.path.abspath(sct_dir), 'kind': 'sct_dir',
             'ct_dir': os.path.abspath(ct_dir),
             'mask_dir': os.path.abspath(mask_dir) if mask_dir else None,
             'output_dir': output_dir, 'fingerprint': fp, 'num_volumes': len(rows),
             'patients': [r['patient_id'] for r in rows],
             'metrics': {k: {**stats[k].to_json(), 'label': reports.METRICS[k].label,
                             'unit': reports.METRICS[k].unit} for k in keys},
             'summary_markdown': markdown}
  with reports.atomic_output_dir(output_dir, overwrite, OWN_FILE) as tmp:
    reports.write_csv(os.path.join(tmp, 'per_volume.csv'), rows, PER_VOLUME_FIELDS)
    reports.write_json(os.path.join(tmp, 'per_volume.json'), reports.rows_to_json(rows))
    atomic.write_text(os.path.join(tmp, 'summary.md'), markdown)
    reports.write_json(os.path.join(tmp, 'summary.json'), summary)
  print(markdown, flush=True)
  print(f'Evaluation written to {output_dir}', flush=True)
  return summary
