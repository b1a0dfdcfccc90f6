r"""Input-pipeline throughput on one process: slices per second, written as JSON.

  python -m mr2ct_jax.bench pipeline [--size=256] [--output=bench_pipeline.json] \
      [--data_dir=PREPARED | --cache_dir=DIR] [--config=configs/gc.py] [--num_batches=300]

Without --data_dir a small phantom (config.data.phantom, at most 4 MR + 4 CT subjects) is
generated and prepared once under --cache_dir at the requested size and reused. The iterator
is the training one (`pipeline.make_unpaired_iterator`, process 0 of 1); the time covers
reading, decoding, windowing, crop/flip augmentation, batching and prefetch of both streams.
The bar: 20x the rate a training step consumes slices (the PyTorch reference step takes
7.6 s per MR/CT slice pair at 256^2 on a 2-core CPU).
"""

import os
import platform
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import flags
import ml_collections
import numpy as np

from mr2ct_jax import cli_flags
from mr2ct_jax.bench import common

REFERENCE_STEP_S = 7.6  # s per slice pair, PyTorch CycleGAN step at 256^2 (DESIGN.md)
REQUIRED_FACTOR = 20.0
_BENCH_SUBJECTS = 4


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  common.define_config_flag(fv)
  flags.DEFINE_integer('size', 256, 'Slice size (the in-plane FOV of the config is kept).',
                       flag_values=fv)
  flags.DEFINE_string('output', 'bench_pipeline.json', 'JSON report path.', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'A prepared data dir (default: the bench phantom).',
                      flag_values=fv)
  flags.DEFINE_string('cache_dir', os.path.join(tempfile.gettempdir(), 'mr2ct_bench_phantom'),
                      'Where the bench phantom is prepared (reused when complete).',
                      flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Global batch (default: config.train.batch_size).',
                       flag_values=fv)
  flags.DEFINE_integer('num_batches', 300, 'Batches timed.', flag_values=fv)
  flags.DEFINE_integer('warmup', 20, 'Batches read before timing.', flag_values=fv)
  return fv


def bench_config(config: ml_collections.ConfigDict, size: int,
                 batch_size: int | None = None) -> ml_collections.ConfigDict:
  """`config` at slice size `size` (same field of view) with a small phantom."""
  config = ml_collections.ConfigDict(config.to_dict())
  fov_mm = config.data.spacing_mm * config.data.image_size
  config.data.image_size = int(size)
  config.data.spacing_mm = fov_mm / size
  for key in ('num_train_mr', 'num_train_ct'):
    config.data.phantom[key] = min(config.data.phantom[key], _BENCH_SUBJECTS)
  config.data.phantom.num_labeled = 1
  config.data.phantom.num_test = 1
  if batch_size is not None:
    config.train.batch_size = int(batch_size)
  return config


def machine_info() -> dict[str, Any]:
  """CPU, OS and library versions of this machine."""
  import grain  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return {'cpu': common.cpu_name(), 'cpu_count': os.cpu_count(),
          'affinity_cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                           else None,
          'platform': platform.platform(), 'python': platform.python_version(),
          'numpy': np.__version__, 'grain': getattr(grain, '__version__', 'unknown'),
          'tensorflow_datasets': tfds.__version__}


def run(config: ml_collections.ConfigDict, data_dir: str, num_batches: int,
        warmup: int) -> dict[str, Any]:
  """Times `num_batches` batches of the training iterator; returns the measurements."""
  from mr2ct_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  iterator = pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                             process_count=1)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  local = iterator.info['local_batch']
  assert batch['mr'].shape == (local, config.data.image_size, config.data.image_size, 1)
  pairs_per_s = num_batches * local / seconds
  required = REQUIRED_FACTOR / REFERENCE_STEP_S
  return {
      'slices_per_s': 2 * pairs_per_s,
      'slice_pairs_per_s': pairs_per_s,
      'batches_per_s': num_batches / seconds,
      'seconds': seconds,
      'num_batches': num_batches,
      'warmup_batches': warmup,
      'local_batch': local,
      'shard_sizes': iterator.info['shard_sizes'],
      'required_slice_pairs_per_s': required,
      'requirement': f'>= {REQUIRED_FACTOR:g}x a training step ({REFERENCE_STEP_S} s per '
                     'slice pair at 256^2, PyTorch reference on a 2-core CPU)',
      'times_required': pairs_per_s / required,
      'meets_requirement': bool(pairs_per_s >= required),
  }


def _run(fv: flags.FlagValues) -> None:
  from mr2ct_jax.data import prepare  # pylint: disable=g-import-not-at-top
  config = bench_config(fv.config, fv.size, fv.batch_size)
  if fv.data_dir:
    data_dir = fv.data_dir
  else:
    data_dir = prepare.prepare_phantom(os.path.join(fv.cache_dir, f'size{fv.size}'), config)
  result = run(config, data_dir, fv.num_batches, fv.warmup)
  common.write_report(fv.output, {
      'benchmark': 'pipeline', 'data_dir': os.path.abspath(data_dir), 'size': fv.size,
      **result, 'config': config.to_dict(), 'machine': machine_info()})
  print(f'pipeline at {fv.size}^2: {result["slices_per_s"]:.1f} slices/s '
        f'({result["slice_pairs_per_s"]:.1f} MR/CT pairs/s, {result["times_required"]:.0f}x '
        f'the required {result["required_slice_pairs_per_s"]:.2f} pairs/s) -> {fv.output}')


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; writes the JSON report and prints a one-line summary."""
  fv = _define_flags()
  # ValueError covers VolumeError and DatasetError: one line, no traceback.
  return cli_flags.run(fv, argv, 'mr2ct_jax.bench pipeline', lambda: _run(fv),
                       errors=(ValueError,))


if __name__ == '__main__':
  sys.exit(main())
