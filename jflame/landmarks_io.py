"""Landmark files: MediaPipe's reference face (shipped in jflame/data), the public MediaPipe
embedding `.npz`, and DECA/RingNet's 68-point `landmark_embedding.npy` (read by a restricted
unpickler). The types and the maths are in `jflame.landmarks`.
"""

import collections
import dataclasses
import io
import pickle
import struct
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jflame.assets import WORKSPACE_HINT
from jflame.atomic import atomic_path
from jflame.errors import ModelFileError, UnsafePickleError
from jflame.landmarks import (IBUG68_LAYOUT, MEDIAPIPE_LAYOUT, MEDIAPIPE_NUM_LANDMARKS,
                              Flame68Embedding, LandmarkEmbedding, MediaPipeReference,
                              validated_embedding)
from jflame.safe_pickle import numpy_globals

REFERENCE_FACE_PATH = Path(__file__).resolve().parent / "data" / "mediapipe_face.npz"


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
  return validated_embedding(*arrays, source=str(path), name=label, layout=MEDIAPIPE_LAYOUT,
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
  static = validated_embedding(
      static_faces, np.asarray(content["static_lmk_bary_coords"]).reshape(-1, 3),
      np.arange(68 - len(static_faces), 68), source=str(path), name=label + " (static)",
      layout=IBUG68_LAYOUT, num_detector_landmarks=68)
  full_faces = np.asarray(content["full_lmk_faces_idx"]).reshape(-1)
  full = validated_embedding(
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
