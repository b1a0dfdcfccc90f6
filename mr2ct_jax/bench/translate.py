r"""Generator inference throughput: slices per second of whole-volume translation, as JSON.

  python -m mr2ct_jax.bench translate --size=128|256 [--batch=8] [--dtype=float32|bfloat16] \
      [--slices=32] [--repeats=5] [--warmup=1] [--output=bench_translate.json] \
      [--config=configs/gc.py] [--nopytorch]

A volume of --slices random model-range slices goes through the real inference path: the
jitted generator apply of `inference.generators.make_apply_fn` in fixed batches of --batch
(`inference.slices.translate_slices`, the loop translate and evaluate run), compiled once
before timing. The report gives the median over --repeats translations of the whole volume
(after --warmup untimed ones) as slices/s. The generator is the config's (`model.*`, in the
compute dtype --dtype) with random weights: the time does not depend on their values.

When PyTorch is installed the reference generator (`torch_reference --mode=inference`, the
junyanz ResnetGenerator) is timed the same way in a child process, after ours: same volume
size, batch and repeats, under `torch.autocast(dtype=torch.bfloat16)` when --dtype=bfloat16;
the report gives our speedup over it.
"""

import statistics
import sys
import time
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr2ct_jax.bench import common
from mr2ct_jax.cli import commands
from mr2ct_jax.inference import generators
from mr2ct_jax.inference import slices as slices_lib
from mr2ct_jax.models import layers
from mr2ct_jax.models import options


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  common.define_config_flag(fv)
  flags.DEFINE_integer('size', 256, 'Slice size (square).', flag_values=fv)
  flags.DEFINE_integer('batch', 8, 'Slices per generator call.', flag_values=fv)
  flags.DEFINE_enum('dtype', None, list(options.DTYPE_NAMES), 'Compute dtype (model.dtype; '
                    'default: the config\'s).', flag_values=fv)
  flags.DEFINE_integer('slices', 32, 'Slices in the translated volume.', flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Timed translations of the volume.', flag_values=fv)
  flags.DEFINE_integer('warmup', 1, 'Untimed translations after compilation.', flag_values=fv)
  flags.DEFINE_string('output', 'bench_translate.json', 'JSON report path.', flag_values=fv)
  flags.DEFINE_bool('pytorch', True, 'Also time the PyTorch reference generator on this '
                    'machine (mr2ct_jax.bench.torch_reference --mode=inference) when PyTorch '
                    'is installed.', flag_values=fv)
  return fv


def bench_config(config: ml_collections.ConfigDict, size: int,
                 dtype: str | None = None) -> ml_collections.ConfigDict:
  """`config` at slice size `size` in compute dtype `dtype` (None: the config's)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.image_size = int(size)
  if dtype is not None:
    config.model.dtype = dtype
  return config


def _timed(fn: Any, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def run(config: ml_collections.ConfigDict, batch: int, num_slices: int, repeats: int,
        warmup: int) -> dict[str, Any]:
  """Compiles and times the translation of one volume; returns the measurements."""
  size = config.data.image_size
  generator = generators.build_generator(config, 'bench translate')
  # Classic threefry: XLA:CPU compiles a partitionable-threefry init for minutes (as in
  # `bench train`); any weights time the same.
  with jax.threefry_partitionable(False):
    params = jax.jit(generator.init)(jax.random.key(config.seed),
                                     jnp.zeros((1, 16, 16, 1), jnp.float32))['params']
  apply_fn = generators.make_apply_fn(params, generator)
  rng = np.random.default_rng(0)
  volume = np.clip(rng.standard_normal((num_slices, size, size)) * 0.5, -1, 1).astype(np.float32)
  translate = lambda: slices_lib.translate_slices(apply_fn, volume, batch)

  start = time.perf_counter()
  out = translate()  # compiles the one batch shape, then runs the volume once
  first_s = time.perf_counter() - start
  if out.shape != volume.shape or not np.all(np.isfinite(out)):
    raise SystemExit(f'error: the generator returned {out.shape} (finite: '
                     f'{bool(np.all(np.isfinite(out)))}) for a volume {volume.shape}')
  _timed(translate, warmup)
  times = _timed(translate, repeats)
  median = statistics.median(times)
  return {
      'generator_params': int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
      'slices_per_s': num_slices / median,
      'run_time_s': median,
      'run_times_s': times,
      'first_run_s': first_s,  # compilation + one translation
      'slices': num_slices,
      'repeats': repeats,
      'warmup_runs': warmup,
      'dtype': config.model.dtype,
      'conv_impl': config.model.conv_impl,
      'conv_impl_resolved': layers.check_conv_impl(config.model.conv_impl,
                                                   dtype=config.model.dtype),
  }


def time_pytorch_reference(config: ml_collections.ConfigDict, batch: int, num_slices: int,
                           repeats: int, warmup: int) -> dict[str, Any]:
  """Runs `torch_reference --mode=inference` in a child process; its JSON, or why not."""
  model = config.model
  return common.run_pytorch_child([
      '--mode=inference', f'--size={config.data.image_size}', f'--batch={batch}',
      f'--slices={num_slices}', f'--repeats={repeats}', f'--warmup={warmup}',
      f'--ngf={model.ngf}', f'--res_blocks={model.num_res_blocks}',
      f'--device={"cuda" if jax.default_backend() == "gpu" else "cpu"}',
      f'--bf16={common.pytorch_bf16(model.dtype)}'])


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; writes the JSON report and prints a one-line summary."""
  fv = _define_flags()
  commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench translate')
  if fv.size < 16 or fv.size % 4:
    raise SystemExit(f'error: --size={fv.size}: must be >= 16 and divisible by 4')
  if fv.batch < 1 or fv.slices < 1 or fv.repeats < 1 or fv.warmup < 0:
    raise SystemExit('error: --batch, --slices and --repeats must be >= 1 and --warmup >= 0')
  config = bench_config(fv.config, fv.size, fv.dtype)
  batch = min(fv.batch, fv.slices)  # what translate_slices runs
  result = run(config, batch, fv.slices, fv.repeats, fv.warmup)
  pytorch = (time_pytorch_reference(config, batch, fv.slices, fv.repeats, fv.warmup)
             if fv.pytorch else {'skipped': '--nopytorch'})
  theirs = pytorch.get('slices_per_s')
  if theirs and pytorch['generator_params'] != result['generator_params']:
    raise SystemExit(f'error: the PyTorch reference generator has {pytorch["generator_params"]} '
                     f'parameters, ours {result["generator_params"]}')
  report = {'benchmark': 'translate', 'size': fv.size, 'batch_size': batch, **result,
            'pytorch_precision': ('autocast_bfloat16' if common.pytorch_bf16(
                config.model.dtype) else 'float32'),
            'pytorch_measured': pytorch,
            'speedup_vs_pytorch_measured': result['slices_per_s'] / theirs if theirs else None,
            'config': config.to_dict(), 'machine': common.jax_machine_info()}
  common.write_report(fv.output, report)
  here = (f'PyTorch here {theirs:.2f} slices/s, {result["slices_per_s"] / theirs:.2f}x'
          if theirs else f'PyTorch here: {pytorch["skipped"]}')
  print(f'translate at {fv.size}^2, batch {batch} ({config.model.dtype}, '
        f'{jax.default_backend()}): {result["slices_per_s"]:.2f} slices/s ({here}) '
        f'-> {fv.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
