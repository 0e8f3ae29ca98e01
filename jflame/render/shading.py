"""Vertex normals, spherical-harmonics (SH) lighting and Lambertian shading.

Lighting is 9 real SH coefficients per colour channel (bands 0-2) describing incident radiance
in CAMERA space (OpenCV axes: x right, y down, z forward). jflame computes normals from
camera-space vertices (or rotates model-space normals by the camera rotation), so a surface that
faces the camera has a normal near (0, 0, -1), and light coming from the camera's side has a
negative coefficient on the z basis function (index 2).

Basis order and functions (real SH, no Condon-Shortley phase), n = (x, y, z) a unit normal:
  0: Y00 = 1/(2 sqrt(pi))
  1: sqrt(3/(4 pi)) y      2: sqrt(3/(4 pi)) z      3: sqrt(3/(4 pi)) x
  4: sqrt(15/(4 pi)) x y   5: sqrt(15/(4 pi)) y z   6: sqrt(5/(16 pi)) (3 z^2 - 1)
  7: sqrt(15/(4 pi)) x z   8: sqrt(15/(16 pi)) (x^2 - y^2)
The Lambertian convolution is folded in (Ramamoorthi & Hanrahan 2001): band l is scaled by
A_l / pi with A = (pi, 2 pi / 3, pi / 4), so `sh_shading` is the outgoing radiance of a white
Lambertian surface and colour = albedo * shading. A lighting of only coefficient 0 equal to
2 sqrt(pi) gives shading 1 everywhere (`neutral_lighting`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NUM_SH_COEFFICIENTS = 9

_BAND_OF_COEFFICIENT = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
_LAMBERT_OVER_PI = np.array([1.0, 2.0 / 3.0, 0.25])[_BAND_OF_COEFFICIENT]
_SH_NORMALISATION = np.array([
    0.5 / np.sqrt(np.pi),
    np.sqrt(3.0 / (4.0 * np.pi)), np.sqrt(3.0 / (4.0 * np.pi)), np.sqrt(3.0 / (4.0 * np.pi)),
    np.sqrt(15.0 / (4.0 * np.pi)), np.sqrt(15.0 / (4.0 * np.pi)),
    np.sqrt(5.0 / (16.0 * np.pi)),
    np.sqrt(15.0 / (4.0 * np.pi)), np.sqrt(15.0 / (16.0 * np.pi)),
])
# The ambient coefficient whose light shades every normal by exactly 1 (a Python float: module
# constants here must not start an XLA backend at import).
NEUTRAL_AMBIENT = float(1.0 / (_LAMBERT_OVER_PI[0] * _SH_NORMALISATION[0]))
# DECA's `add_SHlight` basis order, as indices into ours, for `sh_lighting_from_deca`.
_DECA_ORDER_OF_OURS = np.array([0, 2, 3, 1, 4, 6, 8, 5, 7])


@struct.dataclass
class Appearance:
  """Appearance of one face.

  Attributes:
    texture: (K,) albedo coefficients of an `AlbedoModel`.
    lighting: (9, 3) SH lighting coefficients, one column per colour channel (RGB).
  """
  texture: jax.Array
  lighting: jax.Array

  @classmethod
  def neutral(cls, num_texture: int, dtype=jnp.float32) -> "Appearance":
    """Mean albedo under uniform white light of shading 1: it renders as the albedo itself."""
    return cls(texture=jnp.zeros((num_texture,), dtype), lighting=neutral_lighting(dtype))


def neutral_lighting(dtype=jnp.float32) -> jax.Array:
  """(9, 3) ambient white light with shading exactly 1 on every normal."""
  return jnp.zeros((NUM_SH_COEFFICIENTS, 3), dtype).at[0].set(NEUTRAL_AMBIENT)


def sh_basis(normals) -> jax.Array:
  """(..., 3) unit normals -> (..., 9) real SH basis values (order in the module docstring)."""
  x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
  one = jnp.ones_like(x)
  polynomials = jnp.stack(
      [one, y, z, x, x * y, y * z, 3.0 * z * z - 1.0, x * z, x * x - y * y], axis=-1)
  return polynomials * jnp.asarray(_SH_NORMALISATION, normals.dtype)


def sh_shading(normals, sh_coefficients) -> jax.Array:
  """Lambertian SH irradiance over pi: (..., 3) unit normals, (9, 3) lighting -> (..., 3)."""
  lambert_basis = sh_basis(normals) * jnp.asarray(_LAMBERT_OVER_PI, normals.dtype)
  return lambert_basis @ sh_coefficients.astype(normals.dtype)


def lambertian(albedo, shading) -> jax.Array:
  """Diffuse colour: albedo (..., 3) times SH shading (..., 3)."""
  return albedo * shading


def sh_lighting_from_deca(deca_lighting) -> jax.Array:
  """DECA lighting (9, 3), as used by DECA's `add_SHlight`, -> the same light in this module's
  convention. DECA orders the basis [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1] and its band 1-2
  constants carry A_l instead of A_l / pi, so those coefficients are reordered and scaled by pi.
  The normals must be in the frame DECA's light was estimated in (this does not change frames).
  """
  deca_lighting = jnp.asarray(deca_lighting)
  band_scale = np.where(_BAND_OF_COEFFICIENT == 0, 1.0, np.pi)[:, None]
  return deca_lighting[_DECA_ORDER_OF_OURS] * band_scale.astype(deca_lighting.dtype)


def safe_normalize(vectors, eps=1e-12) -> jax.Array:
  """Unit vectors along (..., 3) `vectors`; zero vectors stay zero, with finite gradients."""
  squared = jnp.sum(vectors * vectors, axis=-1, keepdims=True)
  return vectors * jax.lax.rsqrt(jnp.maximum(squared, eps))


def vertex_normals(vertices, faces) -> jax.Array:
  """Area-weighted unit vertex normals of one mesh.

  Args:
    vertices: (V, 3) positions (any right-handed frame; camera space for `sh_shading`).
    faces: (F, 3) vertex indices, counter-clockwise seen from outside (FLAME's orientation).

  Returns:
    (V, 3) outward unit normals. Degenerate faces contribute nothing; a vertex with no
    non-degenerate face gets a zero normal. No NaN in values or gradients.
  """
  corners = vertices[faces]
  # The cross product's length is twice the face area: summing it weights faces by area.
  face_normals = jnp.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  summed = jnp.zeros_like(vertices).at[faces.reshape(-1)].add(
      jnp.repeat(face_normals, 3, axis=0))
  return safe_normalize(summed)
