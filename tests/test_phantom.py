"""Tests of the built-in phantom (mr2ct_jax.data.phantom): layout, determinism, geometry."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mr2ct_jax.data.phantom import cohort as phantom
from mr2ct_jax.data.phantom import render

SEED, SLICES = 3, 6
COUNTS = dict(num_train_mr=2, num_train_ct=1, num_labeled=1, num_test=1)


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
  img = nib.load(path)
  return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope='module')
def out(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('phantom') / 'out')
  phantom.generate(path, **COUNTS, num_slices=SLICES, seed=SEED)
  return path


def _ids(out: str) -> dict[str, list[str]]:
  with open(os.path.join(out, 'subjects.json'), encoding='utf-8') as f:
    return json.load(f)['subjects']


def test_layout_and_types(out):
  ids = _ids(out)
  assert [len(ids[k]) for k in ('mr', 'ct', 'labeled', 'paired')] == [2, 1, 1, 1]
  for sid in ids['mr']:
    mr, affine = _load(f'{out}/mr/{sid}.nii.gz')
    assert mr.dtype == np.uint16 and mr.shape == (256, 256, SLICES)
    assert nib.aff2axcodes(affine) == ('L', 'A', 'S')
  ct, affine = _load(f'{out}/ct/{ids["ct"][0]}.nii.gz')
  assert ct.dtype == np.int16 and ct.shape == (224, 224, SLICES)
  assert nib.aff2axcodes(affine) == ('L', 'P', 'S')
  assert -1024 <= ct.min() and ct.max() <= 3071
  sid = ids['labeled'][0]
  lct, laff = _load(f'{out}/labeled/{sid}_ct.nii.gz')
  lab, lab_aff = _load(f'{out}/labeled/{sid}_label.nii.gz')
  assert lab.dtype == np.uint8 and lab.shape == lct.shape and np.array_equal(laff, lab_aff)
  assert set(np.unique(lab)) == set(phantom.LABELS)
  sid = ids['paired'][0]
  arrays = {k: _load(f'{out}/paired/{sid}_{k}.nii.gz') for k in ('mr', 'ct', 'mask', 'label')}
  for k, (array, affine) in arrays.items():
    assert array.shape == arrays['mr'][0].shape, k
    assert np.array_equal(affine, arrays['mr'][1]), k  # registered: the MR's grid
  assert arrays['ct'][0].dtype == np.int16 and arrays['mask'][0].dtype == np.uint8
  assert sorted(os.listdir(out)) == ['ct', 'labeled', 'mr', 'paired', 'subjects.json']
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith('.')]  # no temp left


def test_train_subjects_are_disjoint(out):
  ids = _ids(out)
  groups = [set(v) for v in ids.values()]
  assert sum(map(len, groups)) == len(set().union(*groups))
  assert sorted(os.listdir(f'{out}/mr')) == [f'{i}.nii.gz' for i in ids['mr']]
  assert sorted(os.listdir(f'{out}/ct')) == [f'{i}.nii.gz' for i in ids['ct']]
  a, b = (_load(f'{out}/mr/{i}.nii.gz')[0] for i in ids['mr'])
  assert not np.array_equal(a, b)  # subjects vary


def test_deterministic(out, tmp_path):
  again = str(tmp_path / 'again')
  phantom.generate(again, **COUNTS, num_slices=SLICES, seed=SEED)
  for folder in ('mr', 'ct', 'labeled', 'paired'):
    for name in os.listdir(f'{out}/{folder}'):
      with open(f'{out}/{folder}/{name}', 'rb') as f1, open(f'{again}/{folder}/{name}', 'rb') as f2:
        assert f1.read() == f2.read(), name
  other = str(tmp_path / 'other')
  phantom.generate(other, 1, 0, 0, 0, num_slices=SLICES, seed=SEED + 1)
  assert not np.array_equal(_load(f'{out}/mr/phantom000.nii.gz')[0],
                            _load(f'{other}/mr/phantom000.nii.gz')[0])


def _world_to_voxel(affine: np.ndarray, point: np.ndarray) -> tuple[int, int, int]:
  return tuple(np.rint(np.linalg.solve(affine, [*point, 1.0])[:3]).astype(int))


def _head_centres(index: int) -> list[np.ndarray]:
  s = phantom.subject(SEED, index)
  return [side.head * [sign, 1, 1] for sign, side in zip((1, -1), s.sides)]


@pytest.mark.parametrize('folder', ['labeled', 'paired'])
def test_affine_puts_the_femoral_heads_where_the_anatomy_is(out, folder):
  """World -> voxel through the stored affine lands in the femur, in MR (LAS) and CT (LPS)."""
  sid = _ids(out)[folder][0]
  index = int(sid.removeprefix('phantom'))
  label, affine = _load(f'{out}/{folder}/{sid}_label.nii.gz')
  ct, _ = _load(f'{out}/{folder}/{sid}_ct.nii.gz')
  for sign, centre in zip((1, -1), _head_centres(index)):
    i, j, k = _world_to_voxel(affine, centre)
    # The slice nearest the head centre: the femur's in-plane centroid is at the centre.
    k = int(np.argmin(np.abs(affine[2, 2] * np.arange(label.shape[2]) + affine[2, 3] - centre[2])))
    femur = np.argwhere(label[:, :, k] == 2)
    world = (affine[:2, :2] @ femur.T).T + affine[:2, 2] * k + affine[:2, 3]
    near = world[np.hypot(*(world - centre[:2]).T) < 30]
    assert len(near) > 50
    assert np.allclose(near.mean(0), centre[:2], atol=4.0), (sign, near.mean(0), centre)
    assert label[i, j, k] == 2 and ct[i, j, k] > 150, sign


def test_paired_ct_field_of_view_and_mask(out):
  sid = _ids(out)['paired'][0]
  ct, affine = _load(f'{out}/paired/{sid}_ct.nii.gz')
  mask, _ = _load(f'{out}/paired/{sid}_mask.nii.gz')
  top = int(np.argmax(affine[2, 2] * np.arange(SLICES)))  # the highest slice
  assert np.all(ct[:, :, top] == -1024) and not mask[:, :, top].any()
  below = [k for k in range(SLICES) if k != top]
  body = ct[:, :, below] > -500
  assert mask[:, :, below].any()
  assert np.mean(mask[:, :, below].astype(bool) == body) > 0.98


def test_intensities_are_plausible(out):
  sid = _ids(out)['paired'][0]
  get = lambda k: _load(f'{out}/paired/{sid}_{k}.nii.gz')[0]
  mr, ct, label, mask = get('mr').astype(np.float32), get('ct'), get('label'), get('mask') > 0
  outside = ~mask & (ct > -1024)
  assert abs(np.median(ct[outside]) + 1000) < 30                 # air
  glutei = (label == 3) | (label == 4)
  assert 20 < np.median(ct[glutei]) < 90                          # muscle
  assert np.median(ct[label == 2]) > 250                          # femur (bone)
  fat = np.percentile(mr[mask], 95)
  assert np.median(mr[glutei]) < 0.6 * fat                        # T1: fat bright
  assert np.median(mr[outside]) < 0.1 * fat                       # air dark (Rician floor)
  assert mr.max() < 10000


def test_label_volumes_are_plausible(out):
  sid = _ids(out)['labeled'][0]
  img = nib.load(f'{out}/labeled/{sid}_label.nii.gz')
  label = np.asanyarray(img.dataobj)
  ml = np.prod(img.header.get_zooms()) / 1000
  volumes = {k: (label == k).sum() * ml for k in phantom.LABELS if k}
  assert 150 < volumes[1] < 900, volumes    # pelvis (with sacrum) over the scanned range
  assert 60 < volumes[2] < 500, volumes     # proximal femurs
  assert 80 < volumes[3] < 600, volumes     # gluteus medius
  assert 10 < volumes[4] < 200, volumes     # gluteus minimus
  assert volumes[3] > volumes[4]


def test_same_anatomy_on_any_grid():
  s = phantom.subject(SEED, 0)
  grid = render.axial_grid('RAS', 64, 5.0, 3, 4.0, [0, s.body[2], 0])
  flipped = render.axial_grid('LPI', 64, 5.0, 3, 4.0, [0, s.body[2], 0])
  a, _ = render.tissue_volume(s, grid)
  b, _ = render.tissue_volume(s, flipped)
  assert np.array_equal(a, b[::-1, ::-1, ::-1])


def test_refuses_non_empty_and_bad_args(tmp_path):
  target = tmp_path / 'x'
  target.mkdir()
  phantom.generate(str(target), 1, 0, 0, 0, num_slices=2, seed=0)  # empty folder is fine
  with pytest.raises(FileExistsError, match='not empty'):
    phantom.generate(str(target), 1, 0, 0, 0, num_slices=2, seed=0)
  phantom.generate(str(target), 0, 1, 0, 0, num_slices=2, seed=0, overwrite=True)
  assert os.listdir(target / 'mr') == [] and len(os.listdir(target / 'ct')) == 1
  with pytest.raises(ValueError, match='num_slices'):
    phantom.generate(str(tmp_path / 'y'), 1, 1, 0, 0, num_slices=1, seed=0)
  with pytest.raises(ValueError, match='num_test'):
    phantom.generate(str(tmp_path / 'y'), 1, 1, 0, -1, num_slices=4, seed=0)
  assert not (tmp_path / 'y').exists()


def test_cli(tmp_path):
  target = str(tmp_path / 'cli')
  cmd = [sys.executable, '-m', 'mr2ct_jax.data.phantom', target, '--num_train_mr=1',
         '--num_train_ct=1', '--num_labeled=0', '--num_test=0', '--num_slices=2']
  result = subprocess.run(cmd, capture_output=True, encoding='utf-8', check=False)
  assert result.returncode == 0, result.stderr
  assert 'mr/' in result.stdout and 'generated in' in result.stdout
  result = subprocess.run(cmd, capture_output=True, encoding='utf-8', check=False)
  assert result.returncode != 0 and 'not empty' in result.stderr


@pytest.mark.parametrize('modality', ['ct', 'mr'])
def test_body_mask_on_the_phantom(out, modality):
  """mask.body_mask on the phantom's paired MR / CT finds the body: it covers every labelled
  structure, agrees with the phantom's own body mask, and leaves the air outside."""
  from mr2ct_jax.data import mask as mask_lib  # pylint: disable=g-import-not-at-top
  sid = _ids(out)['paired'][0]
  image, affine = _load(f'{out}/paired/{sid}_{modality}.nii.gz')
  truth, _ = _load(f'{out}/paired/{sid}_mask.nii.gz')
  labels, _ = _load(f'{out}/paired/{sid}_label.nii.gz')
  top = int(np.argmax(affine[2, 2] * np.arange(SLICES)))  # outside the CT's FOV
  keep = [k for k in range(SLICES) if k != top]
  body = mask_lib.body_mask(image.astype(np.float32), modality=modality)[:, :, keep]
  truth = truth[:, :, keep].astype(bool)
  assert body.dtype == bool and body.shape == truth.shape
  dice = 2 * np.sum(body & truth) / (np.sum(body) + np.sum(truth))
  assert dice > 0.97
  assert np.all(body[labels[:, :, keep] > 0])     # holes inside the body are filled
  assert not body[0, 0, :].any() and not body[-1, -1, :].any()   # corners are air
