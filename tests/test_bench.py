"""`python -m mr2ct_jax.bench train` at a tiny size: the JSON report and bad arguments."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mr2ct_jax.cli import hugepages

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(*args):
  return subprocess.run([sys.executable, '-m', 'mr2ct_jax.bench', 'train', *args], cwd=REPO,
                        capture_output=True, encoding='utf-8', timeout=600,
                        env={**os.environ, 'PYTHONPATH': str(REPO)})


def test_bench_train_writes_its_report(tmp_path):
  output = tmp_path / 'bench_train.json'
  # ngf=32: res blocks of 128 channels, wide enough for the CPU's Winograd path to save FLOPs.
  result = _bench('--size=32', '--gc', '--config=configs/gc.py:test', '--config.model.ngf=32',
                  '--steps=2', '--warmup=1', '--nopytorch', f'--output={output}')
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['benchmark'] == 'train' and report['size'] == 32 and report['gc'] is True
  assert report['batch_size'] == 1 and report['config']['loss']['gc_weight'] == 0.3
  assert len(report['step_times_s']) == report['steps_timed'] == 2
  assert report['step_time_s'] > 0 and report['flops_per_step'] > 0
  assert report['matmul_ceiling_gflops'] > 0
  assert abs(report['ratio'] - report['achieved_gflops'] / report['matmul_ceiling_gflops']) < 1e-9
  assert report['achieved_gflops'] == pytest.approx(
      report['flops_per_step'] / report['step_time_s'] / 1e9)
  # Winograd executes fewer FLOPs than the same step with direct convs: both are reported.
  assert report['conv_impl'] == 'auto' and report['conv_impl_resolved'] == 'winograd'
  assert report['flops_source'] == 'compiled'
  assert report['direct_conv_flops_source'] == "lowered with conv_impl='matmul'"
  assert 0 < report['flops_per_step'] < report['direct_conv_flops_per_step']
  assert report['effective_gflops'] == pytest.approx(
      report['direct_conv_flops_per_step'] / report['step_time_s'] / 1e9)
  assert report['effective_ratio'] == pytest.approx(
      report['effective_gflops'] / report['matmul_ceiling_gflops'])
  assert 'effective GFLOP/s (direct-conv FLOPs)' in result.stdout
  # The test config's networks with ngf=32 (1 res block) and ndf=4.
  assert report['generator_params'] == 482_945 and report['discriminator_params'] == 11389
  assert report['pytorch_measured'] == {'skipped': '--nopytorch'}
  assert report['speedup_vs_pytorch_measured'] is None
  assert 'train step at 32^2 (gc=True, cpu)' in result.stdout
  # The bench CLI re-executes itself with glibc's huge-page tunable where that is available.
  huge = hugepages.wanted() or 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '')
  assert ('glibc.malloc.hugetlb=1' in report['machine']['glibc_tunables']) is huge


def test_bench_train_rejects_bad_size(tmp_path):
  result = _bench('--size=30', f'--output={tmp_path / "x.json"}')
  assert result.returncode != 0
  assert 'error: --size=30: must be >= 16 and divisible by 4' in result.stderr
  assert not (tmp_path / 'x.json').exists()


def test_pytorch_reference_is_skipped_with_a_reason_without_torch(monkeypatch, test_config):
  from mr2ct_jax.bench import train as bench_train
  monkeypatch.setattr(bench_train.importlib.util, 'find_spec', lambda name: None)
  config = bench_train.bench_config(test_config, 32, gc=True)
  assert bench_train.time_pytorch_reference(config, 1, 0) == {
      'skipped': 'PyTorch is not installed (pip install torch to compare)'}


def test_pytorch_reference_step_has_our_parameter_counts():
  """Where PyTorch is installed: the reference networks are ours, and the step runs."""
  torch = pytest.importorskip('torch')
  from mr2ct_jax.bench import torch_reference
  generator, discriminator = torch_reference.build_networks(torch, 64, 64, 9, 3)
  count = lambda module: sum(p.numel() for p in module.parameters())
  assert (count(generator()), count(discriminator())) == (11_365_633, 2_762_689)
  result = torch_reference.run(32, True, 4, 4, 1, 3, steps=1, warmup=0)
  assert (result['generator_params'], result['discriminator_params']) == (7953, 11389)
  assert result['step_time_s'] > 0 and len(result['step_times_s']) == 1



class _Analysed:
  """Stands in for a jax Lowered/Compiled stage with a fixed cost analysis."""

  def __init__(self, analysis):
    self._analysis = analysis

  def cost_analysis(self):
    return self._analysis


def test_flops_come_from_the_compiled_program_on_cpu_and_the_lowered_one_elsewhere(monkeypatch):
  from mr2ct_jax.bench import train as bench_train
  lowered, compiled = _Analysed({'flops': 5.0}), _Analysed([{'flops': 3.0}])
  assert bench_train._flops(lowered, compiled) == (3.0, 'compiled')
  monkeypatch.setattr(bench_train.jax, 'default_backend', lambda: 'gpu')
  assert bench_train._flops(lowered, compiled) == (5.0, 'lowered')
  # GPUs with jax 0.11 have no lowered cost analysis: no FLOPs rather than cuDNN-blind ones.
  assert bench_train._flops(_Analysed(None), compiled) == (None, 'unavailable')


def test_pytorch_reference_on_cuda_without_a_gpu_fails_clearly():
  torch = pytest.importorskip('torch')
  if torch.cuda.is_available():
    pytest.skip('this machine has a CUDA device')
  from mr2ct_jax.bench import torch_reference
  with pytest.raises(SystemExit, match='--device=cuda but this PyTorch sees no CUDA device'):
    torch_reference.run(32, False, 4, 4, 1, 3, steps=1, warmup=0, device='cuda')
