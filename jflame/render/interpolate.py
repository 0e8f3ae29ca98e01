"""Attribute interpolation over rasterized fragments (the nvdiffrast `interpolate` primitive).

Both functions handle one image; background pixels get zeros. They are differentiable w.r.t. the
attributes and, through the barycentrics, w.r.t. the screen vertices.
"""

import jax
import jax.numpy as jnp

from jflame.render.rasterize import Fragments


def interpolate(vertex_attributes, fragments: Fragments, faces) -> jax.Array:
  """Per-vertex attributes (V, C) of a mesh with `faces` (F, 3) -> (H, W, C) at every pixel
  centre."""
  return interpolate_face_varying(vertex_attributes[faces], fragments)


def interpolate_face_varying(face_attributes, fragments: Fragments) -> jax.Array:
  """Face-varying attributes (F, 3, C), one value per triangle corner (UVs with seams) ->
  (H, W, C)."""
  num_faces, _, channels = face_attributes.shape
  # One gather of all three corners' values per pixel (cheaper under vmap than three).
  corner_values = face_attributes.reshape(num_faces, 3 * channels)[
      jnp.maximum(fragments.triangle_id, 0)]
  return _blend(corner_values.reshape(corner_values.shape[:2] + (3, channels)), fragments)


def _blend(corner_values, fragments):
  # Background barycentrics are zero, so background pixels come out as zeros.
  # An explicit sum over the three corners: as an einsum this becomes one tiny matrix product
  # per pixel, which XLA on CPU runs far slower than three fused multiply-adds.
  weights = fragments.barycentrics.astype(corner_values.dtype)
  return sum(weights[..., k, None] * corner_values[..., k, :] for k in range(3))
