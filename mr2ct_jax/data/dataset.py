"""The reader API of a prepared data dir: its meta, splits, patients' volumes and geometry.

A data dir is written by `mr2ct_jax.data.writer` (the `prepare` command, or the phantom):

  mr2ct_slices/1.0.0/    the TFDS dataset (array_record): the splits below that have data; one
                         example per slice, records in patient then slice order
  geometry/<split>/<id>.json   SliceGeometry per patient (maps slices back to the input volume)
  dataset_meta.json      preprocessing values, patients and record indices per split

Everything that reads prepared data (the input pipeline, evaluation, segmentation) goes
through this module, and none of it needs the writer.
"""

import collections.abc
import contextlib
import json
import os
from typing import Any, Iterable, Iterator, Sequence
import zlib

import ml_collections
import numpy as np

from mr2ct_jax import storage
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import tfds_builder

META_FILE = 'dataset_meta.json'
GEOMETRY_DIR = 'geometry'
FORMAT_VERSION = 1

# Training splits (may share patients: CycleGAN training is unpaired, labeled CT train the
# U-Net) and evaluation splits (their subjects must not appear in any training split).
#   train_mr    unpaired MR                       image (normalised MR), mask
#   train_ct    unpaired CT                       image (HU), mask
#   labeled     CT + label map                    image (HU), mask, label
#   test        paired MR + registered CT         image (MR), paired (CT, HU), mask[, label]
#   test_mr     unpaired test MR                  image (MR), mask
#   test_ct     unpaired test CT                  image (HU), mask
#   labeled_mr  MR + label map (no CT)            image (MR), mask, label
#   val         paired, like test (validation)    image (MR), paired (CT, HU), mask[, label]
TRAIN_SPLITS = ('train_mr', 'train_ct', 'labeled')
EVAL_SPLITS = ('test', 'test_mr', 'test_ct', 'labeled_mr', 'val')


# The preprocessing a dataset was prepared with (dataset_meta.json). A generator only works on
# volumes preprocessed the same way, so a run takes these from its dataset (config.data.<key>
# None) and translate/evaluate apply the run's values. Datasets prepared before the plane was
# recorded hold axial slices.
PREPROCESSING_KEYS = ('spacing_mm', 'image_size', 'mr_percentile', 'n4', 'plane')
DEFAULT_PLANE = 'axial'
_TYPES = {'spacing_mm': float, 'image_size': int, 'mr_percentile': float, 'n4': bool,
          'plane': str}


class DatasetError(ValueError):
  """A dataset-level problem (data dir, split, folder); one line naming the dir or key."""


def load_meta(data_dir: str) -> dict[str, Any]:
  """dataset_meta.json of a prepared data dir.

  Raises:
    DatasetError: the dir is missing or was not written by `prepare`.
  """
  data_dir = os.fspath(data_dir)
  if not storage.isdir(data_dir):
    raise DatasetError(f'{data_dir}: data dir does not exist (run python -m '
                       'mr2ct_jax.data.prepare, or leave config.data.dir empty for the phantom)')
  path = storage.join(data_dir, META_FILE)
  if not storage.isfile(path):
    raise DatasetError(f'{data_dir}: not a prepared data dir (no {META_FILE}; run python -m '
                       'mr2ct_jax.data.prepare)')
  try:
    with storage.open_file(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path}: unreadable ({e})') from e
  if meta.get('format_version') != FORMAT_VERSION:
    raise DatasetError(f'{path}: format_version {meta.get("format_version")!r}, this code reads '
                       f'{FORMAT_VERSION}; prepare the data again')
  return meta


def geometry_path(data_dir: str, patient_id: str, split: str) -> str:
  """Where the SliceGeometry of `patient_id` in `split` is stored (geometry/<split>/<id>.json:
  a patient may be in several training splits, each volume on its own grid)."""
  return os.path.join(os.fspath(data_dir), GEOMETRY_DIR, split, f'{patient_id}.json')


def load_geometry(data_dir: str, patient_id: str, split: str) -> preprocess.SliceGeometry:
  """The SliceGeometry of one prepared patient of `split`.

  Datasets prepared before geometry was stored per split keep geometry/<id>.json (a patient
  id was then unique across splits); that file is read when the per-split one is missing.
  """
  path = geometry_path(data_dir, patient_id, split)
  if not storage.isfile(path):
    legacy = os.path.join(os.fspath(data_dir), GEOMETRY_DIR, f'{patient_id}.json')
    if not storage.isfile(legacy):
      raise DatasetError(f'{path}: no geometry for patient {patient_id!r} of split {split!r}')
    path = legacy
  with storage.open_file(path, encoding='utf-8') as f:
    return preprocess.SliceGeometry.from_dict(json.load(f))


def preprocessing(meta: dict[str, Any]) -> dict[str, Any]:
  """The preprocessing values of a dataset's meta (`load_meta`), typed, plane included."""
  values = {'plane': DEFAULT_PLANE}
  for key in PREPROCESSING_KEYS:
    if key in meta:
      values[key] = _TYPES[key](meta[key])
  return values


def same_value(key: str, a: Any, b: Any) -> bool:
  """Whether two values of a preprocessing key are equal (floats up to rounding)."""
  if _TYPES[key] is float:
    return bool(np.isclose(float(a), float(b)))
  return _TYPES[key](a) == _TYPES[key](b)


def preprocessing_mismatch(meta: dict[str, Any], data: ml_collections.ConfigDict
                           ) -> tuple[str, Any, Any] | None:
  """The first preprocessing key whose config value is set and differs from the dataset's.

  Args:
    meta: the dataset's meta.
    data: a config's `data` section; a None value means "from the dataset" and matches. A
      config without `plane` (written before planes existed) sliced axially.

  Returns:
    (key, dataset value, config value), or None if every set value matches.
  """
  recorded = preprocessing(meta)
  for key in PREPROCESSING_KEYS:
    value = data.get(key, DEFAULT_PLANE if key == 'plane' else None)
    if value is not None and key in recorded and not same_value(key, recorded[key], value):
      return key, recorded[key], value
  return None


def settings_mismatch(data_dir: str, config: ml_collections.ConfigDict) -> str | None:
  """Why a prepared data dir does not suit a generator trained with `config`, or None.

  A generator only works on slices prepared like its training data (scale, intensity, bias
  correction, plane), so every value of PREPROCESSING_KEYS of the data dir must equal
  config.data's.

  Returns:
    A one-line message naming the first differing value, or None if all match.
  """
  found = preprocessing_mismatch(load_meta(data_dir), config.data)
  if found is None:
    return None
  key, recorded, value = found
  return (f'{data_dir}: prepared with {key}={recorded} but the generators were trained with '
          f'data.{key}={value}; prepare it with the run\'s config')


def has_split(data_dir: str, split: str) -> bool:
  """True if the prepared data dir holds `split` (splits without data are not written)."""
  return split in load_meta(data_dir)['splits']


@contextlib.contextmanager
def _read_errors(data_dir: str, split: str) -> Iterator[None]:
  """Turns a corrupt or truncated record file (array_record's RuntimeError) into one line."""
  try:
    yield
  except (RuntimeError, OSError) as e:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    raise DatasetError(f'{data_dir}: the {split!r} split cannot be read ({detail}); prepare '
                       f'the data again') from e


def load_split(data_dir: str, split: str,
               patients: Sequence[str] | None = None) -> Sequence[dict[str, Any]]:
  """Random-access source of a split's examples (see tfds_builder.features for the keys).

  Args:
    data_dir: a prepared data dir.
    split: one of its splits.
    patients: only these patients' slices (in the split's record order); None: all.

  Raises:
    DatasetError: the data dir is missing, not prepared, has no such split, or `patients`
      names one the split does not hold.
  """
  meta = load_meta(data_dir)
  if split not in meta['splits']:
    raise DatasetError(f'{data_dir}: no {split!r} split (it has {sorted(meta["splits"])})')
  with _read_errors(data_dir, split):
    source = tfds_builder.data_source(data_dir, split)
  if patients is None:
    return source
  known = meta['splits'][split]['patients']
  missing = sorted(set(patients) - set(known))
  if missing:
    raise DatasetError(f'{data_dir}: the {split!r} split has no patient {missing[0]!r}')
  records = sorted(i for pid in set(patients) for i in known[pid]['records'])
  return _Records(source, records)


class _Records(collections.abc.Sequence):
  """The examples of `source` at `records` (a subset of a split, for training subsets)."""

  def __init__(self, source: Sequence[dict[str, Any]], records: Sequence[int]):
    self._source, self._records = source, list(records)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):  # grain reads single indices
    return self._source[self._records[index]]


def training_subset(meta: dict[str, Any], split: str, num: int, seed: int,
                    where: str = '') -> list[str]:
  """The patients of a seeded, nested subset of a training split (sorted ids).

  The split's sorted patient ids are permuted by a generator seeded with (`seed`, the split's
  name) and the first `num` are taken: a smaller subset is always inside a larger one of the
  same seed (the 20 of a 20-volume run are among the 40 of a 40-volume run).

  Args:
    meta: the dataset's meta (`load_meta`).
    split: 'train_mr' or 'train_ct' (any split works).
    num: subset size; 0 = every patient.
    seed: config.data.subset_seed.
    where: the data dir, named in errors.

  Raises:
    DatasetError: `num` exceeds the split's patient count (the config key is named).
  """
  ids = sorted(meta['splits'][split]['patients'])
  if num == 0:
    return ids
  if num > len(ids):
    key = {'train_mr': 'num_train_mr', 'train_ct': 'num_train_ct'}.get(split, split)
    raise DatasetError(f'config.data.{key}={num}: {where or "the dataset"} has only '
                       f'{len(ids)} {split} patients')
  order = np.random.default_rng([int(seed), zlib.crc32(split.encode())]).permutation(len(ids))
  return sorted(ids[i] for i in order[:num])


def with_extent(volumes: Iterable[dict[str, Any]], data_dir: str,
                split: str) -> Iterator[dict[str, Any]]:
  """The records of `split` with 'inside': their network pixels inside the original volume.

  Scoring leaves the other pixels (padding around a volume smaller than the network grid)
  out; the evaluation and the validation while training score the same pixels.
  """
  for volume in volumes:
    volume['inside'] = load_geometry(data_dir, volume['patient_id'], split).valid_mask()
    yield volume


def iterate_volumes(data_dir: str, split: str) -> Iterator[dict[str, Any]]:
  """Yields every patient of a split as stacked slices, patients in sorted id order.

  Yields:
    {'patient_id': str, 'image', 'paired': float32 [N,S,S], 'mask', 'label': uint8 [N,S,S],
     'slice_index': int32 [N]} with slices in slice_index order (0..N-1). Map them back to
    the input volume with `load_geometry(data_dir, patient_id, split)`.
  """
  source = load_split(data_dir, split)
  patients = load_meta(data_dir)['splits'][split]['patients']
  for pid in sorted(patients):
    with _read_errors(data_dir, split):
      examples = [source[i] for i in patients[pid]['records']]
    out: dict[str, Any] = {'patient_id': pid}
    for key in tfds_builder.ARRAY_KEYS:
      out[key] = np.stack([np.asarray(e[key]) for e in examples])
    out['slice_index'] = np.asarray([int(e['slice_index']) for e in examples], np.int32)
    # The meta's record indices must point at this patient's slices, in order (cheap to
    # check, and a mismatch would silently mix patients).
    found = {_text(e['patient_id']) for e in examples}
    if found != {pid} or not np.array_equal(out['slice_index'], np.arange(len(examples))):
      raise DatasetError(f'{data_dir}: the {split!r} records of patient {pid} hold '
                         f'{sorted(found)} slices {out["slice_index"].tolist()[:8]}; the '
                         f'dataset and its {META_FILE} disagree, prepare the data again')
    yield out


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
