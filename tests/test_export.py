"""Export to .npz, the pure-NumPy generator (equal to JAX within 1e-4, no JAX import), the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mr2ct_jax import export
from mr2ct_jax.inference import generators
from mr2ct_jax.models import cyclegan
from mr2ct_jax.inference import numpy_generator
import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope='module')
def run(tmp_path_factory, test_config):
  """(workdir, saved params) of a tiny run with random weights at step 2."""
  workdir = str(tmp_path_factory.mktemp('export') / 'run')
  params = tiny_run.make_workdir(workdir, test_config, step=2)
  return workdir, params


@pytest.fixture(scope='module')
def npz_both(run, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('npz') / 'g.npz')
  export.export(run[0], path, direction='both')
  return path


def _jax_forward(config, params, x):
  generator, _ = cyclegan.build(config.model)
  return np.asarray(jax.jit(generator.apply)({'params': params}, jnp.asarray(x)))


def test_export_contents(run, npz_both, test_config):
  workdir, params = run
  with np.load(npz_both, allow_pickle=False) as data:
    names = set(data.files)
    config = json.loads(str(data['__config__']))
    meta = json.loads(str(data['__meta__']))
    kernel = data['g_ct/stem/kernel']
  flat = {f'{net}/{name}' for net in ('g_ct', 'g_mr')
          for name in traverse_util.flatten_dict(params[net], sep='/')}
  assert names == flat | {'__config__', '__meta__'}
  np.testing.assert_array_equal(kernel, params['g_ct']['stem']['kernel'])
  assert config['model']['ngf'] == test_config.model.ngf
  assert meta['step'] == 2 and meta['networks'] == ['g_ct', 'g_mr']
  assert meta['ct_window'] == list(test_config.data.ct_window)
  assert meta['mr_window'] == list(test_config.data.mr_window)
  assert meta['mr_percentile'] == test_config.data.mr_percentile
  assert meta['spacing_mm'] == test_config.data.spacing_mm
  assert [f for f in os.listdir(os.path.dirname(npz_both)) if 'tmp' in f] == []


@pytest.mark.parametrize('direction,network', [('mr2ct', 'g_ct'), ('ct2mr', 'g_mr')])
def test_numpy_forward_equals_jax(run, npz_both, test_config, direction, network):
  _, params = run
  x = np.random.default_rng(1).uniform(-1, 1, (3, 20, 28, 1)).astype(np.float32)
  want = _jax_forward(test_config, params[network], x)
  got = numpy_generator.load(npz_both, direction)(x)
  assert got.shape == want.shape == (3, 20, 28, 1)
  assert np.max(np.abs(got - want)) < TOL
  # The direction picks its own network: the other generator gives something else.
  other = numpy_generator.load(npz_both, 'ct2mr' if direction == 'mr2ct' else 'mr2ct')(x)
  assert np.max(np.abs(other - want)) > 1e-2


def test_numpy_forward_paper_size_generator(test_config):  # pylint: disable=unused-argument
  """The default 64-filter, 9-block generator at 64x64 (11,365,633 parameters)."""
  from configs import gc  # pylint: disable=g-import-not-at-top
  config = gc.get_config()
  generator, _ = cyclegan.build(config.model)
  x = np.random.default_rng(2).uniform(-1, 1, (1, 64, 64, 1)).astype(np.float32)
  abstract = jax.eval_shape(generator.init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(3)
  # Std 0.02 as the reference's init, biases non-zero so the bias paths are compared too.
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), abstract)
  flat = traverse_util.flatten_dict(params, sep='/')
  assert sum(v.size for v in flat.values()) == 11_365_633
  want = _jax_forward(config, params, x)
  got = numpy_generator.NumpyGenerator(flat)(x)
  assert np.max(np.abs(got - want)) < TOL


def test_numpy_generator_runs_without_jax(npz_both):
  """Downstream tools load the module with JAX, jaxlib and flax unavailable."""
  script = f"""
import sys
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'ml_collections'):
  sys.modules[name] = None  # any import of them raises ImportError
sys.path.insert(0, {REPO!r})
import numpy as np
from mr2ct_jax.inference import numpy_generator
gen = numpy_generator.load({npz_both!r}, 'mr2ct')
y = gen(np.zeros((2, 16, 16, 1), np.float32))
assert y.shape == (2, 16, 16, 1) and np.all(np.abs(y) <= 1), y.shape
assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules if sys.modules[m])
print('ok')
"""
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, encoding='utf-8',
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == 'ok'


def test_numpy_generator_rejects_bad_input(npz_both, tmp_path):
  gen = numpy_generator.load(npz_both)
  with pytest.raises(ValueError, match='divisible by 4'):
    gen(np.zeros((1, 18, 16, 1), np.float32))
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip')
  with pytest.raises(numpy_generator.ExportError, match=r'not a .npz \(zip\) file'):
    numpy_generator.read_export(str(bad))
  np.savez(tmp_path / 'plain.npz', a=np.zeros(3))
  with pytest.raises(numpy_generator.ExportError, match='__config__'):
    numpy_generator.read_export(str(tmp_path / 'plain.npz'))


def test_load_generator_from_npz_matches_workdir(run, npz_both, test_config):
  workdir, _ = run
  x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  fn_w, config_w, info_w = generators.load_generator(workdir, 'mr2ct')
  fn_n, config_n, info_n = generators.load_generator(npz_both, 'mr2ct')
  fn_np, _, info_np = generators.load_generator(npz_both, 'mr2ct', backend='numpy')
  assert (info_w.kind, info_w.step, info_w.network) == ('workdir', 2, 'g_ct')
  assert (info_n.kind, info_n.step, info_np.backend) == ('npz', 2, 'numpy')
  assert config_n.data.ct_window == config_w.data.ct_window == test_config.data.ct_window
  assert config_n.to_dict() == config_w.to_dict()
  want = fn_w(x)
  np.testing.assert_array_equal(fn_n(x), want)
  assert np.max(np.abs(fn_np(x) - want)) < TOL


def test_export_single_direction(run, tmp_path):
  path = str(tmp_path / 'g_mr.npz')
  meta = export.export(run[0], path, direction='ct2mr')
  assert meta['networks'] == ['g_mr']
  generators.load_generator(path, 'ct2mr', backend='numpy')
  with pytest.raises(generators.SourceError, match="no generator 'g_ct'"):
    generators.load_generator(path, 'mr2ct')
  with pytest.raises(generators.SourceError, match='step'):
    generators.load_generator(path, 'ct2mr', step=5)


def test_export_cli(run, tmp_path, capsys):
  out = str(tmp_path / 'sub' / 'g_ct.npz')
  assert export.main(['export', f'--workdir={run[0]}', f'--output={out}', '--step=2']) == 0
  assert 'g_ct' in capsys.readouterr().out
  assert numpy_generator.read_export(out).meta['networks'] == ['g_ct']
  before = os.path.getmtime(out)
  with pytest.raises(SystemExit, match='already exists.*--overwrite'):
    export.main(['export', f'--workdir={run[0]}', f'--output={out}'])
  assert os.path.getmtime(out) == before
  assert export.main(['export', f'--workdir={run[0]}', f'--output={out}', '--overwrite',
                      '--direction=both']) == 0
  assert numpy_generator.read_export(out).meta['networks'] == ['g_ct', 'g_mr']


@pytest.mark.parametrize('args,match', [
    (['--workdir={missing}', '--output={out}'], 'does not exist'),
    (['--workdir={run}', '--output={out}', '--step=7'], 'step 7'),
    (['--workdir={run}', '--output={tmp}/g.txt'], r'must end in \.npz'),
    (['--workdir={run}', '--output={out}', '--direction=sideways'], 'direction'),
    (['--output={out}'], '--workdir is required'),
])
def test_export_cli_errors(run, tmp_path, args, match):
  fmt = dict(missing=str(tmp_path / 'nope'), out=str(tmp_path / 'g.npz'), run=run[0],
             tmp=str(tmp_path))
  with pytest.raises(SystemExit, match=match) as info:
    export.main(['export'] + [a.format(**fmt) for a in args])
  message = str(info.value.code)
  assert message.startswith('error: ') and '\n' not in message
  assert not os.path.exists(tmp_path / 'g.npz')


def test_export_cli_subprocess(run, tmp_path):
  out = str(tmp_path / 'g.npz')
  result = subprocess.run([sys.executable, '-m', 'mr2ct_jax.export', f'--workdir={run[0]}',
                           f'--output={out}'], capture_output=True, encoding='utf-8', timeout=300,
                          cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.exists(out)
