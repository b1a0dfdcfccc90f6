"""`python -m mr2ct_jax.bench train` at a tiny size: the JSON report and bad arguments."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(*args):
  return subprocess.run([sys.executable, '-m', 'mr2ct_jax.bench', 'train', *args], cwd=REPO,
                        capture_output=True, encoding='utf-8', timeout=600,
                        env={**os.environ, 'PYTHONPATH': str(REPO)})


def test_bench_train_writes_its_report(tmp_path):
  output = tmp_path / 'bench_train.json'
  result = _bench('--size=32', '--gc', '--config=configs/gc.py:test', '--steps=2',
                  '--warmup=1', f'--output={output}')
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['benchmark'] == 'train' and report['size'] == 32 and report['gc'] is True
  assert report['batch_size'] == 1 and report['config']['loss']['gc_weight'] == 0.3
  assert len(report['step_times_s']) == report['steps_timed'] == 2
  assert report['step_time_s'] > 0 and report['flops_per_step'] > 0
  assert report['matmul_ceiling_gflops'] > 0
  assert abs(report['ratio'] - report['achieved_gflops'] / report['matmul_ceiling_gflops']) < 1e-9
  assert report['reference_pytorch_step_s'] is None  # no PyTorch reference at 32 px
  assert 'train step at 32^2 (gc=True)' in result.stdout


def test_bench_train_rejects_bad_size(tmp_path):
  result = _bench('--size=30', f'--output={tmp_path / "x.json"}')
  assert result.returncode != 0
  assert 'error: --size=30: must be >= 16 and divisible by 4' in result.stderr
  assert not (tmp_path / 'x.json').exists()
