r"""Input-pipeline throughput on one process: slices per second, written as JSON.

  python -m mr2ct_jax.bench pipeline [--size=256] [--output=bench_pipeline.json] \
      [--data_dir=PREPARED | --cache_dir=DIR] [--config=configs/gc.py] [--num_batches=300]

Without --data_dir a small phantom (config.data.phantom, at most 4 MR + 4 CT subjects) is
generated and prepared once under --cache_dir at the requested size and reused. The iterator
is the training one (`pipeline.make_unpaired_iterator`, process 0 of 1); the time covers
reading, decoding, windowing, crop/flip augmentation, batching and prefetch of both streams.
With --train_report (the JSON of `python -m mr2ct_jax.bench train` at the same size) the report
also says how many times faster than the training step consumes them the pipeline delivers
slices (`times_train_step`).
"""

import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mr2ct_jax.bench import common
from mr2ct_jax.cli import commands
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import writer

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
  flags.DEFINE_string('train_report', None, 'JSON of `bench train` at this size: compare the '
                      'pipeline with the step time measured there.', flag_values=fv)
  return fv


def bench_config(config: ml_collections.ConfigDict, size: int,
                 batch_size: int | None = None) -> ml_collections.ConfigDict:
  """`config` at slice size `size` (same field of view) with a small phantom."""
  config = ml_collections.ConfigDict(config.to_dict())
  prepared = writer.preparation_settings(config)  # what the bench phantom would be made with
  fov_mm = prepared['spacing_mm'] * prepared['image_size']
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
  return {'cpu': common.cpu_name(), 'cpu_flags': common.cpu_flags(),
          'cpu_count': os.cpu_count(),
          'affinity_cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
          else None,
          'platform': platform.platform(), 'python': platform.python_version(),
          'numpy': np.__version__, 'grain': getattr(grain, '__version__', 'unknown'),
          'tensorflow_datasets': tfds.__version__}


def run(config: ml_collections.ConfigDict, data_dir: str, num_batches: int,
        warmup: int) -> dict[str, Any]:
  """Times `num_batches` batches of the training iterator; returns the measurements."""
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
  return {
      'slices_per_s': 2 * pairs_per_s,
      'slice_pairs_per_s': pairs_per_s,
      'batches_per_s': num_batches / seconds,
      'seconds': seconds,
      'num_batches': num_batches,
      'warmup_batches': warmup,
      'local_batch': local,
      'shard_sizes': iterator.info['shard_sizes'],
  }


def compare_with_train_step(result: dict[str, Any], train_report: str) -> dict[str, Any]:
  """How many training steps' worth of slice pairs the pipeline delivers per step time.

  Args:
    result: `run`'s measurements.
    train_report: a `bench train` JSON (its `step_time_s` and batch size are used).
  """
  try:
    with open(train_report, encoding='utf-8') as f:
      train = json.load(f)
    pairs_per_step, step_s = int(train.get('batch_size', 1)), float(train['step_time_s'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{train_report}: not a `bench train` report ({e})') from e
  if train.get('size') != result.get('size'):
    raise ValueError(f'{train_report}: a step at {train.get("size")}^2, the pipeline ran at '
                     f'{result.get("size")}^2; compare the same size')
  return {'train_report': os.path.abspath(train_report), 'train_step_time_s': step_s,
          'times_train_step': result['slice_pairs_per_s'] * step_s / pairs_per_step}


def _run(fv: flags.FlagValues) -> None:
  config = bench_config(fv.config, fv.size, fv.batch_size)
  if fv.data_dir:
    data_dir = fv.data_dir
  else:
    data_dir = writer.prepare_phantom(os.path.join(fv.cache_dir, f'size{fv.size}'), config)
  result = {'size': fv.size, **run(config, data_dir, fv.num_batches, fv.warmup)}
  if fv.train_report:
    result.update(compare_with_train_step(result, fv.train_report))
  common.write_report(fv.output, {
      'benchmark': 'pipeline', 'data_dir': os.path.abspath(data_dir), 'size': fv.size,
      **result, 'config': config.to_dict(), 'machine': machine_info()})
  versus = (f', {result["times_train_step"]:.0f}x what a training step consumes'
            if 'times_train_step' in result else '')
  print(f'pipeline at {fv.size}^2: {result["slices_per_s"]:.1f} slices/s '
        f'({result["slice_pairs_per_s"]:.1f} MR/CT pairs/s{versus}) -> {fv.output}')


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; writes the JSON report and prints a one-line summary."""
  fv = _define_flags()
  # ValueError covers VolumeError and DatasetError: one line, no traceback.
  return commands.run(fv, argv, 'mr2ct_jax.bench pipeline', lambda: _run(fv),
                      errors=(ValueError,))


if __name__ == '__main__':
  sys.exit(main())
