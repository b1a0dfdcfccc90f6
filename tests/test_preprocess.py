"""Orientation round trips, the network grid and its inverse, body masks and N4."""

import json
import time

import numpy as np
from nibabel import orientations
import pytest

from mr2ct_jax.data import mask as mask_lib
from mr2ct_jax.data import orientation
from mr2ct_jax.data import preprocess
from mr2ct_jax.data import volume


def _stored(array_ras, affine_ras, codes):
  """The same volume stored in the orientation `codes` (e.g. 'LPS')."""
  t = orientations.ornt_transform(orientations.axcodes2ornt('RAS'),
                                  orientations.axcodes2ornt(tuple(codes)))
  return (orientations.apply_orientation(array_ras, t),
          affine_ras @ orientations.inv_ornt_aff(t, array_ras.shape))


def _ras_affine(spacing, origin=(-20.0, 15.0, -40.0)):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _world_function(affine, shape):
  """A smooth function of world (mm) coordinates sampled on a voxel grid."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  xyz = idx @ affine[:3, :3].T + affine[:3, 3]
  return _f(xyz)


def _f(xyz):
  return (np.sin(xyz[..., 0] / 12.0) + np.cos(xyz[..., 1] / 15.0) + xyz[..., 2] / 40.0) * 100


# ---- Orientation -------------------------------------------------------------------------

@pytest.mark.parametrize('codes', ['RAS', 'LPS', 'PIR', 'ASL', 'SRA', 'ILP', 'LAI'])
def test_orientation_round_trip(codes):
  array_ras = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
  affine_ras = _ras_affine((0.9, 1.1, 2.5))
  array, affine = _stored(array_ras, affine_ras, codes)
  assert orientation.axcodes(affine) == codes
  vol = volume.Volume(array, affine, 'v.nii.gz')
  got_array, got_affine, ornt = orientation.to_canonical(vol)
  np.testing.assert_array_equal(got_array, array_ras)
  np.testing.assert_allclose(got_affine, affine_ras, atol=1e-12)
  back = orientation.from_canonical(got_array, ornt)
  assert back.shape == array.shape
  np.testing.assert_array_equal(back, array)
  np.testing.assert_allclose(orientation.from_canonical_affine(got_affine, ornt, got_array.shape),
                             affine, atol=1e-12)


def test_orientation_round_trip_through_file(tmp_path):
  array_ras = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  array, affine = _stored(array_ras, _ras_affine((0.5, 0.75, 3.0)), 'PIL')
  vol = volume.read_volume(volume.write_nifti(str(tmp_path / 'p.nii.gz'), array, affine,
                                              np.float32))
  got, got_affine, ornt = orientation.to_canonical(vol)
  np.testing.assert_array_equal(got, array_ras)
  np.testing.assert_allclose(got_affine, _ras_affine((0.5, 0.75, 3.0)), atol=1e-5)
  np.testing.assert_array_equal(orientation.from_canonical(got, ornt), vol.array)


def test_oblique_affine_is_permutation_only():
  c, s = np.cos(0.3), np.sin(0.3)
  affine = np.array([[0, 0, -2.0 * c, 5], [s, c, 0, 1], [c, -s, 0, 2], [0, 0, 0, 1]])
  array = np.random.default_rng(2).normal(size=(3, 4, 5))
  got, got_affine, ornt = orientation.to_canonical((array, affine))
  assert orientation.axcodes(got_affine) == 'RAS'
  np.testing.assert_array_equal(orientation.from_canonical(got, ornt), array)
  np.testing.assert_allclose(orientation.from_canonical_affine(got_affine, ornt, got.shape),
                             affine, atol=1e-12)


# ---- Network grid ------------------------------------------------------------------------

@pytest.mark.parametrize('codes,spacing,shape,size', [
    ('LPS', (0.9, 1.1, 3.0), (40, 36, 5), 32),   # padded
    ('PIR', (1.0, 0.8, 1.5), (30, 4, 33), 16),   # cropped (canonical in-plane 30 x 33)
    ('ASL', (2.0, 1.0, 1.5), (21, 7, 14), 24),   # upsampled in-plane, odd sizes
])
def test_network_grid_geometry_and_round_trip(codes, spacing, shape, size):
  to_ras = orientations.ornt_transform(orientations.axcodes2ornt(tuple(codes)),
                                       orientations.axcodes2ornt('RAS'))
  canonical_shape = orientations.apply_orientation(np.zeros(shape), to_ras).shape
  affine_ras = _ras_affine(spacing)
  array_ras = _world_function(affine_ras, canonical_shape).astype(np.float32)
  array, affine = _stored(array_ras, affine_ras, codes)
  assert array.shape == shape
  vol = volume.Volume(array, affine, 'v.nii.gz')

  slices, geom = preprocess.to_network_grid(vol, spacing_mm=1.25, size=size, pad_value=-999)
  assert slices.shape == (canonical_shape[2], size, size) and slices.dtype == np.float32
  # Every network pixel inside the volume holds f at its own world position (network_affine)
  # (the last resampled row/column may reach past the last voxel centre: edge-extended).
  valid = geom.valid_mask()
  inner = [(np.arange(size) + o) * z <= n - 1 + 1e-9
           for o, z, n in zip(geom.offset, geom.zoom, canonical_shape)]
  inner = valid & (inner[0][:, None] & inner[1][None, :])[None]
  assert inner.sum() > 0.9 * valid.sum()
  net_xyz = _world_function(geom.network_affine(), (size, size, geom.num_slices))
  net_xyz = np.transpose(net_xyz, (2, 0, 1))
  np.testing.assert_allclose(slices[inner], net_xyz[inner], atol=0.5)  # f spans ~±300
  np.testing.assert_array_equal(slices[~valid], -999)
  np.testing.assert_allclose(np.linalg.norm(geom.network_affine()[:3, :2], axis=0), 1.25)

  geom = preprocess.SliceGeometry.from_dict(json.loads(json.dumps(geom.to_dict())))
  back = preprocess.from_network_grid(slices, geom, fill=-5000)
  assert back.shape == shape and back.dtype == np.float32
  inside = back != -5000
  assert inside.mean() > 0.25
  # Values inside the window come back up to the error of two linear resamplings (f spans
  # ~±300; the last row/column, edge-extended, is worst).
  np.testing.assert_allclose(back[inside], array[inside], atol=2.0)
  if min(geom.offset) >= 0:  # cropped: some of the original is outside the window
    assert not inside.all()


def test_network_grid_exact_when_spacing_matches():
  array_ras = np.random.default_rng(3).normal(size=(20, 25, 4)).astype(np.float32)
  array, affine = _stored(array_ras, _ras_affine((1.25, 1.25, 2.0)), 'LAS')
  vol = volume.Volume(array, affine, 'v.nii.gz')
  slices, geom = preprocess.to_network_grid(vol, 1.25, 32)
  assert geom.zoom == (1.0, 1.0) and geom.offset == (-6, -4)
  np.testing.assert_array_equal(slices[:, 6:26, 4:29], np.transpose(array_ras, (2, 0, 1)))
  assert np.all(slices[:, :6] == array.min())  # default pad: the volume's minimum
  back = preprocess.from_network_grid(slices, geom)
  np.testing.assert_array_equal(back, array)


def test_network_grid_rejects_wrong_slices():
  vol = volume.Volume(np.zeros((4, 4, 3), np.float32), np.eye(4))
  slices, geom = preprocess.to_network_grid(vol, 1.0, 8)
  with pytest.raises(ValueError, match='geometry expects'):
    preprocess.from_network_grid(slices[:2], geom)


# ---- Body mask ---------------------------------------------------------------------------

def _phantom_body(modality):
  """Ellipse body over 6 slices with an enclosed hole and a separate small blob."""
  x, y = np.meshgrid(np.arange(48), np.arange(40), indexing='ij')
  body = ((x - 22) / 16.0) ** 2 + ((y - 20) / 12.0) ** 2 <= 1
  hole = ((x - 22) / 4.0) ** 2 + ((y - 20) / 3.0) ** 2 <= 1
  blob = ((x - 44) ** 2 + (y - 4) ** 2) <= 4
  rng = np.random.default_rng(4)
  if modality == 'ct':
    plane = np.where(body & ~hole, 40.0, -1000.0) + np.where(blob, 1040.0, 0.0)
    noise = rng.normal(0, 20, (48, 40, 6))
  else:
    plane = np.where(body & ~hole, 60.0 + 30.0 * (x > 30), 0.0) + np.where(blob, 80.0, 0.0)
    noise = np.abs(rng.normal(0, 2, (48, 40, 6)))
  return plane[..., None] + noise, body, blob


@pytest.mark.parametrize('modality', ['ct', 'mr'])
def test_body_mask(modality):
  array, body, blob = _phantom_body(modality)
  got = mask_lib.body_mask(array, modality=modality)
  assert got.dtype == bool and got.shape == array.shape
  for k in range(array.shape[2]):
    np.testing.assert_array_equal(got[..., k], body)  # hole filled, blob removed
  assert not got[blob].any()
  # The same on a [N, H, W] slice stack and on a single slice.
  stack = mask_lib.body_mask(np.transpose(array, (2, 0, 1)), modality=modality, slice_axis=0)
  np.testing.assert_array_equal(stack, np.transpose(got, (2, 0, 1)))
  np.testing.assert_array_equal(mask_lib.body_mask(array[..., 0], modality=modality), body)


def test_an_mr_keeps_an_arm_apart_from_the_trunk_and_a_ct_only_the_largest_piece():
  x, y = np.meshgrid(np.arange(64), np.arange(64), indexing='ij')
  trunk = ((x - 28) / 20.0) ** 2 + ((y - 32) / 16.0) ** 2 <= 1       # ~1000 voxels a slice
  arm = ((x - 56) / 4.0) ** 2 + ((y - 32) / 4.0) ** 2 <= 1           # ~5% of the trunk
  speck = (x - 4) ** 2 + (y - 4) ** 2 <= 1                           # 5 voxels: a marker
  anatomy = np.repeat((trunk | arm | speck)[..., None], 3, axis=2)
  mr = mask_lib.body_mask(np.where(anatomy, 60.0, 0.0), modality='mr')
  np.testing.assert_array_equal(mr[..., 1], trunk | arm)
  prepared = mask_lib.body_mask(np.where(anatomy, 60.0, 0.0), modality='mr', pieces=False)
  np.testing.assert_array_equal(prepared[..., 1], trunk)  # as `prepare` masks it
  ct = mask_lib.body_mask(np.where(anatomy, 40.0, -1000.0), modality='ct')
  np.testing.assert_array_equal(ct[..., 1], trunk)  # the couch would be a piece apart too


def test_body_mask_empty():
  assert not mask_lib.body_mask(np.full((5, 5, 2), -1000.0)).any()


# ---- N4 ----------------------------------------------------------------------------------

def test_n4_reduces_bias_field():
  x, y, z = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 40), np.linspace(-1, 1, 16),
                        indexing='ij')
  body = x ** 2 / 0.8 + y ** 2 / 0.6 + z ** 2 / 1.5 <= 1
  bias = np.exp(0.35 * x + 0.25 * y)
  rng = np.random.default_rng(5)
  clean = np.where(body, 100.0, 0.0) + rng.normal(0, 1, body.shape) * body
  vol = volume.Volume((clean * bias).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]), 'mr')
  start = time.time()
  out = preprocess.n4_correct(vol)
  assert time.time() - start < 5
  assert out.shape == vol.shape and out.array.dtype == np.float32 and out.path == 'mr'
  cv = lambda a: np.std(a[body]) / np.mean(a[body])
  assert cv(vol.array) > 0.15
  assert cv(out.array) < 0.5 * cv(vol.array), (cv(vol.array), cv(out.array))
