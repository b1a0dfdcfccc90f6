"""Two real JAX processes on the CPU backend with a local coordinator, as on two hosts.

Each process has 2 CPU devices (4 in the global mesh), reads its own shard of the slice
streams, and both trainers must end with the same parameters in every process, one set of
checkpoints and one TensorBoard log (written by process 0 only).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from mr2ct_jax.data import writer

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs in each process: the trainer through the same start-up as the commands, then a report of
# what this process saw (its shard, its first batch, its final parameters).
_PROCESS = '''
import hashlib, json, sys
sys.path.insert(0, {repo!r})
from absl import flags
from mr2ct_jax.cli import distributed
distributed.define_flags()
flags.FLAGS(['x', '--jax_distributed', '--coordinator_address=' + sys.argv[1],
             '--num_processes=2', '--process_id=' + sys.argv[2]])
distributed.initialize()
import jax
import numpy as np
from configs import gc
trainer, workdir, data_dir, report = sys.argv[3:7]
config = gc.get_config('test')
config.eval.after_training = False
config.data.dir = data_dir
seen = {{}}

def digest(tree):
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf.addressable_shards[0].data if hasattr(leaf, 'addressable_shards')
                        else leaf).tobytes())
  return h.hexdigest()

if trainer == 'cyclegan':
  from mr2ct_jax.data import pipeline
  from mr2ct_jax.training import loop
  real = pipeline.make_unpaired_iterator
  def make(*args, **kwargs):
    iterator = real(*args, **kwargs)
    seen['info'] = iterator.info
    first = next(iterator)
    seen['first_batch'] = hashlib.sha256(first['mr'].tobytes() + first['ct'].tobytes()).hexdigest()
    return real(*args, **kwargs)
  loop.pipeline.make_unpaired_iterator = make
  state, _ = loop.train(config, workdir)
else:
  from mr2ct_jax.segmentation import data as seg_data, train as seg_train
  rng = np.random.default_rng(0)
  shape = (6, 32, 32)
  labeled = seg_data.LabeledSet(ct=rng.uniform(-1, 1, shape).astype(np.float16),
                                smr=rng.uniform(-1, 1, shape).astype(np.float16),
                                label=rng.integers(0, 5, shape).astype(np.uint8))
  real = seg_data.sample_batch
  def sample(*args, **kwargs):
    batch = real(*args, **kwargs)
    seen.setdefault('first_batch', hashlib.sha256(batch['image'].tobytes()).hexdigest())
    return batch
  seg_train.seg_data.sample_batch = sample
  state = seg_train.train(config, workdir, labeled)
seen.update(process=jax.process_index(), count=jax.process_count(),
            devices=jax.device_count(), params=digest(state.params))
json.dump(seen, open(report, 'w'))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two(trainer, workdir, data_dir, tmp_path):
  address = f'localhost:{_free_port()}'
  env = {**os.environ, 'PYTHONPATH': str(REPO),
         'XLA_FLAGS': os.environ.get('MR2CT_JAX_TEST_XLA_FLAGS', '') +
         ' --xla_force_host_platform_device_count=2'}
  script = _PROCESS.format(repo=str(REPO))
  reports = [tmp_path / f'report{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', script, address, str(i), trainer,
                             str(workdir), data_dir, str(reports[i])], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding='utf-8')
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err
  return [json.loads(r.read_text(encoding='utf-8')) for r in reports], outputs


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, test_config):
  return writer.prepare_phantom(str(tmp_path_factory.mktemp('phantom')), test_config)


def test_cyclegan_on_two_processes(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  (a, b), outputs = _run_two('cyclegan', workdir, data_dir, tmp_path)
  assert (a['process'], b['process'], a['count'], a['devices']) == (0, 1, 2, 4)
  # Each process read its own half of every stream (local batch 4 of the global 8) ...
  assert a['info']['local_batch'] == b['info']['local_batch'] == 4
  assert (a['info']['process_index'], b['info']['process_index']) == (0, 1)
  assert a['first_batch'] != b['first_batch']
  # ... and they end with the same parameters, one set of checkpoints and one log.
  assert a['params'] == b['params']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len(list((workdir / 'tb').glob('events.out.tfevents.*'))) == 1
  assert 'step 4/4' in outputs[0][0] and 'step 4/4' not in outputs[1][0]  # progress: process 0


def test_segmentation_on_two_processes(data_dir, tmp_path):
  workdir = tmp_path / 'seg'
  (a, b), _ = _run_two('segmentation', workdir, data_dir, tmp_path)
  assert a['first_batch'] != b['first_batch']  # its own slices: the sampler is per process
  assert a['params'] == b['params']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len(list((workdir / 'tb').glob('events.out.tfevents.*'))) == 1


def test_distributed_flags_need_jax_distributed(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'mr2ct_jax.main', '--config=configs/gc.py:test',
                           f'--workdir={tmp_path / "w"}', '--num_processes=2'], cwd=REPO,
                          capture_output=True, encoding='utf-8', timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip() == 'error: --num_processes needs --jax_distributed'

