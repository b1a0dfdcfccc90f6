r"""Time of one CycleGAN (+GC) training step against a matmul ceiling, written as JSON.

  python -m mr2ct_jax.bench train --size 128|256 [--gc] [--output=bench_train.json] \
      [--config=configs/gc.py] [--steps=5] [--warmup=1] [--dtype=float32|bfloat16] \
      [--batch=1] [--config.train.fuse_pairs=True]

The step is the real one (`training.step.make_train_step` of `configs/gc.py`'s default, i.e.
ResNet-9 generators, 70x70 PatchGANs, pools, both Adam updates) at batch --batch (default 1)
on one device,
with `loss.gc_weight` = the config's lambda_GC (`--gc`) or 0 (`--nogc`, the default), in
the compute dtype `--dtype` (`model.dtype`; default: the config's).
It reports the median step time after compilation, the step's FLOPs from XLA's cost
analysis, the achieved GFLOP/s, and their ratio to a float32 matmul timed in the same process
(2048^3 on a CPU, 8192^3 on a GPU: the best the machine does on dense arithmetic right now).
With Winograd convs (`conv_impl` 'winograd', the CPU default) the step executes fewer FLOPs
than its direct convolutions would, so the report also gives the effective GFLOP/s and ratio:
the direct-conv FLOPs (the same step lowered with 'matmul') over the same time. On an
accelerator whose peak `model_flops.PEAK_TFLOPS` knows (or --peak_tflops) it reports the
model FLOPs utilisation (`mfu`: the architecture's FLOPs, `model_flops.train_step_flops`, per
second over the peak in the compute dtype).
When PyTorch is installed it then times the reference step on this machine too
(`torch_reference`: same sizes and batch, in a child process, on the GPU when JAX uses one) and
reports the speedup, in the same precision: with `--dtype=bfloat16` the reference runs under
`torch.autocast(dtype=torch.bfloat16)` (`--bf16`). On a GPU, time more steps (`--steps=50`).
"""

import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr2ct_jax import parallel
from mr2ct_jax.bench import common
from mr2ct_jax.bench import model_flops
from mr2ct_jax.cli import commands
from mr2ct_jax.models import layers
from mr2ct_jax.models import options
from mr2ct_jax.training import state as state_lib
from mr2ct_jax.training import step as step_lib


def _matmul_size() -> int:
  """The ceiling matmul's side: 2048 fills a CPU; a GPU/TPU needs 8192 to leave launch time."""
  return 2048 if jax.default_backend() == 'cpu' else 8192


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  common.define_config_flag(fv)
  flags.DEFINE_integer('size', 256, 'Image size (square).', flag_values=fv)
  flags.DEFINE_bool('gc', False, 'With the gradient-consistency term (loss.gc_weight).',
                    flag_values=fv)
  flags.DEFINE_string('output', 'bench_train.json', 'JSON report path.', flag_values=fv)
  flags.DEFINE_integer('steps', 5, 'Steps timed (after warmup).', flag_values=fv)
  flags.DEFINE_integer('warmup', 1, 'Steps run after compilation before timing.',
                       flag_values=fv)
  flags.DEFINE_enum('dtype', None, list(options.DTYPE_NAMES), 'Compute dtype (model.dtype; '
                    'default: the config\'s).', flag_values=fv)
  flags.DEFINE_integer('batch', 1, 'Images per domain per step (train.batch_size).',
                       flag_values=fv)
  flags.DEFINE_float('peak_tflops', None, 'The device\'s dense peak TFLOP/s in the compute '
                     'dtype, for the MFU (default: from model_flops.PEAK_TFLOPS by device kind; '
                     'none on CPUs, which report the ratio to the matmul ceiling).',
                     flag_values=fv)
  flags.DEFINE_bool('pytorch', True, 'Also time the PyTorch reference step on this machine '
                    '(mr2ct_jax.bench.torch_reference, same sizes) when PyTorch is installed.',
                    flag_values=fv)
  return fv


def bench_config(config: ml_collections.ConfigDict, size: int, gc: bool,
                 dtype: str | None = None, batch: int = 1) -> ml_collections.ConfigDict:
  """`config` at image size `size` and batch `batch`, with or without the GC term, in `dtype`
  (None: the config's `model.dtype`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.image_size = int(size)
  if dtype is not None:
    config.model.dtype = dtype
  config.train.batch_size = int(batch)
  if gc:
    if config.loss.gc_weight <= 0:
      config.loss.gc_weight = 0.3  # the paper's lambda_GC
  else:
    config.loss.gc_weight = 0.0
  return config


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def matmul_ceiling(repeats: int = 5) -> dict[str, float]:
  """GFLOP/s of a float32 n x n matmul (n = `_matmul_size()`; median and best of `repeats`).

  At JAX's default precision, as the train step runs (on GPUs that may mean TF32).
  """
  n = _matmul_size()
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x).lower(a).compile()
  jax.block_until_ready(matmul(a))
  median, times = _median_seconds(lambda: matmul(a), repeats)
  flop = 2 * n ** 3
  return {'median_gflops': flop / median / 1e9, 'best_gflops': flop / min(times) / 1e9,
          'n': n}


def _flops(lowered: Any, compiled: Any) -> tuple[float | None, str]:
  """FLOPs of one step from XLA's cost analysis, and which analysis gave them.

  On the CPU, the compiled program's (every op is XLA's own there). Elsewhere the compiled
  program hands convs and matmuls to library calls (cuDNN, cuBLAS) that the analysis counts
  as (almost) nothing, so only the lowered program's count is used, and None where the
  backend has no such analysis (GPUs with jax 0.11).
  """
  source = 'compiled' if jax.default_backend() == 'cpu' else 'lowered'
  flops = _counted_flops(compiled if source == 'compiled' else lowered)
  return (flops, source) if flops else (None, 'unavailable')


def _counted_flops(stage: Any) -> float | None:
  """The FLOPs in a Lowered/Compiled stage's cost analysis, or None if it counts none."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  if not analysis or not analysis.get('flops'):
    return None
  return float(analysis['flops'])


def _direct_conv_flops(config: ml_collections.ConfigDict, conv_impl: str,
                       executed: tuple[float | None, str],
                       lower: Callable[[ml_collections.ConfigDict], Any]
                       ) -> tuple[float | None, str]:
  """FLOPs of the step's work counted as direct convolutions, and where they came from.

  Winograd ('winograd') does fewer multiplications for the same convolutions, so its own
  count would make a faster step look like a slower machine. As benchmarks of Winograd and
  FFT convolutions do, the effective rate counts the direct convs' FLOPs: those of the same
  step lowered with `conv_impl='matmul'` (its lowered and compiled counts agree within
  0.3% on the CPU). Other paths do the direct arithmetic already: `executed`, their own
  (flops, source).
  """
  if conv_impl != 'winograd':
    return executed
  direct = ml_collections.ConfigDict(config.to_dict())
  direct.model.conv_impl = 'matmul'
  flops = _counted_flops(lower(direct))
  return (flops, "lowered with conv_impl='matmul'") if flops else (None, 'unavailable')


def utilisation(config: ml_collections.ConfigDict, step_time_s: float,
                peak_tflops: float | None = None) -> dict[str, Any]:
  """Model FLOPs of the step, their rate, and the MFU against the device's peak (None on a
  CPU or an unknown device unless `peak_tflops` is given)."""
  device = jax.devices()[0]
  flops = model_flops.train_step_flops(config)
  if peak_tflops is None and device.platform != 'cpu':
    peak_tflops = model_flops.peak_tflops(device.device_kind, config.model.dtype)
  tflops = flops / step_time_s / 1e12
  return {'model_flops_per_step': flops, 'model_tflops': tflops,
          'device_kind': device.device_kind, 'peak_tflops': peak_tflops,
          'mfu': tflops / peak_tflops if peak_tflops else None}


def run(config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles and times the train step of `config` on one device; returns the measurements."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  size = config.data.image_size
  # XLA:CPU compiles a jitted init with partitionable threefry (one normal per parameter)
  # for many minutes; the classic threefry stream compiles in seconds. The values are a
  # different but equally valid initialisation, and only the step's timing matters here.
  gan = state_lib.build(config)
  with jax.threefry_partitionable(False):
    state = parallel.create_replicated(lambda rng: state_lib.create(gan, config, rng), mesh,
                                       jax.random.key(config.seed))
  rng = np.random.default_rng(0)
  shape = (int(config.train.batch_size), size, size, 1)
  batch = {name: np.clip(rng.standard_normal(shape) * 0.5, -1, 1).astype(np.float32)
           for name in ('mr', 'ct')}
  batch = parallel.shard_batch(batch, mesh)
  lower = lambda c, g=None: step_lib.make_train_step(g or state_lib.build(c), c,
                                                     mesh).lower(state, batch)

  start = time.perf_counter()
  lowered = lower(config, gan)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops, flops_source = _flops(lowered, compiled)
  requested_impl = config.model.conv_impl
  conv_impl = layers.check_conv_impl(requested_impl, dtype=config.model.dtype)
  direct_flops, direct_source = _direct_conv_flops(config, conv_impl, (flops, flops_source),
                                                   lower)

  holder = {'state': state}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics

  for _ in range(warmup):
    jax.block_until_ready(one_step())
  ceiling_before = matmul_ceiling()
  median, times = _median_seconds(one_step, steps)
  ceiling_after = matmul_ceiling()
  metrics = jax.device_get(one_step())
  if not all(np.isfinite(v) for v in metrics.values()):
    raise SystemExit(f'error: non-finite metrics after the timed steps: {metrics}')
  ceiling = max(ceiling_before['median_gflops'], ceiling_after['median_gflops'])
  achieved = flops / median / 1e9 if flops else None
  effective = direct_flops / median / 1e9 if direct_flops else None
  count = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
  return {
      'generator_params': count(holder['state'].params['g_ct']),
      'discriminator_params': count(holder['state'].params['d_ct']),
      'step_time_s': median,
      'step_times_s': times,
      'steps_timed': steps,
      'warmup_steps': warmup,
      'compile_s': compile_s,
      'dtype': config.model.dtype,
      'fuse_pairs': bool(config.train.get('fuse_pairs', False)),
      'conv_impl': requested_impl,
      'conv_impl_resolved': conv_impl,
      # What the timed program computes (with Winograd, fewer FLOPs than direct convs).
      'flops_per_step': flops,
      'flops_source': flops_source,
      'achieved_gflops': achieved,
      # The same work counted as direct convolutions (= the above without Winograd).
      'direct_conv_flops_per_step': direct_flops,
      'direct_conv_flops_source': direct_source,
      'effective_gflops': effective,
      'matmul_ceiling_gflops': ceiling,
      'matmul_ceiling_runs': {'before': ceiling_before, 'after': ceiling_after},
      'ratio': achieved / ceiling if achieved else None,
      'effective_ratio': effective / ceiling if effective else None,
  }


def time_pytorch_reference(config: ml_collections.ConfigDict, steps: int,
                           warmup: int) -> dict[str, Any]:
  """Runs `torch_reference` for `config`'s sizes in a child process; its JSON, or why not.

  A child process, after the JAX timing is done, so the two never share the cores, with the
  environment the user started the benchmark in (PyTorch's default allocator behaviour). When
  JAX runs on a GPU, so does the reference (`--device=cuda`); when `config.model.dtype` is
  bfloat16, it runs under bfloat16 autocast (`--bf16`).
  """
  model = config.model
  return common.run_pytorch_child([
      f'--size={config.data.image_size}', f'--gc={bool(config.loss.gc_weight)}',
      f'--ngf={model.ngf}', f'--ndf={model.ndf}', f'--res_blocks={model.num_res_blocks}',
      f'--disc_layers={model.num_disc_layers}', f'--steps={steps}', f'--warmup={warmup}',
      f'--batch={config.train.batch_size}',
      f'--device={"cuda" if jax.default_backend() == "gpu" else "cpu"}',
      f'--bf16={common.pytorch_bf16(config.model.dtype)}'])


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; writes the JSON report and prints a one-line summary."""
  fv = _define_flags()
  commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench train')
  if fv.size < 16 or fv.size % 4:
    raise SystemExit(f'error: --size={fv.size}: must be >= 16 and divisible by 4')
  if fv.steps < 1 or fv.warmup < 0 or fv.batch < 1:
    raise SystemExit('error: --steps and --batch must be >= 1 and --warmup >= 0')
  if fv.peak_tflops is not None and fv.peak_tflops <= 0:
    raise SystemExit(f'error: --peak_tflops={fv.peak_tflops}: must be > 0')
  config = bench_config(fv.config, fv.size, fv.gc, fv.dtype, fv.batch)
  result = run(config, fv.steps, fv.warmup)
  result.update(utilisation(config, result['step_time_s'], fv.peak_tflops))
  pytorch = (time_pytorch_reference(config, fv.steps, fv.warmup) if fv.pytorch
             else {'skipped': '--nopytorch'})
  measured = pytorch.get('step_time_s')
  if measured and (pytorch['generator_params'], pytorch['discriminator_params']) != (
      result['generator_params'], result['discriminator_params']):
    raise SystemExit(f'error: the PyTorch reference networks have other parameter counts '
                     f'({pytorch["generator_params"]}, {pytorch["discriminator_params"]}) than '
                     f'ours ({result["generator_params"]}, {result["discriminator_params"]})')
  report = {'benchmark': 'train', 'size': fv.size, 'gc': fv.gc, 'batch_size': fv.batch,
            **result,
            'pytorch_precision': ('autocast_bfloat16' if common.pytorch_bf16(config.model.dtype)
                                  else 'float32'),
            'pytorch_measured': pytorch,
            'speedup_vs_pytorch_measured': measured / result['step_time_s'] if measured else None,
            'config': config.to_dict(), 'machine': common.jax_machine_info()}
  common.write_report(fv.output, report)
  here = (f'PyTorch here {measured:.4f} s, {measured / result["step_time_s"]:.2f}x'
          if measured else f'PyTorch here: {pytorch["skipped"]}')
  rate = (f'{result["achieved_gflops"]:.1f} GFLOP/s = {100 * result["ratio"]:.0f}% of '
          if result['achieved_gflops'] else 'FLOPs not counted on this backend; ')
  if result['conv_impl_resolved'] == 'winograd' and result['effective_gflops']:
    rate = (f'{result["effective_gflops"]:.1f} effective GFLOP/s (direct-conv FLOPs) = '
            f'{100 * result["effective_ratio"]:.0f}%, {rate}')
  mfu = (f', MFU {100 * result["mfu"]:.1f}% of {result["peak_tflops"]:g} TFLOP/s'
         if result['mfu'] else '')
  print(f'train step at {fv.size}^2, batch {fv.batch} (gc={fv.gc}, {config.model.dtype}, '
        f'fuse_pairs={result["fuse_pairs"]}, {jax.default_backend()}): '
        f'{result["step_time_s"]:.4f} s ({here}), {rate}the matmul ceiling '
        f'{result["matmul_ceiling_gflops"]:.1f} GFLOP/s{mfu} -> {fv.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
