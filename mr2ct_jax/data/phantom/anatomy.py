"""Anatomy of the built-in hip phantom: random subjects and their tissue classes at any point.

World coordinates are patient RAS+ millimetres with the origin midway between the two
femoral-head centres (x to the subject's right, y anterior, z superior). A `Subject` is a set of
random sizes, positions and joint angles drawn from a numpy Generator; `tissue_slice` evaluates
its implicit shapes at arbitrary in-plane points of one axial level. Every image grid therefore
samples the same continuous anatomy, which is what makes the phantom's "registered" CT exact.

Bilateral structures are described once in side coordinates (xs = |x|, lateral positive) and
evaluated on each half of the slice with that side's own parameters.
"""

import dataclasses

import numpy as np

from mr2ct_jax.data.phantom import shapes

# Tissue classes (internal; richer than the written label maps).
(AIR, FAT, MUSCLE, GLUT_MED, GLUT_MIN, FLUID, GAS, PELVIS_CORTEX, PELVIS_CANCELLOUS,
 FEMUR_CORTEX, FEMUR_CANCELLOUS, MARROW, CARTILAGE, VESSEL, BOWEL, FECES) = range(16)
NUM_TISSUES = 16

LABELS = {0: 'background', 1: 'pelvis', 2: 'femur', 3: 'gluteus_medius', 4: 'gluteus_minimus'}
# Tissue class -> written label (the sacrum counts as pelvis; the femur includes its marrow).
TISSUE_LABEL = np.zeros(NUM_TISSUES, np.uint8)
TISSUE_LABEL[[PELVIS_CORTEX, PELVIS_CANCELLOUS]] = 1
TISSUE_LABEL[[FEMUR_CORTEX, FEMUR_CANCELLOUS, MARROW]] = 2
TISSUE_LABEL[GLUT_MED] = 3
TISSUE_LABEL[GLUT_MIN] = 4


@dataclasses.dataclass(frozen=True)
class Side:
  """One hip, in side coordinates (x lateral-positive, y anterior, z superior; mm)."""
  head: np.ndarray                  # femoral-head centre
  femur: tuple[shapes.Shape, ...]   # head, neck, trochanters, shaft (posed)
  shaft: shapes.Capsule             # the femoral shaft (marrow lives inside it)
  neck_base_z: float                # cortex thickens and marrow starts below this level
  shaft_cortex: float
  cup: shapes.Cup                   # acetabulum
  roof_z: float                     # the iliac wing runs from the acetabular roof ...
  crest_z: float                    # ... up to the iliac crest
  ilium_low: tuple                  # (p, q, sagitta, thickness) of the wing at roof_z
  ilium_high: tuple                 # ... and at crest_z
  medius_mm: float                  # gluteus medius / minimus thickness over the wing
  minimus_mm: float
  medius_tail: shapes.Capsule       # below the roof, down to the greater trochanter
  minimus_tail: shapes.Capsule
  bones: tuple[shapes.Capsule, ...]  # pubic rami, symphysis, ischium, posterior column
  psoas: shapes.Capsule
  vessels: tuple[float, float]      # femoral vessels at (x - 0.1 z, y)


@dataclasses.dataclass(frozen=True)
class Subject:
  """One phantom subject: body outline, organs and the two hips."""
  index: int
  body: tuple                       # (half-width a0, half-AP b0, centre y, waist factor)
  fat: tuple                        # subcutaneous fat (lateral, anterior, posterior), mm
  crotch_z: float
  top_z: float                      # the scanned hip region ends about here (iliac crest)
  sides: tuple[Side, Side]          # right (+x), left (-x)
  sacrum: tuple                     # (bottom z, top z, (cy, a, b) at bottom, ... at top)
  cortex: float                     # pelvic cortical thickness
  cavity: tuple                     # pelvic cavity (a, b, cy) at z=-28 and at the crest
  bladder: tuple                    # (centre, radii)
  rectum: tuple                     # (capsule, gas?)
  bowel: tuple                      # ((capsule, gas?), ...)


def _side(rng: np.random.Generator, sc: float, hx: float, hy: float, crest_z: float,
          pose: np.ndarray) -> Side:
  u = lambda lo, hi: float(rng.uniform(lo, hi))
  head = np.array([hx * u(0.98, 1.02), hy + u(-2, 2), u(-2, 2)])
  rh = 23.0 * sc * u(0.95, 1.05)
  # The femur in its own frame (origin at the head centre), then posed about the head.
  adduction, nsa, antev = np.deg2rad([u(5, 9), u(122, 136), u(5, 20)])
  phi = adduction + nsa                    # base->head direction, from "down" via medial
  w = np.array([-np.sin(phi) * np.cos(antev), np.sin(phi) * np.sin(antev), -np.cos(phi)])
  base = -42.0 * sc * u(0.92, 1.08) * w    # neck base: lateral, inferior, posterior
  down = np.array([-np.sin(adduction), 0.0, -np.cos(adduction)])
  shaft_top, gt = base + np.array([6, -3, -4]) * sc, base + np.array([8, -8, 4]) * sc
  rot = shapes.rotation(*(pose + rng.normal(0, 2, 3)))
  at = lambda p: head + rot @ p
  shaft = shapes.Capsule(at(shaft_top), at(shaft_top + 300 * down), 13.5 * sc * u(0.92, 1.08))
  femur = (shapes.Sphere(head, rh), shapes.Capsule(head, at(base), 0.6 * rh, 0.85 * rh),
           shapes.Sphere(at(base), 0.85 * rh), shapes.Sphere(at(gt), 15 * sc * u(0.9, 1.1)),
           shapes.Sphere(at(base + np.array([-6, -12, -28]) * sc), 8 * sc), shaft)
  roof_z = rh + 6
  jit = lambda: rng.uniform(-4, 4, 2)
  low = (np.array([38, -48]) * sc + jit(), np.array([hx + 2, hy + 16]) + jit(), 6.0, 22 * sc)
  high = (np.array([30, -68]) * sc + jit(), np.array([hx + 28 * sc, hy + 12]) + jit(),
          28 * sc * u(0.85, 1.15), 7.0 * u(0.9, 1.2))
  medius, minimus = 30 * sc * u(0.85, 1.15), 12 * sc * u(0.85, 1.2)
  centre, radius, _, _ = shapes.Arc(*low).frame()

  def beside_wing(along, offset):  # a point on the convex side of the wing at the roof
    p = low[0] + along * (low[1] - low[0])
    d = (p - centre) / np.hypot(*(p - centre))
    return np.array([*(centre + d * (radius + offset)), roof_z + 4])

  medius_tail = shapes.Capsule(beside_wing(0.55, low[3] / 2 + minimus + medius / 2),
                               at(gt + np.array([2, -4, 10]) * sc), 0.75 * medius, 9 * sc)
  minimus_tail = shapes.Capsule(beside_wing(0.7, low[3] / 2 + minimus / 2),
                                at(gt + np.array([-2, 8, 10]) * sc), 0.7 * minimus, 6 * sc)
  it = np.array([hx - 28 * sc, hy - 42 * sc, -40 * sc])  # ischial tuberosity
  sym = np.array([10 * sc, hy + 52 * sc, 0.0])           # pubic symphysis (one half)
  isch = np.array([hx - 12 * sc, hy - 26 * sc, -2])
  bones = (shapes.Capsule(np.array([hx - 26 * sc, hy + 20 * sc, 4]), sym + [1, 0, -10], 9 * sc),
           shapes.Capsule(sym + [0, 0, -4], sym + [0, -4, -30 * sc], 8 * sc),
           shapes.Capsule(sym + [0, -6, -30 * sc], it, 6.5 * sc),
           shapes.Capsule(isch, it, 13 * sc),
           shapes.Capsule(it, it + [0, -2, -3], 14 * sc),
           shapes.Capsule(isch, np.array([*(low[0] + [8, 10]), roof_z + 10]), 13 * sc))
  psoas = shapes.Capsule(np.array([32 * sc, -28 * sc, crest_z + 30]),
                         np.array([hx - 16 * sc, hy + 30 * sc, -45 * sc]), 19 * sc, 14 * sc)
  opening = np.array([0.62, 0.38, -0.68])
  return Side(head=head, femur=femur, shaft=shaft, neck_base_z=float(at(base)[2]),
              shaft_cortex=u(4, 6),
              cup=shapes.Cup(head, rh + 2, rh + 12 * sc, opening / np.linalg.norm(opening)),
              roof_z=roof_z, crest_z=crest_z + u(-3, 3), ilium_low=low, ilium_high=high,
              medius_mm=medius, minimus_mm=minimus, medius_tail=medius_tail,
              minimus_tail=minimus_tail, bones=bones, psoas=psoas,
              vessels=(hx - 18 * sc, hy + 36 * sc))


def sample_subject(rng: np.random.Generator, index: int = 0) -> Subject:
  """Draws one subject's anatomy (sizes, positions, joint angles) from `rng`."""
  u = lambda lo, hi: float(rng.uniform(lo, hi))
  sc = u(0.85, 0.97)
  hx, hy = 82 * sc * u(0.97, 1.03), u(0, 8)
  fat = u(4, 16)
  a0 = hx + 53 * sc + 8 + fat
  b0 = u(92, 108) * (0.8 + 0.25 * fat / 16)
  crest_z = u(72, 85) * sc
  pose = np.array([u(-8, 12), u(-6, 6), u(-12, 12)])  # shared hip pose, jittered per side
  sides = tuple(_side(rng, sc, hx, hy, crest_z, pose) for _ in range(2))
  sacrum_a = min(s.ilium_high[0][0] for s in sides) - 6
  sacrum = (u(-12, -2), crest_z - u(8, 14), (-82 * sc, 9 * sc, 7 * sc),
            (-50 * sc, sacrum_a, 24 * sc))
  bladder = (np.array([u(-5, 5), hy + u(22, 34) * sc, u(-8, 12)]),
             np.array([u(26, 46), u(20, 34), u(18, 32)]) * sc)
  rectum = (shapes.Capsule(np.array([u(-5, 5), -52 * sc, -35]),
                           np.array([u(-8, 8), -48 * sc, 35]), 13 * sc), rng.random() < 0.5)
  bowel = []
  for _ in range(int(rng.integers(5, 9))):
    p0 = np.array([u(-55, 55) * sc, u(-20, 45), u(20, crest_z + 10)])
    angle = u(0, 2 * np.pi)
    p1 = p0 + u(20, 50) * np.array([np.cos(angle), np.sin(angle), u(-0.5, 0.5)])
    bowel.append((shapes.Capsule(p0, p1, u(7, 14)), rng.random() < 0.35))
  return Subject(index=index, body=(a0, b0, u(-22, -12), u(0.86, 0.95)),
                 fat=(fat, fat * u(0.8, 1.3), fat * u(1.2, 1.8)), crotch_z=u(-50, -38) * sc,
                 top_z=crest_z + u(-4, 6), sides=sides, sacrum=sacrum, cortex=u(1.8, 2.6),
                 cavity=((30 * sc, 46 * sc, hy + 2), (0.52 * a0, 0.55 * b0, 0.0)),
                 bladder=bladder, rectum=rectum, bowel=tuple(bowel))


def _body(s: Subject, z: float, inner: bool) -> list[shapes.Ellipse]:
  """The ellipses whose union is the skin (inner=False) or the fat/muscle boundary."""
  a0, b0, cy, waist = s.body
  f_lat, f_ant, f_post = s.fat if inner else (0.0, 0.0, 0.0)
  cz, crest = s.crotch_z, s.sides[0].crest_z
  a = a0 * np.interp(z, [cz - 28, cz, -10, crest], [0.25, 0.78, 1.0, waist])
  b = 0.92 * b0 * np.interp(z, [cz - 28, cz], [0.5, 1.0])
  out = [shapes.Ellipse(0, cy + 0.08 * b0, a - f_lat, b - f_ant)]
  g = np.sqrt(np.interp(z, [cz - 15, cz + 5, crest - 45, crest - 25], [0, 1, 1, 0]))
  for sign in (1, -1):
    if g > 0:   # buttocks: the posterior bulges either side of the gluteal cleft
      out.append(shapes.Ellipse(sign * 0.34 * a0, cy - 0.42 * b0, 0.40 * a0 * g - f_post,
                                0.58 * b0 * g - f_post))
    if z < 5:   # thighs, which part below the crotch
      out.append(shapes.Ellipse(sign * 0.52 * a0, cy + 0.05 * b0, 0.48 * a0 - f_lat,
                                0.8 * b0 - f_ant))
  return out


def _wing(side: Side, z: float, margin: float) -> tuple[shapes.Arc, float] | None:
  """The iliac wing at level z and its 0..1 height above the roof, or None."""
  if not side.roof_z <= z <= side.crest_z:
    return None
  t = (z - side.roof_z) / (side.crest_z - side.roof_z)
  lo, hi = side.ilium_low, side.ilium_high
  p, q = (1 - t) * lo[0] + t * hi[0], (1 - t) * lo[1] + t * hi[1]
  # The crest is rounded: near the top the wing's section shortens.
  k = max(0.15, np.sqrt(max(0.0, 1 - ((t - 0.85) / 0.16) ** 2))) if t > 0.85 else 1.0
  mid = (p + q) / 2
  arc = shapes.Arc(mid + (p - mid) * k, mid + (q - mid) * k, ((1 - t) * lo[2] + t * hi[2]) * k,
                   (1 - t) * lo[3] + t * hi[3], margin)
  return arc, t


def _paint(tissue: np.ndarray, found, value: int, below: float = 0.0,
           where: np.ndarray | None = None) -> None:
  """Sets `value` where the distance of `found` = (window, d) is below `below`."""
  if found is None:
    return
  win, d = found
  mask = d < below
  if where is not None:
    mask &= where[win]
  tissue[win][mask] = value


def _paint_side(side: Side, s: Subject, xs: np.ndarray, y: np.ndarray, z: float,
                inner: np.ndarray, tissue: np.ndarray) -> None:
  """Paints one hip's muscles, vessels and bones (xs: side coordinates of the rows)."""
  union = lambda shs: shapes.union(shs, xs, y, z, x_min=0.0)
  _paint(tissue, union([side.psoas]), MUSCLE, where=inner)
  wing = _wing(side, z, margin=side.minimus_mm + side.medius_mm + 3)
  if wing is not None:
    arc, t = wing
    win = shapes.window(xs, y, arc.box(z), x_min=0.0)
    if win is not None:
      offset, _, convex, along = arc.polar(xs[win[0], None], y[None, win[1]])
      t_min, t_med = side.minimus_mm * (1 - 0.7 * t), side.medius_mm * (1 - 0.45 * t)
      half = arc.thickness / 2
      in_min = (along > 0.35) & (along < 1.0) & convex
      start = half + np.where(in_min, np.float32(t_min), np.float32(0))
      in_med = (along > 0.05) & (along < 1.02) & convex & inner[win]
      view = tissue[win]
      view[in_med & (offset >= start + t_med) & (offset < start + t_med + 2.5)] = FAT
      view[in_med & (offset >= start) & (offset < start + t_med)] = GLUT_MED
      view[in_min & inner[win] & (offset >= half) & (offset < start)] = GLUT_MIN
  elif z < side.roof_z:
    _paint(tissue, union([side.medius_tail]), GLUT_MED, where=inner)
    _paint(tissue, union([side.minimus_tail]), GLUT_MIN, where=inner)
  if z < 25:  # femoral vessels in their fatty sheath
    vx, vy = side.vessels[0] - 0.1 * z, side.vessels[1]
    _paint(tissue, union([shapes.Ellipse(vx - 5, vy, 13, 11)]), FAT, where=inner)
    _paint(tissue, union([shapes.Ellipse(vx, vy, 4, 4)]), VESSEL)
    _paint(tissue, union([shapes.Ellipse(vx - 10, vy, 5.5, 5)]), VESSEL)
  # Hip bone (wing, acetabular cup, rami, ischium) with the joint cartilage inside the cup.
  bone = union(side.bones + (side.cup,) + (() if wing is None else (wing[0],)))
  _paint(tissue, union([shapes.Cup(side.cup.centre, 0, side.cup.r_in, side.cup.opening)]),
         CARTILAGE)
  _paint(tissue, bone, PELVIS_CORTEX, below=1e-6)
  _paint(tissue, bone, PELVIS_CANCELLOUS, below=-s.cortex)
  # Femur: thin cortex in the head and neck, thick in the shaft, fatty marrow in the shaft.
  femur = union(side.femur)
  cortex = np.interp(z, [side.neck_base_z - 45, side.neck_base_z - 20], [side.shaft_cortex, 2])
  _paint(tissue, femur, FEMUR_CORTEX, below=1e-6)
  _paint(tissue, femur, FEMUR_CANCELLOUS, below=-cortex)
  if z < side.neck_base_z - 30:
    _paint(tissue, union([side.shaft]), MARROW, below=-cortex)


def tissue_slice(s: Subject, x: np.ndarray, y: np.ndarray,
                 z: float) -> tuple[np.ndarray, np.ndarray]:
  """Tissue classes and body mask on the rectilinear points (x[i], y[j]) of the level z.

  Args:
    s: the subject.
    x: world x (mm, RAS+) of each row, 1-D.
    y: world y of each column, 1-D.
    z: the level (mm).

  Returns:
    (uint8 tissue classes, bool inside-the-skin mask), both [len(x), len(y)].
  """
  x, y, z = np.asarray(x, np.float32), np.asarray(y, np.float32), float(z)
  union = lambda shs: shapes.union(shs, x, y, z)
  tissue = np.zeros((x.size, y.size), np.uint8)
  body = np.zeros(tissue.shape, bool)
  win, d = union(_body(s, z, inner=False))
  body[win] = d < 0
  inner = np.zeros(tissue.shape, bool)
  win, d = union(_body(s, z, inner=True))
  inner[win] = d < 0
  tissue[body] = FAT
  tissue[inner] = MUSCLE
  # Pelvic / abdominal cavity: visceral fat holding bladder, rectum and bowel loops.
  if z > -28:
    (a_lo, b_lo, y_lo), (a_hi, b_hi, y_hi) = s.cavity
    t = min(1.0, (z + 28) / (s.sides[0].crest_z + 28))
    cavity = np.zeros(tissue.shape, bool)
    found = union([shapes.Ellipse(0, y_lo + t * (y_hi - y_lo), a_lo + t * (a_hi - a_lo),
                                  b_lo + t * (b_hi - b_lo))])
    if found is not None:
      cavity[found[0]] = found[1] < 0
    cavity &= inner
    tissue[cavity] = FAT
    for capsule, gas in s.bowel:
      found = union([capsule])
      _paint(tissue, found, BOWEL, where=cavity)
      _paint(tissue, found, GAS if gas else FECES, below=-2.5, where=cavity)
    centre, radii = s.bladder
    k = 1 - ((z - centre[2]) / radii[2]) ** 2
    if k > 0:
      found = union([shapes.Ellipse(centre[0], centre[1], radii[0] * np.sqrt(k),
                                    radii[1] * np.sqrt(k))])
      _paint(tissue, found, BOWEL, where=inner)
      _paint(tissue, found, FLUID, below=-2.5, where=inner)
  found = union([s.rectum[0]])
  _paint(tissue, found, BOWEL, where=inner)
  _paint(tissue, found, GAS if s.rectum[1] else FECES, below=-3.0, where=inner)
  for sign, side in zip((1, -1), s.sides):  # each hip on its own half of the slice
    _paint_side(side, s, sign * x, y, z, inner, tissue)
  # Sacrum (midline; counted as pelvis).
  z0, z1, (cy0, a0, b0), (cy1, a1, b1) = s.sacrum
  if z0 <= z <= z1:
    t = (z - z0) / (z1 - z0)
    found = union([shapes.Ellipse(0, cy0 + t * (cy1 - cy0), a0 + t * (a1 - a0),
                                  b0 + t * (b1 - b0))])
    _paint(tissue, found, PELVIS_CORTEX, below=1e-6)
    _paint(tissue, found, PELVIS_CANCELLOUS, below=-s.cortex)
  return tissue, body
