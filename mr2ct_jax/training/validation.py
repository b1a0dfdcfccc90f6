"""Validation while training: the `val` split scored every `config.eval.every` steps.

Every `config.eval.every` steps (0 = never) JAX process 0 translates each validation subject
(split `val`, written by `prepare --val_dir`: paired MR + registered CT like the test split)
with the current G_ct and writes to TensorBoard (WORKDIR/tb):
  val/mae_hu     MAE in HU inside the body mask (AND the common field of view)
  val/mae_255, val/psnr_255, val/ssim   on the 0-255 scale of the paper's windows
                 (`intensity.PAPER_CT_WINDOW` / `PAPER_MR_WINDOW`, whatever window the run
                 trains with), over the common-FOV slices
  val/mi_mr_sct  mutual information between the real MR and its sCT (nats)
each the mean over the validation subjects (the formulas are `evaluation.scoring`'s), and one
image `val/mr_sct_ct`: MR | sCT | CT of the first subject's slice with the largest body mask.
A line with the scores is printed too.

Validation reads no training data, draws no random numbers and leaves the train state alone
(the generator's parameters are copied to the host and run by a forward of their own), so a
run with validation trains exactly as one without, and a resumed run stays bit-exact. The test
split is never read while training. A dataset without a `val` split skips validation with one
line at start.
"""

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.inference import slices as slices_lib

SPLIT = 'val'
# The TensorBoard scalars (val/<key>), in the order of the printed line.
KEYS = ('mae_hu', 'mae_255', 'psnr_255', 'ssim', 'mi_mr_sct')
IMAGE_TAG = 'val/mr_sct_ct'


def every(config: ml_collections.ConfigDict) -> int:
  """config.eval.every (0 when a run's config.json predates it)."""
  return int(config.eval.get('every', 0))


def mean_scores(per_volume: list[Mapping[str, float]]) -> dict[str, float]:
  """val/<key> -> mean over subjects of the finite values (NaN where none; a PSNR of +inf for
  a perfect subject is left out of the mean, as in the evaluation reports)."""
  out = {}
  for key in KEYS:
    values = [float(r[key]) for r in per_volume if np.isfinite(r[key])]
    out[f'val/{key}'] = float(np.mean(values)) if values else float('nan')
  return out


class Validator:
  """Scores the val split with the current G_ct; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str, generator: Any):
    """Loads the validation subjects (process 0; none when off or without a val split).

    Args:
      config: the run's (resolved) config: eval.every, eval.batch_size, data windows.
      data_dir: the prepared dataset the run trains on.
      generator: the flax generator module (`state.CycleGAN.generator`).
    """
    self._every = every(config)
    self._config = config
    self._volumes: list[dict[str, Any]] = []
    if not self._every or jax.process_index() != 0:
      return
    if not dataset.has_split(data_dir, SPLIT):
      tb_logging.log_line(f'{data_dir}: no {SPLIT!r} split (prepare --val_dir); validation '
                          'while training skipped.')
      return
    # A few subjects: kept in memory so each validation reads nothing.
    self._volumes = list(dataset.with_extent(dataset.iterate_volumes(data_dir, SPLIT),
                                             data_dir, SPLIT))
    self._forward = jax.jit(lambda params, x: generator.apply({'params': params}, x))

  @property
  def active(self) -> bool:
    """Whether this process validates at all."""
    return bool(self._volumes)

  def due(self, step: int) -> bool:
    """Whether `step` is a validation step (on the process that validates)."""
    return self.active and step % self._every == 0

  def run(self, step: int, params: Mapping[str, Any],
          writer: tb_logging.MetricWriter) -> dict[str, float]:
    """Scores the val subjects with `params['g_ct']`, writes scalars and the panel at `step`.

    Returns:
      The scalars written (val/<key> -> mean over subjects).
    """
    # A host copy: the jitted forward gets its own buffers, never the (donated) train state's.
    g_ct = jax.device_put(jax.tree.map(np.asarray, params['g_ct']), jax.local_devices()[0])
    apply_fn = lambda batch: np.asarray(self._forward(g_ct, batch), np.float32)
    data = self._config.data
    if slices_lib.flip_average_wanted(self._config, data.get('plane')):  # as the evaluation
      apply_fn = slices_lib.flip_averaged(apply_fn)
    batch_size = int(self._config.eval.batch_size)
    per_volume, panel = [], None
    for volume in self._volumes:
      pid = volume['patient_id']
      mr, ct, mask, valid = scoring.check_volume(volume, pid, data.get('plane') or 'axial')
      model_in = intensity.mr_to_model(mr, data.mr_window)
      model_out = slices_lib.translate_slices(apply_fn, model_in, batch_size)
      sct = intensity.model_to_ct_hu(model_out, data.ct_window)
      vol, _ = scoring.volume_metrics(mr, ct, sct, None, mask, valid)  # paper windows
      per_volume.append(vol)
      if panel is None:
        k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        panel = [[model_in[k], model_out[k], intensity.ct_hu_to_model(ct[k], data.ct_window)]]
    scores = mean_scores(per_volume)
    writer.scalars(step, scores)
    writer.image(step, IMAGE_TAG, tb_logging.image_grid(panel))
    writer.flush()
    shown = ', '.join(f'{key.split("/")[1]}={value:.4g}' for key, value in scores.items())
    tb_logging.log_line(f'step {step} validation ({len(per_volume)} subjects): {shown}')
    return scores
