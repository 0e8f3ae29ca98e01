"""Linear albedo models: albedo = mean + basis @ coefficients, per vertex or in a UV texture.

Two sources:
* `laplacian_albedo_model` (the default; needs no licensed file): a low-frequency per-vertex
  basis made of the first eigenvectors of the template mesh's graph Laplacian, one block of
  coefficients per colour channel, around a constant mid skin tone.
* `load_texture_albedo`: the FLAME texture space (`FLAME_texture.npz`: `mean`, `tex_dir`, `vt`,
  `ft`, values 0-255) or the BFM-derived albedo (`FLAME_albedo_from_BFM.npz`: `MU`, `PC`, values
  0-1, UVs possibly in a separate file), both from the FLAME website. Both files store 512x512
  textures with rows top-down (v = 1 at the top), channels in BGR order, flattened as
  (row, column, channel); this module converts them to RGB in [0, 1].

Host-side loading/precomputation runs in NumPy/SciPy; `vertex_albedo`, `albedo_texture` and
`pixel_albedo` are device functions for one face.
"""

from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.errors import ConfigError, ModelFileError
from jflame.render.interpolate import interpolate, interpolate_face_varying
from jflame.render.rasterize import Fragments

# A mid skin tone (image RGB in [0, 1], no gamma handling) for the built-in model's mean.
DEFAULT_SKIN_RGB = (0.70, 0.52, 0.43)

_FLAME_WEBSITE = "https://flame.is.tue.mpg.de"


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


def _missing(path, what):
  return ModelFileError(
      f"{path}: {what}. The FLAME albedo files (FLAME_texture.npz, FLAME_albedo_from_BFM.npz) "
      f"come from the FLAME website ({_FLAME_WEBSITE}, 'FLAME texture space' download, free "
      "registration); download one and pass its path, or use the built-in per-vertex model "
      "(laplacian_albedo_model), which needs no file.")


def _read_npz(path):
  path = Path(path)
  if not path.is_file():
    raise _missing(path, "file not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except Exception as error:  # zip/format errors come in many types
    raise _missing(path, f"not a readable .npz archive ({type(error).__name__}: {error})")


def load_texture_albedo(path, faces, num_components: Optional[int] = None,
                        texture_size: Optional[int] = None, uv_path=None) -> AlbedoModel:
  """Host: loads a FLAME UV albedo space.

  Args:
    path: `FLAME_texture.npz` (keys `mean`, `tex_dir`, `vt`, `ft`; values 0-255) or
      `FLAME_albedo_from_BFM.npz` (keys `MU`, `PC`, values 0-1; `vt`/`ft` if present).
    faces: (F, 3) mesh faces; the UV faces `ft` must have the same shape.
    num_components: keep the first K basis directions (all when None). Memory grows with
      texture_size**2 * 3 * K.
    texture_size: resample to this resolution (must divide the file's, e.g. 512 -> 256 or 128;
      block average). The texture is recomputed every fitting step, so smaller is faster.
    uv_path: an .npz with `vt` and `ft` (e.g. FLAME_texture.npz) when `path` has none.

  Returns:
    A UV-domain `AlbedoModel` (float32, RGB, values in [0, 1] for the mean).

  Raises:
    ModelFileError: missing, unreadable or malformed file.
    ConfigError: a texture_size that does not divide the file's resolution.
  """
  data = _read_npz(path)
  if "mean" in data and "tex_dir" in data:
    mean, basis, kind = data["mean"], data["tex_dir"], "FLAME texture space"
  elif "MU" in data and "PC" in data:
    mean, basis, kind = data["MU"], data["PC"], "BFM-derived albedo"
  else:
    raise _missing(path, f"no albedo arrays: expected keys 'mean' and 'tex_dir' "
                         f"(FLAME_texture.npz) or 'MU' and 'PC' (FLAME_albedo_from_BFM.npz), found "
                         f"{sorted(data)}")
  if "vt" in data and "ft" in data:
    vt, ft = data["vt"], data["ft"]
  elif uv_path is not None:
    uv_data = _read_npz(uv_path)
    if "vt" not in uv_data or "ft" not in uv_data:
      raise _missing(uv_path, f"no UV arrays 'vt' and 'ft' (found {sorted(uv_data)})")
    vt, ft = uv_data["vt"], uv_data["ft"]
  else:
    raise _missing(path, "no UV coordinates ('vt', 'ft'); pass uv_path=FLAME_texture.npz")

  mean = np.asarray(mean, np.float32).reshape(-1)
  num_values = mean.size
  size = int(round(np.sqrt(num_values / 3)))
  if size * size * 3 != num_values or basis.size % num_values:
    raise _missing(path, f"'{kind}' mean has {num_values} values, not a square RGB texture, or "
                         f"the basis {basis.shape} does not match it")
  basis = np.asarray(basis).reshape(num_values, -1)
  if num_components is not None:
    if num_components < 1:
      raise ConfigError(f"num_components must be >= 1, got {num_components}.")
    basis = basis[:, :num_components]
  basis = np.asarray(basis, np.float32)
  # The FLAME texture space stores 0-255; the BFM-derived one 0-1.
  if np.max(np.abs(mean)) > 1.5:
    mean = mean / 255.0
    basis = basis / 255.0

  # (row, column, BGR) -> (row, column, RGB)
  mean = mean.reshape(size, size, 3)[..., ::-1]
  basis = basis.reshape(size, size, 3, -1)[:, :, ::-1]
  if texture_size is not None and texture_size != size:
    if texture_size < 1 or size % texture_size:
      raise ConfigError(f"texture_size {texture_size} must divide the file's resolution {size} "
                        f"(e.g. {size // 2} or {size // 4}).")
    factor = size // texture_size
    mean = mean.reshape(texture_size, factor, texture_size, factor, 3).mean(axis=(1, 3))
    basis = basis.reshape(texture_size, factor, texture_size, factor, 3, -1).mean(axis=(1, 3))
    size = texture_size

  faces = np.asarray(faces)
  vt = np.asarray(vt, np.float32)
  ft = np.asarray(ft, np.int64)
  if vt.ndim != 2 or vt.shape[1] != 2 or ft.shape != faces.shape or ft.min(initial=0) < 0 \
      or ft.max(initial=0) >= vt.shape[0]:
    raise _missing(path, f"UV arrays vt {vt.shape} / ft {ft.shape} do not fit a mesh with "
                         f"faces {faces.shape}")
  vertex_uvs = np.zeros((int(faces.max(initial=0)) + 1, 2), np.float32)
  vertex_uvs[faces.reshape(-1)] = vt[ft.reshape(-1)]
  return AlbedoModel(mean=jnp.asarray(mean.reshape(-1, 3), jnp.float32),
                     basis=jnp.asarray(basis.reshape(size * size, 3, -1), jnp.float32),
                     face_uvs=jnp.asarray(vt[ft], jnp.float32),
                     vertex_uvs=jnp.asarray(vertex_uvs),
                     texture_size=size, name=f"{kind} from {Path(path).name}")
