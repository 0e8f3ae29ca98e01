"""Landmark files: MediaPipe's reference face (shipped in jflame/data) and the public MediaPipe
embedding `.npz`. The types and the maths are in `jflame.landmarks`.
"""

from pathlib import Path
from typing import Optional

import numpy as np

from jflame.assets import WORKSPACE_HINT
from jflame.atomic import atomic_path
from jflame.errors import ModelFileError
from jflame.landmarks import (MEDIAPIPE_LAYOUT, MEDIAPIPE_NUM_LANDMARKS,
                              LandmarkEmbedding, MediaPipeReference,
                              validated_embedding)

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
