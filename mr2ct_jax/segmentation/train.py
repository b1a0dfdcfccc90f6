"""Training of the segmentation U-Net: state, the jitted data-parallel step, the loop.

Like the CycleGAN step (`mr2ct_jax.training.step`): a pure step function with its statics bound
by `functools.partial`, jitted with the state replicated and the batch split over the mesh's
'data' axis (XLA inserts the gradient all-reduce), the state donated. Checkpoints go to
SEG_DIR/checkpoints through the same Orbax manager as the CycleGAN (items 'state' and
'data_iter'; the sampler's "iterator state" is only its seed, batches being a function of the
step), and a second run on the same directory resumes from the latest one.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import parallel
from mr2ct_jax.parallel import Batch
from mr2ct_jax import preemption
from mr2ct_jax import storage
from mr2ct_jax import tb_logging
from mr2ct_jax.models import layers
from mr2ct_jax.models import unet as unet_lib
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import losses

METRIC_KEYS = ('loss/total', 'loss/ce', 'loss/dice', 'accuracy')
IN_CHANNELS = 2  # (CT-like, MR-like); the single-modality baseline (`baseline`) uses 1


class NonFiniteLossError(FloatingPointError):
  """The segmentation loss became NaN/Inf; the message names the step."""


@flax.struct.dataclass
class SegState:
  """The U-Net's train state (a pytree): step (int32 scalar), params, Adam state."""
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class SegModel:
  """The U-Net module and its optimiser: what a run computes with besides its state.

  Attributes:
    model: the U-Net of `config.seg` (2 input channels, 1 for the MR baseline).
    tx: Adam with the constant learning rate `config.seg.lr` (the paper: 1e-4).
  """
  model: unet_lib.UNet
  tx: optax.GradientTransformation


def build(seg: ml_collections.ConfigDict, in_channels: int = IN_CHANNELS) -> SegModel:
  """The U-Net and optimiser of `config.seg`, built once per run and passed down.

  Memoised per architecture and learning rate: a process that trains the same U-Net again
  (resuming, a sweep, the folds of the baseline, the tests) gets the same objects, so the
  jitted step compiles once. seg.num_classes must be resolved (`labels.resolve_num_classes`).
  """
  if seg.num_classes is None:
    raise config_checks.ConfigError('config.seg.num_classes=None: resolve it from the labeled '
                                    'data first (segmentation.labels.resolve_num_classes)')
  return _build(int(seg.num_classes), int(seg.base_filters), int(seg.depth), str(seg.dtype),
                float(seg.lr), int(in_channels))


@functools.lru_cache(maxsize=8)
def _build(num_classes: int, base_filters: int, depth: int, dtype: str, lr: float,
           in_channels: int) -> SegModel:
  model = unet_lib.UNet(num_classes=num_classes, base_filters=base_filters, depth=depth,
                        in_channels=in_channels, dtype=layers.compute_dtype(dtype))
  return SegModel(model=model, tx=optax.adam(lr))


def param_shapes(model: unet_lib.UNet, image_size: int) -> Any:
  """The parameter tree of `model` as ShapeDtypeStructs (no computation)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']


def init_params(model: unet_lib.UNet, image_size: int, seed: int) -> Any:
  """He-normal kernels (std sqrt(2 / fan_in), Ronneberger's init) and zero biases, by NumPy.

  Drawn with NumPy instead of `model.init`: on XLA:CPU compiling flax's init (a threefry
  sampler per parameter) takes tens of seconds, drawing the same distribution here takes
  milliseconds. Deterministic in `seed`.
  """
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5E6])

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['bias']"):
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, param_shapes(model, image_size))


def abstract_state(seg: SegModel, image_size: int, mesh: Mesh) -> SegState:
  """ShapeDtypeStructs of the replicated SegState (the restore target)."""
  params = param_shapes(seg.model, image_size)
  state = SegState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                   opt_state=jax.eval_shape(seg.tx.init, params))
  return parallel.abstract_replicated(state, mesh)


def create_state(seg: SegModel, config: ml_collections.ConfigDict, mesh: Mesh) -> SegState:
  """A fresh SegState (params from `init_params` with config.seed), replicated over `mesh`."""
  params = init_params(seg.model, int(config.data.image_size), config.seed)
  create = lambda p: SegState(step=jnp.zeros((), jnp.int32), params=p, opt_state=seg.tx.init(p))
  return parallel.create_replicated(create, mesh, params)


def train_step(state: SegState, batch: Batch, *, model: unet_lib.UNet,
               tx: optax.GradientTransformation,
               dice_weight: float) -> tuple[SegState, dict[str, jax.Array]]:
  """One Adam update on {'image': [B,S,S,2], 'label': int [B,S,S]}.

  Returns:
    (new state, metrics METRIC_KEYS: the loss terms (unweighted 'loss/dice' = 1 - soft Dice)
    and pixel accuracy, float32 scalars). Non-finite values are returned, not raised.
  """
  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'])
    total, terms = losses.segmentation_loss(logits, batch['label'], dice_weight)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32))
    return total, {**terms, 'accuracy': accuracy}

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {k: jnp.asarray(metrics[k], jnp.float32) for k in METRIC_KEYS}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@functools.lru_cache(maxsize=8)
def make_train_step(seg: SegModel, dice_weight: float, mesh: Mesh
                    ) -> Callable[[SegState, Batch], tuple[SegState, dict[str, jax.Array]]]:
  """The jitted `train_step` of `seg` (from `build`); state replicated (donated), batch sharded.

  Cached: the same U-Net, Dice weight and mesh give the same jitted function (one compile).
  """
  step = functools.partial(train_step, model=seg.model, tx=seg.tx, dice_weight=dice_weight)
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def check_batch(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """Raises ConfigError unless seg.batch_size splits evenly over devices and processes."""
  batch = config.seg.batch_size
  for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
    if batch % count:
      raise config_checks.ConfigError(
          f'config.seg.batch_size={batch!r}: must be divisible by the number of {what} ({count})')


def _check_finite(step: int, values: dict[str, float]) -> None:
  for key, value in values.items():
    if not math.isfinite(value):
      raise NonFiniteLossError(f'segmentation step {step}: {key} is {value}; stopping (the last '
                               'good checkpoint is kept). Lower seg.lr.')


def train(config: ml_collections.ConfigDict, seg_dir: str,
          labeled: seg_data.LabeledSet | seg_data.MRSet, *,
          run_info: dict[str, Any] | None = None, stop_after: int | None = None,
          mesh: Mesh | None = None) -> SegState:
  """Trains (or resumes) the U-Net in SEG_DIR to config.seg.num_steps.

  Args:
    config: the CycleGAN run's config with the `seg` section (seed, data.crop_pad_fraction and
      data.flip_lr drive the augmentation).
    seg_dir: checkpoints in SEG_DIR/checkpoints, TensorBoard in SEG_DIR/tb.
    labeled: the training slices (`data.load_labeled_set`; an MRSet for the 1-channel
      baseline): the U-Net gets one input channel per `labeled.images`.
    run_info: JSON-serialisable facts saved with each checkpoint (e.g. the generator step).
    stop_after: stop (with a checkpoint) at this step, as a pre-empted job would.
    mesh: device mesh (default: all devices on the 'data' axis).

  Returns:
    The final state (replicated).

  Raises:
    ConfigError: bad seg values or a batch that does not split over the devices.
    checkpointing.CheckpointError: a checkpoint written with another U-Net config.
    NonFiniteLossError: the loss became NaN/Inf.
    preemption.Preempted: SIGTERM/SIGINT arrived; the step it stopped at is checkpointed.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  config_checks.validate(config, num_devices=1, num_processes=1)
  check_batch(config, mesh.size, jax.process_count())
  seg = config.seg
  seg_model = build(seg, len(labeled.images))
  manager = checkpointing.make_manager(seg_dir, max_to_keep=int(seg.keep_checkpoints))
  latest = manager.latest_step()
  if latest is not None:
    target = abstract_state(seg_model, int(config.data.image_size), mesh)
    state, _ = checkpointing.restore(manager, latest, target)
    tb_logging.log_line(f'Segmentation: resumed from {seg_dir} at step {latest}.')
  else:
    state = create_state(seg_model, config, mesh)
  start = int(jax.device_get(state.step))
  num_steps = int(seg.num_steps)
  end = num_steps if stop_after is None else min(int(stop_after), num_steps)
  if start >= end:
    tb_logging.log_line(f'Segmentation: {seg_dir} already trained to step {start}.')
    manager.close()
    return state
  step_fn = make_train_step(seg_model, float(seg.dice_loss_weight), mesh)
  size = int(config.data.image_size)
  pad = int(round(float(config.data.crop_pad_fraction) * size))
  local_batch = int(seg.batch_size) // jax.process_count()
  iter_state = {'sampler': 'per-step seed', 'seed': int(config.seed), **(run_info or {})}
  writer = tb_logging.MetricWriter(os.path.join(seg_dir, 'tb'))
  progress = tb_logging.Progress(start, num_steps)
  step = start
  with preemption.StopSignals() as stop:
    try:
      while step < end:
        batch = seg_data.sample_batch(labeled, seed=config.seed, step=step,
                                      batch_size=local_batch, pad=pad,
                                      flip_lr=bool(config.data.flip_lr),
                                      process_index=jax.process_index())
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
        step += 1
        is_last = step == end
        if step % seg.log_every == 0 or is_last or step == start + 1:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(step, values)
          rate = progress.rate(step)
          writer.scalars(step, {**{f'seg/{k}': v for k, v in values.items()},
                                'perf/steps_per_sec': rate})
          tb_logging.log_line('seg ' + progress.line(step, rate, values) +
                              f" | acc={values['accuracy']:.4f}")
        stopping = stop.should_stop(step, 1 if is_last else seg.log_every)
        if step % seg.checkpoint_every == 0 or is_last or stopping:
          _check_finite(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
          # A host copy: Orbax would otherwise slice the 8-way replicated arrays shard by
          # shard, compiling one slice per parameter shape (seconds on CPU) for no benefit.
          checkpointing.save(manager, step, jax.device_get(state), iter_state)
        if stopping:  # also at the last step: evaluation is skipped, the rerun does it
          # `finally` waits for the checkpoint to be written.
          raise preemption.Preempted(step, 'segmentation training')
    finally:
      manager.wait_until_finished()
      manager.close()
      writer.flush()
      writer.close()
  return state


def restore_params(seg_dir: str, config: ml_collections.ConfigDict,
                   in_channels: int = IN_CHANNELS) -> tuple[Any, int]:
  """The U-Net parameters (NumPy) of the latest checkpoint in SEG_DIR, and its step.

  Raises:
    checkpointing.CheckpointError: no checkpoint, or one from another U-Net config.
  """
  ckpt_dir = os.path.join(seg_dir, checkpointing.CHECKPOINT_DIR)
  if not storage.isdir(ckpt_dir):
    raise checkpointing.CheckpointError(f'{ckpt_dir}: no segmentation checkpoint (train first)')
  manager = checkpointing.make_manager(seg_dir, read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f'{ckpt_dir}: no segmentation checkpoint')
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                          abstract_state(build(config.seg, in_channels),
                                         int(config.data.image_size), mesh))
    state, _ = checkpointing.restore(manager, step, target)
  finally:
    manager.close()
  return jax.tree.map(np.asarray, state.params), int(step)
