"""TFDS builder that writes prepared per-patient slice stacks as an array_record dataset.

The builder is used as a plain module, not a registered TFDS package: `writer.py` preprocesses
every volume once, saves each patient's slices to a `.npz` file and hands the list of files per
split to `build()`. Reading goes through `tfds.builder_from_directory(...).as_data_source()`,
which needs neither this class nor TensorFlow.

Splits (only those with at least one patient are written):
  train_mr  unpaired MR slices (image in MR-normalised units)
  train_ct  unpaired CT slices (image in HU)
  labeled   CT slices with label maps (segmentation training)
  test      paired subjects: image = MR, paired = the same subject's registered CT in HU
"""

import contextlib
import dataclasses
import io
import os
import tempfile
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

NAME = 'mr2ct_slices'
VERSION_STR = '1.0.0'
SPLITS = ('train_mr', 'train_ct', 'labeled', 'test', 'test_mr', 'test_ct', 'labeled_mr', 'val')
# Arrays in a patient's .npz file; `image` and `mask` are required, the others are zeros when
# missing (one fixed feature set for every split keeps the readers simple).
ARRAY_KEYS = ('image', 'paired', 'mask', 'label')


@dataclasses.dataclass(frozen=True)
class PreparedPatient:
  """One preprocessed patient: `path` is an .npz with arrays named as in ARRAY_KEYS, [N,S,S]."""
  patient_id: str
  path: str


def features(image_size: int) -> tfds.features.FeaturesDict:
  """The example features; arrays are stored as raw bytes (array_record compresses them)."""
  shape = (image_size, image_size)
  raw = tfds.features.Encoding.BYTES  # the default proto float/int lists decode far slower
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=raw),
      'paired': tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=raw),
      'mask': tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=raw),
      'label': tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=raw),
      'patient_id': tfds.features.Text(),
      'slice_index': tfds.features.Scalar(dtype=np.int32),
      'num_slices': tfds.features.Scalar(dtype=np.int32),
  })


def patient_examples(patient: PreparedPatient,
                     image_size: int) -> Iterator[tuple[str, dict[str, object]]]:
  """Yields (key, example) for every axial slice of one prepared patient.

  Raises:
    ValueError: the .npz lacks `image`/`mask` or its arrays are not [N, size, size].
  """
  with np.load(patient.path) as npz:
    arrays = {k: npz[k] for k in ARRAY_KEYS if k in npz.files}
  for key in ('image', 'mask'):
    if key not in arrays:
      raise ValueError(f'{patient.path}: prepared patient file has no {key!r} array')
  num_slices = arrays['image'].shape[0]
  for key, array in arrays.items():
    if array.shape != (num_slices, image_size, image_size):
      raise ValueError(f'{patient.path}: {key!r} has shape {array.shape}, expected '
                       f'({num_slices}, {image_size}, {image_size})')
  zeros_f = np.zeros((image_size, image_size), np.float32)
  zeros_u = np.zeros((image_size, image_size), np.uint8)
  for k in range(num_slices):
    yield f'{patient.patient_id}_{k:04d}', {
        'image': arrays['image'][k].astype(np.float32),
        'paired': arrays['paired'][k].astype(np.float32) if 'paired' in arrays else zeros_f,
        'mask': arrays['mask'][k].astype(np.uint8),
        'label': arrays['label'][k].astype(np.uint8) if 'label' in arrays else zeros_u,
        'patient_id': patient.patient_id,
        'slice_index': k,
        'num_slices': num_slices,
    }


class Mr2ctSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Axial slices of prepared MR/CT volumes, one example per slice, in generation order."""

  VERSION = tfds.core.Version(VERSION_STR)
  RELEASE_NOTES = {VERSION_STR: 'Slices, masks, labels, patient id and slice index.'}

  def __init__(self, *, image_size: int,
               patients: Mapping[str, Sequence[PreparedPatient]], **kwargs):
    """Args: image_size: slice size S; patients: split name -> prepared patients."""
    unknown = sorted(set(patients) - set(SPLITS))
    if unknown:
      raise ValueError(f'unknown split(s) {unknown}; expected a subset of {SPLITS}')
    self._image_size = image_size
    self._patients = {s: list(p) for s, p in patients.items() if p}
    if not self._patients:
      raise ValueError('no patients in any split: nothing to build')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Axial slices of MR and CT volumes prepared by mr2ct_jax.data.prepare.',
        features=features(self._image_size),
        supervised_keys=None,
        # Records in the order they are generated (patient, then slice): the writer knows
        # every patient's record indices without reading the dataset back. Training
        # shuffles on its own (grain), so TFDS's write-time shuffle buys nothing.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
    return {split: self._generate_examples(patients)
            for split, patients in self._patients.items()}

  def _generate_examples(self, patients: Sequence[PreparedPatient]):
    for patient in patients:
      yield from patient_examples(patient, self._image_size)


def builder_dir(data_dir: str) -> str:
  """The TFDS directory (`<data_dir>/mr2ct_slices/1.0.0`) inside a prepared data dir."""
  return os.path.join(data_dir, NAME, VERSION_STR)


def build(data_dir: str, image_size: int,
          patients: Mapping[str, Sequence[PreparedPatient]]) -> str:
  """Writes the array_record dataset under `data_dir`; returns its builder directory."""
  downloads = os.path.join(data_dir, 'downloads')  # removed by the caller afterwards
  os.makedirs(downloads, exist_ok=True)
  # A new builder makes an empty temporary folder for metadata it would fetch from TFDS's
  # bucket (DatasetInfo.initialize_from_bucket) and never removes it: one stray /tmp/tmp*tfds
  # per prepare. Making it inside `downloads` cleans it up with the rest.
  saved, tempfile.tempdir = tempfile.tempdir, downloads
  try:
    builder = Mr2ctSlices(image_size=image_size, patients=patients, data_dir=data_dir)
  finally:
    tempfile.tempdir = saved
  tfds.display_progress_bar(False)
  # TFDS prints "Downloading and preparing dataset ..." lines; prepare prints its own summary.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(file_format='array_record', download_dir=downloads)
  return builder_dir(data_dir)


def data_source(data_dir: str, split: str) -> Sequence[dict[str, object]]:
  """Random-access source of one split's decoded examples (no TensorFlow needed)."""
  builder = tfds.builder_from_directory(builder_dir(data_dir))
  return builder.as_data_source(split=split)


def split_sizes(data_dir: str) -> dict[str, int]:
  """Number of examples per split written in the dataset's metadata."""
  builder = tfds.builder_from_directory(builder_dir(data_dir))
  return {name: info.num_examples for name, info in builder.info.splits.items()}
