"""Tiny synthetic MR / CT / label volumes in the `prepare` folder layout (for data tests).

Bodies are ellipses (constant intensity, so values survive resampling exactly in the
interior); CT volumes are stored in LPS orientation and MR in RAS, with different spacings,
so the canonical reorientation and resampling are exercised.
"""

import os

import nibabel as nib
import numpy as np

SHAPE = (40, 36, 5)
MR_SPACING = (4.0, 4.0, 5.0)
CT_SPACING = (5.0, 5.0, 6.0)
CT_BODY_HU = 40.0


def _ellipse(shape, seed):
  rng = np.random.default_rng(seed)
  x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing='ij')
  a, b = 0.65 + 0.1 * rng.random(), 0.55 + 0.1 * rng.random()
  return np.repeat(((x / a) ** 2 + (y / b) ** 2 < 1)[:, :, None], shape[2], axis=2)


def affine(spacing, lps=False):
  """A diagonal affine; LPS flips the first two axes (as DICOM-derived NIfTI often are)."""
  sign = (-1.0, -1.0, 1.0) if lps else (1.0, 1.0, 1.0)
  return np.diag([s * g for s, g in zip(spacing, sign)] + [1.0])


def write(path, array, aff, dtype=np.float32):
  """Writes a NIfTI file."""
  nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), aff), path)


def mr_array(seed, shape=SHAPE):
  """MR-like volume: dark background, body 200 with a brighter band (uint16 values)."""
  body = _ellipse(shape, seed)
  mr = body * 200.0
  mr[shape[0] // 3:shape[0] // 2] *= 1.5
  return mr


def ct_array(seed, shape=SHAPE):
  """CT in HU: air -1000, body 40 HU, a 'bone' block of 700 HU."""
  body = _ellipse(shape, seed)
  ct = np.where(body, CT_BODY_HU, -1000.0)
  ct[shape[0] // 2 - 3:shape[0] // 2 + 3, shape[1] // 2 - 3:shape[1] // 2 + 3] = 700.0
  return ct


def make(root, num_mr=2, num_ct=3, num_labeled=1, num_test=1):
  """Writes root/{mr,ct,labeled,paired}; returns the four folder paths."""
  dirs = [os.path.join(root, d) for d in ('mr', 'ct', 'labeled', 'paired')]
  for d in dirs:
    os.makedirs(d, exist_ok=True)
  for i in range(num_mr):
    write(f'{dirs[0]}/mr{i}.nii.gz', mr_array(i), affine(MR_SPACING), np.uint16)
  for i in range(num_ct):
    write(f'{dirs[1]}/ct{i}.nii.gz', ct_array(10 + i), affine(CT_SPACING, lps=True), np.int16)
  for i in range(num_labeled):
    ct = ct_array(20 + i)
    label = np.zeros(SHAPE, np.uint8)
    label[ct == 700.0] = 1
    label[5:10, 14:22] = 2
    write(f'{dirs[2]}/lab{i}_ct.nii.gz', ct, affine(CT_SPACING, lps=True), np.int16)
    write(f'{dirs[2]}/lab{i}_label.nii.gz', label, affine(CT_SPACING, lps=True), np.uint8)
  for i in range(num_test):
    mr, ct = mr_array(30 + i), ct_array(30 + i)
    ct[:, :, -1] = -1024.0  # the CT's field of view ends one slice early
    write(f'{dirs[3]}/t{i}_mr.nii.gz', mr, affine(MR_SPACING), np.float32)
    write(f'{dirs[3]}/t{i}_ct.nii.gz', ct, affine(MR_SPACING), np.int16)
    write(f'{dirs[3]}/t{i}_mask.nii.gz', mr > 0, affine(MR_SPACING), np.uint8)
    write(f'{dirs[3]}/t{i}_label.nii.gz', (ct == 700.0), affine(MR_SPACING), np.uint8)
  return dirs


def write_dicom_ct(folder, array_hu, spacing=CT_SPACING, series_uid='1.2.826.0.1.3680043.2.1125.7'):
  """Writes a CT (HU, [X, Y, Z] array) as a DICOM series folder, one file per slice."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  image = sitk.GetImageFromArray(np.transpose(np.asarray(array_hu, np.int16), (2, 1, 0)))
  image.SetSpacing([float(s) for s in spacing])
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  for k in range(image.GetDepth()):
    sl = image[:, :, k]
    position = image.TransformIndexToPhysicalPoint((0, 0, k))
    for tag, value in (('0008|0060', 'CT'), ('0020|000e', series_uid),
                       ('0020|000d', series_uid + '.0'), ('0020|0037', '1\\0\\0\\0\\1\\0'),
                       ('0020|0032', '\\'.join(str(v) for v in position)),
                       ('0020|0013', str(k + 1)), ('0008|0018', f'{series_uid}.{k + 1}')):
      sl.SetMetaData(tag, value)
    writer.SetFileName(os.path.join(folder, f'slice{k:03d}.dcm'))
    writer.Execute(sl)
