"""Run directories: the saved config and Orbax checkpoints of a train state (both trainers).

Workdir layout:
  WORKDIR/config.json      the run's config (written once, checked on resume)
  WORKDIR/checkpoints/N/   Orbax checkpoint of step N: item 'state' (the CycleGANState pytree)
                           and item 'data_iter' (the input pipeline's iterator state, JSON)
"""

import contextlib
import json
import logging as std_logging
import os
import sys
import tempfile
import threading
from typing import Any, Iterator

import jax
from absl import logging
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mr2ct_jax import atomic
from mr2ct_jax import storage

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A workdir or checkpoint cannot be used; the message names the path."""


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Serialises a config (tuples become lists) to indented JSON."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _restore_tuples(config_dict: dict[str, Any],
                    reference: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """JSON has no tuples: convert lists back where the reference config holds tuples."""
  for key, value in config_dict.items():
    if isinstance(value, dict):
      sub = reference.get(key) if reference is not None else None
      _restore_tuples(value, sub)
    elif isinstance(value, list):
      config_dict[key] = tuple(value)
  return config_dict


# Fields that choose how a run computes, not what: a resumed run may change them, so a
# checkpoint moves between the CPU and GPU code paths. data.prepare_defaults only says how a
# dataset is made when none is given; the run's own preprocessing is in the data fields.
_CODE_PATH_FIELDS = {'model': ('conv_impl',), 'data': ('prepare_defaults',)}
# Fields added after runs were written, with the value those runs effectively used.
_LEGACY_FIELDS = {'data': {'plane': 'axial', 'num_train_mr': 0, 'num_train_ct': 0,
                           'subset_seed': 0},
                  'model': {'disc_norm': 'instance'},
                  'train': {'ema_decay': 0.0}}
# Phantom sets that only evaluation reads: adding them leaves the training data unchanged.
_EVAL_ONLY_PHANTOM = ('num_val', 'num_test_mr', 'num_test_ct', 'num_labeled_mr')


# Loop settings that are part of the run, beyond the compared sections: with another value a
# resumed run would not continue the same run (the seed draws the batches and the pool's
# choices; the batch size and pool size shape the train state; the checkpoints hold the
# generators' averages only when ema_decay > 0, and the decay weighs them).
_RUN_FIELDS = (('seed',), ('train', 'batch_size'), ('train', 'pool_size'),
               ('train', 'ema_decay'))


def _lookup(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
  """config[k0][k1]... (None where a level is missing)."""
  value: Any = config
  for key in keys:
    if not isinstance(value, dict):
      return None
    value = value.get(key)
  return value


def _differ(a: Any, b: Any) -> bool:
  """Whether two recorded values differ (numbers by value: 0 and 0.0 are one)."""
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
    return float(a) != float(b)
  return a != b


def _with_legacy_fields(config: dict[str, Any]) -> dict[str, Any]:
  for section, fields in _LEGACY_FIELDS.items():
    if isinstance(config.get(section), dict):
      for key, value in fields.items():
        config[section].setdefault(key, value)
  return config


def _compared(config: dict[str, Any], section: str) -> Any:
  """`config[section]` without the fields a resumed run may change."""
  value = _with_legacy_fields(json.loads(json.dumps(config))).get(section)
  if not isinstance(value, dict):
    return value
  value = {k: v for k, v in value.items() if k not in _CODE_PATH_FIELDS.get(section, ())}
  if section == 'data' and isinstance(value.get('phantom'), dict):
    value['phantom'] = {k: v for k, v in value['phantom'].items()
                        if k not in _EVAL_ONLY_PHANTOM}
  return value


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes WORKDIR/config.json; on resume, refuses a config that changes the model or data.

  Raises:
    CheckpointError: the workdir already holds a run whose model/data/loss/optim differ, or
      whose seed, batch size, pool size or weight-average decay (`_RUN_FIELDS`) do.
  """
  storage.makedirs(workdir)
  path = storage.join(workdir, CONFIG_FILE)
  new = json.loads(config_to_json(config))
  if storage.exists(path):
    with storage.open_file(path, encoding='utf-8') as f:
      old = json.load(f)
    for section in ('model', 'data', 'loss', 'optim'):
      compared_old, compared_new = _compared(old, section), _compared(new, section)
      if section == 'data' and 'train_patients' not in compared_old:
        # A run from before training subsets used every patient (num_train_* = 0 checks it).
        compared_new.pop('train_patients', None)
      if compared_old != compared_new:
        raise CheckpointError(
            f'{path}: this workdir holds a run with a different config.{section} '
            f'({old.get(section)} vs {new.get(section)}); use another --workdir')
    old = _with_legacy_fields(json.loads(json.dumps(old)))
    for keys in _RUN_FIELDS:
      old_value, new_value = _lookup(old, keys), _lookup(new, keys)
      if old_value is not None and _differ(old_value, new_value):
        name = 'config.' + '.'.join(keys)
        raise CheckpointError(
            f'{path}: this workdir holds a run with {name}={old_value}, not {new_value}; '
            f'pass --{name}={old_value} to continue it, or use another --workdir')
    # Other loop settings (num_steps, logging cadence, fuse_pairs) may change on resume:
    # record them.
  atomic.write_json(path, new, indent=2, sort_keys=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Loads the config a run in `workdir` was trained with."""
  if not storage.isdir(workdir):
    raise CheckpointError(f'{workdir}: workdir does not exist')
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise CheckpointError(f'{path}: missing; {workdir} is not a mr2ct_jax training workdir')
  try:
    with storage.open_file(path, encoding='utf-8') as f:
      config_dict = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path}: unreadable config ({e})') from e
  return ml_collections.ConfigDict(_restore_tuples(_with_legacy_fields(config_dict), None))


def make_manager(workdir: str, max_to_keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The Orbax CheckpointManager for WORKDIR/checkpoints (items 'state' and 'data_iter')."""
  # A gs:// directory goes to Orbax as is (epath for folders, tensorstore for the arrays).
  directory = storage.absolute(storage.join(workdir, CHECKPOINT_DIR))
  if read_only:
    # Orbax warns that read-only options override max_to_keep etc.: expected, not news.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0, max_to_keep=None)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  # ... and it warns that a read-only directory is read-only; keep those two lines quiet.
  quiet = _DropOrbaxReadOnlyWarnings()
  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(quiet)
  try:
    return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data_iter'))
  finally:
    absl_logger.removeFilter(quiet)


class _DropOrbaxReadOnlyWarnings(std_logging.Filter):
  """Drops Orbax's 'read only' warnings, which restoring from a finished run always hits."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'read only' not in record.getMessage() and 'read_only' not in record.getMessage()


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iter_state: dict[str, Any]) -> None:
  """Saves the train state and the iterator state as checkpoint `step` (async)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(data_iter_state)), force=True)


def _shape_mismatch_message(path: str, target: Any, saved_meta: Any) -> str | None:
  """Names the first parameter whose shape differs between `target` and the checkpoint."""
  target_leaves = dict(jax.tree_util.tree_leaves_with_path(target))
  try:
    saved_leaves = dict(jax.tree_util.tree_leaves_with_path(saved_meta))
  except Exception:  # pylint: disable=broad-except
    return None
  if not set(saved_leaves) & set(target_leaves):
    return None  # nothing in common: unreadable metadata, not another config
  for key, leaf in target_leaves.items():
    saved = saved_leaves.get(key)
    name = jax.tree_util.keystr(key)
    if saved is None:
      return f'{path}: checkpoint has no entry {name}; it was written by another config'
    if tuple(getattr(saved, 'shape', ())) != tuple(np.shape(leaf)):
      return (f'{path}: parameter {name} has shape {tuple(saved.shape)} in the checkpoint but '
              f'{tuple(np.shape(leaf))} in this config; it was written by another config')
  return None


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_replayed_unless_failed() -> Iterator[None]:
  """Holds back what is written to file descriptor 2 in the block; replays it on success.

  When a read of a corrupt checkpoint fails, tensorstore's worker threads keep calling back
  into orbax's closed asyncio loop, and each call prints a traceback straight to fd 2 (a
  thousand lines for one truncated file). A failure is reported as one CheckpointError
  line instead; after a successful restore, any warnings are passed on.
  """
  try:
    saved = os.dup(2)
  except OSError:  # no fd 2 (the process was started with stderr closed): nothing to hold
    yield
    return
  failed = False
  # One holder at a time: overlapping restores in two threads would otherwise restore fd 2
  # to each other's temporary file.
  with _STDERR_LOCK, tempfile.TemporaryFile() as held:
    _flush_stderr()
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      _flush_stderr()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        held.seek(0)
        os.write(2, held.read())


def _flush_stderr() -> None:
  if sys.stderr is not None:  # None when Python started without a stderr
    sys.stderr.flush()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores (state, data_iter_state) of `step` into the structure/shardings of `abstract_state`.

  Raises:
    CheckpointError: the checkpoint does not match `abstract_state` (another config).
  """
  path = os.path.join(str(manager.directory), str(step))
  try:
    with _stderr_replayed_unless_failed():
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    meta = None
    try:
      meta = manager.item_metadata(step).state
    except Exception:  # pylint: disable=broad-except
      pass
    message = _shape_mismatch_message(path, abstract_state, meta) if meta is not None else None
    raise CheckpointError(message or f'{path}: cannot restore; its files may be corrupt or '
                          f'truncated ({str(e).splitlines()[0]})') from e
  return restored.state, restored.data_iter
