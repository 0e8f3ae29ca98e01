"""The weight-free start (jflame.starting_point) against references written here in float64
NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from jflame.starting_point import identity_normal_equations, initial_rigid_camera


def _random_problem(seed, points=40, columns=7):
  rng = np.random.default_rng(seed)
  template = rng.normal(scale=0.08, size=(points, 3))
  basis = rng.normal(scale=0.01, size=(points, 3, columns))
  rotation = Rotation.from_rotvec(rng.normal(scale=0.3, size=3)).as_matrix()
  translation = np.array([0.02, -0.01, 0.7])
  landmarks = rng.uniform(60, 200, size=(points, 2))
  weights = rng.uniform(0.0, 2.0, size=points)
  return template, basis, landmarks, weights, rotation, translation


def test_identity_normal_equations_are_those_of_the_explicit_linearised_design():
  """Reference: the design matrix written out row by row (depth held at the template's), its
  weighted normal equations in float64."""
  template, basis, landmarks, weights, rotation, translation = _random_problem(0)
  focal, principal_point, pixel_scale = 700.0, np.array([128.0, 120.0]), 0.75
  gain = pixel_scale * focal / (template @ rotation.T + translation)[:, 2]
  w = weights / weights.sum()
  normal_reference = np.zeros((basis.shape[2],) * 2)
  rhs_reference = np.zeros(basis.shape[2])
  for k in range(len(template)):
    design = gain[k] * rotation[:2] @ basis[k]                                  # (2, N)
    at_zero = (gain[k] * (rotation[:2] @ template[k] + translation[:2])
               - (landmarks[k] - principal_point) * pixel_scale)
    normal_reference += w[k] * design.T @ design
    rhs_reference -= w[k] * design.T @ at_zero
  as32 = lambda x: jnp.asarray(x, jnp.float32)
  normal, rhs = identity_normal_equations(
      as32(template), as32(basis), as32(landmarks), as32(weights), as32(rotation),
      as32(translation), focal, as32(principal_point), pixel_scale)
  scale = np.abs(normal_reference).max()
  np.testing.assert_allclose(normal, normal_reference, atol=1e-5 * scale)
  np.testing.assert_allclose(rhs, rhs_reference, atol=1e-5 * np.abs(rhs_reference).max())


def test_identity_normal_equations_vmap_like_one_image_at_a_time():
  problems = [_random_problem(seed) for seed in range(3)]
  template, basis = (jnp.asarray(problems[0][i], jnp.float32) for i in (0, 1))
  stacked = [jnp.asarray(np.stack([p[i] for p in problems]), jnp.float32) for i in (2, 3, 4, 5)]
  batched = jax.vmap(lambda l, w, r, t: identity_normal_equations(
      template, basis, l, w, r, t, 700.0, jnp.full(2, 128.0), 1.0))(*stacked)
  for i in range(3):
    single = identity_normal_equations(template, basis, *(x[i] for x in stacked), 700.0,
                                       jnp.full(2, 128.0), 1.0)
    for got, want in zip(batched, single):
      np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))


def test_rigid_start_recovers_a_known_pose_of_a_distant_head():
  """Far away perspective is nearly weak perspective: the closed form recovers the pose."""
  rng = np.random.default_rng(3)
  points = rng.normal(scale=0.06, size=(60, 3))
  rotation = Rotation.from_rotvec([0.2, -0.3, 0.1]).as_matrix()
  translation = np.array([0.05, -0.03, 3.0])
  focal, principal_point = 2000.0, np.array([128.0, 128.0])
  camera = points @ rotation.T + translation
  pixels = focal * camera[:, :2] / camera[:, 2:] + principal_point
  got_rotation, got_translation = initial_rigid_camera(
      jnp.asarray(points, jnp.float32), jnp.asarray(pixels, jnp.float32),
      jnp.ones(60, jnp.float32), focal, jnp.asarray(principal_point, jnp.float32))
  angle = Rotation.from_matrix(np.asarray(got_rotation, np.float64) @ rotation.T).magnitude()
  assert angle < 0.02
  np.testing.assert_allclose(got_translation, translation, atol=0.03 * translation[2])
