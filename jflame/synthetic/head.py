"""The synthetic head's mesh: sizes and proportions, the implicit cranium/jaw/neck, the
MediaPipe face patch, eyeballs, socket cups and mouth pouch, their assembly, and the rig (skinning
weights and joint regressor)."""

import dataclasses
from typing import Tuple

import numpy as np
from scipy.spatial import ConvexHull, cKDTree

from jflame.landmarks import MediaPipeReference
from jflame.synthetic.geometry import (edge_key, fan, graph_laplacian, inside_polygon,
                                       normalise, outside_loop, smoothstep, solve_dirichlet,
                                       stereographic, strip, vertex_normals)


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
  incidence = np.abs(np.sum(normalise(gradient) * probe_dirs, axis=1))
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
    normals = vertex_normals(vertices, triangles)
    corner_pairs = [(0, 1), (1, 2), (2, 0)]
    keys = np.stack([edge_key(triangles[:, i], triangles[:, j], num) for i, j in corner_pairs], 1)
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
      mids = num + np.searchsorted(unique_keys, edge_key(loop, following, num))
      return np.stack([loop, mids], 1).ravel()

    loops = [split_loop(loop) for loop in loops]
  return _FacePatch(vertices, triangles, *loops)


@dataclasses.dataclass
class Eyeball:
  vertices: np.ndarray
  triangles: np.ndarray
  centre: np.ndarray
  equator: np.ndarray       # indices (local) of the ring through the centre's plane
  disc_triangles: np.ndarray  # local triangle indices on the flat iris disc
  disc_frame: np.ndarray    # (3, 3) rows u, v, gaze
  disc_centre: np.ndarray


def _eyeball(iris_points, spec: SizeSpec) -> Eyeball:
  """A sphere with a flat iris disc fitted through MediaPipe's five iris landmarks."""
  iris_centre = iris_points[0]
  centred = iris_points - iris_points.mean(0)
  gaze = np.linalg.svd(centred)[2][2]
  gaze = gaze if gaze[2] > 0 else -gaze
  u = normalise(np.array([1.0, 0.0, 0.0]) - gaze[0] * gaze)
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
    triangles.append(strip(ring_index[k], ring_index[k + 1]))
  back = len(vertices) - 1
  triangles.append(np.stack([ring_index[-1], np.full(n, back), np.roll(ring_index[-1], -1)], 1))
  triangles = np.concatenate(triangles)
  triangles = _orient_outward(vertices, triangles, centre)
  equator_ring = spec.iris_rings + half  # index into `rings`
  num_disc = n * (2 * spec.iris_rings - 1)
  return Eyeball(vertices, triangles, centre, ring_index[equator_ring],
                  np.arange(num_disc), np.stack([u, v, gaze]), disc_centre)


def _orient_outward(vertices, triangles, centre):
  """Flips triangles whose normal points towards `centre` (for star-shaped closed parts)."""
  corners = vertices[triangles]
  normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  inward = np.sum(normal * (corners.mean(1) - centre), axis=1) < 0
  triangles = triangles.copy()
  triangles[inward] = triangles[inward][:, ::-1]
  return triangles


def _mirror_eyeball(eye: Eyeball) -> Eyeball:
  return Eyeball(eye.vertices * MIRROR, eye.triangles[:, ::-1].copy(), eye.centre * MIRROR,
                  eye.equator, eye.disc_triangles, eye.disc_frame * MIRROR,
                  eye.disc_centre * MIRROR)


def _socket_cup(loop_points, centre, rings):
  """Rings that carry an eye opening back around the eyeball to a closed cap behind it."""
  radius = EYEBALL_RADIUS + CUP_CLEARANCE
  offsets = loop_points - centre
  start_dirs = normalise(offsets)
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
    points.append(centre + normalise(dirs) * r[:, None])
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



@dataclasses.dataclass
class Head:
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
  eyes: Tuple[Eyeball, Eyeball]   # left, right
  eye_vertices: Tuple[np.ndarray, np.ndarray]
  head_triangles: np.ndarray        # triangles of the skin surface (no eyeballs)


def _neck_ring_points(count, y):
  angle = 2.0 * np.pi * np.arange(count) / count + np.pi / 2  # vertex 0 at the front
  targets = np.stack([NECK_RADII[0] * np.cos(angle), np.full(count, y),
                      NECK_AXIS_Z + NECK_RADII[1] * np.sin(angle)], 1)
  # Put each ring point on the implicit surface along the ray through its target.
  return _radial_surface(normalise(targets - RAY_CENTRE))


def _cranium(face: _FacePatch, neck_top, num_free):
  """Samples and triangulates the skull and upper neck between the face oval and the neck.

  Returns the free vertices and triangles whose indices run over
  [oval loop vertices, top neck ring, free vertices].
  """
  oval_points = face.vertices[face.face_oval]
  oval_dirs = normalise(oval_points - RAY_CENTRE)
  neck_dirs = normalise(neck_top - RAY_CENTRE)
  face_pole = normalise(oval_dirs.mean(0))
  down = np.array([0.0, -1.0, 0.0])
  oval_plane = stereographic(oval_dirs, face_pole)
  neck_plane = stereographic(neck_dirs, down)
  candidates = _surface_candidates(max(4 * num_free, 3000))
  keep = (outside_loop(candidates, oval_dirs, face_pole)
          & outside_loop(candidates, neck_dirs, down))
  candidates = _radial_surface(candidates[keep])
  seeds = np.concatenate([oval_points, neck_top])
  free = candidates[_farthest_points(candidates, seeds, num_free)]

  points = np.concatenate([oval_points, neck_top, free])
  directions = normalise(points - RAY_CENTRE)
  triangles = ConvexHull(directions).simplices
  triangles = _orient_outward(directions, triangles, np.zeros(3))
  num_oval, num_neck = len(oval_points), len(neck_top)
  centroid_dirs = normalise(directions[triangles].mean(1))
  in_oval = np.all(triangles < num_oval, axis=1)
  in_oval &= inside_polygon(stereographic(centroid_dirs, face_pole), oval_plane)
  is_neck = (triangles >= num_oval) & (triangles < num_oval + num_neck)
  in_neck = np.all(is_neck, axis=1)
  in_neck &= inside_polygon(stereographic(centroid_dirs, down), neck_plane)
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
  laplacian = graph_laplacian(len(vertices), triangles)
  bilaplacian = (laplacian.T @ laplacian).tocsr()
  result = vertices.copy()
  for axis in range(3):
    result[:, axis] = solve_dirichlet(bilaplacian, vertices[:, axis], ~movable)
  return result


def build_head(reference: MediaPipeReference, spec: SizeSpec) -> Head:
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
  neck = np.concatenate([strip(upper, lower)
                         for lower, upper in zip(neck_rings[:-1], neck_rings[1:])])
  placed = np.concatenate([placed, _orient_part(neck, placed, num_vertices)])

  def hang(loop, ring_block, rings):
    """Strips from a loop through `rings` rings of the same length, then a fan to the cap."""
    n = len(loop)
    ring_list = [loop] + [ring_block[r * n:(r + 1) * n] for r in range(rings)]
    parts = [strip(a, b) for a, b in zip(ring_list[:-1], ring_list[1:])]
    parts.append(fan(ring_list[-1], ring_block[-1]))
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
  return Head(vertices=vertices, triangles=all_triangles, num_face=num_face, face=face,
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


def jaw_shares(head: Head):
  """How much each vertex follows the jaw: a harmonic field on the skin surface, 1 on the lower
  inner lip and the chin, 0 on the upper inner lip and above the mouth, smooth in between. The
  mouth slit separates the lips, so the field jumps across it and nowhere else."""
  vertices = head.vertices
  num_skin = len(vertices) - sum(len(e) for e in head.eye_vertices)
  skin = np.ones(num_skin, bool)
  for part in (*head.cups, head.pouch):
    skin[part] = False
  keep = np.all(skin[head.head_triangles], axis=1)
  laplacian = graph_laplacian(num_skin, head.head_triangles[keep])
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
  share = smoothstep(solve_dirichlet(laplacian, values, known), 0.02, 0.98)
  # The pouch and the cups follow the lip or lid they hang from; the pouch's cap sits between.
  share[head.pouch] = np.where(head.pouch_parent >= 0, share[np.maximum(head.pouch_parent, 0)],
                               0.5)
  for cup, parent in zip(head.cups, head.cup_parent):
    share[cup] = np.where(parent >= 0, share[np.maximum(parent, 0)], 0.0)
  return share


def skinning_weights(head: Head, jaw_share):
  """(V, 5) weights: global at the neck's base, neck above, jaw on the lower face, eyes."""
  vertices = head.vertices
  num_skin = len(jaw_share)
  root_share = 1.0 - smoothstep(vertices[:num_skin, 1], NECK_BOTTOM, NECK_BOTTOM + 0.045)
  weights = np.zeros((len(vertices), 5))
  weights[:num_skin, 0] = root_share
  weights[:num_skin, 1] = (1.0 - root_share) * (1.0 - jaw_share)
  weights[:num_skin, 2] = (1.0 - root_share) * jaw_share
  weights[head.eye_vertices[0], 3] = 1.0
  weights[head.eye_vertices[1], 4] = 1.0
  return weights


def joint_regressor(head: Head):
  """(5, V) rows averaging vertex sets, so the joints move with the shape: the neck's base ring
  (global), a ring low in the neck (neck), points in front of the ears (jaw), eyeball equators."""
  regressor = np.zeros((5, len(head.vertices)))
  sets = [head.neck_rings[0], head.neck_rings[1], np.array(JAW_JOINT_LANDMARKS),
          head.eye_vertices[0][head.eyes[0].equator], head.eye_vertices[1][head.eyes[1].equator]]
  for joint, members in enumerate(sets):
    regressor[joint, members] = 1.0 / len(members)
  return regressor
