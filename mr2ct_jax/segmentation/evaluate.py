"""Segmentation of the paired test split's MR volumes via synthesis, scored with Dice.

Per test patient: sCT = G_ct(MR); the U-Net segments the two-channel input (sCT, MR); Dice of
each structure against the test split's `label` (drawn on the MR grid) over the whole network
grid of the volume. Outputs (written to a temporary directory that replaces OUTPUT when
complete): per_volume.csv/.json (one row per patient: dice_<structure>, dice_mean), summary.md
and summary.json (mean ± sd per structure, as the paper's Fig. 6 reports them, with the paper's
numbers beside), figures/dice_boxplot.png and figures/<patient>.png (MR with true and predicted
contours).
"""

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr2ct_jax.data.phantom import anatomy as phantom_anatomy
from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import slices
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import dice as dice_lib
from mr2ct_jax.segmentation import figures
from mr2ct_jax.segmentation import train as seg_train

ApplyFn = slices.ApplyFn
# The paper's MR Dice with GC loss and >300 training volumes (section 3.2), for comparison.
PAPER_DICE = {'pelvis': (0.808, 0.036), 'femur': (0.883, 0.029),
              'gluteus_medius': (0.804, 0.040), 'gluteus_minimus': (0.669, 0.054)}


def structure_names(num_classes: int) -> dict[int, str]:
  """Label value -> structure name for labels 1..num_classes-1 (phantom/paper names)."""
  return {k: phantom_anatomy.LABELS.get(k, f'label_{k}') for k in range(1, num_classes)}


def make_predict_fn(params: Any, config: ml_collections.ConfigDict) -> ApplyFn:
  """A jitted [B, S, S, 2] (model range) -> uint8 labels [B, S, S] of the U-Net `params`."""
  predict = _jitted_predict(seg_train.build(config.seg).model)
  variables = {'params': jax.device_put(jax.tree.map(jnp.asarray, params))}
  return lambda x: np.asarray(predict(variables, jnp.asarray(x, jnp.float32)))


@functools.lru_cache(maxsize=8)
def _jitted_predict(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
  # Shared per architecture: evaluating several checkpoints compiles once.
  return jax.jit(lambda variables, x: jnp.argmax(model.apply(variables, x), -1).astype(jnp.uint8))


def evaluate_volumes(volumes: Iterable[Mapping[str, Any]], sct_fn: ApplyFn,
                     predict_fn: ApplyFn, config: ml_collections.ConfigDict, *,
                     figure_dir: str | None = None) -> list[dict[str, Any]]:
  """Segments each test MR via (sCT, MR) and returns one Dice row per volume.

  Args:
    volumes: records with 'patient_id', 'image' (MR, MR units) and 'label' `[N, S, S]`.
    sct_fn: G_ct, NHWC [-1, 1] -> [-1, 1].
    predict_fn: see `make_predict_fn`.
    config: the run's config (data.mr_window, seg.num_classes, seg.eval_batch_size).
    figure_dir: if set, writes `<figure_dir>/<patient_id>.png` overlays.

  Returns:
    Rows {'patient_id', 'num_slices', 'truth_voxels', 'dice_<structure>'..., 'dice_mean'};
    dice_mean averages the structures with a defined Dice.

  Raises:
    seg_data.SegDataError: a record without labels, or a test split without any label.
  """
  names = structure_names(int(config.seg.num_classes))
  rows = []
  for volume in volumes:
    pid = str(volume['patient_id'])
    if 'label' not in volume:
      raise seg_data.SegDataError(f'test patient {pid}: record has no label array')
    mr, truth = np.asarray(volume['image'], np.float32), np.asarray(volume['label'])
    inputs = seg_data.mr_inputs(mr, sct_fn, config)
    pred = slices.run_batched(predict_fn, inputs, int(config.seg.eval_batch_size))
    scores = dice_lib.dice_per_label(pred, truth, names)
    finite = [v for v in scores.values() if np.isfinite(v)]
    row = {'patient_id': pid, 'num_slices': int(mr.shape[0]),
           'truth_voxels': int((truth > 0).sum()),
           **{f'dice_{name}': value for name, value in scores.items()},
           'dice_mean': float(np.mean(finite)) if finite else float('nan')}
    rows.append(row)
    if figure_dir is not None:
      title = f'{pid}: Dice ' + ', '.join(f'{n.replace("_", " ")} {reports.fmt(v, 3)}'
                                          for n, v in scores.items())
      safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in pid) or 'volume'
      figures.overlay(os.path.join(figure_dir, f'{safe}.png'), mr, pred, truth, names,
                      title=title, mr_window=config.data.mr_window)
  if rows and not any(r['truth_voxels'] for r in rows):
    raise seg_data.SegDataError('the test split has no labeled voxel (paired data prepared '
                                'without label files?)')
  return rows


def summary_markdown(rows: list[dict[str, Any]], names: Mapping[int, str], title: str,
                     notes: list[str]) -> str:
  """Mean ± SD of Dice per structure (and the paper's values), then a row per patient."""
  keys = [f'dice_{n}' for n in names.values()] + ['dice_mean']
  stats = reports.summarize(rows, keys)
  label = lambda k: k[len('dice_'):].replace('_', ' ')
  body = []
  for key in keys:
    paper = PAPER_DICE.get(key[len('dice_'):])
    body.append([label(key), reports.fmt_stats(stats[key], 3), str(stats[key].n),
                 f'{paper[0]:.3f} ± {paper[1]:.3f}' if paper else '-'])
  table = reports.md_table(
      ['Structure', 'Dice (mean ± SD)', 'N', 'Paper (GC, 302 MR + 613 CT)'], body)
  patients = [[str(r['patient_id'])] + [reports.fmt(float(r[k]), 3) for k in keys]
              for r in rows]
  text = [f'# {title}', '', f'{len(rows)} test volume(s). Mean ± SD over volumes (SD with '
          'ddof=1).', '', table, '', '## Per patient', '',
          reports.md_table(['Patient'] + [label(k) for k in keys], patients), '', '## Notes', '']
  return '\n'.join(text + [f'- {n}' for n in notes]) + '\n'


def write_outputs(out_dir: str, rows: list[dict[str, Any]], names: Mapping[int, str],
                  meta: dict[str, Any]) -> dict[str, Any]:
  """Writes the tables, summaries and the box plot into `out_dir`; returns the summary dict."""
  keys = [f'dice_{n}' for n in names.values()] + ['dice_mean']
  fields = ['patient_id', 'num_slices', 'truth_voxels'] + keys
  reports.write_csv(os.path.join(out_dir, 'per_volume.csv'), rows, fields)
  reports.write_json(os.path.join(out_dir, 'per_volume.json'), reports.rows_to_json(rows))
  notes = [
      'Input channels (CT-like, MR-like): trained on (CT, sMR = G_mr(CT)) of the labeled split, '
      'tested on (sCT = G_ct(MR), MR) of the paired test split.',
      'Dice = 2|P∩T| / (|P| + |T|) per structure over the whole network grid of each volume; '
      'a structure absent from both prediction and truth has no Dice (NaN, left out of the '
      'mean; the count is noted); dice_mean averages the structures with a Dice.',
      f"Generator step {meta.get('generator_step')}, U-Net step {meta.get('unet_step')}.",
  ]
  title = f"Segmentation via synthesis: {meta.get('source', '')}"
  markdown = summary_markdown(rows, names, title, notes)
  with open(os.path.join(out_dir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(markdown)
  stats = reports.summarize(rows, keys)
  summary = {**meta, 'num_volumes': len(rows), 'patients': [r['patient_id'] for r in rows],
             'dice': {k[len('dice_'):]: stats[k].to_json() for k in keys},
             'paper_dice': {k: {'mean': m, 'sd': s} for k, (m, s) in PAPER_DICE.items()},
             'summary_markdown': markdown}
  reports.write_json(os.path.join(out_dir, 'summary.json'), summary)
  figures.dice_boxplot(os.path.join(out_dir, 'figures', 'dice_boxplot.png'), rows,
                       keys[:-1], list(names.values()), title='Dice per structure (MR)')
  return summary
