"""Landmark embeddings: where a detector's landmarks sit on the FLAME surface, and how much each
one counts in the fit.

An embedding fixes each landmark to a point of the mesh surface, given as a triangle index and
barycentric coordinates, so the landmark follows the mesh through shape, expression and pose.
The public FLAME embedding for MediaPipe, `mediapipe_landmark_embedding.npz` (keys
`lmk_face_idx`, `lmk_b_coords`, `landmark_indices`), holds 105 of MediaPipe's 478 landmarks; the
synthetic model's own embedding (all 478) is written in the same format. (DECA's 68-point iBUG
embedding is not read: jflame's landmarks come from MediaPipe.)

MediaPipe's face layout itself (a symmetric 3D reference face, its triangles and the landmark
index set of every facial region) ships in `jflame/data/mediapipe_face.npz`, made by
tools/make_mediapipe_reference.py, so nothing at run time needs MediaPipe to know the layout.

This module holds the types and the maths; the files are read and written by
`jflame.landmarks_io`.
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct as flax_struct

from jflame.assets import WORKSPACE_HINT
from jflame.errors import ModelFileError
from jflame.flame import barycentric_points

MEDIAPIPE_NUM_LANDMARKS = 478
MEDIAPIPE_LAYOUT = "mediapipe478"
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
    layout: the detector layout, "mediapipe478".
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


# --- The MediaPipe reference face ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MediaPipeReference:
  """MediaPipe's face layout (NumPy, host side), read by `landmarks_io.load_mediapipe_reference`.

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


def mediapipe_landmark_weights(reference: MediaPipeReference,
                               config: LandmarkWeights = LandmarkWeights()) -> np.ndarray:
  """(478,) float32 weight of every MediaPipe landmark under `config` (the regions come from
  `reference`, see `jflame.landmarks_io.load_mediapipe_reference`)."""
  weights = np.full(MEDIAPIPE_NUM_LANDMARKS, config.other, np.float32)
  # Lowest precedence first, so higher-precedence regions overwrite shared landmarks.
  for region in reversed(REGION_NAMES):
    weights[reference.regions[region]] = config.region_weight(region)
  return weights


def select_regions(embedding: LandmarkEmbedding, regions: Optional[Sequence[str]],
                   reference: MediaPipeReference) -> LandmarkEmbedding:
  """The rows of a MediaPipe embedding whose landmark lies in one of `regions` (all rows when
  `regions` is None). MediaPipe's cheek and forehead points are interpolated by its network
  rather than anchored to visible features, and they triple the fitting cost."""
  if regions is None:
    return embedding
  unknown = set(regions) - set(reference.regions)
  if unknown:
    raise ValueError(f"unknown landmark regions {sorted(unknown)}; known: "
                     f"{sorted(reference.regions)}")
  wanted = np.unique(np.concatenate([reference.regions[name] for name in regions]))
  keep = np.flatnonzero(np.isin(np.asarray(embedding.landmark_indices), wanted))
  return embedding.replace(face_indices=jnp.asarray(embedding.face_indices)[keep],
                           barycentrics=jnp.asarray(embedding.barycentrics)[keep],
                           landmark_indices=jnp.asarray(embedding.landmark_indices)[keep])


# --- The MediaPipe embedding format ----------------------------------------------------------

def validated_embedding(face_indices, barycentrics, landmark_indices, source, name, layout,
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


def check_embedding_fits(embedding: LandmarkEmbedding, num_faces: int, source: str = ""):
  """Raises ModelFileError when an embedding names triangles the model does not have."""
  largest = int(np.max(np.asarray(embedding.face_indices))) if embedding.num_landmarks else -1
  if largest >= num_faces:
    raise ModelFileError(f"{source or embedding.name}: landmark embedding uses triangle "
                         f"{largest} but the model has only {num_faces}; the embedding belongs "
                         f"to a different mesh. {WORKSPACE_HINT}")
