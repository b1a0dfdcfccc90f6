"""The training loop: data, jitted CycleGAN+GC step over a device mesh, checkpoints, logging.

`train_and_evaluate(config, workdir)` is what `python -m mr2ct_jax.main` calls. Running it again
on the same workdir resumes from the latest checkpoint (parameters, optimiser states, image
pools, rng, step and the input iterator), so an interrupted run continues the same run.
Every config.eval.every steps the `val` split is scored (`validation`), without touching the
train state, the rng or the input iterator.
"""

import math
from typing import Any

import jax
import ml_collections
from absl import logging

from mr2ct_jax import atomic
from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import parallel
from mr2ct_jax import preemption
from mr2ct_jax import storage
from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import resolve
from mr2ct_jax.evaluation import paired
from mr2ct_jax.training import state as state_lib
from mr2ct_jax.training import step as step_lib
from mr2ct_jax.training import validation


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN/Inf; the message names the step and the term."""


def _check_finite(step: int, metrics: dict[str, float]) -> None:
  for key, value in metrics.items():
    if not math.isfinite(value):
      raise NonFiniteLossError(
          f'step {step}: {key} is {value}; stopping (the last good checkpoint is kept). '
          'Lower optim.lr or check the input data for NaNs.')


def _write_samples(writer: tb_logging.MetricWriter, sample_fn, params: Any,
                   batch: dict[str, Any], step: int) -> None:
  """Image grids: MR | sCT | reconstructed MR, and CT | sMR | reconstructed CT (first 4)."""
  images = jax.tree.map(parallel.local_rows, sample_fn(params, batch))
  count = min(4, images['mr'].shape[0])
  for tag, keys in (('samples/mr_to_ct', ('mr', 'fake_ct', 'rec_mr')),
                    ('samples/ct_to_mr', ('ct', 'fake_mr', 'rec_ct'))):
    rows = [[images[k][i, ..., 0] for k in keys] for i in range(count)]
    writer.image(step, tag, tb_logging.image_grid(rows))


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_after: int | None = None) -> tuple[Any, str]:
  """Trains (or resumes) the CycleGAN in `workdir`.

  Args:
    config: the run's config (validated here); its preprocessing fields left None are filled
      from the dataset (`resolve.resolve_preprocessing`), and WORKDIR/config.json records them.
    workdir: checkpoints, TensorBoard logs, config.json; resumed from if it holds a run.
    stop_after: stop (with a checkpoint) once this step is reached, as a pre-empted job would;
      the learning-rate schedule still follows config.train.num_steps.

  Returns:
    (final train state, data_dir used).
  Raises:
    ConfigError: invalid config value (the key is named).
    NonFiniteLossError: a loss became NaN/Inf.
    preemption.Preempted: SIGTERM/SIGINT arrived; the step it stopped at is checkpointed.
  """
  # StopSignals from the start: setup can take minutes.
  with preemption.StopSignals() as stop, atomic.removed_if_left_empty(workdir):
    mesh = parallel.make_mesh()
    config_checks.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
    if storage.exists(workdir) and not storage.isdir(workdir):
      raise config_checks.ConfigError(f'--workdir={workdir}: a file, not a folder')
    try:
      storage.makedirs(workdir)  # a gs:// workdir: checks that gcsfs is installed
    except OSError as e:  # a file where a parent folder should be, a read-only disk...
      raise config_checks.ConfigError(
          f'--workdir={workdir}: cannot create it: {e.strerror or e}') from e
    data_dir = resolve.resolve_data_dir(config, workdir)
    # Preprocessing fields left None are the dataset's: the run records (and resumes with)
    # the filled config, which translate and evaluate apply to new volumes.
    config = resolve.resolve_preprocessing(config, data_dir)
    config = resolve.resolve_training_subset(config, data_dir)
    tb_logging.log_line('Training patients: ' + ', '.join(
        f'{len(ids)} {split}' for split, ids in config.data.train_patients.items()) + '.')
    config_checks.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
    checkpointing.save_config(workdir, config)

    data_iter = pipeline.make_unpaired_iterator(config, data_dir)
    gan = state_lib.build(config)
    create = lambda rng: state_lib.create(gan, config, rng)
    rng = jax.random.PRNGKey(config.seed)
    manager = checkpointing.make_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
      target = parallel.abstract_replicated(jax.eval_shape(create, rng), mesh)
      state, iter_state = checkpointing.restore(manager, latest, target)
      data_iter.set_state(iter_state)
      tb_logging.log_line(f'Resumed from {workdir} at step {latest}.')
    else:
      state = parallel.create_replicated(create, mesh, rng)
    start_step = int(jax.device_get(state.step))

    step_fn = step_lib.make_train_step(gan, config, mesh)
    sample_fn = step_lib.make_sample_fn(gan)
    validator = validation.Validator(config, data_dir, gan.generator)
    writer = tb_logging.MetricWriter(storage.join(workdir, 'tb'))
    num_steps = config.train.num_steps
    progress = tb_logging.Progress(start_step, num_steps)
    if start_step >= num_steps:
      tb_logging.log_line(f'{workdir}: already trained to step {start_step} >= {num_steps}.')

    last_saved = latest
    step = start_step
    end_step = num_steps if stop_after is None else min(stop_after, num_steps)
    try:
      while step < end_step:
        batch = parallel.shard_batch(next(data_iter), mesh)
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
          _write_samples(writer, sample_fn, state_lib.inference_params(state.params), batch,
                         step)
        stopping = stop.should_stop(step, 1 if is_last else config.train.log_every)
        if step % config.train.checkpoint_every == 0 or is_last or stopping:
          # A checkpoint is only written after its step's losses were checked finite.
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(step, values)
          checkpointing.save(manager, step, state, data_iter.get_state())
          last_saved = step
          writer.sync()  # a gs:// logdir gets its events with each checkpoint
        if validator.due(step) and not stopping:  # a signal: exit first, the rerun validates
          validator.run(step, state_lib.inference_params(state.params), writer)
        if stopping:  # also at the last step: evaluation is skipped, the rerun does it
          raise preemption.Preempted(step)  # `finally` waits for the checkpoint to be written
    except NonFiniteLossError:
      logging.error('Non-finite loss; last good checkpoint: step %s', last_saved)
      raise
    finally:
      manager.wait_until_finished()  # first: a pending checkpoint must not wait on anything
      data_iter.close()
      manager.close()
      writer.flush()
      writer.close()
    if stop.should_stop():  # a signal during set-up, or with no step left to train
      raise preemption.Preempted(step)
  return state, data_dir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains, then (config.eval.after_training) translates and evaluates the test splits.

  Returns:
    The evaluation summary, or None when there is no test split or evaluation is off.
  """
  _, data_dir = train(config, workdir)
  if not config.eval.after_training or jax.process_index() != 0:
    return None
  if not any(dataset.has_split(data_dir, s) for s in ('test', 'test_mr', 'test_ct')):
    tb_logging.log_line(f'{data_dir}: no test split (paired or unpaired); skipping '
                        'evaluation.')
    return None
  output = storage.join(workdir, 'eval')
  return paired.evaluate(workdir, data_dir, output, overwrite=True)
