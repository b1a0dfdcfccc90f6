"""`python -m mr2ct_jax.bench train|translate` at a tiny size: the JSON reports, bad arguments,
the PyTorch reference's modes, the CPU's ISA flags, the model FLOPs and the MFU."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import gc
from mr2ct_jax import parallel
from mr2ct_jax.bench import common
from mr2ct_jax.bench import model_flops
from mr2ct_jax.bench import train as bench_train
from mr2ct_jax.cli import hugepages
from mr2ct_jax.training import state as train_state
from mr2ct_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(*args, command='train'):
  return subprocess.run([sys.executable, '-m', 'mr2ct_jax.bench', command, *args], cwd=REPO,
                        capture_output=True, encoding='utf-8', timeout=600,
                        env={**os.environ, 'PYTHONPATH': str(REPO)})


def test_bench_train_writes_its_report(tmp_path):
  output = tmp_path / 'bench_train.json'
  # ngf=32: res blocks of 128 channels, wide enough for the CPU's Winograd path to save FLOPs.
  # Batch 2 with the pairs fused: Winograd's custom gradients vmapped over the two networks.
  result = _bench('--size=32', '--gc', '--config=configs/gc.py:test', '--config.model.ngf=32',
                  '--config.model.conv_impl=auto', '--batch=2', '--config.train.fuse_pairs=True',
                  '--steps=2', '--warmup=1', '--nopytorch', f'--output={output}')
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['benchmark'] == 'train' and report['size'] == 32 and report['gc'] is True
  assert report['batch_size'] == 2 and report['config']['loss']['gc_weight'] == 0.3
  assert report['config']['train']['batch_size'] == 2 and report['fuse_pairs'] is True
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
  assert 'train step at 32^2, batch 2 (gc=True, float32, fuse_pairs=True, cpu)' in result.stdout
  # The architecture's FLOPs; no MFU on a CPU (its ratio is to the matmul ceiling).
  assert report['model_flops_per_step'] == model_flops.train_step_flops(
      ml_collections.ConfigDict(report['config']))
  assert report['model_tflops'] == pytest.approx(
      report['model_flops_per_step'] / report['step_time_s'] / 1e12)
  assert report['peak_tflops'] is None and report['mfu'] is None
  assert report['dtype'] == 'float32' and report['pytorch_precision'] == 'float32'
  assert report['machine']['cpu_flags'] == common.cpu_flags()
  assert set(report['machine']['cpu_flags']) == {'avx2', 'avx512', 'avx512_bf16', 'amx'}
  # The bench CLI re-executes itself with glibc's huge-page tunable where that is available.
  huge = hugepages.wanted() or 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '')
  assert ('glibc.malloc.hugetlb=1' in report['machine']['glibc_tunables']) is huge


def test_model_flops_match_xla_on_the_direct_conv_step(test_config):
  """The architecture's count equals XLA's cost analysis of the step lowered with direct
  (im2col matmul) convs up to the elementwise work the count leaves out (the norms, the
  losses, Adam): within 5% at 64 px with the identity term, batch 2."""
  config = bench_train.bench_config(test_config, 64, True, batch=2)
  config.model.ngf, config.model.num_res_blocks, config.model.ndf = 16, 2, 8
  config.model.conv_impl = 'matmul'
  config.loss.identity_weight = 0.5
  gan = train_state.build(config)
  state = jax.eval_shape(lambda: train_state.create(gan, config, jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32) for k in ('mr', 'ct')}
  mesh = parallel.make_mesh(jax.devices()[:1])
  counted = bench_train._counted_flops(
      step_lib.make_train_step(gan, config, mesh).lower(state, batch))
  modelled = model_flops.train_step_flops(config)
  assert 0.95 * counted < modelled < counted
  config.loss.identity_weight = 0.0  # two generator passes fewer, 3 forwards each
  g = model_flops.generator_forward_flops(64, 16, 2)
  assert model_flops.train_step_flops(config) == modelled - 2 * 2 * 3 * g


def test_peaks_and_mfu():
  assert model_flops.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
  assert model_flops.peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0
  assert model_flops.peak_tflops('NVIDIA H200', 'float32') == 494.7
  assert model_flops.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert model_flops.peak_tflops('Some New Card', 'bfloat16') is None
  # The paper's networks at 256^2, batch 1: 12 generator and 16 discriminator forwards.
  assert model_flops.generator_forward_flops(256, 64, 9) == 97_458_847_744
  config = bench_train.bench_config(gc.get_config(), 256, True)
  result = bench_train.utilisation(config, 0.02, peak_tflops=100.0)
  assert result['model_tflops'] == pytest.approx(result['model_flops_per_step'] / 0.02 / 1e12)
  assert result['mfu'] == pytest.approx(result['model_tflops'] / 100.0)
  assert bench_train.utilisation(config, 0.02)['mfu'] is None  # a CPU: no peak


def test_summary_tabulates_train_reports_and_names_a_bad_one(tmp_path, capsys):
  from mr2ct_jax.bench import summary  # pylint: disable=g-import-not-at-top
  base = {'benchmark': 'train', 'size': 256, 'step_time_s': 0.024, 'dtype': 'bfloat16',
          'device_kind': 'NVIDIA H100 80GB HBM3', 'model_tflops': 25.3, 'mfu': 0.0256}
  reports = [{**base, 'batch_size': 1, 'fuse_pairs': False,
              'pytorch_measured': {'step_time_s': 0.043}, 'speedup_vs_pytorch_measured': 1.79},
             {**base, 'batch_size': 16, 'fuse_pairs': True, 'step_time_s': 0.2, 'mfu': None,
              'pytorch_measured': {'skipped': '--nopytorch'},
              'speedup_vs_pytorch_measured': None}]
  paths = []
  for k, report in enumerate(reports):
    paths.append(tmp_path / f'r{k}.json')
    paths[-1].write_text(json.dumps(report), encoding='utf-8')
  assert summary.main(['summary', f'--output={tmp_path / "t.md"}', *map(str, paths)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == summary.HEADER and len(lines) == 4
  assert lines[2] == ('| NVIDIA H100 80GB HBM3 | 256 | 1 | bfloat16 | False | 24.00 | 43.00 | '
                      '1.79 | 25.30 | 2.6% |')
  assert lines[3] == ('| NVIDIA H100 80GB HBM3 | 256 | 16 | bfloat16 | True | 200.00 | - | - | '
                      '25.30 | - |')
  assert (tmp_path / 't.md').read_text(encoding='utf-8').splitlines() == lines
  cpu = {**reports[0], 'device_kind': 'cpu', 'machine': {'cpu': 'AMD EPYC'}, 'mfu': None}
  assert summary.row(cpu).startswith('| AMD EPYC | 256 | 1 |')  # a CPU by its model name
  (tmp_path / 'list.json').write_text('[1, 2]', encoding='utf-8')
  with pytest.raises(SystemExit, match=r"list.json: not a `bench train` report \(benchmark='list'"):
    summary.main(['summary', str(tmp_path / 'list.json')])
  (tmp_path / 'layers.json').write_text('{"benchmark": "layers"}', encoding='utf-8')
  with pytest.raises(SystemExit, match=r"layers.json: not a `bench train` report"):
    summary.main(['summary', str(tmp_path / 'layers.json')])
  with pytest.raises(SystemExit, match='give one or more'):
    summary.main(['summary'])


def test_bench_train_rejects_bad_size(tmp_path):
  result = _bench('--size=30', f'--output={tmp_path / "x.json"}')
  assert result.returncode != 0
  assert 'error: --size=30: must be >= 16 and divisible by 4' in result.stderr
  assert not (tmp_path / 'x.json').exists()


def test_pytorch_reference_is_skipped_with_a_reason_without_torch(monkeypatch, test_config):
  from mr2ct_jax.bench import train as bench_train
  monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: None)
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


def test_cpu_flags_come_from_the_first_flags_line(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nmodel name\t: Some CPU\n'
                     'flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n'
                     'flags\t\t: amx_bf16\n', encoding='utf-8')
  # amx_tile is not AMX-BF16; the second line (another core) is not read.
  assert common.cpu_flags(str(cpuinfo)) == {'avx2': True, 'avx512': True, 'avx512_bf16': True,
                                            'amx': False}
  cpuinfo.write_text('flags\t: fpu sse2\n', encoding='utf-8')
  assert common.cpu_flags(str(cpuinfo)) == dict.fromkeys(common.CPU_FLAGS, False)
  assert common.cpu_flags(str(tmp_path / 'missing')) == dict.fromkeys(common.CPU_FLAGS, None)


def test_bench_translate_writes_its_report(tmp_path):
  """bfloat16 through the inference path; with PyTorch (when installed) timed the same way."""
  output = tmp_path / 'bench_translate.json'
  pytorch = importlib.util.find_spec('torch') is not None
  result = _bench('--size=32', '--batch=4', '--slices=6', '--repeats=2', '--warmup=0',
                  '--dtype=bfloat16', '--config=configs/gc.py:test',
                  '--config.model.conv_impl=auto', f'--output={output}',
                  '--pytorch' if pytorch else '--nopytorch', command='translate')
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['benchmark'] == 'translate' and report['size'] == 32
  assert report['batch_size'] == 4 and report['slices'] == 6 and report['repeats'] == 2
  assert report['dtype'] == report['config']['model']['dtype'] == 'bfloat16'
  assert report['conv_impl'] == 'auto' and report['conv_impl_resolved'] == 'winograd'
  assert len(report['run_times_s']) == 2
  assert report['slices_per_s'] == pytest.approx(6 / report['run_time_s'])
  assert report['generator_params'] == 7953  # the test config's generator (ngf=4, 1 block)
  assert report['pytorch_precision'] == 'autocast_bfloat16'
  assert report['machine']['cpu_flags'] == common.cpu_flags()
  assert 'translate at 32^2, batch 4 (bfloat16, cpu)' in result.stdout
  theirs = report['pytorch_measured']
  if pytorch:
    assert theirs['precision'] == 'autocast_bfloat16' and theirs['generator_params'] == 7953
    assert (theirs['slices'], theirs['batch'], len(theirs['run_times_s'])) == (6, 4, 2)
    assert report['speedup_vs_pytorch_measured'] == pytest.approx(
        report['slices_per_s'] / theirs['slices_per_s'])
  else:
    assert theirs == {'skipped': '--nopytorch'} and report['speedup_vs_pytorch_measured'] is None


def test_bench_translate_rejects_bad_arguments(tmp_path):
  result = _bench('--size=32', '--batch=0', f'--output={tmp_path / "x.json"}',
                  command='translate')
  assert result.returncode != 0
  assert 'error: --batch, --slices and --repeats must be >= 1' in result.stderr
  assert not (tmp_path / 'x.json').exists()


def test_bench_train_passes_bf16_to_the_pytorch_child(monkeypatch, test_config):
  from mr2ct_jax.bench import train as bench_train
  calls = []

  class Done:
    returncode, stdout, stderr = 1, '', 'stopped here'

  monkeypatch.setattr(common.importlib.util, 'find_spec', lambda name: object())
  monkeypatch.setattr(common.subprocess, 'run', lambda command, **_: calls.append(command)
                      or Done())
  for dtype, flag in (('bfloat16', '--bf16=True'), ('float32', '--bf16=False')):
    config = bench_train.bench_config(test_config, 32, gc=False, dtype=dtype)
    assert config.model.dtype == dtype
    assert bench_train.time_pytorch_reference(config, 1, 0) == {
        'skipped': 'the PyTorch reference failed: stopped here'}
    assert flag in calls[-1]


def test_pytorch_reference_parses_bf16_and_inference_mode():
  """The child's flags: --bf16 runs under autocast, --mode=inference times G alone."""
  pytest.importorskip('torch')
  from mr2ct_jax.bench import torch_reference
  fv = torch_reference._define_flags()
  fv(['torch_reference', '--bf16', '--mode=inference', '--batch=3'])
  assert fv.bf16 is True and fv.mode == 'inference' and fv.batch == 3
  fv = torch_reference._define_flags()
  fv(['torch_reference'])
  assert fv.bf16 is False and fv.mode == 'train'
  result = torch_reference.run_inference(32, batch=4, slices=6, repeats=1, warmup=0, ngf=4,
                                         res_blocks=1, bf16=True)
  assert result['precision'] == 'autocast_bfloat16' and result['generator_params'] == 7953
  assert result['activation_dtype'] == 'torch.bfloat16'
  assert result['slices'] == 6 and result['batch'] == 4 and result['slices_per_s'] > 0
  step = torch_reference.run(32, False, 4, 4, 1, 3, steps=1, warmup=0, bf16=True, batch=2)
  assert step['precision'] == 'autocast_bfloat16' and step['step_time_s'] > 0
  assert step['batch'] == 2
  assert step['activation_dtype'] == 'torch.bfloat16'
  assert torch_reference.run(32, False, 4, 4, 1, 3, steps=1, warmup=0)[
      'activation_dtype'] == 'torch.float32'


def test_bench_layers_writes_every_layer_in_both_dtypes(tmp_path):
  output = tmp_path / 'bench_layers.json'
  result = _bench('--size=32', '--repeats=1', '--config=configs/gc.py:test',
                  f'--output={output}', command='layers')
  assert result.returncode == 0, result.stderr
  report = json.loads(output.read_text(encoding='utf-8'))
  assert report['benchmark'] == 'layers' and report['size'] == 32
  rows = {r['layer']: r for r in report['layers']}
  # The test config: ngf = ndf = 4, 1 residual block, 3 discriminator layers.
  assert list(rows) == ['g_stem_7x7', 'g_down_0_3x3s2', 'g_down_1_3x3s2', 'g_res_3x3', 'g_up_0',
                        'g_up_1', 'g_head_7x7', 'd_conv_0_4x4s2', 'd_conv_1_4x4s2',
                        'd_conv_2_4x4s2', 'd_conv_3_4x4s1', 'd_logits_4x4']
  assert rows['g_res_3x3']['input_shape'] == [1, 8, 8, 16]
  assert rows['g_res_3x3']['count_per_step'] == 4 * 2 * 1
  assert rows['g_up_1']['input_shape'] == [1, 16, 16, 8]
  assert rows['d_conv_3_4x4s1']['input_shape'] == [1, 4, 4, 16]
  assert rows['d_logits_4x4']['input_shape'] == [1, 3, 3, 32]
  assert rows['d_conv_0_4x4s2']['count_per_step'] == 6
  for row in rows.values():
    assert set(row['seconds']) == {'float32', 'bfloat16'}
    assert row['bf16_speedup'] == pytest.approx(row['seconds']['float32'] /
                                                row['seconds']['bfloat16'])
  assert report['weighted_seconds']['float32'] == pytest.approx(
      sum(r['count_per_step'] * r['seconds']['float32'] for r in rows.values()))
  assert report['machine']['cpu_flags'] == common.cpu_flags()
  assert 'layers at 32^2: count-weighted float32' in result.stdout
  bad = _bench('--size=36', f'--output={tmp_path / "x.json"}', command='layers')
  assert bad.returncode != 0 and 'error: --size=36: must be >= 16 and divisible by 8' in bad.stderr
  assert not (tmp_path / 'x.json').exists()
