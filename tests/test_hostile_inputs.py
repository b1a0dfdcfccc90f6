"""Hostile inputs through the commands, as a user meets them: one line naming the file or key,
a non-zero exit, no traceback (unless --verbose) and no output left behind.

Each case here (and the ones in test_volume_io, test_translate_errors, test_datasets,
test_config, test_export, test_evaluate and test_segmentation) is listed in the README's
"Failure modes" table.
"""

import errno
import os
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mr2ct_jax import atomic
from mr2ct_jax import translate
from mr2ct_jax.data import prepare
from mr2ct_jax.data import volume
from test_translate import make_run
from test_volume_io import write_dicom_series

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERIES_UID = '1.2.826.0.1.3680043.2.1125.41'


@pytest.fixture(scope='module')
def run(tmp_path_factory, test_config):
  return make_run(tmp_path_factory.mktemp('hostile'), test_config)


def _nifti(path, array, spacing=(4.0, 4.0, 5.0), dtype=None):
  img = nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0]))
  if dtype is not None:
    img.set_data_dtype(dtype)
  nib.save(img, path)
  return str(path)


def _body(shape=(24, 20, 4)):
  x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing='ij')
  inside = (x ** 2 + y ** 2 < 0.6)[..., None]
  return np.broadcast_to(np.where(inside, 800.0, 0.0), shape).astype(np.float32)


def _dicom(folder, edit=None, only=None):
  image = sitk.GetImageFromArray(np.transpose(_body((16, 16, 4)), (2, 1, 0)).astype(np.int16))
  image.SetSpacing((4.0, 4.0, 5.0))
  write_dicom_series(str(folder), image, _SERIES_UID)
  for path in sorted(folder.iterdir()):
    if edit is not None and (only is None or path.name == only):
      path.write_bytes(edit(path.read_bytes()))
  return str(folder)


def _without_position(data):
  at = data.find(struct.pack('<HH', 0x0020, 0x0032))
  length = struct.unpack('<I', data[at + 4:at + 8])[0]
  return data[:at] + data[at + 8 + length:]


def _nan_position(data):
  at = data.find(struct.pack('<HH', 0x0020, 0x0032))
  length = struct.unpack('<I', data[at + 4:at + 8])[0]
  value = b'nan\\nan\\nan '
  return (data[:at] + data[at:at + 4] + struct.pack('<I', len(value)) + value
          + data[at + 8 + length:])


def _short_pixels(data):
  at = data.rfind(struct.pack('<HH', 0x7FE0, 0x0010))
  return data[:at] + struct.pack('<HHI', 0x7FE0, 0x0010, 100) + data[at + 8:at + 108]


def _huge_header(path):
  """A tiny .nii whose header declares 1024^3 int16 voxels at 0.3 mm (2 GiB of int16)."""
  _nifti(path, np.zeros((4, 4, 2), np.int16), (0.3, 0.3, 0.3))
  data = bytearray(open(path, 'rb').read())
  data[42:48] = np.asarray([1024] * 3, '<i2').tobytes()
  open(path, 'wb').write(bytes(data))
  return str(path)


def _dims_disagree(path):
  """A header that says 24 x 20 x 4 over the data of a 24 x 20 x 2 volume."""
  _nifti(path, _body((24, 20, 2)))
  data = bytearray(open(path, 'rb').read())
  data[46:48] = np.asarray([4], '<i2').tobytes()
  open(path, 'wb').write(bytes(data))
  return str(path)


def _file(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def _bad_pixdim(path, spacing):
  """A NIfTI whose affine comes from its pixdim, patched to `spacing` after writing."""
  img = nib.Nifti1Image(_body(), None)
  img.header.set_qform(None, code=0)
  nib.save(img, path)
  data = bytearray(open(path, 'rb').read())
  data[80:92] = np.asarray(spacing, '<f4').tobytes()
  open(path, 'wb').write(bytes(data))
  return str(path)


def _make(case, tmp):
  """The input path of `case` (a name from CASES) under `tmp`."""
  body = _body()
  makers = {
      'empty folder': lambda: os.makedirs(tmp / 'empty') or str(tmp / 'empty'),
      'not an image': lambda: _file(tmp / 'notes.txt', b'x'),
      'truncated .nii.gz': lambda: _file(
          tmp / 't.nii.gz', open(_nifti(tmp / 'ok.nii.gz', body), 'rb').read()[:300]),
      'header dims disagree with the data': lambda: _dims_disagree(tmp / 'dims.nii'),
      '2-D volume': lambda: _nifti(tmp / '2d.nii.gz', body[..., 0]),
      '1x1x1 volume': lambda: _nifti(tmp / 'dot.nii.gz', np.ones((1, 1, 1), np.float32)),
      '4-D volume': lambda: _nifti(tmp / '4d.nii.gz', np.stack([body, body], -1)),
      'NaN voxels': lambda: _nifti(tmp / 'nan.nii.gz', np.where(body > 0, np.nan, 0.0)),
      'Inf voxels': lambda: _nifti(tmp / 'inf.nii.gz', np.where(body > 0, np.inf, 0.0)),
      'complex voxels': lambda: _nifti(tmp / 'c.nii.gz', body.astype(np.complex64)),
      'RGB voxels': lambda: _rgb(tmp / 'rgb.nii.gz'),
      'zero spacing': lambda: _bad_pixdim(tmp / 'z.nii', (4.0, 0.0, 5.0)),
      'negative spacing': lambda: _bad_pixdim(tmp / 'n.nii', (4.0, -4.0, 5.0)),
      'NaN spacing': lambda: _bad_pixdim(tmp / 'ns.nii', (4.0, np.nan, 5.0)),
      'implausible field of view': lambda: _nifti(tmp / 'fov.nii.gz', body, (100.0, 100.0, 5.0)),
      'huge declared size': lambda: _huge_header(tmp / 'huge.nii'),
      'DICOM without slice positions': lambda: _dicom(tmp / 'nopos', _without_position),
      'DICOM with NaN slice positions': lambda: _dicom(tmp / 'nanpos', _nan_position),
      'DICOM slice with short PixelData': lambda: _dicom(tmp / 'short', _short_pixels,
                                                         's002.dcm'),
      'two DICOM series in one folder': lambda: _two_series(tmp / 'mixed'),
      'symbolic-link loop': lambda: os.symlink(tmp / 'loop', tmp / 'loop') or str(tmp / 'loop'),
      'mm voxels labelled microns': lambda: _with_units(_nifti(tmp / 'um.nii.gz', body), 'micron'),
      'constant MR': lambda: _nifti(tmp / 'const.nii.gz', np.full(body.shape, 100.0)),
      'all-zero MR': lambda: _nifti(tmp / 'zeros.nii.gz', np.zeros(body.shape)),
      'values beyond float32': lambda: _nifti(tmp / 'big.nii.gz', body.astype(np.float64) * 1e300,
                                              dtype=np.float64),
  }
  return makers[case]()


def _with_units(path, units):
  img = nib.load(path)
  img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
  img.header.set_xyzt_units(units)
  nib.save(img, path)
  return path


def _rgb(path):
  rgb = np.zeros((24, 20, 4), [('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
  nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
  return str(path)


def _two_series(folder):
  _dicom(folder)
  image = sitk.GetImageFromArray(np.zeros((4, 16, 16), np.int16))
  write_dicom_series(str(folder), image, _SERIES_UID + '.2', prefix='b')
  return str(folder)


# (case, what the one line says): every case goes through translate as the user runs it.
CASES = [
    ('empty folder', 'no DICOM files'),
    ('not an image', 'not a volume'),
    ('truncated .nii.gz', 'cannot read NIfTI'),
    ('header dims disagree with the data', 'cannot read NIfTI'),
    ('2-D volume', 'expected a 3-D volume'),
    ('1x1x1 volume', 'at least 2 voxels along every axis'),
    ('4-D volume', 'expected a 3-D volume'),
    ('NaN voxels', 'voxels are NaN or Inf'),
    ('Inf voxels', 'voxels are NaN or Inf'),
    ('complex voxels', 'complex'),
    ('RGB voxels', 'RGB|components|scalar'),
    ('zero spacing', 'spacing must be finite and > 0'),
    ('negative spacing', 'spacing must be finite and > 0'),
    ('NaN spacing', 'spacing must be finite and > 0'),
    ('implausible field of view', 'implausible geometry'),
    ('huge declared size', 'exceed the limit'),
    ('DICOM without slice positions', 'geometry is unknown'),
    ('DICOM with NaN slice positions', 'geometry is unknown'),
    ('DICOM slice with short PixelData', 'the file is damaged'),
    ('two DICOM series in one folder', 'holds 2 DICOM series'),
    ('symbolic-link loop', 'no such input'),
    ('mm voxels labelled microns', r'under 2 mm along every axis'),
    ('constant MR', 'a constant volume holds no MR image'),
    ('all-zero MR', 'every voxel is 0; a constant volume holds no MR image'),
    ('values beyond float32', 'voxel values up to 8e+302 exceed float32'),
]


@pytest.mark.parametrize('case,match', CASES, ids=[c for c, _ in CASES])
def test_translate_refuses_in_one_line_and_writes_nothing(run, tmp_path, case, match):
  _, npz = run
  source = _make(case, tmp_path)
  out = tmp_path / 'out'
  out.mkdir()
  target = out / 'sct.nii.gz'
  with pytest.raises(SystemExit) as info:
    translate.main(['translate', f'--npz={npz}', f'--input={source}', f'--output={target}',
                    '--noprogress'])
  message = str(info.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  assert any(part in message for part in match.split('|')) or pytest.fail(message)
  assert os.listdir(out) == []  # nothing, not even a temporary file


def test_an_int8_volume_is_data_not_an_error(run, tmp_path):
  _, npz = run
  path = _nifti(tmp_path / 'i8.nii.gz', (_body() / 8).astype(np.int8))
  translate.main(['translate', f'--npz={npz}', f'--input={path}',
                  f'--output={tmp_path / "s.nii.gz"}', '--noprogress'])
  assert nib.load(tmp_path / 's.nii.gz').shape == (24, 20, 4)


def test_allow_large_volumes_lifts_the_bounds(run, tmp_path):
  _, npz = run
  source = _make('implausible field of view', tmp_path)
  out = tmp_path / 's.nii.gz'
  translate.main(['translate', f'--npz={npz}', f'--input={source}', f'--output={out}',
                  '--noprogress', '--allow_large_volumes'])
  assert nib.load(out).shape == (24, 20, 4)


def test_unreadable_file_names_it(run, tmp_path, monkeypatch):
  """Root reads any file, so the failure is simulated where the OS would report it."""
  _, npz = run
  path = _nifti(tmp_path / 'locked.nii.gz', _body())
  real_load = nib.load

  def denied(name, *args, **kwargs):
    if os.fspath(name) == path:
      raise PermissionError(errno.EACCES, 'Permission denied', path)
    return real_load(name, *args, **kwargs)

  monkeypatch.setattr(volume.nib, 'load', denied)
  with pytest.raises(SystemExit, match=f'^error: {path}: cannot read it: Permission denied$'):
    translate.main(['translate', f'--npz={npz}', f'--input={path}',
                    f'--output={tmp_path / "s.nii.gz"}', '--noprogress'])


def test_full_disk_names_the_output_and_leaves_nothing(run, tmp_path, monkeypatch):
  _, npz = run
  path = _nifti(tmp_path / 'mr.nii.gz', _body())
  out = tmp_path / 'out'
  out.mkdir()

  class FullDisk:
    def __init__(self, name, mode, **kwargs):
      self._file = open(name, mode, **kwargs)  # pylint: disable=consider-using-with

    def write(self, data):
      raise OSError(errno.ENOSPC, 'No space left on device')

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._file.close()

  monkeypatch.setattr(atomic, 'open', FullDisk, raising=False)
  target = out / 's.nii.gz'
  with pytest.raises(SystemExit, match=f'^error: {target}: cannot write it '
                                       r'\(No space left on device\)$'):
    translate.main(['translate', f'--npz={npz}', f'--input={path}', f'--output={target}',
                    '--noprogress'])
  assert os.listdir(out) == []


def test_verbose_shows_the_traceback(run, tmp_path, capsys):
  _, npz = run
  source = _make('NaN voxels', tmp_path)
  with pytest.raises(SystemExit, match='NaN or Inf'):
    translate.main(['translate', f'--npz={npz}', f'--input={source}',
                    f'--output={tmp_path / "s.nii.gz"}', '--noprogress', '--verbose'])
  assert 'Traceback (most recent call last)' in capsys.readouterr().err


def test_prepare_skips_hostile_volumes_one_line_each(tmp_path, capsys):
  """A folder of only hostile MR volumes: one warning line per file, then one error line."""
  mr = tmp_path / 'mr'
  mr.mkdir()
  for case in ('truncated .nii.gz', 'NaN voxels', '1x1x1 volume', 'huge declared size',
               'DICOM with NaN slice positions'):
    _make(case, mr)
  os.remove(mr / 'ok.nii.gz')  # the valid source of the truncated file
  ct = tmp_path / 'ct'
  ct.mkdir()
  _nifti(ct / 'c.nii.gz', np.where(_body() > 0, 40.0, -1000.0))
  with pytest.raises(SystemExit, match='^error: --mr_dir: no usable MR volume'):
    prepare.main(['prepare', f'--mr_dir={mr}', f'--ct_dir={ct}', f'--out={tmp_path / "d"}'])
  warnings = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith('warning: ')]
  assert len(warnings) == 5, warnings
  assert not os.path.exists(tmp_path / 'd')


@pytest.mark.parametrize('override,match', [
    ('--config.train.num_steps=many', "--config.train.num_steps=many: invalid literal for int"),
    ('--config.train.num_stepz=10', "no field 'num_stepz'"),
])
def test_main_config_typo_or_wrong_type_is_one_line(tmp_path, override, match):
  result = subprocess.run([sys.executable, '-m', 'mr2ct_jax.main', '--config=configs/gc.py:test',
                           f'--workdir={tmp_path / "w"}', override], cwd=REPO,
                          capture_output=True, encoding='utf-8', timeout=300)
  assert result.returncode != 0
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith('error: ') and match in line, result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_a_long_translation_prints_its_estimate_before_it_starts(run, tmp_path, monkeypatch,
                                                                 capsys):
  _, npz = run
  path = _nifti(tmp_path / 'mr.nii.gz', _body())
  monkeypatch.setattr(translate, 'ANNOUNCE_AFTER_S', 0.0)  # every volume counts as long here
  translate.main(['translate', f'--npz={npz}', f'--input={path}',
                  f'--output={tmp_path / "s.nii.gz"}'])
  (line,) = [l for l in capsys.readouterr().err.splitlines() if 'estimated' in l]
  assert line.startswith(f'{path}: 4 slices of ') and line.endswith('(min:s) on this machine')
