"""Loads one trained generator and its run's config from a workdir or an exported .npz.

`load_generator` is the single entry point translate and evaluate use, so a checkpoint and
its export are interchangeable: both give `apply_fn(batch) -> batch` on NHWC float32 images in
the model range [-1, 1], the config the generator was trained with, and where it came from.
"""

import dataclasses
import functools
import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import storage
from mr2ct_jax.inference import numpy_generator
from mr2ct_jax.inference import slices
from mr2ct_jax.models import cyclegan
from mr2ct_jax.training import state as state_lib

# Translation direction -> the CycleGAN network that performs it (G_ct: MR->CT, G_mr: CT->MR).
DIRECTIONS = numpy_generator.NETWORKS
BACKENDS = ('jax', 'numpy')

ApplyFn = slices.ApplyFn


class SourceError(ValueError):
  """The source cannot provide the requested generator; the message starts with the path."""


@dataclasses.dataclass(frozen=True)
class GeneratorInfo:
  """Where a loaded generator came from.

  Attributes:
    source: the workdir or .npz path as given.
    kind: 'workdir' or 'npz'.
    direction: 'mr2ct' or 'ct2mr'.
    network: 'g_ct' or 'g_mr'.
    step: the training step of the weights (None if an export does not record it).
    backend: 'jax' or 'numpy' (what runs the forward pass).
    flip_average: whether apply_fn averages the output with its left-right mirror's.
  """
  source: str
  kind: str
  direction: str
  network: str
  step: int | None
  backend: str
  flip_average: bool = False


def network_for(direction: str) -> str:
  """Returns the parameter-tree name ('g_ct'/'g_mr') of the generator for `direction`."""
  if direction not in DIRECTIONS:
    raise SourceError(f'direction={direction!r}: must be one of {tuple(DIRECTIONS)}')
  return DIRECTIONS[direction]


def source_kind(source: str) -> str:
  """Returns 'npz' for an exported file, 'workdir' for a run directory (SourceError if neither)."""
  if storage.isdir(source):
    return 'workdir'
  if storage.isfile(source):
    if source.endswith('.npz'):
      return 'npz'
    raise SourceError(f'{source}: not a workdir (directory) or an exported .npz file')
  raise SourceError(f'{source}: no such workdir or .npz file')


def _strip_variables(tree: Any) -> Any:
  """Accepts a params tree either bare or wrapped as flax variables {'params': ...}."""
  if isinstance(tree, dict) and set(tree) == {'params'}:
    return tree['params']
  return tree


def build_generator(config: ml_collections.ConfigDict, where: str) -> Any:
  """The generator module of a run's `config.model`.

  Memoised per model config: loading both directions, several steps or an export of the
  same run builds it once.

  Raises:
    SourceError: the config cannot build one (a field missing or invalid, e.g. a config
      written by another version of mr2ct_jax).
  """
  try:
    return _generator(json.dumps(config.model.to_dict(), sort_keys=True))
  except (AttributeError, KeyError, ValueError) as e:
    raise SourceError(f'{where}: its config cannot build a generator ({_one_line(e)}); was it '
                      'written by another version of mr2ct_jax?') from e


@functools.lru_cache(maxsize=8)
def _generator(model_json: str) -> Any:
  return cyclegan.build(ml_collections.ConfigDict(json.loads(model_json)))[0]


def expected_param_shapes(generator: Any) -> dict[str, tuple[int, ...]]:
  """Flattened 'Conv_0/kernel' -> shape of the parameters of `generator` (no FLOPs)."""
  size = 16  # any size divisible by 4 works for a fully convolutional generator
  shapes = jax.eval_shape(generator.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
  flat = traverse_util.flatten_dict(_strip_variables(dict(shapes)), sep='/')
  return {name: tuple(leaf.shape) for name, leaf in flat.items()}


def check_params(params: Any, generator: Any, config: ml_collections.ConfigDict,
                 where: str) -> None:
  """Raises SourceError (one line) if `params` does not fit the generator of `config`.

  A checkpoint written by a run with another model config (e.g. other ngf or number of
  residual blocks) restores fine as raw arrays but would fail deep inside apply; naming the
  first mismatching parameter here tells the user which config the weights belong to.
  """
  expected = expected_param_shapes(generator)
  flat = traverse_util.flatten_dict(_strip_variables(params), sep='/')
  got = {name: tuple(np.shape(leaf)) for name, leaf in flat.items()}
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing or extra:
    detail = f'missing {missing[0]!r}' if missing else f'unexpected {extra[0]!r}'
    raise SourceError(
        f'{where}: parameters do not match the config (model.ngf={config.model.ngf}, '
        f'model.num_res_blocks={config.model.num_res_blocks}): {detail} '
        f'({len(missing)} missing, {len(extra)} unexpected); checkpoint from another config?')
  for name in sorted(expected):
    if expected[name] != got[name]:
      raise SourceError(
          f'{where}: parameter {name} has shape {got[name]} but the config '
          f'(model.ngf={config.model.ngf}, model.num_res_blocks={config.model.num_res_blocks}) '
          f'expects {expected[name]}; checkpoint from another config?')


def restore_generators(workdir: str, networks: tuple[str, ...], step: int | None = None
                       ) -> tuple[dict[str, Any], ml_collections.ConfigDict, int | None]:
  """Restores generator parameter trees of a training workdir, checked against its config.

  Args:
    workdir: WORKDIR with config.json and checkpoints/.
    networks: names among 'g_ct', 'g_mr'.
    step: checkpoint step (None: the latest).

  Returns:
    ({network: params tree (NumPy arrays, no 'params' wrapper)}, config, restored step).

  Raises:
    SourceError: missing workdir/config, no checkpoint, unknown step, or weights that do not
      fit the workdir's config (one line naming the path and the parameter).
  """
  if storage.isfile(workdir):
    raise SourceError(f'{workdir}: is a file, not a training workdir (an export .npz goes to '
                      f'--npz)')
  if not storage.isdir(workdir):
    raise SourceError(f'{workdir}: workdir does not exist')
  if not storage.isfile(storage.join(workdir, checkpointing.CONFIG_FILE)):
    raise SourceError(f'{workdir}: no {checkpointing.CONFIG_FILE}; not a training workdir')
  ckpt_dir = storage.join(workdir, checkpointing.CHECKPOINT_DIR)
  if not storage.isdir(ckpt_dir) or not any(name.isdigit()
                                            for name in storage.listdir(ckpt_dir)):
    raise SourceError(f'{workdir}: no checkpoint in {ckpt_dir} (train first)')
  try:
    config = checkpointing.load_config(workdir)
    params, restored_step = restore_all_params(workdir, step=step)
  except checkpointing.CheckpointError as e:
    raise SourceError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    at = f'step {step}' if step is not None else 'the latest step'
    raise SourceError(f'{ckpt_dir}: cannot restore {at}: {_one_line(e)}') from e
  generator = build_generator(config, workdir)
  trees = {}
  for network in networks:
    if network not in params:
      raise SourceError(f'{ckpt_dir}: checkpoint has no generator {network!r} '
                        f'(has {sorted(params)})')
    trees[network] = _strip_variables(params[network])
    check_params(trees[network], generator, config,
                 f'{ckpt_dir} step {restored_step} {network}')
  return trees, config, (None if restored_step is None else int(restored_step))


def weights_kind(config: ml_collections.ConfigDict) -> str:
  """'ema' if the run keeps its generators' parameter averages (train.ema_decay > 0), which
  translation, evaluation and export use, else 'last' (the weights of the last step)."""
  return 'ema' if float(config.train.get('ema_decay', 0.0)) > 0 else 'last'


def restore_all_params(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Loads the four networks' parameters of a run (latest step unless `step` is given).

  The generators are the weights translation uses (`weights_kind`): their averages when the
  run keeps them, else the step's own weights.

  Returns:
    (params, step): params is {'g_ct', 'g_mr', 'd_ct', 'd_mr'} of NumPy arrays.
  Raises:
    CheckpointError: missing workdir, no checkpoint, unknown step, or another config's shapes.
  """
  config = checkpointing.load_config(workdir)
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise checkpointing.CheckpointError(
        f'{os.path.join(workdir, checkpointing.CHECKPOINT_DIR)}: no checkpoint found')
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise checkpointing.CheckpointError(
        f'{workdir}: no checkpoint for step {step} (have {sorted(steps)})')
  gan = state_lib.build(config)
  abstract = jax.eval_shape(lambda: state_lib.create(gan, config, jax.random.PRNGKey(0)))
  abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  state, _ = checkpointing.restore(manager, step, abstract)
  manager.close()
  return jax.tree.map(np.asarray, state_lib.inference_params(state.params)), int(step)


def _load_from_npz(path: str, network: str,
                   step: int | None) -> tuple[Any, ml_collections.ConfigDict, int | None]:
  try:
    if storage.is_remote(path):  # read whole: the zip reader seeks
      export = numpy_generator.read_export(path, io.BytesIO(storage.read_bytes(path)))
    else:
      export = numpy_generator.read_export(path)
  except numpy_generator.ExportError as e:
    raise SourceError(str(e)) from e
  if network not in export.params:
    raise SourceError(f'{path}: export has no generator {network!r} (has '
                      f'{sorted(export.params)}); export with --direction=both or the other '
                      f'direction')
  export_step = export.meta.get('step')
  if step is not None and step != export_step:
    raise SourceError(f'{path}: --step={step} requested but this export holds step '
                      f'{export_step}; step selects a checkpoint only for workdir sources')
  config = config_from_dict(export.config)
  tree = traverse_util.unflatten_dict(export.params[network], sep='/')
  check_params(tree, build_generator(config, path), config, path)
  return tree, config, export_step


def load_params(source: str, direction: str = 'mr2ct', step: int | None = None
                ) -> tuple[Any, ml_collections.ConfigDict, GeneratorInfo]:
  """Loads a generator's parameter tree (numpy/jax arrays) and its run's config.

  Args:
    source: a training workdir (WORKDIR/config.json + WORKDIR/checkpoints/) or an .npz written
      by `mr2ct_jax.export`.
    direction: 'mr2ct' (G_ct) or 'ct2mr' (G_mr).
    step: checkpoint step for a workdir (None: the latest).

  Returns:
    (params tree without the 'params' wrapper, config, info with backend 'jax').
  """
  network = network_for(direction)
  kind = source_kind(source)
  if kind == 'workdir':
    trees, config, got_step = restore_generators(source, (network,), step)
    params = trees[network]
  else:
    params, config, got_step = _load_from_npz(source, network, step)
  config = with_preprocessing(config, source)
  info = GeneratorInfo(source=source, kind=kind, direction=direction, network=network,
                       step=got_step, backend='jax')
  return params, config, info


def make_apply_fn(params: Any, generator: Any) -> ApplyFn:
  """Returns a jitted NHWC [-1, 1] -> [-1, 1] forward of `generator` with `params`.

  Parameters are an argument of the jitted function (not closed-over constants), so XLA does
  not fold 11M weights into the program; jit compiles once per batch shape.
  """
  variables = {'params': jax.device_put(jax.tree.map(jnp.asarray, params))}
  jitted = jax.jit(generator.apply)

  def apply_fn(batch: np.ndarray) -> np.ndarray:
    return np.asarray(jitted(variables, jnp.asarray(batch, jnp.float32)), np.float32)

  return apply_fn


def load_generator(source: str, direction: str = 'mr2ct', step: int | None = None,
                   backend: str = 'jax', flip_average: bool | None = None
                   ) -> tuple[ApplyFn, ml_collections.ConfigDict, GeneratorInfo]:
  """Loads a generator ready to run, from a workdir (latest or `step`) or an exported .npz.

  Args:
    source: a training workdir or an .npz from `mr2ct_jax.export`.
    direction: 'mr2ct' (MR -> synthetic CT, G_ct) or 'ct2mr' (CT -> synthetic MR, G_mr).
    step: checkpoint step of a workdir (None: the latest). For an .npz it must be None or
      the exported step.
    backend: 'jax' (jitted flax apply) or 'numpy' (the pure-NumPy forward of
      `numpy_generator`; same numbers within 1e-4, slower).
    flip_average: average each batch's output with that of its left-right mirror
      (`slices.flip_averaged`); None: as the run's config.eval.flip_average says (off for
      sagittal slices, which have no left-right axis).

  Returns:
    (apply_fn, config, info): apply_fn maps float32 [B, H, W, 1] in [-1, 1] (H, W divisible
    by 4) to float32 [B, H, W, 1] in [-1, 1]; config is the training run's config.

  Raises:
    SourceError: one-line message for a missing/invalid source, no checkpoint, a checkpoint
      whose shapes do not fit its config, or a missing direction in an export.
  """
  if backend not in BACKENDS:
    raise SourceError(f'backend={backend!r}: must be one of {BACKENDS}')
  params, config, info = load_params(source, direction, step)
  if backend == 'numpy':
    flat = traverse_util.flatten_dict(params, sep='/')
    net = numpy_generator.NumpyGenerator(
        {name: np.asarray(leaf, np.float32) for name, leaf in flat.items()},
        num_res_blocks=config.model.num_res_blocks)
    apply_fn = net
  else:
    apply_fn = make_apply_fn(params, build_generator(config, source))
  if flip_average is None:
    flip_average = slices.flip_average_wanted(config, config.data.get('plane'))
  if flip_average:
    apply_fn = slices.flip_averaged(apply_fn)
  return apply_fn, config, dataclasses.replace(info, backend=backend,
                                               flip_average=bool(flip_average))


# The preprocessing a run records from its dataset (mr2ct_jax.data.dataset.PREPROCESSING_KEYS;
# not imported here: the data modules pull in SciPy and SimpleITK).
PREPROCESSING_KEYS = ('spacing_mm', 'image_size', 'mr_percentile', 'n4', 'plane')


def with_preprocessing(config: ml_collections.ConfigDict,
                       where: str) -> ml_collections.ConfigDict:
  """`config` of a trained run, checked to record every preprocessing value.

  A run records its dataset's preprocessing in its config when training starts; configs from
  before the slice plane was recorded sliced axially.

  Raises:
    SourceError: a value is missing (the config was never filled from a dataset).
  """
  if 'plane' not in config.data:
    config.data.plane = 'axial'
  for key in PREPROCESSING_KEYS:
    if config.data.get(key) is None:
      raise SourceError(f'{where}: its config records no data.{key} (a run records its '
                        'dataset\'s preprocessing when training starts); train it first')
  try:
    config_checks.check_recorded_preprocessing(config)
  except config_checks.ConfigError as e:
    raise SourceError(f'{where}: its {e}') from e
  return config


def config_from_dict(config_dict: dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from JSON-decoded data; lists become tuples as in the Python configs."""
  def convert(value: Any) -> Any:
    if isinstance(value, dict):
      return {key: convert(item) for key, item in value.items()}
    if isinstance(value, list):
      return tuple(convert(item) for item in value)
    return value
  return ml_collections.ConfigDict(convert(config_dict))


def _one_line(error: Exception) -> str:
  text = f'{type(error).__name__}: {error}'
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return first[:300]
