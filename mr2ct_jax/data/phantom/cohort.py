"""The phantom cohort: subjects per set, rendered and written as NIfTI folders (`generate`).

Layout written under OUT (NIfTI, correct affines):
  mr/<id>.nii.gz             T1-like MR, uint16, 256x256 at 1.25 mm, stored LAS
  ct/<id>.nii.gz             CT in HU, int16, 224x224 over a 330-360 mm FOV, stored LPS
  labeled/<id>_ct.nii.gz     CT of further subjects ...
  labeled/<id>_label.nii.gz  ... and their label maps (uint8, LABELS) on the CT grid
  paired/<id>_mr.nii.gz      paired test subjects: MR,
  paired/<id>_ct.nii.gz      the same subject's CT rendered on the MR grid (exactly registered;
                             same shape and affine as the MR),
  paired/<id>_mask.nii.gz    body mask AND the CT's field of view (uint8),
  paired/<id>_label.nii.gz   label map on the MR grid
  val/<id>_{mr,ct,mask,label}.nii.gz   validation subjects, as paired/
  test_mr/<id>.nii.gz        unpaired test MR, as mr/
  test_ct/<id>.nii.gz        unpaired test CT, as ct/
  labeled_mr/<id>_mr.nii.gz  MR of further subjects ...
  labeled_mr/<id>_label.nii.gz  ... and their label maps on the MR grid (no CT)
  subjects.json              seed, counts and the ids of each set
Each set uses its own subjects (MR and CT training subjects are disjoint); the sets after
paired/ take the next subject indices, so adding them leaves the earlier sets unchanged.
Like a real pair (the paper's Fig. 3), the paired CT covers a slightly shorter range than the MR: its top
slices are outside the CT's field of view and hold -1024 HU; the mask excludes them, so
evaluation against the registered CT only counts voxels that both images cover.

Every volume has `num_slices` axial slices spanning about 120-150 mm from the iliac crest to
the proximal femoral shaft (the slice spacing adapts). Subjects differ in body size, fat
thickness, bone sizes and positions, hip pose, bladder filling and bowel gas; everything is
deterministic from the seed (each subject and image has its own numpy Generator).
"""

from concurrent import futures
import json
import os

import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax.data.phantom import anatomy
from mr2ct_jax.data.phantom import render
from mr2ct_jax.data import volume

LABELS = anatomy.LABELS
MR_SIZE, MR_SPACING = 256, 1.25   # the paper's MR grid: 320 mm field of view
CT_SIZE = 224
_STREAMS = {'anatomy': 0, 'mr_grid': 1, 'ct_grid': 2, 'mr': 3, 'ct': 4}


def subject_id(index: int) -> str:
  """The file id of subject `index`."""
  return f'phantom{index:03d}'


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
  return np.random.default_rng([seed, index, _STREAMS[stream]])


def subject(seed: int, index: int) -> anatomy.Subject:
  """Subject `index` of the phantom with `seed`."""
  return anatomy.sample_subject(_rng(seed, index, 'anatomy'), index)


def mr_grid(s: anatomy.Subject, seed: int, num_slices: int) -> render.Grid:
  """The MR grid of a subject: 256x256 at 1.25 mm, LAS storage order."""
  rng = _rng(seed, s.index, 'mr_grid')
  extent = rng.uniform(125, 145)
  centre = [rng.uniform(-5, 5), s.body[2] + rng.uniform(-5, 5),
            s.top_z + rng.uniform(-3, 3) - extent / 2]
  return render.axial_grid('LAS', MR_SIZE, MR_SPACING, num_slices, extent / num_slices, centre)


def ct_grid(s: anatomy.Subject, seed: int, num_slices: int) -> render.Grid:
  """The CT grid of a subject: 224x224 over a 330-360 mm field of view, LPS storage order."""
  rng = _rng(seed, s.index, 'ct_grid')
  extent = rng.uniform(120, 150)
  centre = [rng.uniform(-8, 8), s.body[2] + rng.uniform(-8, 8),
            s.top_z + rng.uniform(-3, 3) - extent / 2]
  return render.axial_grid('LPS', CT_SIZE, rng.uniform(330, 360) / CT_SIZE, num_slices,
                           extent / num_slices, centre)


def _check_args(counts: dict[str, int], num_slices: int, seed: int) -> None:
  for name, value in {**counts, 'num_slices': num_slices, 'seed': seed}.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f'phantom: {name} must be a non-negative integer, got {value!r}')
  if num_slices < 2:
    raise ValueError(f'phantom: num_slices must be >= 2, got {num_slices}')


def write_subject(folder: str, split: str, s: anatomy.Subject, seed: int,
                   num_slices: int) -> None:
  """Renders and writes one subject's files for `split` into `folder`."""
  sid = subject_id(s.index)
  if split in ('mr', 'test_mr', 'labeled_mr'):
    grid = mr_grid(s, seed, num_slices)
    tissue, _ = render.tissue_volume(s, grid)
    mr = render.mr_image(tissue, grid, _rng(seed, s.index, 'mr'))
    if split != 'labeled_mr':
      volume.write_nifti(os.path.join(folder, split, f'{sid}.nii.gz'), mr, grid.affine,
                         np.uint16)
    else:
      volume.write_nifti(os.path.join(folder, split, f'{sid}_mr.nii.gz'), mr, grid.affine,
                         np.uint16)
      volume.write_nifti(os.path.join(folder, split, f'{sid}_label.nii.gz'),
                         render.label_map(tissue), grid.affine, np.uint8)
  elif split in ('ct', 'test_ct', 'labeled'):
    grid = ct_grid(s, seed, num_slices)
    tissue, _ = render.tissue_volume(s, grid)
    ct = render.ct_image(tissue, _rng(seed, s.index, 'ct'))
    if split != 'labeled':
      volume.write_nifti(os.path.join(folder, split, f'{sid}.nii.gz'), ct, grid.affine,
                         np.int16)
    else:
      volume.write_nifti(os.path.join(folder, 'labeled', f'{sid}_ct.nii.gz'), ct, grid.affine,
                         np.int16)
      volume.write_nifti(os.path.join(folder, 'labeled', f'{sid}_label.nii.gz'),
                         render.label_map(tissue), grid.affine, np.uint8)
  else:  # paired / val: everything on the MR grid
    grid = mr_grid(s, seed, num_slices)
    tissue, body = render.tissue_volume(s, grid)
    mr = render.mr_image(tissue, grid, _rng(seed, s.index, 'mr'))
    ct = render.ct_image(tissue, _rng(seed, s.index, 'ct'))
    # The CT's field of view ends a little below the MR's top (about 1 slice in 12).
    in_fov = np.arange(num_slices) < num_slices - max(1, round(num_slices / 12))
    if grid.affine[2, 2] < 0:  # slices stored top first
      in_fov = in_fov[::-1]
    ct[:, :, ~in_fov] = render.CT_FILL
    mask = body & in_fov[None, None, :]
    out = os.path.join(folder, split, sid)
    volume.write_nifti(f'{out}_mr.nii.gz', mr, grid.affine, np.uint16)
    volume.write_nifti(f'{out}_ct.nii.gz', ct, grid.affine, np.int16)
    volume.write_nifti(f'{out}_mask.nii.gz', mask.astype(np.uint8), grid.affine, np.uint8)
    volume.write_nifti(f'{out}_label.nii.gz', render.label_map(tissue), grid.affine, np.uint8)


# The sets in subject-index order (the first four are the original phantom's) and the
# `generate` argument of each set's size.
SETS = (('mr', 'num_train_mr'), ('ct', 'num_train_ct'), ('labeled', 'num_labeled'),
        ('paired', 'num_test'), ('val', 'num_val'), ('test_mr', 'num_test_mr'),
        ('test_ct', 'num_test_ct'), ('labeled_mr', 'num_labeled_mr'))


def split_indices(num_train_mr: int, num_train_ct: int, num_labeled: int,
                  num_test: int, num_val: int = 0, num_test_mr: int = 0,
                  num_test_ct: int = 0, num_labeled_mr: int = 0) -> dict[str, list[int]]:
  """Subject indices of each set (`SETS` order): consecutive and disjoint; empty sets left out."""
  counts = dict(zip([name for name, _ in SETS],
                    (num_train_mr, num_train_ct, num_labeled, num_test, num_val, num_test_mr,
                     num_test_ct, num_labeled_mr)))
  out, start = {}, 0
  for name, n in counts.items():
    if n or name in ('mr', 'ct', 'labeled', 'paired'):
      out[name] = list(range(start, start + n))
    start += n
  return out


def generate(out_dir: str, num_train_mr: int, num_train_ct: int, num_labeled: int,
             num_test: int, num_slices: int, seed: int, overwrite: bool = False, *,
             num_val: int = 0, num_test_mr: int = 0, num_test_ct: int = 0,
             num_labeled_mr: int = 0) -> None:
  """Writes the phantom data set (layout in the module docstring) to `out_dir`.

  Everything is written to a temporary folder beside `out_dir` and renamed when complete.

  Args:
    out_dir: destination; must not exist or be empty, unless `overwrite`.
    num_train_mr, num_train_ct: unpaired training subjects per modality (disjoint).
    num_labeled: CT subjects with label maps.
    num_test: paired test subjects (MR, registered CT, mask, labels).
    num_slices: axial slices per volume.
    seed: the data set is a deterministic function of the arguments.
    overwrite: replace a non-empty `out_dir`.
    num_val: paired validation subjects (as the test subjects); 0: no val/ folder.
    num_test_mr, num_test_ct: unpaired test MR / CT subjects; 0: no folder.
    num_labeled_mr: MR subjects with label maps on the MR grid; 0: no folder.

  Raises:
    ValueError: bad counts; FileExistsError: `out_dir` is not empty and not `overwrite`.
  """
  extra = {'num_val': num_val, 'num_test_mr': num_test_mr, 'num_test_ct': num_test_ct,
           'num_labeled_mr': num_labeled_mr}
  _check_args({'num_train_mr': num_train_mr, 'num_train_ct': num_train_ct,
               'num_labeled': num_labeled, 'num_test': num_test, **extra}, num_slices, seed)
  splits = split_indices(num_train_mr, num_train_ct, num_labeled, num_test, **extra)
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir):
      raise FileExistsError(f'{out_dir}: exists and is not a folder')
    if os.listdir(out_dir) and not overwrite:
      raise FileExistsError(f'{out_dir}: not empty (pass overwrite=True / --overwrite)')
  with atomic.building_dir(out_dir) as tmp:
    for name in splits:
      os.makedirs(os.path.join(tmp, name))
    # Subjects are independent (own generators), so threads keep the output deterministic;
    # numpy and zlib release the GIL for the heavy parts.
    with futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
      jobs = [pool.submit(write_subject, tmp, name, subject(seed, index), seed, num_slices)
              for name, indices in splits.items() for index in indices]
      try:
        for job in jobs:
          job.result()
      except BaseException:  # a failure or SIGTERM: do not build the subjects still queued
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    meta = {'seed': int(seed), 'num_slices': int(num_slices),
            'labels': {str(k): v for k, v in LABELS.items()},
            'subjects': {k: [subject_id(i) for i in v] for k, v in splits.items()}}
    with open(os.path.join(tmp, 'subjects.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1)
