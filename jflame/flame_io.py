"""Reading and writing FLAME model files without chumpy.

The official files (FLAME 2020 `generic_model.pkl` / `male_model.pkl` / `female_model.pkl`,
FLAME 2023 `flame2023.pkl` / `flame2023_no_jaw.pkl` / `flame2023_Open.pkl`) are Python 2 pickles
holding NumPy arrays, chumpy `Ch` objects and a scipy sparse joint regressor. A pickle is code, so
they are read by a restricted unpickler that knows exactly those classes, maps them to inert
stand-ins, and refuses every other global. jflame's own `.npz` form holds the same arrays in
float32 and loads instantly (`jflame-convert-flame in.pkl out.npz`).
"""

import io
import pickle
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jflame.assets import WORKSPACE_HINT
from jflame.atomic import atomic_path
from jflame.errors import ModelFileError, UnsafePickleError
from jflame.flame import VARIANTS, FlameModel
from jflame.safe_pickle import numpy_globals

NPZ_FORMAT_VERSION = 1
_ROOT_PARENT = 4294967295  # FLAME's kintree_table marks the root's parent as uint32 -1.
_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                  "kintree_table")


# --- Restricted unpickling -----------------------------------------------------------------

class _ChumpyStandIn:
  """Takes the place of any chumpy class; keeps the pickled state (its value lives in 'x')."""

  def __setstate__(self, state):
    self.state = state


class _SparseStandIn:
  """Takes the place of a scipy.sparse matrix; keeps its pickled state."""
  sparse_format = "csc"

  def __setstate__(self, state):
    self.state = state


def _sparse_stand_in(name):
  # The class name says the storage format (csc_matrix, csr_matrix, coo_matrix).
  return type(name, (_SparseStandIn,), {"sparse_format": name[:3]})


_STAND_INS = (_ChumpyStandIn, _SparseStandIn)


def _reconstructor(cls, base, state):
  """copyreg._reconstructor, limited to the stand-in classes."""
  if not (isinstance(cls, type) and issubclass(cls, _STAND_INS)) or base is not object:
    raise UnsafePickleError(f"pickle tried to reconstruct {cls!r} from {base!r}")
  return object.__new__(cls)


def _latin1_encode(text, encoding="latin1"):
  """_codecs.encode as Python 3 protocol-2 pickles use it for bytes; latin1 only."""
  if encoding != "latin1" or not isinstance(text, str):
    raise UnsafePickleError(f"pickle asked to encode {type(text).__name__} as {encoding!r}")
  return text.encode("latin1")


class _FlameUnpickler(pickle.Unpickler):
  """Unpickler that allows NumPy arrays, chumpy and scipy.sparse stand-ins, and nothing else."""
  _ALLOWED = {**numpy_globals(),
              ("copyreg", "_reconstructor"): _reconstructor,
              ("copy_reg", "_reconstructor"): _reconstructor,
              ("_codecs", "encode"): _latin1_encode,
              ("builtins", "object"): object,
              ("__builtin__", "object"): object}
  _SPARSE_CLASSES = ("csc_matrix", "csr_matrix", "coo_matrix")

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "chumpy" or module.startswith("chumpy."):
      return _ChumpyStandIn
    if module.startswith("scipy.sparse") and name in self._SPARSE_CLASSES:
      return _sparse_stand_in(name)
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: a FLAME model pickle holds only NumPy, "
        "chumpy and scipy.sparse data, so this file is not one (or has been tampered with)")


def _to_array(value, key):
  """Turns an unpickled value (array, chumpy or sparse stand-in, scalar) into a NumPy array."""
  if isinstance(value, _ChumpyStandIn):
    if not isinstance(value.state, dict) or "x" not in value.state:
      raise ValueError(f"'{key}' is a chumpy expression, not a stored array")
    return _to_array(value.state["x"], key)
  if isinstance(value, _SparseStandIn):
    state = value.state
    shape = tuple(state.get("_shape", state.get("shape")))
    dense = np.zeros(shape, np.float64)
    data = np.asarray(state["data"], np.float64)
    if value.sparse_format == "coo":
      # scipy >= 1.13 pickles the indices as 'coords' (a tuple, one array per axis); older
      # releases, like those that wrote FLAME's files, as 'row' and 'col'.
      coords = state["coords"] if "coords" in state else (state["row"], state["col"])
      np.add.at(dense, tuple(np.asarray(axis) for axis in coords), data)
      return dense
    indptr, indices = np.asarray(state["indptr"]), np.asarray(state["indices"])
    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if value.sparse_format == "csc":
      np.add.at(dense, (indices, major), data)
    else:
      np.add.at(dense, (major, indices), data)
    return dense
  return np.asarray(value)


def read_flame_pickle(data: bytes, source="<bytes>") -> dict:
  """Unpickles FLAME pickle bytes into a dict of plain NumPy arrays (official key names)."""
  try:
    raw = _FlameUnpickler(io.BytesIO(data), encoding="latin1").load()
  except UnsafePickleError as err:
    raise UnsafePickleError(f"{source}: {err}") from None
  except Exception as err:  # pickle raises many kinds for damaged data
    raise ModelFileError(f"{source} is not a readable FLAME pickle ({type(err).__name__}: "
                         f"{err}). {WORKSPACE_HINT}") from None
  if not isinstance(raw, dict):
    raise ModelFileError(f"{source} holds a {type(raw).__name__}, not a FLAME model dict. "
                         f"{WORKSPACE_HINT}")
  arrays = {}
  for key, value in raw.items():
    key = key.decode("latin1") if isinstance(key, bytes) else str(key)
    if isinstance(value, (str, bytes)):
      arrays[key] = value.decode("latin1") if isinstance(value, bytes) else value
      continue
    try:
      arrays[key] = _to_array(value, key)
    except (ValueError, KeyError, TypeError) as err:
      if key in _REQUIRED_KEYS:
        raise ModelFileError(f"{source}: cannot read '{key}': {err}. {WORKSPACE_HINT}") from None
  return arrays


# --- Building the model ----------------------------------------------------------------------

def infer_num_expression(shapedirs) -> Optional[int]:
  """Where the expression components start in a combined (V, 3, S + E) FLAME basis.

  Both groups are PCA bases scaled by their standard deviations, so column norms fall within a
  group and jump back up where the expression group starts. Returns None when no clear jump.
  """
  norms = np.linalg.norm(np.asarray(shapedirs, np.float64).reshape(-1, shapedirs.shape[-1]),
                         axis=0)
  if len(norms) < 2:
    return None
  ratios = norms[1:] / np.maximum(norms[:-1], 1e-30)
  start = int(np.argmax(ratios)) + 1
  if ratios[start - 1] < 2.0:
    return None
  return len(norms) - start


def _parents_from_kintree(kintree_table) -> tuple:
  parents = []
  for value in np.asarray(kintree_table)[0]:
    value = int(value)
    parents.append(-1 if value in (_ROOT_PARENT, -1) else value)
  return tuple(parents)


# The official release file names, for models whose arrays do not say which release they are.
OFFICIAL_FILE_VARIANTS = {
    "generic_model": "flame2020", "male_model": "flame2020", "female_model": "flame2020",
    "flame2023": "flame2023", "flame2023_no_jaw": "flame2023", "flame2023_open": "flame2023_open",
}


def has_flame_topology(model: FlameModel) -> bool:
  """True for FLAME's mesh (5023 vertices, 9976 triangles), 5 joints and 300 + 100 components."""
  return (model.num_vertices == 5023 and model.faces.shape[0] == 9976 and model.num_joints == 5
          and model.num_shape + model.num_expression == 400)


def detect_variant(model: FlameModel, file_name: str = "", stated: Optional[str] = None) -> str:
  """Which release a model is.

  In order: what the user states (a flag); what the model already says (the synthetic model is
  generated as "synthetic"; a jflame .npz records its variant); for a model with FLAME's exact
  topology, the official release file name (generic_model.pkl, flame2023.pkl, ...). FLAME 2020
  and 2023 share their topology and sizes, so the arrays alone cannot tell them apart: a
  renamed file is "unknown" (and DECA/MICA, which need FLAME 2020, are then refused with a
  message that says how to state the variant), never silently taken for another release.
  """
  if stated:
    if stated not in VARIANTS:
      raise ModelFileError(f"unknown FLAME variant {stated!r}; use one of {list(VARIANTS)}.")
    return stated
  if model.variant != "unknown":
    return model.variant
  stem = Path(file_name).stem.lower()
  if stem in OFFICIAL_FILE_VARIANTS and has_flame_topology(model):
    return OFFICIAL_FILE_VARIANTS[stem]
  return "unknown"


def flame_model_from_arrays(arrays: dict, name: str, num_expression: Optional[int] = None,
                            source: str = "<arrays>", variant: Optional[str] = None
                            ) -> FlameModel:
  """A FlameModel from official-key arrays (as read from a FLAME pickle).

  Args:
    arrays: v_template, f, shapedirs (identity then expression components), posedirs,
      J_regressor, weights, kintree_table.
    name: label kept on the model; a synthetic model's label starts with "SYNTHETIC".
    num_expression: how many trailing shapedirs columns are expression components; inferred
      from the basis norms when None (FLAME 2020 and 2023: 300 identity + 100 expression).
    source: file name for error messages.
    variant: the release (see `detect_variant`); default: "synthetic" for arrays that carry the
      synthetic model's SYNTHETIC label, else "unknown".
  """
  missing = [key for key in _REQUIRED_KEYS if key not in arrays]
  if missing:
    raise ModelFileError(f"{source} is missing {', '.join(missing)}; it is not a FLAME model "
                         f"file. {WORKSPACE_HINT}")
  v_template = np.asarray(arrays["v_template"], np.float32)
  shapedirs = np.asarray(arrays["shapedirs"], np.float32)
  total = shapedirs.shape[-1]
  if num_expression is None:
    num_expression = infer_num_expression(shapedirs)
  if num_expression is None and total == 400:
    num_expression = 100  # FLAME's documented 300 + 100 layout when the norms do not show it.
  if num_expression is None or not 0 <= num_expression <= total:
    raise ModelFileError(f"{source}: cannot tell identity from expression components in its "
                         f"{total} shapedirs columns; pass num_expression explicitly.")
  parents = _parents_from_kintree(arrays["kintree_table"])
  model = FlameModel(
      v_template=jnp.asarray(v_template),
      shapedirs=jnp.asarray(shapedirs[..., :total - num_expression]),
      exprdirs=jnp.asarray(shapedirs[..., total - num_expression:]),
      posedirs=jnp.asarray(np.asarray(arrays["posedirs"], np.float32)),
      j_regressor=jnp.asarray(np.asarray(arrays["J_regressor"], np.float32)),
      lbs_weights=jnp.asarray(np.asarray(arrays["weights"], np.float32)),
      faces=jnp.asarray(np.asarray(arrays["f"], np.int64).astype(np.int32)),
      parents=parents, name=name, variant=variant or _variant_in_arrays(arrays))
  validate_model(model, source)
  return model


def _variant_in_arrays(arrays: dict) -> str:
  label = arrays.get("jflame_synthetic")
  return "synthetic" if isinstance(label, str) and label.startswith("SYNTHETIC") else "unknown"


def validate_model(model: FlameModel, source: str):
  """Raises ModelFileError unless every array agrees on the vertex and joint counts."""
  num_vertices, num_joints = model.num_vertices, model.num_joints
  expected = {
      "v_template": (num_vertices, 3),
      "shapedirs": (num_vertices, 3, model.num_shape),
      "exprdirs": (num_vertices, 3, model.num_expression),
      "posedirs": (num_vertices, 3, 9 * (num_joints - 1)),
      "j_regressor": (num_joints, num_vertices),
      "lbs_weights": (num_vertices, num_joints),
  }
  for field, shape in expected.items():
    actual = tuple(getattr(model, field).shape)
    if actual != shape:
      raise ModelFileError(f"{source}: {field} has shape {actual}, expected {shape}. "
                           f"{WORKSPACE_HINT}")
  faces = np.asarray(model.faces)
  if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= num_vertices:
    raise ModelFileError(f"{source}: faces must be (F, 3) indices below {num_vertices}. "
                         f"{WORKSPACE_HINT}")
  for joint, parent in enumerate(model.parents):
    if (joint == 0) != (parent < 0) or parent >= joint:
      raise ModelFileError(f"{source}: kinematic tree {model.parents} is not a chain rooted at "
                           f"joint 0 with parents before children. {WORKSPACE_HINT}")


# --- Files -------------------------------------------------------------------------------------

def _model_from_npz(path: Path) -> FlameModel:
  with np.load(path, allow_pickle=False) as data:
    if "jflame_format" not in data:
      raise ModelFileError(f"{path} is not a jflame FLAME .npz (no jflame_format key); convert "
                           f"the official pickle with jflame-convert-flame. {WORKSPACE_HINT}")
    model = FlameModel(
        v_template=jnp.asarray(data["v_template"]), shapedirs=jnp.asarray(data["shapedirs"]),
        exprdirs=jnp.asarray(data["exprdirs"]), posedirs=jnp.asarray(data["posedirs"]),
        j_regressor=jnp.asarray(data["j_regressor"]),
        lbs_weights=jnp.asarray(data["lbs_weights"]), faces=jnp.asarray(data["faces"]),
        parents=tuple(int(p) for p in data["parents"]), name=str(data["name"]),
        variant=str(data["variant"]) if "variant" in data else "unknown")
  validate_model(model, str(path))
  return model


def load_flame(path, num_expression: Optional[int] = None,
               variant: Optional[str] = None) -> FlameModel:
  """Loads a FLAME model from an official `.pkl` or a jflame `.npz`.

  `variant` states the release (see `detect_variant`), overriding what the file says.

  Raises:
    ModelFileError: the file is missing, damaged, or not a FLAME model (the message names it).
    UnsafePickleError: the pickle asks for code outside NumPy, chumpy and scipy.sparse.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise ModelFileError(f"FLAME model file not found: {path}. {WORKSPACE_HINT}")
  try:
    if path.suffix == ".npz":
      model = _model_from_npz(path)
    else:
      arrays = read_flame_pickle(path.read_bytes(), str(path))
      label = arrays.get("jflame_synthetic")
      name = (label if isinstance(label, str) and label.startswith("SYNTHETIC")
              else f"FLAME {path.name}")
      model = flame_model_from_arrays(arrays, name, num_expression, source=str(path))
  except (OSError, KeyError, ValueError) as err:
    raise ModelFileError(f"cannot read FLAME model {path}: {err}. {WORKSPACE_HINT}") from None
  return model.replace(variant=detect_variant(model, path.name, variant))


def save_flame_npz(model: FlameModel, path):
  """Writes the model as a float32 `.npz` that `load_flame` reads instantly (atomic)."""
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, jflame_format=NPZ_FORMAT_VERSION, name=np.asarray(model.name),
             variant=np.asarray(model.variant),
             v_template=np.asarray(model.v_template, np.float32),
             shapedirs=np.asarray(model.shapedirs, np.float32),
             exprdirs=np.asarray(model.exprdirs, np.float32),
             posedirs=np.asarray(model.posedirs, np.float32),
             j_regressor=np.asarray(model.j_regressor, np.float32),
             lbs_weights=np.asarray(model.lbs_weights, np.float32),
             faces=np.asarray(model.faces, np.int32),
             parents=np.asarray(model.parents, np.int32))
