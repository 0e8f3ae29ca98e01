"""The FLAME forward model against an independent NumPy reference, its gradients, the landmark
fast path, and rotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.spatial.transform import Rotation

from jflame import flame, flame_io
from jflame.rotation import axis_angle_to_matrix, matrix_to_axis_angle_np
from tests.conftest import random_flame_arrays
from tests.precision import enable_x64

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")


def reference_forward(arrays, num_expression, shape, expression, pose):
  """FLAME in plain NumPy with 4x4 homogeneous transforms, written from the paper's equations
  (the library uses 3x4 blocks and a different chain order of operations)."""
  shapedirs = arrays["shapedirs"]
  num_shape = shapedirs.shape[-1] - num_expression
  coefficients = np.zeros(shapedirs.shape[-1])
  coefficients[:len(shape)] = shape
  coefficients[num_shape:num_shape + len(expression)] = expression
  v_shaped = arrays["v_template"] + shapedirs @ coefficients
  joints = arrays["J_regressor"] @ v_shaped
  rotations = Rotation.from_rotvec(pose).as_matrix()
  v_posed = v_shaped + arrays["posedirs"] @ (rotations[1:] - np.eye(3)).reshape(-1)
  parents = [-1, 0, 1, 1, 1]
  world = []
  for j, parent in enumerate(parents):
    local = np.eye(4)
    local[:3, :3] = rotations[j]
    local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
    world.append(local if parent < 0 else world[parent] @ local)
  skinning = []
  for j in range(5):
    unbind = np.eye(4)
    unbind[:3, 3] = -joints[j]
    skinning.append(world[j] @ unbind)
  homogeneous = np.concatenate([v_posed, np.ones((len(v_posed), 1))], axis=1)
  vertices = np.zeros_like(v_posed)
  for j in range(5):
    vertices += arrays["weights"][:, j:j + 1] * (homogeneous @ skinning[j].T)[:, :3]
  posed_joints = np.stack([w[:3, 3] for w in world])
  return vertices, posed_joints


def params_from(shape, expression, pose):
  pose = jnp.asarray(pose, jnp.float32)
  return flame.FlameParams(shape=jnp.asarray(shape, jnp.float32),
                           expression=jnp.asarray(expression, jnp.float32),
                           global_rotation=pose[0], neck_rotation=pose[1], jaw_rotation=pose[2],
                           left_eye_rotation=pose[3], right_eye_rotation=pose[4])


@pytest.fixture(scope="module")
def arrays_and_model():
  arrays = random_flame_arrays()
  return arrays, flame_io.flame_model_from_arrays(arrays, "test model")


def test_forward_matches_numpy_reference(arrays_and_model):
  arrays, model = arrays_and_model
  rng = np.random.default_rng(1)
  for _ in range(3):
    shape, expression = rng.normal(size=7), rng.normal(size=6)  # fewer shape than the model
    pose = rng.normal(scale=0.4, size=(5, 3))
    expected_vertices, expected_joints = reference_forward(arrays, 6, shape, expression, pose)
    vertices, joints = jax.jit(flame.flame_forward)(model, params_from(shape, expression, pose))
    np.testing.assert_allclose(vertices, expected_vertices, atol=2e-5)
    np.testing.assert_allclose(joints, expected_joints, atol=2e-5)


def test_rest_pose_is_template_plus_blendshapes(arrays_and_model):
  arrays, model = arrays_and_model
  params = flame.FlameParams.zeros(model.num_shape, model.num_expression)
  vertices, _ = flame.flame_forward(model, params)
  np.testing.assert_allclose(vertices, arrays["v_template"], atol=1e-6)


def test_too_many_coefficients_is_a_clear_error(arrays_and_model):
  _, model = arrays_and_model
  params = flame.FlameParams.zeros(model.num_shape + 1, model.num_expression)
  with pytest.raises(ValueError, match="has only"):
    flame.flame_forward(model, params)


def test_vmap_equals_loop(arrays_and_model):
  _, model = arrays_and_model
  rng = np.random.default_rng(2)
  batch = [params_from(rng.normal(size=12), rng.normal(size=6), rng.normal(scale=0.3, size=(5, 3)))
           for _ in range(4)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
  batched_vertices, _ = jax.jit(jax.vmap(flame.flame_forward, in_axes=(None, 0)))(model, stacked)
  for i, params in enumerate(batch):
    np.testing.assert_allclose(batched_vertices[i], flame.flame_forward(model, params)[0],
                               atol=1e-5)


def _random_surface_points(model, count, seed):
  rng = np.random.default_rng(seed)
  face_indices = rng.integers(0, model.faces.shape[0], count)
  barycentrics = rng.dirichlet(np.ones(3), count)
  return face_indices, barycentrics


def test_surface_point_fast_path_equals_full_mesh(arrays_and_model):
  _, model = arrays_and_model
  face_indices, barycentrics = _random_surface_points(model, 25, 3)
  rows = flame.make_surface_rows(model, face_indices, barycentrics)
  assert rows.template.shape[0] == 3 * 25  # only the corner rows under the points
  assert rows.group_sizes == (0, 0, 25)
  rng = np.random.default_rng(4)
  params = params_from(rng.normal(size=12), rng.normal(size=4), rng.normal(scale=0.4, size=(5, 3)))
  vertices, joints = flame.flame_forward(model, params)
  expected = flame.barycentric_points(vertices, model.faces, face_indices,
                                      jnp.asarray(barycentrics, jnp.float32))
  points, fast_joints = jax.jit(flame.surface_points_forward)(rows, params)
  np.testing.assert_allclose(points, expected, atol=1e-5)
  np.testing.assert_allclose(fast_joints, joints, atol=1e-5)


def _to_float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


@pytest.mark.slow
def test_gradients_full_mesh_and_fast_path():
  arrays = random_flame_arrays(num_vertices=30, num_faces=40)
  rng = np.random.default_rng(5)
  with enable_x64():
    model = _to_float64(flame_io.flame_model_from_arrays(arrays, "test"))
    face_indices, barycentrics = _random_surface_points(model, 10, 6)
    rows = _to_float64(flame.make_surface_rows(model, face_indices, barycentrics))
    params = _to_float64(params_from(rng.normal(size=12), rng.normal(size=6),
                                     rng.normal(scale=0.4, size=(5, 3))))
    weights = jnp.asarray(rng.normal(size=(30, 3)))

    def mesh_loss(p):
      vertices, joints = flame.flame_forward(model, p)
      return jnp.sum(weights * vertices) + jnp.sum(joints ** 2)

    def points_loss(p):
      points, joints = flame.surface_points_forward(rows, p)
      return jnp.sum(jnp.sin(points)) + jnp.sum(joints ** 2)

    # Compiled: check_grads calls them and their derivatives many times, op by op otherwise.
    check_grads(jax.jit(mesh_loss), (params,), order=1, modes=("rev", "fwd"), eps=1e-4)
    check_grads(jax.jit(points_loss), (params,), order=1, modes=("rev", "fwd"), eps=1e-4)


def test_rodrigues_matches_scipy_and_is_smooth_at_zero():
  rng = np.random.default_rng(7)
  for vector in list(rng.normal(size=(5, 3))) + [np.array([1e-5, -2e-5, 3e-6])]:
    np.testing.assert_allclose(axis_angle_to_matrix(jnp.asarray(vector, jnp.float32)),
                               Rotation.from_rotvec(vector).as_matrix(), atol=1e-6)
    np.testing.assert_allclose(
        matrix_to_axis_angle_np(Rotation.from_rotvec(vector).as_matrix()), vector, atol=1e-6)
  with enable_x64():
    # The rest pose is where fitting starts: gradients there must be finite and exact.
    zero = jnp.zeros(3, jnp.float64)
    jacobian = jax.jacfwd(axis_angle_to_matrix)(zero)
    assert np.all(np.isfinite(jax.grad(lambda v: axis_angle_to_matrix(v).sum())(zero)))
    # dR/dv_x at zero is the cross-product generator of the x axis.
    np.testing.assert_allclose(jacobian[..., 0], [[0, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)
    check_grads(jax.jit(axis_angle_to_matrix), (jnp.asarray([1e-4, 2e-4, -1e-4]),), order=2,
                eps=1e-6)
    check_grads(jax.jit(axis_angle_to_matrix), (jnp.asarray([0.3, -1.2, 2.0]),), order=2)


def test_points_on_vertices_and_edges_use_only_their_weighted_corners(arrays_and_model):
  _, model = arrays_and_model
  barycentrics = np.array([[1.0, 0, 0], [0, 0, 1.0], [0.3, 0.7, 0], [0.2, 0.3, 0.5], [0, 1.0, 0]])
  face_indices = np.array([3, 8, 1, 5, 3])
  rows = flame.make_surface_rows(model, face_indices, barycentrics)
  assert rows.group_sizes == (3, 1, 1) and rows.template.shape[0] == 3 + 2 + 3
  rng = np.random.default_rng(8)
  params = params_from(rng.normal(size=12), rng.normal(size=6), rng.normal(scale=0.4, size=(5, 3)))
  vertices, _ = flame.flame_forward(model, params)
  expected = flame.barycentric_points(vertices, model.faces, face_indices,
                                      jnp.asarray(barycentrics, jnp.float32))
  np.testing.assert_allclose(flame.surface_points_forward(rows, params)[0], expected, atol=1e-5)


def test_vertices_of_batch_in_chunks_equals_vmap(arrays_and_model):
  _, model = arrays_and_model
  rng = np.random.default_rng(9)
  batch = [params_from(rng.normal(size=12), rng.normal(size=6), rng.normal(scale=0.3, size=(5, 3)))
           for _ in range(5)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
  chunked = flame.vertices_of_batch(model, stacked, chunk_size=2)  # 5 = 2 + 2 + 1
  expected = jax.vmap(lambda p: flame.flame_forward(model, p)[0])(stacked)
  np.testing.assert_allclose(chunked, expected, atol=1e-6)
