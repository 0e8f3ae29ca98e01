"""The synthetic head's MediaPipe landmark embedding: exact by construction (landmarks
0..467 are face vertices; the irises lie on the eyeball caps)."""

import jax.numpy as jnp
import numpy as np

from jflame.landmarks import MEDIAPIPE_LAYOUT, LandmarkEmbedding, MediaPipeReference
from jflame.synthetic.head import LEFT_IRIS, RIGHT_IRIS, Eyeball, Head


def _iris_embedding(eye: Eyeball, points, triangle_offset):
  """Triangles of the flat iris disc under each point, and the points' barycentrics there."""
  frame = eye.disc_frame[:2]
  plane = (eye.vertices - eye.disc_centre) @ frame.T
  disc = eye.triangles[eye.disc_triangles]
  a, b, c = plane[disc[:, 0]], plane[disc[:, 1]], plane[disc[:, 2]]
  faces, barycentrics = [], []
  for point in (points - eye.disc_centre) @ frame.T:
    v0, v1, v2 = b - a, c - a, point - a
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    s = (v2[:, 0] * v1[:, 1] - v2[:, 1] * v1[:, 0]) / det
    t = (v0[:, 0] * v2[:, 1] - v0[:, 1] * v2[:, 0]) / det
    weights = np.stack([1.0 - s - t, s, t], 1)
    best = int(np.argmax(weights.min(axis=1)))
    faces.append(triangle_offset + eye.disc_triangles[best])
    barycentrics.append(np.clip(weights[best], 0.0, 1.0) / np.clip(weights[best], 0.0, 1.0).sum())
  return np.array(faces), np.array(barycentrics)


def landmark_embedding(head: Head, reference: MediaPipeReference, name) -> LandmarkEmbedding:
  """MediaPipe's 478 landmarks on the synthetic mesh: 0..467 are vertices of the face patch,
  468..477 lie on the flat iris discs."""
  face_triangles = head.triangles[:len(head.face.triangles)]
  face_indices = np.zeros(478, np.int64)
  barycentrics = np.zeros((478, 3))
  for corner in range(3):  # any triangle that has the landmark as a corner will do
    is_landmark = face_triangles[:, corner] < 468
    owners = np.flatnonzero(is_landmark)
    face_indices[face_triangles[owners, corner]] = owners
  for landmark in range(468):
    corner = int(np.flatnonzero(face_triangles[face_indices[landmark]] == landmark)[0])
    barycentrics[landmark, corner] = 1.0
  offset = len(head.head_triangles)
  for eye, iris, eye_offset in ((head.eyes[0], LEFT_IRIS, offset),
                                (head.eyes[1], RIGHT_IRIS, offset + len(head.eyes[0].triangles))):
    faces, bary = _iris_embedding(eye, reference.positions[iris], eye_offset)
    face_indices[iris] = faces
    barycentrics[iris] = bary
  return LandmarkEmbedding(face_indices=jnp.asarray(face_indices, jnp.int32),
                           barycentrics=jnp.asarray(barycentrics, jnp.float32),
                           landmark_indices=jnp.arange(478, dtype=jnp.int32),
                           name=f"{name}: MediaPipe 478-landmark embedding",
                           layout=MEDIAPIPE_LAYOUT)
