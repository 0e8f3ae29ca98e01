"""The FLAME forward model for ONE face, written after the classic linear-blend-skinning recipe.

vertices = skin( template + shape blend + expression blend + pose-corrective blend ), with joints
regressed from the shaped (unposed) mesh and a five-joint chain: global (root), neck, jaw, and
the two eyes. Every function here handles a single example; batch with `jax.vmap`.

Two evaluation paths share the same maths:
* `flame_forward` evaluates every vertex: for rendering and output meshes.
* `surface_points_forward` evaluates only the vertex rows under a set of barycentric surface
  points (landmarks) plus the joints, with the joint regressor precomposed with the bases on the
  host. Landmark fitting needs nothing else, and it is a fraction of the work.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.rotation import axis_angle_to_matrix

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")


@struct.dataclass
class FlameModel:
  """A FLAME-format head model. Sizes are read from the arrays, never assumed.

  Attributes:
    v_template: (V, 3) mean head in metres, FLAME axes (x to the subject's left, y up, z forward).
    shapedirs: (V, 3, S) identity basis.
    exprdirs: (V, 3, E) expression basis.
    posedirs: (V, 3, 9 * (J - 1)) pose-corrective basis over (R - I) of every non-root joint.
    j_regressor: (J, V) joint regressor (dense).
    lbs_weights: (V, J) skinning weights.
    faces: (F, 3) int32 triangle vertex indices.
    parents: static tuple, parents[j] is the parent joint of j, -1 for the root.
    name: static label that says where the model came from ("SYNTHETIC ..." for generated ones).
  """
  v_template: jax.Array
  shapedirs: jax.Array
  exprdirs: jax.Array
  posedirs: jax.Array
  j_regressor: jax.Array
  lbs_weights: jax.Array
  faces: jax.Array
  parents: Tuple[int, ...] = struct.field(pytree_node=False)
  name: str = struct.field(pytree_node=False, default="")

  @property
  def num_vertices(self) -> int:
    return self.v_template.shape[0]

  @property
  def num_shape(self) -> int:
    return self.shapedirs.shape[-1]

  @property
  def num_expression(self) -> int:
    return self.exprdirs.shape[-1]

  @property
  def num_joints(self) -> int:
    return len(self.parents)

  @property
  def is_synthetic(self) -> bool:
    return self.name.startswith("SYNTHETIC")


@struct.dataclass
class FlameParams:
  """FLAME coefficients for one face. Rotations are axis-angle in radians.

  `shape` and `expression` may hold fewer coefficients than the model has; the missing ones
  count as zero (only the leading basis columns are evaluated).
  """
  shape: jax.Array
  expression: jax.Array
  global_rotation: jax.Array
  neck_rotation: jax.Array
  jaw_rotation: jax.Array
  left_eye_rotation: jax.Array
  right_eye_rotation: jax.Array

  @classmethod
  def zeros(cls, num_shape: int, num_expression: int, dtype=jnp.float32) -> "FlameParams":
    rot = jnp.zeros(3, dtype)
    return cls(shape=jnp.zeros(num_shape, dtype), expression=jnp.zeros(num_expression, dtype),
               global_rotation=rot, neck_rotation=rot, jaw_rotation=rot,
               left_eye_rotation=rot, right_eye_rotation=rot)

  def joint_rotations(self) -> jax.Array:
    """(5, 3) axis-angle per joint, in JOINT_NAMES order."""
    return jnp.stack([self.global_rotation, self.neck_rotation, self.jaw_rotation,
                      self.left_eye_rotation, self.right_eye_rotation])


def _leading(basis, coefficients, name):
  """The basis columns that `coefficients` drive (fewer coefficients = zero-padded)."""
  count = coefficients.shape[-1]
  if count > basis.shape[-1]:
    raise ValueError(f"{count} {name} coefficients given but the model has only "
                     f"{basis.shape[-1]}; pass at most {basis.shape[-1]}.")
  return basis[..., :count]


def blend(template, basis, coefficients, name="blendshape"):
  """template + basis @ coefficients over the last axis: (R, 3) + (R, 3, K) @ (k<=K,)."""
  return template + jnp.einsum("rck,k->rc", _leading(basis, coefficients, name), coefficients)


def pose_feature(rotations):
  """(R_j - I) for every non-root joint, flattened row-major: the posedirs input."""
  eye = jnp.eye(3, dtype=rotations.dtype)
  return (rotations[1:] - eye).reshape(-1)


def relative_joint_transforms(rotations, rest_joints, parents):
  """Per-joint rigid transforms that carry rest-pose points to posed points.

  Args:
    rotations: (J, 3, 3) local joint rotations.
    rest_joints: (J, 3) joint locations in the rest pose.
    parents: static tuple of parent indices, parents[0] == -1.
  Returns:
    (J, 3, 4) matrices [R | t] with posed = R @ rest + t for points bound rigidly to joint j.
  """
  world_rot = []
  world_loc = []
  for j, parent in enumerate(parents):
    if parent < 0:
      world_rot.append(rotations[j])
      world_loc.append(rest_joints[j])
    else:
      offset = rest_joints[j] - rest_joints[parent]
      world_rot.append(world_rot[parent] @ rotations[j])
      world_loc.append(world_rot[parent] @ offset + world_loc[parent])
  world_rot = jnp.stack(world_rot)
  world_loc = jnp.stack(world_loc)
  # Subtract the rotated rest location so the transform acts on rest-pose coordinates.
  translation = world_loc - jnp.einsum("jab,jb->ja", world_rot, rest_joints)
  return jnp.concatenate([world_rot, translation[:, :, None]], axis=2)


def skin(points, lbs_weights, transforms):
  """Linear blend skinning: (R, 3) rest points, (R, J) weights, (J, 3, 4) -> (R, 3)."""
  blended = jnp.einsum("rj,jab->rab", lbs_weights, transforms)
  return jnp.einsum("rab,rb->ra", blended[:, :, :3], points) + blended[:, :, 3]


def _posed_rows(v_template, shapedirs, exprdirs, posedirs, lbs_weights, rest_joints, parents,
                params):
  """Shape, pose-correct and skin a set of vertex rows; shared by both evaluation paths."""
  rotations = jax.vmap(axis_angle_to_matrix)(params.joint_rotations())
  shaped = blend(v_template, shapedirs, params.shape, "shape")
  shaped = shaped + jnp.einsum("rck,k->rc", _leading(exprdirs, params.expression, "expression"),
                               params.expression)
  posed = shaped + jnp.einsum("rcp,p->rc", posedirs, pose_feature(rotations))
  transforms = relative_joint_transforms(rotations, rest_joints, parents)
  posed_joints = transforms[:, :, :3] @ rest_joints[:, :, None]
  posed_joints = posed_joints[:, :, 0] + transforms[:, :, 3]
  return skin(posed, lbs_weights, transforms), posed_joints


def rest_joints(model: FlameModel, params: FlameParams):
  """(J, 3) joints regressed from the shaped, expression-blended mesh before posing."""
  shaped = blend(model.v_template, model.shapedirs, params.shape, "shape")
  shaped = blend(shaped, model.exprdirs, params.expression, "expression")
  return model.j_regressor @ shaped


def flame_forward(model: FlameModel, params: FlameParams):
  """All vertices and joints of one posed face: ((V, 3), (J, 3)) in model space (metres)."""
  joints = rest_joints(model, params)
  return _posed_rows(model.v_template, model.shapedirs, model.exprdirs, model.posedirs,
                     model.lbs_weights, joints, model.parents, params)


@struct.dataclass
class SurfaceRows:
  """The slice of a FlameModel that a fixed set of barycentric surface points needs.

  Built once on the host by `make_surface_rows`. `point_rows` index into the gathered rows
  (not into the full mesh); the joint bases are J_regressor precomposed with the model bases.
  """
  v_template: jax.Array      # (U, 3)
  shapedirs: jax.Array       # (U, 3, S)
  exprdirs: jax.Array        # (U, 3, E)
  posedirs: jax.Array        # (U, 3, P)
  lbs_weights: jax.Array     # (U, J)
  joint_template: jax.Array  # (J, 3)
  joint_shapedirs: jax.Array  # (J, 3, S)
  joint_exprdirs: jax.Array   # (J, 3, E)
  point_rows: jax.Array      # (K, 3) int32
  point_barycentrics: jax.Array  # (K, 3)
  parents: Tuple[int, ...] = struct.field(pytree_node=False)


def make_surface_rows(model: FlameModel, face_indices, barycentrics) -> SurfaceRows:
  """Gathers the rows under surface points given as (triangle index, barycentric coordinates)."""
  faces = np.asarray(model.faces)
  corner_vertices = faces[np.asarray(face_indices)]  # (K, 3)
  unique_vertices, inverse = np.unique(corner_vertices.reshape(-1), return_inverse=True)
  j_reg = np.asarray(model.j_regressor, np.float64)

  def joint_basis(basis):
    return np.einsum("jv,vck->jck", j_reg, np.asarray(basis, np.float64)).astype(np.float32)

  return SurfaceRows(
      v_template=jnp.asarray(model.v_template)[unique_vertices],
      shapedirs=jnp.asarray(model.shapedirs)[unique_vertices],
      exprdirs=jnp.asarray(model.exprdirs)[unique_vertices],
      posedirs=jnp.asarray(model.posedirs)[unique_vertices],
      lbs_weights=jnp.asarray(model.lbs_weights)[unique_vertices],
      joint_template=jnp.asarray(j_reg @ np.asarray(model.v_template, np.float64), jnp.float32),
      joint_shapedirs=jnp.asarray(joint_basis(model.shapedirs)),
      joint_exprdirs=jnp.asarray(joint_basis(model.exprdirs)),
      point_rows=jnp.asarray(inverse.reshape(-1, 3), jnp.int32),
      point_barycentrics=jnp.asarray(barycentrics, jnp.float32),
      parents=model.parents)


def surface_points_forward(rows: SurfaceRows, params: FlameParams):
  """Posed surface points (K, 3) and joints (J, 3) of one face, without the full mesh."""
  joints = blend(rows.joint_template, rows.joint_shapedirs, params.shape, "shape")
  joints = blend(joints, rows.joint_exprdirs, params.expression, "expression")
  posed_rows, posed_joints = _posed_rows(rows.v_template, rows.shapedirs, rows.exprdirs,
                                         rows.posedirs, rows.lbs_weights, joints, rows.parents,
                                         params)
  points = jnp.einsum("kc,kcd->kd", rows.point_barycentrics, posed_rows[rows.point_rows])
  return points, posed_joints


def barycentric_points(vertices, faces, face_indices, barycentrics):
  """Surface points of a full mesh: (V, 3) vertices -> (K, 3) points."""
  corners = vertices[faces[face_indices]]  # (K, 3, 3)
  return jnp.einsum("kc,kcd->kd", barycentrics, corners)
