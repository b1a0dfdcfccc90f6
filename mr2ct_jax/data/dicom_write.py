"""Writing a synthetic CT as a CT DICOM series (SimpleITK / GDCM) that planning systems import.

One file per slice, in a folder: SOP Class CT Image Storage, Modality CT, new UIDs (study,
series, frame of reference, one SOP instance per slice; '2.25.<uuid>' form, unique without an
organisation root), int16 pixels holding HU through RescaleSlope 1 / RescaleIntercept -1024
(RescaleType HU), and the input's geometry: ImagePositionPatient per slice,
ImageOrientationPatient, PixelSpacing, SliceThickness and SpacingBetweenSlices, all converted
from the RAS+ affine of NIfTI to DICOM's LPS. The slices are the stored volume's third axis;
a volume stored left-handed (e.g. RAI) is written with that axis reversed, since a DICOM series
is ordered along the slice normal ImageOrientationPatient defines: the voxels stay where they
are in patient space. Patient and study tags come from a DICOM input where it has them
(`source_tags`), and so does its Frame of Reference UID (the sCT shares the MR's patient
coordinates); otherwise PatientID and PatientName are the volume id and the frame is new.

A sheared affine (non-orthogonal voxel axes) has no DICOM equivalent and is refused
(`check_representable`) before any work is done.
"""

import datetime
import os
import uuid
from collections.abc import Mapping

import numpy as np
import SimpleITK as sitk

from mr2ct_jax.data.volume_checks import VolumeError

CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
RESCALE_SLOPE = 1
RESCALE_INTERCEPT = -1024
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Patient, study and series tags a DICOM input lends its synthetic CT (the UIDs are new).
COPIED_TAGS = (
    '0008|0005',  # Specific Character Set (of the copied names)
    '0010|0010', '0010|0020', '0010|0030', '0010|0040', '0010|1010',  # patient
    '0008|0020', '0008|0030', '0008|0050', '0008|0090', '0008|1030', '0020|0010',  # study
    '0018|5100',  # Patient Position
    # Frame of Reference: the sCT lies on the MR's voxels in the MR's patient coordinates,
    # so viewers and planning systems may overlay and register the two as one frame.
    '0020|0052',
)
# Specific Character Set (0008,0005) of UTF-8, which SimpleITK writes Python strings as.
UTF8_CHARACTER_SET = 'ISO_IR 192'
# Largest deviation from orthonormal voxel axes that DICOM's orientation can still hold.
_ORTHO_TOLERANCE = 1e-4


def new_uid() -> str:
  """A new, globally unique DICOM UID ('2.25.' + a random UUID as an integer; <= 44 chars)."""
  return f'2.25.{uuid.uuid4().int}'


def _ds(value: float) -> str:
  """A DICOM decimal string (VR DS: at most 16 characters), as precise as that allows."""
  value = float(value)
  if abs(value) < 1e-12:
    return '0'
  for digits in range(12, 0, -1):
    text = f'{value:.{digits}g}'
    if len(text) <= 16:
      return text
  raise ValueError(f'{value} does not fit a DICOM decimal string')


def _axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(LPS direction cosines as columns, voxel sizes) of a RAS+ affine."""
  lps = _RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, :3]
  spacing = np.linalg.norm(lps, axis=0)
  return lps / spacing, spacing


def check_representable(path: str, affine: np.ndarray) -> None:
  """Raises VolumeError (naming `path`) if the affine's voxel axes are not orthogonal."""
  direction, _ = _axes(affine)
  error = float(np.max(np.abs(direction.T @ direction - np.eye(3))))
  if error > _ORTHO_TOLERANCE:
    raise VolumeError(f'{path}: the affine is sheared (voxel axes not orthogonal: '
                      f'{error:.2g} off in their dot products); a DICOM series cannot hold that '
                      'geometry: write NIfTI instead')


def source_tags(folder: str) -> dict[str, str]:
  """The `COPIED_TAGS` present (non-empty) in the first file of the DICOM series in `folder`."""
  series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
  if not series:
    return {}
  first = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])[0]
  reader = sitk.ImageFileReader()
  reader.SetFileName(first)
  reader.ReadImageInformation()
  tags = {}
  for tag in COPIED_TAGS:
    if reader.HasMetaDataKey(tag):
      value = reader.GetMetaData(tag).strip(' \0')
      if value:
        tags[tag] = value
  return tags


def _image(hu: np.ndarray, affine: np.ndarray) -> sitk.Image:
  """The int16 HU volume [I, J, K] as a right-handed SimpleITK image in LPS."""
  direction, spacing = _axes(affine)
  origin = _RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, 3]
  if np.linalg.det(direction) < 0:
    # Slices must run along the normal row x column; reverse them, starting at the last one.
    origin = origin + direction[:, 2] * spacing[2] * (hu.shape[2] - 1)
    direction = direction * np.array([1.0, 1.0, -1.0])
    hu = hu[:, :, ::-1]
  info = np.iinfo(np.int16)
  # The HU image is int16, and so is the stored value HU - intercept (GDCM applies the inverse
  # rescale when it writes).
  low = max(info.min, info.min + RESCALE_INTERCEPT)
  high = min(info.max, info.max + RESCALE_INTERCEPT)
  voxels = np.clip(np.rint(np.asarray(hu, np.float64)), low, high).astype(np.int16)
  image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(voxels, (2, 1, 0))))
  image.SetSpacing([float(s) for s in spacing])
  image.SetOrigin([float(v) for v in origin])
  image.SetDirection([float(v) for v in direction.ravel()])
  return image


def write_ct_series(folder: str, hu: np.ndarray, affine: np.ndarray, volume_id: str,
                    tags: Mapping[str, str] | None = None) -> list[str]:
  """Writes `hu` as a CT DICOM series into the existing, empty `folder`.

  Args:
    folder: where the slice files go ('0001.dcm', ...); callers make it a temporary folder
      renamed when complete (`atomic.building_dir`).
    hu: [I, J, K] synthetic CT in HU on the input's voxels (rounded to integers).
    affine: [4, 4] voxel -> RAS+ world (mm) of `hu`.
    volume_id: PatientID / PatientName when `tags` has none; the series description names it.
    tags: patient/study tags to copy (`source_tags` of a DICOM input), DICOM 'gggg|eeee' keys.

  Returns:
    The written file paths, in slice order.

  Raises:
    VolumeError: a sheared affine (`check_representable`).
  """
  check_representable(folder, affine)
  image = _image(hu, affine)
  direction = np.asarray(image.GetDirection()).reshape(3, 3)
  normal = direction[:, 2]
  now = datetime.datetime.now()
  date, time = now.strftime('%Y%m%d'), now.strftime('%H%M%S')
  tags = dict(tags or {})
  copied_set = tags.get('0008|0005')
  if copied_set is not None and copied_set != UTF8_CHARACTER_SET and not volume_id.isascii():
    # Our own strings would be UTF-8 under the source's character set: keep them ASCII.
    volume_id = volume_id.encode('ascii', 'replace').decode('ascii')
  patient_id = volume_id[:64]  # VR LO: 64 characters
  shared = {
      '0008|0016': CT_IMAGE_STORAGE, '0008|0060': 'CT',
      '0008|0008': 'DERIVED\\SECONDARY', '0008|0070': 'mr2ct_jax',
      '0008|103e': f'Synthetic CT from {volume_id}'[:64],
      '0010|0010': patient_id, '0010|0020': patient_id,
      '0008|0020': date, '0008|0030': time, '0008|0021': date, '0008|0031': time,
      '0008|0023': date, '0008|0033': time, '0020|0011': '1', '0020|0012': '1',
      '0020|000d': new_uid(), '0020|000e': new_uid(), '0020|0052': new_uid(),
      '0020|1040': '',  # Position Reference Indicator (type 2)
      '0018|0060': '',  # KVP (type 2 in the CT Image module; no tube made these)
      '0020|0037': '\\'.join(_ds(v) for v in (*direction[:, 0], *direction[:, 1])),
      '0018|0050': _ds(image.GetSpacing()[2]), '0018|0088': _ds(image.GetSpacing()[2]),
      '0028|1052': str(RESCALE_INTERCEPT), '0028|1053': str(RESCALE_SLOPE), '0028|1054': 'HU',
  }
  shared.update(tags)
  if copied_set is None and not all(value.isascii() for value in shared.values()):
    # Without Specific Character Set a reader decodes the names as ASCII (ISO-IR 6).
    shared['0008|0005'] = UTF8_CHARACTER_SET
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()  # the UIDs above, not ones GDCM would invent per file
  paths = []
  for k in range(image.GetDepth()):
    # A one-slice 3-D image, not a 2-D slice: GDCM takes SpacingBetweenSlices from its spacing.
    piece = image[:, :, k:k + 1]
    position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
    for tag, value in shared.items():
      piece.SetMetaData(tag, value)
    piece.SetMetaData('0008|0018', new_uid())
    piece.SetMetaData('0020|0013', str(k + 1))
    piece.SetMetaData('0020|0032', '\\'.join(_ds(v) for v in position))
    piece.SetMetaData('0020|1041', _ds(position @ normal))
    path = os.path.join(folder, f'{k + 1:04d}.dcm')
    writer.SetFileName(path)
    writer.Execute(piece)
    paths.append(path)
  return paths
