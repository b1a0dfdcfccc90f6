"""Launch scripts: valid bash, and the commands they assemble (PYTHON=echo dry runs)."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / 'launch').glob('*.sh'))


def _run(script, env, *args):
  return subprocess.run(['bash', str(REPO / 'launch' / script), *args], cwd=REPO,
                        capture_output=True, encoding='utf-8', timeout=60,
                        env={**os.environ, **env})


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
  subprocess.run(['bash', '-n', str(script)], check=True)


def test_multi_gpu_single_and_multi_host():
  single = _run('multi_gpu.sh', {'PYTHON': 'echo', 'WORKDIR': 'runs/x'},
                '--config.train.batch_size=8')
  assert single.returncode == 0, single.stderr
  assert single.stdout.split() == ['-m', 'mr2ct_jax.main', '--config=configs/gc.py',
                                   '--workdir=runs/x', '--config.train.batch_size=8']
  multi = _run('multi_gpu.sh', {'PYTHON': 'echo', 'WORKDIR': 'runs/x',
                                'COORDINATOR': '10.0.0.1:1234', 'NUM_PROCESSES': '2',
                                'PROCESS_ID': '1'})
  assert multi.returncode == 0, multi.stderr
  assert '--jax_distributed' in multi.stdout.split()


def test_multi_gpu_requires_workdir():
  result = _run('multi_gpu.sh', {'PYTHON': 'echo', 'WORKDIR': ''})
  assert result.returncode != 0 and 'WORKDIR' in result.stderr


def test_ablation_is_a_call_of_the_study_driver():
  result = _run('ablation.sh', {'PYTHON': 'echo', 'RUNS': 'runs/abl', 'DATA': '/data/hip',
                                'PRESET': 'paper'}, '--cells=gc_large')
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['-m', 'mr2ct_jax.experiments.paper', '--preset=paper',
                                   '--data=/data/hip', '--workdir=runs/abl', '--cells=gc_large']


def test_tpu_pod_requires_its_settings():
  result = _run('tpu_pod.sh', {'TPU_NAME': ''})
  assert result.returncode != 0 and 'TPU_NAME' in result.stderr


def test_multi_gpu_dry_run_passes_the_process_flags():
  result = _run('multi_gpu.sh', {'WORKDIR': 'runs/x', 'COORDINATOR': '10.0.0.1:1234',
                                 'NUM_PROCESSES': '2', 'PROCESS_ID': '1'},
                '--dry-run', '--config.train.batch_size=16')
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      'python', '-m', 'mr2ct_jax.main', '--config=configs/gc.py', '--workdir=runs/x',
      '--jax_distributed', '--coordinator_address=10.0.0.1:1234', '--num_processes=2',
      '--process_id=1', '--config.train.batch_size=16']


def test_slurm_dry_run_starts_one_process_per_task():
  result = _run('slurm.sh', {'WORKDIR': '/shared/runs/gc'}, '--dry-run',
                '--config.train.batch_size=16')
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      'srun', '--kill-on-bad-exit=1', 'python', '-m', 'mr2ct_jax.main', '--jax_distributed',
      '--config=configs/gc.py', '--workdir=/shared/runs/gc', '--config.train.batch_size=16']
  assert '#SBATCH --requeue' in (REPO / 'launch' / 'slurm.sh').read_text(encoding='utf-8')
  missing = _run('slurm.sh', {'WORKDIR': ''}, '--dry-run')
  assert missing.returncode != 0 and 'WORKDIR' in missing.stderr


def test_tpu_pod_dry_run_pins_jax_and_launches_on_every_worker():
  result = _run('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'WORKDIR': '/mnt/runs/gc',
                               'DATA': '/mnt/data', 'REPO_URL': 'https://example.invalid/r'},
                '--dry-run', '--config.train.batch_size=32')
  assert result.returncode == 0, result.stderr
  install, launch = result.stdout.strip().split('\n', 1)[0], result.stdout
  version = next(line.split('==')[1] for line in
                 (REPO / 'constraints.txt').read_text(encoding='utf-8').splitlines()
                 if line.startswith('jax=='))
  assert install.startswith('gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all')
  assert f'jax[tpu]=={version}' in result.stdout
  assert ('mr2ct_jax.main --jax_distributed' in launch and '--workdir=/mnt/runs/gc' in launch
          and '--config.train.batch_size=32' in launch)
  assert result.stdout.count('gcloud compute tpus tpu-vm ssh') == 2


def test_tpu_pod_installs_gcsfs_only_for_gs_urls():
  env = {'TPU_NAME': 'pod', 'ZONE': 'z', 'REPO_URL': 'https://example.invalid/r'}
  mounted = _run('tpu_pod.sh', {**env, 'WORKDIR': '/mnt/runs/gc', 'DATA': '/mnt/data'},
                 '--dry-run')
  bucket = _run('tpu_pod.sh', {**env, 'WORKDIR': 'gs://b/runs/gc', 'DATA': '/mnt/data'},
                '--dry-run')
  assert mounted.returncode == 0 and bucket.returncode == 0, mounted.stderr + bucket.stderr
  # The dry run prints the remote command through printf %q: its quotes come escaped.
  assert r"-e \'.\' " in mounted.stdout and '[gcs]' not in mounted.stdout
  assert r"-e \'.[gcs]\' " in bucket.stdout and '--workdir=gs://b/runs/gc' in bucket.stdout


def test_gpu_bench_sweeps_batch_dtype_and_fused_pairs_then_tabulates(tmp_path):
  result = _run('gpu_bench.sh', {'OUT': str(tmp_path / 'b')}, '--dry-run', '--nopytorch')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  trains = [line.split() for line in lines if 'mr2ct_jax.bench train' in line]
  assert len(trains) == 3 * 2 * 2  # batch 1, 4, 16 x float32, bfloat16 x fused or not
  settings = {(next(a for a in t if a.startswith('--batch=')),
               next(a for a in t if a.startswith('--dtype=')),
               next(a for a in t if a.startswith('--config.train.fuse_pairs='))) for t in trains}
  assert len(settings) == 12 and ('--batch=16', '--dtype=bfloat16',
                                  '--config.train.fuse_pairs=True') in settings
  assert all('--size=256' in t and '--gc' in t and '--nopytorch' in t for t in trains)
  summary = lines[-1].split()
  assert summary[:4] == ['python', '-m', 'mr2ct_jax.bench', 'summary']
  assert len(summary) == 5 + 12 and not (tmp_path / 'b').exists()  # a dry run writes nothing
  few = _run('gpu_bench.sh', {'BATCHES': '4', 'DTYPES': 'bfloat16', 'FUSE': 'True',
                              'SIZE': '128'}, '--dry-run')
  assert [line for line in few.stdout.splitlines() if 'bench train' in line] == [
      'python -m mr2ct_jax.bench train --size=128 --gc --batch=4 --dtype=bfloat16 '
      '--config.train.fuse_pairs=True --steps=50 '
      '--output=bench_gpu/train_128_b4_bfloat16_fuseTrue.json ']
