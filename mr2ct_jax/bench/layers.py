r"""Forward + backward time of each conv layer of a training step, float32 against bfloat16.

  python -m mr2ct_jax.bench layers --size=256 [--repeats=5] [--output=bench_layers.json] \
      [--config=configs/gc.py]

Each conv layer type of the generator and the discriminator (the config's ngf, ndf,
num_res_blocks and num_disc_layers, at the shapes of a batch-1 step at --size) is jitted on
its own as the value and gradient, with respect to its parameters and its input, of a sum of
squares of its output, in both compute dtypes, on the config's conv path; the report gives
the best of --repeats runs after one untimed one. `count` is how many times a CycleGAN step
runs the layer forward and backward (four generator passes: G_ct(MR), G_mr(CT) and the two
cycles; six discriminator passes: real, fake and the generators' adversarial term for each
of D_ct and D_mr), so `count * seconds` weighs the layers as the step does (the whole step
also fuses norms and activations and is timed by `bench train`). The bf16 / fp32 ratio per
layer shows where bfloat16 gains on this CPU and where it does not.
"""

import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr2ct_jax.bench import common
from mr2ct_jax.cli import commands
from mr2ct_jax.models import layers

DTYPES = ('float32', 'bfloat16')
GENERATOR_PASSES = 4
DISCRIMINATOR_PASSES = 6


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  common.define_config_flag(fv)
  flags.DEFINE_integer('size', 256, 'Image size (square), divisible by 8.', flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Timed runs per layer and dtype (the best is kept).',
                       flag_values=fv)
  flags.DEFINE_string('output', 'bench_layers.json', 'JSON report path.', flag_values=fv)
  return fv


def layer_specs(model: ml_collections.ConfigDict, size: int
                ) -> list[tuple[str, Callable[[Any], Any], tuple[int, ...], int]]:
  """(name, module of a compute dtype, input shape, runs per step) of every conv layer type."""
  ngf, ndf, impl = int(model.ngf), int(model.ndf), model.conv_impl
  specs = [('g_stem_7x7', lambda d: layers.ReflectConv(ngf, 7, 3, dtype=d, conv_impl=impl),
            (1, size, size, 1), GENERATOR_PASSES)]
  for i in range(2):
    side, cin = size // 2 ** i, ngf * 2 ** i
    specs.append((f'g_down_{i}_3x3s2', lambda d, c=2 * cin: layers.Conv(
        c, 3, 2, 1, dtype=d, conv_impl=impl), (1, side, side, cin), GENERATOR_PASSES))
  specs.append(('g_res_3x3', lambda d: layers.ReflectConv(4 * ngf, 3, 1, dtype=d,
                                                          conv_impl=impl),
                (1, size // 4, size // 4, 4 * ngf),
                GENERATOR_PASSES * 2 * int(model.num_res_blocks)))
  for i in range(2):
    side, cin = size // 4 * 2 ** i, 4 * ngf // 2 ** i
    specs.append((f'g_up_{i}', lambda d, c=cin // 2: layers.UpConv2x(c, dtype=d, conv_impl=impl),
                  (1, side, side, cin), GENERATOR_PASSES))
  specs.append(('g_head_7x7', lambda d: layers.ReflectConv(1, 7, 3, dtype=d, conv_impl=impl),
                (1, size, size, ngf), GENERATOR_PASSES))
  num_layers, side, cin = int(model.num_disc_layers), size, 1
  for i in range(num_layers + 2):  # conv_0 ... conv_<num_layers>, then the logits
    cout = 1 if i == num_layers + 1 else ndf * min(2 ** i, 8)
    stride = 2 if i < num_layers else 1
    specs.append((f'd_conv_{i}_4x4s{stride}' if cout > 1 else 'd_logits_4x4', lambda d, c=cout,
                  s=stride: layers.Conv(c, 4, s, 1, dtype=d, conv_impl=impl),
                  (1, side, side, cin), DISCRIMINATOR_PASSES))
    side, cin = (side // 2 if stride == 2 else side - 1), cout
  return specs


def time_layer(make: Callable[[Any], Any], shape: tuple[int, ...], dtype: str,
               repeats: int) -> float:
  """Best seconds of one jitted value-and-gradient of the layer in `dtype`."""
  module = make(layers.compute_dtype(dtype))
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  variables = module.init(jax.random.key(0), x)
  loss = lambda v, x: jnp.sum(jnp.square(module.apply(v, x).astype(jnp.float32)))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(variables, x))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(variables, x))
    best = min(best, time.perf_counter() - start)
  return best


def run(config: ml_collections.ConfigDict, size: int, repeats: int) -> list[dict[str, Any]]:
  """One row per layer type: its shape, count, seconds per dtype and the bf16 gain."""
  rows = []
  for name, make, shape, count in layer_specs(config.model, size):
    seconds = {dtype: time_layer(make, shape, dtype, repeats) for dtype in DTYPES}
    rows.append({'layer': name, 'input_shape': list(shape), 'count_per_step': count,
                 'seconds': seconds,
                 'bf16_speedup': seconds['float32'] / seconds['bfloat16']})
    print(f'{name:18s} {str(shape):22s} x{count:<3d} float32 {seconds["float32"] * 1e3:8.2f} '
          f'ms  bfloat16 {seconds["bfloat16"] * 1e3:8.2f} ms  gain {rows[-1]["bf16_speedup"]:.2f}',
          flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; writes the JSON report."""
  fv = _define_flags()
  commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench layers')
  if fv.size < 16 or fv.size % 8:
    raise SystemExit(f'error: --size={fv.size}: must be >= 16 and divisible by 8')
  if fv.repeats < 1:
    raise SystemExit(f'error: --repeats={fv.repeats}: must be >= 1')
  rows = run(fv.config, fv.size, fv.repeats)
  weighted = {dtype: sum(r['count_per_step'] * r['seconds'][dtype] for r in rows)
              for dtype in DTYPES}
  report = {'benchmark': 'layers', 'size': fv.size, 'repeats': fv.repeats,
            'conv_impl': fv.config.model.conv_impl,
            'conv_impl_resolved': {d: layers.check_conv_impl(fv.config.model.conv_impl, dtype=d)
                                   for d in DTYPES},
            'layers': rows, 'weighted_seconds': weighted,
            'config': fv.config.to_dict(), 'machine': common.jax_machine_info()}
  common.write_report(fv.output, report)
  print(f'layers at {fv.size}^2: count-weighted float32 {weighted["float32"]:.2f} s, bfloat16 '
        f'{weighted["bfloat16"]:.2f} s ({weighted["float32"] / weighted["bfloat16"]:.2f}x) '
        f'-> {fv.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
