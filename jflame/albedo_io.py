"""FLAME UV albedo files (host side): the FLAME texture space and the BFM-derived albedo, read
into an `jflame.render.AlbedoModel` (the device functions live in `jflame.render.albedo`).

Both files store 512x512 textures with rows top-down (v = 1 at the top), channels in BGR order,
flattened as (row, column, channel); they are converted here to RGB in [0, 1].
"""

from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jflame.errors import ConfigError, ModelFileError
from jflame.render.albedo import AlbedoModel

_FLAME_WEBSITE = "https://flame.is.tue.mpg.de"


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
