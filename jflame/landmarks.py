"""Landmark embeddings: where a detector's landmarks sit on the FLAME surface, and how much each
one counts in the fit.

An embedding fixes each landmark to a point of the mesh surface, given as a triangle index and
barycentric coordinates, so the landmark follows the mesh through shape, expression and pose.
Public FLAME embeddings come in two file formats, both read here:

* `mediapipe_landmark_embedding.npz` (keys `lmk_face_idx`, `lmk_b_coords`, `landmark_indices`):
  105 of MediaPipe's 478 landmarks. The synthetic model's own embedding (all 478) is written in
  the same format.
* the 68-point `landmark_embedding.npy` of DECA/RingNet: a pickled dict with 51 static
  landmarks, the 17-point jaw contour tabulated per head yaw ("dynamic"), and all 68 together.

MediaPipe's face layout itself (a symmetric 3D reference face, its triangles and the landmark
index set of every facial region) ships in `jflame/data/mediapipe_face.npz`, made by
tools/make_mediapipe_reference.py, so nothing at run time needs MediaPipe to know the layout.
"""

import collections
import dataclasses
import io
import pickle
import struct
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct as flax_struct

from jflame.assets import WORKSPACE_HINT
from jflame.atomic import atomic_path
from jflame.errors import ModelFileError, UnsafePickleError
from jflame.flame import barycentric_points
from jflame.safe_pickle import numpy_globals

MEDIAPIPE_NUM_LANDMARKS = 478
MEDIAPIPE_LAYOUT = "mediapipe478"
IBUG68_LAYOUT = "ibug68"
REFERENCE_FACE_PATH = Path(__file__).resolve().parent / "data" / "mediapipe_face.npz"
# Regions in order of precedence: a landmark in two sets takes the first one's weight.
REGION_NAMES = ("iris", "eyes", "lips", "brows", "nose", "face_oval")


@flax_struct.dataclass
class LandmarkEmbedding:
  """Landmarks fixed to mesh triangles.

  Attributes:
    face_indices: (K,) int32 triangle of each landmark.
    barycentrics: (K, 3) float32 weights of the triangle's three corners (rows sum to 1).
    landmark_indices: (K,) int32 which detector landmark each row is (MediaPipe 0..477, or
      iBUG 0..67, as `layout` says).
    name: static label saying where the embedding came from.
    layout: static detector layout, "mediapipe478" or "ibug68".
  """
  face_indices: jax.Array
  barycentrics: jax.Array
  landmark_indices: jax.Array
  name: str = flax_struct.field(pytree_node=False, default="")
  layout: str = flax_struct.field(pytree_node=False, default=MEDIAPIPE_LAYOUT)

  @property
  def num_landmarks(self) -> int:
    return self.face_indices.shape[0]

  def points(self, vertices, faces):
    """(K, 3) landmark positions on a mesh with (V, 3) `vertices` and (F, 3) `faces`."""
    return barycentric_points(vertices, faces, self.face_indices, self.barycentrics)


@flax_struct.dataclass
class Flame68Embedding:
  """The 68-point iBUG embedding of DECA/RingNet (`landmark_embedding.npy`).

  Attributes:
    static: the 51 inner-face landmarks (iBUG 17..67), fixed to the surface.
    dynamic_face_indices: (Y, 17) triangles of the jaw contour (iBUG 0..16), one row per head
      yaw bin (DECA uses 79 bins over -39..39 degrees).
    dynamic_barycentrics: (Y, 17, 3) their barycentric coordinates.
    full: all 68 landmarks with a frontal jaw contour.
  """
  static: LandmarkEmbedding
  dynamic_face_indices: jax.Array
  dynamic_barycentrics: jax.Array
  full: LandmarkEmbedding


# --- The MediaPipe reference face ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MediaPipeReference:
  """MediaPipe's face layout, from jflame/data/mediapipe_face.npz (NumPy, host side).

  Attributes:
    positions: (478, 3) symmetric reference face in metres, FLAME axes, origin between the iris
      centres, iris centres 63 mm apart.
    mirror: (478,) index of each landmark's mirror twin (itself on the midline).
    triangles: (852, 3) MediaPipe's face-mesh triangles over landmarks 0..467, outward (+z).
    face_oval_loop, left_eye_loop, right_eye_loop, inner_lips_loop: ordered closed loops of
      landmark indices, counter-clockwise seen from the front.
    regions: region name -> sorted landmark indices (eyes, iris, lips, brows, nose, face_oval).
    source: how the file was made.
  """
  positions: np.ndarray
  mirror: np.ndarray
  triangles: np.ndarray
  face_oval_loop: np.ndarray
  left_eye_loop: np.ndarray
  right_eye_loop: np.ndarray
  inner_lips_loop: np.ndarray
  regions: dict
  source: str


def load_mediapipe_reference(path=REFERENCE_FACE_PATH) -> MediaPipeReference:
  """Reads the MediaPipe reference face that ships with jflame."""
  path = Path(path)
  if not path.is_file():
    raise ModelFileError(f"MediaPipe reference face not found: {path}. It ships in jflame/data; "
                         "regenerate it with tools/make_mediapipe_reference.py.")
  with np.load(path, allow_pickle=False) as data:
    def read(key, dtype):
      array = np.array(data[key], dtype)
      array.setflags(write=False)
      return array
    regions = {key[len("region_"):]: read(key, np.int64) for key in data.files
               if key.startswith("region_")}
    return MediaPipeReference(
        positions=read("positions", np.float64), mirror=read("mirror", np.int64),
        triangles=read("triangles", np.int64), face_oval_loop=read("face_oval_loop", np.int64),
        left_eye_loop=read("left_eye_loop", np.int64),
        right_eye_loop=read("right_eye_loop", np.int64),
        inner_lips_loop=read("inner_lips_loop", np.int64), regions=regions,
        source=str(data["source"]))


# --- Region weights ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LandmarkWeights:
  """How much each MediaPipe region counts in the landmark loss. Frozen and hashable, so a fit
  configuration can hold it and pass it as a static argument.

  A landmark in several regions takes the weight of the first in REGION_NAMES order (iris, eyes,
  lips, brows, nose, face_oval); landmarks in none take `other`.
  """
  iris: float = 1.0
  eyes: float = 2.0
  lips: float = 2.0
  brows: float = 1.0
  nose: float = 1.5
  face_oval: float = 0.5
  other: float = 1.0

  def region_weight(self, region: str) -> float:
    return getattr(self, region)


def mediapipe_landmark_weights(config: LandmarkWeights = LandmarkWeights(),
                               reference: Optional[MediaPipeReference] = None) -> np.ndarray:
  """(478,) float32 weight of every MediaPipe landmark under `config`."""
  reference = reference or load_mediapipe_reference()
  weights = np.full(MEDIAPIPE_NUM_LANDMARKS, config.other, np.float32)
  # Lowest precedence first, so higher-precedence regions overwrite shared landmarks.
  for region in reversed(REGION_NAMES):
    weights[reference.regions[region]] = config.region_weight(region)
  return weights


def select_regions(embedding: LandmarkEmbedding, regions: Optional[Sequence[str]],
                   reference: Optional[MediaPipeReference] = None) -> LandmarkEmbedding:
  """The rows of a MediaPipe embedding whose landmark lies in one of `regions` (all rows when
  `regions` is None). MediaPipe's cheek and forehead points are interpolated by its network
  rather than anchored to visible features, and they triple the fitting cost."""
  if regions is None:
    return embedding
  reference = reference or load_mediapipe_reference()
  unknown = set(regions) - set(reference.regions)
  if unknown:
    raise ValueError(f"unknown landmark regions {sorted(unknown)}; known: "
                     f"{sorted(reference.regions)}")
  wanted = np.unique(np.concatenate([reference.regions[name] for name in regions]))
  keep = np.flatnonzero(np.isin(np.asarray(embedding.landmark_indices), wanted))
  return embedding.replace(face_indices=jnp.asarray(embedding.face_indices)[keep],
                           barycentrics=jnp.asarray(embedding.barycentrics)[keep],
                           landmark_indices=jnp.asarray(embedding.landmark_indices)[keep])


def gather_landmarks(embedding: LandmarkEmbedding, detected, detected_weights=None,
                     region_weights=None):
  """Detected landmarks in the embedding's order, with the weight of each.

  Works for one image or any leading batch axes: only the landmark axis (-2 of `detected`,
  -1 of the weights) is gathered.

  Args:
    embedding: the model's landmark embedding (rows say which detector landmark they are).
    detected: (..., N, 2) detected landmarks in the detector's order (N = 478 for MediaPipe).
    detected_weights: optional (..., N) per-detection confidence/validity (0 = missing).
    region_weights: optional (N,) per-landmark weights, e.g. `mediapipe_landmark_weights(...)`.
  Returns:
    ((..., K, 2) landmarks, (..., K) weights) matching the embedding's rows.
  """
  index = jnp.asarray(embedding.landmark_indices)
  points = jnp.take(jnp.asarray(detected), index, axis=-2)
  weights = jnp.ones(points.shape[:-1], points.dtype)
  if detected_weights is not None:
    weights = weights * jnp.take(jnp.asarray(detected_weights, points.dtype), index, axis=-1)
  if region_weights is not None:
    weights = weights * jnp.take(jnp.asarray(region_weights, points.dtype), index)
  return points, weights


# --- The MediaPipe embedding format ----------------------------------------------------------

def _validated_embedding(face_indices, barycentrics, landmark_indices, source, name, layout,
                         num_detector_landmarks):
  face_indices = np.asarray(face_indices)
  barycentrics = np.asarray(barycentrics, np.float64)
  landmark_indices = np.asarray(landmark_indices)
  count = face_indices.reshape(-1).shape[0]
  problems = []
  if face_indices.ndim != 1 or not np.issubdtype(face_indices.dtype, np.integer):
    problems.append(f"triangle indices must be a 1-D integer array, got {face_indices.dtype} "
                    f"{face_indices.shape}")
  elif face_indices.size and face_indices.min() < 0:
    problems.append("triangle indices must not be negative")
  if barycentrics.shape != (count, 3):
    problems.append(f"barycentric coordinates must be ({count}, 3), got {barycentrics.shape}")
  elif not np.allclose(barycentrics.sum(axis=1), 1.0, atol=1e-3):
    problems.append("barycentric coordinates must sum to 1 per landmark")
  if landmark_indices.shape != (count,) or not np.issubdtype(landmark_indices.dtype, np.integer):
    problems.append(f"landmark indices must be ({count},) integers, got {landmark_indices.dtype} "
                    f"{landmark_indices.shape}")
  elif count and (landmark_indices.min() < 0 or landmark_indices.max() >= num_detector_landmarks):
    problems.append(f"landmark indices must lie in 0..{num_detector_landmarks - 1}")
  if problems:
    raise ModelFileError(f"{source} is not a valid landmark embedding: {'; '.join(problems)}. "
                         f"{WORKSPACE_HINT}")
  return LandmarkEmbedding(face_indices=jnp.asarray(face_indices, jnp.int32),
                           barycentrics=jnp.asarray(barycentrics, jnp.float32),
                           landmark_indices=jnp.asarray(landmark_indices, jnp.int32),
                           name=name, layout=layout)


def load_mediapipe_embedding(path, name: Optional[str] = None) -> LandmarkEmbedding:
  """Reads `mediapipe_landmark_embedding.npz` (lmk_face_idx, lmk_b_coords, landmark_indices).

  Raises:
    ModelFileError: the file is missing, unreadable, or its arrays do not fit together.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise ModelFileError(f"MediaPipe landmark embedding not found: {path}. {WORKSPACE_HINT}")
  keys = ("lmk_face_idx", "lmk_b_coords", "landmark_indices")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [key for key in keys if key not in data.files]
      if missing:
        raise ModelFileError(f"{path} is not a MediaPipe landmark embedding: it lacks "
                             f"{', '.join(missing)}. {WORKSPACE_HINT}")
      arrays = [np.asarray(data[key]) for key in keys]
      stored_name = str(data["name"]) if "name" in data.files else None
  except ModelFileError:
    raise
  except Exception as err:  # zip, npy-header and pickle-refusal errors all mean "not this"
    raise ModelFileError(f"cannot read landmark embedding {path} ({type(err).__name__}: {err}). "
                         f"{WORKSPACE_HINT}") from None
  label = name or stored_name or f"MediaPipe embedding {path.name}"
  return _validated_embedding(*arrays, source=str(path), name=label, layout=MEDIAPIPE_LAYOUT,
                              num_detector_landmarks=MEDIAPIPE_NUM_LANDMARKS)


def save_mediapipe_embedding(embedding: LandmarkEmbedding, path):
  """Writes an embedding in the public `mediapipe_landmark_embedding.npz` format (atomically),
  plus its name under the extra key `name`."""
  if embedding.layout != MEDIAPIPE_LAYOUT:
    raise ValueError(f"only MediaPipe-layout embeddings go in this format, not {embedding.layout}")
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, lmk_face_idx=np.asarray(embedding.face_indices, np.int64),
             lmk_b_coords=np.asarray(embedding.barycentrics, np.float64),
             landmark_indices=np.asarray(embedding.landmark_indices, np.int64),
             name=np.asarray(embedding.name))


# --- The 68-point DECA/RingNet format ----------------------------------------------------------
# `landmark_embedding.npy` is np.save() of a dict, i.e. a pickle, and DECA's copy holds torch
# tensors for the dynamic contour. Pickles can run code, so it is read by a restricted
# unpickler that builds NumPy arrays and nothing else: NumPy's own array reconstruction, and
# torch's tensor/storage reconstruction replaced by a decoder that reads torch's legacy storage
# bytes into NumPy (torch itself is never imported). Every other global is refused.

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: type


@dataclasses.dataclass
class _StorageRecord:
  key: str
  dtype: type
  numel: int
  data: Optional[np.ndarray] = None


class _TorchStorageUnpickler(pickle.Unpickler):
  """Reads the object part of a legacy torch.save stream: storages are persistent ids."""

  def __init__(self, file, records):
    super().__init__(file, encoding="latin1")
    self._records = records

  def find_class(self, module, name):
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(_TORCH_STORAGE_DTYPES[name])
    raise UnsafePickleError(f"refusing to load global {module}.{name} inside a torch storage")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in a torch storage")
    key = str(pid[2])
    if key not in self._records:
      self._records[key] = _StorageRecord(key, pid[1].dtype, int(pid[4]))
    return self._records[key]


def _load_torch_storage_bytes(payload):
  """torch.storage._load_from_bytes, without torch: a legacy torch.save stream of one storage."""
  if not isinstance(payload, (bytes, bytearray)):
    raise UnsafePickleError("torch storage payload is not bytes")
  stream = io.BytesIO(payload)
  header = _NumpyOnlyUnpickler(stream, allow_torch=False)
  if header.load() != _TORCH_LEGACY_MAGIC:
    raise ValueError("torch storage bytes are not in torch's legacy format")
  header.load()  # protocol version
  header.load()  # sys_info
  records = {}
  storage = _TorchStorageUnpickler(stream, records).load()
  keys = _NumpyOnlyUnpickler(stream, allow_torch=False).load()
  for key in keys:
    record = records[str(key)]
    (numel,) = struct.unpack("<q", stream.read(8))
    if numel != record.numel:
      raise ValueError(f"torch storage says {record.numel} elements but holds {numel}")
    itemsize = np.dtype(record.dtype).itemsize
    raw = stream.read(numel * itemsize)
    if len(raw) != numel * itemsize:
      raise ValueError("torch storage bytes end early")
    record.data = np.frombuffer(raw, dtype=np.dtype(record.dtype).newbyteorder("<")).copy()
  if not isinstance(storage, _StorageRecord) or storage.data is None:
    raise ValueError("torch storage bytes hold no storage")
  return storage


def _rebuild_torch_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2), without torch: a strided NumPy view, copied."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _StorageRecord):
    raise UnsafePickleError("tensor rebuilt from something that is not a storage")
  data = storage.data
  itemsize = data.itemsize
  if len(size) and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= data.size):
    raise ValueError("tensor extends past its storage")
  return np.lib.stride_tricks.as_strided(
      data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Builds NumPy arrays, plain containers and (decoded) torch tensors; refuses anything else."""
  _NUMPY = {**numpy_globals(), ("collections", "OrderedDict"): collections.OrderedDict}
  _TORCH = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_torch_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_torch_tensor,
            ("torch.storage", "_load_from_bytes"): _load_torch_storage_bytes}

  def __init__(self, file, allow_torch=True):
    super().__init__(file, encoding="latin1")
    self._allowed = {**self._NUMPY, **(self._TORCH if allow_torch else {})}

  def find_class(self, module, name):
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise UnsafePickleError(
        f"refusing to load global {module}.{name}: a landmark embedding holds only arrays")


def _read_pickled_npy(path: Path):
  """The object stored by np.save(path, obj) with a pickled (object) payload, read safely."""
  with open(path, "rb") as stream:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if not dtype.hasobject:
      raise ValueError(f"holds a plain {dtype} array of shape {shape}, not a pickled dict")
    array = _NumpyOnlyUnpickler(stream).load()
  return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def load_flame68_embedding(path, name: Optional[str] = None) -> Flame68Embedding:
  """Reads DECA/RingNet's 68-point `landmark_embedding.npy` without running arbitrary pickle code.

  Raises:
    ModelFileError: the file is missing, unreadable, or lacks the expected keys and shapes.
    UnsafePickleError: the pickle asks for anything beyond arrays (and torch tensors).
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise ModelFileError(f"68-point landmark embedding not found: {path}. {WORKSPACE_HINT}")
  try:
    content = _read_pickled_npy(path)
  except UnsafePickleError as err:
    raise UnsafePickleError(f"{path}: {err}") from None
  except Exception as err:
    raise ModelFileError(f"cannot read 68-point landmark embedding {path} "
                         f"({type(err).__name__}: {err}). {WORKSPACE_HINT}") from None
  keys = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
          "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")
  if not isinstance(content, dict) or any(key not in content for key in keys):
    found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
    raise ModelFileError(f"{path} is not a 68-point FLAME landmark embedding: expected keys "
                         f"{', '.join(keys)}, found {found}. {WORKSPACE_HINT}")
  label = name or f"68-point embedding {path.name}"
  static_faces = np.asarray(content["static_lmk_faces_idx"]).reshape(-1)
  static = _validated_embedding(
      static_faces, np.asarray(content["static_lmk_bary_coords"]).reshape(-1, 3),
      np.arange(68 - len(static_faces), 68), source=str(path), name=label + " (static)",
      layout=IBUG68_LAYOUT, num_detector_landmarks=68)
  full_faces = np.asarray(content["full_lmk_faces_idx"]).reshape(-1)
  full = _validated_embedding(
      full_faces, np.asarray(content["full_lmk_bary_coords"]).reshape(-1, 3),
      np.arange(len(full_faces)), source=str(path), name=label + " (full)",
      layout=IBUG68_LAYOUT, num_detector_landmarks=68)
  dynamic_faces = np.asarray(content["dynamic_lmk_faces_idx"])
  dynamic_bary = np.asarray(content["dynamic_lmk_bary_coords"])
  if (dynamic_faces.ndim != 2 or dynamic_bary.shape != dynamic_faces.shape + (3,)
      or not np.issubdtype(dynamic_faces.dtype, np.integer)):
    raise ModelFileError(f"{path}: dynamic contour must be (Y, 17) triangle indices with "
                         f"(Y, 17, 3) barycentrics, got {dynamic_faces.shape} and "
                         f"{dynamic_bary.shape}. {WORKSPACE_HINT}")
  if len(full_faces) != 68 or len(static_faces) + dynamic_faces.shape[1] != 68:
    raise ModelFileError(f"{path}: expected 68 landmarks in total (static + contour), got "
                         f"{len(static_faces)} + {dynamic_faces.shape[1]} and {len(full_faces)} "
                         f"full. {WORKSPACE_HINT}")
  return Flame68Embedding(static=static,
                          dynamic_face_indices=jnp.asarray(dynamic_faces, jnp.int32),
                          dynamic_barycentrics=jnp.asarray(dynamic_bary, jnp.float32),
                          full=full)


def check_embedding_fits(embedding: LandmarkEmbedding, num_faces: int, source: str = ""):
  """Raises ModelFileError when an embedding names triangles the model does not have."""
  largest = int(np.max(np.asarray(embedding.face_indices))) if embedding.num_landmarks else -1
  if largest >= num_faces:
    raise ModelFileError(f"{source or embedding.name}: landmark embedding uses triangle "
                         f"{largest} but the model has only {num_faces}; the embedding belongs "
                         f"to a different mesh. {WORKSPACE_HINT}")
