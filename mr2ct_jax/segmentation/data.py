"""Training data of the segmentation U-Net: labeled CT + cached sMR, and the batch sampler.

The frozen G_mr turns every labeled CT slice into an sMR once; the (CT, sMR, label) arrays
are cached as an .npz next to the segmentation checkpoints, keyed by the generator step, so
resuming or re-running does not translate again. Images are cached in the model range as
float16: its error (< 5e-4) is far below one grey level of the [0, 255] window (7.8e-3) and
halves the memory of the paper-sized set (20 volumes x ~200 slices x 256^2 x 2 channels).

Batches are a pure function of (seed, step, process): each step draws its slices and
augmentation from `np.random.default_rng([seed, step, process_index])`, so a resumed run sees
exactly the batches of an uninterrupted one and the data iterator state is just the step.
"""

import dataclasses
import io
import os
from typing import Any

import ml_collections
import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax import storage
from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.inference import slices
from mr2ct_jax.segmentation import labels as labels_lib

ApplyFn = slices.ApplyFn
LABELED_SPLIT = 'labeled'
LABELED_MR_SPLIT = 'labeled_mr'
CACHE_VERSION = 2
SegDataError = labels_lib.SegDataError


@dataclasses.dataclass
class LabeledSet:
  """All labeled slices: model-range images (float16) and labels.

  Attributes:
    ct: [N, S, S] CT in the model range.
    smr: [N, S, S] synthetic MR = G_mr(CT) in the model range.
    label: [N, S, S] uint8 label map.
    maxima: source label file -> its largest label value (`labels.resolve_num_classes`).
  """
  ct: np.ndarray
  smr: np.ndarray
  label: np.ndarray
  maxima: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def images(self) -> tuple[np.ndarray, ...]:
    """The U-Net's input channels, in order: (CT-like, MR-like)."""
    return (self.ct, self.smr)

  @property
  def num_slices(self) -> int:
    return int(self.label.shape[0])


@dataclasses.dataclass
class MRSet:
  """Labeled MR slices for the single-modality baseline: one input channel.

  Attributes:
    mr: [N, S, S] MR in the model range.
    label: [N, S, S] uint8 label map.
  """
  mr: np.ndarray
  label: np.ndarray

  @property
  def images(self) -> tuple[np.ndarray, ...]:
    return (self.mr,)

  @property
  def num_slices(self) -> int:
    return int(self.label.shape[0])


def eval_split(data_dir: str) -> str:
  """The split segmentation is tested on: `labeled_mr` (MR + labels) if prepared, else `test`."""
  return LABELED_MR_SPLIT if dataset.has_split(data_dir, LABELED_MR_SPLIT) else 'test'


def check_data_dir(data_dir: str, config: ml_collections.ConfigDict, split: str) -> None:
  """Raises SegDataError unless `data_dir` has `split`, prepared like the generator's data."""
  if not dataset.has_split(data_dir, split):
    what = {LABELED_SPLIT: 'a labeled CT split (prepare with --labeled_dir)',
            LABELED_MR_SPLIT: 'a labeled MR split (prepare with --labeled_mr_dir)'}.get(
                split, 'a labeled MR split (--labeled_mr_dir) or a paired test split with '
                'labels (--paired_dir)')
    raise SegDataError(f'{data_dir}: no {split!r} split; segmentation needs {what}')
  mismatch = dataset.settings_mismatch(data_dir, config)
  if mismatch is not None:
    raise SegDataError(mismatch)


def _read_cache(path: str, key: dict[str, Any]) -> LabeledSet | None:
  """The cached labeled set at `path` if it was made with `key` (else, or unreadable: None)."""
  try:
    with np.load(io.BytesIO(storage.read_bytes(path))) as npz:  # also a gs:// object
      saved = {k[len('key_'):]: npz[k].item() for k in npz.files if k.startswith('key_')}
      if saved != key:
        return None
      maxima = dict(zip(npz['sources'].tolist(), npz['maxima'].tolist()))
      return LabeledSet(ct=npz['ct'], smr=npz['smr'], label=npz['label'], maxima=maxima)
  except (OSError, ValueError, KeyError):
    return None


def load_labeled_set(data_dir: str, config: ml_collections.ConfigDict, smr_fn: ApplyFn, *,
                     cache_path: str | None, generator_step: int | None,
                     write_cache: bool = True) -> LabeledSet:
  """(CT, sMR, label) of every labeled slice, from the cache or by running G_mr once.

  Args:
    data_dir: prepared dataset with a `labeled` split (CT in HU + label).
    config: the CycleGAN run's config (data.ct_window, seg.eval_batch_size).
    smr_fn: G_mr, NHWC [-1, 1] -> [-1, 1].
    cache_path: .npz to read/write (None: no cache).
    generator_step: the generator's checkpoint step (part of the cache key).
    write_cache: write the cache when it was (re)computed (process 0 only on a pod).

  Raises:
    SegDataError: no labeled split, or a split without any labeled voxel.
  """
  check_data_dir(data_dir, config, LABELED_SPLIT)
  key = {'version': CACHE_VERSION, 'data_dir': storage.absolute(data_dir),
         'generator_step': -1 if generator_step is None else int(generator_step),
         'ct_window': str(tuple(float(w) for w in config.data.ct_window))}
  cached = _read_cache(cache_path, key) if cache_path and storage.exists(cache_path) else None
  if cached is not None:
    return cached
  meta = dataset.load_meta(data_dir)
  cts, labels, maxima = [], [], {}
  for volume in dataset.iterate_volumes(data_dir, LABELED_SPLIT):
    cts.append(intensity.ct_hu_to_model(volume['image'], config.data.ct_window))
    labels.append(np.asarray(volume['label'], np.uint8))
    where = labels_lib.source_file(meta, LABELED_SPLIT, str(volume['patient_id']))
    maxima[where] = int(labels[-1].max()) if labels[-1].size else 0
  if not cts or not any(lab.any() for lab in labels):
    raise SegDataError(f'{data_dir}: the {LABELED_SPLIT!r} split has no labeled voxel')
  ct = np.concatenate(cts)
  smr = slices.translate_slices(smr_fn, ct, int(config.seg.eval_batch_size))
  labeled = LabeledSet(ct=ct.astype(np.float16), smr=smr.astype(np.float16),
                       label=np.concatenate(labels), maxima=maxima)
  if cache_path and write_cache:
    storage.makedirs(os.path.dirname(cache_path))
    # A file object, so NumPy does not append a second '.npz' to the temporary name.
    with atomic.writing(cache_path, 'wb') as f:
      np.savez(f, ct=labeled.ct, smr=labeled.smr, label=labeled.label,
               sources=np.asarray(list(maxima), dtype=str),
               maxima=np.asarray(list(maxima.values()), np.int64),
               **{f'key_{k}': np.asarray(v) for k, v in key.items()})
  return labeled


def sample_batch(labeled: LabeledSet | MRSet, *, seed: int, step: int, batch_size: int, pad: int,
                 flip_lr: bool, process_index: int = 0) -> dict[str, np.ndarray]:
  """The augmented local batch of `step`: {'image': f32 [B,S,S,2], 'label': i32 [B,S,S]}.

  Slices are drawn uniformly with replacement; each is padded by `pad` (images with the
  background -1, labels with 0) and a random S x S window is cropped, then flipped left-right
  (axis 0) with probability 1/2 when `flip_lr`. Channels are `labeled.images`: CT and sMR of
  a LabeledSet, the MR of an MRSet ('image' is [B,S,S,C]).
  """
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(process_index)])
  size = labeled.label.shape[1]
  idx = rng.integers(0, labeled.num_slices, batch_size)
  image = np.stack([c[idx] for c in labeled.images], axis=-1).astype(np.float32)
  label = labeled.label[idx].astype(np.int32)
  if pad:
    image = np.pad(image, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
    label = np.pad(label, ((0, 0), (pad, pad), (pad, pad)), constant_values=0)
  offsets = rng.integers(0, 2 * pad + 1, (batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  images, labels = [], []
  for b in range(batch_size):
    x, y = offsets[b]
    img, lab = image[b, x:x + size, y:y + size], label[b, x:x + size, y:y + size]
    if flip_lr and flips[b]:
      img, lab = img[::-1], lab[::-1]
    images.append(img)
    labels.append(lab)
  return {'image': np.ascontiguousarray(np.stack(images)),
          'label': np.ascontiguousarray(np.stack(labels))}


def mr_inputs(mr: np.ndarray, sct_fn: ApplyFn, config: ml_collections.ConfigDict) -> np.ndarray:
  """U-Net input of an MR volume [N, S, S] (MR units): [N, S, S, 2] = (sCT, MR), model range."""
  mr_model = intensity.mr_to_model(mr, config.data.mr_window)
  sct = slices.translate_slices(sct_fn, mr_model, int(config.seg.eval_batch_size))
  return np.stack([sct, mr_model], axis=-1).astype(np.float32)
