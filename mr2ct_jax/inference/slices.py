"""The one batched slice loop: translate, evaluation and segmentation all run networks here.

A network is called in fixed-size batches so a jitted function compiles once per volume
shape. The last batch is padded with -1, the model-range background of both modalities
(air in CT, no signal in MR), and the outputs of the padding are dropped. A volume with fewer
slices than the batch size runs as one batch of exactly its slices rather than being padded
up to it (which would cost memory and time in proportion to the batch size).
"""

from collections.abc import Callable

import numpy as np
import tqdm

ApplyFn = Callable[[np.ndarray], np.ndarray]  # NHWC [-1, 1] -> NHWC [-1, 1]
PAD_VALUE = -1.0


def run_batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int,
                *, progress: bool = False, desc: str = 'slices') -> np.ndarray:
  """`fn` over the first axis of float32 `inputs` [N, ...] in batches of min(batch_size, N).

  Args:
    fn: maps a batch [B, ...] to outputs [B, ...] (any trailing shape and dtype).
    inputs: N examples (slices, or slices with channels), in the model range.
    batch_size: examples per call (>= 1).
    progress: show a progress bar over the examples.
    desc: the progress bar's label.

  Returns:
    The outputs of all N examples, stacked in order.

  Raises:
    ValueError: `fn` returned a batch of another size.
  """
  inputs = np.asarray(inputs, np.float32)
  n = inputs.shape[0]
  batch_size = max(1, min(int(batch_size), n))
  outputs = []
  with tqdm.tqdm(total=n, desc=desc, unit='slice', disable=not progress, leave=False) as bar:
    for start in range(0, n, batch_size):
      batch = inputs[start:start + batch_size]
      count = batch.shape[0]
      if count < batch_size:
        pad = np.full((batch_size - count,) + batch.shape[1:], PAD_VALUE, np.float32)
        batch = np.concatenate([batch, pad])
      result = np.asarray(fn(batch))
      if result.shape[0] != batch_size:
        raise ValueError(f'network returned {result.shape[0]} outputs for a batch of '
                         f'{batch_size}')
      outputs.append(result[:count])
      bar.update(count)
  return np.concatenate(outputs) if outputs else np.empty((0,) + inputs.shape[1:], np.float32)


def translate_slices(apply_fn: ApplyFn, slices: np.ndarray, batch_size: int, *,
                     progress: bool = False, desc: str = 'slices') -> np.ndarray:
  """Runs a generator over [N, H, W] model-range slices (see `run_batched`).

  Returns:
    float32 [N, H, W] in the model range.

  Raises:
    ValueError: the generator returned another shape than its input.
  """

  def one_batch(batch: np.ndarray) -> np.ndarray:
    result = np.asarray(apply_fn(batch[..., None]), np.float32)
    if result.shape != batch.shape + (1,):
      raise ValueError(f'generator returned shape {result.shape} for input '
                       f'{batch.shape + (1,)}')
    return result[..., 0]

  return run_batched(one_batch, slices, batch_size, progress=progress, desc=desc)


# Slice planes whose in-plane axis 0 is the patient's right->left axis (the axis the training
# augmentation mirrors; `mr2ct_jax.data.preprocess.has_left_right_axis`, not imported here:
# the data modules pull in SciPy and SimpleITK).
LEFT_RIGHT_PLANES = ('axial', 'coronal')


def flip_averaged(apply_fn: ApplyFn) -> ApplyFn:
  """`apply_fn` averaged with its left-right mirror: (G(x) + flip(G(flip(x)))) / 2.

  Test-time augmentation with the flip the training augmentation draws (`data.flip_lr`):
  image axis 0 (axis 1 of NHWC), the patient's left-right axis of axial and coronal slices.
  A CycleGAN's output carries noise-like texture that differs between an image and its
  mirror, so the average is smoother and closer to the CT (README, Quality); it costs a
  second generator call per batch.
  """
  def averaged(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch, np.float32)
    mirrored = np.asarray(apply_fn(np.ascontiguousarray(batch[:, ::-1])), np.float32)
    return (np.asarray(apply_fn(batch), np.float32) + mirrored[:, ::-1]) / 2
  return averaged


def flip_average_wanted(config, plane: str | None) -> bool:
  """Whether a run's config asks for `flip_averaged` outputs (`eval.flip_average`), it was
  trained on mirrored slices too (`data.flip_lr`: otherwise a mirrored input is one the
  generator never saw), and its slice plane has a left-right axis (sagittal slices: off)."""
  evaluation = config.get('eval') or {}
  return (bool(evaluation.get('flip_average', False)) and
          bool(config.data.get('flip_lr', True)) and (plane or 'axial') in LEFT_RIGHT_PLANES)
