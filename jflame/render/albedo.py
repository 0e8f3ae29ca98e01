"""Linear albedo models: albedo = mean + basis @ coefficients, per vertex or in a UV texture.

Two sources:
* `laplacian_albedo_model` (the default; needs no licensed file): a low-frequency per-vertex
  basis made of the first eigenvectors of the template mesh's graph Laplacian, one block of
  coefficients per colour channel, around a constant mid skin tone.
* `jflame.albedo_io.load_texture_albedo`: the FLAME texture space (`FLAME_texture.npz`: `mean`,
  `tex_dir`, `vt`, `ft`, values 0-255) or the BFM-derived albedo (`FLAME_albedo_from_BFM.npz`: `MU`, `PC`, values
  0-1, UVs possibly in a separate file), both from the FLAME website. Both files store 512x512
  textures with rows top-down (v = 1 at the top), channels in BGR order, flattened as
  (row, column, channel); this module converts them to RGB in [0, 1].

Host-side loading/precomputation runs in NumPy/SciPy; `vertex_albedo`, `albedo_texture` and
`pixel_albedo` are device functions for one face.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.errors import ConfigError
from jflame.render.interpolate import interpolate, interpolate_face_varying
from jflame.render.rasterize import Fragments

# A mid skin tone (image RGB in [0, 1], no gamma handling) for the built-in model's mean.
DEFAULT_SKIN_RGB = (0.70, 0.52, 0.43)


@struct.dataclass
class AlbedoModel:
  """A linear albedo model.

  Attributes:
    mean: (N, 3) RGB mean, N = V vertices or texture_size**2 texels (row-major, top row first).
    basis: (N, 3, K) directions; albedo = mean + basis @ coefficients.
    face_uvs: (F, 3, 2) texture coordinates of every triangle corner (u right, v up, in [0, 1]),
      UV domain only (None otherwise).
    vertex_uvs: (V, 2) one texture coordinate per vertex (where a vertex sits on a UV seam, one of
      its corners' coordinates), UV domain only; used by `vertex_albedo`.
    texture_size: static texture resolution in texels, 0 for the per-vertex domain.
    name: static description of where the model came from.
  """
  mean: jax.Array
  basis: jax.Array
  face_uvs: Optional[jax.Array] = None
  vertex_uvs: Optional[jax.Array] = None
  texture_size: int = struct.field(pytree_node=False, default=0)
  name: str = struct.field(pytree_node=False, default="")

  @property
  def is_texture(self) -> bool:
    return self.texture_size > 0

  @property
  def num_coefficients(self) -> int:
    return self.basis.shape[-1]


def _linear_albedo(model: AlbedoModel, coefficients):
  coefficients = coefficients.astype(model.basis.dtype)
  return model.mean + model.basis @ coefficients


def albedo_texture(model: AlbedoModel, coefficients) -> jax.Array:
  """(texture_size, texture_size, 3) RGB albedo texture of a UV-domain model."""
  if not model.is_texture:
    raise ConfigError("albedo_texture needs a UV-domain AlbedoModel; this one is per vertex.")
  size = model.texture_size
  return _linear_albedo(model, coefficients).reshape(size, size, 3)


def sample_texture(texture, uv) -> jax.Array:
  """Bilinear lookup of an (R, R, C) texture at (..., 2) UVs (u right, v up) -> (..., C).

  Texel centres sit at ((i + 0.5) / R); lookups beyond the outer texel centres clamp.
  """
  size = texture.shape[0]
  col = uv[..., 0] * size - 0.5
  row = (1.0 - uv[..., 1]) * size - 0.5
  col0 = jnp.floor(col)
  row0 = jnp.floor(row)
  fc = (col - col0)[..., None]
  fr = (row - row0)[..., None]
  col0 = col0.astype(jnp.int32)
  row0 = row0.astype(jnp.int32)
  flat = texture.reshape(size * size, -1)

  def texel(r, c):
    r = jnp.clip(r, 0, size - 1)
    c = jnp.clip(c, 0, size - 1)
    return flat[r * size + c]

  top = texel(row0, col0) * (1.0 - fc) + texel(row0, col0 + 1) * fc
  bottom = texel(row0 + 1, col0) * (1.0 - fc) + texel(row0 + 1, col0 + 1) * fc
  return top * (1.0 - fr) + bottom * fr


def vertex_albedo(model: AlbedoModel, coefficients) -> jax.Array:
  """(V, 3) RGB albedo per vertex (UV-domain models are sampled at `vertex_uvs`)."""
  if model.is_texture:
    if model.vertex_uvs is None:
      raise ConfigError("This UV-domain AlbedoModel has no vertex_uvs; load it with the mesh "
                        "faces to evaluate albedo per vertex.")
    return sample_texture(albedo_texture(model, coefficients), model.vertex_uvs)
  return _linear_albedo(model, coefficients)


def pixel_albedo(model: AlbedoModel, coefficients, fragments: Fragments, faces) -> jax.Array:
  """(H, W, 3) RGB albedo at every pixel of one image rasterized from a mesh with `faces`
  (zeros on background)."""
  if model.is_texture:
    uv = interpolate_face_varying(model.face_uvs, fragments)
    albedo = sample_texture(albedo_texture(model, coefficients), uv)
    return jnp.where(fragments.mask[..., None], albedo, 0.0)
  return interpolate(vertex_albedo(model, coefficients), fragments, faces)


def graph_laplacian(num_vertices: int, faces):
  """Host: the (V, V) uniform-weight graph Laplacian (degree - adjacency) of a triangle mesh,
  as a scipy.sparse CSR matrix."""
  import scipy.sparse as sparse
  faces = np.asarray(faces, np.int64)
  start = faces.reshape(-1)
  end = np.roll(faces, -1, axis=1).reshape(-1)
  edges = np.unique(np.sort(np.stack([start, end], 1), axis=1), axis=0)
  edges = edges[edges[:, 0] != edges[:, 1]]
  ones = np.ones(edges.shape[0])
  adjacency = sparse.coo_matrix((np.concatenate([ones, ones]),
                                 (np.concatenate([edges[:, 0], edges[:, 1]]),
                                  np.concatenate([edges[:, 1], edges[:, 0]]))),
                                shape=(num_vertices, num_vertices)).tocsr()
  degree = sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel())
  return (degree - adjacency).tocsr()


def laplacian_albedo_model(vertices, faces, num_per_channel: int = 16,
                           mean_rgb=DEFAULT_SKIN_RGB) -> AlbedoModel:
  """Host: the built-in per-vertex albedo model of a template mesh.

  The basis is the `num_per_channel` smoothest functions on the mesh (eigenvectors of the graph
  Laplacian with the smallest eigenvalues, the first ones constant on each connected part, so
  skin and eyeballs can take their own colour), scaled to unit RMS over the vertices so that a
  coefficient of 0.1 changes the albedo by about 0.1. Each colour channel has its own block of
  coefficients: coefficients = [red block, green block, blue block]. The uniform graph Laplacian
  varies fastest where vertices are dense, which on FLAME is the face, where detail is wanted.

  Note that a constant albedo change and a change of the lighting's band 0 look the same in an
  image; regularise the coefficients towards zero when fitting both.

  Args:
    vertices: (V, 3) template vertices (only their count is used).
    faces: (F, 3) triangle vertex indices.
    num_per_channel: basis functions per colour channel (K = 3 * num_per_channel).
    mean_rgb: constant mean colour.

  Returns:
    A per-vertex `AlbedoModel` with float32 arrays.
  """
  from scipy.sparse.linalg import eigsh
  num_vertices = np.asarray(vertices).shape[0]
  if not 1 <= num_per_channel < num_vertices - 1:
    raise ConfigError(f"num_per_channel must be in [1, {num_vertices - 2}] for a mesh of "
                      f"{num_vertices} vertices, got {num_per_channel}.")
  laplacian = graph_laplacian(num_vertices, faces)
  # Shift-invert around a small negative value finds the smallest eigenvalues of the singular,
  # positive semi-definite Laplacian quickly and stably; v0 makes the result deterministic.
  v0 = np.linspace(1.0, 2.0, num_vertices)
  eigenvalues, eigenvectors = eigsh(laplacian, k=num_per_channel, sigma=-1e-3, which="LM", v0=v0)
  order = np.argsort(eigenvalues)
  functions = eigenvectors[:, order] * np.sqrt(num_vertices)
  # Eigenvectors have no preferred sign: make the largest-magnitude entry positive.
  peak = functions[np.argmax(np.abs(functions), axis=0), np.arange(num_per_channel)]
  functions = functions * np.sign(peak)
  basis = np.zeros((num_vertices, 3, 3 * num_per_channel), np.float32)
  for channel in range(3):
    basis[:, channel, channel * num_per_channel:(channel + 1) * num_per_channel] = functions
  mean = np.broadcast_to(np.asarray(mean_rgb, np.float32), (num_vertices, 3))
  return AlbedoModel(mean=jnp.asarray(mean), basis=jnp.asarray(basis),
                     name=f"mesh Laplacian, {num_per_channel} per channel")
