"""Levenberg-Marquardt on the landmark objective: converged fits in a handful of steps.

Landmark fitting is a small nonlinear least-squares problem: 2K residuals (K landmarks) against
N = S + E + 15 unknowns per image (shape, expression, jaw, both eyes, camera rotation delta and
translation). The objective is exactly the Adam stage's,

  f(x) = sum_k (w_k / sum w) rho(|r_k|^2) + sum_n prior_n x_n^2,

with r_k the landmark residual in reference-crop pixels and rho the Charbonnier penalty
(`losses.charbonnier`). Each step linearises r, weights it by rho'(|r_k|^2) (iteratively
reweighted least squares) and adds the L2 priors as the residual rows sqrt(prior_n) x_n, written
directly as their diagonal in the normal matrix. The step solves

  (A + mu diag(A)) dx = -b,   A = J~^T J~,  b = J~^T r~   (~: weighted rows),

by Cholesky after a Jacobi scaling (unit diagonal, so float32 copes with unknowns in metres,
radians and coefficients alike). A step is kept when f falls, with Nielsen's damping update.

Everything is written for ONE image and vmapped; the loop has a fixed length, and an image
that has converged (to float32 resolution), failed or is inactive keeps its values (a mask, not
a data-dependent shape); a rejected step leaves an image where it was.

The focal length is one more unknown (as log focal): weakly determined by one image (depth
trades against focal length), so `solve_landmarks` holds it fixed unless asked; across images
known to share one camera, `solve_shared_focal` solves one focal length for all of them by a
Schur complement on the per-image normal equations.
"""

import jax
import jax.numpy as jnp
from flax import struct

from jflame import losses
from jflame.camera import pinhole
from jflame.flame import (FlameParams, SurfaceRows, combine_corners, pose_feature,
                          relative_joint_transforms)
from jflame.rotation import axis_angle_to_matrix

# Unknowns after the identity coefficients: jaw, left eye, right eye, camera rotation delta,
# camera translation (3 each).
NUM_POSE_UNKNOWNS = 15


@struct.dataclass
class LandmarkProblem:
  """One image's landmark least-squares problem (everything but the unknowns).

  Attributes:
    targets: (K, 2) detected landmarks, crop pixels, in the fast path's point order.
    weights: (K,) >= 0 landmark weights (0: missing).
    base_rotation: (3, 3) camera rotation that the unknown rotation delta is applied to.
    principal_point: (2,) crop pixels.
    pixel_scale: () landmark residuals are multiplied by this (reference size / crop size).
    robust_scale: () Charbonnier scale in those pixels.
    prior: (N,) L2 weight per unknown (0 for jaw, eyes, camera by default).
    free: (N,) bool; False holds an unknown at its start value (e.g. a given shape).
  """
  targets: jax.Array
  weights: jax.Array
  base_rotation: jax.Array
  principal_point: jax.Array
  pixel_scale: jax.Array
  robust_scale: jax.Array
  prior: jax.Array
  free: jax.Array


@struct.dataclass
class SolveInfo:
  """How the solve went for one image (a leading axis for a batch).

  Attributes:
    cost_history: (iterations,) objective after each iteration (the start value first).
    iterations: () int32 accepted steps.
    converged: () True when the last step changed the objective by less than the tolerance.
    failed: () True when the objective or its Jacobian was not finite at the start.
    damping: () final Levenberg-Marquardt damping mu.
  """
  cost_history: jax.Array
  iterations: jax.Array
  converged: jax.Array
  failed: jax.Array
  damping: jax.Array


def pack(params: FlameParams, camera_rotation, camera_translation):
  """(N,) unknown vector: [shape, expression, jaw, left eye, right eye, camera rotation delta,
  camera translation]."""
  return jnp.concatenate([params.shape, params.expression, params.jaw_rotation,
                          params.left_eye_rotation, params.right_eye_rotation, camera_rotation,
                          camera_translation])


def unpack(x, params: FlameParams):
  """Inverse of `pack`: (FlameParams with the other fields of `params`, rotation, translation)."""
  num_shape, num_expression = params.shape.shape[0], params.expression.shape[0]
  n = num_shape + num_expression
  pose = x[n:].reshape(5, 3)
  params = params.replace(shape=x[:num_shape], expression=x[num_shape:n], jaw_rotation=pose[0],
                          left_eye_rotation=pose[1], right_eye_rotation=pose[2])
  return params, pose[3], pose[4]


def _posed_rows(rows: SurfaceRows, identity, rotations):
  """Rows before skinning (R, 3) and rest joints (J, 3). Identity and pose correctives are two
  products, so a Jacobian taken with the identity held fixed never multiplies its basis."""
  n = rows.num_shape + rows.num_expression
  posed = rows.template + (identity @ rows.basis[:n]
                           + pose_feature(rotations) @ rows.basis[n:]).reshape(-1, 3)
  joints = rows.joint_template + (identity @ rows.joint_basis).reshape(-1, 3)
  return posed, joints


def _joint_rotations(params: FlameParams, pose):
  """(J, 3, 3) joint rotations with jaw and eyes taken from the (9,) `pose` unknowns."""
  return jax.vmap(axis_angle_to_matrix)(jnp.stack(
      [params.global_rotation, params.neck_rotation, pose[0:3], pose[3:6], pose[6:9]]))


def _camera_rotation(problem: LandmarkProblem, delta):
  return axis_angle_to_matrix(delta) @ problem.base_rotation


def _skinned(rows: SurfaceRows, params: FlameParams, identity, pose):
  """Model-space points (K, 3) for identity (S + E,) and jaw/eye pose (9,), plus what the
  identity Jacobian reuses: (points, rotations, joints, blended row transforms (R, 3, 4))."""
  rotations = _joint_rotations(params, pose)
  posed, joints = _posed_rows(rows, identity, rotations)
  transforms = relative_joint_transforms(rotations, joints, rows.parents)
  num_joints = transforms.shape[0]
  blended = (rows.lbs_weights @ transforms.reshape(num_joints, 12)).reshape(-1, 3, 4)
  # Elementwise 3x3 products (a batched dot becomes thousands of tiny matrix products).
  rows_out = sum(blended[:, :, b] * posed[:, b, None] for b in range(3)) + blended[:, :, 3]
  return combine_corners(rows, rows_out), rotations, joints, blended


def _identity_point_jacobian(rows: SurfaceRows, rotations, joints, blended, first: int = 0):
  """d points / d identity (K, 3, S + E - first) at fixed rotations, where the map is linear:
  each basis row turns with its row's blended rotation, and each joint moves the translation of
  its transform (hence of every row it skins). Columns before `first` are left out."""
  n = rows.num_shape + rows.num_expression
  num_joints = joints.shape[0]
  translation = lambda j: relative_joint_transforms(rotations, j, rows.parents)[:, :, 3]
  d_translation = jax.jacfwd(translation)(joints).reshape(num_joints * 3, num_joints * 3)
  d_joint_t = d_translation @ rows.joint_basis[first:n].T              # (J * 3, N)
  n = n - first
  row_basis = rows.basis[first:first + n].reshape(n, -1, 3).transpose(1, 2, 0)   # (R, 3, N)
  d_rows = sum(blended[:, :, b, None] * row_basis[:, None, b, :] for b in range(3))
  d_rows = d_rows + (rows.lbs_weights @ d_joint_t.reshape(num_joints, 3 * n)).reshape(-1, 3, n)
  num_rows = d_rows.shape[0]
  return combine_corners(rows, d_rows.reshape(num_rows, 3 * n)).reshape(-1, 3, n)


def model_points(rows: SurfaceRows, params: FlameParams, x):
  """(K, 3) model-space landmark points for the unknowns `x` (see `pack`; the camera part is
  not read)."""
  n = rows.num_shape + rows.num_expression
  return _skinned(rows, params, x[:n], x[n:n + 9])[0]


def model_points_and_jacobian(rows: SurfaceRows, params: FlameParams, x,
                              held_shape: bool = False):
  """(K, 3) model-space landmark points and d points / d [identity, jaw, eyes]
  (K, 3, S + E + 9), the shape's S columns left out with `held_shape`.

  The identity's columns come from the map's linear structure (`_identity_point_jacobian`, no
  N-column forward pass), the 9 jaw/eye ones by forward mode."""
  n = rows.num_shape + rows.num_expression
  identity, pose = x[:n], x[n:n + 9]
  points, rotations, joints, blended = _skinned(rows, params, identity, pose)
  d_pose = jax.jacfwd(lambda q: _skinned(rows, params, identity, q)[0])(pose)   # (K, 3, 9)
  d_identity = _identity_point_jacobian(rows, rotations, joints, blended,
                                       rows.num_shape if held_shape else 0)
  return points, jnp.concatenate([d_identity, d_pose], axis=-1)


def chain_points(matrix, columns):
  """(K, A, 3) x (K, 3, M) -> (K, A, M), one product per point (elementwise: a batched dot
  becomes thousands of tiny matrix products)."""
  return sum(matrix[:, :, c, None] * columns[:, None, c, :] for c in range(3))


def residuals_and_jacobian(rows: SurfaceRows, problem: LandmarkProblem, params: FlameParams, x,
                           log_focal, held_shape: bool = False):
  """Scaled landmark residuals r (K, 2) and their Jacobians: d r / d x (K, 2, N) and
  d r / d log focal (K, 2). `held_shape` leaves the shape's S columns out of d r / d x.

  Model-space point Jacobians from `model_points_and_jacobian`; the camera and the projection
  are chained on by hand.
  """
  n = rows.num_shape + rows.num_expression
  camera = x[n + 9:]
  points, d_model = model_points_and_jacobian(rows, params, x, held_shape)
  rotate = lambda delta: points @ _camera_rotation(problem, delta).T
  rotated = rotate(camera[:3])
  d_rotation = jax.jacfwd(rotate)(camera[:3])                                   # (K, 3, 3)
  rotation = _camera_rotation(problem, camera[:3])
  points_cam = rotated + camera[3:]
  focal = jnp.exp(log_focal)
  pixels = pinhole(points_cam, focal, problem.principal_point)
  project = lambda p: pinhole(p[None], focal, problem.principal_point)[0]
  d_pixel = jax.vmap(jax.jacfwd(project))(points_cam) * problem.pixel_scale    # (K, 2, 3)
  to_pixels = jnp.einsum("kac,cd->kad", d_pixel, rotation)  # model space -> pixels (K, 2, 3)
  jacobian = jnp.concatenate([chain_points(to_pixels, d_model),
                              chain_points(d_pixel, d_rotation), d_pixel], axis=-1)
  residual = (pixels - problem.targets) * problem.pixel_scale
  # pinhole is linear in the focal length: d pixels / d log f = pixels - principal point.
  return residual, jacobian, (pixels - problem.principal_point) * problem.pixel_scale


def residuals(rows: SurfaceRows, problem: LandmarkProblem, params: FlameParams, x, log_focal):
  """Scaled landmark residuals r (K, 2) alone (no Jacobian)."""
  n = rows.num_shape + rows.num_expression
  points = model_points(rows, params, x)
  points_cam = points @ _camera_rotation(problem, x[n + 9:n + 12]).T + x[n + 12:]
  pixels = pinhole(points_cam, jnp.exp(log_focal), problem.principal_point)
  return (pixels - problem.targets) * problem.pixel_scale


def _weight_total(problem):
  return jnp.maximum(jnp.sum(problem.weights), 1e-6)


def objective(problem: LandmarkProblem, residual, x):
  """f: the Adam stage's objective (landmark_loss + the L2 priors) from residuals (K, 2)."""
  penalty = losses.charbonnier(jnp.sum(residual * residual, -1), problem.robust_scale)
  return (jnp.sum(problem.weights * penalty) / _weight_total(problem)
          + jnp.sum(problem.prior * x * x))


def irls_weights(problem: LandmarkProblem, residual):
  """(K,) each landmark's weight in the IRLS Gauss-Newton system of f: its weight over the
  total, times Charbonnier's rho'(s) = 1 / (2 sqrt(1 + s / scale^2)) at its residual."""
  squared = jnp.sum(residual * residual, -1)
  irls = 0.5 / jnp.sqrt(1.0 + squared / (problem.robust_scale * problem.robust_scale))
  return problem.weights * irls / _weight_total(problem)


def normal_equations(problem: LandmarkProblem, residual, jacobian, x, focal_column=None):
  """IRLS Gauss-Newton system of f at x: A (N, N) and b (N,) with gradient 2 b and model
  Hessian 2 A. Charbonnier's rho'(s) = 1 / (2 sqrt(1 + s / scale^2)) weights each landmark.

  With `focal_column` (K, 2) also returns the focal blocks: A_xf (N,), A_ff (), b_f ()."""
  row_weight = jnp.sqrt(irls_weights(problem, residual))                     # (K,)
  weighted = (row_weight[:, None, None] * jacobian).reshape(-1, jacobian.shape[-1])
  weighted_r = (row_weight[:, None] * residual).reshape(-1)
  a = weighted.T @ weighted + jnp.diag(problem.prior)
  b = weighted.T @ weighted_r + problem.prior * x
  if focal_column is None:
    return a, b
  weighted_f = (row_weight[:, None] * focal_column).reshape(-1)
  return a, b, weighted.T @ weighted_f, weighted_f @ weighted_f, weighted_f @ weighted_r


def _held(free, a, b):
  """Unknowns that are not `free` get a unit diagonal, no coupling and no gradient: dx = 0."""
  a = jnp.where(free[:, None] & free[None, :], a, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
  return a, jnp.where(free, b, 0.0)


_EPS = float(jnp.finfo(jnp.float32).eps)

# Relative floor of the Marquardt scaling, so an unknown that no landmark sees (an eye without
# iris points) still gets a damped, finite step.
_SCALE_FLOOR = 1e-8


def _damped_factor(a, mu):
  """Cholesky factor of S (A + mu diag(A)) S with S the Jacobi scaling, and S (N,)."""
  diagonal = jnp.diag(a)
  diagonal = jnp.maximum(diagonal, _SCALE_FLOOR * jnp.max(diagonal))
  scale = 1.0 / jnp.sqrt(diagonal)
  scaled = a * scale[:, None] * scale[None, :]
  scaled = scaled + jnp.diag(mu * diagonal * scale * scale)
  return jax.scipy.linalg.cho_factor(scaled, lower=True), scale


def _damped_solve(factor, scale, rhs):
  """(A + mu diag(A))^{-1} rhs for rhs (N,) or (N, M)."""
  shape = (-1,) + (1,) * (rhs.ndim - 1)
  return scale.reshape(shape) * jax.scipy.linalg.cho_solve(factor, scale.reshape(shape) * rhs)


def _finite(*arrays):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def nielsen(mu, nu, gain, accepted):
  """Nielsen's damping update from the gain ratio (actual / predicted decrease)."""
  shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
  new_mu = jnp.where(accepted, mu * shrink, mu * nu)
  new_nu = jnp.where(accepted, 2.0, 2.0 * nu)
  return jnp.clip(new_mu, 1e-10, 1e10), new_nu


def evaluate(rows, problem: LandmarkProblem, params: FlameParams, x, log_focal):
  """(cost, A, b, focal blocks) at x, and whether all of it is finite."""
  residual, jacobian, focal_column = residuals_and_jacobian(rows, problem, params, x, log_focal)
  cost = objective(problem, residual, x)
  system = normal_equations(problem, residual, jacobian, x, focal_column)
  return cost, system, _finite(cost, *system)


# The solve evaluates at its start and at every trial: as one jitted function, it is traced once
# for both (a jit's trace is cached by its arguments' shapes) instead of twice, a fifth of a
# landmark fit's trace; XLA inlines the call, so the program computes the same.
_evaluate_traced_once = jax.jit(evaluate)


def solve_landmarks(rows: SurfaceRows, problem: LandmarkProblem, params: FlameParams, x,
                    log_focal, iterations: int, active=True, initial_damping: float = 1e-3,
                    tolerance: float = 1e-6):
  """Levenberg-Marquardt for ONE image (vmap for a batch) with the focal length held fixed.

  Args:
    rows: the landmark fast path's rows.
    problem: this image's targets, weights, camera base and priors.
    params: FlameParams whose global and neck rotations are kept (the rest comes from x).
    x: (N,) start (see `pack`).
    log_focal: () log of the focal length in pixels.
    iterations, active, initial_damping, tolerance: as `levenberg_marquardt`'s.
  Returns:
    (x (N,), SolveInfo).
  """
  return levenberg_marquardt(
      lambda x: _evaluate_traced_once(rows, problem, params, x, log_focal), x, problem.free,
      iterations, active, initial_damping, tolerance)


def like_the_steps(witness, carry):
  """`carry` with every leaf passed through a `where` on `witness`, a per-example condition such
  as `active`: the same values, but under `vmap` every leaf is batched from the start, as the
  loop's steps (which `where` their carry on such a condition) make it. Scan's batching rule
  then batches the step once instead of finding that fixed point over two passes (the trace
  time it saves: docs/BENCHMARKS.md, "Start-up and tracing")."""
  return jax.tree.map(lambda leaf: jnp.where(witness, leaf, leaf), carry)


def levenberg_marquardt(evaluate_at, x, free, iterations: int, active=True,
                        initial_damping: float = 1e-3, tolerance: float = 1e-6):
  """Levenberg-Marquardt with Nielsen's damping on ONE least-squares problem.

  Args:
    evaluate_at: x -> (cost, system, finite) with system's first two entries the IRLS
      Gauss-Newton A (N, N) and b (N,) of the cost at x (gradient 2 b), as `evaluate` gives.
    x: (N,) start.
    free: (N,) bool; False holds an unknown at its start.
    iterations: fixed number of steps (a static int).
    active: () False holds the problem still (padding, failed preprocessing).
    tolerance: `converged` reports a last step that lowered f by less than tolerance * f (or
      whose model promised that little). A problem stops moving once its model promises less
      than float32 resolution; inactive and failed ones never move.
  Returns:
    (x (N,), SolveInfo).
  """
  cost, system, ok = evaluate_at(x)
  moving = jnp.asarray(active) & ok
  dtype = x.dtype

  def step(carry, _):
    x, cost, system, mu, nu, moving, count, _ = carry
    a, b = _held(free, *system[:2])
    factor, scale = _damped_factor(a, mu)
    dx = -_damped_solve(factor, scale, b)
    trial = x + dx
    trial_cost, trial_system, trial_ok = evaluate_at(trial)
    # Predicted decrease of the Gauss-Newton model: dx^T A dx + 2 mu dx^T diag(A) dx >= 0.
    predicted = dx @ (a @ dx) + 2.0 * mu * jnp.sum(jnp.diag(a) * dx * dx)
    decrease = cost - trial_cost
    gain = decrease / jnp.maximum(predicted, 1e-30)
    accepted = moving & trial_ok & (decrease > 0)
    # Converged: a step that barely helped, or a model that promises next to nothing.
    settled = (accepted & (decrease <= tolerance * cost)) | (predicted <= tolerance * cost)
    # Stop moving once the model cannot change f by one float32 step: what is left is
    # rounding, and a batch must give what its images give alone (not stop one step apart).
    done = predicted <= _EPS * cost
    new_mu, new_nu = nielsen(mu, nu, gain, accepted)
    keep = lambda new, old: jax.tree.map(lambda u, v: jnp.where(accepted, u, v), new, old)
    carry = (keep(trial, x), keep(trial_cost, cost), keep(trial_system, system),
             jnp.where(moving, new_mu, mu), jnp.where(moving, new_nu, nu), moving & ~done,
             count + accepted.astype(jnp.int32), settled | done)
    return carry, keep(trial_cost, cost)

  carry = like_the_steps(moving, (x, cost, system, jnp.asarray(initial_damping, dtype),
                                  jnp.asarray(2.0, dtype), moving, jnp.asarray(0, jnp.int32),
                                  jnp.asarray(False)))
  (x, _, _, mu, _, _, count, settled), history = jax.lax.scan(step, carry, None,
                                                              length=iterations)
  info = SolveInfo(cost_history=history, iterations=count,
                   converged=jnp.asarray(active) & ok & settled,
                   failed=jnp.asarray(active) & ~ok, damping=mu)
  return x, info


def landmark_priors(num_shape: int, num_expression: int, regularization):
  """(N,) L2 weight per unknown from a config.Regularization (camera unknowns: none)."""
  return jnp.concatenate([
      jnp.full(num_shape, regularization.shape, jnp.float32),
      jnp.full(num_expression, regularization.expression, jnp.float32),
      jnp.full(3, regularization.jaw, jnp.float32),
      jnp.full(6, regularization.eyes, jnp.float32),
      jnp.zeros(6, jnp.float32)])


def solve_shared_focal(rows: SurfaceRows, problems: LandmarkProblem, params: FlameParams, x,
                       log_focal, iterations: int, active, initial_damping: float = 1e-3):
  """Levenberg-Marquardt for a BATCH of images known to share one camera: per-image unknowns
  x (B, N) and one log focal length, the summed objective.

  The joint normal matrix is block-arrowhead (per-image blocks coupled only through the
  focal), so each step solves every image's block (vmapped) and the focal by its Schur
  complement: s = sum_i (A_ff,i - A_fx,i M_i^-1 A_xf,i), one scalar. Steps are accepted or
  rejected for the whole batch. An image whose trial values are not finite leaves the shared
  set for good (it would stall every step), and `active` False images never join it.

  Args:
    problems, params, x: one LandmarkProblem / FlameParams / (N,) start per image (leading B).
    log_focal: () shared start.
    active: (B,) bool.
  Returns:
    (x (B, N), log focal (), cost history (iterations,), members (B,) images that took part).
  """
  evaluate_all = jax.vmap(lambda problem, p, xi, lf: evaluate(rows, problem, p, xi, lf),
                          in_axes=(0, 0, 0, None))
  costs, systems, ok = evaluate_all(problems, params, x, log_focal)
  members = active & ok
  dtype = x.dtype

  def masked_sum(values, members):
    return jnp.sum(jnp.where(members, values, 0.0))

  def image_step(problem, system, mu):
    """Per image: M^-1 b and M^-1 A_xf with M = A + mu diag(A) (held unknowns removed)."""
    a, b = _held(problem.free, system[0], system[1])
    a_xf = jnp.where(problem.free, system[2], 0.0)
    factor, scale = _damped_factor(a, mu)
    solved = _damped_solve(factor, scale, jnp.stack([b, a_xf], axis=1))
    return a, b, a_xf, solved[:, 0], solved[:, 1]

  def step(carry, _):
    x, log_focal, costs, systems, members, mu, nu = carry
    a, b, a_xf, u, v = jax.vmap(image_step, in_axes=(0, 0, None))(problems, systems, mu)
    a_ff, b_f = systems[3], systems[4]
    inside = members[:, None]
    schur = masked_sum(a_ff * (1.0 + mu) - jnp.sum(a_xf * v, -1), members)
    rhs = masked_sum(b_f - jnp.sum(a_xf * u, -1), members)
    d_focal = -rhs / jnp.maximum(schur, 1e-30)
    dx = jnp.where(inside, -(u + v * d_focal), 0.0)
    trial_x, trial_focal = x + dx, log_focal + d_focal
    trial_costs, trial_systems, trial_ok = evaluate_all(problems, params, trial_x, trial_focal)
    members = members & trial_ok
    quadratic = (jnp.einsum("bn,bnm,bm->b", dx, a, dx) + 2.0 * d_focal * jnp.sum(a_xf * dx, -1)
                 + d_focal * d_focal * a_ff)
    damping = jnp.sum(jax.vmap(jnp.diag)(a) * dx * dx, -1) + d_focal * d_focal * a_ff
    predicted = masked_sum(quadratic + 2.0 * mu * damping, members)
    decrease = masked_sum(costs - trial_costs, members)
    gain = decrease / jnp.maximum(predicted, 1e-30)
    accepted = jnp.isfinite(decrease) & (decrease > 0) & jnp.any(members)
    new_mu, new_nu = nielsen(mu, nu, gain, accepted)
    keep = lambda new, old: jax.tree.map(lambda u, w: jnp.where(accepted, u, w), new, old)
    carry = (keep(trial_x, x), keep(trial_focal, log_focal), keep(trial_costs, costs),
             keep(trial_systems, systems), members, new_mu, new_nu)
    return carry, masked_sum(carry[2], members)

  carry = (x, jnp.asarray(log_focal, dtype), costs, systems, members,
           jnp.asarray(initial_damping, dtype), jnp.asarray(2.0, dtype))
  (x, log_focal, _, _, members, _, _), history = jax.lax.scan(step, carry, None,
                                                               length=iterations)
  return x, log_focal, history, members
