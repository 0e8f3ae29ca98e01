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

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.rotation import axis_angle_to_matrix

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
# What a model is, as data: FLAME releases differ in their bases, so coefficients (from DECA,
# MICA, or another tool) mean something only for the release they were made for.
VARIANTS = ("flame2020", "flame2023", "flame2023_open", "synthetic", "unknown")


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
    variant: static, one of VARIANTS: which release the arrays are (see
      `jflame.flame_io.detect_variant`); "unknown" when nothing says.
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
  variant: str = struct.field(pytree_node=False, default="unknown")

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
    return self.variant == "synthetic"


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

  def as_dict(self) -> dict:
    """name -> array, in PARAMETER_NAMES order (what the writers store under these names)."""
    return {name: getattr(self, name) for name in PARAMETER_NAMES}

  def joint_rotations(self) -> jax.Array:
    """(5, 3) axis-angle per joint, in JOINT_NAMES order."""
    return jnp.stack([self.global_rotation, self.neck_rotation, self.jaw_rotation,
                      self.left_eye_rotation, self.right_eye_rotation])


# The names of the FLAME parameters, in field order: every file format's name for them.
PARAMETER_NAMES = tuple(field.name for field in dataclasses.fields(FlameParams))
# The axis-angle rotations among them, (3,) each.
ROTATION_NAMES = PARAMETER_NAMES[2:]


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


def skin(points, lbs_weights, transforms, fused=False):
  """Linear blend skinning: (R, 3) rest points, (R, J) weights, (J, 3, 4) -> (R, 3).

  The per-row 3x3 product is written elementwise (as a batched dot it becomes thousands of tiny
  matrix products). The per-row blend of joint transforms is a matrix product, which is fastest
  when differentiated (the landmark fast path); `fused=True` writes it as a sum over the few
  joints instead, which XLA fuses with the rest so the (R, 12) blend is never stored: a third
  faster for the full mesh forward at large batches, but slower to differentiate (CPU).
  """
  if fused:
    blended = sum(lbs_weights[:, j, None, None] * transforms[j]
                  for j in range(transforms.shape[0]))
  else:
    num_joints = transforms.shape[0]
    blended = (lbs_weights @ transforms.reshape(num_joints, 12)).reshape(-1, 3, 4)
  return jnp.sum(blended[:, :, :3] * points[:, None, :], axis=-1) + blended[:, :, 3]


def posed_joint_locations(transforms, rest_joints):
  """Where the joints are after posing: each joint's own transform applied to its rest location."""
  return jnp.sum(transforms[:, :, :3] * rest_joints[:, None, :], axis=-1) + transforms[:, :, 3]


def _shaped(model: FlameModel, params: FlameParams):
  """The template with identity and expression blended in, before posing: (V, 3)."""
  shaped = blend(model.v_template, model.shapedirs, params.shape, "shape")
  return blend(shaped, model.exprdirs, params.expression, "expression")


def rest_joints(model: FlameModel, params: FlameParams):
  """(J, 3) joints regressed from the shaped, expression-blended mesh before posing."""
  return model.j_regressor @ _shaped(model, params)


def flame_forward(model: FlameModel, params: FlameParams):
  """All vertices and joints of one posed face: ((V, 3), (J, 3)) in model space (metres)."""
  rotations = jax.vmap(axis_angle_to_matrix)(params.joint_rotations())
  shaped = _shaped(model, params)
  joints = model.j_regressor @ shaped
  posed = blend(shaped, model.posedirs, pose_feature(rotations), "pose-corrective")
  transforms = relative_joint_transforms(rotations, joints, model.parents)
  vertices = skin(posed, model.lbs_weights, transforms, fused=True)
  return vertices, posed_joint_locations(transforms, joints)


@struct.dataclass
class SurfaceRows:
  """The slice of a FlameModel that a fixed set of barycentric surface points needs.

  Built once on the host by `make_surface_rows` for fixed coefficient counts. A point is a
  weighted sum of the corners of its triangle that carry weight: one corner for a point that
  sits on a vertex (every landmark of the synthetic model, most of a MediaPipe embedding), two
  on an edge, three inside a triangle. Points are grouped by that count and each group's corner
  rows are stored corner-major (row j * c + i is corner i of the group's point j), so combining
  them is a reshape and a weighted sum, with no gather; `point_order` puts the points back in
  the caller's order. Shape, expression and pose-corrective bases are one coefficient-major
  matrix (one matrix product per image and one for its gradient), and the joint regressor is
  precomposed with the shape and expression bases.
  """
  template: jax.Array          # (R, 3)
  basis: jax.Array             # (S + E + P, R * 3)
  lbs_weights: jax.Array       # (R, J)
  joint_template: jax.Array    # (J, 3)
  joint_basis: jax.Array       # (S + E, J * 3)
  corner_weights: jax.Array    # (R,) barycentric weight of each row's corner
  # (K,) int32: point k of the caller is grouped point point_order[k]; None when they coincide.
  point_order: Optional[jax.Array]
  group_sizes: Tuple[int, int, int] = struct.field(pytree_node=False)  # points with 1, 2, 3 corners
  num_shape: int = struct.field(pytree_node=False)
  num_expression: int = struct.field(pytree_node=False)
  parents: Tuple[int, ...] = struct.field(pytree_node=False)


def _grouped_corners(face_indices, barycentrics, faces):
  """Rows (vertex, weight) grouped by how many corners of each point carry weight."""
  corner_vertices = faces[np.asarray(face_indices)]
  barycentrics = np.asarray(barycentrics, np.float64)
  used = np.abs(barycentrics) > 1e-7
  counts = used.sum(axis=1)
  if np.any(counts == 0):
    raise ValueError("a surface point has all-zero barycentric coordinates")
  vertices, weights, grouped_points = [], [], []
  for count in (1, 2, 3):
    for point in np.flatnonzero(counts == count):
      corners = np.flatnonzero(used[point])
      vertices.extend(corner_vertices[point, corners])
      weights.extend(barycentrics[point, corners])
      grouped_points.append(point)
  order = np.empty(len(grouped_points), np.int64)
  order[np.asarray(grouped_points)] = np.arange(len(grouped_points))
  group_sizes = tuple(int(np.sum(counts == c)) for c in (1, 2, 3))
  return np.asarray(vertices), np.asarray(weights), order, group_sizes


def make_surface_rows(model: FlameModel, face_indices, barycentrics, num_shape=None,
                      num_expression=None) -> SurfaceRows:
  """Gathers and precomposes the rows under surface points (triangle index + barycentrics),
  keeping the leading `num_shape` / `num_expression` components (default: all)."""
  num_shape = model.num_shape if num_shape is None else num_shape
  num_expression = model.num_expression if num_expression is None else num_expression
  if num_shape > model.num_shape or num_expression > model.num_expression:
    raise ValueError(f"asked for {num_shape} shape / {num_expression} expression components; "
                     f"the model has {model.num_shape} / {model.num_expression}.")
  rows, corner_weights, order, group_sizes = _grouped_corners(
      face_indices, barycentrics, np.asarray(model.faces))
  shape_basis = np.asarray(model.shapedirs, np.float64)[..., :num_shape]
  expression_basis = np.asarray(model.exprdirs, np.float64)[..., :num_expression]
  identity_basis = np.concatenate([shape_basis, expression_basis], axis=-1)  # (V, 3, S + E)
  row_basis = np.concatenate([identity_basis[rows],
                              np.asarray(model.posedirs, np.float64)[rows]], axis=-1)
  j_regressor = np.asarray(model.j_regressor, np.float64)
  joint_basis = np.einsum("jv,vcn->njc", j_regressor, identity_basis)
  return SurfaceRows(
      template=jnp.asarray(np.asarray(model.v_template)[rows], jnp.float32),
      basis=jnp.asarray(row_basis.transpose(2, 0, 1).reshape(row_basis.shape[-1], -1),
                        jnp.float32),
      lbs_weights=jnp.asarray(np.asarray(model.lbs_weights)[rows], jnp.float32),
      joint_template=jnp.asarray(j_regressor @ np.asarray(model.v_template, np.float64),
                                 jnp.float32),
      joint_basis=jnp.asarray(joint_basis.reshape(joint_basis.shape[0], -1), jnp.float32),
      corner_weights=jnp.asarray(corner_weights, jnp.float32),
      point_order=(None if np.array_equal(order, np.arange(len(order)))
                   else jnp.asarray(order, jnp.int32)),
      group_sizes=group_sizes,
      num_shape=num_shape, num_expression=num_expression, parents=model.parents)


def combine_corners(rows: SurfaceRows, row_values):
  """(R, D) values at the corner rows -> (K, D) values at the points, in the caller's order."""
  weighted = rows.corner_weights[:, None] * row_values
  groups, start = [], 0
  for corners, count in zip((1, 2, 3), rows.group_sizes):
    if count:
      block = weighted[start:start + corners * count]
      groups.append(jnp.sum(block.reshape(count, corners, weighted.shape[-1]), axis=1))
    start += corners * count
  points = jnp.concatenate(groups, axis=0)
  return points if rows.point_order is None else points[rows.point_order]


def _padded(coefficients, count, name):
  """Coefficients zero-padded to the count the rows were built for."""
  given = coefficients.shape[-1]
  if given > count:
    raise ValueError(f"{given} {name} coefficients given but these surface rows were built for "
                     f"{count}; rebuild them with make_surface_rows(..., num_{name}={given}).")
  return jnp.pad(coefficients, (0, count - given))


def surface_points_forward(rows: SurfaceRows, params: FlameParams):
  """Posed surface points (K, 3) and joints (J, 3) of one face, without the full mesh."""
  rotations = jax.vmap(axis_angle_to_matrix)(params.joint_rotations())
  identity = jnp.concatenate([_padded(params.shape, rows.num_shape, "shape"),
                              _padded(params.expression, rows.num_expression, "expression")])
  coefficients = jnp.concatenate([identity, pose_feature(rotations)])
  posed = rows.template + (coefficients @ rows.basis).reshape(-1, 3)
  joints = rows.joint_template + (identity @ rows.joint_basis).reshape(-1, 3)
  transforms = relative_joint_transforms(rotations, joints, rows.parents)
  points = combine_corners(rows, skin(posed, rows.lbs_weights, transforms))
  return points, posed_joint_locations(transforms, joints)


def barycentric_points(vertices, faces, face_indices, barycentrics):
  """Surface points of a full mesh: (V, 3) vertices -> (K, 3) points."""
  corners = vertices[faces[face_indices]]  # (K, 3, 3)
  return jnp.einsum("kc,kcd->kd", barycentrics, corners)


def vertices_of_batch(model: FlameModel, params: FlameParams, chunk_size: int = 16):
  """(B, V, 3) vertices of a batch of faces (leading axis on every params leaf).

  Vectorised over chunks of `chunk_size` faces, the chunks in sequence: per-face intermediates
  of a whole large batch (B x V x 3 several times over) do not fit in cache, and on a CPU the
  full mesh costs over twice as much per face at batch 256 as at batch 16.
  """
  batch = jax.tree.leaves(params)[0].shape[0]
  return jax.lax.map(lambda p: flame_forward(model, p)[0], params,
                     batch_size=min(chunk_size, batch))
