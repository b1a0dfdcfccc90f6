"""`evaluate --compare` compares only results scored on the same data (fingerprints)."""

import json
import os

import pytest

from mr2ct_jax import evaluate
from mr2ct_jax.evaluation import compare
from mr2ct_jax.evaluation import fingerprint

META = {'spacing_mm': 1.25, 'image_size': 32, 'mr_percentile': 99.0, 'n4': False,
        'plane': 'axial',
        'splits': {'test': {'patients': {
            'p0': {'num_slices': 4, 'files': {'mr': '/d/p0_mr.nii.gz', 'ct': '/d/p0_ct.nii.gz'}},
            'p1': {'num_slices': 5, 'files': {'mr': '/d/p1_mr.nii.gz', 'ct': '/d/p1_ct.nii.gz'}},
            'p2': {'num_slices': 6, 'files': {'mr': '/d/p2_mr.nii', 'ct': '/d/p2_ct.nii'}}}}}}


def _result(folder, mae, fp='same', patients=('p0', 'p1', 'p2')):
  """A hand-written evaluation output: per_volume.json and summary.json (with fingerprint)."""
  os.makedirs(folder)
  rows = [{'patient_id': p, 'mae_255': v, 'psnr_255': 20.0 + v} for p, v in zip(patients, mae)]
  with open(os.path.join(folder, 'per_volume.json'), 'w', encoding='utf-8') as f:
    json.dump(rows, f)
  summary = {'source': folder}
  if fp == 'same':
    summary['fingerprint'] = fingerprint.fingerprint(META, 'test', patients)
  elif fp is not None:
    summary['fingerprint'] = fp
  with open(os.path.join(folder, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f)
  return folder


def test_compare_accepts_same_data(tmp_path):
  a = _result(str(tmp_path / 'a'), [10.0, 11.0, 12.5])
  b = _result(str(tmp_path / 'b'), [9.0, 10.5, 11.0])
  out = compare.compare(a, b, str(tmp_path / 'cmp'))
  assert out['same_data'] is True and out['patients'] == ['p0', 'p1', 'p2']
  by_metric = {r['metric']: r for r in out['results']}
  assert by_metric['mae_255']['diff'] == pytest.approx(-1.0)
  assert 'Warning' not in out['markdown']


def test_compare_refuses_different_data(tmp_path):
  a = _result(str(tmp_path / 'a'), [10.0, 11.0, 12.5])
  other_meta = json.loads(json.dumps(META))
  other_meta['plane'] = 'coronal'
  cases = {
      'plane': (fingerprint.fingerprint(other_meta, 'test', ['p0', 'p1', 'p2']),
                'different data \\(preprocessing'),
      'split': (fingerprint.fingerprint(META, 'val', ['p0', 'p1', 'p2']),
                "different data \\(split 'test' vs 'val'\\)"),
      'files': (dict(fingerprint.fingerprint(META, 'test', ['p0', 'p1', 'p2']), sha256='0' * 64),
                'different data \\(the input files differ\\)'),
      'old': (None, 'b_old: records no data fingerprint \\(made by an older version\\)'),
  }
  for name, (fp, message) in cases.items():
    b = _result(str(tmp_path / f'b_{name}'), [9.0, 10.5, 11.0], fp=fp)
    with pytest.raises(fingerprint.FingerprintError, match=message):
      compare.compare(a, b, str(tmp_path / f'cmp_{name}'))
    assert not os.path.exists(tmp_path / f'cmp_{name}')
    # The command: one line, and the flag that compares them anyway.
    argv = ['mr2ct_jax.evaluate', '--compare', a, b, f'--output={tmp_path / f"cmp_{name}"}']
    with pytest.raises(SystemExit, match='--allow_different_data') as exc:
      evaluate.main(argv)
    assert str(exc.value).startswith('error: ') and '\n' not in str(exc.value)
    assert evaluate.main(argv + ['--allow_different_data']) == 0
    written = json.load(open(tmp_path / f'cmp_{name}' / 'compare.json', encoding='utf-8'))
    assert written['same_data'] is (None if fp is None else False)
    assert 'Warning: compared with --allow_different_data' in written['markdown']
  # Different patients of the same dataset: refused, naming them.
  b = _result(str(tmp_path / 'b_pat'), [9.0, 10.5], patients=('p0', 'p1'))
  with pytest.raises(fingerprint.FingerprintError, match="only in the first: \\['p2'\\]"):
    compare.compare(a, b, str(tmp_path / 'cmp_pat'))
