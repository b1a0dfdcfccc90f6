"""Implicit shape primitives for the phantom: approximate signed distances in millimetres.

A slice is a rectilinear set of points: a 1-D vector of world x per row and of world y per
column (axis-aligned grids, which is all the phantom writes), at one height z. Every primitive
knows its bounding box at z, so it is evaluated only on the rows/columns it can touch: the
outer products `x[rows, None]`, `y[None, cols]` broadcast to the window. Distances are negative
inside and about the distance to the surface (exact for spheres and capsules, close for
ellipses and arcs), so a cortical shell of thickness c is `-c < d <= 0`.
"""

import dataclasses
from typing import Protocol, Sequence

import numpy as np

Box = tuple[float, float, float, float]        # x0, x1, y0, y1 (mm)
Window = tuple[slice, slice]                   # rows (x), columns (y)


class Shape(Protocol):
  def box(self, z: float) -> Box | None: ...
  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray: ...


def window(x: np.ndarray, y: np.ndarray, box: Box | None,
           x_min: float = -np.inf) -> Window | None:
  """The rows/columns of the 1-D coordinate vectors x, y that fall in `box` (None: empty).

  `x_min` further drops rows left of it (each hip is painted on its own half of the slice).
  """
  if box is None:
    return None
  i = np.flatnonzero((x >= max(box[0], x_min)) & (x <= box[1]))
  j = np.flatnonzero((y >= box[2]) & (y <= box[3]))
  if not i.size or not j.size:
    return None
  return slice(i[0], i[-1] + 1), slice(j[0], j[-1] + 1)


@dataclasses.dataclass(frozen=True)
class Capsule:
  """The points within r(t) of the segment p0 -> p1; r goes linearly from r0 to r1."""
  p0: np.ndarray
  p1: np.ndarray
  r0: float
  r1: float | None = None

  def box(self, z: float) -> Box | None:
    r = max(self.r0, self.r1 or 0.0)
    lo, hi = np.minimum(self.p0, self.p1) - r, np.maximum(self.p0, self.p1) + r
    return None if not lo[2] <= z <= hi[2] else (lo[0], hi[0], lo[1], hi[1])

  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    r1 = self.r0 if self.r1 is None else self.r1
    axis = np.asarray(self.p1, np.float64) - self.p0
    dx, dy, dz = x - np.float32(self.p0[0]), y - np.float32(self.p0[1]), z - self.p0[2]
    ax, ay, az = (np.float32(v) for v in axis)
    inv = np.float32(1 / (axis @ axis))
    t = np.clip((dx * ax + dy * ay + np.float32(dz) * az) * inv, 0, 1)
    ex, ey, ez = dx - t * ax, dy - t * ay, dz - t * az
    radius = np.float32(self.r0) + np.float32(r1 - self.r0) * t
    return np.sqrt(ex * ex + ey * ey + ez * ez) - radius


@dataclasses.dataclass(frozen=True)
class Sphere:
  centre: np.ndarray
  r: float

  def box(self, z: float) -> Box | None:
    h2 = self.r ** 2 - (z - self.centre[2]) ** 2
    if h2 <= 0:
      return None
    h = float(np.sqrt(h2))
    return self.centre[0] - h, self.centre[0] + h, self.centre[1] - h, self.centre[1] + h

  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    dx, dy = x - np.float32(self.centre[0]), y - np.float32(self.centre[1])
    return np.sqrt(dx * dx + dy * dy + np.float32((z - self.centre[2]) ** 2)) - np.float32(self.r)


@dataclasses.dataclass(frozen=True)
class Ellipse:
  """An axis-aligned ellipse in the slice (any z); distance scaled by the smaller axis."""
  cx: float
  cy: float
  a: float
  b: float

  def box(self, z: float) -> Box | None:
    del z
    if self.a <= 0 or self.b <= 0:
      return None
    return self.cx - self.a, self.cx + self.a, self.cy - self.b, self.cy + self.b

  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    del z
    u = (x - np.float32(self.cx)) / np.float32(self.a)
    v = (y - np.float32(self.cy)) / np.float32(self.b)
    return (np.sqrt(u * u + v * v) - 1) * np.float32(min(self.a, self.b))


@dataclasses.dataclass(frozen=True)
class Arc:
  """A circular arc in the slice from p to q, bulging by `sagitta` to the right of p -> q,
  thickened to `thickness`; `margin` widens its box for what is painted beside it."""
  p: np.ndarray
  q: np.ndarray
  sagitta: float
  thickness: float
  margin: float = 0.0

  def frame(self) -> tuple[np.ndarray, float, np.ndarray, float]:
    """(centre, radius, unit bulge direction, cos of the half opening angle)."""
    chord = self.q - self.p
    length = float(np.hypot(*chord))
    normal = np.array([chord[1], -chord[0]]) / length
    radius = (length * length / 4 + self.sagitta ** 2) / (2 * self.sagitta)
    centre = (self.p + self.q) / 2 + normal * (self.sagitta - radius)
    return centre, radius, normal, float(np.sqrt(max(0.0, 1 - (length / (2 * radius)) ** 2)))

  def box(self, z: float) -> Box | None:
    del z
    apex = (self.p + self.q) / 2 + self.frame()[2] * self.sagitta
    pts = np.stack([self.p, self.q, apex])
    m = self.thickness / 2 + self.sagitta + self.margin
    return pts[:, 0].min() - m, pts[:, 0].max() + m, pts[:, 1].min() - m, pts[:, 1].max() + m

  def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per point: radial offset from the arc (>0 on the convex side), in-sector flag, on the
    convex half-plane flag, position along the chord (0 at p, 1 at q)."""
    centre, radius, normal, cos_half = self.frame()
    dx, dy = x - np.float32(centre[0]), y - np.float32(centre[1])
    rr = np.sqrt(dx * dx + dy * dy)
    dot = dx * np.float32(normal[0]) + dy * np.float32(normal[1])
    chord = (self.q - self.p) / float((self.q - self.p) @ (self.q - self.p))
    along = ((x - np.float32(self.p[0])) * np.float32(chord[0])
             + (y - np.float32(self.p[1])) * np.float32(chord[1]))
    return rr - np.float32(radius), dot >= rr * np.float32(cos_half), dot > 0, along

  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    del z
    offset, in_sector, _, _ = self.polar(x, y)
    ends = np.minimum(np.hypot(x - np.float32(self.p[0]), y - np.float32(self.p[1])),
                      np.hypot(x - np.float32(self.q[0]), y - np.float32(self.q[1])))
    return np.where(in_sector, np.abs(offset), ends) - np.float32(self.thickness / 2)


def union(shapes: Sequence[Shape], x: np.ndarray, y: np.ndarray, z: float,
          x_min: float = -np.inf) -> tuple[Window, np.ndarray] | None:
  """Distance to the union of `shapes` on the window that covers all of them (None: empty)."""
  boxes = [b for b in (s.box(z) for s in shapes) if b is not None]
  if not boxes:
    return None
  b = np.array(boxes)
  win = window(x, y, (b[:, 0].min(), b[:, 1].max(), b[:, 2].min(), b[:, 3].max()), x_min)
  if win is None:
    return None
  xs, ys = x[win[0], None], y[None, win[1]]
  d = np.full((xs.shape[0], ys.shape[1]), np.float32(1e6), np.float32)
  for s in shapes:
    if s.box(z) is not None:
      np.minimum(d, s.dist(xs, ys, z), out=d)
  return win, d


@dataclasses.dataclass(frozen=True)
class Cup:
  """A spherical shell r_in..r_out around `centre`, open where the direction from the centre
  is within ~73 degrees of `opening` (a unit vector): the acetabulum."""
  centre: np.ndarray
  r_in: float
  r_out: float
  opening: np.ndarray

  def box(self, z: float) -> Box | None:
    return Sphere(self.centre, self.r_out).box(z)

  def dist(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    rx, ry = x - np.float32(self.centre[0]), y - np.float32(self.centre[1])
    rz = np.float32(z - self.centre[2])
    r = np.sqrt(rx * rx + ry * ry + rz * rz)
    ox, oy, oz = (np.float32(v) for v in self.opening)
    cos = rx * ox + ry * oy + rz * oz
    return np.maximum(np.maximum(r - np.float32(self.r_out), np.float32(self.r_in) - r),
                      cos - np.float32(0.3) * r)


def rotation(flexion_deg: float, abduction_deg: float, rotation_deg: float) -> np.ndarray:
  """3x3 rotation: flexion about x (lateral), abduction about y (AP), rotation about z."""
  a, b, c = np.deg2rad([flexion_deg, abduction_deg, rotation_deg])
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  return rz @ ry @ rx
