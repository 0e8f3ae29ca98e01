"""An independent NumPy z-buffer rasterizer and small test meshes, shared by the render tests.

The reference loops over triangles, tests every pixel centre against the triangle in float64
(barycentric coordinates from areas), keeps the nearest perspective-correct depth, and also
reports how close each pixel centre is to the edges of the triangle that won it, so tests can
forgive disagreements only for centres that lie on an edge.
"""

import numpy as np
import pytest

from jflame.camera import Camera, screen_space

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")


def reference_rasterize(screen_vertices, faces, height, width, near=1e-3):
  """Returns (triangle_id (H, W), depth (H, W), barycentrics (H, W, 3), edge_distance (H, W)).

  edge_distance is the pixel centre's distance in pixels to the nearest edge of any triangle
  whose inside test it passes or nearly passes (inf for centres far from every edge).
  """
  vertices = np.asarray(screen_vertices, np.float64)
  triangle_id = -np.ones((height, width), np.int64)
  depth = np.full((height, width), np.inf)
  barycentrics = np.zeros((height, width, 3))
  edge_distance = np.full((height, width), np.inf)
  ys, xs = np.mgrid[0:height, 0:width] + 0.5
  for face_index, corner_ids in enumerate(np.asarray(faces)):
    a, b, c = vertices[corner_ids]
    if min(a[2], b[2], c[2]) <= near:
      continue
    area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    if area == 0:
      continue
    weights = []
    distances = []
    for p, q, r in ((b, c, a), (c, a, b), (a, b, c)):   # weight of the corner opposite p-q
      cross = (q[0] - p[0]) * (ys - p[1]) - (q[1] - p[1]) * (xs - p[0])
      weights.append(cross / area)
      distances.append(np.abs(cross) / np.hypot(q[0] - p[0], q[1] - p[1]))
    weights = np.stack(weights, -1)
    inside = np.all(weights >= 0, axis=-1)
    near_edge = np.all(weights >= -1e-3, axis=-1)
    edge_distance = np.where(near_edge, np.minimum(edge_distance, np.min(distances, axis=0)),
                             edge_distance)
    inverse_depth = weights @ (1.0 / np.array([a[2], b[2], c[2]]))
    pixel_depth = 1.0 / np.where(inside, inverse_depth, 1.0)
    better = inside & (pixel_depth < depth)
    triangle_id[better] = face_index
    depth[better] = pixel_depth[better]
    perspective = weights / np.array([a[2], b[2], c[2]]) / inverse_depth[..., None]
    barycentrics[better] = perspective[better]
  depth[triangle_id < 0] = 0.0
  return triangle_id, depth, barycentrics, edge_distance


_GOLDEN = (1.0 + 5.0 ** 0.5) / 2.0
_ICOSAHEDRON_VERTICES = np.array([
    [-1, _GOLDEN, 0], [1, _GOLDEN, 0], [-1, -_GOLDEN, 0], [1, -_GOLDEN, 0], [0, -1, _GOLDEN],
    [0, 1, _GOLDEN], [0, -1, -_GOLDEN], [0, 1, -_GOLDEN], [_GOLDEN, 0, -1], [_GOLDEN, 0, 1],
    [-_GOLDEN, 0, -1], [-_GOLDEN, 0, 1]])
_ICOSAHEDRON_FACES = np.array([
    [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
    [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
    [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])


def icosphere(subdivisions=2, radius=1.0):
  """(V, 3) float64 vertices and (F, 3) int32 outward (counter-clockwise) faces.

  The same mesh, vertex and face order as trimesh.creation.icosphere (checked below when trimesh
  is installed), built here so the render tests run on an image without trimesh: each step
  splits every face into four at its edge midpoints (numbered by edge, sorted by (second,
  first) vertex as trimesh's row hash sorts them) and pushes the vertices onto the sphere.
  """
  vertices = _ICOSAHEDRON_VERTICES / np.linalg.norm(_ICOSAHEDRON_VERTICES, axis=1)[:, None]
  faces = _ICOSAHEDRON_FACES
  for _ in range(subdivisions):
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, first, inverse = np.unique(edges[:, 1] * len(vertices) + edges[:, 0], return_index=True,
                                  return_inverse=True)
    mid = inverse.reshape(-1, 3) + len(vertices)
    vertices = np.concatenate([vertices, vertices[edges[first]].mean(axis=1)])
    vertices /= np.linalg.norm(vertices, axis=1)[:, None]
    faces = np.column_stack([faces[:, 0], mid[:, 0], mid[:, 2], mid[:, 0], faces[:, 1], mid[:, 1],
                             mid[:, 2], mid[:, 1], faces[:, 2], mid[:, 0], mid[:, 1],
                             mid[:, 2]]).reshape(-1, 3)
  return vertices * radius, faces.astype(np.int32)


def bumpy_head(subdivisions=2):
  """A sphere stretched into a head-like ellipsoid with a nose bump: not symmetric under any
  rotation, so pose is observable. Metres, FLAME axes (y up, z towards the viewer)."""
  vertices, faces = icosphere(subdivisions)
  nose = 0.3 * np.exp(-((vertices[:, 0] / 0.35) ** 2 + (vertices[:, 1] / 0.5) ** 2) * 4) * (
      vertices[:, 2] > 0)
  vertices = vertices * (1.0 + nose)[:, None] * np.array([0.08, 0.1, 0.09])
  return vertices, faces


def project(vertices, image_size, rotation=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0),
            fov_degrees=20.0):
  """Model-space vertices -> (V, 3) screen vertices with a frontal camera (NumPy float64)."""
  camera = Camera.frontal(image_size, fov_degrees=fov_degrees)
  camera = camera.replace(rotation=camera.rotation + np.asarray(rotation, np.float32),
                          translation=camera.translation + np.asarray(translation, np.float32))
  return np.asarray(screen_space(camera, vertices.astype(np.float32)), np.float64)


def test_reference_rasterizer_on_a_hand_computed_triangle():
  # Right triangle covering the lower-left half of a 4x4 square at depth 2: pixel centres with
  # x + y < 4 are inside.
  screen = np.array([[0.0, 0.0, 2.0], [4.0, 0.0, 2.0], [0.0, 4.0, 2.0]])
  ids, depth, bary, _ = reference_rasterize(screen, np.array([[0, 1, 2]]), 4, 4)
  ys, xs = np.mgrid[0:4, 0:4] + 0.5
  np.testing.assert_array_equal(ids >= 0, xs + ys <= 4)
  np.testing.assert_allclose(depth[ids >= 0], 2.0)
  np.testing.assert_allclose(bary[0, 0], [0.75, 0.125, 0.125])


def test_icosphere_is_trimeshs():
  trimesh = pytest.importorskip("trimesh")
  for subdivisions in range(4):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.7)
    vertices, faces = icosphere(subdivisions, 0.7)
    np.testing.assert_array_equal(faces, mesh.faces)
    np.testing.assert_allclose(vertices, mesh.vertices, atol=1e-12)
