"""Reads whatever cells of a study have finished into one JSON-able results dict (JAX-free).

results = {
  'cells':    {name: {'status': 'done' | 'in progress' | 'not run', 'done': marker or None}},
  'paired':   {cell: {metric: {patient: value}}}      Table 1 metrics, paired test subjects
  'mi':       {cell: {'mr': {patient: MI(MR, sCT)}, 'ct': {patient: MI(CT, sMR)}}}
  'dice':     {series: {structure: {patient: Dice}}}  series: a synthesis cell and
              mr_baseline (labeled MR), real_ct and real_ct_sct (the paired test subjects)
  'structures': [names, in label order],
}
"""

import os
from typing import Any

from mr2ct_jax.evaluation import reports
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import presets

TABLE1 = ('mae_255', 'psnr_255', 'mae_hu')
REAL_SCT = 'real_ct_sct'  # the real_ct cell's U-Net fed the same subjects' sCT


def _dice(eval_dir: str) -> tuple[dict[str, dict[str, float]], list[str]]:
  summary = layout.read_json(os.path.join(eval_dir, 'summary.json')) or {}
  structures = [summary['structures'][k] for k in sorted(summary.get('structures', {}), key=int)]
  rows = reports.read_rows_json(os.path.join(eval_dir, 'per_volume.json'))
  out = {s: {str(r['patient_id']): float(r[f'dice_{s}']) for r in rows if f'dice_{s}' in r}
         for s in structures}
  out['mean'] = {str(r['patient_id']): float(r['dice_mean']) for r in rows}
  return out, structures


def status(workdir: str, name: str) -> str:
  """'done', 'in progress' (another process holds its lock) or 'not run'."""
  if layout.done_info(workdir, name) is not None:
    return 'done'
  if os.path.isdir(os.path.join(workdir, 'locks')) and layout.is_locked(workdir, name):
    return 'in progress'
  return 'not run'


def collect(workdir: str) -> dict[str, Any]:
  """The numbers of every finished cell of the study in `workdir` (layout: `collect`)."""
  results: dict[str, Any] = {'cells': {}, 'paired': {}, 'mi': {}, 'dice': {}, 'structures': [],
                             'samples': {}}
  structures: list[str] = []
  for cell in presets.CELLS:
    done = layout.done_info(workdir, cell.name)
    results['cells'][cell.name] = {'status': status(workdir, cell.name), 'done': done}
    if done is None:
      continue
    out = layout.cell_dir(workdir, cell.name)
    if cell.kind == 'synthesis':
      eval_dir = os.path.join(out, done['eval'])
      rows = reports.read_rows_json(os.path.join(eval_dir, 'per_volume.json'))
      results['paired'][cell.name] = {m: {str(r['patient_id']): float(r[m]) for r in rows}
                                      for m in TABLE1 if rows and m in rows[0]}
      mi = unpaired_rows(eval_dir)
      results['mi'][cell.name] = {d: {str(r['patient_id']): float(r['mi']) for r in rs}
                                  for d, rs in mi.items()}
      results['dice'][cell.name], found = _dice(os.path.join(out, done['seg_eval']))
      results['samples'][cell.name] = os.path.join(out, done['samples'])
    elif cell.kind == 'baseline':
      results['dice'][cell.name], found = _dice(os.path.join(out, done['eval']))
    else:
      results['dice'][cell.name], found = _dice(os.path.join(out, done['eval']))
      results['dice'][REAL_SCT], _ = _dice(os.path.join(out, done['eval_sct']))
    structures += [s for s in found if s not in structures]
  results['structures'] = structures
  return results


def unpaired_rows(eval_dir: str) -> dict[str, list[dict[str, Any]]]:
  """unpaired.json of an evaluation as {'mr': rows, 'ct': rows} ({} without one)."""
  path = os.path.join(eval_dir, 'unpaired.json')
  out: dict[str, list[dict[str, Any]]] = {}
  if os.path.isfile(path):
    for row in reports.read_rows_json(path):
      out.setdefault(str(row['direction']), []).append(row)
  return out
