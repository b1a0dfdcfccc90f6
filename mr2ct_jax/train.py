"""The training loop: data, jitted CycleGAN+GC step over a device mesh, checkpoints, logging.

`train_and_evaluate(config, workdir)` is what `python -m mr2ct_jax.main` calls. Running it again
on the same workdir resumes from the latest checkpoint (parameters, optimiser states, image
pools, rng, step and the input iterator), so an interrupted run continues the same run.
"""

import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import tb_logging
from mr2ct_jax import train_state
from mr2ct_jax import train_step as train_step_lib
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import prepare


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN/Inf; the message names the step and the term."""


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data.dir, or the built-in phantom generated and prepared under WORKDIR/phantom.

  On several hosts (WORKDIR on a shared filesystem) process 0 builds the phantom while the
  others wait at a barrier, then reuse the finished build instead of racing to rewrite it.
  """
  if config.data.dir:
    return config.data.dir
  directory = os.path.join(workdir, 'phantom')
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      prepare.prepare_phantom(directory, config)
    multihost_utils.sync_global_devices('mr2ct_jax: phantom prepared')
  return prepare.prepare_phantom(directory, config)


def _check_finite(step: int, metrics: dict[str, float]) -> None:
  for key, value in metrics.items():
    if not math.isfinite(value):
      raise NonFiniteLossError(
          f'step {step}: {key} is {value}; stopping (the last good checkpoint is kept). '
          'Lower optim.lr or check the input data for NaNs.')


def _write_samples(writer: tb_logging.MetricWriter, sample_fn, params: Any,
                   batch: dict[str, Any], step: int) -> None:
  """Image grids: MR | sCT | reconstructed MR, and CT | sMR | reconstructed CT (first 4)."""
  images = jax.device_get(sample_fn(params, batch))
  count = min(4, images['mr'].shape[0])
  for tag, keys in (('samples/mr_to_ct', ('mr', 'fake_ct', 'rec_mr')),
                    ('samples/ct_to_mr', ('ct', 'fake_mr', 'rec_ct'))):
    rows = [[images[k][i, ..., 0] for k in keys] for i in range(count)]
    writer.image(step, tag, tb_logging.image_grid(rows))


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_after: int | None = None) -> tuple[Any, str]:
  """Trains (or resumes) the CycleGAN in `workdir`.

  Args:
    config: the run's config (validated here).
    workdir: checkpoints, TensorBoard logs, config.json; resumed from if it holds a run.
    stop_after: stop (with a checkpoint) once this step is reached, as a pre-empted job would;
      the learning-rate schedule still follows config.train.num_steps.

  Returns:
    (final train state, data_dir used).
  Raises:
    ConfigError: invalid config value (the key is named).
    NonFiniteLossError: a loss became NaN/Inf.
  """
  mesh = train_step_lib.make_mesh()
  config_checks.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_config(workdir, config)
  data_dir = resolve_data_dir(config, workdir)

  data_iter = pipeline.make_unpaired_iterator(config, data_dir)
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(lambda: train_state.create(config, rng))
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)

  manager = checkpointing.make_manager(workdir, max_to_keep=config.train.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    state, iter_state = checkpointing.restore(manager, latest, abstract_state)
    data_iter.set_state(iter_state)
    tb_logging.log_line(f'Resumed from {workdir} at step {latest}.')
  else:
    state = jax.jit(lambda: train_state.create(config, rng), out_shardings=replicated)()
  start_step = int(jax.device_get(state.step))

  step_fn = train_step_lib.make_train_step(config, mesh)
  sample_fn = train_step_lib.make_sample_fn(config)
  writer = tb_logging.MetricWriter(os.path.join(workdir, 'tb'))
  num_steps = config.train.num_steps
  progress = tb_logging.Progress(start_step, num_steps)
  if start_step >= num_steps:
    tb_logging.log_line(f'{workdir}: already trained to step {start_step} >= {num_steps}.')

  last_saved = latest
  step = start_step
  end_step = num_steps if stop_after is None else min(stop_after, num_steps)
  try:
    while step < end_step:
      batch = train_step_lib.shard_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      is_last = step == end_step
      if step % config.train.log_every == 0 or is_last or step == start_step + 1:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, values)
        rate = progress.rate(step)
        compiling = step == start_step + 1
        if not compiling:
          writer.scalars(step, {**values, 'perf/steps_per_sec': rate})
        else:
          writer.scalars(step, values)
        tb_logging.log_line(progress.line(step, rate, values, compiling=compiling))
      if step % config.train.image_every == 0 or is_last:
        _write_samples(writer, sample_fn, state.params, batch, step)
      if step % config.train.checkpoint_every == 0 or is_last:
        # A checkpoint is only written after its step's losses were checked finite.
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, values)
        checkpointing.save(manager, step, state, data_iter.get_state())
        last_saved = step
  except NonFiniteLossError:
    logging.error('Non-finite loss; last good checkpoint: step %s', last_saved)
    raise
  finally:
    data_iter.close()
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
  return state, data_dir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains, then (config.eval.after_training) translates and evaluates the paired test split.

  Returns:
    The evaluation summary, or None when there is no test split or evaluation is off.
  """
  _, data_dir = train(config, workdir)
  if not config.eval.after_training or jax.process_index() != 0:
    return None
  # Imported here so training alone does not need matplotlib/scipy at import time.
  from mr2ct_jax import evaluate  # pylint: disable=g-import-not-at-top
  if not pipeline.has_split(data_dir, 'test'):
    tb_logging.log_line(f'{data_dir}: no paired test split; skipping evaluation.')
    return None
  output = os.path.join(workdir, 'eval')
  return evaluate.evaluate(workdir, data_dir, output, overwrite=True)
