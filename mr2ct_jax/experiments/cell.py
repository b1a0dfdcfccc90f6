"""Running one cell of the study, resumably: train -> evaluate -> MI -> segmentation -> marker.

Every stage skips work whose output is already there and resumes what was interrupted: the
CycleGAN and the U-Nets resume from their checkpoints, an evaluation is redone only when its
directory is missing or scored another step. The done marker (`layout.mark_done`) is written
last. The real-CT upper bound evaluates the U-Net of its `needs` cell twice on the paired test
subjects: with (real CT, MR) and with (sCT, MR) as its two channels, so the two are paired.
"""

import os
from typing import Any

import ml_collections
import numpy as np

from mr2ct_jax import tb_logging
from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.evaluation import paired
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import unpaired
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import presets
from mr2ct_jax.inference import generators
from mr2ct_jax.inference import slices as slices_lib
from mr2ct_jax.segmentation import baseline as seg_baseline
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import evaluate as seg_eval
from mr2ct_jax.segmentation import labels as labels_lib
from mr2ct_jax.segmentation import run as seg_run
from mr2ct_jax.segmentation import train as seg_train
from mr2ct_jax.training import loop

SAMPLES_FILE = 'samples.npz'
UPPER_REAL, UPPER_SCT = 'eval', 'eval_sct'  # real_ct cell: (real CT, MR) / (sCT, MR) inputs


def run_cell(preset: presets.Preset, run: presets.Run, workdir: str,
             data_dir: str) -> dict[str, Any]:
  """Runs (or finishes) one seed of a cell in WORKDIR/cells/<run name>; returns its marker."""
  cell = run.cell
  out = layout.cell_dir(workdir, run.name)
  os.makedirs(out, exist_ok=True)
  config = presets.cell_config(preset, cell, data_dir, run.seed)
  if cell.kind == 'synthesis':
    info = _synthesis(config, out, data_dir)
  elif cell.kind == 'baseline':
    info = {'eval': 'eval', 'folds': int(config.seg.baseline_folds),
            'num_volumes': _baseline(config, out, data_dir)}
  else:
    info = _real_ct(config, out, layout.cell_dir(workdir, cell.needs), data_dir)
  info.update(cell=cell.name, kind=cell.kind, preset=preset.name, data_dir=data_dir,
              seed=run.seed, config_seed=int(config.seed))
  layout.mark_done(workdir, run.name, info)
  tb_logging.log_line(f'Cell {run.name}: done ({out}).')
  return info


def _eval_step(eval_dir: str) -> int | None:
  summary = layout.read_json(os.path.join(eval_dir, 'summary.json'))
  return None if summary is None else summary.get('step')


def _synthesis(config: ml_collections.ConfigDict, out: str, data_dir: str) -> dict[str, Any]:
  num_steps = int(config.train.num_steps)
  eval_dir = os.path.join(out, 'eval')
  if layout.latest_checkpoint_step(out) != num_steps or _eval_step(eval_dir) != num_steps:
    loop.train(config, out)
  step = layout.latest_checkpoint_step(out)
  if step != num_steps:
    raise layout.StudyError(f'{out}: training stopped at step {step}, not {num_steps}')
  if _eval_step(eval_dir) != step:
    paired.evaluate(out, data_dir, eval_dir, step=step, overwrite=True, progress=False)
  sct_fn, run_config, _ = generators.load_generator(out, 'mr2ct', step)
  if unpaired.read(eval_dir) is None:  # evaluate may write it itself; else it is added here
    smr_fn, _, _ = generators.load_generator(out, 'ct2mr', step)
    volumes = {s: dataset.iterate_volumes(data_dir, s) for s in unpaired.SPLITS
               if dataset.has_split(data_dir, s)}
    unpaired.write(eval_dir, unpaired.score(volumes, sct_fn, smr_fn, run_config))
  samples = os.path.join(out, SAMPLES_FILE)
  if not os.path.isfile(samples):
    _write_samples(samples, sct_fn, run_config, data_dir)
  seg_dir = os.path.join(out, 'seg')
  if not os.path.isfile(os.path.join(seg_dir, seg_run.EVAL_DIR, seg_run.EVAL_OWN_FILE)):
    seg_run.run(out, data_dir, seg_dir)
  return {'step': step, 'num_steps': num_steps, 'eval': 'eval', 'seg_eval': 'seg/eval',
          'samples': SAMPLES_FILE}


def _write_samples(path: str, sct_fn: Any, config: ml_collections.ConfigDict,
                   data_dir: str) -> None:
  """The Fig. 5 slices: per paired test patient the slice with the largest body mask."""
  rows: dict[str, list[Any]] = {'patient_id': [], 'slice_index': [], 'mr': [], 'sct_hu': [],
                                'ct_hu': []}
  for volume in dataset.iterate_volumes(data_dir, 'test'):
    k = int(np.argmax(np.asarray(volume['mask']).reshape(len(volume['mask']), -1).sum(1)))
    mr = np.asarray(volume['image'][k:k + 1], np.float32)
    sct = slices_lib.translate_slices(sct_fn, intensity.mr_to_model(mr, config.data.mr_window),
                                      int(config.eval.batch_size))
    rows['patient_id'].append(str(volume['patient_id']))
    rows['slice_index'].append(k)
    rows['mr'].append(mr[0])
    rows['sct_hu'].append(intensity.model_to_ct_hu(sct, config.data.ct_window)[0])
    rows['ct_hu'].append(np.asarray(volume['paired'][k], np.float32))
  arrays = {k: np.asarray(v) for k, v in rows.items()}
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, mr_window=np.asarray(config.data.mr_window), **arrays)
  os.replace(tmp, path)


def _baseline(config: ml_collections.ConfigDict, out: str, data_dir: str) -> int:
  eval_dir = os.path.join(out, 'eval')
  if not os.path.isfile(os.path.join(eval_dir, seg_run.EVAL_OWN_FILE)):
    seg_baseline.run(config, data_dir, out, int(config.seg.baseline_folds))
  return len(reports.read_rows_json(os.path.join(eval_dir, seg_run.EVAL_OWN_FILE)))


def _real_ct(config: ml_collections.ConfigDict, out: str, source: str,
             data_dir: str) -> dict[str, Any]:
  """The needs-cell's U-Net on the paired test subjects with real CT, and with its sCT."""
  done = layout.read_json(os.path.join(source, layout.DONE_FILE))
  if done is None:
    raise layout.StudyError(f'{source}: not finished; the real-CT upper bound uses its U-Net '
                            '(run that cell first)')
  step = int(done['step'])
  sct_fn, run_config, _ = generators.load_generator(source, 'mr2ct', step)
  seg_dir = os.path.join(source, 'seg')
  seg_info = layout.read_json(os.path.join(seg_dir, seg_run.RUN_FILE)) or {}
  run_config = seg_run.segmentation_config(run_config, None, None, source)
  run_config.seg = ml_collections.ConfigDict({**run_config.seg.to_dict(),
                                              **seg_info.get('seg', {})})
  params, unet_step = seg_train.restore_params(seg_dir, run_config)
  predict_fn = seg_eval.make_predict_fn(params, run_config)
  num_classes = int(run_config.seg.num_classes)
  names = labels_lib.structure_names(num_classes, labels_lib.label_table(run_config.seg))
  meta = dataset.load_meta(data_dir)
  source_file = lambda pid: labels_lib.source_file(meta, 'test', pid)
  windows = run_config.data
  real_inputs = lambda v: np.stack(
      [intensity.ct_hu_to_model(np.asarray(v['paired'], np.float32), windows.ct_window),
       intensity.mr_to_model(np.asarray(v['image'], np.float32), windows.mr_window)], -1)
  sct_inputs = lambda v: seg_data.mr_inputs(np.asarray(v['image'], np.float32), sct_fn,
                                            run_config)
  for sub, make, what in ((UPPER_REAL, real_inputs, 'real CT'), (UPPER_SCT, sct_inputs, 'sCT')):
    eval_dir = os.path.join(out, sub)
    if os.path.isfile(os.path.join(eval_dir, seg_run.EVAL_OWN_FILE)):
      continue
    rows, reported = [], {}
    # One volume per call: the input function sees only the MR, and this one needs the CT.
    for volume in dataset.iterate_volumes(data_dir, 'test'):
      x = make(volume)
      fn = lambda mr, x=x: (x, [('MR', mr, windows.mr_window), (what, x[..., 0], (-1.0, 1.0))])
      r, rep = seg_eval.evaluate_volumes(
          [volume], fn, predict_fn, names, num_classes=num_classes,
          batch_size=int(run_config.seg.eval_batch_size), source=source_file)
      rows += r
      reported.update(rep)
    reported = dict(sorted(reported.items()))
    for row in rows:  # a structure absent from one patient's truth has no Dice there
      for name in reported.values():
        row.setdefault(f'dice_{name}', float('nan'))
    title = f'Segmentation of the paired test subjects with {what} (U-Net of {source})'
    notes = [f'Input channels (CT-like, MR-like): ({what}, real MR) of the paired test split; '
             f'the U-Net of {source}/seg (step {unet_step}), trained on labeled CT + sMR.']
    with reports.atomic_output_dir(eval_dir, True, seg_run.EVAL_OWN_FILE) as tmp:
      os.makedirs(os.path.join(tmp, 'figures'))
      seg_eval.write_outputs(tmp, rows, reported,
                             {'method': f'{what} + MR', 'source': source, 'unet_step': unet_step,
                              'generator_step': step, 'data_dir': data_dir, 'split': 'test',
                              'num_classes': num_classes}, title=title, notes=notes)
  return {'needs': os.path.basename(source), 'generator_step': step, 'unet_step': unet_step,
          'eval': UPPER_REAL, 'eval_sct': UPPER_SCT}
