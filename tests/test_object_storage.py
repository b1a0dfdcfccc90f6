"""gs:// workdirs and data dirs end to end, against the local stand-in of tests/fake_bucket.py.

`gs://bucket/KEY` is the file BUCKET_ROOT/bucket/KEY in these tests; the package's code runs
unchanged (epath/fsspec, Orbax's tensorstore, array_record's GCS reader).
"""

import json
import os
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from flax import traverse_util

from mr2ct_jax import atomic
from mr2ct_jax import checkpointing
from mr2ct_jax import export
from mr2ct_jax import storage
from mr2ct_jax import translate
from mr2ct_jax.cli import commands
from mr2ct_jax.data import dataset
from mr2ct_jax.data import volume as volume_lib
from mr2ct_jax.data import writer
from mr2ct_jax.inference import generators
from mr2ct_jax.segmentation import run as seg_run
from mr2ct_jax.training import loop

import fake_bucket
import tiny_run

bucket = fake_bucket.bucket  # the fixture

MISSING_GCSFS = ('gs://bucket/run: gs:// paths need gcsfs; pip install gcsfs '
                 '(or pip install "mr2ct_jax[gcs]")')


def _files(root):
  """Every file under `root`, as sorted paths relative to it."""
  return sorted(os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root) for name in names)


@pytest.fixture
def no_gcsfs(monkeypatch):
  """gs:// as on a machine without gcsfs: nothing registered, the import fails."""
  registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
  for protocol in ('gs', 'gcs'):
    monkeypatch.delitem(registry, protocol, raising=False)
  monkeypatch.setitem(sys.modules, 'gcsfs', None)


def test_a_url_without_gcsfs_is_one_line(no_gcsfs):
  with pytest.raises(storage.StorageError) as e:
    storage.makedirs('gs://bucket/run')
  assert str(e.value) == MISSING_GCSFS
  with pytest.raises(SystemExit) as e:
    with commands.one_line_errors(()):
      checkpointing.load_config('gs://bucket/run')
  assert str(e.value) == f'error: {MISSING_GCSFS}'
  # Checked before any work by the commands' output checks, in the command's error type.
  with pytest.raises(dataset.DatasetError) as e:
    atomic.check_writable('gs://bucket/run', error=dataset.DatasetError)
  assert str(e.value) == MISSING_GCSFS


def test_local_paths_are_not_urls(tmp_path):
  assert not storage.is_remote(str(tmp_path / 'a'))
  assert storage.is_remote('gs://bucket/a')
  assert storage.absolute('gs://bucket/a/') == 'gs://bucket/a'
  assert storage.absolute('rel') == os.path.abspath('rel')
  storage.check_backend(str(tmp_path))  # no filesystem package needed


def test_an_atomic_write_to_a_url_appears_only_when_complete(bucket):
  target = os.path.join(bucket, 'bucket', 'dir', 'x.json')
  with atomic.writing('gs://bucket/dir/x.json') as f:
    f.write('{"a": 1}\n')
    assert not os.path.exists(target)  # written locally, not uploaded yet
  with open(target, encoding='utf-8') as f:
    assert f.read() == '{"a": 1}\n'
  with pytest.raises(KeyError):
    with atomic.writing('gs://bucket/dir/y.json') as f:
      f.write('half')
      raise KeyError('interrupted')
  assert _files(bucket) == ['bucket/dir/x.json']  # nothing of the failed write, no temp file
  atomic.write_json('gs://bucket/dir/x.json', {'b': 2})
  with storage.open_file('gs://bucket/dir/x.json') as f:
    assert json.load(f) == {'b': 2}


def test_a_built_dir_is_uploaded_with_its_marker_last(bucket, monkeypatch):
  uploads = []
  upload = storage.upload_file
  monkeypatch.setattr(storage, 'upload_file',
                      lambda local, remote: (uploads.append(remote), upload(local, remote)))
  old = os.path.join(bucket, 'bucket', 'out')
  os.makedirs(os.path.join(old, 'stale'))
  with open(os.path.join(old, 'stale', 'f'), 'w', encoding='utf-8') as f:
    f.write('old')
  with atomic.building_dir('gs://bucket/out') as tmp:
    assert not tmp.startswith(bucket)
    os.makedirs(os.path.join(tmp, 'sub'))
    for name in ('sub/b.txt', 'sub/a.txt', 'meta.json'):
      with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
        f.write(name)
  assert uploads == ['gs://bucket/out/sub/a.txt', 'gs://bucket/out/sub/b.txt',
                     'gs://bucket/out/meta.json']
  assert _files(bucket) == ['bucket/out/meta.json', 'bucket/out/sub/a.txt',
                            'bucket/out/sub/b.txt']  # the old contents replaced
  assert not os.path.exists(tmp)
  with pytest.raises(atomic.OutputError, match='^gs://bucket/out: already exists'):
    atomic.check_replaceable('gs://bucket/out', False, 'meta.json', 'an output')
  atomic.check_replaceable('gs://bucket/out', True, 'meta.json', 'an output')
  with pytest.raises(atomic.OutputError, match='not an output .no other.json.'):
    atomic.check_replaceable('gs://bucket/out', True, 'other.json', 'an output')


def test_prepare_train_resume_and_evaluate_in_the_bucket(bucket, test_config, tmp_path,
                                                         capsys):
  # The phantom's volumes (local inputs), prepared into the bucket.
  local = writer.prepare_phantom(str(tmp_path / 'ph'), test_config)
  raw = str(tmp_path / 'ph' / 'raw')
  data = writer.prepare(os.path.join(raw, 'mr'), os.path.join(raw, 'ct'), 'gs://bucket/data',
                        labeled_dir=os.path.join(raw, 'labeled'),
                        paired_dir=os.path.join(raw, 'paired'),
                        **writer.preparation_settings(test_config))
  assert data == 'gs://bucket/data'
  uploaded = os.path.join(bucket, 'bucket', 'data')
  assert _files(uploaded) == _files(local)
  assert dataset.load_meta(data)['splits'] == dataset.load_meta(local)['splits']
  # The records are read through array_record's GCS reader: the same slices.
  remote_volumes = list(dataset.iterate_volumes(data, 'test'))
  local_volumes = list(dataset.iterate_volumes(local, 'test'))
  assert [v['patient_id'] for v in remote_volumes] == [v['patient_id'] for v in local_volumes]
  np.testing.assert_array_equal(remote_volumes[0]['image'], local_volumes[0]['image'])

  config = ml_collections.ConfigDict(test_config.to_dict())
  config.data.dir = data
  run = 'gs://bucket/run'
  loop.train(config, run, stop_after=2)  # as a pre-empted job
  run_root = os.path.join(bucket, 'bucket', 'run')
  assert sorted(os.listdir(os.path.join(run_root, 'checkpoints'))) == ['2']
  assert checkpointing.load_config(run).data.dir == data
  capsys.readouterr()
  summary = loop.train_and_evaluate(config, run)  # the rerun resumes from the bucket
  assert f'Resumed from {run} at step 2.' in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(run_root, 'checkpoints'))) == ['2', '4']
  events = [n for n in os.listdir(os.path.join(run_root, 'tb')) if 'tfevents' in n]
  assert len(events) == 2  # one per run: the first and the resumed one
  assert summary['step'] == 4 and summary['output_dir'] == 'gs://bucket/run/eval'
  assert os.path.isfile(os.path.join(run_root, 'eval', 'summary.md'))
  with open(os.path.join(run_root, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['data']['image_size'] == 32
  # The generator exported into the bucket, and read back from it for translation.
  export.export(run, 'gs://bucket/g_ct.npz')
  export.export(run, str(tmp_path / 'g_ct.npz'))
  remote = generators.load_params('gs://bucket/g_ct.npz')[0]
  local = generators.load_params(str(tmp_path / 'g_ct.npz'))[0]
  assert remote['stem']['kernel'].shape == local['stem']['kernel'].shape
  for (k, a), (_, b) in zip(sorted(traverse_util.flatten_dict(remote).items()),
                            sorted(traverse_util.flatten_dict(local).items())):
    np.testing.assert_array_equal(a, b, err_msg=str(k))
  with pytest.raises(FileExistsError, match='gs://bucket/g_ct.npz: already exists'):
    export.export(run, 'gs://bucket/g_ct.npz')
  # The downstream U-Net on the bucket's run: checkpoints, cache and evaluation in the bucket.
  seg_summary = seg_run.run(run, steps=2)
  seg_root = os.path.join(run_root, 'seg')
  assert seg_summary['output_dir'] == 'gs://bucket/run/seg/eval'
  assert sorted(os.listdir(os.path.join(seg_root, 'checkpoints'))) == ['2']
  assert os.path.isfile(os.path.join(seg_root, 'eval', 'summary.md'))
  with open(os.path.join(seg_root, 'run.json'), encoding='utf-8') as f:
    assert json.load(f)['workdir'] == run
  capsys.readouterr()
  again = seg_run.run(run, steps=2, overwrite=True)  # resumes: trained, cache read back
  assert 'already trained to step 2' in capsys.readouterr().out
  assert again['dice'] == seg_summary['dice']
  assert not [p for p in _files(bucket) if p.endswith('.tmp')]


def _write_mr(path, seed):
  """A small MR-like NIfTI volume (an ellipse with texture) at `path`."""
  rng = np.random.default_rng(seed)
  x, y = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 36), indexing='ij')
  body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
  array = np.where(body[..., None], 300 + 50 * rng.standard_normal((40, 36, 3)), 0)
  affine = np.diag([8.0, 8.0, 6.0, 1.0])
  volume_lib.write_nifti(str(path), array, affine, dtype=np.int16)
  return array, affine


def test_translate_reads_and_writes_the_bucket(bucket, test_config, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  tiny_run.make_workdir(workdir, test_config, step=2)
  npz = str(tmp_path / 'g.npz')
  export.export(workdir, npz)
  mr_root = os.path.join(bucket, 'bucket', 'mr')
  os.makedirs(mr_root)
  _, affine = _write_mr(os.path.join(mr_root, 'p01.nii.gz'), 1)
  _write_mr(os.path.join(mr_root, 'p02.nii.gz'), 2)
  # The same volumes translated locally: what the bucket's outputs must hold.
  expected = translate.translate(npz, mr_root, str(tmp_path / 'local_sct'), backend='numpy',
                                 progress=False)

  written = translate.translate(npz, 'gs://bucket/mr', 'gs://bucket/sct', backend='numpy',
                                progress=False)
  assert written == ['gs://bucket/sct/p01.nii.gz', 'gs://bucket/sct/p02.nii.gz']
  for local, remote in zip(expected, written):
    out = nib.load(os.path.join(bucket, 'bucket', 'sct', os.path.basename(remote)))
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(nib.load(local).dataobj))
    np.testing.assert_allclose(out.affine, affine)
  # One volume, URL to URL; an existing output is refused before any work.
  one = translate.translate(npz, 'gs://bucket/mr/p02.nii.gz', 'gs://bucket/one.nii.gz',
                            backend='numpy', progress=False)
  assert one == ['gs://bucket/one.nii.gz']
  with pytest.raises(translate.TranslateError,
                     match='^gs://bucket/sct/p01.nii.gz: already exists'):
    translate.translate(npz, 'gs://bucket/mr', 'gs://bucket/sct', backend='numpy')
  assert translate.translate(npz, 'gs://bucket/mr', 'gs://bucket/sct', backend='numpy',
                             skip_existing=True) == []
  # DICOM series folders into the bucket.
  series = translate.translate(npz, 'gs://bucket/mr/p01.nii.gz', 'gs://bucket/dcm',
                               backend='numpy', progress=False, output_format='dicom')
  assert series == ['gs://bucket/dcm/p01_sct']
  assert len(os.listdir(os.path.join(bucket, 'bucket', 'dcm', 'p01_sct'))) == 3
  # A bad volume in a bucket folder is named by its URL and skipped; a missing input is one line.
  with open(os.path.join(mr_root, 'p03.nii.gz'), 'wb') as f:
    f.write(b'not a nifti')
  capsys.readouterr()
  with pytest.raises(translate.TranslateError,
                     match=r'^gs://bucket/mr: 1 of 1 volumes skipped .*written to gs://bucket/sct'):
    translate.translate(npz, 'gs://bucket/mr', 'gs://bucket/sct', backend='numpy',
                        skip_existing=True, progress=False)
  assert 'skipped: gs://bucket/mr/p03.nii.gz: ' in capsys.readouterr().err
  with pytest.raises(translate.TranslateError,
                     match='^gs://bucket/nothing: no such input file or folder$'):
    translate.translate(npz, 'gs://bucket/nothing', 'gs://bucket/x.nii.gz', backend='numpy')
  # The command line, with a workdir source: the same bytes as the library call above.
  assert translate.main(['translate', f'--workdir={workdir}', '--input=gs://bucket/mr/p02.nii.gz',
                         '--output=gs://bucket/cli.nii.gz', '--backend=numpy',
                         '--noprogress']) == 0
  assert 'wrote 1 volume(s): gs://bucket/cli.nii.gz' in capsys.readouterr().out
  with open(os.path.join(bucket, 'bucket', 'cli.nii.gz'), 'rb') as a, \
       open(os.path.join(bucket, 'bucket', 'one.nii.gz'), 'rb') as b:
    assert a.read() == b.read()
  with pytest.raises(SystemExit, match='^error: gs://bucket/cli.nii.gz: already exists'):
    translate.main(['translate', f'--npz={npz}', '--input=gs://bucket/mr/p02.nii.gz',
                    '--output=gs://bucket/cli.nii.gz', '--backend=numpy'])
  assert not [p for p in _files(bucket) if p.endswith('.tmp')]
