"""The paper's study driver at the tiny preset: every cell, the report, resuming, --cells."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mr2ct_jax.experiments import analysis
from mr2ct_jax.experiments import layout
from mr2ct_jax.experiments import presets
from mr2ct_jax.experiments import report as report_lib
from mr2ct_jax.experiments import stats
from mr2ct_jax.experiments import study as study_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST = 'gc_small,mr_baseline'


def _driver(workdir, *args):
  # One CPU device (not the 8 fake ones of conftest): the study compiles each program once.
  env = {**os.environ, 'XLA_FLAGS': os.environ.get('MR2CT_JAX_TEST_XLA_FLAGS', ''),
         'PYTHONPATH': str(REPO)}
  return subprocess.run([sys.executable, '-m', 'mr2ct_jax.experiments.paper', '--preset=tiny',
                         f'--workdir={workdir}', *args], cwd=REPO, capture_output=True,
                        encoding='utf-8', timeout=900, env=env)


def _mtimes(folder):
  return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(folder).rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """One tiny study: --cells=gc_small,mr_baseline first, then all cells, then a rerun, then
  a second seed of gc_small and nogc_small."""
  workdir = tmp_path_factory.mktemp('study')
  first = _driver(workdir, f'--cells={FIRST}')
  assert first.returncode == 0, first.stderr[-3000:]
  first_report = (workdir / 'report' / 'report.md').read_text(encoding='utf-8')
  first_cells = sorted(os.listdir(workdir / 'cells'))
  before = _mtimes(workdir / 'cells' / 'gc_small')
  full = _driver(workdir)
  assert full.returncode == 0, full.stderr[-3000:]
  after_full = _mtimes(workdir / 'cells')
  rerun = _driver(workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  after_rerun = _mtimes(workdir / 'cells')
  seeded = _driver(workdir, '--seeds=2', '--cells=gc_small,nogc_small@1')
  assert seeded.returncode == 0, seeded.stderr[-3000:]
  return {'workdir': workdir, 'first_report': first_report, 'first_cells': first_cells,
          'before': before, 'full': full, 'after_full': after_full, 'rerun': rerun,
          'after_rerun': after_rerun, 'seeded': seeded}


def test_cells_flag_runs_only_those(study):
  assert study['first_cells'] == sorted(FIRST.split(','))
  text = study['first_report']
  for name in presets.CELL_NAMES:
    state = 'done' if name in FIRST.split(',') else 'not run'
    assert re.search(rf'^\| {name} \| [^|]+ \| {state} \|', text, re.M), name
  assert 'Not run (its cells have not finished).' in text
  assert 'One seed per cell (run with --seeds=N for more)' in text


def test_every_cell_finishes_and_the_report_has_every_section(study):
  workdir = study['workdir']
  report = (workdir / 'report' / 'report.md').read_text(encoding='utf-8')
  for name in presets.CELL_NAMES:
    assert re.search(rf'^\| {name} \| [^|]+ \| done \|', report, re.M), name
    assert (workdir / 'cells' / name / 'cell.json').is_file()
  for heading in ('## Cells', '## Table 1', "### The paper's Table 1", '## Fig. 4', '## Fig. 6',
                  '## Fig. 5', '## Paired t-tests and verdicts', '## Per-volume numbers',
                  '## Seeds'):
    assert heading in report, heading
  for _, title, _, _, _ in analysis.QUESTIONS:
    assert f'### {title}' in report
  assert 'Not run' not in report and 'not run' not in report
  for png in ('table1_boxplot.png', 'mi_boxplot.png', 'dice_boxplot.png', 'slices_small.png',
              'slices_large.png'):
    path = workdir / 'report' / 'figures' / png
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
    assert f'figures/{png}' in report
  data = json.loads((workdir / 'report' / 'report.json').read_text(encoding='utf-8'))
  # 2 paired test subjects per synthesis cell; the synthesis cells trained their num_steps.
  for name in presets.SYNTHESIS:
    assert sorted(data['results']['paired'][name]['mae_hu']) == ['phantom010', 'phantom011']
    assert data['results']['cells'][name]['done']['step'] == 2
  assert '26.388' in report and '0.808 ± 0.036' in report  # the paper's numbers beside ours


def test_resuming_skips_finished_cells(study):
  full, rerun = study['full'].stderr + study['full'].stdout, study['rerun'].stderr
  rerun += study['rerun'].stdout
  assert 'Cell gc_small: finished earlier; skipped.' in full
  assert 'Cell mr_baseline: finished earlier; skipped.' in full
  assert 'Cell gc_large: running.' in full
  for name in presets.CELL_NAMES:
    assert f'Cell {name}: finished earlier; skipped.' in rerun
  assert 'compiled and ran' not in rerun and 'step 1/' not in rerun  # no training step ran
  workdir = study['workdir']
  assert _mtimes(workdir / 'cells' / 'gc_small') == study['before']
  assert study['after_rerun'] == study['after_full']
  # --seeds=2 added seed directories and left every earlier run as it was.
  now = _mtimes(workdir / 'cells')
  assert {p: t for p, t in now.items() if '_seed' not in p} == study['after_full']


def test_ttests_equal_scipy_on_the_listed_per_volume_numbers(study):
  workdir = study['workdir']
  report = (workdir / 'report' / 'report.md').read_text(encoding='utf-8')
  data = json.loads((workdir / 'report' / 'report.json').read_text(encoding='utf-8'))
  results, rows = data['results'], data['comparisons']
  assert {r['question'] for r in rows} == {q[0] for q in analysis.QUESTIONS}
  checked = 0
  for r in rows:
    a = results[r['source']][r['a']][r['metric']]
    b = results[r['source']][r['b']][r['metric']]
    ids = sorted(p for p in a if a[p] is not None and b.get(p) is not None)
    assert r['n'] == len(ids) >= 2
    va, vb = np.array([a[p] for p in ids]), np.array([b[p] for p in ids])
    d = vb - va
    if np.std(d) == 0:
      assert r['p'] is None and r['verdict'] == 'not testable (no spread)'
      continue
    expected = scipy_stats.ttest_rel(vb, va)
    assert r['t'] == pytest.approx(float(expected.statistic), rel=1e-9)
    assert r['p'] == pytest.approx(float(expected.pvalue), rel=1e-9)
    assert r['diff'] == pytest.approx(float(d.mean()), rel=1e-9)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert r['ci_low'] == pytest.approx(d.mean() - half, rel=1e-9)
    assert r['d_z'] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
    line = f'| {r["a"]} → {r["b"]} | {r["label"]} | {r["n"]} |'
    assert any(t.startswith(line) and f'| {report_lib.fmt_p(r["p"])} | {r["verdict"]} |' in t
               for t in report.splitlines()), line
    checked += 1
  assert checked > 10
  # The listed per-volume numbers are those the tests used (4 decimals in the Markdown).
  mae = results['paired']['gc_large']['mae_255']
  listed = ', '.join(f'{p} {v:.4f}' for p, v in sorted(mae.items()))
  assert f'- Paired test subjects, gc_large, MAE (0-255, paper): {listed}' in report


def test_a_second_seed_is_added_and_averaged_per_patient(study):
  workdir, log = study['workdir'], study['seeded'].stdout + study['seeded'].stderr
  assert 'Cell gc_small: finished earlier; skipped.' in log
  assert 'Cell gc_small_seed1: running.' in log and 'Cell nogc_small_seed1: running.' in log
  assert 'Cell gc_large' not in log and 'Cell nogc_small: ' not in log  # only what was asked
  for name in ('gc_small_seed1', 'nogc_small_seed1'):
    done = json.loads((workdir / 'cells' / name / 'cell.json').read_text(encoding='utf-8'))
    assert done['seed'] == 1 and done['config_seed'] == 1 and done['step'] == 2
    config = json.loads((workdir / 'cells' / name / 'config.json').read_text(encoding='utf-8'))
    seed0 = json.loads((workdir / 'cells' / name.replace('_seed1', '') / 'config.json')
                       .read_text(encoding='utf-8'))
    assert config['seed'] == 1 and seed0['seed'] == 0
    assert config['data']['train_patients'] == seed0['data']['train_patients']
  data = json.loads((workdir / 'report' / 'report.json').read_text(encoding='utf-8'))
  results = data['results']
  assert sorted(results['by_seed']['gc_small']) == ['0', '1']
  assert sorted(results['by_seed']['gc_large']) == ['0']
  for source, metric in (('paired', 'mae_hu'), ('mi', 'mr'), ('dice', 'mean')):
    seeds = results['by_seed']['gc_small']
    for patient, mean in results[source]['gc_small'][metric].items():
      values = [seeds[k][source][metric][patient] for k in ('0', '1')]
      assert mean == pytest.approx(np.mean(values), rel=1e-12), (source, patient)
    assert (results[source]['gc_large'][metric]
            == results['by_seed']['gc_large']['0'][source][metric])
  assert results['by_seed']['gc_small']['0'] != results['by_seed']['gc_small']['1']
  rows = {(r['a'], r['b'], r['metric']): r for r in data['comparisons']}
  assert rows[('nogc_small', 'gc_small', 'mae_hu')]['seeds'] == '2/2'
  assert rows[('gc_small', 'gc_large', 'mae_hu')]['seeds'] == '2/1'
  assert rows[('mr_baseline', 'gc_large', 'mean')]['seeds'] == '1/1'
  report = (workdir / 'report' / 'report.md').read_text(encoding='utf-8')
  assert re.search(r'^\| gc_small \| [^|]+ \| done \| 2 \| 0, 1 done \|', report, re.M)
  assert re.search(r'^\| gc_large \| [^|]+ \| done \| 2 \| 0 done \|', report, re.M)
  seeds_table = report.split("## Seeds")[1].split('\n## ')[0]
  sd = np.std([np.mean(list(results['by_seed']['gc_small'][k]['paired']['mae_hu'].values()))
               for k in ('0', '1')], ddof=1)
  header = next(line for line in seeds_table.splitlines() if line.startswith('| Cell |'))
  column = [c.strip() for c in header.split('|')].index('MAE in body (HU, network grid)')
  sd_row = next(line for line in seeds_table.splitlines()
                if line.startswith('| **gc_small: SD over 2 seeds** |  |'))
  assert [c.strip() for c in sd_row.split('|')][column] == f'{sd:.3f}'


def test_seed_selection_runs_seed_by_seed():
  runs = presets.select_runs('mr_baseline,nogc_small,gc_small', 3)
  assert [r.name for r in runs] == ['gc_small', 'nogc_small', 'mr_baseline', 'gc_small_seed1',
                                    'nogc_small_seed1', 'gc_small_seed2', 'nogc_small_seed2']
  picked = presets.select_runs('real_ct,gc_large@4', 1)  # @k needs no --seeds
  assert [r.name for r in picked] == ['real_ct', 'gc_large_seed4']
  everything = presets.select_runs(None, 2)
  assert len(everything) == 2 * len(presets.SYNTHESIS) + 2
  assert [r.name for r in everything[:len(presets.CELLS)]] == list(presets.CELL_NAMES)
  for names, seeds, message in (('mr_baseline@1', 3, "'mr_baseline@1': the seed must be a "
                                 'number >= 0 and 0 for mr_baseline (it runs once)'),
                                ('gc_small@x', 2, "'gc_small@x': the seed must be a number"),
                                ('gc_small@\u00b2', 2, "the seed must be a number"),
                                ('gc_small', 0, '--seeds=0: must be at least 1'),
                                (',', 1, "--cells=',': names no cell"),
                                (' , ', 1, "--cells=' , ': names no cell")):
    with pytest.raises(presets.PresetError, match=re.escape(message)):
      presets.select_runs(names, seeds)
  config = presets.cell_config(presets.get_preset('tiny'), presets.BY_NAME['gc_small'], '/d', 2)
  assert config.seed == presets.base_config(presets.get_preset('tiny')).seed + 2


def _fake_run(workdir, name, values, *, done=True):
  """A finished synthesis run with the given {metric: {patient: value}} (JAX-free)."""
  out = workdir / 'cells' / name
  (out / 'eval').mkdir(parents=True)
  (out / 'seg' / 'eval').mkdir(parents=True)
  patients = sorted(values['mae_hu'])
  (out / 'eval' / 'per_volume.json').write_text(json.dumps(
      [{'patient_id': p, **{m: v[p] for m, v in values.items()}} for p in patients]))
  (out / 'seg' / 'eval' / 'summary.json').write_text(json.dumps({'structures': {'1': 'bone'}}))
  (out / 'seg' / 'eval' / 'per_volume.json').write_text(json.dumps(
      [{'patient_id': p, 'dice_bone': 0.5, 'dice_mean': 0.5} for p in patients]))
  if done:
    (out / 'cell.json').write_text(json.dumps(
        {'eval': 'eval', 'seg_eval': 'seg/eval', 'samples': 'samples.npz', 'step': 2}))


def test_collect_averages_seeds_and_reports_partial_cells(tmp_path):
  from mr2ct_jax.experiments import collect  # pylint: disable=g-import-not-at-top
  nan = float('nan')
  _fake_run(tmp_path, 'gc_small', {'mae_hu': {'p1': 10.0, 'p2': 20.0},
                                   'psnr_255': {'p1': float('inf'), 'p2': 30.0}})
  _fake_run(tmp_path, 'gc_small_seed1', {'mae_hu': {'p1': 14.0, 'p2': nan},
                                         'psnr_255': {'p1': float('inf'), 'p2': 20.0}})
  _fake_run(tmp_path, 'gc_large_seed1', {'mae_hu': {'p1': 1.0, 'p2': 2.0}})  # seed 0 never ran
  (tmp_path / 'locks').mkdir()
  (tmp_path / 'locks' / 'nogc_small_seed3.lock').write_text('')  # started, then killed
  results = collect.collect(str(tmp_path))
  assert results['paired']['gc_small']['mae_hu'] == {'p1': 12.0, 'p2': 20.0}  # NaN left out
  assert results['paired']['gc_small']['psnr_255'] == {'p1': float('inf'), 'p2': 25.0}
  cells = results['cells']
  assert cells['gc_small']['seeds'] == {0: 'done', 1: 'done'}
  assert cells['gc_large']['status'] == 'done' and cells['gc_large']['seeds'] == {
      0: 'not run', 1: 'done'}
  assert results['paired']['gc_large']['mae_hu'] == {'p1': 1.0, 'p2': 2.0}
  assert cells['nogc_small']['status'] == 'not run'
  assert cells['nogc_small']['seeds'] == {0: 'not run', 3: 'not run'}
  assert 'nogc_small' not in results['paired']
  with layout.locked(str(tmp_path), 'gc_signed_large_seed1', wait=False) as mine:
    assert mine  # this process runs it now (flock: another open file sees it held)
    running = collect.collect(str(tmp_path))['cells']['gc_signed_large']
    report_md = pathlib.Path(report_lib.build(str(tmp_path), 'tiny', 'x'))
    report = report_md.read_text(encoding='utf-8')
  assert running['status'] == 'in progress'
  assert running['seeds'] == {0: 'not run', 1: 'in progress'}
  assert re.search(r'^\| gc_signed_large \| [^|]+ \| in progress \|  \| 0 not run; 1 in '
                   r'progress \|', report, re.M)
  assert re.search(r'^\| gc_large \| [^|]+ \| done \| 2 \| 0 not run; 1 done \|', report, re.M)
  _fake_run(tmp_path, 'gc_small_seed2', {'mae_hu': {'p1': 1.0}})  # scored another test set
  with pytest.raises(layout.StudyError, match='cell gc_small: its seeds scored different'):
    collect.collect(str(tmp_path))


def test_verdict_rule():
  base = {'n': 5, 'p': 0.01, 'diff': -1.0}
  assert stats.verdict(base, higher_is_better=False) == 'helped (p<0.05)'
  assert stats.verdict({**base, 'p': 0.001}, higher_is_better=True) == 'hurt (p<0.01)'
  assert stats.verdict({**base, 'p': 0.2}, higher_is_better=True) == 'no significant difference'
  assert stats.verdict({**base, 'n': 1}, higher_is_better=True) == 'not testable (n = 1)'
  result = stats.compare({'a': 1.0, 'b': 2.0, 'c': 4.0}, {'a': 2.0, 'b': 2.5, 'c': 6.0})
  assert result['diff'] == pytest.approx(3.5 / 3) and result['n'] == 3
  assert result['p'] == pytest.approx(scipy_stats.ttest_rel([2, 2.5, 6], [1, 2, 4]).pvalue)


@pytest.mark.parametrize('damage', ['truncated', 'not a number', 'deleted', 'bad samples'])
def test_a_finished_cell_with_unreadable_outputs_says_how_to_redo_it(tmp_path, damage):
  # A finished cell is never run again: without this, every rerun failed the same way (some
  # damage with a traceback) and nothing said what to do.
  from mr2ct_jax.experiments import collect  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.experiments import figures as study_figures  # pylint: disable=g-import-not-at-top
  _fake_run(tmp_path, 'gc_small', {'mae_hu': {'p1': 10.0, 'p2': 20.0}})
  cell = tmp_path / 'cells' / 'gc_small'
  rows = cell / 'eval' / 'per_volume.json'
  message = re.escape(f'{cell}: a finished cell whose outputs cannot be read (') + '.*' + (
      re.escape('); remove this folder and rerun to run the cell again'))
  if damage == 'bad samples':
    (cell / 'samples.npz').write_bytes(b'PK\x03\x04 cut short')
    with pytest.raises(layout.StudyError, match=message):
      study_figures._load(str(cell / 'samples.npz'))  # pylint: disable=protected-access
    return
  if damage == 'truncated':
    rows.write_text(rows.read_text()[:20])
  elif damage == 'not a number':
    rows.write_text(rows.read_text().replace('10.0', '"abc"'))
  else:
    rows.unlink()
  with pytest.raises(layout.StudyError, match=message):
    collect.collect(str(tmp_path))


def test_a_cell_whose_dependency_has_not_finished_exits_75_not_0(tmp_path):
  # A scheduler running one job per cell took the real_ct job, which ran nothing, as done.
  waiting = _driver(tmp_path / 'w', '--cells=real_ct')
  assert waiting.returncode == 75, waiting.stderr
  assert waiting.stderr.strip().splitlines()[-1] == (
      'waiting: real_ct (needs gc_large) not run: what it needs has not finished; run the same '
      'command again once it has')
  assert (tmp_path / 'w' / 'report' / 'report.md').is_file()  # the report of what exists


def test_unknown_cell_and_paper_without_data_are_one_line_errors(tmp_path):
  bad = _driver(tmp_path / 'a', '--cells=gc_tiny')
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: --cells: unknown cell 'gc_tiny'")
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  paper = subprocess.run([sys.executable, '-m', 'mr2ct_jax.experiments.paper', '--preset=paper',
                          f'--workdir={tmp_path / "b"}'], cwd=REPO, capture_output=True,
                         encoding='utf-8', timeout=300, env=env)
  assert paper.returncode == 1
  assert paper.stderr.strip().splitlines()[-1] == (
      'error: --preset=paper needs --data=DATA (a prepared dataset)')


def test_a_bucket_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(layout.StudyError, match=r'^--workdir=gs://b/study: a study workdir must'):
    study_lib.run('tiny', 'gs://b/study', cells='gc_small')
  assert not list(tmp_path.iterdir())  # no local "gs:" folder
  env = {**os.environ, 'DATA': '/data/hip', 'WORKDIR': 'gs://b/paper', 'GPUS': '0'}
  result = subprocess.run(['bash', str(REPO / 'launch' / 'paper_sweep.sh'), '--dry-run'],
                          cwd=REPO, capture_output=True, encoding='utf-8', timeout=60, env=env)
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.startswith('WORKDIR=gs://b/paper: need a shared POSIX filesystem')


def test_a_data_url_is_recorded_as_given(tmp_path):
  layout.check_study_file(str(tmp_path), 'paper', 'gs://bucket/hip/')
  assert json.loads((tmp_path / layout.STUDY_FILE).read_text(encoding='utf-8'))['data'] == (
      'gs://bucket/hip')
  assert study_lib.data_label(str(tmp_path), 'gs://bucket/hip') == 'gs://bucket/hip'


def test_sweep_dry_run_prints_one_job_per_cell():
  env = {**os.environ, 'DATA': '/data/hip', 'WORKDIR': 'runs/paper', 'GPUS': '0 1 2 3 4 5'}
  env.pop('SEEDS', None)
  result = subprocess.run(['bash', str(REPO / 'launch' / 'paper_sweep.sh'), '--dry-run'],
                          cwd=REPO, capture_output=True, encoding='utf-8', timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  cells = [c for c in presets.CELL_NAMES if c != 'real_ct'] + ['real_ct']
  assert len(lines) == len(cells)
  for i, (line, cell) in enumerate(zip(lines, cells)):
    assert line.split() == [
        'env', f'CUDA_VISIBLE_DEVICES={i % 6}', 'python', '-m', 'mr2ct_jax.experiments.paper',
        '--preset=paper', '--data=/data/hip', '--workdir=runs/paper', f'--cells={cell}']


def test_sweep_dry_run_with_seeds_runs_each_seed_as_its_own_job():
  env = {**os.environ, 'DATA': '/data/hip', 'WORKDIR': 'runs/paper', 'SEEDS': '2',
         'GPUS': ' '.join(map(str, range(11)))}
  result = subprocess.run(['bash', str(REPO / 'launch' / 'paper_sweep.sh'), '--dry-run'],
                          cwd=REPO, capture_output=True, encoding='utf-8', timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  jobs = [f'{c}@{k}' for c in presets.SYNTHESIS for k in (0, 1)] + ['mr_baseline', 'real_ct']
  assert len(lines) == len(jobs)
  for i, (line, job) in enumerate(zip(lines, jobs)):
    words = line.split()
    assert words[1] == f'CUDA_VISIBLE_DEVICES={i % 11}'
    assert words[-2:] == ['--seeds=2', f'--cells={job}']
