"""A procedurally generated head in FLAME's format: what jflame develops, tests and demos against.

FLAME itself is licensed and downloaded by each user, so jflame builds its own model with the
same file layout, joints, axes and conventions, labelled "SYNTHETIC" wherever it shows. It is made
to be good enough that fitting it to a real photograph's MediaPipe landmarks means something:

* Face: MediaPipe's own face-mesh triangulation over a symmetric reference face measured from a
  real photograph (jflame/data/mediapipe_face.npz), subdivided once at FLAME size. Landmarks
  0..467 are vertices 0..467, so the MediaPipe embedding is exact by construction.
* Eyes: two eyeball meshes, each bound to its eye joint at the eyeball centre; the front cap is a
  flat iris disc through MediaPipe's iris landmarks (468..477).
* Openings: MediaPipe's mesh has holes at the eyes and between the lips. A cup behind each eyeball
  (the eye socket) and a pouch behind the lips (the mouth cavity) close them, so the lips part
  when the jaw opens and the head surface has a single boundary, the neck opening.
* Cranium and neck: an implicit head (a superellipsoid cranium, a jaw ellipsoid, ear bumps and
  a neck cylinder, smoothly united) sampled evenly by farthest-point sampling, triangulated as
  the convex hull of the sample directions seen from inside the head (a Delaunay triangulation
  of the sphere), stitched to the face oval and to rings around the neck, and faired
  (bi-Laplacian) where it meets the face.
* Bases: identity = named smooth deformations (size, width, nose, chin, ...) then ever finer
  smooth random fields; expression = localised deformations (lips, smile, brows, lids, ...);
  each group orthonormalised in order and scaled to decreasing norms, like a PCA basis.
  Pose correctives are small smooth fields (neck, jaw, eyelids following the gaze).

Everything is NumPy on the host and deterministic given the seed (the mesh itself does not depend
on it; the random basis fields and correctives do). Sizes: "flame" has exactly FLAME's 5023
vertices, 9976 triangles, 300 + 100 components; "small" has 1300 vertices and 20 + 10 components
(all of them named ones). The rest pose is the reference face's: its lips are parted about 1 cm
(the photograph smiles); the first expression component closes them at about -1.
"""

import dataclasses
from typing import Dict, Tuple

import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from scipy.spatial import ConvexHull, cKDTree

from jflame.flame import FlameModel
from jflame.flame_io import flame_model_from_arrays
from jflame.landmarks import (MEDIAPIPE_LAYOUT, LandmarkEmbedding, MediaPipeReference,
                              load_mediapipe_reference)

SYNTHETIC_PREFIX = "SYNTHETIC"
ROOT_PARENT = 4294967295  # FLAME's kintree_table marks the root's parent as uint32(-1).
PARENTS = (-1, 0, 1, 1, 1)  # global, neck, jaw, left eye, right eye
LEFT_IRIS = np.arange(473, 478)  # MediaPipe: subject's left iris (+x), centre first.
RIGHT_IRIS = np.arange(468, 473)
MIRROR = np.array([-1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """Resolution of one model size."""
  num_vertices: int        # total, eyeballs included
  num_shape: int
  num_expression: int
  subdivide_face: bool     # split every MediaPipe triangle in four
  eyeball_azimuths: int    # vertices around each eyeball ring (a multiple of 4)
  iris_rings: int          # rings on the flat iris disc, the last on its rim
  sclera_rings: int        # rings from the iris rim to the back pole, equator included
  cup_rings: int           # rings of each eye-socket cup
  pouch_rings: int         # rings of the mouth pouch
  neck_ring_vertices: int  # vertices around the neck (the bottom ring is the mesh boundary)
  neck_rings: int


SIZES = {
    # FLAME: 5023 vertices, 9976 triangles (with a 60-vertex neck boundary the counts agree:
    # F = 2 V - 4 * components + 2 * holes - boundary vertices = 10046 - 12 + 2 - 60).
    "flame": SizeSpec(num_vertices=5023, num_shape=300, num_expression=100, subdivide_face=True,
                      eyeball_azimuths=32, iris_rings=3, sclera_rings=14, cup_rings=3,
                      pouch_rings=3, neck_ring_vertices=60, neck_rings=4),
    "small": SizeSpec(num_vertices=1300, num_shape=20, num_expression=10, subdivide_face=False,
                      eyeball_azimuths=16, iris_rings=2, sclera_rings=7, cup_rings=2,
                      pouch_rings=2, neck_ring_vertices=30, neck_rings=3),
}

# Anatomy, in metres, FLAME axes (x to the subject's left, y up, z forward), origin between the
# iris centres of the reference face.
EYEBALL_RADIUS = 0.012
IRIS_DISC_RADIUS = 0.0065        # flat front cap; MediaPipe's iris points lie on it
CUP_CLEARANCE = 0.0008           # socket cup distance outside the eyeball
CRANIUM_CENTRE = np.array([0.0, 0.012, -0.068])
CRANIUM_AXES_NEG = np.array([0.076, 0.085, 0.100])  # toward -x, -y (down), -z (back)
CRANIUM_AXES_POS = np.array([0.076, 0.104, 0.080])  # toward +x, +y (up), +z (front)
CRANIUM_EXPONENT = 2.5  # a little boxier than an ellipsoid, like a skull
JAW_CENTRE = np.array([0.0, -0.062, -0.045])
JAW_AXES = np.array([0.060, 0.050, 0.060])
EAR_CENTRE = np.array([0.073, -0.014, -0.080])  # left ear; the right one is its mirror image
EAR_AXES = np.array([0.011, 0.029, 0.016])
NECK_AXIS_Z = -0.09
NECK_RADII = np.array([0.052, 0.056])  # x, z
NECK_TOP = -0.03
NECK_BOTTOM = -0.175
NECK_RING_SPACING = 0.015
BLEND_RADIUS = 0.012
EAR_BLEND_RADIUS = 0.005
RAY_CENTRE = np.array([0.0, -0.02, -0.075])  # inside the head; the cranium is star-shaped here
FAIRING_BAND = 0.035  # cranium vertices this close to the face oval are faired into it
HEAD_CENTRE = np.array([0.0, 0.0, -0.065])
# Jaw joint: midway between points in front of the ears (the temporomandibular joints).
JAW_JOINT_LANDMARKS = (234, 454, 93, 323)
UPPER_LIP_ABOVE = -0.035  # at and above this height nothing follows the jaw
CHIN_BELOW = -0.085       # face points below this height follow the jaw fully
LID_MIDLINE = -0.0015     # height between the upper and lower lid margins of the reference face


# --- Small geometry helpers --------------------------------------------------------------------

def _normalise(vectors, axis=-1):
  return vectors / np.linalg.norm(vectors, axis=axis, keepdims=True)


def _vertex_normals(vertices, triangles):
  corners = vertices[triangles]
  face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  normals = np.zeros_like(vertices)
  for corner in range(3):
    np.add.at(normals, triangles[:, corner], face_normals)
  length = np.linalg.norm(normals, axis=1, keepdims=True)
  return normals / np.maximum(length, 1e-12)


def _smoothstep(x, lo, hi):
  t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _edge_key(a, b, num_vertices):
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  return lo.astype(np.int64) * num_vertices + hi


def _strip(loop_a, loop_b):
  """Triangles joining two closed rings of equal length, consistently oriented (the caller
  flips the whole band if it faces the wrong way)."""
  a, b = np.asarray(loop_a), np.asarray(loop_b)
  a_next, b_next = np.roll(a, -1), np.roll(b, -1)
  return np.concatenate([np.stack([a, b, a_next], 1), np.stack([a_next, b, b_next], 1)])


def _fan(loop, apex):
  loop = np.asarray(loop)
  return np.stack([loop, np.full_like(loop, apex), np.roll(loop, -1)], 1)


def _inside_polygon(points, polygon):
  """Even-odd test of (N, 2) points against a closed (P, 2) polygon."""
  x, y = points[:, 0:1], points[:, 1:2]
  x0, y0 = polygon[None, :, 0], polygon[None, :, 1]
  x1, y1 = np.roll(x0, -1, axis=1), np.roll(y0, -1, axis=1)
  straddles = (y0 > y) != (y1 > y)
  with np.errstate(divide="ignore", invalid="ignore"):
    crossing_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
  return np.sum(straddles & (x < crossing_x), axis=1) % 2 == 1


def _near_polygon_edge(points, polygon, factor):
  """True for (N, 2) points closer to some edge of the closed polygon than `factor` times that
  edge's length."""
  start = polygon[None, :, :]
  edge = np.roll(polygon, -1, axis=0)[None] - start
  length_sq = np.sum(edge * edge, axis=-1)
  # Only points near the polygon's bounding box can be near an edge.
  reach = factor * np.sqrt(length_sq.max())
  candidate = np.all((points > polygon.min(0) - reach) & (points < polygon.max(0) + reach), axis=1)
  near = points[candidate]
  t = np.clip(np.sum((near[:, None, :] - start) * edge, axis=-1) / length_sq, 0.0, 1.0)
  distance_sq = np.sum((start + t[..., None] * edge - near[:, None, :]) ** 2, axis=-1)
  result = np.zeros(len(points), bool)
  result[candidate] = np.any(distance_sq < factor ** 2 * length_sq, axis=1)
  return result


def _outside_loop(directions, loop_directions, pole, margin=0.75):
  """True for unit directions clearly outside a closed loop of directions around `pole`: not
  inside it, and not so near an edge that the edge could be missing from a Delaunay
  triangulation that includes them."""
  plane = _stereographic(directions, pole)
  loop_plane = _stereographic(loop_directions, pole)
  return ~_inside_polygon(plane, loop_plane) & ~_near_polygon_edge(plane, loop_plane, margin)


def _stereographic(directions, pole):
  """Projects unit directions from the antipode of `pole` onto the plane through the origin."""
  pole = _normalise(np.asarray(pole, np.float64))
  helper = np.array([0.0, 0.0, 1.0]) if abs(pole[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
  u = _normalise(np.cross(helper, pole))
  v = np.cross(pole, u)
  denominator = 1.0 + directions @ pole
  return np.stack([directions @ u, directions @ v], 1) / np.maximum(denominator, 1e-9)[:, None]


def _graph_laplacian(num_vertices, triangles):
  """Uniform (umbrella) Laplacian L = I - D^-1 A as a sparse matrix."""
  edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
  edges = np.concatenate([edges, edges[:, ::-1]])
  adjacency = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                                      shape=(num_vertices, num_vertices)).tocsr()
  adjacency.data[:] = 1.0  # duplicate edges summed above; count each once
  degree = np.maximum(np.asarray(adjacency.sum(axis=1)).ravel(), 1.0)
  identity = scipy.sparse.identity(num_vertices, format="csr")
  return identity - scipy.sparse.diags(1.0 / degree) @ adjacency


def _solve_dirichlet(operator, values, known):
  """Solves operator @ x = 0 on the unknown rows, with x fixed to `values` where `known`."""
  values = np.array(values, np.float64)
  unknown = ~known
  if not unknown.any():
    return values
  operator = operator.tocsr()
  a = operator[unknown][:, unknown].tocsc()
  rhs = -operator[unknown][:, known] @ values[known]
  values[unknown] = scipy.sparse.linalg.spsolve(a, rhs)
  return values


# --- The implicit head (cranium, jaw, neck) ----------------------------------------------------

def _ellipsoid_distance(points, centre, axes):
  """Approximate signed distance to an axis-aligned ellipsoid (exact on the surface)."""
  p = points - centre
  k0 = np.linalg.norm(p / axes, axis=-1)
  k1 = np.linalg.norm(p / (axes * axes), axis=-1)
  return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _superellipsoid_distance(points, centre, axes, exponent):
  """Approximate signed distance to a superellipsoid: (level - 1) / |gradient of level|."""
  q = np.abs(points - centre) / axes
  level = np.sum(q ** exponent, axis=-1) ** (1.0 / exponent)
  safe = np.maximum(level, 1e-9)[..., None]
  gradient = (q / safe) ** (exponent - 1.0) / axes
  return (level - 1.0) / np.maximum(np.linalg.norm(gradient, axis=-1), 1e-9)


def _smooth_min(a, b, radius):
  low = np.minimum(a, b)
  return low - radius * np.log(np.exp(-(a - low) / radius) + np.exp(-(b - low) / radius))


def _head_distance(points):
  """Approximate signed distance to the implicit head (negative inside)."""
  offset = points - CRANIUM_CENTRE
  cranium = _superellipsoid_distance(
      points, CRANIUM_CENTRE, np.where(offset >= 0.0, CRANIUM_AXES_POS, CRANIUM_AXES_NEG),
      CRANIUM_EXPONENT)
  jaw = _ellipsoid_distance(points, JAW_CENTRE, JAW_AXES)
  ears = np.minimum(_ellipsoid_distance(points, EAR_CENTRE, EAR_AXES),
                    _ellipsoid_distance(points, EAR_CENTRE * MIRROR, EAR_AXES))
  neck_plane = np.stack([points[..., 0], points[..., 2] - NECK_AXIS_Z], -1)
  k0 = np.linalg.norm(neck_plane / NECK_RADII, axis=-1)
  k1 = np.linalg.norm(neck_plane / NECK_RADII ** 2, axis=-1)
  # Capped a little below the neck opening, so every ray from inside leaves the head.
  neck = np.maximum(k0 * (k0 - 1.0) / np.maximum(k1, 1e-12),
                    np.maximum(points[..., 1] - NECK_TOP, NECK_BOTTOM - 0.03 - points[..., 1]))
  head = _smooth_min(_smooth_min(cranium, jaw, BLEND_RADIUS), neck, BLEND_RADIUS)
  return _smooth_min(head, ears, EAR_BLEND_RADIUS)


def _radial_surface(directions, step=0.008, reach=0.36, iterations=22):
  """Where rays from RAY_CENTRE along unit `directions` first leave the implicit head."""
  t = np.arange(step, reach, step)
  samples = RAY_CENTRE + directions[:, None, :] * t[None, :, None]
  outside = _head_distance(samples) > 0.0
  first = np.argmax(outside, axis=1)
  if not outside[np.arange(len(directions)), first].all():
    raise RuntimeError("a ray from the head centre never left the implicit head")
  lo = np.where(first > 0, t[np.maximum(first - 1, 0)], 0.0)
  hi = t[first]
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    inside = _head_distance(RAY_CENTRE + directions * mid[:, None]) <= 0.0
    lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
  return RAY_CENTRE + directions * (0.5 * (lo + hi))[:, None]


def _fibonacci_directions(count):
  index = np.arange(count) + 0.5
  y = 1.0 - 2.0 * index / count
  radius = np.sqrt(1.0 - y * y)
  angle = np.pi * (3.0 - np.sqrt(5.0)) * index
  return np.stack([radius * np.cos(angle), y, radius * np.sin(angle)], 1)


def _surface_candidates(count, probes=2048, rng_seed=20240605):
  """Unit directions whose rays meet the implicit head about evenly over its surface.

  Directions spread evenly over the sphere would crowd where the surface is near and face-on
  and thin out down the neck, where rays meet it far away and obliquely; so directions are kept
  with probability proportional to the surface area each one covers (r^2 / cos incidence).
  """
  probe_dirs = _fibonacci_directions(probes)
  points = _radial_surface(probe_dirs)
  step = 1e-4
  gradient = np.stack([_head_distance(points + step * axis) - _head_distance(points - step * axis)
                       for axis in np.eye(3)], axis=1)
  incidence = np.abs(np.sum(_normalise(gradient) * probe_dirs, axis=1))
  area = np.sum((points - RAY_CENTRE) ** 2, axis=1) / np.maximum(incidence, 0.25)
  keep_probability = area / area.max()
  dense = _fibonacci_directions(int(count / keep_probability.mean()))
  nearest = cKDTree(probe_dirs).query(dense)[1]
  # A fixed generator: the mesh is the same for every model seed.
  keep = np.random.default_rng(rng_seed).uniform(size=len(dense)) < keep_probability[nearest]
  return dense[keep]


def _farthest_points(candidates, seeds, count):
  """Greedy farthest-point sampling of `count` candidates, spaced from the fixed `seeds` too."""
  squared = np.min(np.sum((candidates[:, None, :] - seeds[None, :, :]) ** 2, axis=-1), axis=1)
  chosen = np.empty(count, np.int64)
  for i in range(count):
    chosen[i] = np.argmax(squared)
    np.minimum(squared, np.sum((candidates - candidates[chosen[i]]) ** 2, axis=1), out=squared)
  return chosen


# --- Mesh parts --------------------------------------------------------------------------------

@dataclasses.dataclass
class _FacePatch:
  vertices: np.ndarray   # landmarks 0..467 first, then edge midpoints
  triangles: np.ndarray
  face_oval: np.ndarray  # closed loops of vertex indices
  left_eye: np.ndarray
  right_eye: np.ndarray
  inner_lips: np.ndarray


def _face_patch(reference: MediaPipeReference, subdivide: bool) -> _FacePatch:
  """MediaPipe's face mesh over the reference points, optionally split 1-to-4."""
  vertices = reference.positions[:468].copy()
  triangles = reference.triangles.copy()
  loops = [reference.face_oval_loop, reference.left_eye_loop, reference.right_eye_loop,
           reference.inner_lips_loop]
  if subdivide:
    num = len(vertices)
    normals = _vertex_normals(vertices, triangles)
    corner_pairs = [(0, 1), (1, 2), (2, 0)]
    keys = np.stack([_edge_key(triangles[:, i], triangles[:, j], num) for i, j in corner_pairs], 1)
    unique_keys, inverse = np.unique(keys.ravel(), return_inverse=True)
    a, b = unique_keys // num, unique_keys % num
    # Midpoint of the PN-triangle cubic edge through a and b with the given vertex normals:
    # keeps the subdivided face as smooth as the landmark cloud allows.
    d = vertices[b] - vertices[a]
    along_a = np.sum(d * normals[a], axis=1, keepdims=True) * normals[a]
    along_b = np.sum(d * normals[b], axis=1, keepdims=True) * normals[b]
    midpoints = 0.5 * (vertices[a] + vertices[b]) - (along_a - along_b) / 8.0
    mid = (num + inverse).reshape(-1, 3)  # mid[:, k] = midpoint of corner pair k
    t0, t1, t2 = triangles.T
    m01, m12, m20 = mid.T
    triangles = np.concatenate([np.stack([t0, m01, m20], 1), np.stack([m01, t1, m12], 1),
                                np.stack([m20, m12, t2], 1), np.stack([m01, m12, m20], 1)])
    vertices = np.concatenate([vertices, midpoints])

    def split_loop(loop):
      following = np.roll(loop, -1)
      mids = num + np.searchsorted(unique_keys, _edge_key(loop, following, num))
      return np.stack([loop, mids], 1).ravel()

    loops = [split_loop(loop) for loop in loops]
  return _FacePatch(vertices, triangles, *loops)


@dataclasses.dataclass
class _Eyeball:
  vertices: np.ndarray
  triangles: np.ndarray
  centre: np.ndarray
  equator: np.ndarray       # indices (local) of the ring through the centre's plane
  disc_triangles: np.ndarray  # local triangle indices on the flat iris disc
  disc_frame: np.ndarray    # (3, 3) rows u, v, gaze
  disc_centre: np.ndarray


def _eyeball(iris_points, spec: SizeSpec) -> _Eyeball:
  """A sphere with a flat iris disc fitted through MediaPipe's five iris landmarks."""
  iris_centre = iris_points[0]
  centred = iris_points - iris_points.mean(0)
  gaze = np.linalg.svd(centred)[2][2]
  gaze = gaze if gaze[2] > 0 else -gaze
  u = _normalise(np.array([1.0, 0.0, 0.0]) - gaze[0] * gaze)
  v = np.cross(gaze, u)
  # The disc plane passes through the iris landmarks' plane at the iris centre.
  disc_centre = iris_centre - gaze * (centred[0] @ gaze)
  depth = np.sqrt(EYEBALL_RADIUS ** 2 - IRIS_DISC_RADIUS ** 2)
  centre = disc_centre - gaze * depth
  azimuth = 2.0 * np.pi * np.arange(spec.eyeball_azimuths) / spec.eyeball_azimuths
  ring_dirs = np.cos(azimuth)[:, None] * u + np.sin(azimuth)[:, None] * v
  rings = []
  for k in range(1, spec.iris_rings + 1):
    rings.append(disc_centre + ring_dirs * (IRIS_DISC_RADIUS * k / spec.iris_rings))
  rim = np.arcsin(IRIS_DISC_RADIUS / EYEBALL_RADIUS)
  half = spec.sclera_rings // 2
  polar = np.concatenate([np.linspace(rim, np.pi / 2, half + 2)[1:],
                          np.linspace(np.pi / 2, np.pi, spec.sclera_rings - half + 1)[1:-1]])
  for angle in polar:
    rings.append(centre + EYEBALL_RADIUS * (np.cos(angle) * gaze + np.sin(angle) * ring_dirs))
  vertices = np.concatenate([disc_centre[None], *rings, (centre - EYEBALL_RADIUS * gaze)[None]])
  n = spec.eyeball_azimuths
  ring_index = [1 + k * n + np.arange(n) for k in range(len(rings))]
  triangles = [np.stack([np.zeros(n, np.int64), ring_index[0], np.roll(ring_index[0], -1)], 1)]
  for k in range(len(rings) - 1):
    triangles.append(_strip(ring_index[k], ring_index[k + 1]))
  back = len(vertices) - 1
  triangles.append(np.stack([ring_index[-1], np.full(n, back), np.roll(ring_index[-1], -1)], 1))
  triangles = np.concatenate(triangles)
  triangles = _orient_outward(vertices, triangles, centre)
  equator_ring = spec.iris_rings + half  # index into `rings`
  num_disc = n * (2 * spec.iris_rings - 1)
  return _Eyeball(vertices, triangles, centre, ring_index[equator_ring],
                  np.arange(num_disc), np.stack([u, v, gaze]), disc_centre)


def _orient_outward(vertices, triangles, centre):
  """Flips triangles whose normal points towards `centre` (for star-shaped closed parts)."""
  corners = vertices[triangles]
  normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  inward = np.sum(normal * (corners.mean(1) - centre), axis=1) < 0
  triangles = triangles.copy()
  triangles[inward] = triangles[inward][:, ::-1]
  return triangles


def _mirror_eyeball(eye: _Eyeball) -> _Eyeball:
  return _Eyeball(eye.vertices * MIRROR, eye.triangles[:, ::-1].copy(), eye.centre * MIRROR,
                  eye.equator, eye.disc_triangles, eye.disc_frame * MIRROR,
                  eye.disc_centre * MIRROR)


def _socket_cup(loop_points, centre, rings):
  """Rings that carry an eye opening back around the eyeball to a closed cap behind it."""
  radius = EYEBALL_RADIUS + CUP_CLEARANCE
  offsets = loop_points - centre
  start_dirs = _normalise(offsets)
  start_radius = np.linalg.norm(offsets, axis=1)
  back = np.array([0.0, 0.0, -1.0])
  points = []
  for k in range(1, rings + 1):
    t = k / (rings + 1)
    # Walk each direction towards the back pole along the great circle (slerp), while the
    # distance from the centre settles onto the cup radius.
    angle = np.arccos(np.clip(start_dirs @ back, -1.0, 1.0))[:, None]
    sin_angle = np.maximum(np.sin(angle), 1e-9)
    dirs = (np.sin((1 - t) * angle) * start_dirs + np.sin(t * angle) * back) / sin_angle
    # Lids that touch the eyeball more closely than the cup clearance keep their distance.
    settled = np.minimum(radius, start_radius)
    r = settled + (start_radius - settled) * (1.0 - t) ** 3
    points.append(centre + _normalise(dirs) * r[:, None])
  cap = centre + back * radius
  return np.concatenate([*points, cap[None]])


def _mouth_pouch(loop_points, rings, depth=0.03):
  """Rings that carry the lips' opening back into the head to a closed cap (mouth cavity)."""
  middle = loop_points.mean(0)
  points = []
  for k in range(1, rings + 1):
    t = k / (rings + 1)
    shrink = 1.0 - 0.7 * t ** 1.5
    points.append(middle + (loop_points - middle) * shrink - np.array([0.0, 0.0, depth * t]))
  cap = middle - np.array([0.0, 0.0, depth])
  return np.concatenate([*points, cap[None]])


# --- Assembly ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Head:
  """The assembled mesh and the bookkeeping the bases and weights need."""
  vertices: np.ndarray
  triangles: np.ndarray
  num_face: int                     # vertices 0..num_face-1 are the face patch
  face: _FacePatch
  neck_rings: list                  # vertex index arrays, bottom ring first
  cups: Tuple[np.ndarray, np.ndarray]  # left, right
  pouch: np.ndarray
  pouch_parent: np.ndarray          # lip-loop vertex each pouch vertex hangs from (-1: cap)
  cup_parent: Tuple[np.ndarray, np.ndarray]
  eyes: Tuple[_Eyeball, _Eyeball]   # left, right
  eye_vertices: Tuple[np.ndarray, np.ndarray]
  head_triangles: np.ndarray        # triangles of the skin surface (no eyeballs)


def _neck_ring_points(count, y):
  angle = 2.0 * np.pi * np.arange(count) / count + np.pi / 2  # vertex 0 at the front
  targets = np.stack([NECK_RADII[0] * np.cos(angle), np.full(count, y),
                      NECK_AXIS_Z + NECK_RADII[1] * np.sin(angle)], 1)
  # Put each ring point on the implicit surface along the ray through its target.
  return _radial_surface(_normalise(targets - RAY_CENTRE))


def _cranium(face: _FacePatch, neck_top, num_free):
  """Samples and triangulates the skull and upper neck between the face oval and the neck.

  Returns the free vertices and triangles whose indices run over
  [oval loop vertices, top neck ring, free vertices].
  """
  oval_points = face.vertices[face.face_oval]
  oval_dirs = _normalise(oval_points - RAY_CENTRE)
  neck_dirs = _normalise(neck_top - RAY_CENTRE)
  face_pole = _normalise(oval_dirs.mean(0))
  down = np.array([0.0, -1.0, 0.0])
  oval_plane = _stereographic(oval_dirs, face_pole)
  neck_plane = _stereographic(neck_dirs, down)
  candidates = _surface_candidates(max(4 * num_free, 3000))
  keep = (_outside_loop(candidates, oval_dirs, face_pole)
          & _outside_loop(candidates, neck_dirs, down))
  candidates = _radial_surface(candidates[keep])
  seeds = np.concatenate([oval_points, neck_top])
  free = candidates[_farthest_points(candidates, seeds, num_free)]

  points = np.concatenate([oval_points, neck_top, free])
  directions = _normalise(points - RAY_CENTRE)
  triangles = ConvexHull(directions).simplices
  triangles = _orient_outward(directions, triangles, np.zeros(3))
  num_oval, num_neck = len(oval_points), len(neck_top)
  centroid_dirs = _normalise(directions[triangles].mean(1))
  in_oval = np.all(triangles < num_oval, axis=1)
  in_oval &= _inside_polygon(_stereographic(centroid_dirs, face_pole), oval_plane)
  is_neck = (triangles >= num_oval) & (triangles < num_oval + num_neck)
  in_neck = np.all(is_neck, axis=1)
  in_neck &= _inside_polygon(_stereographic(centroid_dirs, down), neck_plane)
  triangles = triangles[~in_oval & ~in_neck]
  return free, triangles


def _check_closed_loops(triangles, loops, what):
  """Every consecutive pair of every loop must be a mesh edge (the parts are stitched)."""
  edges = set()
  for i, j in ((0, 1), (1, 2), (2, 0)):
    edges.update(zip(triangles[:, i].tolist(), triangles[:, j].tolist()))
  for loop in loops:
    for a, b in zip(loop.tolist(), np.roll(loop, -1).tolist()):
      if (a, b) not in edges and (b, a) not in edges:
        raise RuntimeError(f"internal: {what} edge ({a}, {b}) is missing; the parts are not "
                           "stitched together")


def _fair(vertices, triangles, movable):
  """Bi-Laplacian fairing of the `movable` vertices with all others held fixed."""
  laplacian = _graph_laplacian(len(vertices), triangles)
  bilaplacian = (laplacian.T @ laplacian).tocsr()
  result = vertices.copy()
  for axis in range(3):
    result[:, axis] = _solve_dirichlet(bilaplacian, vertices[:, axis], ~movable)
  return result


def _build_head(reference: MediaPipeReference, spec: SizeSpec) -> _Head:
  face = _face_patch(reference, spec.subdivide_face)
  left_eye = _eyeball(reference.positions[LEFT_IRIS], spec)
  right_eye = _mirror_eyeball(left_eye)

  neck_heights = NECK_BOTTOM + NECK_RING_SPACING * np.arange(spec.neck_rings)
  neck_points = [_neck_ring_points(spec.neck_ring_vertices, y) for y in neck_heights]

  cup_points = [_socket_cup(face.vertices[loop], eye.centre, spec.cup_rings)
                for loop, eye in ((face.left_eye, left_eye), (face.right_eye, right_eye))]
  pouch_points = _mouth_pouch(face.vertices[face.inner_lips], spec.pouch_rings)
  num_fixed = (len(face.vertices) + sum(len(p) for p in neck_points)
               + sum(len(p) for p in cup_points) + len(pouch_points)
               + len(left_eye.vertices) + len(right_eye.vertices))
  num_free = spec.num_vertices - num_fixed
  if num_free < 50:
    raise ValueError(f"size leaves only {num_free} vertices for the cranium")
  free_points, cranium_local = _cranium(face, neck_points[-1], num_free)

  # Vertex blocks: face, cranium, neck rings (bottom first), cups, pouch, eyeballs (as FLAME,
  # whose eyeballs are the last vertices).
  blocks = [face.vertices, free_points, *neck_points, *cup_points, pouch_points,
            left_eye.vertices, right_eye.vertices]
  starts = np.cumsum([0] + [len(b) for b in blocks])
  vertices = np.concatenate(blocks)
  num_face = len(face.vertices)
  free_index = np.arange(starts[1], starts[2])
  neck_rings = [np.arange(starts[2 + k], starts[3 + k]) for k in range(spec.neck_rings)]
  k = 2 + spec.neck_rings
  cups = (np.arange(starts[k], starts[k + 1]), np.arange(starts[k + 1], starts[k + 2]))
  pouch = np.arange(starts[k + 2], starts[k + 3])
  eye_vertices = (np.arange(starts[k + 3], starts[k + 4]), np.arange(starts[k + 4], starts[k + 5]))

  # Cranium triangles: local indices [oval, top neck ring, free] -> global. Each part is
  # oriented against the parts before it, starting from the outward face patch.
  num_vertices = len(vertices)
  local_to_global = np.concatenate([face.face_oval, neck_rings[-1], free_index])
  placed = face.triangles
  cranium = _orient_part(local_to_global[cranium_local], placed, num_vertices)
  placed = np.concatenate([placed, cranium])
  neck = np.concatenate([_strip(upper, lower)
                         for lower, upper in zip(neck_rings[:-1], neck_rings[1:])])
  placed = np.concatenate([placed, _orient_part(neck, placed, num_vertices)])

  def hang(loop, ring_block, rings):
    """Strips from a loop through `rings` rings of the same length, then a fan to the cap."""
    n = len(loop)
    ring_list = [loop] + [ring_block[r * n:(r + 1) * n] for r in range(rings)]
    parts = [_strip(a, b) for a, b in zip(ring_list[:-1], ring_list[1:])]
    parts.append(_fan(ring_list[-1], ring_block[-1]))
    parent = np.concatenate([np.tile(loop, rings), [-1]])
    return np.concatenate(parts), parent

  cup_parent = []
  for loop, block in ((face.left_eye, cups[0]), (face.right_eye, cups[1])):
    tris, parent = hang(loop, block, spec.cup_rings)
    placed = np.concatenate([placed, _orient_part(tris, placed, num_vertices)])
    cup_parent.append(parent)
  pouch_tris, pouch_parent = hang(face.inner_lips, pouch, spec.pouch_rings)
  head_triangles = np.concatenate([placed, _orient_part(pouch_tris, placed, num_vertices)])

  _check_closed_loops(head_triangles, [face.face_oval, neck_rings[-1]], "cranium")
  # Fair the cranium into the face oval.
  oval_points = vertices[face.face_oval]
  near_oval = np.min(np.linalg.norm(vertices[free_index][:, None] - oval_points[None], axis=-1),
                     axis=1) < FAIRING_BAND
  movable = np.zeros(len(vertices), bool)
  movable[free_index[near_oval]] = True
  head_part = np.arange(starts[-3])  # everything but the eyeballs
  vertices[head_part] = _fair(vertices[head_part], head_triangles, movable[head_part])

  eye_triangles = [left_eye.triangles + starts[-3], right_eye.triangles + starts[-2]]
  all_triangles = np.concatenate([head_triangles, *eye_triangles])
  return _Head(vertices=vertices, triangles=all_triangles, num_face=num_face, face=face,
               neck_rings=neck_rings,
               cups=cups, pouch=pouch, pouch_parent=pouch_parent, cup_parent=tuple(cup_parent),
               eyes=(left_eye, right_eye), eye_vertices=eye_vertices,
               head_triangles=head_triangles)


def _orient_part(part, placed, num_vertices):
  """Flips the (internally consistent) triangles `part` if they run an edge they share with the
  already `placed` triangles in the same direction; consistent neighbours run it oppositely."""
  def directed(triangles):
    return np.concatenate([triangles[:, i].astype(np.int64) * num_vertices + triangles[:, j]
                           for i, j in ((0, 1), (1, 2), (2, 0))])
  same_direction = np.isin(directed(part), directed(placed)).any()
  return part[:, ::-1].copy() if same_direction else part


# --- Skinning and joints -----------------------------------------------------------------------

def _lip_halves(inner_lips, face_vertices):
  """Splits the inner-lip loop into its lower and upper halves, leaving out the two corners."""
  x = face_vertices[inner_lips, 0]
  corners = [int(np.argmin(x)), int(np.argmax(x))]
  first, second = min(corners), max(corners)
  half_a, half_b = inner_lips[first + 1:second], np.concatenate(
      [inner_lips[second + 1:], inner_lips[:first]])
  if face_vertices[half_a, 1].mean() < face_vertices[half_b, 1].mean():
    return half_a, half_b
  return half_b, half_a


def _jaw_share(head: _Head):
  """How much each vertex follows the jaw: a harmonic field on the skin surface, 1 on the lower
  inner lip and the chin, 0 on the upper inner lip and above the mouth, smooth in between. The
  mouth slit separates the lips, so the field jumps across it and nowhere else."""
  vertices = head.vertices
  num_skin = len(vertices) - sum(len(e) for e in head.eye_vertices)
  skin = np.ones(num_skin, bool)
  for part in (*head.cups, head.pouch):
    skin[part] = False
  keep = np.all(skin[head.head_triangles], axis=1)
  laplacian = _graph_laplacian(num_skin, head.head_triangles[keep])
  y, z = vertices[:num_skin, 1], vertices[:num_skin, 2]
  lower_lip, upper_lip = _lip_halves(head.face.inner_lips, head.face.vertices)
  known = ~skin | (y > UPPER_LIP_ABOVE) | (y < NECK_BOTTOM + 0.04) | (z < -0.10)
  values = np.zeros(num_skin)
  is_face = np.arange(num_skin) < head.num_face
  chin = is_face & (y < CHIN_BELOW)
  known |= chin
  values[chin] = 1.0
  # Between the mouth corners, the upper lip (above the inner upper lip line) stays with the
  # head and the lower lip (below the inner lower lip line) goes with the jaw; the field only
  # has to blend in the cheeks beside the corners.
  x = vertices[:num_skin, 0]
  corner_x = np.abs(vertices[head.face.inner_lips, 0]).max()
  between_corners = is_face & (np.abs(x) < 0.95 * corner_x)

  def lip_line(half):
    order = np.argsort(vertices[half, 0])
    return np.interp(x, vertices[half, 0][order], vertices[half, 1][order])

  upper_region = between_corners & (y >= lip_line(upper_lip) - 1e-9)
  lower_region = between_corners & (y <= lip_line(lower_lip) + 1e-9)
  for region, value in ((upper_lip, 0.0), (upper_region, 0.0), (lower_lip, 1.0),
                        (lower_region, 1.0)):
    known[region] = True
    values[region] = value
  share = _smoothstep(_solve_dirichlet(laplacian, values, known), 0.02, 0.98)
  # The pouch and the cups follow the lip or lid they hang from; the pouch's cap sits between.
  share[head.pouch] = np.where(head.pouch_parent >= 0, share[np.maximum(head.pouch_parent, 0)],
                               0.5)
  for cup, parent in zip(head.cups, head.cup_parent):
    share[cup] = np.where(parent >= 0, share[np.maximum(parent, 0)], 0.0)
  return share


def _skinning_weights(head: _Head, jaw_share):
  """(V, 5) weights: global at the neck's base, neck above, jaw on the lower face, eyes."""
  vertices = head.vertices
  num_skin = len(jaw_share)
  root_share = 1.0 - _smoothstep(vertices[:num_skin, 1], NECK_BOTTOM, NECK_BOTTOM + 0.045)
  weights = np.zeros((len(vertices), 5))
  weights[:num_skin, 0] = root_share
  weights[:num_skin, 1] = (1.0 - root_share) * (1.0 - jaw_share)
  weights[:num_skin, 2] = (1.0 - root_share) * jaw_share
  weights[head.eye_vertices[0], 3] = 1.0
  weights[head.eye_vertices[1], 4] = 1.0
  return weights


def _joint_regressor(head: _Head):
  """(5, V) rows averaging vertex sets, so the joints move with the shape: the neck's base ring
  (global), a ring low in the neck (neck), points in front of the ears (jaw), eyeball equators."""
  regressor = np.zeros((5, len(head.vertices)))
  sets = [head.neck_rings[0], head.neck_rings[1], np.array(JAW_JOINT_LANDMARKS),
          head.eye_vertices[0][head.eyes[0].equator], head.eye_vertices[1][head.eyes[1].equator]]
  for joint, members in enumerate(sets):
    regressor[joint, members] = 1.0 / len(members)
  return regressor


# --- Deformation bases -------------------------------------------------------------------------

def _bump(q, centre, radius):
  return np.exp(-np.sum((q - centre) ** 2, axis=-1) / (2.0 * radius ** 2))[:, None]


def _pair(q, centre, radius, direction):
  """A mirror-symmetric pair of bumps moving along `direction` and its mirror image."""
  direction = np.asarray(direction, np.float64)
  return (_bump(q, centre, radius) * direction
          + _bump(q, centre * MIRROR, radius) * (direction * MIRROR))


@dataclasses.dataclass
class _FieldContext:
  """What the deformation fields are evaluated on."""
  q: np.ndarray            # (V, 3) evaluation points (eyeball vertices: their eye's centre)
  normals: np.ndarray      # (V, 3) outward vertex normals
  jaw: np.ndarray          # (V,) jaw share (0 upper face, 1 lower lip and chin)
  upper_lid: np.ndarray    # (V,) 1 above the eye's midline, 0 below
  is_eyeball: np.ndarray   # (V,) bool
  landmarks: np.ndarray    # (478, 3) reference points


def _identity_named(context):
  """Named identity deformations, from the coarsest to the finest."""
  q = context.q
  lm = context.landmarks
  side = np.tanh(q[:, :1] / 0.01)
  lower_front = _sigmoid((-q[:, 1:2] - 0.02) / 0.01) * _sigmoid((q[:, 2:3] + 0.05) / 0.015)
  return [
      q - HEAD_CENTRE,                                                       # overall size
      (q - HEAD_CENTRE) * np.array([1.0, 0.0, 0.0]),                         # head width
      (q - HEAD_CENTRE) * np.array([0.0, 1.0, 0.0]),                         # head height
      (q - HEAD_CENTRE) * np.array([0.0, 0.0, 1.0])                          # face depth
      * _sigmoid((q[:, 2:3] + 0.03) / 0.02),
      lower_front * np.stack([0 * q[:, 0], q[:, 1], 0 * q[:, 0]], 1),        # face length
      _bump(q, lm[4], 0.016) * np.array([0.0, -0.2, 1.0]),                   # nose projection
      _bump(q, lm[2], 0.014) * (q - lm[2]) * np.array([3.0, 0.0, 0.0]),      # nose width
      _bump(q, lm[152], 0.022) * np.array([0.0, -0.4, 1.0]),                 # chin
      _pair(q, lm[172] * np.array([1.0, 0.8, 1.0]), 0.025, [1.0, 0.0, 0.2]),  # jaw width
      _pair(q, lm[50], 0.02, [0.6, 0.2, 0.6]),                               # cheekbones
      _pair(q, lm[105], 0.016, [0.0, 0.1, 1.0]),                             # brow ridge
      _pair(q, lm[473], 0.018, [1.0, 0.0, 0.0]),                             # eye spacing
      _bump(q, 0.5 * (lm[61] + lm[291]), 0.02) * (q - lm[0])                 # mouth width
      * np.array([2.0, 0.0, 0.0]),
      _bump(q, lm[10], 0.03) * np.array([0.0, 0.3, -1.0]),                   # forehead slope
      _bump(q, 0.5 * (lm[0] + lm[17]), 0.013) * np.array([0.0, 0.0, 1.0]),   # lip fullness
      _bump(q, HEAD_CENTRE + np.array([0.0, 0.02, -0.1]), 0.05)              # occiput
      * np.array([0.0, 0.0, -1.0]),
      _sigmoid((-q[:, 1:2] - 0.13) / 0.015) * (q - np.array([0.0, 0.0, NECK_AXIS_Z]))
      * np.array([1.0, 0.0, 1.0]),                                           # neck thickness
      _bump(q, lm[1], 0.045) * np.array([0.0, 0.0, 1.0]),                    # face flatness
      _bump(q, HEAD_CENTRE + np.array([0.0, 0.12, 0.0]), 0.05)               # crown height
      * np.array([0.0, 1.0, 0.0]),
      _pair(q, EAR_CENTRE, 0.025, [1.0, 0.0, 0.0]),                          # ears
      _bump(q, lm[168], 0.012) * np.array([0.0, 0.0, 1.0]),                  # nose bridge
      _bump(q, lm[1], 0.08) * side * np.array([0.0, 1.0, 0.0]),              # asymmetry
  ]


def _plane_waves(rng, wavelength, waves=6):
  """A smooth random vector field (a function of points): a few random plane waves."""
  directions = _normalise(rng.normal(size=(waves, 3))) * (2.0 * np.pi / wavelength)
  phases = rng.uniform(0.0, 2.0 * np.pi, waves)
  amplitudes = rng.normal(size=(waves, 3))
  return lambda points: np.sin(points @ directions.T + phases) @ amplitudes


def _random_smooth_fields(q, rng, wavelengths, symmetric, waves=4):
  """(C, V, 3) fields of plane waves, each made mirror-symmetric (or antisymmetric) about
  x = 0 as `symmetric` (C,) says; one batch of waves per field, evaluated all at once."""
  wavelengths = np.asarray(wavelengths, np.float64)
  count = len(wavelengths)
  directions = _normalise(rng.normal(size=(count, waves, 3)))
  directions *= (2.0 * np.pi / wavelengths)[:, None, None]
  phases = rng.uniform(0.0, 2.0 * np.pi, (count, waves))
  amplitudes = rng.normal(size=(count, waves, 3))

  def evaluate(points):
    angles = points @ directions.reshape(-1, 3).T + phases.reshape(-1)
    waves_per_field = np.sin(angles).reshape(len(points), count, waves).transpose(1, 0, 2)
    return waves_per_field @ amplitudes

  sign = np.where(np.asarray(symmetric), 1.0, -1.0)[:, None, None]
  return 0.5 * (evaluate(q) + sign * evaluate(q * MIRROR) * MIRROR)


def _identity_fields(context, rng, count):
  """Named fields, then smooth random fields of ever shorter wavelength (most symmetric)."""
  fields = _identity_named(context)[:count]
  extra = count - len(fields)
  if extra > 0:
    wavelengths = 0.25 * (1.0 + np.arange(extra) / 8.0) ** -0.6
    symmetric = rng.uniform(size=extra) < 0.75
    fields.extend(_random_smooth_fields(context.q, rng, wavelengths, symmetric))
  return fields


def _expression_named(context):
  """Named expression deformations: lips, mouth corners, brows, lids, cheeks, nose."""
  q = context.q
  lm = context.landmarks
  upper, lower = 1.0 - context.jaw[:, None], context.jaw[:, None]
  lid_up, lid_down = context.upper_lid[:, None], 1.0 - context.upper_lid[:, None]
  mouth = 0.5 * (lm[13] + lm[14])
  return [
      # Lips apart (narrower than the mouth, so the corners, where the lips meet, stay put).
      _bump(q * [1.6, 1.0, 1.0], mouth * [1.6, 1.0, 1.0], 0.022)
      * (upper * np.array([0.0, 1.0, 0.0]) - lower * np.array([0.0, 1.0, 0.2])),
      _pair(q, lm[291], 0.014, [0.4, 0.8, -0.4])                             # smile
      + _pair(q, lm[425], 0.015, [0.0, 0.5, 0.3]),
      _bump(q, mouth, 0.018) * ((q - mouth) * np.array([-25.0, 0.0, 0.0])     # pucker
                                + np.array([0.0, 0.0, 0.6])),
      _bump(q, lm[0], 0.012) * upper * np.array([0.0, 1.0, 0.3]),            # upper lip raise
      _bump(q, lm[17], 0.012) * lower * np.array([0.0, -1.0, 0.2]),          # lower lip depress
      _pair(q, lm[334], 0.02, [0.0, 1.0, 0.1]),                              # brows raise
      _pair(q, lm[336], 0.012, [-0.5, -0.7, 0.1]),                           # brows furrow
      _pair(q, lm[386], 0.009, [0.0, -1.0, 0.25]) * lid_up,                  # blink
      _pair(q, lm[374], 0.008, [0.0, -1.0, 0.0]) * lid_down
      + _pair(q, lm[386], 0.008, [0.0, 1.0, 0.0]) * lid_up,                  # eyes wide
      _pair(q, lm[425] + np.array([0.005, -0.02, -0.01]), 0.018, [0.8, 0.0, 0.6]),  # cheek puff
      _bump(q, lm[6], 0.01) * np.array([0.0, 0.6, 0.0])                      # nose wrinkle
      + _pair(q, lm[327], 0.008, [0.0, 1.0, 0.0]),
      _bump(q, mouth, 0.02) * np.array([1.0, 0.0, 0.0]),                     # mouth sideways
      _bump(q, lm[291], 0.014) * np.array([0.3, 0.8, -0.4]),                 # left smile
      _bump(q, lm[386], 0.009) * lid_up * np.array([0.0, -1.0, 0.25]),       # left blink
      _bump(q, mouth, 0.01) * np.array([0.0, 0.0, -1.0]),                    # lips roll in
      _bump(q, lm[152] + np.array([0.0, 0.012, 0.0]), 0.014)                 # chin raise
      * np.array([0.0, 1.0, 0.3]),
      _pair(q, lm[327], 0.007, [1.0, 0.0, 0.0]),                             # nostrils flare
      _pair(q, lm[336], 0.012, [0.0, 1.0, 0.0]),                             # brows inner raise
      _pair(q, lm[374], 0.008, [0.0, 1.0, 0.1]) * lid_down,                  # squint
      _bump(q, lm[334], 0.02) * np.array([0.0, 1.0, 0.1]),                   # left brow raise
  ]


def _expression_fields(context, rng, count):
  """Named fields, then random localised ones (single or mirrored pairs) around face landmarks.
  Eyeballs never deform: they only follow their eye joint."""
  fields = _expression_named(context)[:count]
  q = context.q
  face_points = context.landmarks[:468]
  mouth = 0.5 * (context.landmarks[13] + context.landmarks[14])
  lip_factors = [np.ones_like(context.jaw), 1.0 - context.jaw, context.jaw]
  while len(fields) < count:
    centre = face_points[rng.integers(len(face_points))]
    radius = rng.uniform(0.008, 0.02)
    waves = _plane_waves(rng, 0.08)
    offset = rng.normal(size=3)
    field = _bump(q, centre, radius) * (waves(q) + offset)
    if rng.uniform() < 0.5:  # a mirror-symmetric pair
      field = field + _bump(q, centre * MIRROR, radius) * (waves(q * MIRROR) + offset) * MIRROR
    if np.linalg.norm(centre - mouth) < 0.03:
      # Near the mouth a field moves the upper lip, the lower lip, or both.
      field = field * lip_factors[rng.integers(3)][:, None]
    fields.append(field)
  return [np.where(context.is_eyeball[:, None], 0.0, f) for f in fields]


def _orthonormal_basis(fields, rms, context):
  """Gram-Schmidt (QR) in the given order, then column k scaled to `rms[k]` per vertex.

  Eyeball vertices keep the rigid motion of their eye centre for identity and no expression,
  which the fields already encode through `context.q`.
  """
  matrix = np.stack([f.reshape(-1) for f in fields], axis=1)
  matrix /= np.linalg.norm(matrix, axis=0)
  # Cholesky QR: A = Q L^T with L lower triangular and a positive diagonal, so column k of Q is
  # field k minus its projection on the earlier fields and keeps the field's sense. Several
  # times faster than Householder QR for this tall, thin matrix, and accurate to about
  # cond(A)^2 * eps, which is ~1e-12 here: the fields are far from dependent (cond(A) < 100).
  lower = np.linalg.cholesky(matrix.T @ matrix)
  basis = matrix @ np.linalg.inv(lower).T
  num_vertices = context.q.shape[0]
  basis = basis * (np.asarray(rms) * np.sqrt(num_vertices))
  return basis.reshape(num_vertices, 3, len(fields))


def _compact_bump(q, centre, radius):
  """(1 - d^2 / r^2)^3 inside the radius, exactly 0 outside."""
  t = np.clip(1.0 - np.sum((q - centre) ** 2, axis=-1) / radius ** 2, 0.0, 1.0)
  return t ** 3


def _pose_correctives(context, rng):
  """(V, 3, 36) posedirs over (R_j - I) of neck, jaw, left eye, right eye (row-major)."""
  q, normals = context.q, context.normals
  skin = (~context.is_eyeball).astype(np.float64)
  posedirs = np.zeros(q.shape + (36,))

  def column(joint, row, col):
    return 9 * (joint - 1) + 3 * row + col

  # For a rotation by a small angle t about x, R[2, 1] = sin t and R[1, 2] = -sin t, so a
  # corrective split evenly over the two entries responds to the pitch only.
  def on_pitch(joint, field):
    posedirs[:, :, column(joint, 2, 1)] += 0.5 * field
    posedirs[:, :, column(joint, 1, 2)] -= 0.5 * field

  # Neck: pitching the head forward bulges the front of the neck and flattens the back.
  # (Zero at the neck's base ring, which is bound to the global joint and stays put.)
  neck_window = (np.exp(-((q[:, 1] + 0.14) / 0.035) ** 2) * skin
                 * _smoothstep(q[:, 1], NECK_BOTTOM, NECK_BOTTOM + 0.045))
  front = np.tanh((q[:, 2] - NECK_AXIS_Z) / 0.02)
  on_pitch(1, 0.02 * (neck_window * front)[:, None] * normals)
  # Jaw: the cheeks draw in as the jaw opens (only where the skin stretches, 0 < share < 1).
  jaw_window = 4.0 * context.jaw * (1.0 - context.jaw) * skin
  on_pitch(2, -0.008 * jaw_window[:, None] * normals)
  # Small smooth corrections on every neck and jaw entry, so the whole path is exercised.
  for joint, window, amplitude in ((1, neck_window, 0.003), (2, jaw_window, 0.002)):
    for entry in range(9):
      field = _random_smooth_fields(q, rng, [0.1], [True])[0]
      field *= amplitude / np.max(np.abs(field))
      posedirs[:, :, 9 * (joint - 1) + entry] += window[:, None] * field
  # Eyes: the lids follow the gaze up and down (a positive pitch turns the gaze down).
  for joint, iris_centre in ((3, LEFT_IRIS[0]), (4, RIGHT_IRIS[0])):
    near = _compact_bump(q, context.landmarks[iris_centre], 0.02) * skin
    drop = near * (0.0072 * context.upper_lid + 0.003 * (1.0 - context.upper_lid))
    on_pitch(joint, -drop[:, None] * np.array([0.0, 1.0, 0.0]))
  return posedirs


# --- The landmark embedding ----------------------------------------------------------------------

def _iris_embedding(eye: _Eyeball, points, triangle_offset):
  """Triangles of the flat iris disc under each point, and the points' barycentrics there."""
  frame = eye.disc_frame[:2]
  plane = (eye.vertices - eye.disc_centre) @ frame.T
  disc = eye.triangles[eye.disc_triangles]
  a, b, c = plane[disc[:, 0]], plane[disc[:, 1]], plane[disc[:, 2]]
  faces, barycentrics = [], []
  for point in (points - eye.disc_centre) @ frame.T:
    v0, v1, v2 = b - a, c - a, point - a
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    s = (v2[:, 0] * v1[:, 1] - v2[:, 1] * v1[:, 0]) / det
    t = (v0[:, 0] * v2[:, 1] - v0[:, 1] * v2[:, 0]) / det
    weights = np.stack([1.0 - s - t, s, t], 1)
    best = int(np.argmax(weights.min(axis=1)))
    faces.append(triangle_offset + eye.disc_triangles[best])
    barycentrics.append(np.clip(weights[best], 0.0, 1.0) / np.clip(weights[best], 0.0, 1.0).sum())
  return np.array(faces), np.array(barycentrics)


def _landmark_embedding(head: _Head, reference: MediaPipeReference, name) -> LandmarkEmbedding:
  """MediaPipe's 478 landmarks on the synthetic mesh: 0..467 are vertices of the face patch,
  468..477 lie on the flat iris discs."""
  face_triangles = head.triangles[:len(head.face.triangles)]
  face_indices = np.zeros(478, np.int64)
  barycentrics = np.zeros((478, 3))
  for corner in range(3):  # any triangle that has the landmark as a corner will do
    is_landmark = face_triangles[:, corner] < 468
    owners = np.flatnonzero(is_landmark)
    face_indices[face_triangles[owners, corner]] = owners
  for landmark in range(468):
    corner = int(np.flatnonzero(face_triangles[face_indices[landmark]] == landmark)[0])
    barycentrics[landmark, corner] = 1.0
  offset = len(head.head_triangles)
  for eye, iris, eye_offset in ((head.eyes[0], LEFT_IRIS, offset),
                                (head.eyes[1], RIGHT_IRIS, offset + len(head.eyes[0].triangles))):
    faces, bary = _iris_embedding(eye, reference.positions[iris], eye_offset)
    face_indices[iris] = faces
    barycentrics[iris] = bary
  return LandmarkEmbedding(face_indices=jnp.asarray(face_indices, jnp.int32),
                           barycentrics=jnp.asarray(barycentrics, jnp.float32),
                           landmark_indices=jnp.arange(478, dtype=jnp.int32),
                           name=f"{name}: MediaPipe 478-landmark embedding",
                           layout=MEDIAPIPE_LAYOUT)


# --- Public API ------------------------------------------------------------------------------


def _size_spec(size) -> SizeSpec:
  if size not in SIZES:
    raise ValueError(f"unknown synthetic model size {size!r}; use one of {sorted(SIZES)}")
  return SIZES[size]


def synthetic_label(size="flame", seed=0) -> str:
  """The model name / marker string: starts with "SYNTHETIC" so no one mistakes it for FLAME."""
  return (f"{SYNTHETIC_PREFIX} jflame head (size {size}, seed {seed}): procedurally generated "
          "in FLAME's format, not the FLAME model")


def _generate(size, seed):
  """(official-key arrays, MediaPipe embedding) of the synthetic model."""
  spec = _size_spec(size)
  reference = load_mediapipe_reference()
  head = _build_head(reference, spec)
  vertices = head.vertices
  num_vertices = len(vertices)
  rng = np.random.default_rng(seed)

  skin_jaw = _jaw_share(head)
  weights = _skinning_weights(head, skin_jaw)
  jaw = np.zeros(num_vertices)
  jaw[:len(skin_jaw)] = skin_jaw
  regressor = _joint_regressor(head)

  is_eyeball = np.zeros(num_vertices, bool)
  q = vertices.copy()
  for eye, members in zip(head.eyes, head.eye_vertices):
    is_eyeball[members] = True
    q[members] = eye.centre  # eyeballs move rigidly with identity, never with expression
  context = _FieldContext(q=q, normals=_vertex_normals(vertices, head.triangles), jaw=jaw,
                          upper_lid=_sigmoid((vertices[:, 1] - LID_MIDLINE) / 0.0008),
                          is_eyeball=is_eyeball, landmarks=reference.positions)
  shape_rms = 0.003 / (1.0 + np.arange(spec.num_shape))
  expression_rms = 0.0009 / np.sqrt(1.0 + np.arange(spec.num_expression))
  shapedirs = _orthonormal_basis(_identity_fields(context, rng, spec.num_shape), shape_rms,
                                 context)
  exprdirs = _orthonormal_basis(_expression_fields(context, rng, spec.num_expression),
                                expression_rms, context)
  posedirs = _pose_correctives(context, rng)

  label = synthetic_label(size, seed)
  arrays = {
      "v_template": vertices.astype(np.float64),
      "f": head.triangles.astype(np.uint32),
      "shapedirs": np.concatenate([shapedirs, exprdirs], axis=2),
      "posedirs": posedirs,
      "J_regressor": regressor,
      "weights": weights,
      "kintree_table": np.array([[ROOT_PARENT if p < 0 else p for p in PARENTS],
                                 list(range(len(PARENTS)))], np.int64),
      "J": regressor @ vertices,
      "jflame_synthetic": label,
  }
  return arrays, _landmark_embedding(head, reference, label)


def synthetic_flame_arrays(size: str = "flame", seed: int = 0) -> Dict[str, np.ndarray]:
  """The synthetic model as raw arrays under the official FLAME pickle keys.

  Args:
    size: "flame" (5023 vertices, 9976 triangles, 300 shape + 100 expression components) or
      "small" (about 1300 vertices, 20 + 10 components) for fast tests.
    seed: seeds the random parts of the bases; the same seed gives the same arrays.
  Returns:
    v_template (V, 3) float64 metres; f (F, 3) uint32; shapedirs (V, 3, S + E) float64 with the
    identity components first; posedirs (V, 3, 36); J_regressor (5, V); weights (V, 5);
    kintree_table (2, 5) int64; J (5, 3); and jflame_synthetic, the "SYNTHETIC ..." label.
  """
  return _generate(size, seed)[0]


def synthetic_flame(size: str = "flame", seed: int = 0) -> Tuple[FlameModel, LandmarkEmbedding]:
  """The synthetic model as a FlameModel (named "SYNTHETIC ...") and its MediaPipe embedding
  (all 478 landmarks, in the order MediaPipe reports them)."""
  arrays, embedding = _generate(size, seed)
  model = flame_model_from_arrays(arrays, name=arrays["jflame_synthetic"],
                                  num_expression=_size_spec(size).num_expression,
                                  source="synthetic model")
  return model, embedding
