"""Segmentation of test MR volumes, scored with Dice over the structures the ground truth has.

The test MR are those of the `labeled_mr` split (MR + label map) when the dataset has one,
else the paired `test` split's (MR + its label map). Per test patient the U-Net segments its
input (sCT = G_ct(MR) and MR for the via-synthesis run, the MR alone for the baseline) and
Dice of each structure is computed against the label map (drawn on the MR grid) over the whole
network grid of the volume.

Which structures are scored: those the MR ground truth contains. A structure absent from a
patient's ground truth has no Dice for that patient (NaN, left out of means and t-tests, the
count noted), even where the U-Net predicts it (the paper's U-Net predicted 22 labels, its MR
ground truth had 4); the report's columns are the structures present in at least one ground
truth. A patient whose label map is empty, or holds a value the U-Net has no class for, is
refused with a one-line error naming its file.

Outputs (written to a temporary directory that replaces OUTPUT when complete): per_volume.csv
and .json (one row per patient: dice_<structure>, dice_mean), summary.md and summary.json
(mean ± sd per structure, as the paper reports them, with the paper's numbers beside; the data
fingerprint, split, label table and number of classes), figures/dice_boxplot.png and
figures/<patient>.png (Fig. 7: MR | sCT | predicted labels | ground truth).
"""

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr2ct_jax.evaluation import reports
from mr2ct_jax.inference import slices
from mr2ct_jax.segmentation import data as seg_data
from mr2ct_jax.segmentation import dice as dice_lib
from mr2ct_jax.segmentation import figures
from mr2ct_jax.segmentation import labels as labels_lib
from mr2ct_jax.segmentation import train as seg_train

ApplyFn = slices.ApplyFn
# (input [N, S, S, C] model range, display columns [(title, image, window)]) of an MR volume.
InputFn = Callable[[np.ndarray], tuple[np.ndarray, list[tuple[str, np.ndarray, Any]]]]
# The paper's MR Dice with GC loss and >300 training volumes (section 3.2), for comparison.
PAPER_DICE = {'pelvis': (0.808, 0.036), 'femur': (0.883, 0.029),
              'gluteus_medius': (0.804, 0.040), 'gluteus_minimus': (0.669, 0.054)}
PAPER_HEADER = 'Paper (GC, 302 MR + 613 CT)'
KIND = 'segmentation'  # summary.json 'kind' of every segmentation evaluation


def make_predict_fn(params: Any, config: ml_collections.ConfigDict,
                    in_channels: int = seg_train.IN_CHANNELS) -> ApplyFn:
  """A jitted [B, S, S, C] (model range) -> uint8 labels [B, S, S] of the U-Net `params`."""
  predict = _jitted_predict(seg_train.build(config.seg, in_channels).model)
  variables = {'params': jax.device_put(jax.tree.map(jnp.asarray, params))}
  return lambda x: np.asarray(predict(variables, jnp.asarray(x, jnp.float32)))


@functools.lru_cache(maxsize=8)
def _jitted_predict(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
  # Shared per architecture: evaluating several checkpoints compiles once.
  return jax.jit(lambda variables, x: jnp.argmax(model.apply(variables, x), -1).astype(jnp.uint8))


def check_eval_labels(volumes: Iterable[Mapping[str, Any]], num_classes: int,
                      source: Callable[[str], str]) -> None:
  """Refuses, before any training, test label maps that `evaluate_volumes` would refuse."""
  for volume in volumes:
    pid = str(volume['patient_id'])
    labels_lib.check_label_map(np.asarray(volume['label']), num_classes,
                               f'{source(pid)} (test patient {pid})')


def evaluate_volumes(volumes: Iterable[Mapping[str, Any]], input_fn: InputFn,
                     predict_fn: ApplyFn | Mapping[str, ApplyFn], names: Mapping[int, str],
                     *, num_classes: int, batch_size: int, source: Callable[[str], str] = str,
                     figure_dir: str | None = None,
                     extra: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[list[dict[str, Any]], dict[int, str]]:
  """Segments each test MR and scores Dice over the structures its ground truth contains.

  Args:
    volumes: records with 'patient_id', 'image' (MR, MR units) and 'label' `[N, S, S]`.
    input_fn: MR volume -> (U-Net input, display columns), e.g. `synthesis_inputs`.
    predict_fn: see `make_predict_fn`; or patient id -> its U-Net's (the baseline's folds).
    names: label value -> structure name of the U-Net's classes 1..num_classes-1.
    num_classes: the U-Net's classes (a label value >= it is refused).
    batch_size: slices per U-Net call.
    source: patient id -> its label file (for error messages).
    figure_dir: if set, writes `<figure_dir>/<patient_id>.png` (Fig. 7 panels).
    extra: patient id -> more columns of its row (e.g. the fold of the baseline).

  Returns:
    (rows, reported): rows {'patient_id', 'num_slices', 'truth_voxels', 'dice_<structure>'...,
    'dice_mean'} with a column for each structure in `reported` (value -> name: those present
    in at least one ground truth, in label order); dice_mean averages the patient's
    structures.

  Raises:
    SegDataError: a record without labels, an empty label map, a label value >= num_classes.
  """
  rows, present = [], set()
  for volume in volumes:
    pid = str(volume['patient_id'])
    where = f'{source(pid)} (test patient {pid})'
    if 'label' not in volume:
      raise labels_lib.SegDataError(f'{where}: record has no label array')
    mr, truth = np.asarray(volume['image'], np.float32), np.asarray(volume['label'])
    labels_lib.check_label_map(truth, num_classes, where)
    present.update(labels_lib.present_labels(truth))
    inputs, columns = input_fn(mr)
    predict = predict_fn[pid] if isinstance(predict_fn, Mapping) else predict_fn
    pred = slices.run_batched(predict, inputs, int(batch_size))
    scores = dice_lib.dice_in_truth(pred, truth, names)
    rows.append({'patient_id': pid, 'num_slices': int(mr.shape[0]),
                 'truth_voxels': int((truth > 0).sum()), **(extra or {}).get(pid, {}),
                 **{f'dice_{name}': value for name, value in scores.items()}})
    if figure_dir is not None:
      shown = {n: v for n, v in scores.items() if np.isfinite(v)}
      title = f'{pid}: Dice ' + ', '.join(f'{n.replace("_", " ")} {reports.fmt(v, 3)}'
                                          for n, v in shown.items())
      safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in pid) or 'volume'
      figures.label_panels(os.path.join(figure_dir, f'{safe}.png'), columns, pred, truth,
                           names, title=title)
  reported = {k: v for k, v in names.items() if k in present}
  dropped = [f'dice_{v}' for k, v in names.items() if k not in present]
  for row in rows:
    for key in dropped:
      del row[key]
    finite = [row[f'dice_{n}'] for n in reported.values() if np.isfinite(row[f'dice_{n}'])]
    row['dice_mean'] = float(np.mean(finite)) if finite else float('nan')
  return rows, reported


def synthesis_inputs(sct_fn: ApplyFn, config: ml_collections.ConfigDict) -> InputFn:
  """The via-synthesis U-Net input (sCT = G_ct(MR), MR) and the MR | sCT display columns."""
  def inputs(mr: np.ndarray):
    x = seg_data.mr_inputs(mr, sct_fn, config)
    return x, [('MR', mr, config.data.mr_window), ('sCT', x[..., 0], (-1.0, 1.0))]
  return inputs


def summary_markdown(rows: Sequence[Mapping[str, Any]], names: Mapping[int, str], title: str,
                     notes: Sequence[str], paper: Mapping[str, tuple[float, float]] = PAPER_DICE,
                     paper_header: str = PAPER_HEADER) -> str:
  """Mean ± SD of Dice per structure (and the paper's values), then a row per patient."""
  keys = [f'dice_{n}' for n in names.values()] + ['dice_mean']
  stats = reports.summarize(rows, keys)
  label = lambda k: k[len('dice_'):].replace('_', ' ')
  body = []
  for key in keys:
    ref = paper.get(key[len('dice_'):])
    body.append([label(key), reports.fmt_stats(stats[key], 3), str(stats[key].n),
                 f'{ref[0]:.3f} ± {ref[1]:.3f}' if ref else '-'])
  table = reports.md_table(['Structure', 'Dice (mean ± SD)', 'N', paper_header], body)
  patients = [[str(r['patient_id'])] + [reports.fmt(float(r[k]), 3) for k in keys]
              for r in rows]
  text = [f'# {title}', '', f'{len(rows)} test volume(s). Mean ± SD over volumes (SD with '
          'ddof=1).', '', table, '', '## Per patient', '',
          reports.md_table(['Patient'] + [label(k) for k in keys], patients), '', '## Notes', '']
  return '\n'.join(text + [f'- {n}' for n in notes]) + '\n'


def dice_keys(names: Mapping[int, str]) -> list[str]:
  """The per-volume Dice columns of `names`, then dice_mean."""
  return [f'dice_{n}' for n in names.values()] + ['dice_mean']


def write_outputs(out_dir: str, rows: list[dict[str, Any]], names: Mapping[int, str],
                  meta: dict[str, Any], *, title: str, notes: Sequence[str],
                  paper: Mapping[str, tuple[float, float]] = PAPER_DICE,
                  paper_header: str = PAPER_HEADER,
                  extra_fields: Sequence[str] = ()) -> dict[str, Any]:
  """Writes the tables, summaries and the box plot into `out_dir`; returns the summary dict.

  Args:
    out_dir: the (temporary) evaluation directory; figures/ must exist.
    rows, names: `evaluate_volumes`'s rows and reported structures.
    meta: facts recorded in summary.json (source, steps, data_dir, split, fingerprint,
      num_classes, ...).
    title: the summary's heading.
    notes: how the numbers were made (listed under the tables, after the Dice definition).
    paper, paper_header: the paper's mean and sd per structure name, and their column title.
    extra_fields: more per-volume columns to write (e.g. 'fold').
  """
  keys = dice_keys(names)
  fields = ['patient_id', *extra_fields, 'num_slices', 'truth_voxels'] + keys
  reports.write_csv(os.path.join(out_dir, 'per_volume.csv'), rows, fields)
  reports.write_json(os.path.join(out_dir, 'per_volume.json'), reports.rows_to_json(rows))
  notes = list(notes) + [
      'Dice = 2|P∩T| / (|P| + |T|) per structure over the whole network grid of each volume, '
      'for the structures the MR ground truth contains: a structure absent from a patient\'s '
      'ground truth has no Dice there (NaN, left out of the mean; the count is noted), '
      'whatever the prediction; dice_mean averages the patient\'s structures.',
  ]
  markdown = summary_markdown(rows, names, title, notes, paper, paper_header)
  with open(os.path.join(out_dir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(markdown)
  stats = reports.summarize(rows, keys)
  summary = {'kind': KIND, **meta, 'num_volumes': len(rows),
             'patients': [r['patient_id'] for r in rows],
             'structures': {str(k): v for k, v in names.items()},
             'dice': {k[len('dice_'):]: stats[k].to_json() for k in keys},
             'paper_dice': {k: {'mean': m, 'sd': s} for k, (m, s) in paper.items()},
             'summary_markdown': markdown}
  reports.write_json(os.path.join(out_dir, 'summary.json'), summary)
  figures.dice_boxplot(os.path.join(out_dir, 'figures', 'dice_boxplot.png'), rows,
                       keys[:-1], list(names.values()), title='Dice per structure (MR)')
  return summary
