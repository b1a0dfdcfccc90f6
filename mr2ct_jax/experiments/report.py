"""report.md (+ report.json, figures/) of a study, rebuilt from whatever cells have finished.

Sections, in the paper's order: cells, Table 1 (per patient, mean ± SD per cell, the paper's
beside), MI (Fig. 4), the seed-to-seed spread of each cell's means, Dice (Fig. 6, with the
MR-only baseline and the real-CT upper bound), representative slices (Fig. 5), the paired
t-tests with a rule-made verdict per comparison, and the per-volume numbers the tests were
computed from. report.json holds every number shown.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mr2ct_jax import atomic
from mr2ct_jax.evaluation import reports
from mr2ct_jax.experiments import analysis
from mr2ct_jax.experiments import collect
from mr2ct_jax.experiments import figures
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import paper_numbers
from mr2ct_jax.experiments import presets
from mr2ct_jax.experiments import stats

REPORT_FILE = 'report.md'
DATA_FILE = 'report.json'
CAVEAT = ('The paper\'s numbers come from its own hip MR/CT cohort (302 MR, 613 CT, 3 paired '
          'test patients, 10 labeled MR); ours from the dataset named above. The data differ, '
          'so compare directions and effect sizes, not values.')


def fmt_p(p: float) -> str:
  """A p-value as the report prints it."""
  if not math.isfinite(p):
    return 'nan'
  return f'{p:.2e}' if p < 1e-3 else f'{p:.4f}'


def _stats_cell(values: Mapping[str, float], decimals: int) -> str:
  return reports.fmt_stats(reports.describe(list(values.values())), decimals)


def _seeds_text(seeds: Mapping[int, str]) -> str:
  """'0, 1 done; 2 in progress' from {seed: status}."""
  groups: dict[str, list[str]] = {}
  for seed, state in sorted(seeds.items()):
    groups.setdefault(state, []).append(str(seed))
  return '; '.join(f'{", ".join(v)} {k}' for k, v in groups.items())


def _cells_section(results: Mapping[str, Any]) -> list[str]:
  body = []
  for cell in presets.CELLS:
    info = results['cells'][cell.name]
    done = info['done'] or {}
    gc = 'signed' if cell.signed else 'on' if cell.gc else 'off'
    what = {'synthesis': f'{cell.size} set, GC {gc}', 'baseline': 'MR-only U-Net, k-fold CV',
            'real_ct': f'real CT into {cell.needs}\'s U-Net'}
    step = done.get('step', done.get('unet_step', ''))
    seeds = _seeds_text(info['seeds']) if 'seeds' in info else '-'
    body.append([cell.name, what[cell.kind], info['status'], str(step), seeds])
  return ['## Cells', '', reports.md_table(['Cell', 'What', 'Status', 'Step', 'Seeds'], body),
          '', 'A synthesis cell\'s numbers below are, per patient, the mean over its finished '
          'seeds (section "Seeds"); its sample slices are those of its first finished seed.', '']


def _seeds_section(results: Mapping[str, Any]) -> list[str]:
  """Each synthesis cell's mean per seed: how far a cell moves with the training seed alone."""
  by_seed = results.get('by_seed', {})
  out = ['## Seeds: how much a cell\'s mean moves with the training seed', '']
  if not any(len(seeds) > 1 for seeds in by_seed.values()):
    return out + ['One seed per cell (run with --seeds=N for more): the differences between '
                  'cells below include the seed-to-seed spread, which one seed cannot show.', '']
  columns = [('paired', m) for m in collect.TABLE1] + [('mi', 'mr'), ('dice', 'mean')]
  decimals = {'paired': 3, 'mi': 4, 'dice': 3}
  body = []
  for cell, seeds in by_seed.items():
    means = {c: [] for c in columns}
    for seed, numbers in sorted(seeds.items()):
      row = [cell, str(seed)]
      for source, metric in columns:
        values = list(numbers.get(source, {}).get(metric, {}).values())
        mean = reports.describe(values).mean
        means[(source, metric)].append(mean)
        row.append(reports.fmt(mean, decimals[source]))
      body.append(row)
    if len(seeds) > 1:
      spread = {c: reports.describe(means[c]) for c in columns}
      body.append([f'**{cell}: SD over {len(seeds)} seeds**', ''] + [
          reports.fmt(spread[c].sd, decimals[c[0]])
          + ('' if spread[c].n == len(seeds) else f' (n = {spread[c].n})') for c in columns])
  header = ['Cell', 'Seed'] + [analysis.metric_label(s, m) for s, m in columns]
  return out + [reports.md_table(header, body), '',
                'Per seed: the mean over the test volumes. Compare the SD over seeds with the '
                'differences between cells: a difference smaller than it is one that another '
                'seed could reverse; the t-tests below use each cell\'s per-patient means over '
                'its seeds.', '']


def _table1_section(results: Mapping[str, Any], figs: Mapping[str, str]) -> list[str]:
  out = ['## Table 1: paired test subjects (MAE, PSNR on 0-255; MAE in HU)', '']
  cells = results['paired']
  if not cells:
    return out + ['No synthesis cell has finished.', '']
  out += [f'![Table 1 metrics](figures/{figs["table1"]})', '']
  for metric in collect.TABLE1:
    have = {c: v[metric] for c, v in cells.items() if metric in v}
    if not have:
      continue
    d = reports.metric_info(metric).decimals
    patients = sorted({p for v in have.values() for p in v})
    body = [[p] + [reports.fmt(v.get(p, float('nan')), d) for v in have.values()]
            for p in patients]
    body.append(['**Average ± SD**'] + [_stats_cell(v, d) for v in have.values()])
    out += [f'### {analysis.metric_label("paired", metric)}', '',
            reports.md_table(['Patient'] + list(have), body), '']
  out += ['### The paper\'s Table 1 (its data)', '']
  header = ['Metric', 'Patient'] + [f'{"20" if s == "small" else ">300"} vol., '
                                    f'{"with" if g else "w/o"} GC ({c})'
                                    for (s, g), c in zip(paper_numbers.TABLE1_COLUMNS,
                                                         paper_numbers.TABLE1_CELLS)]
  body = [[analysis.metric_label('paired', m), p] + [str(v) for v in vals]
          for m, rows in paper_numbers.TABLE1.items() for p, vals in rows.items()]
  return out + [reports.md_table(header, body), '', f'Caveat: {CAVEAT}', '']


def _mi_section(results: Mapping[str, Any], figs: Mapping[str, str]) -> list[str]:
  out = ['## Fig. 4: MI of the unpaired test volumes', '']
  if 'mi' not in figs:
    return out + ['No unpaired MI yet (no synthesis cell finished, or no test_mr/test_ct).', '']
  out += [f'![MI](figures/{figs["mi"]})', '']
  body = [[c] + [_stats_cell(v.get(d, {}), 4) if v.get(d) else '-' for d in ('mr', 'ct')]
          for c, v in results['mi'].items()]
  return out + [reports.md_table(['Cell', analysis.metric_label('mi', 'mr'),
                                  analysis.metric_label('mi', 'ct')], body), '',
                'Per volume: mean over slices of MI in nats (64 x 64 bins over the paper\'s '
                '0-255 windows). The paper prints no MI values (box plots only).', '']


def _dice_section(results: Mapping[str, Any], figs: Mapping[str, str]) -> list[str]:
  out = ['## Fig. 6: Dice per structure', '']
  if 'dice' not in figs:
    return out + ['No segmentation result yet.', '']
  out += [f'![Dice](figures/{figs["dice"]})', '']
  structures = list(results['structures']) + ['mean']
  body = [[s] + [_stats_cell(v[st], 3) if v.get(st) else '-' for st in structures]
          for s, v in results['dice'].items()]
  for label, ref in (('paper: via synthesis, GC, >300 vol.', paper_numbers.DICE_GC_LARGE),
                     ('paper: MR-only 5-fold', paper_numbers.DICE_MR_BASELINE)):
    body.append([label] + [f'{ref[s][0]:.3f} ± {ref[s][1]:.3f}' if s in ref else '-'
                           for s in structures])
  return out + [reports.md_table(['Series'] + [s.replace('_', ' ') for s in structures], body),
                '', 'Synthesis cells and mr_baseline: the labeled MR (labeled_mr split, else '
                'the paired test split). real_ct and real_ct_sct: the paired test subjects, '
                f'segmented by the U-Net of {presets.BY_NAME["real_ct"].needs} with the real CT '
                '(real_ct) or with its sCT (real_ct_sct) as the CT channel and the real MR as '
                'the MR channel: the gap between the two is what the synthesis costs. Both '
                'use one U-Net, that of the cell\'s seed 0, while the synthesis rows average '
                'every finished seed.',
                '', f'Caveat: {CAVEAT}', '']


def _slices_section(figs: Mapping[str, str]) -> list[str]:
  out = ['## Fig. 5: representative slices', '']
  for size in ('small', 'large'):
    key = f'slices_{size}'
    out += ([f'![{size} set](figures/{figs[key]})', ''] if key in figs else
            [f'{size} set: not run (needs gc_{size} and nogc_{size}).', ''])
  return out


def _ttest_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  out = ['## Paired t-tests and verdicts', '',
         'B against A (B - A), matched by patient (a synthesis cell: its per-patient mean over '
         'its finished seeds; "seeds A/B" counts them); scipy.stats.ttest_rel(B, A), '
         'two-sided; 95% CI of the mean difference from the t distribution (n - 1 d.o.f.); '
         'd_z = mean difference / SD of the differences. Verdict rule: p < 0.05 and B better = '
         '"helped" (or the question\'s word), p < 0.05 and B worse = "hurt", else "no significant '
         'difference"; fewer than 2 pairs = "not testable".', '']
  for key, title, _, _, _ in analysis.QUESTIONS:
    mine = [r for r in rows if r['question'] == key]
    out += [f'### {title}', '', f'Paper: {paper_numbers.CLAIMS[key]}', '']
    if not mine:
      out += ['Not run (its cells have not finished).', '']
      continue
    body = []
    for r in mine:
      d = 3 if r['source'] == 'dice' else 4
      body.append([f'{r["a"]} → {r["b"]}', r['label'], str(r['n']), r['seeds'],
                   reports.fmt(r['mean_a'], d),
                   reports.fmt(r['mean_b'], d), reports.fmt(r['diff'], d),
                   f'[{reports.fmt(r["ci_low"], d)}, {reports.fmt(r["ci_high"], d)}]',
                   reports.fmt(r['d_z'], 2), reports.fmt(r['t'], 3), fmt_p(r['p']), r['verdict']])
    counts = stats.summary_counts([r['verdict'] for r in mine])
    out += [reports.md_table(['A → B', 'Metric', 'n', 'seeds A/B', 'mean A', 'mean B', 'B - A',
                              '95% CI',
                              'd_z', 't', 'p', 'Verdict'], body), '',
            'Verdicts of this question: ' + ', '.join(f'{k}: {v}' for k, v in counts.items())
            + f' (of {len(mine)} comparisons, p < {stats.ALPHA} unadjusted).', '']
  return out


def _per_volume_section(results: Mapping[str, Any]) -> list[str]:
  out = ['## Per-volume numbers (the t-tests\' input)', '',
         'Full precision in report.json (`results`).', '']
  for source, title in (('paired', 'Paired test subjects'), ('mi', 'Unpaired test volumes'),
                        ('dice', 'Dice')):
    for name, metrics in results[source].items():
      for metric, values in metrics.items():
        if not values:
          continue
        text = ', '.join(f'{p} {reports.fmt(v, 4)}' for p, v in sorted(values.items()))
        out.append(f'- {title}, {name}, {analysis.metric_label(source, metric)}: {text}')
  return out + ['']


def _jsonable(obj: Any) -> Any:
  """`obj` with every float made strict-JSON safe (NaN -> null, inf -> 'inf')."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  return reports.json_number(obj)


def build(workdir: str, preset: str, data: str) -> str:
  """Collects the finished cells and writes WORKDIR/report/; returns the report.md path."""
  results = collect.collect(workdir)
  rows = analysis.comparisons(results)
  target = layout.report_dir(workdir)
  with atomic.building_dir(target) as tmp:
    figs = figures.write_all(os.path.join(tmp, 'figures'), results)
    text = [f'# The paper\'s study: preset {preset}', '', f'Data: {data}', '']
    text += _cells_section(results) + _table1_section(results, figs) + _mi_section(results, figs)
    text += _seeds_section(results)
    text += _dice_section(results, figs) + _slices_section(figs) + _ttest_section(rows)
    text += _per_volume_section(results)
    atomic.write_text(os.path.join(tmp, REPORT_FILE), '\n'.join(text))
    reports.write_json(os.path.join(tmp, DATA_FILE), _jsonable({
        'preset': preset, 'data': data, 'figures': figs,
        'results': {k: v for k, v in results.items() if k != 'samples'},
        'comparisons': rows}))
  return os.path.join(target, REPORT_FILE)
