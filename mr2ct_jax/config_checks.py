"""Validation of config values, so a bad value fails at start-up with the key named."""

from typing import Any

import ml_collections

# JAX-free (prepare checks configs and must start fast).
from mr2ct_jax.models import options as model_options

# The slice planes (mr2ct_jax.data.preprocess.PLANE_AXES; not imported: SciPy, SimpleITK).
PLANES = ('axial', 'coronal', 'sagittal')


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


def _require(ok: bool, key: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f'config.{key}={value!r}: {why}')


def _check_window(config: ml_collections.ConfigDict, key: str) -> None:
  window = config.data[key]
  if key == 'ct_window' and len(window) == 4:
    _require(all(float(a) < float(b) for a, b in zip(window, window[1:])), f'data.{key}',
             window, 'must be 4 increasing knots (air, soft-tissue low, high, bone)')
    return
  _require(len(window) == 2 and float(window[0]) < float(window[1]), f'data.{key}', window,
           'must be (low, high) with low < high' + (', or 4 increasing knots'
                                                   if key == 'ct_window' else ''))


def _check_dtype(name: str, key: str) -> None:
  _require(name in model_options.DTYPE_NAMES, key, name,
           f'must be one of {model_options.DTYPE_NAMES}')


def _check_preprocessing(section: ml_collections.ConfigDict, prefix: str,
                         allow_none: bool) -> None:
  """The preprocessing fields of config.data or config.data.prepare_defaults."""
  checks = {
      'image_size': (lambda v: int(v) == v and v >= 16 and v % 4 == 0,
                     'must be >= 16 and divisible by 4 (two stride-2 downsamplings)'),
      'spacing_mm': (lambda v: v > 0, 'must be > 0'),
      'mr_percentile': (lambda v: 0 < v <= 100, 'must be in (0, 100]'),
      'n4': (lambda v: isinstance(v, bool), 'must be True or False'),
      'plane': (lambda v: v in PLANES, f'must be one of {PLANES}'),
  }
  for key, (ok, why) in checks.items():
    value = section.get(key)
    if value is None:
      _require(allow_none, f'{prefix}.{key}', value, 'must be set')
      continue
    _require(ok(value), f'{prefix}.{key}', value, why)


def check_recorded_preprocessing(config: ml_collections.ConfigDict) -> None:
  """The preprocessing and windows a trained run recorded (e.g. an export's config).

  Raises:
    ConfigError: a value is missing, of the wrong type or out of range (one line, the key).
  """
  try:
    _check_preprocessing(config.data, 'data', allow_none=False)
    for key in ('ct_window', 'mr_window'):
      _check_window(config, key)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ConfigError(f'config.data: unusable recorded preprocessing ({type(e).__name__}: '
                      f'{e})') from e


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_processes: int = 1) -> None:
  """Raises ConfigError naming the first invalid key of `config`.

  Args:
    config: a config from `configs/*.py`, possibly overridden on the command line.
    num_devices: devices the global batch is split over.
    num_processes: JAX processes the global batch is split over.
  """
  data, model, loss, optim, train = (config.data, config.model, config.loss, config.optim,
                                     config.train)
  # None: from the dataset (checked once filled); prepare_defaults must always be set.
  _check_preprocessing(data, 'data', allow_none=True)
  if 'prepare_defaults' in data:  # a run's config.json from before it existed has all values
    _check_preprocessing(data.prepare_defaults, 'data.prepare_defaults', allow_none=False)
  _check_window(config, 'ct_window')
  _check_window(config, 'mr_window')
  _require(0 <= data.crop_pad_fraction < 1, 'data.crop_pad_fraction', data.crop_pad_fraction,
           'must be in [0, 1)')
  _require(data.num_workers >= 0, 'data.num_workers', data.num_workers, 'must be >= 0')
  _require(data.prefetch >= 0, 'data.prefetch', data.prefetch, 'must be >= 0')
  for key in ('num_train_mr', 'num_train_ct', 'num_labeled', 'num_test', 'num_slices'):
    value = data.phantom[key]
    _require(value >= 1, f'data.phantom.{key}', value, 'must be >= 1')
  for key in ('num_val', 'num_test_mr', 'num_test_ct', 'num_labeled_mr'):
    if key in data.phantom:  # a run's config.json from before they existed has none
      value = data.phantom[key]
      _require(value >= 0, f'data.phantom.{key}', value, 'must be >= 0 (0: no such split)')
  for key in ('num_train_mr', 'num_train_ct'):
    if key in data:
      _require(data[key] >= 0, f'data.{key}', data[key], 'must be >= 0 (0: all patients)')

  for key in ('ngf', 'ndf', 'num_disc_layers'):
    _require(model[key] >= 1, f'model.{key}', model[key], 'must be >= 1')
  _require(model.num_res_blocks >= 0, 'model.num_res_blocks', model.num_res_blocks, 'must be >= 0')
  _check_dtype(model.dtype, 'model.dtype')
  if 'disc_norm' in model:  # a run's config.json from before it existed has none
    _require(model.disc_norm in model_options.DISC_NORMS, 'model.disc_norm', model.disc_norm,
             f'must be one of {model_options.DISC_NORMS}')
  try:
    model_options.resolve_conv_impl(model.conv_impl, 'cpu')
  except ValueError:
    _require(False, 'model.conv_impl', model.conv_impl,
             f'must be one of {model_options.CONV_IMPLS}')

  for key in ('cycle_weight', 'gc_weight', 'identity_weight'):
    _require(loss[key] >= 0, f'loss.{key}', loss[key], 'must be >= 0 (a loss weight)')
  _require(loss.gc_eps > 0, 'loss.gc_eps', loss.gc_eps, 'must be > 0')

  _require(optim.lr > 0, 'optim.lr', optim.lr, 'must be > 0')
  for key in ('b1', 'b2'):
    _require(0 <= optim[key] < 1, f'optim.{key}', optim[key], 'must be in [0, 1)')
  _require(0 <= optim.decay_start_fraction <= 1, 'optim.decay_start_fraction',
           optim.decay_start_fraction, 'must be in [0, 1]')

  _require(train.num_steps >= 1, 'train.num_steps', train.num_steps, 'must be >= 1')
  _require(train.batch_size >= 1, 'train.batch_size', train.batch_size, 'must be >= 1')
  _require(train.batch_size % num_devices == 0, 'train.batch_size', train.batch_size,
           f'must be divisible by the number of devices ({num_devices})')
  _require(train.batch_size % num_processes == 0, 'train.batch_size', train.batch_size,
           f'must be divisible by the number of processes ({num_processes})')
  _require(train.pool_size >= 0, 'train.pool_size', train.pool_size, 'must be >= 0')
  _require(0 <= train.ema_decay < 1, 'train.ema_decay', train.ema_decay,
           'must be in [0, 1) (0: no parameter average)')
  for key in ('log_every', 'image_every', 'checkpoint_every', 'keep_checkpoints'):
    _require(train[key] >= 1, f'train.{key}', train[key], 'must be >= 1')
  _require(config.eval.batch_size >= 1, 'eval.batch_size', config.eval.batch_size, 'must be >= 1')
  if 'every' in config.eval:  # a run's config.json from before validation while training
    _require(int(config.eval.every) == config.eval.every and config.eval.every >= 0,
             'eval.every', config.eval.every, 'must be an integer >= 0 (0: no validation)')
  _validate_seg(config)


def _validate_seg(config: ml_collections.ConfigDict) -> None:
  """Checks config.seg (the downstream U-Net); the batch/device split is checked at its start."""
  seg = config.seg
  for key in ('base_filters', 'depth', 'num_steps', 'batch_size', 'log_every',
              'checkpoint_every', 'keep_checkpoints', 'eval_batch_size'):
    _require(int(seg[key]) == seg[key] and seg[key] >= 1, f'seg.{key}', seg[key],
             'must be an integer >= 1')
  # None: from the labeled data (segmentation.labels.resolve_num_classes checks a set value).
  num_classes = seg.get('num_classes')
  _require(num_classes is None or (int(num_classes) == num_classes and num_classes >= 2),
           'seg.num_classes', num_classes,
           'must be None (from the data) or an integer >= 2 (background and a structure)')
  folds = seg.get('baseline_folds', 5)
  _require(int(folds) == folds and folds >= 2, 'seg.baseline_folds', folds,
           'must be an integer >= 2 (folds of the cross-validation)')
  size = config.data.image_size  # None: the dataset's, checked when the run fills it
  _require(size is None or size % 2 ** seg.depth == 0, 'seg.depth', seg.depth,
           f'2**depth must divide data.image_size={size} (one 2x2 pooling per level)')
  _require(seg.lr > 0, 'seg.lr', seg.lr, 'must be > 0')
  _require(seg.dice_loss_weight >= 0, 'seg.dice_loss_weight', seg.dice_loss_weight,
           'must be >= 0 (a loss weight)')
  _check_dtype(seg.dtype, 'seg.dtype')
