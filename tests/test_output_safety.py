"""Output locations: never delete inputs or foreign folders, one-line errors when unwritable.

Covers `mr2ct_jax.atomic`'s checks and how prepare, evaluate (and --compare), export and
translate use them: --overwrite replaces only the command's own earlier output, an output may
not be (or contain) what the command reads, and an output that cannot be created is refused at
start with 'error: OUTPUT: ...' (exit status 1, no traceback).
"""

import os
import subprocess
import sys

import ml_collections
import pytest

from mr2ct_jax import atomic
from mr2ct_jax.cli import commands
from mr2ct_jax import evaluate
from mr2ct_jax import export
from mr2ct_jax.inference import generators
from mr2ct_jax.evaluation import reports
from mr2ct_jax import translate
from mr2ct_jax.data import prepare
from mr2ct_jax.data import dataset
from mr2ct_jax.evaluation import paired
from mr2ct_jax.evaluation import scoring
from mr2ct_jax.data import writer

import synthetic_volumes as synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(spacing_mm=5.0, image_size=32, mr_percentile=99.5, n4=False)


def _tree(root):
  """Every file under `root` (relative paths) with its bytes: 'nothing was touched'."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _one_line_error(exc_info, *needles):
  message = str(exc_info.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  for needle in needles:
    assert needle in message, message
  return message


@pytest.fixture()
def a_file(tmp_path):
  """A regular file: no output can be created below it."""
  path = tmp_path / 'afile'
  path.write_text('x', encoding='utf-8')
  return path


# ---- atomic ------------------------------------------------------------------------------


def test_check_writable(tmp_path, a_file):
  atomic.check_writable(tmp_path / 'new' / 'deeper' / 'out.nii.gz')  # parents may be missing
  atomic.check_writable(tmp_path, folder=True)
  with pytest.raises(atomic.OutputError, match='afile is not a folder'):
    atomic.check_writable(a_file / 'sub' / 'out.npz')
  with pytest.raises(atomic.OutputError, match='exists and is not a folder'):
    atomic.check_writable(a_file, folder=True)
  if os.path.isdir('/proc/self'):  # refuses a mkdir even to root (os.access says yes)
    with pytest.raises(atomic.OutputError, match='/proc/mr2ct-test/x: cannot be created'):
      atomic.check_writable('/proc/mr2ct-test/x')
  assert sorted(os.listdir(tmp_path)) == ['afile']  # the probe leaves nothing behind


def test_check_apart(tmp_path):
  data = tmp_path / 'study' / 'mr'
  data.mkdir(parents=True)
  inputs = {'--mr_dir': str(data), '--ct_dir': None}
  for output, relation in ((data, 'is'), (tmp_path / 'study', 'contains'),
                           (data / 'x', 'is inside')):
    with pytest.raises(atomic.OutputError, match=f'the output {relation} the input --mr_dir='):
      atomic.check_apart(str(output), inputs)
  atomic.check_apart(str(data / 'x'), inputs, inside_ok=True)
  atomic.check_apart(str(tmp_path / 'study' / 'data'), inputs)  # a sibling is fine
  os.symlink(data, tmp_path / 'link')
  with pytest.raises(atomic.OutputError, match='is the input'):  # links are resolved
    atomic.check_apart(str(tmp_path / 'link'), inputs)


def test_check_replaceable(tmp_path, a_file):
  own, foreign, empty = tmp_path / 'own', tmp_path / 'foreign', tmp_path / 'empty'
  for folder in (own, foreign, empty):
    folder.mkdir()
  (own / 'marker.json').write_text('{}', encoding='utf-8')
  (foreign / 'precious.txt').write_text('keep', encoding='utf-8')
  atomic.check_replaceable(tmp_path / 'absent', False, 'marker.json', 'an output')
  with pytest.raises(atomic.OutputError, match=r'already exists \(pass --overwrite'):
    atomic.check_replaceable(own, False, 'marker.json', 'an output')
  atomic.check_replaceable(own, True, 'marker.json', 'an output')
  atomic.check_replaceable(empty, True, 'marker.json', 'an output')
  with pytest.raises(dataset.DatasetError, match='not an output .no marker.json.; refusing'):
    atomic.check_replaceable(foreign, True, 'marker.json', 'an output',
                             error=dataset.DatasetError)
  with pytest.raises(atomic.OutputError, match='is not a folder'):
    atomic.check_replaceable(a_file, True, 'marker.json', 'an output')


def test_failed_write_names_the_output_not_the_temporary_file(tmp_path):
  target = tmp_path / 'out.txt'
  target.mkdir()  # the final rename onto a folder fails
  with pytest.raises(atomic.OutputError) as info:
    atomic.write_text(str(target), 'hello')
  assert str(info.value).startswith(f'{target}: cannot write it') and '.tmp-' not in str(
      info.value)
  assert os.listdir(tmp_path) == ['out.txt']  # the temporary file is gone


def test_a_built_folder_gets_the_umask_mode_not_mkdtemps_0700(tmp_path):
  old = os.umask(0o027)
  try:
    with atomic.building_dir(str(tmp_path / 'series')) as tmp:
      assert os.stat(tmp).st_mode & 0o777 == 0o750
  finally:
    os.umask(old)
  assert os.stat(tmp_path / 'series').st_mode & 0o777 == 0o750


def test_a_name_near_the_255_byte_limit_can_be_written_atomically(tmp_path):
  # The temporary sibling's name adds '.', a pid and a random suffix to the target's name.
  name = 'ü' * 100 + 'x' * 44 + '.nii.gz'  # 251 bytes
  atomic.write_text(str(tmp_path / name), 'ok')
  assert os.listdir(tmp_path) == [name]
  with atomic.building_dir(str(tmp_path / ('d' * 250))) as tmp:
    open(os.path.join(tmp, 'f'), 'w', encoding='utf-8').close()
  assert sorted(os.listdir(tmp_path)) == sorted([name, 'd' * 250])


def test_commands_report_output_and_file_errors_as_one_line():
  for raised, want in ((atomic.OutputError('/o: cannot write it (No space left on device)'),
                        'error: /o: cannot write it (No space left on device)'),
                       (PermissionError(13, 'Permission denied', '/x/y'),
                        'error: /x/y: Permission denied')):
    with pytest.raises(SystemExit) as info:
      with commands.one_line_errors(()):
        raise raised
    assert info.value.code == want
  with pytest.raises(KeyError):  # anything else is a bug: its traceback is kept
    with commands.one_line_errors(()):
      raise KeyError('x')


# ---- prepare -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """A user's study folder: raw MR/CT folders and a notes file next to them."""
  root = tmp_path_factory.mktemp('study')
  synth.make(str(root), num_mr=1, num_ct=1, num_labeled=0, num_test=0)
  (root / 'notes.txt').write_text('precious', encoding='utf-8')
  return root


@pytest.mark.parametrize('out,relation', [('.', 'contains'), ('mr', 'is'),
                                          ('ct/data', 'is inside')])
def test_prepare_refuses_out_overlapping_inputs(study, out, relation):
  before = _tree(study)
  with pytest.raises(dataset.DatasetError, match=f'the output {relation} the input --(mr|ct)_dir'):
    writer.prepare(str(study / 'mr'), str(study / 'ct'), str(study / out), overwrite=True, **KW)
  assert _tree(study) == before


def test_prepare_overwrite_replaces_only_a_prepared_dataset(study, tmp_path):
  foreign = tmp_path / 'results'
  foreign.mkdir()
  (foreign / 'thesis.tex').write_text('keep', encoding='utf-8')
  with pytest.raises(dataset.DatasetError, match='not a prepared dataset .no dataset_meta.json.'):
    writer.prepare(str(study / 'mr'), str(study / 'ct'), str(foreign), overwrite=True, **KW)
  assert _tree(foreign) == {'thesis.tex': b'keep'}
  # The legitimate case: --overwrite of prepare's own earlier output (and of an empty folder).
  out = tmp_path / 'data'
  out.mkdir()
  writer.prepare(str(study / 'mr'), str(study / 'ct'), str(out), overwrite=True, **KW)
  writer.prepare(str(study / 'mr'), str(study / 'ct'), str(out), overwrite=True,
                 **dict(KW, image_size=16))
  assert dataset.load_meta(str(out))['image_size'] == 16


def test_prepare_cli_refusal_and_unwritable_out(study, a_file):
  argv = ['prepare', f'--config={REPO}/configs/gc.py:test', f'--mr_dir={study / "mr"}',
          f'--ct_dir={study / "ct"}']
  with pytest.raises(SystemExit) as info:
    prepare.main(argv + [f'--out={study}', '--overwrite'])
  _one_line_error(info, f'{study}: the output contains the input --mr_dir=')
  assert (study / 'notes.txt').read_text(encoding='utf-8') == 'precious'
  with pytest.raises(SystemExit) as info:
    prepare.main(argv + [f'--out={a_file / "d"}'])
  _one_line_error(info, f'{a_file / "d"}: cannot be created', 'not a folder')


# ---- evaluate ----------------------------------------------------------------------------


@pytest.fixture()
def workdir(tmp_path):
  """Looks like a training run with its phantom dataset (evaluate fails before reading it)."""
  run = tmp_path / 'run'
  (run / 'checkpoints' / '4').mkdir(parents=True)
  (run / 'config.json').write_text('{}', encoding='utf-8')
  (run / 'phantom' / 'data').mkdir(parents=True)
  (run / 'phantom' / 'data' / dataset.META_FILE).write_text('{}', encoding='utf-8')
  return run


@pytest.mark.parametrize('output,message', [
    ('run', 'the output is the input --workdir='),
    ('.', 'the output contains the input --workdir='),
    ('run/phantom', 'the output contains the input --data='),
    ('run/phantom/data', 'the output is the input --data='),
    ('run/checkpoints', 'not an earlier evaluation output (no per_volume.json)'),
])
def test_evaluate_refuses_to_replace_what_it_reads(workdir, output, message):
  before = _tree(workdir.parent)
  with pytest.raises(SystemExit) as info:
    evaluate.main(['evaluate', f'--workdir={workdir}', f'--data={workdir / "phantom" / "data"}',
                   f'--output={workdir.parent / output}', '--overwrite', '--noprogress'])
  _one_line_error(info, message)
  assert _tree(workdir.parent) == before


def test_evaluate_refuses_the_configs_data_dir(workdir, monkeypatch):
  """Without --data, the data dir comes from the run's config: checked once it is known."""
  config = ml_collections.ConfigDict({'data': {'dir': str(workdir.parent / 'd' / 'data')}})
  info = generators.GeneratorInfo(source=str(workdir), kind='workdir', direction='mr2ct',
                                  network='g_ct', step=4, backend='numpy')
  monkeypatch.setattr(paired, '_load_generators', lambda *a: (None, None, config, info))
  with pytest.raises(scoring.EvaluateError, match='the output contains the input --data='):
    paired.evaluate(str(workdir), None, str(workdir.parent / 'd'), overwrite=True)


def test_evaluate_overwrite_of_its_own_output_is_allowed(tmp_path):
  out = tmp_path / 'eval'
  out.mkdir()
  (out / paired.OWN_FILE).write_text('[]', encoding='utf-8')
  reports.check_output_dir(str(out), True, paired.OWN_FILE)
  with pytest.raises(reports.ReportError, match='--overwrite'):
    reports.check_output_dir(str(out), False, paired.OWN_FILE)


# ---- unwritable outputs: every command, one line naming the output --------------------------


@pytest.mark.parametrize('command,args', [
    (translate.main, ['--npz={tmp}/g.npz', '--input={tmp}/mr.nii.gz', '--output={bad}/o.nii.gz',
                      '--noprogress']),
    (translate.main, ['--npz={tmp}/g.npz', '--input={tmp}', '--output={bad}/sct']),
    (evaluate.main, ['--npz={tmp}/g.npz', '--data={tmp}', '--output={bad}/ev', '--noprogress']),
    (evaluate.main, ['--compare', '{tmp}/a', '{tmp}/a', '--output={bad}']),
    (export.main, ['--workdir={tmp}/run', '--output={bad}/g.npz']),
])
def test_unwritable_output_is_one_line(tmp_path, a_file, command, args):
  """The output's parent (or with --compare, the output) is a regular file; refused before
  the model or the data are loaded."""
  (tmp_path / 'a').mkdir()
  reports.write_json(str(tmp_path / 'a' / 'per_volume.json'), [{'patient_id': 'p0'}])
  args = [a.format(tmp=tmp_path, bad=a_file) for a in args]
  with pytest.raises(SystemExit) as info:
    command(['cmd'] + args)
  output = [a for a in args if a.startswith('--output=')][0][len('--output='):]
  _one_line_error(info, f'error: {output}: ', 'not a folder')


def test_unwritable_output_exit_status_and_no_traceback(tmp_path, a_file):
  """A real process: status 1, the last stderr line is the error, no traceback."""
  out = a_file / 'x.nii.gz'
  result = subprocess.run(
      [sys.executable, '-m', 'mr2ct_jax.translate', f'--npz={tmp_path}/g.npz', '--backend=numpy',
       f'--input={tmp_path}/mr.nii.gz', f'--output={out}'], capture_output=True,
      encoding='utf-8', timeout=300, cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      check=False)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {out}: cannot be created: {a_file} is not a folder')


_SIGTERM_MID_BUILD = '''
import os, signal, sys
from absl import flags
from mr2ct_jax import atomic
from mr2ct_jax.cli import commands

def body():
  with atomic.building_dir(sys.argv[1]) as tmp:
    open(os.path.join(tmp, 'half.npz'), 'w').close()
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler or `kill` would, mid-output
    raise AssertionError('SIGTERM did not stop the command')

commands.run(flags.FlagValues(), ['cmd'], 'cmd', body, errors=())
'''


def test_sigterm_mid_output_exits_143_and_leaves_no_temporary_folder(tmp_path):
  target = tmp_path / 'out' / 'prepared'
  result = subprocess.run([sys.executable, '-c', _SIGTERM_MID_BUILD, str(target)],
                          capture_output=True, encoding='utf-8', timeout=120)
  assert result.returncode == 143, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'SIGTERM: stopping; no partial output is kept')
  assert list((tmp_path / 'out').iterdir()) == []  # neither the target nor .prepared.tmp-*


def test_a_handler_already_installed_is_left_alone():
  import signal  # pylint: disable=g-import-not-at-top
  mine = lambda signum, frame: None
  previous = signal.signal(signal.SIGTERM, mine)
  try:
    with commands.terminate_unwinds():
      assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)
  raise_terminated = commands._raise_terminated  # pylint: disable=protected-access
  with commands.terminate_unwinds():
    assert signal.getsignal(signal.SIGTERM) is raise_terminated
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
