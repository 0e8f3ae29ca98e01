"""Inverse rendering: recover known parameters by gradient descent through the renderer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jflame.camera import Camera, screen_space, to_camera_space
from jflame.render import (AlbedoModel, Appearance, RasterSettings, face_adjacency,
                           neutral_lighting, rasterize, render_mesh, sh_shading,
                           vertex_normals)
from tests.test_render_reference import bumpy_head, icosphere, project

SIZE = 64
BACKGROUND = 0.2


def _fit(loss, params, steps, learning_rate):
  """Adam with a decaying step, all steps in one compiled lax.scan."""
  schedule = optax.exponential_decay(learning_rate, steps, 0.02)
  optimizer = optax.adam(schedule)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), value
    (params, _), values = jax.lax.scan(step, (params, optimizer.init(params)), None, steps)
    return params, values

  return run(params)


def test_recovers_pose_lighting_and_albedo():
  vertices, faces = bumpy_head(subdivisions=3)
  neighbors = jnp.asarray(face_adjacency(faces))
  faces = jnp.asarray(faces)
  num_vertices = len(vertices)
  rng = np.random.default_rng(0)
  # A per-vertex albedo basis of random patterns: unlike smooth ones, they cannot be mistaken
  # for shading, so the coefficients are identifiable.
  albedo = AlbedoModel(
      mean=jnp.asarray(np.tile([0.6, 0.45, 0.35], (num_vertices, 1)), jnp.float32),
      basis=jnp.asarray(rng.normal(0.0, 0.15, (num_vertices, 3, 6)), jnp.float32))
  base_camera = Camera.frontal(SIZE)
  vertices = jnp.asarray(vertices, jnp.float32)

  def render(params):
    camera = base_camera.replace(rotation=base_camera.rotation + params["rotation"],
                                 translation=base_camera.translation
                                 + 0.01 * params["translation_cm"])
    points = to_camera_space(camera, vertices)
    out = render_mesh(screen_space(camera, vertices), faces, vertex_normals(points, faces),
                      albedo, Appearance(params["texture"], params["lighting"]), SIZE, SIZE,
                      RasterSettings(cull_backfaces=True), neighbors)
    return out.image + (1.0 - out.alpha[..., None]) * BACKGROUND

  lighting = np.asarray(neutral_lighting()) * 0.7
  lighting[2] -= 1.8                                      # key light from the camera side
  lighting[3] += 0.6                                      # and from the subject's left
  lighting[4:] += rng.normal(0.0, 0.25, (5, 3))
  truth = {"rotation": jnp.asarray([0.06, -0.09, 0.04], jnp.float32),
           "translation_cm": jnp.asarray([0.4, -0.3, 1.0], jnp.float32),
           "lighting": jnp.asarray(lighting, jnp.float32),
           "texture": jnp.asarray(rng.normal(0.0, 0.7, 6), jnp.float32)}
  target = render(truth)
  target_mask = jnp.any(target != BACKGROUND, axis=-1)
  start = {"rotation": jnp.zeros(3), "translation_cm": jnp.zeros(3),
           "lighting": neutral_lighting(), "texture": jnp.zeros(6)}

  def loss(params):
    return jnp.mean((render(params) - target) ** 2)

  fitted, values = _fit(loss, start, steps=300, learning_rate=0.05)
  assert float(loss(start)) > 100 * float(values[-1])
  assert float(values[-1]) < 2e-5
  np.testing.assert_allclose(fitted["rotation"], truth["rotation"], atol=4e-3)
  # Sideways shifts move the outline directly; depth only scales the image slightly.
  np.testing.assert_allclose(fitted["translation_cm"][:2], truth["translation_cm"][:2], atol=0.05)
  np.testing.assert_allclose(fitted["translation_cm"][2], truth["translation_cm"][2], atol=0.15)
  np.testing.assert_allclose(fitted["texture"], truth["texture"], atol=0.05)
  # One view sees only normals facing the camera, and over a hemisphere some combinations of
  # SH coefficients look alike, so compare the light where it is seen well: the shading of the
  # visible vertices whose normals face the camera (not grazing ones at the outline).
  camera = base_camera.replace(rotation=base_camera.rotation + truth["rotation"])
  normals = vertex_normals(to_camera_space(camera, vertices), faces)
  screen = screen_space(camera, vertices)
  seen = np.unique(np.asarray(rasterize(screen, faces, SIZE, SIZE, face_neighbors=neighbors)
                              .vertex_ids)[np.asarray(target_mask)])
  normals = normals[seen]
  normals = normals[normals[:, 2] < -0.5]
  assert normals.shape[0] > 100
  fitted_shading = sh_shading(normals, fitted["lighting"])
  true_shading = sh_shading(normals, truth["lighting"])
  np.testing.assert_allclose(fitted_shading, true_shading, atol=0.04 * float(true_shading.max()))
  start_shading = sh_shading(normals, start["lighting"])
  assert float(jnp.abs(start_shading - true_shading).max()) > 0.3


def test_soft_silhouette_pulls_a_misplaced_mesh_onto_its_target():
  vertices, faces = icosphere(2)
  screen = jnp.asarray(project(vertices * 0.08, 48), jnp.float32)
  neighbors = jnp.asarray(face_adjacency(faces))
  faces = jnp.asarray(faces)

  def coverage(shift, antialias=True):
    moved = screen.at[:, :2].add(shift)
    return rasterize(moved, faces, 48, 48, RasterSettings(antialias=antialias),
                     neighbors).coverage

  target = coverage(jnp.zeros(2))
  start = jnp.asarray([3.3, -2.6], jnp.float32)           # pixels
  for antialias, should_move in ((True, True), (False, False)):
    loss = lambda shift: jnp.sum((coverage(shift, antialias) - target) ** 2)
    fitted, values = _fit(loss, start, steps=150, learning_rate=0.3)
    if should_move:
      assert np.linalg.norm(fitted) < 0.1 * np.linalg.norm(start)
      assert float(values[-1]) < 0.01 * float(values[0])
    else:
      # A hard mask has no gradient: the mesh stays where it was.
      np.testing.assert_allclose(fitted, start)
