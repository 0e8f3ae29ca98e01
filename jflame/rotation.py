"""Axis-angle rotations, safe and differentiable at zero (the rest pose, where fitting starts)."""

import jax.numpy as jnp
import numpy as np

# Below this squared angle the closed forms lose precision; use their Taylor series instead.
_SMALL_ANGLE_SQ = 1e-6


# K = _CROSS @ w is the cross-product matrix of w ([w]x v = w x v): minus the Levi-Civita symbol.
_CROSS = -np.array([[[0, 0, 0], [0, 0, 1], [0, -1, 0]],
                    [[0, 0, -1], [0, 0, 0], [1, 0, 0]],
                    [[0, 1, 0], [-1, 0, 0], [0, 0, 0]]], np.float32)


def axis_angle_to_matrix(axis_angle):
  """Rodrigues' formula for one rotation: (3,) axis-angle in radians -> (3, 3) matrix.

  R = I + a K + b K^2 with K the cross-product matrix of the axis-angle vector w,
  a = sin(t)/t and b = (1 - cos t)/t^2; K^2 = w w^T - t^2 I. Near t = 0 both use series, and
  the `where` picks from inputs that are finite on both branches, so values and gradients are
  exact at zero. Written in few operations: every fit traces it under vmap and jacfwd many
  times, and tracing is most of a warm start.
  """
  theta_sq = jnp.dot(axis_angle, axis_angle)
  is_small = theta_sq < _SMALL_ANGLE_SQ
  safe_theta_sq = jnp.where(is_small, 1.0, theta_sq)
  safe_theta = jnp.sqrt(safe_theta_sq)
  a = jnp.where(is_small, 1.0 - theta_sq / 6.0, jnp.sin(safe_theta) / safe_theta)
  b = jnp.where(is_small, 0.5 - theta_sq / 24.0, (1.0 - jnp.cos(safe_theta)) / safe_theta_sq)
  k = jnp.asarray(_CROSS, axis_angle.dtype) @ axis_angle
  return ((1.0 - b * theta_sq) * jnp.eye(3, dtype=axis_angle.dtype) + a * k
          + b * (axis_angle[:, None] * axis_angle[None, :]))


def matrix_to_axis_angle_np(matrix):
  """Host-side inverse of `axis_angle_to_matrix` for one (3, 3) rotation (NumPy, float64)."""
  matrix = np.asarray(matrix, np.float64)
  cos_theta = np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0)
  theta = np.arccos(cos_theta)
  skew = np.array([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0],
                   matrix[1, 0] - matrix[0, 1]])
  if theta < 1e-6:
    return skew / 2.0
  if np.pi - theta < 1e-4:
    # Near pi the skew part vanishes; read the axis off the symmetric part instead.
    sym = (matrix + np.eye(3)) / 2.0
    axis = np.sqrt(np.clip(np.diag(sym), 0.0, None))
    col = int(np.argmax(axis))
    axis = sym[:, col] / np.sqrt(max(sym[col, col], 1e-12))
    return axis / np.linalg.norm(axis) * theta
  return skew * theta / (2.0 * np.sin(theta))


def matrix_to_axis_angle(matrix):
  """Inverse of `axis_angle_to_matrix` on device, for one (3, 3) rotation, valid up to and at
  pi (a camera facing the face is exactly pi from identity).

  Goes through a unit quaternion built from the largest of the four diagonal combinations
  (Shepperd's method), so no branch divides by a small number.
  """
  m = matrix
  trace = m[0, 0] + m[1, 1] + m[2, 2]
  candidates = jnp.stack([
      jnp.stack([1.0 + trace, m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]),
      jnp.stack([m[2, 1] - m[1, 2], 1.0 + m[0, 0] - m[1, 1] - m[2, 2], m[0, 1] + m[1, 0],
                 m[0, 2] + m[2, 0]]),
      jnp.stack([m[0, 2] - m[2, 0], m[0, 1] + m[1, 0], 1.0 - m[0, 0] + m[1, 1] - m[2, 2],
                 m[1, 2] + m[2, 1]]),
      jnp.stack([m[1, 0] - m[0, 1], m[0, 2] + m[2, 0], m[1, 2] + m[2, 1],
                 1.0 - m[0, 0] - m[1, 1] + m[2, 2]]),
  ])
  best = jnp.argmax(jnp.stack([1.0 + trace, 1.0 + m[0, 0] - m[1, 1] - m[2, 2],
                               1.0 - m[0, 0] + m[1, 1] - m[2, 2],
                               1.0 - m[0, 0] - m[1, 1] + m[2, 2]]))
  quaternion = candidates[best]
  quaternion = quaternion / jnp.linalg.norm(quaternion)
  quaternion = jnp.where(quaternion[0] < 0, -quaternion, quaternion)  # angle in [0, pi]
  vector = quaternion[1:]
  sin_half_sq = jnp.sum(vector * vector)
  is_small = sin_half_sq < 1e-12
  sin_half = jnp.sqrt(jnp.where(is_small, 1.0, sin_half_sq))
  angle = 2.0 * jnp.arctan2(sin_half, quaternion[0])
  return vector * jnp.where(is_small, 2.0 / quaternion[0], angle / sin_half)
