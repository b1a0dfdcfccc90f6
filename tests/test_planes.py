"""Slice planes and the recorded preprocessing: axial/coronal/sagittal slices in patient space
through prepare, the pipeline and translate; a run takes spacing, size, percentile, N4 and plane
from its dataset, records them in config.json, and translate applies them (N4 included)."""

import json
import os
import sys

import nibabel as nib
from nibabel import orientations
import numpy as np
import pytest
from scipy import ndimage

from mr2ct_jax import checkpointing
from mr2ct_jax import config_checks
from mr2ct_jax import translate
from mr2ct_jax.data import dataset
from mr2ct_jax.data import intensity
from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import pipeline
from mr2ct_jax.data import prepare
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import resolve
from mr2ct_jax.data import volume
from mr2ct_jax.data import writer
from mr2ct_jax.inference import volumes

import synthetic_volumes as synth
import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANES = ('axial', 'coronal', 'sagittal')
AIR = volumes.AIR_HU
UNSET = dict(spacing_mm=None, image_size=None, mr_percentile=None, n4=None, plane=None)


def _rotation(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _volume(codes, spacing_ras, shape_ras, oblique=0.0):
  """An MR stored in `codes` order (optionally oblique) whose body is an off-centre cone.

  Returns:
    (stored array float32, stored affine, canonical array): the canonical array is what
    `orientation.to_canonical` gives back.
  """
  idx = np.meshgrid(*[np.arange(n) / (n - 1) for n in shape_ras], indexing='ij')
  # Asymmetric along every axis, so a wrong slice axis, flip or permutation moves it.
  radius = 0.35 * (1 - 0.4 * idx[2]) * (1 - 0.3 * idx[1])
  body = (idx[0] - 0.42) ** 2 + (idx[1] - 0.55) ** 2 / 1.3 < radius ** 2
  array_ras = np.where(body, 300.0 + 80.0 * np.sin(7 * idx[0]) * np.cos(5 * idx[2]), 0.0)
  affine_ras = np.diag([*spacing_ras, 1.0])
  affine_ras[:3, 3] = (12.0, -30.0, 7.0)
  affine_ras[:3, :3] = _rotation(oblique) @ affine_ras[:3, :3]
  t = orientations.ornt_transform(orientations.axcodes2ornt('RAS'),
                                  orientations.axcodes2ornt(tuple(codes)))
  stored = orientations.apply_orientation(array_ras, t).astype(np.float32)
  affine = affine_ras @ orientations.inv_ornt_aff(t, array_ras.shape)
  assert orientation.axcodes(affine) == codes
  return stored, affine, array_ras.astype(np.float32)


def _plane_config(test_config, plane):
  config = test_config.copy_and_resolve_references()
  config.data.plane = plane
  return config


def _spacing_for(plane, spacing_mm, slice_mm):
  """RAS voxel sizes whose two in-plane axes of `plane` are `spacing_mm` (exact resampling)."""
  spacing = [spacing_mm] * 3
  spacing[preprocess.PLANE_AXES[plane][2]] = slice_mm
  return tuple(spacing)


def test_planes_agree_with_the_config_checks():
  assert preprocess.PLANES == config_checks.PLANES == PLANES


# ---- The network grid of each plane -------------------------------------------------------


@pytest.mark.parametrize('plane', PLANES)
@pytest.mark.parametrize('codes', ['LPS', 'PIR', 'ASL'])
def test_slicing_then_unslicing_is_exact(plane, codes):
  """Where spacing matches, the slices hold the voxels of the plane's RAS axes, and map back."""
  shape_ras = (13, 11, 9)
  array, affine, array_ras = _volume(codes, _spacing_for(plane, 2.0, 3.5), shape_ras)
  vol = volume.Volume(array, affine, 'v.nii.gz')
  slices, geom = preprocess.to_network_grid(vol, 2.0, 16, plane=plane)
  axes = preprocess.PLANE_AXES[plane]
  assert slices.shape == (shape_ras[axes[2]], 16, 16) and geom.zoom == (1.0, 1.0)
  # Slice k is canonical index k along the plane's patient axis (S, A or R).
  ox, oy = -geom.offset[0], -geom.offset[1]
  expected = np.transpose(array_ras, (axes[2], axes[0], axes[1]))
  np.testing.assert_array_equal(slices[:, ox:ox + expected.shape[1], oy:oy + expected.shape[2]],
                                expected)
  geom = preprocess.SliceGeometry.from_dict(json.loads(json.dumps(geom.to_dict())))
  assert geom.plane == plane
  np.testing.assert_array_equal(preprocess.from_network_grid(slices, geom), array)


@pytest.mark.parametrize('plane', PLANES)
def test_network_affine_places_each_plane_in_world_space(plane):
  """With resampling: network pixel values equal a world function at network_affine's points."""
  def world_f(xyz):
    return np.sin(xyz[..., 0] / 12.0) * 100 + np.cos(xyz[..., 1] / 15.0) * 80 + xyz[..., 2]

  shape_ras, spacing = (30, 26, 22), (1.1, 0.9, 1.3)
  affine_ras = np.diag([*spacing, 1.0])
  affine_ras[:3, 3] = (-20.0, 15.0, -40.0)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape_ras], indexing='ij'), -1)
  array_ras = world_f(idx @ affine_ras[:3, :3].T + affine_ras[:3, 3]).astype(np.float32)
  t = orientations.ornt_transform(orientations.axcodes2ornt('RAS'),
                                  orientations.axcodes2ornt(('P', 'I', 'R')))
  array = orientations.apply_orientation(array_ras, t)
  affine = affine_ras @ orientations.inv_ornt_aff(t, shape_ras)
  slices, geom = preprocess.to_network_grid(volume.Volume(array, affine), 1.25, 24,
                                            pad_value=-999, plane=plane)
  net = geom.network_affine()
  grid = np.stack(np.meshgrid(np.arange(24), np.arange(24), np.arange(geom.num_slices),
                              indexing='ij'), -1)
  want = np.transpose(world_f(grid @ net[:3, :3].T + net[:3, 3]), (2, 0, 1))
  valid = geom.valid_mask()
  # Inside the volume (the last resampled row/column may be edge-extended: tolerance).
  inner = valid & (np.abs(slices - want) < 5)
  assert inner.sum() > 0.9 * valid.sum()
  np.testing.assert_allclose(np.linalg.norm(net[:3, :2], axis=0), 1.25)
  np.testing.assert_allclose(np.linalg.norm(net[:3, 2]), spacing[preprocess.PLANE_AXES[plane][2]])


# ---- Translate ------------------------------------------------------------------------------


@pytest.mark.parametrize('plane', PLANES)
@pytest.mark.parametrize('codes,oblique', [('LPS', 0.12), ('PIR', 0.0)])
def test_each_plane_round_trips_geometry_through_translate(test_config, plane, codes, oblique):
  """An identity generator gives back the input's voxels (windowed): exact geometry."""
  config = _plane_config(test_config, plane)
  spacing = float(config.data.spacing_mm)
  array, affine, _ = _volume(codes, _spacing_for(plane, spacing, 7.0), (9, 8, 7), oblique)
  vol = volume.Volume(array, affine, 'mem')
  seen = []

  def identity(batch):
    seen.append(batch.shape[0])
    return batch

  out = volumes.translate_volume(vol, identity, config, batch_size=64)
  assert out.shape == array.shape and out.dtype == np.float32
  _, shape = preprocess.plane_voxels(affine, array.shape, plane)
  assert seen == [shape[2]]  # one slice per voxel along the plane's patient axis
  body = mask_lib.body_mask(array, modality='mr')
  mr = intensity.normalise_mr(array, body, config.data.mr_percentile)
  want = intensity.model_to_ct_hu(intensity.mr_to_model(mr, config.data.mr_window),
                                  config.data.ct_window)
  np.testing.assert_allclose(out, np.where(body, want, AIR), atol=1e-3)


@pytest.mark.parametrize('plane', PLANES)
def test_translate_slices_along_the_planes_patient_axis(test_config, plane):
  """A generator that paints slice k with value k: the sCT varies only along S, A or R."""
  config = _plane_config(test_config, plane)
  array, affine, _ = _volume('LPS', (10.0, 10.0, 10.0), (9, 8, 7))
  count = [0]

  def paint(batch):
    values = -0.9 + 0.05 * (count[0] + np.arange(batch.shape[0], dtype=np.float32))
    count[0] += batch.shape[0]
    return np.broadcast_to(values[:, None, None, None], batch.shape).astype(np.float32)

  out = volumes.translate_volume(volume.Volume(array, affine, 'mem'), paint, config,
                                 batch_size=64)
  out_ras, _, _ = orientation.to_canonical((out, affine))
  axis = preprocess.PLANE_AXES[plane][2]
  for k in range(out_ras.shape[axis]):
    values = np.unique(np.take(out_ras, k, axis=axis))
    values = values[values != AIR]
    want = intensity.model_to_ct_hu(np.float32(-0.9 + 0.05 * k), config.data.ct_window)
    np.testing.assert_allclose(values, want, atol=1e-3)


def test_translate_writes_each_plane_on_the_inputs_voxels(test_config, tmp_path):
  """The command: a sagittal run's sCT NIfTI has the input's shape and (oblique) affine."""
  config = _plane_config(test_config, 'sagittal')
  workdir = str(tmp_path / 'run')
  tiny_run.make_workdir(workdir, config, step=2)
  array, affine, _ = _volume('LPS', (10.0, 8.0, 6.0), (9, 8, 7), oblique=0.1)
  src = str(tmp_path / 'mr.nii.gz')
  nib.save(nib.Nifti1Image(array, affine), src)
  out = translate.translate(workdir, src, str(tmp_path / 'sct.nii.gz'), backend='numpy',
                            progress=False)[0]
  img = nib.load(out)
  assert img.shape == array.shape
  np.testing.assert_allclose(img.affine, nib.load(src).affine, atol=1e-5)
  data = np.asarray(img.dataobj)
  body = mask_lib.body_mask(array, modality='mr')
  # Resampled in-plane (8 and 6 mm voxels, 10 mm pixels): the edge may move by a voxel.
  assert np.all(data[~ndimage.binary_dilation(body)] == AIR)
  assert np.all(data[ndimage.binary_erosion(body)] != AIR)


# ---- Prepared datasets of each plane --------------------------------------------------------


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  return synth.make(str(tmp_path_factory.mktemp('raw')), num_mr=1, num_ct=2, num_labeled=0,
                    num_test=1)


@pytest.fixture(scope='module')
def sagittal_dir(raw, tmp_path_factory, test_config):
  """Prepared by the command with --plane=sagittal and --n4 (the test config says neither)."""
  out = str(tmp_path_factory.mktemp('sag') / 'data')
  argv = ['prepare', f'--config={REPO}/configs/gc.py:test', f'--mr_dir={raw[0]}',
          f'--ct_dir={raw[1]}', f'--paired_dir={raw[3]}', f'--out={out}', '--plane=sagittal',
          '--n4']
  old = sys.argv
  sys.argv = argv  # ml_collections reads --config overrides from sys.argv
  try:
    assert prepare.main(argv) == 0
  finally:
    sys.argv = old
  return out


@pytest.fixture(scope='module')
def coronal_dir(raw, tmp_path_factory):
  return writer.prepare(raw[0], raw[1], str(tmp_path_factory.mktemp('cor') / 'data'),
                        paired_dir=raw[3], spacing_mm=5.0, image_size=32, mr_percentile=99.5, n4=False,
                        plane='coronal')


def test_prepare_records_the_plane_and_slices_in_it(coronal_dir, sagittal_dir, raw):
  for data_dir, plane, n4 in ((coronal_dir, 'coronal', False), (sagittal_dir, 'sagittal', True)):
    meta = dataset.load_meta(data_dir)
    assert dataset.preprocessing(meta) == {'spacing_mm': 5.0 if plane == 'coronal' else 10.0,
                                           'image_size': 32, 'mr_percentile': 99.5,
                                           'n4': n4, 'plane': plane}
    vol = volume.read_volume(os.path.join(raw[1], 'ct1.nii.gz'))
    (ct1,) = [v for v in dataset.iterate_volumes(data_dir, 'train_ct')
              if v['patient_id'] == 'ct1']
    geom = dataset.load_geometry(data_dir, 'ct1', 'train_ct')
    _, shape = preprocess.plane_voxels(vol.affine, vol.array.shape, plane)
    assert geom.plane == plane and ct1['image'].shape == (shape[2], 32, 32)
    expected, _ = preprocess.to_network_grid(vol, geom.spacing_mm, 32, plane=plane)
    np.testing.assert_array_equal(ct1['image'], expected)


@pytest.mark.parametrize('plane', ['coronal', 'sagittal'])
def test_test_mask_leaves_out_the_cts_missing_s_levels(coronal_dir, sagittal_dir, plane):
  """The registered CT ends one S level early: those voxels are outside the test mask."""
  data_dir = coronal_dir if plane == 'coronal' else sagittal_dir
  (t0,) = list(dataset.iterate_volumes(data_dir, 'test'))
  geom = dataset.load_geometry(data_dir, 't0', 'test')
  mask = preprocess.from_network_grid(t0['mask'].astype(np.float32), geom) >= 0.5
  assert mask.shape == synth.SHAPE  # stored RAS: the last axis is S
  assert not mask[:, :, -1].any() and mask[:, :, :-1].any(axis=(0, 1)).all()


def test_old_datasets_and_geometry_read_as_axial():
  meta = {'spacing_mm': 2, 'image_size': 64, 'mr_percentile': 99, 'n4': False}
  assert dataset.preprocessing(meta)['plane'] == 'axial'
  vol = volume.Volume(np.zeros((4, 5, 3), np.float32), np.eye(4))
  d = preprocess.to_network_grid(vol, 1.0, 8)[1].to_dict()
  del d['plane']
  assert preprocess.SliceGeometry.from_dict(d).plane == 'axial'


def _batches(config, data_dir, count=6):
  config = config.copy_and_resolve_references()
  config.data.update(UNSET)
  config.data.crop_pad_fraction = 0.0
  config.data.flip_lr = True
  config.data.prefetch = 0
  with pipeline.make_unpaired_iterator(config, data_dir, process_index=0,
                                       process_count=1) as it:
    return [next(it)['mr'][..., 0] for _ in range(count)]


@pytest.mark.parametrize('plane', ['coronal', 'sagittal'])
def test_pipeline_flips_only_left_right_axes(test_config, coronal_dir, sagittal_dir, plane):
  data_dir = coronal_dir if plane == 'coronal' else sagittal_dir
  stored = [intensity.mr_to_model(v['image'], test_config.data.mr_window)
            for v in dataset.iterate_volumes(data_dir, 'train_mr')]
  stored = np.concatenate(stored)
  flipped = 0
  for batch in _batches(test_config, data_dir):
    for image in batch:
      as_is = np.any(np.all(stored == image, axis=(1, 2)))
      mirrored = np.any(np.all(stored == image[::-1], axis=(1, 2)))
      assert as_is or mirrored
      flipped += int(not as_is)
  if plane == 'sagittal':
    assert flipped == 0  # mirroring would swap anterior and posterior
  else:
    assert flipped > 0


# ---- The run takes its preprocessing from the dataset -------------------------------------


class _Stop(Exception):
  pass


def _start_run(monkeypatch, config, workdir):
  """loop.train up to the input pipeline (config.json is written by then), then stop."""
  from mr2ct_jax.training import loop  # pylint: disable=g-import-not-at-top

  def stop(*args, **kwargs):
    raise _Stop()

  monkeypatch.setattr(loop.pipeline, 'make_unpaired_iterator', stop)
  with pytest.raises(_Stop):
    loop.train(config, workdir)
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE), encoding='utf-8') as f:
    return json.load(f)['data']


def test_run_records_the_datasets_preprocessing_and_translate_applies_n4(
    test_config, sagittal_dir, raw, tmp_path, monkeypatch):
  config = test_config.copy_and_resolve_references()
  config.data.update(UNSET)
  config.data.dir = sagittal_dir
  workdir = str(tmp_path / 'run')
  recorded = _start_run(monkeypatch, config, workdir)
  assert {k: recorded[k] for k in UNSET} == {'spacing_mm': 10.0, 'image_size': 32,
                                              'mr_percentile': 99.5, 'n4': True,
                                              'plane': 'sagittal'}
  # The recorded run translates new MR with N4 and sagittal slices.
  tiny_run.make_workdir(workdir, checkpointing.load_config(workdir), step=2)
  calls = []
  real_n4 = preprocess.n4_correct
  monkeypatch.setattr(preprocess, 'n4_correct', lambda vol: calls.append(vol.path) or
                      real_n4(vol))
  src = os.path.join(raw[0], 'mr0.nii.gz')
  out = translate.translate(workdir, src, str(tmp_path / 'sct.nii.gz'), backend='numpy',
                            progress=False)[0]
  assert calls == [src]
  assert nib.load(out).shape == nib.load(src).shape
  np.testing.assert_allclose(nib.load(out).affine, nib.load(src).affine, atol=1e-5)


@pytest.mark.parametrize('key,value,message', [
    ('n4', False, 'prepared with n4=True but config.data.n4=False'),
    ('plane', 'axial', "prepared with plane=sagittal but config.data.plane=axial"),
    ('spacing_mm', 5.0, 'prepared with spacing_mm=10.0 but config.data.spacing_mm=5.0'),
])
def test_an_explicit_value_unlike_the_dataset_is_a_one_line_error(
    test_config, sagittal_dir, tmp_path, monkeypatch, key, value, message):
  config = test_config.copy_and_resolve_references()
  config.data.update(UNSET)
  config.data[key] = value
  config.data.dir = sagittal_dir
  with pytest.raises(dataset.DatasetError) as exc:
    _start_run(monkeypatch, config, str(tmp_path / 'run'))
  text = str(exc.value)
  assert text.startswith(f'{sagittal_dir}: {message}') and '\n' not in text
  assert not os.path.exists(tmp_path / 'run' / checkpointing.CONFIG_FILE)


def test_settings_mismatch_compares_every_preprocessing_value(test_config, sagittal_dir):
  config = test_config.copy_and_resolve_references()
  config.data.update(UNSET)
  filled = resolve.resolve_preprocessing(config, sagittal_dir)
  assert dataset.settings_mismatch(sagittal_dir, filled) is None
  for key, other in (('spacing_mm', 5.0), ('image_size', 64), ('mr_percentile', 99.0),
                     ('n4', False), ('plane', 'coronal')):
    changed = filled.copy_and_resolve_references()
    changed.data[key] = other
    assert f'data.{key}={other}' in dataset.settings_mismatch(sagittal_dir, changed)
  # A run config written before planes existed sliced axially.
  old = filled.copy_and_resolve_references().to_dict()
  del old['data']['plane']
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert 'data.plane=axial' in dataset.settings_mismatch(sagittal_dir,
                                                         ml_collections.ConfigDict(old))


def test_phantom_and_prepare_use_the_defaults_for_unset_fields(test_config):
  sys.path.insert(0, REPO)
  from configs import gc  # pylint: disable=g-import-not-at-top
  assert writer.preparation_settings(gc.get_config('quick')) == {
      'spacing_mm': 320.0 / 96, 'image_size': 96, 'mr_percentile': 99.5, 'n4': False,
      'plane': 'axial'}
  assert writer.preparation_settings(gc.get_config())['image_size'] == 256
  config = test_config.copy_and_resolve_references()
  config.data.plane = 'coronal'  # a set field wins over prepare_defaults
  assert writer.preparation_settings(config)['plane'] == 'coronal'
