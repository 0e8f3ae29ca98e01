"""Differentiable rasterization in JAX, split like nvdiffrast: rasterize -> interpolate ->
shade -> antialias. Every function handles one image; batch with `jax.vmap`."""

from jflame.render.albedo import (AlbedoModel, albedo_texture, laplacian_albedo_model,
                                  pixel_albedo, sample_texture, vertex_albedo)
from jflame.render.interpolate import interpolate, interpolate_face_varying
from jflame.render.pipeline import RenderOutput, render_mesh
from jflame.render.rasterize import (Fragments, RasterSettings, antialias, face_adjacency,
                                     rasterize)
from jflame.render.shading import (NEUTRAL_AMBIENT, Appearance, lambertian, neutral_lighting,
                                   sh_basis, sh_lighting_from_deca, sh_shading, vertex_normals)

__all__ = [
    "NEUTRAL_AMBIENT", "AlbedoModel", "Appearance", "Fragments", "RasterSettings", "RenderOutput",
    "albedo_texture", "antialias", "face_adjacency", "interpolate", "interpolate_face_varying",
    "lambertian", "laplacian_albedo_model", "neutral_lighting",
    "pixel_albedo", "rasterize", "render_mesh", "sample_texture", "sh_basis",
    "sh_lighting_from_deca", "sh_shading", "vertex_albedo", "vertex_normals",
]
