"""Rasterizer and interpolation against the independent NumPy z-buffer in test_render_reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import ConvexHull

from jflame.errors import ConfigError
from jflame.render import (RasterSettings, antialias, face_adjacency, interpolate,
                           interpolate_face_varying, rasterize)
from tests.test_render_reference import icosphere, project, reference_rasterize

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

# Three triangles at different depths that overlap each other and cross the image border.
OVERLAP_SCREEN = np.array([
    [3.2, 4.1, 2.0], [40.3, 9.7, 2.5], [12.6, 30.9, 3.0],      # back, tilted in depth
    [20.1, 2.3, 1.5], [37.9, 28.8, 1.2], [5.3, 25.7, 1.8],     # front
    [-10.0, 12.2, 1.6], [30.4, 17.9, 1.6], [14.1, 40.0, 1.6],  # middle, crosses the border
])
OVERLAP_FACES = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.int32)


def _check_against_reference(fragments, screen, faces, height, width):
  ids, depth, bary, edge_distance = reference_rasterize(screen, faces, height, width)
  got = np.asarray(fragments.triangle_id)
  disagree = got != ids
  # Only pixel centres lying on an edge (float32 vs float64) may go either way.
  assert np.all(edge_distance[disagree] < 1e-3), np.argwhere(disagree)
  assert np.sum(~disagree & (ids >= 0)) > 0.95 * np.sum(ids >= 0)
  same = ~disagree & (ids >= 0)
  np.testing.assert_allclose(np.asarray(fragments.depth)[same], depth[same], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fragments.barycentrics)[same], bary[same], atol=2e-5)
  assert np.all(np.asarray(fragments.barycentrics)[ids < 0] == 0)
  assert np.all(np.asarray(fragments.depth)[got < 0] == 0)
  vertex_ids = np.asarray(fragments.vertex_ids)
  np.testing.assert_array_equal(vertex_ids[same], faces[ids[same]])
  return ids


MANY_TRIPS = RasterSettings(tile_size=2, tiles_per_step=3)   # many trips of the tile loop


@pytest.mark.parametrize("settings", [RasterSettings(), MANY_TRIPS])
def test_overlapping_triangles_match_reference(settings):
  fragments = rasterize(jnp.asarray(OVERLAP_SCREEN, jnp.float32), OVERLAP_FACES, 36, 44, settings)
  ids = _check_against_reference(fragments, OVERLAP_SCREEN, OVERLAP_FACES, 36, 44)
  assert set(np.unique(ids)) == {-1, 0, 1, 2}


def _sphere_screen(translation):
  """An icosphere (320 faces) in the non-square 40 x 56 image the sphere tests share."""
  vertices, faces = icosphere(2)
  screen = project(vertices * 0.08, 48, translation=translation)
  screen[:, 0] += (56 - 48) / 2
  screen[:, 1] += (40 - 48) / 2
  return screen, faces


def test_sphere_matches_reference_in_a_non_square_image():
  screen, faces = _sphere_screen((0.01, -0.005, 0.0))
  height, width = 40, 56
  fragments = rasterize(jnp.asarray(screen, jnp.float32), faces, height, width)
  ids = _check_against_reference(fragments, screen, faces, height, width)
  assert len(np.unique(ids)) > 100
  culled = rasterize(jnp.asarray(screen, jnp.float32), faces, height, width,
                     RasterSettings(cull_backfaces=True))
  # A closed mesh looks the same with its back faces culled.
  np.testing.assert_array_equal(culled.triangle_id, fragments.triangle_id)


def test_triangle_larger_than_the_image_has_no_holes():
  # One triangle far larger than the image (and any tile), plus two small ones behind it.
  screen = np.array([[-50.0, -20.0, 1.0], [300.0, 10.0, 2.0], [10.0, 260.0, 3.0],
                     [0.0, 0.0, 5.0], [1.0, 0.0, 5.0], [0.0, 1.0, 5.0],
                     [20.0, 20.0, 5.0], [30.0, 20.0, 5.0], [20.0, 30.0, 5.0]])
  for settings in (RasterSettings(), MANY_TRIPS):
    fragments = rasterize(jnp.asarray(screen, jnp.float32), OVERLAP_FACES, 36, 44, settings)
    assert np.all(np.asarray(fragments.triangle_id) == 0)
    _check_against_reference(fragments, screen, OVERLAP_FACES, 36, 44)
    np.testing.assert_allclose(fragments.coverage, 1.0)


def test_shared_edges_through_pixel_centres_leave_no_cracks():
  # A grid of squares, each split into two triangles, with every vertex and diagonal passing
  # exactly through pixel centres: each centre on a shared edge must still be covered once.
  n = 6
  ij = np.stack(np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"), -1).reshape(-1, 2)
  screen = np.concatenate([ij * 4.0 + 2.5, 2.0 + 0.01 * ij[:, :1]], 1)
  index = lambda i, j: i * (n + 1) + j
  faces = []
  for i in range(n):
    for j in range(n):
      faces += [[index(i, j), index(i + 1, j), index(i + 1, j + 1)],
                [index(i, j), index(i + 1, j + 1), index(i, j + 1)]]
  faces = np.asarray(faces, np.int32)
  fragments = rasterize(jnp.asarray(screen, jnp.float32), faces, 30, 30)
  covered = np.asarray(fragments.mask)
  expected = np.zeros((30, 30), bool)
  expected[2:27, 2:27] = True           # centres 2.5 .. 26.5 inclusive
  np.testing.assert_array_equal(covered, expected)


def test_soft_coverage_integrates_to_the_silhouette_area():
  hard_errors, soft_errors = [], []
  for shift in np.linspace(0.0, 0.004, 5):
    screen, faces = _sphere_screen((0.01 + shift, 0.02 - shift, 0.0))
    fragments = rasterize(jnp.asarray(screen, jnp.float32), faces, 40, 56)
    coverage = np.asarray(fragments.coverage)
    # The projection of a convex mesh is the convex hull of its projected vertices.
    area = ConvexHull(screen[:, :2]).volume
    soft_errors.append(abs(coverage.sum() - area))
    hard_errors.append(abs(np.sum(fragments.mask) - area))
    assert soft_errors[-1] < 1e-3 * area + 0.3
    assert coverage.min() >= 0 and coverage.max() <= 1
    partial = (coverage > 0) & (coverage < 1)
    assert 60 < partial.sum() < 140           # about the outline's length in pixels
  # Hard pixel counting is off by far more: antialiasing is doing the work.
  assert np.mean(hard_errors) > 4 * np.mean(soft_errors)


def test_occlusion_boundary_is_antialiased_with_topology():
  # A small square in front of a large one: the small square's outline over the large one is an
  # occlusion boundary; the far square's colour must blend in along it.
  screen = np.array([[2, 2, 3.0], [30, 2, 3.0], [30, 30, 3.0], [2, 30, 3.0],
                     [10.3, 10.6, 1.0], [20.6, 10.3, 1.0], [20.2, 20.7, 1.0], [10.7, 20.2, 1.0]])
  faces = np.array([[0, 2, 1], [0, 3, 2], [4, 6, 5], [4, 7, 6]], np.int32)
  fragments = rasterize(jnp.asarray(screen, jnp.float32), faces, 32, 32)
  colour = np.where(np.asarray(fragments.triangle_id)[..., None] >= 2, 1.0, 0.0)
  blended = np.asarray(antialias(jnp.asarray(colour, jnp.float32), fragments))[..., 0]
  # Integrated colour equals the near square's exact area (a quadrilateral).
  x, y = screen[4:8, 0], screen[4:8, 1]
  area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
  assert abs(blended.sum() - area) < 0.02 * area
  assert abs(colour.sum() - area) > 3 * abs(blended.sum() - area)


def test_vmap_over_different_meshes_matches_single_renders():
  sphere_vertices, sphere_faces = icosphere(1)
  meshes = [(project(sphere_vertices * 0.1, 40), sphere_faces),
            (project(sphere_vertices * 0.07, 40, rotation=(0.2, 0.1, 0.0),
                     translation=(0.02, 0, 0)), sphere_faces),
            (np.concatenate([OVERLAP_SCREEN, np.zeros((sphere_vertices.shape[0] - 9, 3))]),
             OVERLAP_FACES)]
  num_faces = sphere_faces.shape[0]
  # Pad every topology to the same face count with degenerate faces, which draw nothing.
  faces = np.stack([np.concatenate([f, np.zeros((num_faces - len(f), 3), np.int32)])
                    for _, f in meshes])
  screens = np.stack([s for s, _ in meshes]).astype(np.float32)
  neighbors = np.stack([face_adjacency(f) for f in faces])
  settings = RasterSettings()
  batched = jax.vmap(lambda s, f, n: rasterize(s, f, 40, 40, settings, n))(
      screens, faces, neighbors)
  for i in range(3):
    single = rasterize(screens[i], faces[i], 40, 40, settings, neighbors[i])
    np.testing.assert_array_equal(batched.triangle_id[i], single.triangle_id)
    for name in ("barycentrics", "depth", "coverage", "edge_weight"):
      np.testing.assert_allclose(getattr(batched, name)[i], getattr(single, name), atol=1e-6)
  assert len({int(np.sum(batched.triangle_id[i] >= 0)) for i in range(3)}) == 3


def test_triangles_behind_the_camera_are_not_drawn():
  screen = np.array([[5.0, 5.0, 1.0], [25.0, 5.0, -1.0], [5.0, 25.0, 1.0],
                     [2.0, 2.0, 2.0], [8.0, 2.0, 2.0], [2.0, 8.0, 2.0],
                     [30.0, 30.0, 0.0], [40.0, 30.0, 2.0], [30.0, 34.0, 2.0]])
  fragments = rasterize(jnp.asarray(screen, jnp.float32), OVERLAP_FACES, 36, 44)
  assert set(np.unique(fragments.triangle_id)) == {-1, 1}
  assert np.all(np.isfinite(fragments.depth)) and np.all(np.isfinite(fragments.barycentrics))


def test_interpolation_matches_reference():
  screen = OVERLAP_SCREEN
  fragments = rasterize(jnp.asarray(screen, jnp.float32), OVERLAP_FACES, 36, 44)
  ids, _, bary, _ = reference_rasterize(screen, OVERLAP_FACES, 36, 44)
  same = np.asarray(fragments.triangle_id) == ids
  rng = np.random.default_rng(0)
  per_vertex = rng.normal(size=(9, 4))
  face_varying = rng.normal(size=(3, 3, 2))
  got_vertex = np.asarray(interpolate(jnp.asarray(per_vertex, jnp.float32), fragments,
                                      OVERLAP_FACES))
  got_face = np.asarray(interpolate_face_varying(jnp.asarray(face_varying, jnp.float32),
                                                 fragments))
  hit = same & (ids >= 0)
  expected_vertex = np.einsum("hwk,hwkc->hwc", bary, per_vertex[OVERLAP_FACES[np.maximum(ids, 0)]])
  expected_face = np.einsum("hwk,hwkc->hwc", bary, face_varying[np.maximum(ids, 0)])
  np.testing.assert_allclose(got_vertex[hit], expected_vertex[hit], atol=1e-4)
  np.testing.assert_allclose(got_face[hit], expected_face[hit], atol=1e-4)
  assert np.all(got_vertex[ids < 0] == 0) and np.all(got_face[ids < 0] == 0)


def test_face_adjacency():
  tetrahedron = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
  neighbors = face_adjacency(tetrahedron)
  for f, corners in enumerate(tetrahedron):
    for k in range(3):
      edge = {corners[k], corners[(k + 1) % 3]}
      other = neighbors[f, k]
      assert other != f and edge <= set(tetrahedron[other])
  np.testing.assert_array_equal(face_adjacency(np.array([[0, 1, 2]])), [[-1, -1, -1]])


def test_configuration_errors():
  with pytest.raises(ConfigError, match="tile_size"):
    RasterSettings(tile_size=0)
  with pytest.raises(ConfigError, match="face_neighbors"):
    jax.jit(lambda s, f: rasterize(s, f, 8, 8).coverage)(
        jnp.asarray(OVERLAP_SCREEN, jnp.float32), OVERLAP_FACES)
  # Without antialiasing no topology is needed, and coverage is the hard mask.
  fragments = jax.jit(lambda s, f: rasterize(s, f, 8, 8, RasterSettings(antialias=False)))(
      jnp.asarray(OVERLAP_SCREEN, jnp.float32), OVERLAP_FACES)
  np.testing.assert_array_equal(fragments.coverage, fragments.mask)
