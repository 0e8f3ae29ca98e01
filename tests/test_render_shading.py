"""SH lighting against independent formulas, normals, and the render pipeline's shading."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import lpmv

from jflame.render import (AlbedoModel, Appearance, neutral_lighting, render_mesh, sh_basis,
                           sh_lighting_from_deca, sh_shading, vertex_normals)
from tests.test_render_reference import icosphere, project

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

# (l, m) of each coefficient in the module's documented order.
LM = [(0, 0), (1, -1), (1, 0), (1, 1), (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]


def _unit_vectors(n, seed=0):
  v = np.random.default_rng(seed).normal(size=(n, 3))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def _real_sh_reference(l, m, normals):
  """Real SH from the associated Legendre functions (Condon-Shortley phase removed)."""
  x, y, z = normals.T
  polar, azimuth = np.arccos(np.clip(z, -1, 1)), np.arctan2(y, x)
  am = abs(m)
  norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
  legendre = (-1) ** am * lpmv(am, l, np.cos(polar))
  if m > 0:
    return math.sqrt(2) * norm * legendre * np.cos(am * azimuth)
  if m < 0:
    return math.sqrt(2) * norm * legendre * np.sin(am * azimuth)
  return norm * legendre


def test_sh_basis_matches_legendre_definition():
  normals = _unit_vectors(50)
  basis = np.asarray(sh_basis(jnp.asarray(normals)))
  for k, (l, m) in enumerate(LM):
    np.testing.assert_allclose(basis[:, k], _real_sh_reference(l, m, normals), atol=1e-6)


def test_sh_shading_is_the_lambertian_integral_of_the_light():
  """For incident radiance L(w) = sum_k c_k Y_k(w), a white Lambertian surface reflects
  (1 / pi) * integral of max(0, n . w) L(w) dw; check by numerical quadrature."""
  rng = np.random.default_rng(3)
  coefficients = rng.normal(size=(9, 3))
  polar = (np.arange(400) + 0.5) * np.pi / 400
  azimuth = (np.arange(800) + 0.5) * 2 * np.pi / 800
  polar, azimuth = np.meshgrid(polar, azimuth, indexing="ij")
  directions = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth),
                         np.cos(polar)], -1).reshape(-1, 3)
  solid_angle = (np.sin(polar) * (np.pi / 400) * (2 * np.pi / 800)).reshape(-1)
  radiance = np.stack([_real_sh_reference(l, m, directions) for l, m in LM], -1) @ coefficients
  normals = _unit_vectors(6, seed=4)
  cosine = np.maximum(directions @ normals.T, 0.0)                       # (D, N)
  expected = (cosine * solid_angle[:, None]).T @ radiance / np.pi
  got = np.asarray(sh_shading(jnp.asarray(normals), jnp.asarray(coefficients)))
  np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


def test_neutral_lighting_shades_every_normal_with_one():
  shading = sh_shading(jnp.asarray(_unit_vectors(20)), neutral_lighting())
  np.testing.assert_allclose(shading, 1.0, rtol=1e-6)


def test_deca_lighting_conversion_reproduces_deca_shading():
  # DECA's add_SHlight, written out: basis [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1] times
  # its constant factors.
  pi = np.pi
  factors = np.array([1 / np.sqrt(4 * pi), (2 * pi / 3) * np.sqrt(3 / (4 * pi)),
                      (2 * pi / 3) * np.sqrt(3 / (4 * pi)), (2 * pi / 3) * np.sqrt(3 / (4 * pi)),
                      (pi / 4) * 3 * np.sqrt(5 / (12 * pi)), (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
                      (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
                      (pi / 4) * 1.5 * np.sqrt(5 / (12 * pi)),
                      (pi / 4) * 0.5 * np.sqrt(5 / (4 * pi))])
  normals = _unit_vectors(30, seed=5)
  x, y, z = normals.T
  deca_basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                         3 * z * z - 1], -1) * factors
  light = np.random.default_rng(6).normal(size=(9, 3))
  expected = deca_basis @ light
  got = sh_shading(jnp.asarray(normals), sh_lighting_from_deca(jnp.asarray(light)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_vertex_normals_of_a_sphere_point_outward():
  vertices, faces = icosphere(3)
  normals = np.asarray(vertex_normals(jnp.asarray(vertices, jnp.float32), jnp.asarray(faces)))
  np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, rtol=1e-5)
  assert np.min(np.sum(normals * vertices, axis=1)) > 0.999
  # Area weighting: a vertex's normal is the normalised sum of its faces' area vectors.
  corners = vertices[faces]
  area_vectors = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  expected = np.zeros_like(vertices)
  np.add.at(expected, faces.reshape(-1), np.repeat(area_vectors, 3, axis=0))
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(normals, expected, atol=1e-5)


def test_vertex_normals_are_safe_for_degenerate_faces():
  vertices = jnp.asarray([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5], [2, 2, 2]], jnp.float32)
  faces = jnp.asarray([[0, 1, 2], [3, 3, 3], [4, 4, 0]], jnp.int32)
  normals = vertex_normals(vertices, faces)
  np.testing.assert_allclose(normals[:3], [[0, 0, 1]] * 3, atol=1e-6)
  np.testing.assert_array_equal(normals[3:], 0.0)
  grad = jax.grad(lambda v: jnp.sum(vertex_normals(v, faces) * jnp.arange(15.).reshape(5, 3)))(
      vertices)
  assert np.all(np.isfinite(grad))


def test_render_mesh_shades_and_leaves_background_empty():
  vertices, faces = icosphere(2)
  size = 32
  screen = project(vertices * 0.08, size)
  colour = np.array([0.6, 0.4, 0.2])
  albedo = AlbedoModel(mean=jnp.asarray(np.tile(colour, (len(vertices), 1)), jnp.float32),
                       basis=jnp.zeros((len(vertices), 3, 1), jnp.float32))
  # Normals in camera space: the frontal camera flips y and z.
  normals = jnp.asarray(vertices * np.array([1, -1, -1]), jnp.float32)
  neutral = Appearance.neutral(1)
  out = render_mesh(jnp.asarray(screen, jnp.float32), jnp.asarray(faces), normals, albedo,
                    neutral, size, size)
  mask = np.asarray(out.fragments.mask)
  image = np.asarray(out.image)
  alpha = np.asarray(out.alpha)
  # Neutral light: the image is the albedo, premultiplied by alpha.
  np.testing.assert_allclose(image, alpha[..., None] * colour, atol=1e-5)
  far = ~mask & (alpha == 0)
  assert far.sum() > 0.3 * size * size and np.all(image[far] == 0)
  # Light from the camera's side (negative z coefficient): the centre, facing the camera, is
  # brighter than the rim, and brighter than under neutral light.
  lit = neutral.replace(lighting=neutral.lighting.at[2].set(-2.0))
  lit_image = np.asarray(render_mesh(jnp.asarray(screen, jnp.float32), jnp.asarray(faces),
                                     normals, albedo, lit, size, size).image)
  centre = lit_image[size // 2, size // 2]
  assert np.all(centre > colour * 1.5)
  rim_row = np.argmax(mask[:, size // 2])
  assert np.all(lit_image[rim_row + 1, size // 2] < 0.9 * centre)
