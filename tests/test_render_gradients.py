"""Gradients of the renderer: finite differences in float64, and the silhouette derivative
against the analytic derivative of a polygon's area.

Visibility is a hard, piecewise-constant choice, so finite differences are only valid where a
tiny step moves no pixel centre across an edge and no silhouette vertex across a line of pixel
centres; the scenes below check that margin before comparing (steps are 1e-7 m ~ 1e-5 px).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jflame.camera import Camera, screen_space, to_camera_space
from jflame.render import (AlbedoModel, Appearance, RasterSettings, face_adjacency, rasterize,
                           render_mesh, vertex_normals)
from tests.precision import enable_x64
from tests.test_render_reference import bumpy_head, reference_rasterize

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

SIZE = 24


def _scene():
  """A bumpy head (80 faces) and a small quad in front of it that occludes part of it."""
  head_vertices, head_faces = bumpy_head(subdivisions=1)
  quad = np.array([[-0.02, -0.07, 0.12], [0.045, -0.06, 0.115], [0.05, 0.0, 0.11],
                   [-0.015, -0.005, 0.12]])
  vertices = np.concatenate([head_vertices, quad])
  n = len(head_vertices)
  faces = np.concatenate([head_faces, [[n, n + 1, n + 2], [n, n + 2, n + 3]]]).astype(np.int32)
  rng = np.random.default_rng(1)
  albedo = AlbedoModel(mean=jnp.asarray(rng.uniform(0.3, 0.7, (len(vertices), 3))),
                       basis=jnp.asarray(rng.normal(0.0, 0.1, (len(vertices), 3, 5))))
  lighting = np.zeros((9, 3))
  lighting[0] = 3.0
  lighting[2] = -1.0        # light from the camera's side
  lighting[1:] += rng.normal(0.0, 0.2, (8, 3))
  return vertices, faces, albedo, lighting


def _render_loss(camera, faces, neighbors, albedo, pixel_weights):
  def loss(vertices, lighting, texture):
    points = to_camera_space(camera, vertices)
    out = render_mesh(screen_space(camera, vertices), faces, vertex_normals(points, faces),
                      albedo, Appearance(texture=texture, lighting=lighting), SIZE, SIZE,
                      RasterSettings(), neighbors)
    composite = out.image + (1.0 - out.alpha[..., None]) * 0.25
    return jnp.sum(pixel_weights * composite)
  return loss


def _assert_finite_difference_margin(screen, faces, fragments):
  _, _, _, edge_distance = reference_rasterize(screen, faces, SIZE, SIZE)
  assert edge_distance.min() > 1e-3, "a pixel centre lies on an edge; move the scene"
  used = np.unique(np.concatenate([np.asarray(fragments.edge_pixel)]))
  assert used.size > 1
  line_offset = np.abs((screen[:, :2] - 0.5) - np.round(screen[:, :2] - 0.5))
  assert line_offset.min() > 1e-4, "a vertex lies on a line of pixel centres; move the scene"


def test_render_gradients_match_finite_differences():
  with enable_x64():
    vertices, faces, albedo, lighting = _scene()
    camera = Camera.frontal(SIZE)
    camera = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), camera)
    camera = camera.replace(rotation=camera.rotation + jnp.array([0.15, 0.25, 0.05]))
    neighbors = jnp.asarray(face_adjacency(faces))
    rng = np.random.default_rng(2)
    pixel_weights = jnp.asarray(rng.normal(size=(SIZE, SIZE, 3)))
    loss = jax.jit(_render_loss(camera, faces, neighbors, albedo, pixel_weights))
    args = (jnp.asarray(vertices), jnp.asarray(lighting), jnp.asarray(rng.normal(0, 0.5, 5)))

    screen = np.asarray(screen_space(camera, args[0]))
    fragments = rasterize(jnp.asarray(screen), jnp.asarray(faces), SIZE, SIZE,
                          face_neighbors=neighbors)
    _assert_finite_difference_margin(screen, faces, fragments)
    assert 0 < np.sum(fragments.mask) < SIZE * SIZE
    # Both the head and the occluding quad are visible, and the quad hides part of the head.
    visible = set(np.unique(fragments.triangle_id).tolist())
    assert {80, 81} <= visible and len(visible) > 20

    check_grads(loss, args, order=1, modes=["rev"], eps=1e-7, atol=1e-5, rtol=1e-5)

    # check_grads probes one random direction; probe more, per argument, with central
    # differences, including single silhouette vertices.
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    edge_vertices = np.unique(np.asarray(faces)[np.unique(
        np.asarray(fragments.triangle_id)[np.asarray(fragments.coverage) < 1])])
    directions = []
    for i in range(3):
      for _ in range(3):
        directions.append((i, rng.normal(size=args[i].shape)))
    for v in edge_vertices[:4]:
      single = np.zeros(args[0].shape)
      single[v] = rng.normal(size=3)
      directions.append((0, single))
    for i, direction in directions:
      step = 1e-7
      plus = list(args)
      minus = list(args)
      plus[i] = args[i] + step * direction
      minus[i] = args[i] - step * direction
      numeric = (loss(*plus) - loss(*minus)) / (2 * step)
      analytic = np.sum(np.asarray(grads[i]) * direction)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


def test_silhouette_gradient_matches_the_area_derivative():
  """d(sum of coverage)/d(scale) of a triangle scaled about its centroid must be
  d(area)/d(scale) = 2 area / scale; only the antialiased outline can supply it."""
  base = np.array([[8.3, 6.1], [33.7, 11.4], [14.2, 34.6]])
  centroid = base.mean(0)
  faces = np.array([[0, 1, 2]], np.int32)

  def coverage_sum(scale, shift):
    xy = centroid + scale * (base - centroid) + shift
    screen = jnp.concatenate([xy, jnp.full((3, 1), 2.0)], axis=1)
    return jnp.sum(rasterize(screen, faces, 40, 40).coverage)

  grad_fn = jax.jit(jax.grad(coverage_sum, argnums=(0, 1)))
  edge_1, edge_2 = base[1] - base[0], base[2] - base[0]
  area = 0.5 * abs(edge_1[0] * edge_2[1] - edge_1[1] * edge_2[0])  # np.cross of 2-D: deprecated
  for scale in (0.9, 1.0, 1.05):
    d_scale, d_shift = grad_fn(jnp.float32(scale), jnp.zeros(2, jnp.float32))
    np.testing.assert_allclose(d_scale, 2 * area * scale, rtol=0.03)
    # Translation does not change the area.
    assert np.all(np.abs(d_shift) < 0.03 * 2 * area * scale / 10)


def test_gradients_stay_finite_with_degenerate_faces_and_points_behind_the_camera():
  screen = jnp.asarray([[5.0, 5.0, 1.0], [20.0, 6.0, 1.0], [6.0, 18.0, 1.0],   # fine
                        [10.0, 10.0, -1.0], [12.0, 10.0, 1.0], [9.0, 3.0, 0.0],  # behind / at 0
                        [3.0, 3.0, 1.0]], jnp.float32)
  faces = jnp.asarray([[0, 1, 2], [3, 4, 5], [6, 6, 6], [0, 0, 1]], jnp.int32)
  neighbors = jnp.asarray(face_adjacency(np.asarray(faces)))

  def loss(screen):
    out = rasterize(screen, faces, 24, 24, face_neighbors=neighbors)
    normals = vertex_normals(screen, faces)
    return (jnp.sum(out.coverage) + jnp.sum(out.depth) + jnp.sum(out.barycentrics ** 2)
            + jnp.sum(normals))

  grad = jax.jit(jax.grad(loss))(screen)
  assert np.all(np.isfinite(grad))
  assert np.any(grad[:3] != 0)
