"""The segmentation command as a library call: sMR cache -> train U-Net -> Dice on the test MR.

The U-Net is tested on the `labeled_mr` split (real MR + label map) when the dataset has
one, else on the paired `test` split (its MR and label map); see `evaluate` for how Dice is
scored and `labels` for the number of classes and the structure names (config.seg.num_classes,
config.seg.label_table). Two evaluations are compared with
`python -m mr2ct_jax.segmentation.compare A B` (or `python -m mr2ct_jax.evaluate --compare A B`,
which hands segmentation outputs to it).

Layout of the segmentation directory (default WORKDIR/seg):
  run.json                  the generator step the U-Net is built on, the data dir and the
                            seg config (a resumed run keeps the generator step; changing the
                            U-Net architecture in the same directory is refused)
  cache/labeled_g<STEP>[_mirror_averaged].npz
                            CT, sMR = G_mr(CT) and labels of the labeled split (model range)
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
from mr2ct_jax import storage
from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import resolve
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import generators
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import evaluate as seg_eval
from mr2ct_jax.segmentation import labels as labels_lib
from mr2ct_jax.segmentation import train as seg_train

RUN_FILE = 'run.json'
EVAL_OWN_FILE = 'per_volume.json'  # written by seg_eval.write_outputs into every eval/
EVAL_DIR = 'eval'
_ARCH_KEYS = ('base_filters', 'depth', 'num_classes')
# The rest of what makes a resumed U-Net run the same run (num_steps may grow).
_RUN_KEYS = ('lr', 'batch_size', 'dice_loss_weight', 'dtype')


def _same_path(a: str, b: str) -> bool:
  """Whether two recorded paths name one folder (URLs: as written)."""
  if storage.is_remote(a) or storage.is_remote(b):
    return a == b
  try:
    return os.path.samefile(a, b)
  except OSError:  # one of them is gone: compare the names
    return os.path.realpath(a) == os.path.realpath(b)


def _check_same_run(run_path: str, previous: dict[str, Any], now: dict[str, Any]) -> None:
  """Refuses to resume a segmentation run with another CycleGAN workdir, dataset, sMR
  averaging or U-Net training setting: its checkpoints and cached sMR belong to the recorded
  ones (a run.json from before a key was recorded is not checked on it)."""
  for key, value in now.items():
    section, _, field = key.rpartition('.')
    recorded = (previous.get(section) or {}).get(field) if section else previous.get(key)
    if key == 'flip_average' and recorded is None:
      recorded = False  # a run.json from before the option: its sMR were not averaged
    if key in ('workdir', 'data_dir') and recorded is not None and _same_path(recorded, value):
      continue  # the same folder by another name (a symlink, another mount of the share)
    if recorded is not None and recorded != value:
      raise SegmentationError(
          f'{run_path}: this segmentation run has {key}={recorded!r}, not {value!r}; use '
          'another --output (or the recorded one)')


class SegmentationError(ValueError):
  """The segmentation run cannot proceed; the one-line message names the path or key."""


def _read_run_file(path: str) -> dict[str, Any] | None:
  if not storage.exists(path):
    return None
  try:
    with storage.open_file(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SegmentationError(f'{path}: unreadable ({e}); remove it to start a new run') from e


def _write_run_file(path: str, info: dict[str, Any]) -> None:
  storage.makedirs(os.path.dirname(path))
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
    data_dir: prepared dataset with a `labeled` split and a `labeled_mr` or `test` split;
      None: the run config's data.dir, or the phantom under WORKDIR/phantom.
    output: the segmentation directory (default WORKDIR/seg; see the module docstring).
    steps: train to this many steps (default config.seg.num_steps).
    overwrite: replace an existing OUTPUT/eval.
    seg_config: a `seg` config section overriding the run's.

  Returns:
    The evaluation summary (Dice mean/sd per structure, ...; also OUTPUT/eval/summary.json),
    or None on processes other than 0. The summary table is printed.
    seg.num_classes None is resolved from the labeled split (recorded in run.json).

  Raises:
    SegmentationError, seg_data.SegDataError, ConfigError, generators.SourceError,
    checkpointing.CheckpointError, reports.ReportError, DatasetError: one-line messages.
  """
  output = storage.absolute(output or storage.join(workdir, 'seg'))
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
  table = labels_lib.label_table(config.seg)

  data_dir = storage.absolute(resolve.resolve_data_dir(config, workdir, data_dir))
  if previous:  # before the cached sMR are read: they belong to the recorded run
    _check_same_run(run_path, previous, {
        'workdir': storage.absolute(workdir), 'data_dir': data_dir,
        'flip_average': info.flip_average,
        **{f'seg.{k}': config.seg[k] for k in _RUN_KEYS}})
  seg_data.check_data_dir(data_dir, config, seg_data.LABELED_SPLIT)
  split = seg_data.eval_split(data_dir)
  seg_data.check_data_dir(data_dir, config, split)
  data_meta = dataset.load_meta(data_dir)
  source = lambda pid: labels_lib.source_file(data_meta, split, pid)
  # The cached sMR of the labeled CT are of this step and of this averaging (eval.flip_average).
  step_tag = ('none' if info.step is None else str(info.step)) + (
      '_mirror_averaged' if info.flip_average else '')
  is_main = jax.process_index() == 0
  created = not storage.exists(output)
  try:
    labeled = seg_data.load_labeled_set(
        data_dir, config, smr_fn, cache_path=os.path.join(output, 'cache',
                                                          f'labeled_g{step_tag}.npz'),
        generator_step=info.step, write_cache=is_main)
    config.seg.num_classes = labels_lib.resolve_num_classes(config.seg.get('num_classes'),
                                                            labeled.maxima)
    num_classes = int(config.seg.num_classes)
    seg_eval.check_eval_labels(dataset.iterate_volumes(data_dir, split), num_classes, source)
  except Exception:  # a signal (Ctrl-C, SIGTERM) keeps the costly cache for the rerun
    # Refused before training (e.g. a label the labeled CT lack): an output folder this call
    # created holds only the sMR cache; leave nothing behind.
    if created and is_main and storage.exists(output):
      storage.rmtree(output)
    raise

  if previous:
    for key in _ARCH_KEYS:
      if previous.get('seg', {}).get(key) != config.seg[key]:
        raise SegmentationError(
            f'{run_path}: this segmentation run has seg.{key}={previous["seg"].get(key)!r}, '
            f'the config asks for {config.seg[key]!r}; use another --output')
  if is_main:
    _write_run_file(run_path, {'workdir': storage.absolute(workdir), 'data_dir': data_dir,
                               'generator_step': info.step, 'flip_average': info.flip_average,
                               'seg': config.seg.to_dict()})
  tb_logging.log_line(f'Segmentation in {output}: generators of {workdir} at step {info.step}, '
                      f'data {data_dir}, tested on its {split!r} split.')
  tb_logging.log_line(f'Segmentation: {labeled.num_slices} labeled CT slices with sMR, '
                      f'{num_classes} classes.')
  seg_train.train(config, output, labeled, run_info={'generator_step': info.step})
  if not is_main:
    return None

  params, unet_step = seg_train.restore_params(output, config)
  predict_fn = seg_eval.make_predict_fn(params, config)
  names = labels_lib.structure_names(num_classes, table)
  with reports.atomic_output_dir(eval_dir, overwrite, EVAL_OWN_FILE) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    rows, reported = seg_eval.evaluate_volumes(
        dataset.iterate_volumes(data_dir, split), seg_eval.synthesis_inputs(sct_fn, config),
        predict_fn, names, num_classes=num_classes,
        batch_size=int(config.seg.eval_batch_size), source=source, figure_dir=figure_dir)
    if not rows:
      raise SegmentationError(f'{data_dir}: the {split!r} split holds no volumes')
    meta = {'method': 'via synthesis (2-channel U-Net on labeled CT + sMR)',
            'source': storage.absolute(workdir), 'generator_step': info.step,
            'unet_step': unet_step, 'data_dir': data_dir, 'output_dir': eval_dir,
            'split': split, 'num_classes': num_classes,
            'label_table': config.seg.get('label_table'),
            'fingerprint': fingerprint.fingerprint(data_meta, split,
                                                        [r['patient_id'] for r in rows])}
    notes = [f'Input channels (CT-like, MR-like): trained on (CT, sMR = G_mr(CT)) of the '
             f'labeled split, tested on (sCT = G_ct(MR), MR) of the {split!r} split.',
             f'Generator step {info.step}, U-Net step {unet_step}, {num_classes} classes.']
    summary = seg_eval.write_outputs(tmp, rows, reported, meta, notes=notes,
                                     title=f'Segmentation via synthesis: {workdir}')
  print(summary['summary_markdown'], flush=True)
  print(f'Segmentation evaluation written to {eval_dir}', flush=True)
  return summary
