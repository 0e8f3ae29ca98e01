"""The NoW benchmark's layout (and the NeRSemble single-image benchmark's, which takes the same
files): per image a mesh and its 7 landmarks, (7, 3) in the mesh's coordinates, that the
evaluation uses to align the mesh rigidly to the scan before measuring scan-to-mesh distances.

The 7 points, in NoW's order (its `landmarks_7_annotated.png`, the face seen from the front):
the right eye's outer and inner corners, the left eye's inner and outer corners, the point below
the nose, the right and the left mouth corner ("right" is the subject's, the image's left).
jflame places them with its MediaPipe embedding, the MediaPipe landmarks at those places.
NoW's scans are of neutral faces, so the mesh is the fitted identity alone (expression and
pose zero) unless the fitted face is asked for.
"""

import jax
import numpy as np

from jflame.flame import FlameModel, FlameParams, barycentric_points, flame_forward
from jflame.landmarks import LandmarkEmbedding

# MediaPipe's face-mesh landmarks at NoW's 7 points, in NoW's order.
NOW_MEDIAPIPE_LANDMARKS = (33, 133, 362, 263, 2, 61, 291)
MILLIMETRES_PER_METRE = 1000.0


def embedding_rows(embedding: LandmarkEmbedding) -> np.ndarray:
  """(7,) the embedding's rows of NoW's points; a clear error when the embedding lacks one."""
  order = [int(index) for index in np.asarray(embedding.landmark_indices)]
  missing = [index for index in NOW_MEDIAPIPE_LANDMARKS if index not in order]
  if missing:
    raise ValueError(f"the landmark embedding {embedding.name!r} has no MediaPipe landmark "
                     f"{missing}, needed for NoW's 7 points.")
  return np.asarray([order.index(index) for index in NOW_MEDIAPIPE_LANDMARKS])


@jax.jit
def mesh_and_points(model: FlameModel, embedding: LandmarkEmbedding, params: FlameParams,
                    rows):
  """(V, 3) vertices and (7, 3) NoW points of ONE face, metres, model space."""
  vertices, _ = flame_forward(model, params)
  points = barycentric_points(vertices, model.faces, embedding.face_indices[rows],
                              embedding.barycentrics[rows])
  return vertices, points


def neutral(params: FlameParams) -> FlameParams:
  """The identity alone: expression and every rotation zero."""
  zeros = jax.tree.map(np.zeros_like, params)
  return zeros.replace(shape=params.shape)
