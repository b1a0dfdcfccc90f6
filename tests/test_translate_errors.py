"""translate's failure paths: one-line errors, skipped volumes in folders, bad sources."""

import json
import os
import shutil

import numpy as np
import pytest

from mr2ct_jax.inference import generators
from mr2ct_jax import translate

from test_translate import CASES, make_run, make_volume, write


@pytest.fixture(scope='module')
def run(tmp_path_factory, test_config):
  return make_run(tmp_path_factory.mktemp('translate_errors'), test_config)


def test_folder_skips_unreadable_volumes_and_skip_existing_finishes_the_run(run, tmp_path,
                                                                            capsys):
  workdir, _ = run
  src, out_dir = tmp_path / 'in', tmp_path / 'out'
  src.mkdir()
  for name, (axcodes, spacing, shape) in zip(('a.nii.gz', 'c.nii.gz'), CASES[:2]):
    arr, aff, _ = make_volume(axcodes, spacing, shape)
    write(src / name, arr, aff)
  good = (src / 'a.nii.gz').read_bytes()
  (src / 'b.nii.gz').write_bytes(good[:len(good) // 2])  # truncated
  with pytest.raises(translate.TranslateError,
                     match=r'1 of 3 volumes skipped \(listed above\); 2 written'):
    translate.translate(workdir, str(src), str(out_dir), progress=False)
  assert sorted(os.listdir(out_dir)) == ['a.nii.gz', 'c.nii.gz']
  skipped_lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('skipped: ')]
  assert len(skipped_lines) == 1 and 'b.nii.gz' in skipped_lines[0]
  # The file repaired, the same command again: existing outputs are an error without a flag,
  # and --skip_existing translates only what is missing.
  (src / 'b.nii.gz').write_bytes(good)
  with pytest.raises(translate.TranslateError, match='already exists'):
    translate.translate(workdir, str(src), str(out_dir), progress=False)
  mtime = os.path.getmtime(out_dir / 'a.nii.gz')
  written = translate.translate(workdir, str(src), str(out_dir), skip_existing=True,
                                progress=False)
  assert written == [str(out_dir / 'b.nii.gz')]
  assert os.path.getmtime(out_dir / 'a.nii.gz') == mtime


@pytest.fixture()
def bad_setup(run, tmp_path):
  """Paths for the error cases: a valid MR, a text file, a corrupt NIfTI, broken workdirs."""
  workdir, npz = run
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  paths = dict(workdir=workdir, npz=npz, tmp=str(tmp_path),
               mr=write(tmp_path / 'mr.nii.gz', arr, aff),
               missing=str(tmp_path / 'no_run'), out=str(tmp_path / 'sct.nii.gz'))
  (tmp_path / 'notes.txt').write_text('hello', encoding='utf-8')
  paths['txt'] = str(tmp_path / 'notes.txt')
  noise = np.random.default_rng(0).normal(0, 20, arr.shape)  # air in a CT is noisy
  paths['ct'] = write(tmp_path / 'ct.nii.gz', np.where(arr > 0, 40, -1000) + noise, aff)
  (tmp_path / 'corrupt.nii.gz').write_bytes(b'\x1f\x8b garbage')
  paths['corrupt'] = str(tmp_path / 'corrupt.nii.gz')
  (tmp_path / 'exists.nii.gz').write_bytes(b'old')
  paths['exists'] = str(tmp_path / 'exists.nii.gz')
  # A checkpoint from another config: the config.json says 8 filters, the weights have 4.
  other = tmp_path / 'other_run'
  shutil.copytree(workdir, other)
  config = json.loads((other / 'config.json').read_text(encoding='utf-8'))
  config['model']['ngf'] = 8
  (other / 'config.json').write_text(json.dumps(config), encoding='utf-8')
  paths['other'] = str(other)
  empty = tmp_path / 'empty_run'
  empty.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), empty / 'config.json')
  paths['empty'] = str(empty)
  (tmp_path / 'empty_dir').mkdir()
  paths['empty_dir'] = str(tmp_path / 'empty_dir')
  return paths


@pytest.mark.parametrize('args,match', [
    (['--workdir={workdir}', '--input={txt}', '--output={out}'], 'not a volume'),
    (['--workdir={workdir}', '--input={corrupt}', '--output={out}'], 'cannot read NIfTI'),
    (['--workdir={workdir}', '--input={tmp}/nope.nii.gz', '--output={out}'], 'no such input'),
    (['--workdir={workdir}', '--input={empty_dir}', '--output={tmp}/o'], 'no NIfTI files'),
    (['--workdir={workdir}', '--input={mr}', '--output={exists}'], 'already exists'),
    (['--workdir={workdir}', '--input={mr}', '--output={tmp}/sct.png'], r'\.nii or \.nii\.gz'),
    (['--workdir={workdir}', '--input={mr}', '--output={tmp}/.nii.gz'], 'needs a name before'),
    (['--workdir={workdir}', '--input={mr}', '--output={tmp}/.sct.nii'], 'is hidden'),
    (['--workdir={missing}', '--input={mr}', '--output={out}'], 'no such workdir'),
    (['--workdir={empty}', '--input={mr}', '--output={out}'], 'no checkpoint'),
    (['--workdir={other}', '--input={mr}', '--output={out}'], 'another config'),
    (['--workdir={workdir}', '--input={mr}', '--output={out}', '--step=9'], 'step 9'),
    (['--workdir={workdir}', '--npz={npz}', '--input={mr}', '--output={out}'], 'exactly one'),
    (['--workdir={workdir}', '--input={mr}', '--output={out}', '--direction=ct2mr'],
     'Hounsfield'),
    (['--workdir={workdir}', '--input={ct}', '--output={out}'],
     r'ct\.nii\.gz: looks like a CT in Hounsfield units, not an MR.*--direction=ct2mr'),
    (['--workdir={workdir}', '--output={out}'], '--input is required'),
    (['--workdir={workdir}', '--input=', '--output={out}'], '--input is empty'),
    (['--workdir={workdir}', '--input={mr}', '--output={exists}', '--overwrite',
      '--skip_existing'], 'contradict each other'),
    (['--workdir={workdir}', '--input={mr}', '--output={out}', '--bogus=1'], 'bogus'),
])
def test_cli_errors_are_one_line(bad_setup, args, match):
  with pytest.raises(SystemExit, match=match) as info:
    translate.main(['translate', '--noprogress'] + [a.format(**bad_setup) for a in args])
  message = str(info.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  assert not os.path.exists(bad_setup['out'])
  assert open(bad_setup['exists'], 'rb').read() == b'old'


def test_corrupt_checkpoint_is_one_line_without_library_noise(run, tmp_path, capfd):
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  data_files = [p for p in (workdir / 'checkpoints').rglob('*') if p.is_file()
                and p.parent.name == 'd']
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(100)
  capfd.readouterr()
  with pytest.raises(generators.SourceError, match='corrupt or truncated'):
    generators.load_generator(str(workdir), 'mr2ct', backend='numpy')
  assert 'Traceback' not in capfd.readouterr().err


def test_misused_sources_and_folders_get_messages_that_say_what_is_wrong(run, tmp_path):
  workdir, npz = run
  with pytest.raises(generators.SourceError,
                     match=f'{npz}: is a file, not a training workdir'):
    generators.restore_generators(npz, ('g_ct',))
  garbage = tmp_path / 'bad.npz'
  garbage.write_bytes(np.random.default_rng(0).bytes(3000))
  with pytest.raises(generators.SourceError, match=r'bad.npz: not a .npz \(zip\) file'):
    generators.load_generator(str(garbage), 'mr2ct', backend='numpy')
  folder = tmp_path / 'mr'
  folder.mkdir()
  arr, aff, _ = make_volume(*CASES[0])
  write(folder / 'a.nii.gz', arr, aff)
  with pytest.raises(translate.TranslateError, match='is a folder of NIfTI volumes; give an '
                                                     'output folder'):
    translate.plan(str(folder), str(tmp_path / 'out.nii.gz'))


def test_an_output_folder_linked_to_the_input_folder_is_refused(tmp_path):
  src = tmp_path / 'mr'
  src.mkdir()
  arr, aff, _ = make_volume(*CASES[0])
  write(src / 'p01.nii.gz', arr, aff)
  os.symlink(src, tmp_path / 'link')
  with pytest.raises(translate.TranslateError, match='output would replace its own input'):
    translate.plan(str(src), str(tmp_path / 'link'), overwrite=True)


def _edited_export(npz, tmp_path, edit):
  """A copy of the export `npz` whose config and meta (JSON) `edit` rewrites."""
  with np.load(npz) as data:
    arrays = {name: data[name] for name in data.files}
  config, meta = json.loads(str(arrays['__config__'])), json.loads(str(arrays['__meta__']))
  config, meta = edit(config, meta)
  arrays['__config__'], arrays['__meta__'] = np.asarray(json.dumps(config)), np.asarray(
      json.dumps(meta))
  path = str(tmp_path / 'edited.npz')
  np.savez(path, **arrays)
  return path


def _set_data(key, value):
  def edit(config, meta):
    config['data'][key] = value
    return config, meta
  return edit


@pytest.mark.parametrize('edit,match', [
    (lambda c, m: ([], m), r'__config__/__meta__ must be JSON objects'),
    (lambda c, m: (c, [1]), r'__config__/__meta__ must be JSON objects'),
    (lambda c, m: ({k: v for k, v in c.items() if k != 'data'}, m),
     r"its config has no 'data' section"),
    (_set_data('spacing_mm', 0), r'config.data.spacing_mm=0: must be > 0'),
    (_set_data('plane', 'oblique'), r"config.data.plane='oblique': must be one of"),
    (_set_data('mr_percentile', 150), r'config.data.mr_percentile=150: must be in \(0, 100\]'),
    (_set_data('ct_window', ['a', 'b']), r'config.data: unusable recorded preprocessing'),
], ids=['config list', 'meta list', 'no data', 'zero spacing', 'bad plane', 'percentile',
        'window strings'])
@pytest.mark.parametrize('backend', ['jax', 'numpy'])
def test_an_export_with_a_malformed_config_is_one_line(run, tmp_path, edit, match, backend):
  _, npz = run
  bad = _edited_export(npz, tmp_path, edit)
  with pytest.raises(generators.SourceError, match=match) as info:
    generators.load_generator(bad, 'mr2ct', backend=backend)
  assert str(info.value).startswith(bad) and '\n' not in str(info.value)
