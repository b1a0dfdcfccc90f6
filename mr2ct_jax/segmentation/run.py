"""The segmentation command as a library call: sMR cache -> train U-Net -> Dice on the test MR.

Layout of the segmentation directory (default WORKDIR/seg):
  run.json                  the generator step the U-Net is built on, the data dir and the
                            seg config (a resumed run keeps the generator step; changing the
                            U-Net architecture in the same directory is refused)
  cache/labeled_g<STEP>.npz CT, sMR = G_mr(CT) and labels of the labeled split (model range)
  checkpoints/<N>/          Orbax checkpoints of the U-Net train state (resumed automatically)
  tb/                       TensorBoard scalars
  eval/                     the evaluation (atomic; an existing one needs overwrite=True)
"""

import json
import os
from typing import Any

import jax
import ml_collections

from mr2ct_jax import atomic
from mr2ct_jax import config_checks
from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import resolve
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import generators
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import evaluate as seg_eval
from mr2ct_jax.segmentation import train as seg_train

RUN_FILE = 'run.json'
EVAL_OWN_FILE = 'per_volume.json'  # written by seg_eval.write_outputs into every eval/
EVAL_DIR = 'eval'
_ARCH_KEYS = ('base_filters', 'depth', 'num_classes')


class SegmentationError(ValueError):
  """The segmentation run cannot proceed; the one-line message names the path or key."""


def _read_run_file(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SegmentationError(f'{path}: unreadable ({e}); remove it to start a new run') from e


def _write_run_file(path: str, info: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.write_json(path, info, indent=2, sort_keys=True)


def segmentation_config(run_config: ml_collections.ConfigDict,
                        seg_override: ml_collections.ConfigDict | None,
                        steps: int | None, where: str) -> ml_collections.ConfigDict:
  """The CycleGAN run's config with the `seg` section to use (validated).

  Args:
    run_config: the config the generators were trained with (its data windows apply).
    seg_override: a `seg` section from a config file (None: the run's own).
    steps: overrides seg.num_steps.
    where: the workdir, for the error message.
  """
  config = ml_collections.ConfigDict(run_config.to_dict())
  if seg_override is not None:
    config.seg = ml_collections.ConfigDict(seg_override.to_dict())
  if 'seg' not in config:
    raise SegmentationError(f'{where}: the run\'s config.json has no seg section; pass '
                            '--config=configs/gc.py[:variant] for one')
  if steps is not None:
    config.seg.num_steps = int(steps)
  try:
    config_checks.validate(config)
  except (AttributeError, KeyError) as e:  # a field this version expects is missing
    raise SegmentationError(f'{where}: the run\'s config.json lacks {e}; was it written by '
                            'another version of mr2ct_jax?') from e
  return config


def run(workdir: str, data_dir: str | None = None, output: str | None = None, *,
        steps: int | None = None, overwrite: bool = False,
        seg_config: ml_collections.ConfigDict | None = None) -> dict[str, Any] | None:
  """Trains (or resumes) the U-Net on labeled CT + sMR and evaluates it on the test MR.

  Args:
    workdir: the CycleGAN training workdir (its generators are used frozen).
    data_dir: prepared dataset with `labeled` and `test` splits; None: the run config's
      data.dir, or the phantom under WORKDIR/phantom.
    output: the segmentation directory (default WORKDIR/seg; see the module docstring).
    steps: train to this many steps (default config.seg.num_steps).
    overwrite: replace an existing OUTPUT/eval.
    seg_config: a `seg` config section overriding the run's.

  Returns:
    The evaluation summary (Dice mean/sd per structure, ...; also OUTPUT/eval/summary.json),
    or None on processes other than 0. The summary table is printed.

  Raises:
    SegmentationError, seg_data.SegDataError, ConfigError, generators.SourceError,
    checkpointing.CheckpointError, reports.ReportError, DatasetError: one-line messages.
  """
  output = os.path.abspath(output or os.path.join(workdir, 'seg'))
  eval_dir = os.path.join(output, EVAL_DIR)
  # Fail before any work; --overwrite replaces only an earlier evaluation (per_volume.json).
  reports.check_output_dir(eval_dir, overwrite, EVAL_OWN_FILE)
  run_path = os.path.join(output, RUN_FILE)
  previous = _read_run_file(run_path)
  pinned = previous.get('generator_step') if previous else None
  try:
    smr_fn, run_config, info = generators.load_generator(workdir, 'ct2mr', pinned)
  except generators.SourceError as e:
    if pinned is None:
      raise
    # The U-Net was trained on this step's sMR: another step would silently change its input.
    raise SegmentationError(f'{run_path}: this segmentation run uses the generators of step '
                            f'{pinned}, which cannot be loaded ({e}); use another --output') from e
  sct_fn, _, _ = generators.load_generator(workdir, 'mr2ct', info.step)
  config = segmentation_config(run_config, seg_config, steps, workdir)

  data_dir = os.path.abspath(resolve.resolve_data_dir(config, workdir, data_dir))
  seg_data.check_data_dir(data_dir, config, seg_data.LABELED_SPLIT)
  seg_data.check_data_dir(data_dir, config, 'test')

  if previous:
    for key in _ARCH_KEYS:
      if previous.get('seg', {}).get(key) != config.seg[key]:
        raise SegmentationError(
            f'{run_path}: this segmentation run has seg.{key}={previous["seg"].get(key)!r}, '
            f'the config asks for {config.seg[key]!r}; use another --output')
  is_main = jax.process_index() == 0
  if is_main:
    _write_run_file(run_path, {'workdir': os.path.abspath(workdir), 'data_dir': data_dir,
                               'generator_step': info.step, 'seg': config.seg.to_dict()})
  tb_logging.log_line(f'Segmentation in {output}: generators of {workdir} at step {info.step}, '
                      f'data {data_dir}.')
  step_tag = 'none' if info.step is None else str(info.step)
  labeled = seg_data.load_labeled_set(
      data_dir, config, smr_fn, cache_path=os.path.join(output, 'cache',
                                                        f'labeled_g{step_tag}.npz'),
      generator_step=info.step, write_cache=is_main)
  tb_logging.log_line(f'Segmentation: {labeled.num_slices} labeled CT slices with sMR.')
  seg_train.train(config, output, labeled, run_info={'generator_step': info.step})
  if not is_main:
    return None

  params, unet_step = seg_train.restore_params(output, config)
  predict_fn = seg_eval.make_predict_fn(params, config)
  names = seg_eval.structure_names(int(config.seg.num_classes))
  meta = {'source': os.path.abspath(workdir), 'generator_step': info.step,
          'unet_step': unet_step, 'data_dir': data_dir, 'output_dir': eval_dir}
  with reports.atomic_output_dir(eval_dir, overwrite, EVAL_OWN_FILE) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    rows = seg_eval.evaluate_volumes(dataset.iterate_volumes(data_dir, 'test'), sct_fn,
                                     predict_fn, config, figure_dir=figure_dir)
    if not rows:
      raise SegmentationError(f'{data_dir}: the test split holds no volumes')
    # summary.json records what was scored, so `evaluate --compare` pairs only the same data.
    meta['fingerprint'] = fingerprint.fingerprint(dataset.load_meta(data_dir), 'test',
                                                  [r['patient_id'] for r in rows])
    summary = seg_eval.write_outputs(tmp, rows, names, meta)
  print(summary['summary_markdown'], flush=True)
  print(f'Segmentation evaluation written to {eval_dir}', flush=True)
  return summary
