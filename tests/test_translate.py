"""Whole-volume translation: geometry round trip, HU output, folders, DICOM, CLI and bad input."""

import os
import subprocess
import sys

import nibabel as nib
from nibabel import orientations
import numpy as np
import pytest
from scipy import ndimage
import SimpleITK as sitk

from mr2ct_jax import export
from mr2ct_jax.inference import generators
from mr2ct_jax import translate
from mr2ct_jax.data import volume
from mr2ct_jax.inference import slices
from mr2ct_jax.inference import volumes
import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIR = -1024


def make_run(root, config):
  """(workdir, npz): a tiny run (random weights, step 2) and its export of both generators."""
  workdir = str(root / 'run')
  tiny_run.make_workdir(workdir, config, step=2)
  npz = str(root / 'g.npz')
  export.export(workdir, npz, direction='both')
  return workdir, npz


@pytest.fixture(scope='module')
def run(tmp_path_factory, test_config):
  return make_run(tmp_path_factory.mktemp('translate'), test_config)


@pytest.fixture(scope='module')
def numpy_sct(run):
  """(apply_fn, config) of G_ct on the NumPy backend (no compilation: fast geometry tests)."""
  apply_fn, config, _ = generators.load_generator(run[1], 'mr2ct', backend='numpy')
  return apply_fn, config


def make_volume(axcodes, spacing, shape_ras, modality='mr', origin=(12.0, -30.0, 7.0)):
  """A volume stored in `axcodes` order whose body is an off-centre cone (asymmetric on every
  axis, so a wrong flip or permutation would move it).

  Returns:
    (stored array, stored affine, body mask in stored order).
  """
  nx, ny, nz = shape_ras
  x, y, z = np.meshgrid(np.arange(nx) * spacing[0], np.arange(ny) * spacing[1],
                        np.arange(nz) / max(nz - 1, 1), indexing='ij')
  cx, cy = 0.4 * (nx - 1) * spacing[0], 0.55 * (ny - 1) * spacing[1]
  rx, ry = 0.3 * nx * spacing[0] * (1 - 0.3 * z), 0.3 * ny * spacing[1] * (1 - 0.3 * z)
  body = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
  texture = np.sin(x / 9.0) * np.cos(y / 13.0)
  if modality == 'mr':
    array = np.where(body, 300.0 + 60.0 * texture, 0.0)
  else:
    array = np.where(body, 40.0 + 200.0 * (texture > 0.5), -1000.0)
  affine_ras = np.diag([*spacing, 1.0])
  affine_ras[:3, 3] = origin
  transform = orientations.ornt_transform(orientations.axcodes2ornt('RAS'),
                                          orientations.axcodes2ornt(tuple(axcodes)))
  stored = orientations.apply_orientation(array, transform)
  affine = affine_ras @ orientations.inv_ornt_aff(transform, array.shape)
  assert ''.join(nib.aff2axcodes(affine)) == axcodes
  mask = orientations.apply_orientation(body, transform)
  return stored.astype(np.float32), affine, mask.astype(bool)


def write(path, array, affine, dtype=np.float32):
  nib.save(nib.Nifti1Image(array.astype(dtype), affine), str(path))
  return str(path)


def write_dicom_series(folder, array, affine, modality='MR'):
  """Writes a stored-order array (RAS affine, axis-aligned) as a DICOM series, one file a slice."""
  os.makedirs(folder, exist_ok=True)
  image = sitk.GetImageFromArray(np.transpose(array.astype(np.int16), (2, 1, 0)))
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  lps = np.diag([-1.0, -1.0, 1.0])
  image.SetSpacing([float(s) for s in spacing])
  image.SetDirection([float(v) for v in (lps @ affine[:3, :3] / spacing).ravel()])
  image.SetOrigin([float(v) for v in lps @ affine[:3, 3]])
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  d = image.GetDirection()
  uid = '1.2.826.0.1.3680043.2.1125.7'
  for k in range(image.GetDepth()):
    sl = image[:, :, k]
    for tag, value in [('0008|0060', modality), ('0020|000e', uid), ('0020|000d', uid + '.1'),
                       ('0020|0037', '\\'.join(str(v) for v in (d[0], d[3], d[6], d[1], d[4],
                                                                d[7]))),
                       ('0020|0032', '\\'.join(str(v) for v in
                                               image.TransformIndexToPhysicalPoint((0, 0, k)))),
                       ('0020|0013', str(k + 1)), ('0008|0018', f'{uid}.{k + 1}')]:
      sl.SetMetaData(tag, value)
    writer.SetFileName(os.path.join(folder, f'im{k:03d}.dcm'))
    writer.Execute(sl)
  return str(folder)


def dice(a, b):
  return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_grid_size_covers_fov(test_config):
  spacing = test_config.data.spacing_mm  # 10 mm
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  # 40 * 7 mm = 280 mm -> 29 pixels (both ends included) -> next multiple of 4.
  assert volumes.grid_size(volume.Volume(arr, aff), spacing) == 32
  arr, aff, _ = make_volume('PIR', (3.0, 9.0, 20.0), (11, 5, 3))
  # Canonical in-plane axes are R (11 x 3 mm) and A (5 x 9 mm): at most 5 pixels -> minimum.
  assert volumes.grid_size(volume.Volume(arr, aff), spacing) == volumes.MIN_GRID
  arr, aff, _ = make_volume('LPS', (2.5, 2.5, 5.0), (230, 90, 2))
  assert volumes.grid_size(volume.Volume(arr, aff), spacing) == 60  # 57.25 -> 58 -> 60


CASES = [
    ('RAS', (7.0, 7.0, 7.0), (41, 39, 6)),     # isotropic, odd in-plane sizes
    ('LPS', (3.3, 4.1, 8.0), (63, 50, 5)),     # anisotropic, DICOM-like orientation
    ('PIR', (6.0, 5.0, 9.0), (37, 45, 7)),     # sagittal storage, slice axis not last
]


@pytest.mark.parametrize('axcodes,spacing,shape', CASES)
def test_translate_volume_keeps_geometry(numpy_sct, axcodes, spacing, shape):
  apply_fn, config = numpy_sct
  arr, aff, body = make_volume(axcodes, spacing, shape)
  out = volumes.translate_volume(volume.Volume(arr, aff, 'mem'), apply_fn, config)
  assert out.shape == arr.shape and out.dtype == np.float32
  synthetic_body = out != AIR
  # The body lands where it was (an axis flip/permutation would move the off-centre cone).
  assert dice(synthetic_body, body) > 0.92, dice(synthetic_body, body)  # flips give < 0.81
  # Far from the body, exactly air; inside, values within the CT window (the model range).
  assert np.all(out[~ndimage.binary_dilation(body, iterations=3)] == AIR)
  interior = ndimage.binary_erosion(body, iterations=2) & synthetic_body
  low, high = config.data.ct_window
  assert interior.any() and np.all((out[interior] >= low - 1e-3) & (out[interior] <= high + 1e-3))


def test_translate_volume_with_n4(numpy_sct):
  """A run trained on N4-corrected MR gets N4 at translation too (bias field removed)."""
  apply_fn, config = numpy_sct
  config = config.copy_and_resolve_references()
  config.data.n4 = True
  arr, aff, body = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  ramp = np.linspace(0.6, 1.4, arr.shape[0], dtype=np.float32)[:, None, None]
  out = volumes.translate_volume(volume.Volume(arr * ramp, aff, 'mem'), apply_fn, config)
  assert out.shape == arr.shape
  assert dice(out != AIR, body) > 0.92


def test_translate_file_writes_int16_hu_with_input_affine(run, tmp_path):
  workdir, _ = run
  arr, aff, body = make_volume('LPS', (3.3, 4.1, 8.0), (63, 50, 5))
  aff[:3, :3] = aff[:3, :3] @ _rotation(0.1)  # slightly oblique, as scanners write
  src = write(tmp_path / 'mr.nii.gz', arr, aff, np.uint16)
  out = str(tmp_path / 'sct.nii.gz')
  assert translate.translate(workdir, src, out, progress=False) == [out]
  img = nib.load(out)
  data = np.asarray(img.dataobj)
  assert data.dtype == np.int16 and data.shape == arr.shape
  np.testing.assert_allclose(img.affine, nib.load(src).affine, atol=1e-5)
  assert np.all(data[~ndimage.binary_dilation(body, iterations=3)] == AIR)
  assert dice(data != AIR, body) > 0.92
  assert [f for f in os.listdir(tmp_path) if f.endswith('.tmp') or f.startswith('.tmp')] == []
  # The space the input's affine maps to (nibabel's default for a new image: 2, aligned)
  # labels the sCT too; this affine is sheared (a rotation of anisotropic voxels), so it has
  # no qform.
  assert int(nib.load(src).header['sform_code']) == 2
  assert (int(img.header['sform_code']), int(img.header['qform_code'])) == (2, 0)


def test_an_sct_keeps_the_mni_label_of_a_registered_mr(run, tmp_path):
  workdir, _ = run
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  img = nib.Nifti1Image(arr, aff)
  img.set_sform(aff, code=4)  # MNI152
  img.set_qform(aff, code=4)
  nib.save(img, tmp_path / 'mni.nii.gz')
  out = translate.translate(workdir, str(tmp_path / 'mni.nii.gz'), str(tmp_path / 's.nii.gz'),
                            progress=False)[0]
  header = nib.load(out).header
  assert (int(header['sform_code']), int(header['qform_code'])) == (4, 4)


def _rotation(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_translate_jax_and_numpy_backends_agree(run, tmp_path):
  workdir, npz = run
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  src = write(tmp_path / 'mr.nii.gz', arr, aff)
  a = translate.translate(workdir, src, str(tmp_path / 'a.nii.gz'), progress=False)[0]
  b = translate.translate(npz, src, str(tmp_path / 'b.nii.gz'), backend='numpy',
                          progress=False)[0]
  diff = np.abs(np.asarray(nib.load(a).dataobj, np.int32) - np.asarray(nib.load(b).dataobj,
                                                                       np.int32))
  assert diff.max() <= 1  # 1e-4 in model range is < 0.1 HU; int16 rounding may differ by 1


def test_ct2mr_writes_float_mr(run, tmp_path, numpy_sct):
  _, npz = run
  arr, aff, body = make_volume('LPS', (5.0, 5.0, 6.0), (45, 41, 4), modality='ct')
  src = write(tmp_path / 'ct.nii.gz', arr, aff, np.int16)
  out = translate.translate(npz, src, str(tmp_path / 'smr.nii.gz'), direction='ct2mr',
                            backend='numpy', progress=False)[0]
  img = nib.load(out)
  data = np.asarray(img.dataobj)
  assert img.get_data_dtype() == np.float32 and data.shape == arr.shape
  np.testing.assert_allclose(img.affine, aff, atol=1e-5)
  low, high = numpy_sct[1].data.mr_window
  assert dice(data != 0, body) > 0.92
  assert np.all((data >= low - 1e-3) & (data <= high + 1e-3))


def test_output_keeps_trailing_singleton_axes(run, tmp_path):  # [X, Y, Z, 1, 1] in and out
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  src = write(tmp_path / 'mr.nii.gz', arr[..., None, None], aff)
  img = nib.load(translate.translate(run[1], src, str(tmp_path / 's.nii.gz'), backend='numpy',
                                     progress=False)[0])
  assert img.shape == arr.shape + (1, 1) and np.allclose(img.affine, aff, atol=1e-5)


def test_translate_slices_pads_last_batch_to_one_shape():
  shapes = []

  def apply_fn(batch):
    shapes.append(batch.shape)
    return batch * 0.5

  inputs = np.random.default_rng(0).uniform(-1, 1, (7, 8, 12)).astype(np.float32)
  out = slices.translate_slices(apply_fn, inputs, batch_size=3)
  np.testing.assert_allclose(out, inputs * 0.5)
  assert shapes == [(3, 8, 12, 1)] * 3
  # A batch larger than the volume runs the volume's slices only, not padded up to it.
  shapes.clear()
  out = slices.translate_slices(apply_fn, inputs, batch_size=100_000)
  np.testing.assert_allclose(out, inputs * 0.5)
  assert shapes == [(7, 8, 12, 1)]


def test_folder_input_with_nifti_and_dicom(run, tmp_path):
  workdir, _ = run
  src = tmp_path / 'in'
  src.mkdir()
  inputs = {}
  for name, (axcodes, spacing, shape) in zip(('a.nii.gz', 'b.nii'), CASES[:2]):
    arr, aff, _ = make_volume(axcodes, spacing, shape)
    write(src / name, arr, aff)
    inputs[volume.volume_id(name)] = (arr.shape, aff)
  arr, aff, _ = make_volume('LPS', (5.0, 5.0, 6.0), (40, 36, 4))
  write_dicom_series(src / 'c_dicom', arr, aff)
  inputs['c_dicom'] = (arr.shape, aff)
  (src / 'notes.txt').write_text('not a volume', encoding='utf-8')
  out_dir = tmp_path / 'out'
  written = translate.translate(workdir, str(src), str(out_dir), progress=False)
  assert sorted(os.listdir(out_dir)) == ['a.nii.gz', 'b.nii.gz', 'c_dicom.nii.gz']
  assert len(written) == 3
  for name, (shape, aff) in inputs.items():
    img = nib.load(out_dir / f'{name}.nii.gz')
    assert img.shape == shape and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, aff, atol=1e-4)
  # A single DICOM series folder with a file output.
  one = translate.translate(workdir, str(src / 'c_dicom'), str(tmp_path / 'c.nii.gz'),
                            progress=False)
  assert nib.load(one[0]).shape == inputs['c_dicom'][0]


def test_cli_workdir_and_npz(run, tmp_path, capsys):
  workdir, npz = run
  arr, aff, _ = make_volume('PIR', (6.0, 5.0, 9.0), (37, 45, 7))
  src = write(tmp_path / 'mr.nii.gz', arr, aff)
  out = str(tmp_path / 'sct.nii.gz')
  args = ['translate', f'--workdir={workdir}', f'--input={src}', f'--output={out}',
          '--step=2', '--batch_size=3', '--noprogress']
  assert translate.main(args) == 0
  assert out in capsys.readouterr().out
  first = np.asarray(nib.load(out).dataobj)
  with pytest.raises(SystemExit, match='already exists.*--overwrite'):
    translate.main(args)
  assert translate.main(['translate', f'--npz={npz}', f'--input={src}', f'--output={out}',
                         '--overwrite', '--backend=numpy', '--noprogress']) == 0
  assert np.abs(np.asarray(nib.load(out).dataobj, np.int32) - first).max() <= 1


def test_cli_subprocess(run, tmp_path):
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  src = write(tmp_path / 'mr.nii.gz', arr, aff)
  out = str(tmp_path / 'sct.nii.gz')
  result = subprocess.run(
      [sys.executable, '-m', 'mr2ct_jax.translate', f'--npz={run[1]}', f'--input={src}',
       f'--output={out}', '--backend=numpy'], capture_output=True, encoding='utf-8', timeout=300,
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert nib.load(out).shape == arr.shape


def test_flip_averaged_is_the_mean_of_g_and_its_mirrored_output():
  ramp = np.arange(4, dtype=np.float32)[None, :, None, None]  # along image axis 0 (L-R)
  lopsided = lambda x: x + ramp  # not mirror-symmetric: G(x) != flip(G(flip(x)))
  x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 5, 1)).astype(np.float32)
  np.testing.assert_allclose(slices.flip_averaged(lopsided)(x), x + 1.5, atol=1e-6)
  symmetric = lambda x: 2 * x
  np.testing.assert_allclose(slices.flip_averaged(symmetric)(x), 2 * x, atol=1e-6)


def test_the_mirror_planes_are_those_with_a_left_right_axis():
  from mr2ct_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  assert slices.LEFT_RIGHT_PLANES == tuple(
      p for p in preprocess.PLANES if preprocess.has_left_right_axis(p))


def test_load_generator_follows_eval_flip_average_and_translate_overrides_it(run, tmp_path):
  workdir, npz = run
  plain, config, info = generators.load_generator(npz, 'mr2ct', backend='numpy')
  assert not config.eval.flip_average and not info.flip_average
  mirrored, _, info = generators.load_generator(npz, 'mr2ct', backend='numpy',
                                                flip_average=True)
  assert info.flip_average
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  expected = (plain(x) + plain(x[:, ::-1].copy())[:, ::-1]) / 2
  np.testing.assert_allclose(mirrored(x), expected, atol=1e-6)
  assert np.abs(mirrored(x) - plain(x)).max() > 1e-3  # the mirror changes the output
  config.eval.flip_average = True  # as quick sets it: on unless the slices are sagittal
  assert slices.flip_average_wanted(config, 'axial') and slices.flip_average_wanted(
      config, 'coronal') and not slices.flip_average_wanted(config, 'sagittal')
  config.data.flip_lr = False  # never trained on mirrored slices: no mirrored inputs either
  assert not slices.flip_average_wanted(config, 'axial')
  # translate: --flip_average on a run whose config says off.
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  src = write(tmp_path / 'mr.nii.gz', arr, aff)
  outs = {flag: str(tmp_path / f'{flag}.nii.gz') for flag in ('flip_average', 'noflip_average')}
  for flag, out in outs.items():
    assert translate.main(['translate', f'--npz={npz}', f'--input={src}', f'--output={out}',
                           '--backend=numpy', f'--{flag}', '--noprogress']) in (0, None)
  a, b = (np.asarray(nib.load(o).dataobj) for o in outs.values())
  assert a.shape == b.shape and np.abs(a.astype(int) - b).max() > 0
