"""evaluate: metrics of translated volumes, output files, --compare, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from mr2ct_jax import evaluate
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import compare
from mr2ct_jax.data import dataset
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import fingerprint
from mr2ct_jax.evaluation import native
from mr2ct_jax.evaluation import synthrad
from mr2ct_jax.data import checksums
from mr2ct_jax.inference import volumes as inference_volumes
from mr2ct_jax.evaluation import paired
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.inference import slices
from mr2ct_jax.data import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _volumes(num=2, slices=4, size=32, seed=0):
  """Volumes whose CT is an exact linear function of the MR inside the windows.

  MR in [10, 90] (window [0, 100]) and CT = -150 + 5 MR in [-100, 300] HU (window [-150, 350])
  map to the same model-range image, so an identity generator is a perfect MR->CT translator.
  """
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    mr = rng.uniform(10, 90, (slices, size, size)).astype(np.float32)
    mask = np.zeros(mr.shape, np.uint8)
    mask[:, 4:28, 6:26] = 1
    mask[-1] = 0  # a slice outside the common FOV
    out.append({'patient_id': f'p{i}', 'image': mr, 'paired': (-150 + 5 * mr).astype(np.float32),
                'mask': mask, 'label': np.zeros(mr.shape, np.uint8)})
  return out


def _shift(delta):
  return lambda x: np.asarray(x) + np.float32(delta)


def test_translate_slices_batches_and_pads():
  calls = []

  def fn(batch):
    calls.append(batch.shape)
    return batch * 2

  x = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4)
  np.testing.assert_array_equal(slices.translate_slices(fn, x, 2), 2 * x)
  assert calls == [(2, 4, 4, 1)] * 3  # last batch padded: one shape, one compile


def test_evaluate_volumes_known_values(test_config):
  vols = _volumes()
  # Perfect translator: sCT == CT (up to float32 rounding).
  per_volume, per_slice = scoring.evaluate_volumes(vols, _shift(0.0), _shift(0.0), test_config)
  assert [r['patient_id'] for r in per_volume] == ['p0', 'p1']
  assert len(per_slice) == 8
  for r in per_volume:
    assert r['mae_255'] < 1e-3 and r['mae_hu'] < 1e-2
    assert r['psnr_255'] > 80 and r['ssim'] == pytest.approx(1.0, abs=1e-6)
    assert r['ssim_hu_grid'] == pytest.approx(1.0, abs=1e-6)
    # MI(CT, sMR) with sMR == MR: the MR's entropy on the same 64 bins over [0, 255].
    assert r['mi_ct_smr'] == pytest.approx(r['mi_mr_sct'], rel=1e-3)
    assert r['mi_mr_sct'] > 3.0
  assert all(math.isnan(s['mae_255']) for s in per_slice if s['slice_index'] == 3)

  # sCT brighter by 0.1 in the model range = +12.75 on the 0-255 scale = +25 HU everywhere.
  per_volume, per_slice = scoring.evaluate_volumes(vols, _shift(0.1), None, test_config)
  for r in per_volume:
    assert r['mae_255'] == pytest.approx(12.75, abs=1e-3)
    assert r['psnr_255'] == pytest.approx(20 * math.log10(255 / 12.75), abs=1e-3)
    assert r['mae_hu'] == pytest.approx(25.0, abs=1e-2)
    assert r['psnr_hu_grid'] == pytest.approx(20 * math.log10(4024 / 25.0), abs=1e-3)
    assert 0.9 < r['ssim'] < 1.0
    assert 'mi_ct_smr' not in r  # no CT->MR generator
    # 0-255 metrics over whole common-FOV slices (3 of 4 have mask voxels); HU in the body.
    assert r['valid_voxels'] == 3 * 32 * 32 and r['region'] == 'fov_levels'
    assert r['mask_voxels'] == 3 * 24 * 20
  s = per_slice[0]
  assert s['mae_255'] == pytest.approx(12.75, abs=1e-3) and s['valid_voxels'] == 32 * 32


def test_evaluate_volumes_uses_fov_when_present(test_config):
  vol = _volumes(num=1)[0]
  vol['fov'] = np.ones_like(vol['mask'])
  (r,), _ = scoring.evaluate_volumes([vol], _shift(0.1), None, test_config)
  assert r['region'] == 'fov' and r['valid_voxels'] == 4 * 32 * 32
  assert r['mask_voxels'] == 3 * 24 * 20


def test_evaluate_volumes_bad_input(test_config):
  vol = _volumes(num=1)[0]
  bad = dict(vol, paired=vol['paired'][:2])
  with pytest.raises(scoring.EvaluateError, match="test patient p0: 'paired' has shape"):
    scoring.evaluate_volumes([bad], _shift(0.0), None, test_config)
  with pytest.raises(scoring.EvaluateError, match='appears twice'):
    scoring.evaluate_volumes([vol, vol], _shift(0.0), None, test_config)


def _write_eval(out_dir, config, delta, seed=0, panels=True):
  with reports.atomic_output_dir(out_dir) as tmp:
    figure_dir = os.path.join(tmp, 'figures')
    os.makedirs(figure_dir)
    per_volume, per_slice = scoring.evaluate_volumes(
        _volumes(num=3, seed=seed), _shift(delta), _shift(0.0), config,
        figure_dir=figure_dir if panels else None)
    for i, r in enumerate(per_volume):  # make the paired differences non-degenerate
      r['mae_255'] += 0.1 * i * (delta != 0)
    fp = fingerprint.fingerprint(None, 'test', [r['patient_id'] for r in per_volume])
    return paired.write_outputs(tmp, per_volume, per_slice,
                                {'source': 'synthetic', 'step': 7, 'fingerprint': fp})


def test_outputs_and_compare(tmp_path, test_config, capsys):
  dir_a, dir_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  summary_a = _write_eval(dir_a, test_config, 0.0)
  _write_eval(dir_b, test_config, 0.1)
  files = sorted(os.listdir(dir_a))
  assert files == ['figures', 'per_slice.csv', 'per_volume.csv', 'per_volume.json',
                   'summary.json', 'summary.md']
  assert sorted(os.listdir(os.path.join(dir_a, 'figures'))) == [
      'metrics_boxplot.png', 'mi_boxplot.png', 'p0.png', 'p1.png', 'p2.png']
  for name in os.listdir(os.path.join(dir_a, 'figures')):
    with open(os.path.join(dir_a, 'figures', name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  summary = json.load(open(os.path.join(dir_a, 'summary.json'), encoding='utf-8'))
  assert summary['num_volumes'] == 3 and summary['num_slices'] == 12
  assert summary['metrics']['ssim']['n'] == 3 and summary_a['step'] == 7
  md = open(os.path.join(dir_a, 'summary.md'), encoding='utf-8').read()
  assert '| p0 |' in md and '**Average ± SD**' in md and 'common field of view' in md
  assert len(open(os.path.join(dir_a, 'per_slice.csv'), encoding='utf-8').read().splitlines()) == 13

  result = compare.compare(dir_a, dir_b)
  printed = capsys.readouterr().out
  assert 'Paired t-tests' in printed and 'MAE (0-255, paper)' in printed
  by_metric = {r['metric']: r for r in result['results']}
  a = [r['mae_255'] for r in reports.read_rows_json(os.path.join(dir_a, 'per_volume.json'))]
  b = [r['mae_255'] for r in reports.read_rows_json(os.path.join(dir_b, 'per_volume.json'))]
  ref = stats.ttest_rel(b, a)
  assert by_metric['mae_255']['t'] == pytest.approx(ref.statistic)
  assert by_metric['mae_255']['p'] == pytest.approx(ref.pvalue)
  assert os.path.exists(os.path.join(dir_b, 'compare.md'))
  assert json.load(open(os.path.join(dir_b, 'compare.json'), encoding='utf-8'))['a'] == dir_a
  with pytest.raises(reports.ReportError, match='--overwrite'):
    compare.compare(dir_a, dir_b)

  # Different patient sets (and no fingerprint): a one-line error even when allowed.
  rows = reports.read_rows_json(os.path.join(dir_a, 'per_volume.json'))[:2]
  other = tmp_path / 'c'
  other.mkdir()
  reports.write_json(str(other / 'per_volume.json'), reports.rows_to_json(rows))
  with pytest.raises(reports.ReportError, match='patient ids differ'):
    compare.compare(dir_a, str(other), str(tmp_path / 'cmp'), allow_different_data=True)


def test_cli_compare_and_errors(tmp_path, test_config, capsys):
  dir_a, dir_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _write_eval(dir_a, test_config, 0.0, panels=False)
  _write_eval(dir_b, test_config, 0.1, panels=False)
  # One real process: `python -m mr2ct_jax.evaluate --compare A B` (positional directories).
  res = subprocess.run([sys.executable, '-m', 'mr2ct_jax.evaluate', '--compare', dir_a, dir_b,
                        f'--output={tmp_path / "cmp"}'], capture_output=True, encoding='utf-8',
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert res.returncode == 0, res.stderr
  assert 'B - A' in res.stdout and os.path.exists(tmp_path / 'cmp' / 'compare.json')
  # Bad input: one-line errors from main() (in-process, the same code path).
  prog = 'mr2ct_jax.evaluate'
  for argv, message in [
      ([prog, '--compare', dir_a], 'exactly two'),
      ([prog, '--compare', dir_a, f'{tmp_path}/gone'], r'gone: no such evaluation folder$'),
      ([prog, f'--workdir={tmp_path / "nope"}', f'--output={tmp_path / "o"}'], 'nope'),
      ([prog, f'--workdir={tmp_path}', f'--output={dir_a}'], '--overwrite'),
      ([prog, f'--workdir={tmp_path}', f'--npz={tmp_path}/g.npz'], 'exactly one'),
      ([prog, '--bogus'], 'bogus')]:
    with pytest.raises(SystemExit, match=message) as exc:
      evaluate.main(argv)
    assert str(exc.value).startswith('error: ') and '\n' not in str(exc.value)
  assert evaluate.main([prog, '--help']) == 0
  assert '--compare' in capsys.readouterr().out


def test_evaluate_end_to_end_on_phantom(tmp_path, test_config, monkeypatch, capsys):
  """evaluate() on the prepared phantom's test split; generators replaced by fixed maps."""
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  data_dir = writer.prepare_phantom(str(tmp_path / 'phantom'), test_config)
  loaded = []

  def fake_load(source, direction='mr2ct', step=None, backend='jax'):
    loaded.append((direction, step))
    info = generators.GeneratorInfo(source=source, kind='workdir', direction=direction,
                                    network=generators.network_for(direction),
                                    step=4, backend=backend)
    return (lambda x: -np.asarray(x)), test_config, info  # contrast inversion, roughly

  monkeypatch.setattr(generators, 'load_generator', fake_load)
  out = str(tmp_path / 'eval')
  summary = paired.evaluate(str(tmp_path), data_dir, out, progress=False)
  assert loaded == [('mr2ct', None), ('ct2mr', 4)]  # ct2mr pinned to the same step
  printed = capsys.readouterr().out
  assert '| MAE (0-255, paper) |' in printed and f'Evaluation written to {out}' in printed
  assert summary['num_volumes'] == test_config.data.phantom.num_test
  assert summary['step'] == 4 and summary['data_dir'] == data_dir
  rows = reports.read_rows_json(os.path.join(out, 'per_volume.json'))
  (row,) = rows
  assert 0 < row['mae_255'] < 255 and math.isfinite(row['psnr_255'])
  assert 0 < row['mask_voxels'] <= row['valid_voxels']
  assert row['mi_mr_sct'] > 0 and row['mi_ct_smr'] > 0
  assert os.path.exists(os.path.join(out, 'figures', f"{row['patient_id']}.png"))
  # SynthRAD2023 metrics: translate's sCT of the recorded MR file vs the CT file, own grid.
  meta = dataset.load_meta(data_dir)
  files = meta['splits']['test']['patients'][row['patient_id']]['files']
  ct = volume_lib.read_volume(files['ct'])
  sct = inference_volumes.translate_volume(volume_lib.read_volume(files['mr']),
                                           lambda x: -np.asarray(x), test_config)
  mask = (volume_lib.read_volume(files['mask']).array > 0 if 'mask' in files
          else mask_lib.body_mask(ct.array, modality='ct'))
  assert row['synthrad_mae'] == pytest.approx(synthrad.mae(ct.array, sct, mask), abs=1e-6)
  assert row['synthrad_psnr'] == pytest.approx(synthrad.psnr(ct.array, sct, mask), abs=1e-6)
  if min(ct.shape) >= 7:
    assert row['synthrad_ssim'] == pytest.approx(synthrad.ssim(ct.array, sct, mask), abs=1e-6)
  else:  # the tiny phantom has fewer slices than SSIM's 7-voxel window, and says so
    assert math.isnan(row['synthrad_ssim'])
    assert 'SSIM (SynthRAD2023) NaN for 1 volume(s): fewer than 7 voxels along an axis' in (
        open(os.path.join(out, 'summary.md'), encoding='utf-8').read())
  assert summary['fingerprint'] == fingerprint.fingerprint(meta, 'test', [row['patient_id']])
  with pytest.raises(reports.ReportError, match='--overwrite'):
    paired.evaluate(str(tmp_path), data_dir, out)
  # prepare recorded each evaluation source file's hash; the fingerprint covers them.
  recorded = meta['splits']['test']['patients'][row['patient_id']]
  assert recorded['sha256'] == {r: checksums.source_sha256(p) for r, p in files.items()}
  # A source MR edited after prepare (same grid, other voxels): its SynthRAD metrics are NaN
  # rather than the scores of another volume, and the summary says why.
  original = open(files['mr'], 'rb').read()
  mr = volume_lib.read_volume(files['mr'])
  volume_lib.write_nifti(files['mr'], mr.array[::-1], mr.affine, np.float32, overwrite=True)
  try:
    paired.evaluate(str(tmp_path), data_dir, out, overwrite=True, progress=False)
  finally:
    open(files['mr'], 'wb').write(original)
  (edited,) = reports.read_rows_json(os.path.join(out, 'per_volume.json'))
  assert math.isnan(edited['synthrad_mae']) and edited['mae_255'] == row['mae_255']
  assert 'gone or changed since the data were prepared' in open(
      os.path.join(out, 'summary.md'), encoding='utf-8').read()
  # Source files gone: NaN SynthRAD metrics, and the summary says so.
  monkeypatch.setattr(native, 'recorded_files', lambda *args: {})
  paired.evaluate(str(tmp_path), data_dir, out, overwrite=True, progress=False)
  (row,) = reports.read_rows_json(os.path.join(out, 'per_volume.json'))
  assert math.isnan(row['synthrad_mae']) and math.isnan(row['synthrad_ssim'])
  assert 'source files are gone' in open(os.path.join(out, 'summary.md'), encoding='utf-8').read()
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.eval')]  # no temp dirs left
