"""translate --output_format=dicom: the CT series read back with SimpleITK matches the NIfTI."""

import os
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mr2ct_jax import translate
from mr2ct_jax.data import dicom_write
from mr2ct_jax.data import volume
from test_translate import make_run, make_volume, write, write_dicom_series

UID = re.compile(r'^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$')


@pytest.fixture(scope='module')
def npz(tmp_path_factory, test_config):
  return make_run(tmp_path_factory.mktemp('translate_dicom'), test_config)[1]


def _rotation(axis, angle):
  c, s = np.cos(angle), np.sin(angle)
  i, j = [a for a in range(3) if a != axis]
  rot = np.eye(3)
  rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
  return rot


def read_series(folder):
  """(image, per-file tag dicts in slice order) of the one series in `folder`."""
  ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
  assert len(ids) == 1
  files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0])
  assert len(files) == len(os.listdir(folder))
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(files)
  tags = []
  for path in files:
    one = sitk.ImageFileReader()
    one.SetFileName(path)
    one.ReadImageInformation()
    tags.append({k: one.GetMetaData(k).strip(' \0') for k in one.GetMetaDataKeys()})
  return reader.Execute(), tags


def expected_image(nifti_path):
  """The NIfTI output as ITK sees it (ITK converts RAS to LPS itself), right-handed like DICOM."""
  image = sitk.ReadImage(nifti_path)
  direction = np.asarray(image.GetDirection()).reshape(3, 3)
  if np.linalg.det(direction) > 0:
    return image
  # A DICOM series runs along row x column: the same voxels, the slice axis reversed.
  flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[::-1])
  flipped.SetSpacing(image.GetSpacing())
  flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetDepth() - 1)))
  flipped.SetDirection((direction * [1, 1, -1]).ravel().tolist())
  return flipped


# (stored axes, spacing, RAS shape, rotation): axial, sagittal storage (permuted axes),
# left-handed (flipped slice axis), and oblique (rotated about two axes).
GEOMETRIES = [
    ('LPS', (3.3, 4.1, 8.0), (63, 50, 5), None),
    ('PIR', (6.0, 5.0, 9.0), (37, 45, 7), None),
    ('RAI', (5.5, 6.5, 7.0), (41, 39, 6), None),
    ('LPS', (4.0, 4.5, 6.0), (50, 44, 5), _rotation(0, 0.2) @ _rotation(2, 0.3)),
]


@pytest.mark.parametrize('axcodes,spacing,shape,rotation', GEOMETRIES)
def test_dicom_series_has_the_geometry_and_hu_of_the_nifti_output(npz, tmp_path, axcodes,
                                                                  spacing, shape, rotation):
  arr, aff, _ = make_volume(axcodes, spacing, shape)
  if rotation is not None:
    aff[:3, :3] = rotation @ aff[:3, :3]
  src = write(tmp_path / 'p07.nii.gz', arr, aff)
  nifti = translate.translate(npz, src, str(tmp_path / 'sct.nii.gz'), backend='numpy',
                              progress=False)[0]
  out = str(tmp_path / 'dicom')
  assert translate.translate(npz, src, out, backend='numpy', progress=False,
                             output_format='dicom') == [os.path.join(out, 'p07_sct')]
  assert os.listdir(out) == ['p07_sct']  # no temporary folder left behind
  image, tags = read_series(os.path.join(out, 'p07_sct'))
  want = expected_image(nifti)
  assert image.GetSize() == want.GetSize()
  # Within the float32 of the NIfTI header (a wrong LPS sign or flip is off by millimetres).
  np.testing.assert_allclose(image.GetSpacing(), want.GetSpacing(), rtol=1e-6)
  np.testing.assert_allclose(image.GetOrigin(), want.GetOrigin(), atol=1e-4)
  np.testing.assert_allclose(image.GetDirection(), want.GetDirection(), atol=1e-6)
  got_hu = sitk.GetArrayFromImage(image).astype(np.float64)
  want_hu = sitk.GetArrayFromImage(want).astype(np.float64)
  slope = float(tags[0]['0028|1053'])
  assert np.max(np.abs(got_hu - want_hu)) <= 0.5 + slope
  np.testing.assert_array_equal(got_hu, want_hu)  # integer HU and slope 1: exactly equal
  assert len(np.unique(want_hu)) > 5  # a real image, not all air
  # The project's own DICOM reader gives back the NIfTI output's voxels in RAS (same world).
  back = volume.read_volume(os.path.join(out, 'p07_sct'))
  ref = nib.load(nifti)
  back_img = nib.as_closest_canonical(nib.Nifti1Image(back.array, back.affine))
  ref_img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(ref.dataobj, np.float32),
                                                     ref.affine))
  np.testing.assert_allclose(back_img.affine, ref_img.affine, atol=1e-4)
  np.testing.assert_array_equal(back_img.get_fdata(), ref_img.get_fdata())


def test_tags_uids_and_slice_geometry(npz, tmp_path):
  arr, aff, _ = make_volume('PIR', (6.0, 5.0, 9.0), (37, 45, 7))
  src = write(tmp_path / 'p09_mr.nii.gz', arr, aff)
  out = str(tmp_path / 'out')
  folder = translate.translate(npz, src, out, backend='numpy', progress=False,
                               output_format='dicom')[0]
  assert folder == os.path.join(out, 'p09_mr_sct')
  image, tags = read_series(folder)
  assert len(tags) == arr.shape[2] == 37  # one file a slice along the stored third axis
  for k, t in enumerate(tags):
    assert t['0008|0060'] == 'CT' and t['0008|0016'] == dicom_write.CT_IMAGE_STORAGE
    assert (t['0028|1052'], t['0028|1053'], t['0028|1054']) == ('-1024', '1', 'HU')
    assert (t['0010|0020'], t['0010|0010']) == ('p09_mr', 'p09_mr')
    assert t['0020|0013'] == str(k + 1)
    assert (t['0028|0100'], t['0028|0103']) == ('16', '1')  # int16 pixels
    # Sagittal storage 'PIR': columns run P (LPS +y), rows I (LPS -z), slices R (LPS -x)...
    np.testing.assert_allclose([float(v) for v in t['0020|0037'].split('\\')],
                               [0, 1, 0, 0, 0, -1], atol=1e-12)
    # ... so PixelSpacing is row spacing (I: 9 mm), column spacing (P: 5 mm); slices 6 mm.
    assert [float(v) for v in t['0028|0030'].split('\\')] == [9.0, 5.0]
    assert float(t['0018|0050']) == float(t['0018|0088']) == 6.0
    position = [float(v) for v in t['0020|0032'].split('\\')]
    np.testing.assert_allclose(position, image.TransformIndexToPhysicalPoint((0, 0, k)),
                               atol=1e-6)
    assert all(len(v) <= 16 for v in t['0020|0032'].split('\\'))  # VR DS
  uids = {tag: {t[tag] for t in tags} for tag in ('0020|000d', '0020|000e', '0020|0052',
                                                  '0008|0018')}
  assert [len(uids[tag]) for tag in ('0020|000d', '0020|000e', '0020|0052')] == [1, 1, 1]
  assert len(uids['0008|0018']) == len(tags)  # one SOP instance per slice
  every = set().union(*uids.values())
  assert len(every) == 3 + len(tags)
  assert all(UID.match(u) and len(u) <= 64 for u in every), sorted(every)[:3]
  # A second translation of the same volume is a new study and series.
  again = translate.translate(npz, src, str(tmp_path / 'again'), backend='numpy', progress=False,
                              output_format='dicom')[0]
  _, tags2 = read_series(again)
  assert not every & {t[tag] for t in tags2 for tag in uids}


MR_FRAME_OF_REFERENCE = '1.2.826.0.1.3680043.2.1125.7.99'


def test_dicom_input_lends_patient_and_study_tags(npz, tmp_path):
  arr, aff, _ = make_volume('LPS', (5.0, 5.0, 6.0), (40, 36, 4))
  src = write_dicom_series(tmp_path / 'mr_series', arr, aff)
  for name in os.listdir(src):  # add patient and study tags to every MR slice
    path = os.path.join(src, name)
    image = sitk.ReadImage(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    for key in reader.GetMetaDataKeys():
      image.SetMetaData(key, reader.GetMetaData(key))
    for key, value in (('0010|0020', 'HIP-0042'), ('0010|0010', 'Doe^Jane'),
                       ('0008|1030', 'Pelvis MR'), ('0008|0020', '20240131'),
                       ('0018|5100', 'HFS'), ('0020|0052', MR_FRAME_OF_REFERENCE)):
      image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(path)
    writer.Execute(image)
  mr_study = dicom_write.source_tags(src)
  assert mr_study['0010|0020'] == 'HIP-0042'
  folder = translate.translate(npz, src, str(tmp_path / 'out'), backend='numpy', progress=False,
                               output_format='dicom')[0]
  assert folder == str(tmp_path / 'out' / 'mr_series_sct')
  _, tags = read_series(folder)
  for key, value in (('0010|0020', 'HIP-0042'), ('0010|0010', 'Doe^Jane'),
                     ('0008|1030', 'Pelvis MR'), ('0008|0020', '20240131'),
                     ('0018|5100', 'HFS'), ('0008|0060', 'CT'),
                     ('0020|0052', MR_FRAME_OF_REFERENCE)):  # one frame: overlays register
    assert all(t[key] == value for t in tags), key
  assert tags[0]['0020|000d'] != '1.2.826.0.1.3680043.2.1125.7.1'  # a new study UID
  assert tags[0]['0020|000e'] != '1.2.826.0.1.3680043.2.1125.7'


def test_cli_folder_overwrite_and_bad_requests(npz, tmp_path, capsys):
  src = tmp_path / 'in'
  src.mkdir()
  for name, (axcodes, spacing, shape, _) in zip(('a.nii.gz', 'b.nii'), GEOMETRIES[:2]):
    arr, aff, _ = make_volume(axcodes, spacing, shape)
    write(src / name, arr, aff)
  out = tmp_path / 'out'
  args = ['translate', f'--npz={npz}', '--backend=numpy', f'--input={src}', f'--output={out}',
          '--output_format=dicom', '--noprogress']
  assert translate.main(args) == 0
  assert 'wrote 2 volume(s)' in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ['a_sct', 'b_sct']
  assert sorted(os.listdir(out / 'a_sct')) == [f'{k:04d}.dcm' for k in range(1, 6)]
  with pytest.raises(SystemExit, match=r'a_sct: already exists \(pass --overwrite'):
    translate.main(args)
  assert translate.main(args + ['--skip_existing']) == 0
  assert 'nothing to do' in capsys.readouterr().out
  assert translate.main(args + ['--overwrite']) == 0
  assert sorted(os.listdir(out)) == ['a_sct', 'b_sct']
  # --overwrite never deletes a folder that is not a DICOM series.
  (out / 'a_sct').rename(out / 'kept')
  (out / 'a_sct').mkdir()
  (out / 'a_sct' / 'notes.txt').write_text('mine', encoding='utf-8')
  with pytest.raises(SystemExit, match='a_sct: not a DICOM series folder; refusing'):
    translate.main(args + ['--overwrite'])
  assert os.listdir(out / 'a_sct') == ['notes.txt']
  one = str(src / 'a.nii.gz')
  with pytest.raises(SystemExit, match='sct.nii.gz: --output_format=dicom writes series folders'):
    translate.main(args[:3] + [f'--input={one}', f'--output={tmp_path / "sct.nii.gz"}',
                               '--output_format=dicom'])
  with pytest.raises(SystemExit, match='writes synthetic CT only'):
    translate.main(args + ['--direction=ct2mr', f'--output={tmp_path / "smr"}'])


def test_sheared_affine_is_refused_before_translating(npz, tmp_path):
  arr, aff, _ = make_volume('RAS', (7.0, 7.0, 7.0), (41, 39, 6))
  aff[0, 1] = 2.0  # x depends on j: voxel axes not orthogonal
  src = write(tmp_path / 'shear.nii.gz', arr, aff)
  with pytest.raises(volume.VolumeError, match=r'shear.nii.gz: the affine is sheared'):
    translate.translate(npz, src, str(tmp_path / 'out'), backend='numpy', progress=False,
                        output_format='dicom')
  assert not os.path.exists(tmp_path / 'out' / 'shear_sct')


@pytest.mark.parametrize('output_format', ['nifti', 'dicom'])
def test_two_inputs_with_one_output_name_are_refused_in_both_formats(tmp_path, output_format):
  src = tmp_path / 'in'
  src.mkdir()
  arr, aff, _ = make_volume(*GEOMETRIES[0][:3])
  write(src / 'a.nii.gz', arr, aff)
  write(src / 'a.nii', arr, aff)
  with pytest.raises(translate.TranslateError, match='two inputs map to this output name'):
    translate.plan(str(src), str(tmp_path / 'out'), output_format=output_format)
  assert not (tmp_path / 'out').exists()


def test_a_non_ascii_name_is_written_with_the_utf8_character_set(npz, tmp_path):
  arr, aff, _ = make_volume(*GEOMETRIES[0][:3])
  out = str(tmp_path / 'out')
  plain = translate.translate(npz, write(tmp_path / 'p10.nii.gz', arr, aff), out,
                              backend='numpy', progress=False, output_format='dicom')[0]
  assert all('0008|0005' not in t for t in read_series(plain)[1])  # ASCII: the default set
  named = translate.translate(npz, write(tmp_path / 'p10_ü.nii.gz', arr, aff), out,
                              backend='numpy', progress=False, output_format='dicom')[0]
  for t in read_series(named)[1]:
    assert t['0008|0005'] == dicom_write.UTF8_CHARACTER_SET
    assert t['0010|0020'] == t['0010|0010'] == 'p10_ü'


def test_a_copied_character_set_keeps_our_own_strings_ascii(tmp_path):
  # A DICOM input's names come in its own character set (here Latin-1, ISO_IR 100); the
  # strings we add (the series description, the ids from the folder name) must not be UTF-8.
  arr, aff, _ = make_volume(*GEOMETRIES[0][:3])
  folder = tmp_path / 'series'
  folder.mkdir()
  dicom_write.write_ct_series(str(folder), np.zeros(arr.shape), aff, 'pü',
                              tags={'0008|0005': 'ISO_IR 100'})
  for t in read_series(str(folder))[1]:
    assert t['0008|0005'] == 'ISO_IR 100'
    assert t['0010|0020'] == 'p?' and t['0008|103e'] == 'Synthetic CT from p?'
