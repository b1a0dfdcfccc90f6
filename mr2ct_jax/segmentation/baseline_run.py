"""The MR baseline's work (see `baseline` for the method, the command and the layout).

Imported by `baseline.run` when called, so the command's `--help` need not load JAX."""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mr2ct_jax import atomic
from mr2ct_jax import config_checks
from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.data import resolve
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import reports
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import evaluate as seg_eval
from mr2ct_jax.segmentation import folds as folds_lib
from mr2ct_jax.segmentation import labels as labels_lib
from mr2ct_jax.segmentation import train as seg_train

IN_CHANNELS = 1  # the MR alone
RUN_FILE = 'baseline.json'
EVAL_DIR = 'eval'
EVAL_OWN_FILE = 'per_volume.json'
# The paper's 5-fold MR U-Net (10 labeled MR; discussion), for comparison.
PAPER_BASELINE_DICE = {'pelvis': (0.815, 0.046), 'femur': (0.921, 0.023),
                       'gluteus_medius': (0.825, 0.029), 'gluteus_minimus': (0.752, 0.045)}
ARCH_KEYS = ('base_filters', 'depth', 'num_classes')


def _config(config: ml_collections.ConfigDict, data_dir: str,
            steps: int | None) -> ml_collections.ConfigDict:
  config = resolve.resolve_preprocessing(ml_collections.ConfigDict(config.to_dict()), data_dir)
  if steps is not None:
    config.seg.num_steps = int(steps)
  config_checks.validate(config)
  return config


def _check_previous(path: str, info: dict[str, Any]) -> None:
  """Refuses a rerun in OUTPUT whose folds or U-Net differ from the checkpoints there."""
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise labels_lib.SegDataError(f'{path}: unreadable ({e}); remove it to start anew') from e
  if previous.get('folds') != info['folds']:
    raise labels_lib.SegDataError(f'{path}: this baseline has other folds (another fold count, '
                                  'seed or data); use another --output')
  for key in ARCH_KEYS:
    if previous.get('seg', {}).get(key) != info['seg'][key]:
      raise labels_lib.SegDataError(
          f'{path}: this baseline has seg.{key}={previous["seg"].get(key)!r}, the config asks '
          f'for {info["seg"][key]!r}; use another --output')


def run(config: ml_collections.ConfigDict, data_dir: str, output: str, folds: int | None,
        *, steps: int | None = None, overwrite: bool = False) -> dict[str, Any] | None:
  """`run` (documented there)."""
  output = os.path.abspath(output)
  data_dir = os.path.abspath(data_dir)
  eval_dir = os.path.join(output, EVAL_DIR)
  reports.check_output_dir(eval_dir, overwrite, EVAL_OWN_FILE)
  config = _config(config, data_dir, steps)
  table = labels_lib.label_table(config.seg)
  split = seg_data.eval_split(data_dir)
  seg_data.check_data_dir(data_dir, config, split)
  meta = dataset.load_meta(data_dir)
  source = lambda pid: labels_lib.source_file(meta, split, pid)

  volumes, maxima = {}, {}
  for volume in dataset.iterate_volumes(data_dir, split):
    pid = str(volume['patient_id'])
    label = np.asarray(volume['label'], np.uint8)
    # Every labeled MR is a test subject once: an empty one is refused, not scored.
    maxima[source(pid)] = labels_lib.check_label_map(label, labels_lib.MAX_LABEL + 1,
                                                     f'{source(pid)} (patient {pid})')
    volumes[pid] = {'patient_id': pid, 'image': np.asarray(volume['image'], np.float32),
                    'label': label}
  num_classes = labels_lib.resolve_num_classes(config.seg.get('num_classes'), maxima)
  config.seg.num_classes = num_classes
  k = int(config.seg.get('baseline_folds', 5) if folds is None else folds)
  assignment = folds_lib.fold_split(list(volumes), k, int(config.seed),
                                    where=f'{data_dir} ({split!r} split)')
  info = {'data_dir': data_dir, 'split': split, 'seed': int(config.seed), 'folds': assignment,
          'num_classes': num_classes, 'seg': config.seg.to_dict()}
  run_path = os.path.join(output, RUN_FILE)
  _check_previous(run_path, info)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(output, exist_ok=True)
    atomic.write_json(run_path, info, indent=2, sort_keys=True)
  tb_logging.log_line(f'MR baseline in {output}: {k}-fold cross-validation of '
                      f'{len(volumes)} labeled MR ({split!r} split of {data_dir}), '
                      f'{num_classes} classes.')

  to_model = lambda mr: intensity.mr_to_model(mr, config.data.mr_window).astype(np.float32)
  predict_fns, unet_steps, fold_of = {}, [], {}
  for i, test_ids in enumerate(assignment):
    train_ids = [p for p in sorted(volumes) if p not in test_ids]
    train_set = seg_data.MRSet(
        mr=np.concatenate([to_model(volumes[p]['image']) for p in train_ids]),
        label=np.concatenate([volumes[p]['label'] for p in train_ids]))
    tb_logging.log_line(f'MR baseline fold {i + 1}/{k}: train on {len(train_ids)} MR '
                        f'({train_set.num_slices} slices), test on {test_ids}.')
    fold_dir = os.path.join(output, f'fold_{i}')
    seg_train.train(config, fold_dir, train_set, run_info={'fold': i, 'test': test_ids})
    if is_main:
      params, unet_step = seg_train.restore_params(fold_dir, config, IN_CHANNELS)
      predict = seg_eval.make_predict_fn(params, config, IN_CHANNELS)
      unet_steps.append(unet_step)
      for pid in test_ids:
        predict_fns[pid], fold_of[pid] = predict, i
  if not is_main:
    return None

  def inputs(mr: np.ndarray):
    return to_model(mr)[..., None], [('MR', mr, config.data.mr_window)]

  names = labels_lib.structure_names(num_classes, table)
  with reports.atomic_output_dir(eval_dir, overwrite, EVAL_OWN_FILE) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    rows, reported = seg_eval.evaluate_volumes(
        [volumes[p] for p in sorted(volumes)], inputs, predict_fns, names,
        num_classes=num_classes, batch_size=int(config.seg.eval_batch_size), source=source,
        figure_dir=figure_dir, extra={p: {'fold': f} for p, f in fold_of.items()})
    summary_meta = {
        'method': f'single-modality baseline ({k}-fold CV of a 1-channel MR U-Net)',
        'source': data_dir, 'data_dir': data_dir, 'output_dir': eval_dir, 'split': split,
        'folds': assignment, 'unet_steps': unet_steps, 'num_classes': num_classes,
        'label_table': config.seg.get('label_table'),
        'fingerprint': fingerprint.fingerprint(meta, split, sorted(volumes))}
    notes = [f'Single-modality baseline: {k}-fold cross-validation by patient of the '
             f'{split!r} split; each fold\'s 1-channel U-Net is trained on the real MR of the '
             'other folds and tests its own patients (every labeled MR once).',
             f'U-Net steps per fold {unet_steps}, {num_classes} classes.']
    summary = seg_eval.write_outputs(
        tmp, rows, reported, summary_meta, notes=notes, extra_fields=('fold',),
        title=f'Single-modality MR baseline: {data_dir}', paper=PAPER_BASELINE_DICE,
        paper_header='Paper (5-fold MR U-Net, 10 MR)')
  print(summary['summary_markdown'], flush=True)
  print(f'MR baseline evaluation written to {eval_dir}', flush=True)
  return summary
