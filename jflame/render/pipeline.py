"""`render_mesh`: rasterize -> shade -> interpolate -> antialias for one image.

The photometric fit calls this inside jit(vmap(...)) inside a lax.scan of hundreds of steps, so
forward + gradient cost per image is what matters. Lighting is therefore evaluated per vertex
and the lit colour interpolated across each triangle (Gouraud shading): the SH lighting is low
frequency and FLAME's triangles cover a few pixels, so this matches per-pixel evaluation of
interpolated normals closely, while the per-pixel work shrinks to interpolating three channels
(plus a texture lookup for UV albedo).
"""

from typing import Optional

import jax
from flax import struct

from jflame.render.albedo import AlbedoModel, pixel_albedo, vertex_albedo
from jflame.render.interpolate import interpolate
from jflame.render.rasterize import Fragments, RasterSettings, antialias, rasterize
from jflame.render.shading import Appearance, lambertian, sh_shading


@struct.dataclass
class RenderOutput:
  """A rendered image.

  Attributes:
    image: (H, W, 3) RGB with premultiplied alpha (zero on background): composite over a
      background B as image + (1 - alpha) * B.
    alpha: (H, W) soft coverage in [0, 1] (antialiased; differentiable at the outline).
    fragments: the rasterizer's per-pixel data.
  """
  image: jax.Array
  alpha: jax.Array
  fragments: Fragments


def render_mesh(screen_vertices, faces, vertex_normals, albedo_model: AlbedoModel,
                appearance: Appearance, height: int, width: int,
                settings: RasterSettings = RasterSettings(),
                face_neighbors: Optional[jax.Array] = None) -> RenderOutput:
  """Renders one Lambertian, SH-lit mesh.

  Args:
    screen_vertices: (V, 3) (x_pixel, y_pixel, depth) from `jflame.camera.screen_space`.
    faces: (F, 3) int32 triangle vertex indices.
    vertex_normals: (V, 3) unit normals in camera space (`vertex_normals` of the camera-space
      vertices).
    albedo_model: per-vertex or UV `AlbedoModel`.
    appearance: albedo coefficients (K,) and SH lighting (9, 3) in camera space.
    height, width: static image size.
    settings: static `RasterSettings`.
    face_neighbors: (F, 3) `face_adjacency(faces)`, computed once on the host; required for
      antialiasing when `faces` is traced (see `rasterize`).

  Returns:
    `RenderOutput`; image and alpha are differentiable w.r.t. the vertices, normals, albedo
    coefficients and lighting. Background pixels are zero in both.
  """
  fragments = rasterize(screen_vertices, faces, height, width, settings, face_neighbors)
  shading = sh_shading(vertex_normals, appearance.lighting)              # (V, 3)
  if albedo_model.is_texture:
    albedo = pixel_albedo(albedo_model, appearance.texture, fragments, faces)
    colour = lambertian(albedo, interpolate(shading, fragments, faces))
  else:
    albedo = vertex_albedo(albedo_model, appearance.texture).astype(shading.dtype)
    colour = interpolate(lambertian(albedo, shading), fragments, faces)
  if settings.antialias:
    colour = antialias(colour, fragments)
  return RenderOutput(image=colour, alpha=fragments.coverage, fragments=fragments)
