"""Landmark embeddings: the MediaPipe reference face, the public file formats, region weights."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jflame import landmarks, landmarks_io
from jflame.errors import ModelFileError
from jflame.landmarks import LandmarkEmbedding, LandmarkWeights
from tests.conftest import PROJECT_ROOT

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

MIRROR = np.array([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def reference():
  return landmarks_io.load_mediapipe_reference()


# --- The reference face --------------------------------------------------------------------------

def test_reference_face_is_symmetric_metric_and_frontal(reference):
  positions, mirror = reference.positions, reference.mirror
  assert positions.shape == (478, 3)
  np.testing.assert_array_equal(mirror[mirror], np.arange(478))  # twins pair up
  np.testing.assert_allclose(positions[mirror] * MIRROR, positions, atol=1e-7)
  assert mirror[33] == 263 and mirror[61] == 291 and mirror[468] == 473 and mirror[1] == 1
  # Iris centres 63 mm apart, level, subject's left (473) at +x, origin between them.
  np.testing.assert_allclose(np.linalg.norm(positions[473] - positions[468]), 0.063, atol=1e-6)
  np.testing.assert_allclose(positions[473] + positions[468], 0.0, atol=1e-7)
  assert positions[473, 0] > 0
  # Human proportions: face 12-16 cm wide, nose tip well in front of the eyes, chin below.
  assert 0.12 < np.ptp(positions[:468, 0]) < 0.16
  assert positions[4, 2] - positions[468, 2] > 0.025
  assert positions[152, 1] < positions[13, 1] < positions[4, 1] < positions[468, 1]


def test_reference_triangles_face_the_viewer(reference):
  triangles = reference.triangles
  assert triangles.shape == (852, 3) and triangles.max() == 467
  corners = reference.positions[triangles]
  normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  assert np.mean(normals[:, 2] > 0) > 0.9
  # Consistent winding: every directed edge once.
  directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
  assert len(np.unique(directed, axis=0)) == len(directed)
  for loop, size in ((reference.face_oval_loop, 36), (reference.left_eye_loop, 16),
                     (reference.right_eye_loop, 16), (reference.inner_lips_loop, 20)):
    assert len(loop) == size == len(set(loop.tolist()))


def _vertex_set(edges):
  return sorted({v for edge in edges for v in edge})


def test_reference_regions_are_mediapipes_connection_sets(reference):
  connections = pytest.importorskip("mediapipe.python.solutions.face_mesh_connections")
  expected = {
      "eyes": _vertex_set(connections.FACEMESH_LEFT_EYE | connections.FACEMESH_RIGHT_EYE),
      "lips": _vertex_set(connections.FACEMESH_LIPS),
      "brows": _vertex_set(connections.FACEMESH_LEFT_EYEBROW | connections.FACEMESH_RIGHT_EYEBROW),
      "nose": _vertex_set(connections.FACEMESH_NOSE),
      "face_oval": _vertex_set(connections.FACEMESH_FACE_OVAL),
      "iris": list(range(468, 478)),
  }
  for name, indices in expected.items():
    assert reference.regions[name].tolist() == indices, name
  assert set(_vertex_set(connections.FACEMESH_LEFT_IRIS)) < set(range(473, 478))
  # Every triangle edge is one of MediaPipe's tessellation edges.
  edges = {tuple(sorted(e)) for e in connections.FACEMESH_TESSELATION}
  triangles = reference.triangles
  for i, j in ((0, 1), (1, 2), (2, 0)):
    assert all(tuple(sorted(e)) in edges for e in triangles[:, [i, j]].tolist())


@pytest.mark.slow
def test_committed_reference_is_what_the_tool_makes(reference, tmp_path):
  pytest.importorskip("mediapipe")
  # tools/ holds repository scripts that nothing imports: run it as its users do.
  made_path = tmp_path / "made.npz"
  subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "make_mediapipe_reference.py"),
                  "--output", str(made_path)], check=True, capture_output=True, timeout=300)
  with np.load(made_path) as made_file:
    made = {key: made_file[key] for key in made_file.files}
  # MediaPipe on another CPU may differ in the last bits; 0.1 mm is far below what matters.
  np.testing.assert_allclose(made["positions"], reference.positions, atol=1e-4)
  np.testing.assert_array_equal(made["triangles"], reference.triangles)
  np.testing.assert_array_equal(made["mirror"], reference.mirror)


def test_missing_reference_says_how_to_make_it(tmp_path):
  with pytest.raises(ModelFileError, match="make_mediapipe_reference"):
    landmarks_io.load_mediapipe_reference(tmp_path / "nothing.npz")


# --- The MediaPipe embedding format ------------------------------------------------------------

def _public_mediapipe_file(path, count=105, seed=0):
  """A file laid out like the public `mediapipe_landmark_embedding.npz` (int64, float64)."""
  rng = np.random.default_rng(seed)
  arrays = dict(lmk_face_idx=rng.integers(0, 9976, count).astype(np.int64),
                lmk_b_coords=rng.dirichlet(np.ones(3), count),
                landmark_indices=np.sort(rng.choice(468, count, replace=False)).astype(np.int64))
  np.savez(path, **arrays)
  return arrays


def test_loads_the_public_mediapipe_format(tmp_path):
  arrays = _public_mediapipe_file(tmp_path / "mediapipe_landmark_embedding.npz")
  embedding = landmarks_io.load_mediapipe_embedding(tmp_path / "mediapipe_landmark_embedding.npz")
  assert embedding.num_landmarks == 105 and embedding.layout == "mediapipe478"
  assert embedding.face_indices.dtype == jnp.int32 and embedding.barycentrics.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(embedding.face_indices), arrays["lmk_face_idx"])
  np.testing.assert_allclose(np.asarray(embedding.barycentrics), arrays["lmk_b_coords"],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(embedding.landmark_indices),
                                arrays["landmark_indices"])
  assert "mediapipe_landmark_embedding.npz" in embedding.name


def test_synthetic_embedding_round_trips_through_the_public_format(tmp_path):
  rng = np.random.default_rng(1)
  embedding = LandmarkEmbedding(
      face_indices=jnp.asarray(rng.integers(0, 2560, 478), jnp.int32),
      barycentrics=jnp.asarray(rng.dirichlet(np.ones(3), 478), jnp.float32),
      landmark_indices=jnp.arange(478, dtype=jnp.int32), name="SYNTHETIC test embedding")
  path = tmp_path / "synthetic_embedding.npz"
  landmarks_io.save_mediapipe_embedding(embedding, path)
  with np.load(path) as data:  # readable by anyone's np.load, with the public keys
    assert {"lmk_face_idx", "lmk_b_coords", "landmark_indices"} <= set(data.files)
  loaded = landmarks_io.load_mediapipe_embedding(path)
  assert loaded.name == "SYNTHETIC test embedding"
  for field in ("face_indices", "barycentrics", "landmark_indices"):
    np.testing.assert_array_equal(np.asarray(getattr(loaded, field)),
                                  np.asarray(getattr(embedding, field)))


def test_missing_and_malformed_mediapipe_files_name_the_file(tmp_path):
  missing = tmp_path / "mediapipe_landmark_embedding.npz"
  with pytest.raises(ModelFileError, match=r"mediapipe_landmark_embedding\.npz.*WORKSPACE\.md"):
    landmarks_io.load_mediapipe_embedding(missing)
  np.savez(tmp_path / "no_keys.npz", something=np.zeros(3))
  with pytest.raises(ModelFileError, match=r"no_keys\.npz.*lmk_face_idx"):
    landmarks_io.load_mediapipe_embedding(tmp_path / "no_keys.npz")
  np.savez(tmp_path / "bad_shapes.npz", lmk_face_idx=np.arange(5), lmk_b_coords=np.ones((4, 3)),
           landmark_indices=np.arange(5))
  with pytest.raises(ModelFileError, match=r"bad_shapes\.npz.*barycentric"):
    landmarks_io.load_mediapipe_embedding(tmp_path / "bad_shapes.npz")
  np.savez(tmp_path / "bad_index.npz", lmk_face_idx=np.arange(2),
           lmk_b_coords=np.full((2, 3), 1 / 3), landmark_indices=np.array([0, 478]))
  with pytest.raises(ModelFileError, match=r"0\.\.477"):
    landmarks_io.load_mediapipe_embedding(tmp_path / "bad_index.npz")
  (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(ModelFileError, match=r"garbage\.npz"):
    landmarks_io.load_mediapipe_embedding(tmp_path / "garbage.npz")
  np.savez(tmp_path / "objects.npz", lmk_face_idx=np.array([{"a": 1}], dtype=object),
           lmk_b_coords=np.ones((1, 3)) / 3, landmark_indices=np.zeros(1, np.int64))
  with pytest.raises(ModelFileError, match=r"objects\.npz"):  # pickled arrays are refused
    landmarks_io.load_mediapipe_embedding(tmp_path / "objects.npz")


def test_embedding_that_names_missing_triangles_is_caught():
  embedding = LandmarkEmbedding(face_indices=jnp.asarray([3, 9999]), barycentrics=jnp.ones((2, 3)),
                                landmark_indices=jnp.asarray([0, 1]), name="x")
  landmarks.check_embedding_fits(embedding, 10000)
  with pytest.raises(ModelFileError, match="9999"):
    landmarks.check_embedding_fits(embedding, 2560)


# --- Weights -----------------------------------------------------------------------------------------

def test_region_weights_follow_mediapipe_regions(reference):
  config = LandmarkWeights(iris=0.1, eyes=0.2, lips=0.3, brows=0.4, nose=0.5, face_oval=0.6,
                           other=0.7)
  weights = landmarks.mediapipe_landmark_weights(reference, config)
  assert weights.shape == (478,) and weights.dtype == np.float32
  np.testing.assert_allclose(weights[[468, 473, 477]], 0.1)
  np.testing.assert_allclose(weights[[33, 133, 263, 362, 159, 145]], 0.2)
  np.testing.assert_allclose(weights[[0, 13, 14, 17, 61, 291, 78, 308]], 0.3)
  np.testing.assert_allclose(weights[[70, 105, 107, 300, 334, 336]], 0.4)
  np.testing.assert_allclose(weights[[1, 4, 168, 195]], 0.5)
  np.testing.assert_allclose(weights[[10, 152, 234, 454]], 0.6)
  np.testing.assert_allclose(weights[[50, 280, 9, 151]], 0.7)  # cheeks, brow middle: other
  # Every landmark gets exactly the weight of its highest-precedence region.
  expected = np.full(478, 0.7)
  for region in reversed(landmarks.REGION_NAMES):
    expected[reference.regions[region]] = getattr(config, region)
  np.testing.assert_allclose(weights, expected)


def test_weight_config_is_frozen_and_hashable_for_jit():
  config = LandmarkWeights()
  assert hash(config) == hash(LandmarkWeights()) and config == LandmarkWeights()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.iris = 3.0
  scaled = jax.jit(lambda x, c: x * c.lips, static_argnums=1)
  np.testing.assert_allclose(np.asarray(scaled(jnp.ones(2), LandmarkWeights(lips=3.0))), 3.0)
