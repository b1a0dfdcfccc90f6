"""Reads whatever cells of a study have finished into one JSON-able results dict (JAX-free).

results = {
  'cells':    {name: {'status': 'done' | 'in progress' | 'not run', 'done': marker or None,
                      'seeds': {seed: status} (synthesis cells: seed 0 and every seed with a
                      run directory or a lock)}},
  'paired':   {cell: {metric: {patient: value}}}      Table 1 metrics, paired test subjects
  'mi':       {cell: {'mr': {patient: MI(MR, sCT)}, 'ct': {patient: MI(CT, sMR)}}}
  'dice':     {series: {structure: {patient: Dice}}}  series: a synthesis cell and
              mr_baseline (labeled MR), real_ct and real_ct_sct (the paired test subjects)
  'by_seed':  {cell: {seed: {'paired': ..., 'mi': ..., 'dice': ...}}}  synthesis cells: each
              finished seed's own numbers, laid out as above
  'structures': [names, in label order],
}
A synthesis cell's 'paired', 'mi' and 'dice' numbers are per patient the mean over its
finished seeds (all seeds score the same volumes of the one dataset); its status is 'done'
when any seed has finished, else 'in progress' when any seed runs; its 'done' marker is its
seed 0's, or with seed 0 unfinished the lowest finished seed's.
"""

import os
import re
from typing import Any

import numpy as np

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


def seeds_on_disk(workdir: str, cell: str) -> list[int]:
  """The seeds of `cell` that have a run directory or a lock (seed 0 always)."""
  pattern = re.compile(re.escape(cell + presets.SEED_SUFFIX) + r'([1-9][0-9]*)(\.lock)?$')
  found = {0}
  for sub in ('cells', 'locks'):
    folder = os.path.join(workdir, sub)
    if not os.path.isdir(folder):
      continue
    for entry in os.listdir(folder):
      match = pattern.match(entry)
      if match:
        found.add(int(match.group(1)))
  return sorted(found)


def _synthesis_numbers(out: str, done: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """One finished synthesis run's {'paired', 'mi', 'dice'} numbers and its structures."""
  eval_dir = os.path.join(out, done['eval'])
  rows = reports.read_rows_json(os.path.join(eval_dir, 'per_volume.json'))
  mi = unpaired_rows(eval_dir)
  dice, found = _dice(os.path.join(out, done['seg_eval']))
  return {'paired': {m: {str(r['patient_id']): float(r[m]) for r in rows}
                     for m in TABLE1 if rows and m in rows[0]},
          'mi': {d: {str(r['patient_id']): float(r['mi']) for r in rs} for d, rs in mi.items()},
          'dice': dice}, found


def seed_mean(per_seed: list[dict[str, dict[str, float]]], what: str = 'a cell'
              ) -> dict[str, dict[str, float]]:
  """{metric: {patient: mean over seeds}} of several seeds' {metric: {patient: value}}.

  NaN (e.g. Dice of a structure absent from a patient's truth) is left out of a mean and
  stays NaN only where every seed has NaN; +-inf (PSNR of an exact match) propagates.

  Raises:
    StudyError: the seeds scored different patients (a broken or foreign run).
  """
  out: dict[str, dict[str, float]] = {}
  for metric in dict.fromkeys(m for numbers in per_seed for m in numbers):
    columns = [numbers.get(metric, {}) for numbers in per_seed]
    patients = sorted(columns[0])
    if any(sorted(c) != patients for c in columns):
      raise layout.StudyError(f'{what}: its seeds scored different volumes for {metric} '
                              f'({[len(c) for c in columns]} volumes per seed); rerun the odd '
                              'seed or remove its directory')
    means = {}
    for patient in patients:
      v = np.array([float(c[patient]) for c in columns], np.float64)
      means[patient] = float('nan') if np.isnan(v).all() else float(np.mean(v[~np.isnan(v)]))
    out[metric] = means
  return out


def _collect_synthesis(workdir: str, cell: presets.Cell, results: dict[str, Any]) -> list[str]:
  """Fills `results` with one synthesis cell's seeds and their means; returns its structures."""
  seeds, by_seed, found = {}, {}, []
  first_done = None
  for seed in seeds_on_disk(workdir, cell.name):
    name = presets.Run(cell, seed).name
    seeds[seed] = status(workdir, name)
    done = layout.done_info(workdir, name)
    if done is None:
      continue
    first_done = first_done or (name, done)
    with layout.finished_outputs(layout.cell_dir(workdir, name)):
      by_seed[seed], structures = _synthesis_numbers(layout.cell_dir(workdir, name), done)
    found += [s for s in structures if s not in found]
  info = results['cells'][cell.name]
  info['seeds'] = seeds
  if first_done is None:
    if 'in progress' in seeds.values():
      info['status'] = 'in progress'
    return found
  name, done = first_done
  info.update(status='done', done=done)
  results['by_seed'][cell.name] = by_seed
  for source in ('paired', 'mi', 'dice'):
    results[source][cell.name] = seed_mean([n[source] for n in by_seed.values()],
                                           f'cell {cell.name}')
  results['samples'][cell.name] = os.path.join(layout.cell_dir(workdir, name), done['samples'])
  return found


def collect(workdir: str) -> dict[str, Any]:
  """The numbers of every finished cell of the study in `workdir` (layout: `collect`)."""
  results: dict[str, Any] = {'cells': {}, 'paired': {}, 'mi': {}, 'dice': {}, 'by_seed': {},
                             'structures': [], 'samples': {}}
  structures: list[str] = []
  for cell in presets.CELLS:
    done = layout.done_info(workdir, cell.name)
    results['cells'][cell.name] = {'status': status(workdir, cell.name), 'done': done}
    if cell.kind == 'synthesis':
      found = _collect_synthesis(workdir, cell, results)
      structures += [s for s in found if s not in structures]
      continue
    if done is None:
      continue
    out = layout.cell_dir(workdir, cell.name)
    with layout.finished_outputs(out):
      results['dice'][cell.name], found = _dice(os.path.join(out, done['eval']))
      if cell.kind == 'real_ct':
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
