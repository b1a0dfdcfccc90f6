"""Per-patient preprocessing for `mr2ct_jax.data.prepare`: input folders to network slices.

Listing a folder's volumes, grouping `<id>_<role>` files of the labeled / paired folders,
and for one patient: read (NIfTI or DICOM) -> [N4 for MR] -> canonical network grid
(slices of `Settings.plane`, at `spacing_mm`, `image_size`) -> body mask -> MR normalisation or the
check that a CT is in Hounsfield units; label maps and masks resampled without blurring.
A single unusable input raises `Skipped` ('PATH: reason'): prepare warns and goes on in a
training split and stops in an evaluation split (`evaluation_refusal`).
"""

import dataclasses
import os
from typing import Callable

import numpy as np

from mr2ct_jax.data import intensity
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import dataset
from mr2ct_jax.data import dicom
from mr2ct_jax.data import orientation
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.data.dataset import DatasetError

# Order in which splits are listed and prepared: evaluation splits first (dataset.EVAL_SPLITS),
# then the training splits.
SPLIT_ORDER = ('test', 'val', 'test_mr', 'test_ct', 'labeled_mr', 'train_mr', 'train_ct',
               'labeled')
# The command-line flag of each split's folder (named in errors).
SPLIT_FLAG = {'train_mr': 'mr_dir', 'train_ct': 'ct_dir', 'labeled': 'labeled_dir',
              'test': 'paired_dir', 'val': 'val_dir', 'test_mr': 'test_mr_dir',
              'test_ct': 'test_ct_dir', 'labeled_mr': 'labeled_mr_dir'}
# Roles of the files in the labeled / paired folders, by name suffix (<id>_<role>):
# split -> (required roles, optional roles). The other splits hold one volume per patient.
ROLES = {'labeled': (('ct', 'label'), ()), 'test': (('mr', 'ct'), ('mask', 'label')),
         'val': (('mr', 'ct'), ('mask', 'label')), 'labeled_mr': (('mr', 'label'), ())}
# What the single volume of a one-volume-per-patient split is.
SINGLE_MODALITY = {'train_mr': 'mr', 'train_ct': 'ct', 'test_mr': 'mr', 'test_ct': 'ct'}
# Evaluation splits that may share subjects (an unpaired test MR and a labeled MR of the same
# patient are both test data); the validation subjects are kept apart from the test subjects
# too, since they steer training.
_EVAL_OVERLAP_ALLOWED = ('test', 'test_mr', 'test_ct', 'labeled_mr')
Inputs = dict[str, dict[str, dict[str, str]]]  # split -> patient id -> role -> path


@dataclasses.dataclass(frozen=True)
class Settings:
  """Preprocessing values (recorded in dataset_meta.json)."""
  spacing_mm: float
  image_size: int
  mr_percentile: float
  n4: bool
  plane: str = 'axial'  # slice plane (preprocess.PLANE_AXES)


class Skipped(Exception):
  """A single input cannot be used (unreadable, not in HU, a label map or mask off its
  image's grid...); the message is 'PATH: reason'."""


# ---------------------------------------------------------------------------------------
# Listing inputs.


def list_entries(folder: str, flag: str) -> list[str]:
  """All candidate volumes of a folder (every visible entry; bad ones are skipped later)."""
  if not os.path.exists(folder):
    raise DatasetError(f'{folder}: no such folder (--{flag})')
  if not os.path.isdir(folder):
    raise DatasetError(f'{folder}: not a folder (--{flag})')
  names = sorted(n for n in os.listdir(folder) if not n.startswith('.'))
  if not names:
    raise DatasetError(f'{folder}: empty folder (--{flag}); expected NIfTI files or DICOM '
                       'series folders')
  paths = [os.path.join(folder, n) for n in names]
  # A folder that directly holds one DICOM series (no NIfTI, no sub-folders) is one volume.
  if dicom.is_dicom_dir(folder) and not any(
      volume_lib.is_nifti_path(p) or os.path.isdir(p) for p in paths):
    return [folder]
  return paths


def group_roles(paths: list[str], split: str,
                warn: Callable[[str], None]) -> dict[str, dict[str, str]]:
  """Groups `<id>_<role>` files of a labeled/paired folder: id -> {role: path}."""
  required, optional = ROLES[split]
  groups: dict[str, dict[str, str]] = {}
  for path in paths:
    pid, _, role = volume_lib.volume_id(path).rpartition('_')
    if not pid or role.lower() not in required + optional:
      warn(f'{path}: name is not <id>_<role> with role in {list(required + optional)}; '
           'skipped')
      continue
    if role.lower() in groups.setdefault(pid, {}):
      warn(f'{path}: duplicate {role} for patient {pid!r} '
           f'(also {groups[pid][role.lower()]}); skipped')
      continue
    groups[pid][role.lower()] = path
  complete = {}
  for pid, files in groups.items():
    missing = [r for r in required if r not in files]
    if missing:
      for path in files.values():
        warn(f'{path}: patient {pid!r} has no {"/".join(missing)} file '
             f'(<id>_{missing[0]}.nii.gz); skipped')
      continue
    complete[pid] = files
  return complete


# ---------------------------------------------------------------------------------------
# Preprocessing of one patient.


def read(path: str, allow_large: bool = False) -> volume_lib.Volume:
  """Reads a volume; an unreadable one is Skipped."""
  try:
    return volume_lib.read_volume(path, allow_large)
  except volume_lib.VolumeError as e:
    raise Skipped(str(e)) from e


def preprocess_mr(vol: volume_lib.Volume, s: Settings) -> tuple[np.ndarray, np.ndarray,
                                                                preprocess.SliceGeometry]:
  """MR -> (normalised slices, body mask uint8, geometry); rejects a CT given as MR."""
  intensity.check_mr_is_not_hu(vol.array, vol.path)
  if s.n4:
    vol = preprocess.n4_correct(vol)
  slices, geom = preprocess.to_network_grid(vol, s.spacing_mm, s.image_size, plane=s.plane)
  # The largest piece only: these masks also score the paired test subjects (mask docstring).
  body = mask_lib.body_mask(slices, modality='mr', slice_axis=0, pieces=False)
  if not body.any():
    raise Skipped(f'{vol.path}: empty body mask (blank MR?)')
  slices = intensity.normalise_mr(slices, body, s.mr_percentile, path=vol.path)
  return slices, body.astype(np.uint8), geom


def preprocess_ct(vol: volume_lib.Volume, s: Settings) -> tuple[np.ndarray, np.ndarray,
                                                                preprocess.SliceGeometry]:
  """CT -> (slices in HU, body mask uint8, geometry); rejects CTs that are not in HU."""
  intensity.check_ct_is_hu(vol.array, vol.path)
  slices, geom = preprocess.to_network_grid(vol, s.spacing_mm, s.image_size, plane=s.plane)
  body = mask_lib.body_mask(slices, modality='ct', slice_axis=0)
  if not body.any():
    raise Skipped(f'{vol.path}: empty body mask (no voxel above '
                  f'{mask_lib.CT_BODY_THRESHOLD_HU} HU)')
  return slices, body.astype(np.uint8), geom


def preprocess_labels(vol: volume_lib.Volume, s: Settings) -> np.ndarray:
  """Label map -> uint8 slices; resampled one-hot per label (linear) + argmax, not blurred."""
  values = np.rint(vol.array).astype(np.int64)
  if np.any(np.abs(vol.array - values) > 1e-3) or values.min() < 0 or values.max() > 255:
    raise Skipped(f'{vol.path}: a label map must hold integers in [0, 255]')
  labels = [int(v) for v in np.unique(values) if v != 0]
  channels = []
  for value in [0] + labels:
    onehot = volume_lib.Volume((values == value).astype(np.float32), vol.affine, vol.path)
    pad = 1.0 if value == 0 else 0.0  # outside the volume is background
    channels.append(preprocess.to_network_grid(onehot, s.spacing_mm, s.image_size, pad,
                                               s.plane)[0])
  lut = np.asarray([0] + labels, np.uint8)
  return lut[np.argmax(np.stack(channels), axis=0)]


def preprocess_binary(vol: volume_lib.Volume, s: Settings) -> np.ndarray:
  """Binary mask volume -> uint8 slices (linear resampling, threshold at 0.5)."""
  grid = preprocess.to_network_grid(
      volume_lib.Volume((vol.array > 0).astype(np.float32), vol.affine, vol.path),
      s.spacing_mm, s.image_size, 0.0, s.plane)[0]
  return (grid >= 0.5).astype(np.uint8)


def grid_mismatch(reference: volume_lib.Volume, other: volume_lib.Volume) -> str | None:
  """How `other`'s grid differs from `reference`'s ('shape A vs B' or how far the affines
  differ), or None when they share shape and affine (to `orientation.GRID_ATOL_MM`)."""
  if other.array.shape != reference.array.shape:
    return f'shape {other.array.shape} vs {reference.array.shape}'
  if not np.allclose(other.affine, reference.affine, atol=orientation.GRID_ATOL_MM):
    gap = float(np.max(np.abs(np.asarray(other.affine) - np.asarray(reference.affine))))
    return f'same shape, affines differ by up to {gap:.4g} (mm or direction cosines)'
  return None


def on_grid_of(reference: volume_lib.Volume, other: volume_lib.Volume, needs: str,
               what: str = '') -> volume_lib.Volume:
  """`other` on `reference`'s grid: itself, or its voxels reordered when it is the same world
  grid stored in another axis order (e.g. an LPS CT beside its RAS MR; logged).

  Raises:
    Skipped: a grid that differs in the world, naming `other` as `what` (e.g. 'label map')
      and saying what it `needs`.
  """
  reordered = orientation.onto_grid_of(reference, other)
  if reordered is None:
    raise Skipped(f'{other.path}: {what + " is " if what else ""}not on the grid of '
                  f'{reference.path} ({grid_mismatch(reference, other)}); {needs}')
  return reordered


def check_same_grid(a: volume_lib.Volume, b: volume_lib.Volume) -> volume_lib.Volume:
  """`b` on the grid of `a` (the MR): see `on_grid_of`; Skipped if it is not."""
  return on_grid_of(a, b, 'a paired CT must be registered and resampled to its MR')


def ct_fov(ct_slices: np.ndarray, plane: str = 'axial') -> np.ndarray:
  """bool, broadcastable to the slices: the S levels where the registered CT has any tissue.

  A CT's field of view is shorter along the patient's S axis; outside it the registered CT
  holds only air/padding (-1024), so MR-vs-CT errors there would measure the missing data,
  not the synthesis. Axial slices: whole slices [N,1,1]; coronal and sagittal slices: rows
  of their S axis (in-plane axis 1) [1,1,S].
  """
  axes = preprocess.check_plane(plane)
  s_axis = (axes[2], axes[0], axes[1]).index(2)  # the S axis in the [N, H, W] stack
  others = tuple(a for a in range(3) if a != s_axis)
  tissue = (ct_slices > mask_lib.CT_BODY_THRESHOLD_HU).any(axis=others)
  shape = [1, 1, 1]
  shape[s_axis] = tissue.shape[0]
  return tissue.reshape(shape)


def process_patient(split: str, files: dict[str, str], s: Settings,
                    allow_large: bool = False) -> tuple[
    dict[str, np.ndarray], preprocess.SliceGeometry]:
  """Preprocesses one patient of `split`; files: role -> path ('image' for one-volume splits).

  The arrays per split are those listed in `dataset` (TRAIN_SPLITS / EVAL_SPLITS).
  """
  if split in SINGLE_MODALITY:
    process = preprocess_mr if SINGLE_MODALITY[split] == 'mr' else preprocess_ct
    image, body, geom = process(read(files['image'], allow_large), s)
    return {'image': image, 'mask': body}, geom
  if split in ('labeled', 'labeled_mr'):
    role = 'ct' if split == 'labeled' else 'mr'
    image_vol, label_vol = read(files[role], allow_large), read(files['label'], allow_large)
    label_vol = on_grid_of(image_vol, label_vol, 'resample it to its image',
                           'label map')
    process = preprocess_ct if split == 'labeled' else preprocess_mr
    image, body, geom = process(image_vol, s)
    return {'image': image, 'mask': body, 'label': preprocess_labels(label_vol, s)}, geom
  # test / val: MR + registered CT (+ body mask, labels) on the MR grid.
  mr_vol, ct_vol = read(files['mr'], allow_large), read(files['ct'], allow_large)
  ct_vol = check_same_grid(mr_vol, ct_vol)
  image, body, geom = preprocess_mr(mr_vol, s)
  paired, _, _ = preprocess_ct(ct_vol, s)
  arrays = {'image': image, 'paired': paired}
  if 'mask' in files:
    mask_vol = read(files['mask'], allow_large)
    mask_vol = on_grid_of(mr_vol, mask_vol, 'resample it to its MR', 'body mask')
    body = preprocess_binary(mask_vol, s)
  arrays['mask'] = (body.astype(bool) & ct_fov(paired, s.plane)).astype(np.uint8)
  if not arrays['mask'].any():
    raise Skipped(f'{files.get("mask", files["mr"])}: empty evaluation mask (no voxel of the '
                  'body inside the CT\'s field of view)')
  if 'label' in files:
    label_vol = read(files['label'], allow_large)
    label_vol = on_grid_of(mr_vol, label_vol, 'resample it to its MR', 'label map')
    arrays['label'] = preprocess_labels(label_vol, s)
  return arrays, geom


def _volumes_only(paths: list[str], warn: Callable[[str], None]) -> list[str]:
  """The NIfTI files and folders (DICOM series) among `paths`; the rest (a dcm2niix .json
  sidecar, a README, loose DICOM files beside other volumes, as `volume.list_volumes` ignores
  them) is skipped with a warning, even in an evaluation folder."""
  kept = []
  for path in paths:
    if volume_lib.is_nifti_path(path) or os.path.isdir(path):
      kept.append(path)
    else:
      warn(f'{path}: not a volume (expected .nii, .nii.gz or a DICOM series folder); skipped')
  return kept


def _list_split(split: str, folder: str, warn: Callable[[str], None]
                ) -> dict[str, dict[str, str]]:
  """patient id -> role -> path of one split's folder.

  In an evaluation split, a problem with a volume (misnamed, a duplicate, a subject missing
  a file) raises DatasetError (`evaluation_refusal`); files that are not volumes are skipped.
  """
  paths = list_entries(os.fspath(folder), SPLIT_FLAG[split])
  if split in dataset.EVAL_SPLITS:
    paths = _volumes_only(paths, warn)
    if not paths:
      raise DatasetError(f'{folder}: holds no NIfTI file or DICOM series folder '
                         f'(--{SPLIT_FLAG[split]})')
    warn = _refuse(split)
  if split in ROLES:
    return group_roles(paths, split, warn)
  groups: dict[str, dict[str, str]] = {}
  for path in paths:
    pid = volume_lib.volume_id(path)
    if pid in groups:
      warn(f'{path}: duplicate patient id {pid!r} (also {groups[pid]["image"]}); skipped')
      continue
    groups[pid] = {'image': path}
  return groups


def evaluation_refusal(split: str, line: str) -> str:
  """The error for an unusable file of an evaluation split: 'PATH: reason (--flag: ...)'.

  Training splits skip such a file with a warning; an evaluation split stops instead, so the
  scores are always of the subjects the user gave (a dropped one would change them quietly).
  """
  return (f'{line.removesuffix("; skipped")} (--{SPLIT_FLAG[split]}: an evaluation subject is '
          'never left out; fix or remove it)')


def _check_apart(inputs: Inputs) -> None:
  """Raises DatasetError if an evaluation subject is also a training subject (or a
  validation subject also a test subject): scores on it would not be held out."""
  first = lambda split, pid: next(iter(inputs[split][pid].values()))
  for eval_split in dataset.EVAL_SPLITS:
    others = list(dataset.TRAIN_SPLITS)
    if eval_split == 'val':
      others += list(_EVAL_OVERLAP_ALLOWED)
    for pid in sorted(inputs.get(eval_split, {})):
      for other in others:
        if pid in inputs.get(other, {}):
          raise DatasetError(
              f'{first(eval_split, pid)}: patient {pid!r} of the {eval_split!r} split '
              f'(--{SPLIT_FLAG[eval_split]}) is also in {other!r} ({first(other, pid)}, '
              f'--{SPLIT_FLAG[other]}); evaluation subjects must not be used for training'
              + (' or testing' if eval_split == 'val' else ''))


def _refuse(split: str) -> Callable[[str], None]:
  """A `warn` for an evaluation split's listing: each problem raises DatasetError."""
  def refuse(line: str) -> None:
    raise DatasetError(evaluation_refusal(split, line))
  return refuse


def collect_inputs(dirs: dict[str, str | None], warn: Callable[[str], None]) -> Inputs:
  """The patients of each split's folder, evaluation subjects checked apart from training.

  Training splits may share patients (CycleGAN training is unpaired; a labeled CT may also be
  an unlabeled one; an MR and a CT of one patient may both train). A subject of an evaluation
  split (test, test_mr, test_ct, labeled_mr, val) must not appear in a training split, and a
  validation subject in no test split; patients are matched by id.

  Args:
    dirs: split -> folder (None: the split is not prepared).
    warn: called with 'PATH: reason' for every training file that is skipped.

  Returns:
    split -> patient id -> role -> path ('image' for one-volume splits).

  Raises:
    DatasetError: a given folder is missing or empty; an evaluation subject is also in a
      training split (one line naming both files); a file of an evaluation split that is
      misnamed, a duplicate, or a subject missing a required file.
  """
  unknown = sorted(set(dirs) - set(SPLIT_ORDER))
  if unknown:
    raise DatasetError(f'unknown split(s) {unknown}; expected some of {SPLIT_ORDER}')
  inputs: Inputs = {}
  for split in SPLIT_ORDER:
    if dirs.get(split):
      groups = _list_split(split, dirs[split], warn)
      if groups:
        inputs[split] = groups
  _check_apart(inputs)
  return inputs
