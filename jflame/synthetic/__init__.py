"""A procedurally generated head in FLAME's format: what jflame develops, tests and demos against.

FLAME itself is licensed and downloaded by each user, so jflame builds its own model with the
same file layout, joints, axes and conventions, labelled "SYNTHETIC" wherever it shows. It is made
to be good enough that fitting it to a real photograph's MediaPipe landmarks means something:

* Face: MediaPipe's own face-mesh triangulation over a symmetric reference face measured from a
  real photograph (jflame/data/mediapipe_face.npz), subdivided once at FLAME size. Landmarks
  0..467 are vertices 0..467, so the MediaPipe embedding is exact by construction.
* Eyes: two eyeball meshes, each bound to its eye joint at the eyeball centre; the front cap is a
  flat iris disc through MediaPipe's iris landmarks (468..477).
* Openings: MediaPipe's mesh has holes at the eyes and between the lips. A cup behind each eyeball
  (the eye socket) and a pouch behind the lips (the mouth cavity) close them, so the lips part
  when the jaw opens and the head surface has a single boundary, the neck opening.
* Cranium and neck: an implicit head (a superellipsoid cranium, a jaw ellipsoid, ear bumps and
  a neck cylinder, smoothly united) sampled evenly by farthest-point sampling, triangulated as
  the convex hull of the sample directions seen from inside the head (a Delaunay triangulation
  of the sphere), stitched to the face oval and to rings around the neck, and faired
  (bi-Laplacian) where it meets the face.
* Bases: identity = named smooth deformations (size, width, nose, chin, ...) then ever finer
  smooth random fields; expression = localised deformations (lips, smile, brows, lids, ...);
  each group orthonormalised in order and scaled to decreasing norms, like a PCA basis.
  Pose correctives are small smooth fields (neck, jaw, eyelids following the gaze).

Everything is NumPy on the host and deterministic given the seed (the mesh itself does not depend
on it; the random basis fields and correctives do). Sizes: "flame" has exactly FLAME's 5023
vertices, 9976 triangles, 300 + 100 components; "small" has 1300 vertices and 20 + 10 components
(all of them named ones). The rest pose is the reference face's: its lips are parted about 1 cm
(the photograph smiles); the first expression component closes them at about -1.

The package is split by concern: `geometry` (small mesh helpers), `head` (proportions, the mesh
and its rig), `bases` (identity, expression and pose-corrective fields), `embedding` (the exact
MediaPipe embedding); this module assembles them.
"""

from typing import Dict, Tuple

import numpy as np

from jflame.flame import FlameModel
from jflame.flame_io import flame_model_from_arrays
from jflame.landmarks import LandmarkEmbedding
from jflame.landmarks_io import load_mediapipe_reference
from jflame.synthetic.bases import (FieldContext, expression_fields, identity_fields,
                                    orthonormal_basis, pose_correctives)
from jflame.synthetic.embedding import landmark_embedding
from jflame.synthetic.geometry import sigmoid, vertex_normals
from jflame.synthetic.head import (LID_MIDLINE, PARENTS, ROOT_PARENT, SIZES, SYNTHETIC_PREFIX,
                                   SizeSpec, build_head, jaw_shares, joint_regressor,
                                   skinning_weights)

__all__ = ["SYNTHETIC_PREFIX", "synthetic_flame", "synthetic_flame_arrays", "synthetic_label"]


def _size_spec(size) -> SizeSpec:
  if size not in SIZES:
    raise ValueError(f"unknown synthetic model size {size!r}; use one of {sorted(SIZES)}")
  return SIZES[size]


def synthetic_label(size="flame", seed=0) -> str:
  """The model name / marker string: starts with "SYNTHETIC" so no one mistakes it for FLAME."""
  return (f"{SYNTHETIC_PREFIX} jflame head (size {size}, seed {seed}): procedurally generated "
          "in FLAME's format, not the FLAME model")


def generate(size, seed):
  """(official-key arrays, MediaPipe embedding) of the synthetic model."""
  spec = _size_spec(size)
  reference = load_mediapipe_reference()
  head = build_head(reference, spec)
  vertices = head.vertices
  num_vertices = len(vertices)
  rng = np.random.default_rng(seed)

  skin_jaw = jaw_shares(head)
  weights = skinning_weights(head, skin_jaw)
  jaw = np.zeros(num_vertices)
  jaw[:len(skin_jaw)] = skin_jaw
  regressor = joint_regressor(head)

  is_eyeball = np.zeros(num_vertices, bool)
  q = vertices.copy()
  for eye, members in zip(head.eyes, head.eye_vertices):
    is_eyeball[members] = True
    q[members] = eye.centre  # eyeballs move rigidly with identity, never with expression
  context = FieldContext(q=q, normals=vertex_normals(vertices, head.triangles), jaw=jaw,
                          upper_lid=sigmoid((vertices[:, 1] - LID_MIDLINE) / 0.0008),
                          is_eyeball=is_eyeball, landmarks=reference.positions)
  shape_rms = 0.003 / (1.0 + np.arange(spec.num_shape))
  expression_rms = 0.0009 / np.sqrt(1.0 + np.arange(spec.num_expression))
  shapedirs = orthonormal_basis(identity_fields(context, rng, spec.num_shape), shape_rms,
                                 context)
  exprdirs = orthonormal_basis(expression_fields(context, rng, spec.num_expression),
                                expression_rms, context)
  posedirs = pose_correctives(context, rng)

  label = synthetic_label(size, seed)
  arrays = {
      "v_template": vertices.astype(np.float64),
      "f": head.triangles.astype(np.uint32),
      "shapedirs": np.concatenate([shapedirs, exprdirs], axis=2),
      "posedirs": posedirs,
      "J_regressor": regressor,
      "weights": weights,
      "kintree_table": np.array([[ROOT_PARENT if p < 0 else p for p in PARENTS],
                                 list(range(len(PARENTS)))], np.int64),
      "J": regressor @ vertices,
      "jflame_synthetic": label,
  }
  return arrays, landmark_embedding(head, reference, label)


def synthetic_flame_arrays(size: str = "flame", seed: int = 0) -> Dict[str, np.ndarray]:
  """The synthetic model as raw arrays under the official FLAME pickle keys.

  Args:
    size: "flame" (5023 vertices, 9976 triangles, 300 shape + 100 expression components) or
      "small" (about 1300 vertices, 20 + 10 components) for fast tests.
    seed: seeds the random parts of the bases; the same seed gives the same arrays.
  Returns:
    v_template (V, 3) float64 metres; f (F, 3) uint32; shapedirs (V, 3, S + E) float64 with the
    identity components first; posedirs (V, 3, 36); J_regressor (5, V); weights (V, 5);
    kintree_table (2, 5) int64; J (5, 3); and jflame_synthetic, the "SYNTHETIC ..." label.
  """
  return generate(size, seed)[0]


def synthetic_flame(size: str = "flame", seed: int = 0) -> Tuple[FlameModel, LandmarkEmbedding]:
  """The synthetic model as a FlameModel (named "SYNTHETIC ...") and its MediaPipe embedding
  (all 478 landmarks, in the order MediaPipe reports them)."""
  arrays, embedding = generate(size, seed)
  model = flame_model_from_arrays(arrays, name=arrays["jflame_synthetic"],
                                  num_expression=_size_spec(size).num_expression,
                                  source="synthetic model")
  return model, embedding
