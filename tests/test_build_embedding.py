"""jflame.embedding_builder (jflame-build-embedding): an embedding built from renders and
MediaPipe lands near the known one."""

import numpy as np
import pytest

from jflame import embedding_builder, synthetic
from jflame.preprocess import FaceAnalyzer


def test_closest_surface_point_matches_dense_sampling():
  rng = np.random.default_rng(0)
  vertices = rng.normal(size=(30, 3))
  faces = rng.integers(0, 30, (40, 3))
  faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) &
                (faces[:, 0] != faces[:, 2])]
  points = rng.normal(size=(6, 3))
  face_ids, barycentrics = embedding_builder.closest_surface_points(points, vertices, faces,
                                                                  radius=np.inf)
  # Independent reference: densely sampled barycentric grid on every triangle.
  grid = np.array([(i, j, 60 - i - j) for i in range(61) for j in range(61 - i)]) / 60.0
  samples = np.einsum("gc,fcd->fgd", grid, vertices[faces]).reshape(-1, 3)
  for point, face, bary in zip(points, face_ids, barycentrics):
    found = np.linalg.norm(bary @ vertices[faces[face]] - point)
    dense = np.min(np.linalg.norm(samples - point, axis=1))
    assert found <= dense + 1e-9 and dense - found < 0.05
    assert np.all(bary >= -1e-6) and abs(bary.sum() - 1) < 1e-6


@pytest.mark.slow
def test_embedding_built_from_renders_lands_near_the_known_one():
  model, known = synthetic.synthetic_flame("flame", seed=0)
  with FaceAnalyzer() as analyzer:
    built, counts = embedding_builder.build_embedding(model, 384, [0.0], analyzer)
  assert counts == [1] and built.num_landmarks > 440
  report = embedding_builder.compare(built, known, model)
  # A few millimetres on a face ~140 mm wide; a wrong back-projection lands centimetres off.
  assert report["median_mm"] < 6.0 and report["eyes_mean_mm"] < 8.0, report
