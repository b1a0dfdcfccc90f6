"""Rendering of phantom subjects: image grids, tissue maps on a grid, CT and MR intensities.

A grid is a voxel shape plus an affine (voxel -> RAS+ world mm) whose axes are aligned with
world x, y, z (any signs, so LPS, LAS, RAS ... storage orders are all covered); axis 2 holds
the axial slices. The tissue map is evaluated at the voxel centres, so two grids of the same
subject sample the same continuous anatomy.

CT: Hounsfield units per tissue, trabecular texture, a slight point-spread blur and Gaussian
noise, int16. MR: T1-weighted contrast (fat bright, muscle intermediate, cortical bone, fluid
and air dark, fatty marrow bright), a smooth multiplicative bias field and Rician noise
(magnitude of complex Gaussian noise), uint16 with fat around 3000.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from mr2ct_jax.data.phantom import anatomy

T = anatomy
# Mean CT number (HU) and the texture amplitude (HU) of each tissue class.
_CT = {T.AIR: (-1000, 0), T.FAT: (-100, 8), T.MUSCLE: (50, 6), T.GLUT_MED: (52, 6),
       T.GLUT_MIN: (48, 6), T.FLUID: (8, 2), T.GAS: (-950, 20), T.PELVIS_CORTEX: (1250, 120),
       T.PELVIS_CANCELLOUS: (320, 70), T.FEMUR_CORTEX: (1450, 120),
       T.FEMUR_CANCELLOUS: (350, 70), T.MARROW: (10, 25), T.CARTILAGE: (90, 5),
       T.VESSEL: (40, 3), T.BOWEL: (35, 8), T.FECES: (0, 60)}
# T1-weighted signal relative to fat, and its texture amplitude (same units).
_MR = {T.AIR: (0.0, 0.0), T.FAT: (1.0, 0.03), T.MUSCLE: (0.32, 0.02), T.GLUT_MED: (0.33, 0.02),
       T.GLUT_MIN: (0.30, 0.02), T.FLUID: (0.10, 0.01), T.GAS: (0.0, 0.0),
       T.PELVIS_CORTEX: (0.03, 0.01), T.PELVIS_CANCELLOUS: (0.62, 0.08),
       T.FEMUR_CORTEX: (0.03, 0.01), T.FEMUR_CANCELLOUS: (0.68, 0.08), T.MARROW: (0.9, 0.05),
       T.CARTILAGE: (0.35, 0.02), T.VESSEL: (0.05, 0.01), T.BOWEL: (0.28, 0.03),
       T.FECES: (0.22, 0.06)}
MR_SCALE = 3000.0      # stored MR value of fat with no bias
CT_FILL = -1024        # CT outside its field of view


def _table(spec: dict[int, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
  mean = np.array([spec[k][0] for k in range(anatomy.NUM_TISSUES)], np.float32)
  return mean, np.array([spec[k][1] for k in range(anatomy.NUM_TISSUES)], np.float32)


@dataclasses.dataclass(frozen=True)
class Grid:
  """Voxel shape and affine of one image; axis 2 holds the axial slices."""
  shape: tuple[int, int, int]
  affine: np.ndarray

  @property
  def spacing(self) -> np.ndarray:
    return np.abs(np.diag(self.affine)[:3])


def axial_grid(orientation: str, size: int, spacing: float, num_slices: int,
               slice_spacing: float, centre: np.ndarray) -> Grid:
  """A square axial grid stored in `orientation` (e.g. 'LPS', 'LAS', 'RAS') around `centre`.

  Args:
    orientation: the world direction each voxel axis increases towards.
    size: in-plane voxels per side.
    spacing: in-plane voxel size (mm).
    num_slices: voxels along axis 2.
    slice_spacing: mm between slice centres.
    centre: world position (mm) of the volume's centre.
  """
  signs = [{'R': 1, 'L': -1}[orientation[0]], {'A': 1, 'P': -1}[orientation[1]],
           {'S': 1, 'I': -1}[orientation[2]]]
  shape = (size, size, num_slices)
  affine = np.eye(4)
  affine[:3, :3] = np.diag(np.array(signs) * [spacing, spacing, slice_spacing])
  affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
  return Grid(shape, affine)


def coordinates(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """World x of each voxel row, y of each column and z of each slice (1-D vectors)."""
  m = grid.affine[:3, :3]
  if np.count_nonzero(m - np.diag(np.diag(m))) or not np.all(np.diag(m)):
    raise ValueError(f'phantom grid affine must be axis-aligned with axis 2 = z, got\n{m}')
  return tuple(grid.affine[a, a] * np.arange(n) + grid.affine[a, 3]
               for a, n in enumerate(grid.shape))


def tissue_volume(subject: anatomy.Subject, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 tissue classes, bool body mask) of `subject` at the voxel centres of `grid`."""
  x, y, zs = coordinates(grid)
  tissue = np.empty(grid.shape, np.uint8)
  body = np.empty(grid.shape, bool)
  for k, z in enumerate(zs):
    tissue[:, :, k], body[:, :, k] = anatomy.tissue_slice(subject, x, y, z)
  return tissue, body


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple) -> np.ndarray:
  """Smooth zero-mean unit-variance noise (trabecular / tissue texture)."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), sigma)
  return field / max(float(field.std()), 1e-6)


def _blur(image: np.ndarray) -> np.ndarray:
  """A slight in-plane point-spread function (partial-volume edges instead of staircases)."""
  return ndimage.gaussian_filter(image, (0.6, 0.6, 0), truncate=3.0)


def ct_image(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """CT in Hounsfield units (int16) for a tissue map; per-subject tissue values and noise."""
  mean, texture = _table(_CT)
  mean = mean + np.where(mean > -900, rng.normal(0, 1, mean.shape) * (5 + 0.04 * np.abs(mean)),
                         0).astype(np.float32)
  hu = mean[tissue] + texture[tissue] * _texture(rng, tissue.shape, (1.2, 1.2, 0.5))
  hu = _blur(hu) + rng.standard_normal(tissue.shape, np.float32) * np.float32(rng.uniform(10, 20))
  return np.clip(np.rint(hu), CT_FILL, 3071).astype(np.int16)


def mr_image(tissue: np.ndarray, grid: Grid, rng: np.random.Generator) -> np.ndarray:
  """T1-weighted MR (uint16) for a tissue map on `grid`: bias field and Rician noise."""
  mean, texture = _table(_MR)
  mean = mean * rng.uniform(0.92, 1.08, mean.shape).astype(np.float32)
  signal = mean[tissue] + texture[tissue] * _texture(rng, tissue.shape, (1.5, 1.5, 0.5))
  # Smooth multiplicative bias: low-order polynomial in world coordinates; the y^2 term makes
  # the anterior and posterior surfaces (nearest the coil elements) brighter, as in practice.
  x, y, z = (c.astype(np.float32) / 150 for c in coordinates(grid))
  x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
  c = rng.normal(0, 0.12, 6).astype(np.float32)
  log_bias = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + (c[4] + 0.25) * y * y + c[5] * x * y
  signal = _blur(signal * np.exp(log_bias)) * np.float32(MR_SCALE)
  sigma = np.float32(MR_SCALE * rng.uniform(0.012, 0.025))
  real = signal + sigma * rng.standard_normal(tissue.shape, np.float32)
  imag = sigma * rng.standard_normal(tissue.shape, np.float32)
  return np.clip(np.rint(np.sqrt(real * real + imag * imag)), 0, 65535).astype(np.uint16)


def label_map(tissue: np.ndarray) -> np.ndarray:
  """The written label map (uint8, `anatomy.LABELS`) of a tissue map."""
  return anatomy.TISSUE_LABEL[tissue]
