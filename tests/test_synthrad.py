"""SynthRAD2023 metrics as the challenge computes them, and `evaluate --sct_dir`."""

import json
import math
import os

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util.arraycrop import crop

from mr2ct_jax import evaluate
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.evaluation import reports
from mr2ct_jax.evaluation import sct_folder
from mr2ct_jax.evaluation import synthrad

SHAPE = (20, 24, 16)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])


def _ct_sct(seed=0):
  """A CT (body ellipsoid in air, values beyond the clip range) and an sCT with errors."""
  rng = np.random.default_rng(seed)
  grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing='ij')
  body = sum(g ** 2 for g in grid) < 0.8
  ct = np.where(body, rng.normal(40, 400, SHAPE), -1000 + rng.normal(0, 20, SHAPE))
  ct[body & (grid[0] > 0.4)] = 3400.0   # metal: above the 3000 HU clip
  ct[~body & (grid[1] > 0.8)] = -2048.0  # padding: below -1024
  sct = ct + rng.normal(0, 60, SHAPE)
  return ct.astype(np.float32), sct.astype(np.float32), body


def _challenge(gt, pred, mask):
  """SynthRAD2023/metrics image_metrics.py (ImageMetrics), step by step, on float32 arrays."""
  gt, pred = gt.astype(np.float32), pred.astype(np.float32)
  mask = np.where(mask.astype(np.float32) > 0, 1., 0.)
  mae = float(np.sum(np.abs(gt * mask - pred * mask)) / mask.sum())
  lo, hi = -1024., 3000.
  g = np.where(gt < lo, lo, gt)
  g = np.where(g > hi, hi, g)
  p = np.where(pred < lo, lo, pred)
  p = np.where(p > hi, hi, p)
  psnr = float(peak_signal_noise_ratio(g[mask == 1], p[mask == 1], data_range=hi - lo))
  g, p = np.clip(gt, lo, hi), np.clip(pred, lo, hi)
  g, p = np.where(mask == 0, lo, g) - lo, np.where(mask == 0, lo, p) - lo
  _, ssim_map = structural_similarity(g, p, data_range=hi - lo, full=True)
  ssim = float(crop(ssim_map, 3)[crop(mask, 3).astype(bool)].mean(dtype=np.float64))
  return {'synthrad_mae': mae, 'synthrad_psnr': psnr, 'synthrad_ssim': ssim}


def test_metrics_equal_the_challenge_computation():
  ct, sct, body = _ct_sct()
  for mask in (body, body & (np.arange(SHAPE[2]) < 9)):
    ours = synthrad.synthrad_metrics(ct, sct, mask)
    ref = _challenge(ct, sct, mask)
    for key in synthrad.METRIC_KEYS:
      assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
  # Independent formulas: MAE unclipped; PSNR = 10 log10(4024^2 / MSE of the clipped values).
  m = body
  res = synthrad.synthrad_metrics(ct, sct, m)
  assert res['synthrad_mae'] == pytest.approx(np.abs(ct - sct)[m].astype(np.float64).mean(),
                                              rel=1e-6)
  mse = ((np.clip(ct, -1024, 3000) - np.clip(sct, -1024, 3000))[m].astype(np.float64) ** 2).mean()
  assert res['synthrad_psnr'] == pytest.approx(10 * math.log10(4024 ** 2 / mse), rel=1e-5)
  # The +1024 shift is applied: SSIM of unshifted data (negative values) is different.
  lo = -1024.0
  unshifted = structural_similarity(np.where(m, np.clip(ct, lo, 3000), lo),
                                    np.where(m, np.clip(sct, lo, 3000), lo), data_range=4024.,
                                    full=True)[1]
  assert abs(crop(unshifted, 3)[crop(m, 3)].mean() - res['synthrad_ssim']) > 1e-3
  # Identical volumes: MAE 0, PSNR inf, SSIM 1.
  same = synthrad.synthrad_metrics(ct, ct, m)
  assert same['synthrad_mae'] == 0.0 and same['synthrad_psnr'] == math.inf
  assert same['synthrad_ssim'] == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match='at least 7 voxels'):
    synthrad.ssim(ct[:6], sct[:6], m[:6])


def test_patient_id_rule():
  assert [sct_folder.patient_id(n) for n in (
      'a/1PA001_sct.nii.gz', '1PA001_ct.nii', '1PA001_MASK.nii.gz', '1PA001.nii.gz',
      'x_ct_sct.nii', '_ct.nii')] == ['1PA001'] * 4 + ['x_ct', '_ct']


def _write(folder, name, array, affine=AFFINE):
  return volume_lib.write_nifti(os.path.join(folder, name), array, affine, dtype=np.float32)


def _folders(tmp_path):
  """sct/ ct/ mask/ folders of two patients, with the three naming styles."""
  dirs = {k: str(tmp_path / k) for k in ('sct', 'ct', 'mask')}
  data = {}
  for i, pid in enumerate(('p1', 'p2')):
    ct, sct, body = _ct_sct(seed=i)
    _write(dirs['ct'], f'{pid}_ct.nii.gz' if i == 0 else f'{pid}.nii', ct)
    _write(dirs['sct'], f'{pid}_sct.nii.gz', sct)
    mask = body & (np.arange(SHAPE[0])[:, None, None] > 5)
    _write(dirs['mask'], f'{pid}_mask.nii.gz', mask.astype(np.float32))
    data[pid] = (ct, sct, mask)
  return dirs, data


def _main(*args):
  return evaluate.main(['mr2ct_jax.evaluate', *args])


def test_sct_folder_end_to_end(tmp_path, capsys):
  dirs, data = _folders(tmp_path)
  out = str(tmp_path / 'out')
  assert _main(f'--sct_dir={dirs["sct"]}', f'--ct_dir={dirs["ct"]}', f'--output={out}',
               '--noprogress') == 0
  assert 'SSIM (SynthRAD2023)' in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ['per_volume.csv', 'per_volume.json', 'summary.json',
                                     'summary.md']
  rows = reports.read_rows_json(os.path.join(out, 'per_volume.json'))
  assert [r['patient_id'] for r in rows] == ['p1', 'p2']
  for row in rows:
    ct, sct, _ = data[row['patient_id']]
    body = mask_lib.body_mask(ct, modality='ct')  # as prepare computes it, on the CT's grid
    assert row['mask_file'] == 'ct_body_mask' and row['mask_voxels'] == int(body.sum())
    ref = _challenge(ct, sct, body)
    for key in synthrad.METRIC_KEYS:
      assert row[key] == pytest.approx(ref[key], abs=1e-6)
  summary = json.load(open(os.path.join(out, 'summary.json'), encoding='utf-8'))
  assert summary['num_volumes'] == 2 and summary['fingerprint']['patients'] == ['p1', 'p2']
  assert summary['metrics']['synthrad_mae']['mean'] == pytest.approx(
      np.mean([r['synthrad_mae'] for r in rows]))
  with pytest.raises(SystemExit, match='--overwrite'):
    _main(f'--sct_dir={dirs["sct"]}', f'--ct_dir={dirs["ct"]}', f'--output={out}')

  # With --mask_dir: the given masks; another fingerprint (so --compare refuses the pair).
  out_m = str(tmp_path / 'out_m')
  summary_m = sct_folder.evaluate_folder(dirs['sct'], dirs['ct'], dirs['mask'], out_m,
                                         progress=False)
  rows = reports.read_rows_json(os.path.join(out_m, 'per_volume.json'))
  for row in rows:
    ct, sct, mask = data[row['patient_id']]
    assert row['mask_file'].endswith(f"{row['patient_id']}_mask.nii.gz")
    assert row['mask_voxels'] == int(mask.sum())
    ref = _challenge(ct, sct, mask)
    for key in synthrad.METRIC_KEYS:
      assert row[key] == pytest.approx(ref[key], abs=1e-6)
  assert summary_m['fingerprint']['sha256'] != summary['fingerprint']['sha256']
  with pytest.raises(SystemExit, match='different data'):
    _main('--compare', out, out_m, f'--output={tmp_path / "cmp"}')
  # The same data scored again (a different sCT folder): same fingerprint, compared.
  sct2 = str(tmp_path / 'sct2')
  for pid, (_, sct, _) in data.items():
    _write(sct2, f'{pid}.nii.gz', sct + 5.0)
  out2 = str(tmp_path / 'out2')
  summary2 = sct_folder.evaluate_folder(sct2, dirs['ct'], None, out2, progress=False)
  assert summary2['fingerprint'] == summary['fingerprint']
  assert _main('--compare', out, out2, f'--output={tmp_path / "cmp"}') == 0


def test_an_sct_stored_in_another_voxel_order_is_scored_on_its_cts_grid(tmp_path):
  # The CT's grid written LPS with x and z swapped: the same voxels at the same world points.
  dirs, data = _folders(tmp_path)
  ct, sct, _ = data['p1']
  swapped = AFFINE @ np.array([[0, 0, -1, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1],
                               [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)
  other = tmp_path / 'other'
  _write(str(other), 'p1.nii.gz', np.ascontiguousarray(sct[::-1, ::-1].transpose(2, 1, 0)),
         swapped)
  _write(str(other), 'p2.nii.gz', data['p2'][1])
  summary = sct_folder.evaluate_folder(str(other), dirs['ct'], None, str(tmp_path / 'out'),
                                       progress=False)
  row = reports.read_rows_json(str(tmp_path / 'out' / 'per_volume.json'))[0]
  assert summary['num_volumes'] == 2 and row['patient_id'] == 'p1'
  ref = _challenge(ct, sct, mask_lib.body_mask(ct, modality='ct'))
  for key in synthrad.METRIC_KEYS:
    assert row[key] == pytest.approx(ref[key], abs=1e-6)


def test_sct_folder_bad_inputs(tmp_path):
  dirs, data = _folders(tmp_path)
  ct, sct, mask = data['p1']
  empty = tmp_path / 'empty'
  empty.mkdir()
  extra_sct = tmp_path / 'extra_sct'
  for pid in ('p1', 'p2', 'p3'):
    _write(str(extra_sct), f'{pid}_sct.nii.gz', sct)
  few_sct = tmp_path / 'few_sct'
  _write(str(few_sct), 'p1.nii.gz', sct)

  def variant(name, **arrays):
    """A copy of the sct/mask folders where p1's files are replaced."""
    folder = tmp_path / name
    for pid in ('p1', 'p2'):
      array, affine = arrays.get(pid, (data[pid][1], AFFINE))
      _write(str(folder), f'{pid}.nii.gz', array, affine)
    return str(folder)

  shifted = AFFINE.copy()
  shifted[0, 3] = 4.0
  nan = sct.copy()
  nan[3, 4, 5] = np.nan
  cases = [
      (dict(sct=str(empty)), 'empty: no NIfTI files'),
      (dict(sct=str(extra_sct)), "p3_sct.nii.gz: no CT for patient 'p3'.*without CT: \\['p3'\\]"),
      (dict(sct=str(few_sct)), "p2.nii: no sCT for patient 'p2'.*without sCT: \\['p2'\\]"),
      (dict(sct=variant('shape', p1=(sct[:, :, :12], AFFINE))), 'p1.nii.gz: sCT has shape'),
      (dict(sct=variant('affine', p1=(sct, shifted))),
       'p1.nii.gz: sCT is not on the grid of its CT .*even after reordering the axes'),
      (dict(sct=variant('nan', p1=(nan, AFFINE))), 'p1.nii.gz: 1 of .* voxels are NaN'),
      # An sCT saved as (HU + 1024) / 4096 would otherwise score a plausible-looking MAE.
      (dict(sct=variant('unitless', p1=((sct + 1024) / 4096, AFFINE))),
       'unitless/p1.nii.gz: does not look like Hounsfield units inside the body'),
      (dict(sct=variant('an_mr', p1=(np.where(ct > -500, 300 + np.abs(sct) / 4, 0), AFFINE))),
       'an_mr/p1.nii.gz: does not look like Hounsfield units inside the body'),
      (dict(mask=variant('mask_shape', p1=(mask[:10].astype(np.float32), AFFINE))),
       'mask_shape/p1.nii.gz: mask has shape'),
      (dict(mask=variant('mask_empty', p1=(np.zeros(SHAPE, np.float32), AFFINE))),
       'mask_empty/p1.nii.gz: empty mask'),
      (dict(ct=variant('air', p1=(np.full(SHAPE, -1000, np.float32), AFFINE))),
       'air/p1.nii.gz: empty body mask'),
      (dict(ct=str(tmp_path / 'missing')), 'missing: no such folder'),
      (dict(sct=str(tmp_path / 'sct' / 'p1_sct.nii.gz')), 'p1_sct.nii.gz: a file, not a folder'),
  ]
  for i, (given, message) in enumerate(cases):
    folders = {'sct': dirs['sct'], 'ct': dirs['ct'], **given}
    args = [f'--sct_dir={folders["sct"]}', f'--ct_dir={folders["ct"]}',
            f'--output={tmp_path / f"out{i}"}']
    if 'mask' in folders:
      args.append(f'--mask_dir={folders["mask"]}')
    with pytest.raises(SystemExit, match=message) as exc:
      _main(*args)
    assert str(exc.value).startswith('error: ') and '\n' not in str(exc.value), message
    assert not os.path.exists(tmp_path / f'out{i}')
  with pytest.raises(SystemExit, match='--output is required'):
    _main(f'--sct_dir={dirs["sct"]}', f'--ct_dir={dirs["ct"]}')
  # An sCT multiplied by the body mask (background 0, no air) is a legitimate sCT.
  masked = variant('masked', p1=(np.where(ct > -500, sct, 0), AFFINE))
  assert _main(f'--sct_dir={masked}', f'--ct_dir={dirs["ct"]}', f'--output={tmp_path / "m"}',
               '--noprogress') == 0
