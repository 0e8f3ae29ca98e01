"""The synthetic FLAME-format head: structure, the MediaPipe embedding, and how it moves."""

from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from jflame import flame, flame_io, synthetic
from tests import flame_pickle
from jflame.synthetic import head as synthetic_head
from jflame.landmarks_io import load_mediapipe_reference

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

MIRROR = np.array([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def small():
  """(raw arrays, model, embedding) of the small model, seed 0."""
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  return synthetic.synthetic_flame_arrays("small", seed=0), model, embedding


@pytest.fixture(scope="module")
def flame_size():
  return synthetic.generate("flame", seed=0)


@pytest.fixture(scope="module")
def reference():
  return load_mediapipe_reference()


def _posed(model, **values):
  """Vertices of `model` with the given FlameParams fields set (others zero), as NumPy."""
  params = flame.FlameParams.zeros(model.num_shape, model.num_expression)
  params = params.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  return np.asarray(flame.flame_forward(model, params)[0], np.float64)


def _landmarks(vertices, model, embedding):
  faces = np.asarray(model.faces)[np.asarray(embedding.face_indices)]
  return np.einsum("kc,kcd->kd", np.asarray(embedding.barycentrics, np.float64), vertices[faces])


def _rotation(axis_angle):
  """Rodrigues' formula in NumPy, independent of jflame.rotation."""
  axis_angle = np.asarray(axis_angle, np.float64)
  angle = np.linalg.norm(axis_angle)
  k = np.array([[0, -axis_angle[2], axis_angle[1]], [axis_angle[2], 0, -axis_angle[0]],
                [-axis_angle[1], axis_angle[0], 0]]) / angle
  return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _edges(faces):
  faces = np.asarray(faces, np.int64)
  return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


# --- Determinism and structure -------------------------------------------------------------------

def test_same_seed_same_arrays_other_seed_other_bases(small):
  arrays = small[0]
  again = synthetic.synthetic_flame_arrays("small", seed=0)
  other = synthetic.synthetic_flame_arrays("small", seed=1)
  for key, value in arrays.items():
    if isinstance(value, str):
      assert again[key] == value
    else:
      np.testing.assert_array_equal(again[key], value)
  # The mesh is the same for every seed; the random parts of the bases are not (at this size
  # every identity and expression component is a named one, so only the correctives differ).
  np.testing.assert_array_equal(other["v_template"], arrays["v_template"])
  np.testing.assert_array_equal(other["f"], arrays["f"])
  np.testing.assert_array_equal(other["shapedirs"], arrays["shapedirs"])
  assert np.abs(other["posedirs"] - arrays["posedirs"]).max() > 1e-4


def test_flame_size_has_flames_counts_and_keys(flame_size):
  arrays, embedding = flame_size
  assert arrays["v_template"].shape == (5023, 3) and arrays["v_template"].dtype == np.float64
  assert arrays["f"].shape == (9976, 3) and arrays["f"].dtype == np.uint32
  assert arrays["shapedirs"].shape == (5023, 3, 400)
  assert arrays["posedirs"].shape == (5023, 3, 36)
  assert arrays["J_regressor"].shape == (5, 5023) and arrays["weights"].shape == (5023, 5)
  assert arrays["kintree_table"].dtype == np.int64
  np.testing.assert_array_equal(arrays["kintree_table"],
                                [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
  assert arrays["jflame_synthetic"].startswith("SYNTHETIC")
  assert flame_io.infer_num_expression(arrays["shapedirs"]) == 100
  assert embedding.num_landmarks == 478


def test_small_size_is_small_but_complete(small):
  arrays, model, embedding = small
  assert 300 <= model.num_vertices <= 1500
  assert (model.num_shape, model.num_expression) == (20, 10)
  assert model.is_synthetic and model.name.startswith("SYNTHETIC")
  np.testing.assert_array_equal(np.asarray(embedding.landmark_indices), np.arange(478))
  assert set(arrays) == {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                         "kintree_table", "J", "jflame_synthetic"}


def test_weights_and_regressor_are_normalised_averages(small):
  arrays = small[0]
  for key in ("weights", "J_regressor"):
    assert arrays[key].min() >= 0.0
  np.testing.assert_allclose(arrays["weights"].sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(arrays["J_regressor"].sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(arrays["J"], arrays["J_regressor"] @ arrays["v_template"])


def test_joints_sit_where_the_anatomy_says(small):
  joints = small[0]["J"]
  root, neck, jaw, left_eye, right_eye = joints
  assert np.allclose(joints[:3, 0], 0.0, atol=1e-9)  # midline
  assert root[1] < neck[1] < jaw[1]                   # neck joint low in the neck, above the root
  assert neck[1] < -0.12                              # below the chin
  assert left_eye[0] > 0.02 and right_eye[0] < -0.02  # subject's left is +x
  np.testing.assert_allclose(left_eye, right_eye * MIRROR, atol=1e-9)
  assert jaw[2] < left_eye[2]                         # the jaw hinge lies behind the eyes


def test_basis_norms_fall_within_groups_and_jump_at_expressions(flame_size):
  norms = np.linalg.norm(flame_size[0]["shapedirs"].reshape(-1, 400), axis=0)
  assert np.all(np.diff(norms[:300]) < 0) and np.all(np.diff(norms[300:]) < 0)
  assert norms[300] > 10 * norms[299]


def test_bases_are_orthogonal_within_each_group(small):
  model = small[1]
  for basis in (model.shapedirs, model.exprdirs):
    flat = np.asarray(basis, np.float64).reshape(-1, basis.shape[-1])
    gram = flat.T @ flat
    off_diagonal = gram - np.diag(np.diag(gram))
    assert np.abs(off_diagonal).max() < 1e-4 * np.diag(gram).max()


# --- The mesh ----------------------------------------------------------------------------------

def _check_mesh(vertices, faces, boundary_size):
  corners = vertices[faces]
  cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  area = 0.5 * np.linalg.norm(cross, axis=1)
  sides_sq = sum(np.sum((corners[:, i] - corners[:, (i + 1) % 3]) ** 2, axis=1) for i in range(3))
  quality = 4.0 * np.sqrt(3.0) * area / sides_sq  # 1 for equilateral, 0 for degenerate
  assert area.min() > 1e-8 and quality.min() > 0.005
  # Manifold and consistently wound: each directed edge once, each undirected edge at most twice.
  directed = Counter(map(tuple, _edges(faces).tolist()))
  assert max(directed.values()) == 1
  undirected = Counter(tuple(sorted(e)) for e in directed)
  assert max(undirected.values()) <= 2
  boundary = [e for e, n in undirected.items() if n == 1]
  assert len(boundary) == boundary_size
  return boundary


@pytest.mark.parametrize("size", ["small", "flame"])
def test_mesh_is_clean_closed_but_for_the_neck_and_wound_outwards(size, small, flame_size):
  arrays = small[0] if size == "small" else flame_size[0]
  vertices, faces = arrays["v_template"], arrays["f"].astype(np.int64)
  spec = synthetic_head.SIZES[size]
  boundary = _check_mesh(vertices, faces, spec.neck_ring_vertices)
  # The only opening is the neck, at its bottom.
  boundary_vertices = np.unique(boundary)
  np.testing.assert_allclose(vertices[boundary_vertices, 1], synthetic_head.NECK_BOTTOM, atol=2e-3)
  # Every face-patch triangle carries a landmark region; its mean normal faces the viewer (+z)
  # and nearly every triangle in the central face does too.
  num_face_triangles = len(load_mediapipe_reference().triangles) * (4 if spec.subdivide_face else 1)
  corners = vertices[faces[:num_face_triangles]]
  normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  mean = normals.sum(0)
  assert mean[2] > 0.9 * np.linalg.norm(mean)
  centre = corners.mean(1)
  central = (np.abs(centre[:, 0]) < 0.035) & (centre[:, 1] > -0.09) & (centre[:, 1] < 0.04)
  assert np.mean(normals[central, 2] > 0) > 0.95
  # Human scale: face about 0.13-0.15 m wide, nose tip the most forward point of the head.
  landmarks = vertices[:468]
  assert 0.12 < np.ptp(landmarks[:, 0]) < 0.16
  front = vertices[np.argmax(vertices[:, 2])]
  assert abs(front[0]) < 0.01 and front[2] - vertices[4, 2] < 0.003


def test_eyeballs_are_closed_outward_spheres_bound_to_their_eye(small):
  arrays = small[0]
  vertices, faces, weights = arrays["v_template"], arrays["f"].astype(np.int64), arrays["weights"]
  for joint in (3, 4):
    members = np.flatnonzero(weights[:, joint] == 1.0)
    own = np.all(np.isin(faces, members), axis=1)
    assert not np.any(np.isin(faces[~own], members))  # a separate component
    tris = vertices[faces[own]]
    volume = np.sum(np.einsum("ij,ij->i", tris[:, 0], np.cross(tris[:, 1], tris[:, 2]))) / 6.0
    radius = synthetic_head.EYEBALL_RADIUS
    assert 0.9 * (4 / 3 * np.pi * radius ** 3) < volume < 1.0 * (4 / 3 * np.pi * radius ** 3)
    _check_mesh(vertices, faces[own], boundary_size=0)


# --- The embedding -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["small", "flame"])
def test_embedding_lands_on_the_mediapipe_reference(size, small, flame_size, reference):
  if size == "small":
    arrays, embedding = small[0], small[2]
  else:
    arrays, embedding = flame_size
  faces = arrays["f"].astype(np.int64)[np.asarray(embedding.face_indices)]
  points = np.einsum("kc,kcd->kd", np.asarray(embedding.barycentrics, np.float64),
                     arrays["v_template"][faces])
  error = np.linalg.norm(points - reference.positions, axis=1)
  assert error.max() < 1e-3  # within 1 mm everywhere (the face landmarks are mesh vertices)
  np.testing.assert_allclose(np.asarray(embedding.barycentrics).sum(1), 1.0, atol=1e-6)
  # Iris landmarks sit on the eyeballs.
  iris_faces = faces[468:]
  assert np.all(arrays["weights"][iris_faces.reshape(-1)][:, 3:].sum(1) == 1.0)


def test_both_evaluation_paths_agree_on_the_embedding(small):
  _, model, embedding = small
  rows = flame.make_surface_rows(model, embedding.face_indices, embedding.barycentrics)
  rng = np.random.default_rng(3)
  params = flame.FlameParams.zeros(model.num_shape, model.num_expression)
  params = params.replace(shape=jnp.asarray(rng.normal(size=20), jnp.float32),
                          expression=jnp.asarray(rng.normal(size=10), jnp.float32),
                          jaw_rotation=jnp.asarray([0.2, 0.05, 0.0], jnp.float32),
                          neck_rotation=jnp.asarray([0.1, -0.2, 0.05], jnp.float32),
                          left_eye_rotation=jnp.asarray([0.1, 0.3, 0.0], jnp.float32))
  fast, _ = flame.surface_points_forward(rows, params)
  full, _ = flame.flame_forward(model, params)
  expected = _landmarks(np.asarray(full, np.float64), model, embedding)
  np.testing.assert_allclose(np.asarray(fast), expected, atol=2e-6)


# --- Motion --------------------------------------------------------------------------------------

def test_jaw_rotation_parts_the_lips_and_leaves_the_upper_face(small):
  _, model, embedding = small
  rest = _posed(model)
  jaw_pose = np.array([0.2, 0.0, 0.0])  # positive pitch opens the mouth
  opened = _posed(model, jaw_rotation=jaw_pose)
  before, after = _landmarks(rest, model, embedding), _landmarks(opened, model, embedding)
  jaw_joint = np.asarray(flame.rest_joints(model, flame.FlameParams.zeros(20, 10)))[2]
  # The lower inner lip is bound to the jaw alone: it turns rigidly about the jaw joint.
  lower_lip = [14, 87, 178, 317, 402]
  expected = (before[lower_lip] - jaw_joint) @ _rotation(jaw_pose).T + jaw_joint
  np.testing.assert_allclose(after[lower_lip], expected, atol=2e-5)
  # The upper inner lip and everything above the mouth stay where they were.
  for upper in (13, 82, 312, 0, 4, 10, 168, 33, 263):
    np.testing.assert_allclose(after[upper], before[upper], atol=1e-6)
  above_mouth = rest[:, 1] > synthetic_head.UPPER_LIP_ABOVE
  np.testing.assert_allclose(opened[above_mouth], rest[above_mouth], atol=1e-6)
  gap_before = np.linalg.norm(before[13] - before[14])
  gap_after = np.linalg.norm(after[13] - after[14])
  assert 0.010 < gap_after - gap_before < 0.025  # a 0.2 rad jaw drop opens the mouth 1-2.5 cm
  assert after[14, 1] < before[14, 1] and after[152, 1] < before[152, 1]


def test_eye_rotation_turns_its_iris_about_the_eyeball_centre_only(small):
  _, model, embedding = small
  rest = _posed(model)
  gaze = np.array([0.0, 0.3, 0.0])
  turned = _posed(model, left_eye_rotation=gaze)
  before, after = _landmarks(rest, model, embedding), _landmarks(turned, model, embedding)
  centre = np.asarray(flame.rest_joints(model, flame.FlameParams.zeros(20, 10)))[3]
  left_iris = np.arange(473, 478)
  expected = (before[left_iris] - centre) @ _rotation(gaze).T + centre
  np.testing.assert_allclose(after[left_iris], expected, atol=2e-5)
  assert np.linalg.norm(after[473] - before[473]) > 0.002
  np.testing.assert_allclose(after[468:473], before[468:473], atol=1e-7)  # the other eye
  np.testing.assert_allclose(after[:468], before[:468], atol=1e-7)  # a yaw leaves the lids
  # A downward gaze draws the upper lid down a little, and leaves the nose.
  down = _landmarks(_posed(model, left_eye_rotation=[0.3, 0.0, 0.0]), model, embedding)
  assert -0.004 < down[386, 1] - before[386, 1] < -0.0005
  np.testing.assert_allclose(down[[1, 4, 6, 168]], before[[1, 4, 6, 168]], atol=1e-7)


def test_neck_rotation_keeps_the_neck_base_and_turns_the_head(small):
  arrays, model, embedding = small
  rest = _posed(model)
  turned = _posed(model, neck_rotation=[0.0, 0.4, 0.0])
  base = np.flatnonzero(arrays["weights"][:, 0] == 1.0)
  assert len(base) >= synthetic_head.SIZES["small"].neck_ring_vertices
  np.testing.assert_allclose(turned[base], rest[base], atol=1e-7)
  nose_move = np.linalg.norm(turned[4] - rest[4])
  assert nose_move > 0.05  # the nose swings round with the head


def test_pose_correctives_are_small_smooth_and_spare_the_eyeballs(small):
  arrays = small[0]
  posedirs = arrays["posedirs"]
  eyeballs = arrays["weights"][:, 3:].sum(1) == 1.0
  assert np.abs(posedirs).max() > 1e-3  # the corrective path does something...
  assert np.abs(posedirs).max() < 0.02  # ...but stays a correction (< 2 cm per unit of R - I)
  assert np.all(posedirs[eyeballs] == 0.0)
  for joint in range(4):  # every joint has some corrective
    assert np.abs(posedirs[..., 9 * joint:9 * joint + 9]).max() > 1e-4


def test_shape_components_change_the_head_smoothly(small):
  arrays, model, _ = small
  rest = _posed(model)
  bigger = _posed(model, shape=np.eye(20)[0] * 2.0)
  smaller = _posed(model, shape=np.eye(20)[0] * -2.0)
  assert np.all(np.ptp(bigger, 0) > np.ptp(rest, 0))
  assert np.all(np.ptp(smaller, 0) < np.ptp(rest, 0))
  wider = _posed(model, shape=np.eye(20)[1] * 2.0)
  growth = np.ptp(wider, 0) / np.ptp(rest, 0)
  assert growth[0] > 1.01 and growth[0] > growth[1] and growth[0] > growth[2]
  # Per unit coefficient: nothing flies off, and neighbours move together.
  shapedirs = np.asarray(model.shapedirs, np.float64)
  exprdirs = np.asarray(model.exprdirs, np.float64)
  vertices = arrays["v_template"]
  edges = _edges(arrays["f"])
  length = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1)[:, None]
  for basis, max_move, max_strain in ((shapedirs, 0.01, 0.5), (exprdirs, 0.008, 2.0)):
    assert np.linalg.norm(basis, axis=1).max() < max_move
    strain = np.linalg.norm(basis[edges[:, 0]] - basis[edges[:, 1]], axis=1) / length
    assert strain.max() < max_strain
  # Eyeballs keep their shape under identity changes and do not move with expressions.
  eyeballs = np.flatnonzero(arrays["weights"][:, 3] == 1.0)
  np.testing.assert_allclose(shapedirs[eyeballs], shapedirs[eyeballs[:1]].repeat(len(eyeballs), 0),
                             atol=1e-12)
  assert np.all(exprdirs[eyeballs] == 0.0)


def test_face_is_mirror_symmetric(small, reference):
  vertices = small[0]["v_template"]
  twins = reference.mirror[:468]
  np.testing.assert_allclose(vertices[twins] * MIRROR, vertices[:468], atol=1e-9)


# --- Files ---------------------------------------------------------------------------------------

def test_pickle_and_npz_round_trips_give_the_same_vertices(tmp_path, small):
  arrays, model, _ = small
  flame_pickle.save_flame_pkl(arrays, tmp_path / "synthetic.pkl")
  from_pickle = flame_io.load_flame(tmp_path / "synthetic.pkl")
  flame_io.save_flame_npz(from_pickle, tmp_path / "synthetic.npz")
  from_npz = flame_io.load_flame(tmp_path / "synthetic.npz")
  for loaded in (from_pickle, from_npz):
    assert loaded.is_synthetic and loaded.name == arrays["jflame_synthetic"]
    assert (loaded.num_shape, loaded.num_expression) == (20, 10)
  rng = np.random.default_rng(0)
  values = dict(shape=rng.normal(size=20), expression=rng.normal(size=10),
                jaw_rotation=[0.15, 0.0, 0.02], neck_rotation=[0.1, 0.2, 0.0],
                right_eye_rotation=[0.0, -0.2, 0.0], global_rotation=[0.0, 0.3, 0.1])
  expected = _posed(model, **values)
  for loaded in (from_pickle, from_npz):
    np.testing.assert_allclose(_posed(loaded, **values), expected, atol=1e-6)


def test_unknown_size_is_refused():
  with pytest.raises(ValueError, match="small"):
    synthetic.synthetic_flame_arrays("huge")
