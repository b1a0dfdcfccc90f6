"""The unpaired input pipeline (grain) over the training splits of a prepared data dir.

Training sees two independent, infinitely repeated slice streams, one per modality. Each
stream: the split's records -> this process's shard (`records[process_index::process_count]`,
so processes read disjoint slices) -> a shuffle that changes every epoch -> window to the
model range [-1, 1] -> pad by `crop_pad_fraction * size` with the background value (-1) and
crop a random size x size window, optional left-right flip -> batches of the local batch size
-> threads that prefetch `config.data.prefetch` batches (plus `num_workers` processes).

All randomness comes from seeds derived from `config.seed`, the stream name and the process
index, and grain seeds each example's augmentation from its position in the stream, so the
batches are a pure function of (config, data, process) and the iterator state is just the
next position of each stream: a restored iterator yields exactly the batches an
uninterrupted one would have.
"""

import json
import zlib
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.data import preprocess
from mr2ct_jax.data.dataset import DatasetError

STATE_VERSION = 1
TRAIN_SPLITS = {'mr': 'train_mr', 'ct': 'train_ct'}
_MAX_THREADS = 16


def check_data_dir(config: ml_collections.ConfigDict, data_dir: str) -> dict[str, Any]:
  """Checks that `data_dir` can feed training with `config`; returns its metadata.

  Raises:
    DatasetError: missing/unprepared dir, no train_mr or train_ct split, or a dataset
      prepared with an image size other than config.data.image_size.
  """
  meta = dataset.load_meta(data_dir)
  missing = [s for s in TRAIN_SPLITS.values() if s not in meta['splits']]
  if missing:
    raise DatasetError(f'{data_dir}: no {" and no ".join(missing)} split; training needs '
                       'both (re-run python -m mr2ct_jax.data.prepare with --mr_dir and --ct_dir)')
  if config.data.image_size is not None and int(meta['image_size']) != int(
      config.data.image_size):
    raise DatasetError(
        f'{data_dir}: prepared with image_size={meta["image_size"]} but '
        f'config.data.image_size={config.data.image_size}; prepare the data again with this '
        'size or set config.data.image_size to match')
  return meta


# ---------------------------------------------------------------------------------------
# Streams.


def derive_seed(seed: int, *names: object) -> int:
  """A 32-bit seed from an integer seed and names (stable across runs and machines)."""
  words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(n).encode()) for n in names]
  return int(np.random.SeedSequence(words).generate_state(1)[0])


class Augment(grain.transforms.RandomMap):
  """Window to [-1, 1], pad with the background and crop a random window, random LR flip.

  The input example's `image` is [S, S] in stored units (MR-normalised or HU); the output is
  float32 [S, S, 1]. Axis 0 of an axial or coronal slice is the patient's right->left axis,
  so the LR flip reverses axis 0 (the iterator turns it off for sagittal slices).
  """

  def __init__(self, modality: str, window: Sequence[float], size: int, pad: int,
               flip_lr: bool):
    if modality not in TRAIN_SPLITS:
      raise ValueError(f'modality must be one of {sorted(TRAIN_SPLITS)}, got {modality!r}')
    self.modality = modality
    self.window = tuple(float(w) for w in window)
    self.size, self.pad, self.flip_lr = int(size), int(pad), bool(flip_lr)

  def window_image(self, image: np.ndarray) -> np.ndarray:
    """Stored units -> model range [-1, 1]."""
    if self.modality == 'ct':
      return intensity.ct_hu_to_model(image, self.window)
    return intensity.mr_to_model(image, self.window)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    image, = crop_and_flip([self.window_image(element['image'])], self.size, self.pad,
                           self.flip_lr, rng)
    return image


def crop_and_flip(images: Sequence[np.ndarray], size: int, pad: int, flip_lr: bool,
                  rng: np.random.Generator) -> list[np.ndarray]:
  """The training augmentation, one random draw applied alike to every image of `images`.

  Each image is [size, size] in the model range; it is padded by `pad` pixels of -1 (the
  model-range background of both modalities: air in CT, no signal in MR), cropped back to a
  random size x size window and, with `flip_lr`, reversed along axis 0 with probability 1/2.
  Registered images (a paired MR and CT) stay registered. Returns float32 [size, size, 1].
  """
  for image in images:
    if image.shape != (size, size):
      raise DatasetError(f'slice of shape {image.shape} in a dataset of size {size}')
  images = list(images)
  if pad:
    x, y = rng.integers(0, 2 * pad + 1, size=2)
    images = [np.pad(im, pad, mode='constant', constant_values=-1.0)[x:x + size, y:y + size]
              for im in images]
  if flip_lr and rng.random() < 0.5:
    images = [im[::-1] for im in images]
  return [np.ascontiguousarray(im, np.float32)[..., None] for im in images]


def make_stream(source: Sequence[Any], augment: Augment, *, seed: int, batch_size: int,
                process_index: int, process_count: int, prefetch: int = 2,
                num_workers: int = 0) -> grain.IterDataset:
  """One modality's infinite stream of batches float32 [batch_size, S, S, 1].

  Args:
    source: random-access examples with an `image` key (e.g. `dataset.load_split(...)`).
    augment: the per-example transform.
    seed: stream seed (shuffle and augmentation seeds are derived from it).
    batch_size: local batch size.
    process_index, process_count: this process's shard of `source`.
    prefetch: batches prepared ahead by threads (0: synchronous).
    num_workers: grain worker processes (0: none).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DatasetError(f'{len(source)} slices cannot be shared by {process_count} processes '
                       f'(process {process_index} gets none)')
  ds = ds.shuffle(seed=derive_seed(seed, 'shuffle')).repeat()
  ds = ds.random_map(augment, seed=derive_seed(seed, 'augment'))
  ds = ds.batch(batch_size, drop_remainder=True)
  read = grain.ReadOptions(num_threads=min(prefetch, _MAX_THREADS),
                           prefetch_buffer_size=prefetch)
  stream = ds.to_iter_dataset(read)
  if num_workers > 0:
    # grain reads its own absl flags in the workers; outside app.run they are unparsed
    # (defaults are what we want), and reading an unparsed flag raises.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return stream


class UnpairedIterator:
  """Yields {'mr', 'ct'}: float32 [B, S, S, 1] in [-1, 1], from two independent streams."""

  def __init__(self, streams: dict[str, grain.IterDataset], info: dict[str, Any]):
    self._iters = {k: iter(v) for k, v in streams.items()}
    self._info = info

  @property
  def info(self) -> dict[str, Any]:
    """Shard sizes, seeds, batch size and process of this iterator."""
    return dict(self._info)

  def __iter__(self) -> 'UnpairedIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: next(it) for k, it in self._iters.items()}

  def close(self) -> None:
    """Stops prefetch threads and worker processes (also done when garbage collected)."""
    for it in self._iters.values():
      close = getattr(it, 'close', None)
      if close is not None:
        close()

  def __enter__(self) -> 'UnpairedIterator':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position of both streams."""
    state = {'version': STATE_VERSION, 'process_index': self._info['process_index'],
             'process_count': self._info['process_count'],
             'streams': {k: it.get_state() for k, it in self._iters.items()}}
    return json.loads(json.dumps(state))  # fail here, not in the checkpointer

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a `get_state()` result: the next batches equal the uninterrupted ones.

    Raises:
      DatasetError: the state is not from an UnpairedIterator of this version.
    """
    if not isinstance(state, dict) or state.get('version') != STATE_VERSION or set(
        state.get('streams', {})) != set(self._iters):
      raise DatasetError(f'data iterator state is not a version-{STATE_VERSION} '
                         f'UnpairedIterator state with streams {sorted(self._iters)}')
    if (state['process_index'], state['process_count']) != (self._info['process_index'],
                                                            self._info['process_count']):
      # Positions stay valid, but each process now reads another shard: the batch sequence
      # differs from the uninterrupted run (not an error: a job may move to another pod).
      logging.warning('data iterator state was saved by process %d of %d, restored by %d of '
                      '%d: the resumed batches follow a different sharding',
                      state['process_index'], state['process_count'],
                      self._info['process_index'], self._info['process_count'])
    for k, it in self._iters.items():
      it.set_state(state['streams'][k])


def make_unpaired_iterator(config: ml_collections.ConfigDict, data_dir: str, *,
                           process_index: int | None = None,
                           process_count: int | None = None) -> UnpairedIterator:
  """The training iterator over train_mr and train_ct of a prepared data dir.

  Args:
    config: uses seed, train.batch_size (global), data.{image_size, ct_window, mr_window,
      crop_pad_fraction, flip_lr, prefetch, num_workers}, and the training patients
      data.train_patients (else the subset of data.num_train_mr/ct, data.subset_seed).
    data_dir: written by `writer.prepare` / `writer.prepare_phantom`.
    process_index, process_count: default jax.process_index() / jax.process_count().

  Raises:
    DatasetError: see `check_data_dir`; a shard with no slice.
    ValueError: train.batch_size not divisible by the process count.
  """
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  prepared = dataset.preprocessing(check_data_dir(config, data_dir))
  data, batch = config.data, int(config.train.batch_size)
  if batch % process_count:
    raise ValueError(f'config.train.batch_size={batch} is not divisible by the number of '
                     f'processes ({process_count})')
  size = int(prepared['image_size'])
  # Mirroring a sagittal slice would swap anterior and posterior: only L-R axes are flipped.
  flip_lr = bool(data.flip_lr) and preprocess.has_left_right_axis(prepared['plane'])
  pad = int(round(float(data.crop_pad_fraction) * size))
  windows = {'mr': data.mr_window, 'ct': data.ct_window}
  streams, info = {}, {'process_index': process_index, 'process_count': process_count,
                       'local_batch': batch // process_count, 'pad': pad, 'shard_sizes': {}}
  meta = dataset.load_meta(data_dir)
  recorded = data.get('train_patients') or {}
  for modality, split in TRAIN_SPLITS.items():
    key = f'num_train_{modality}'
    patients = recorded.get(split)
    if patients is None:  # not resolved by the training loop (e.g. a bare pipeline test)
      patients = dataset.training_subset(meta, split, int(data.get(key, 0)),
                                         int(data.get('subset_seed', 0)), data_dir)
    source = dataset.load_split(data_dir, split, patients=list(patients))
    seed = derive_seed(config.seed, 'stream', modality, process_index)
    streams[modality] = make_stream(
        source, Augment(modality, windows[modality], size, pad, flip_lr), seed=seed,
        batch_size=batch // process_count, process_index=process_index,
        process_count=process_count, prefetch=int(data.prefetch),
        num_workers=int(data.num_workers))
    info['shard_sizes'][modality] = len(range(process_index, len(source), process_count))
  return UnpairedIterator(streams, info)
