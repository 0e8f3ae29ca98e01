"""Levenberg-Marquardt over a whole clip: every frame's landmark problem and the temporal model
in one solve (the clip's shape held, or solved too: `solve_clip`).

The unknowns are every frame's y_t, `solve.pack`'s vector after the shape (expression, jaw,
eyes, camera rotation delta, translation). The objective is the clip's landmark objective,

  F(Y) = sum_t valid_t f_t(y_t) + temporal_penalty(Y),

f_t `solve.objective` (the Adam stage's landmark loss and priors). A step linearises every frame
as `solve` does (IRLS normal equations A_t, b_t: gradient 2 b_t, model Hessian 2 A_t) and
replaces the temporal penalty by its majorizer, weighted squared differences
(`temporal.majorizer_weights`) with gradient g and matrix Q, banded: a coordinate couples only
with itself up to two frames away. The step solves

  (A + Q + mu D) dY = -(b + g / 2),   D = diag(A + Q),

by conjugate gradients preconditioned with each frame's block (A_t + diag Q_t + mu D_t, by
Cholesky), a fixed number of iterations; it is kept when F falls (Nielsen's damping update, as
in `solve.solve_landmarks`). Adam needs hundreds of steps to settle a long chain of frames
coupled by second differences; this settles it in a few.
"""

import jax
import jax.numpy as jnp

from jflame import solve, temporal
from jflame.fit import FitVariables

# Relative floor of D, so a coordinate that neither data nor smoothing sees (a frame outside the
# run of frames with a face) gets a finite, zero step.
_DIAGONAL_FLOOR = 1e-8


def _variables(y, shape, params):
  """Per-frame FitVariables (T, ...) of unknowns y (T, M) with the clip's shape."""
  x = jnp.concatenate([jnp.broadcast_to(shape, (y.shape[0],) + shape.shape), y], axis=1)
  flame, rotation, translation = jax.vmap(solve.unpack)(x, params)
  return FitVariables(flame=flame, camera_rotation=rotation, camera_translation=translation,
                      focal_length=jnp.zeros((), y.dtype))


def _band_diagonal(apply, frames: int, width: int):
  """The diagonal (T, M) of a linear map on (T, M) that couples each coordinate only with itself
  up to two frames away: five probes, each one frame in five."""
  diagonal = jnp.zeros((frames, width))
  for phase in range(5):
    probe = jnp.broadcast_to((jnp.arange(frames) % 5 == phase)[:, None], (frames, width))
    diagonal = diagonal + probe * apply(probe.astype(jnp.float32))
  return diagonal


def _conjugate_gradients(apply, precondition, rhs, iterations: int):
  """Preconditioned conjugate gradients from zero for a fixed number of iterations."""
  dot = lambda u, v: jnp.sum(u * v)

  def step(carry, _):
    x, r, z, p, rz = carry
    ap = apply(p)
    curvature = dot(p, ap)
    alpha = jnp.where(curvature > 0, rz / jnp.where(curvature > 0, curvature, 1.0), 0.0)
    x, r = x + alpha * p, r - alpha * ap
    z = precondition(r)
    rz_new = dot(r, z)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    return (x, r, z, z + beta * p, rz_new), None

  z = precondition(rhs)
  carry = (jnp.zeros_like(rhs), rhs, z, z, dot(rhs, z))
  (x, *_), _ = jax.lax.scan(step, carry, None, length=iterations)
  return x


def solve_clip(rows, problems: solve.LandmarkProblem, params, shape, y, log_focal, valid,
               motion, weights: temporal.TemporalWeights, free, iterations: int, cg_iterations: int,
               solve_shape: bool = False, active=True, initial_damping: float = 1e-3):
  """Levenberg-Marquardt for ONE clip of T frames.

  With `solve_shape`, each step also moves the shape: first by the Schur complement of the
  frames' blocks (each frame's block taken with the diagonal of its smoothing), then the frames
  by conjugate gradients given that shape step; the step is kept only if F falls.

  Args:
    rows: the landmark fast path's rows.
    problems: every frame's `solve.LandmarkProblem` (leading T); their shape prior, counted
      once per frame with a face, is the clip's.
    params: per-frame FlameParams whose global and neck rotations are kept.
    shape: (S,) the clip's shape (held unless `solve_shape`).
    y: (T, M) start (`solve.pack` after the shape).
    log_focal: () log of the clip's focal length in pixels, held.
    valid: (T,) frames with a face (the others have no data term).
    motion: (T, 2) `temporal.motion_weights`.
    weights: the temporal terms' weights.
    free: (M,) bool; False holds that unknown in every frame.
    iterations, cg_iterations: steps, and conjugate-gradient iterations per step (static).
    active: () False holds the clip still.
  Returns:
    (shape (S,), y (T, M), cost history (iterations,), failed ()).
  """
  num_shape = shape.shape[0]

  def frame_terms(shape, y, with_system: bool):
    """Per frame: cost (T,), finite (T,) and, `with_system`, the normal equations A, b (over
    shape and y with `solve_shape`, else over y)."""
    def one(problem, frame_params, frame_y):
      x = jnp.concatenate([shape, frame_y])
      if not with_system:
        residual = solve.residuals(rows, problem, frame_params, x, log_focal)
        cost = solve.objective(problem, residual, x)
        return cost, jnp.isfinite(cost)
      residual, jacobian, _ = solve.residuals_and_jacobian(
          rows, problem, frame_params, x, log_focal, held_shape=not solve_shape)
      cost = solve.objective(problem, residual, x)
      if solve_shape:
        a, b = solve.normal_equations(problem, residual, jacobian, x)
      else:
        a, b = solve.normal_equations(problem.replace(prior=problem.prior[num_shape:]),
                                      residual, jacobian, frame_y)
      ok = jnp.isfinite(cost) & jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))
      return cost, ok, a, b
    return jax.vmap(one)(problems, params, y)

  return solve_clip_terms(frame_terms, params, shape, y, valid, motion, weights, free,
                          iterations, cg_iterations, solve_shape, active, initial_damping)


def solve_clip_terms(frame_terms, params, shape, y, valid, motion,
                     weights: temporal.TemporalWeights, free, iterations: int,
                     cg_iterations: int, solve_shape: bool = False, active=True,
                     initial_damping: float = 1e-3):
  """`solve_clip` with the frames' data terms given: `frame_terms(shape, y, with_system)` ->
  per frame cost (T,), finite (T,) and, `with_system`, the IRLS normal equations A (T, N, N),
  b (T, N) of each frame's objective over (shape, y_t) with `solve_shape`, else over y_t (N = M),
  as `solve.normal_equations` makes them (gradient 2 b, model Hessian 2 A). A calibrated rig's
  moments plug in their views' terms here (`jflame.rig_track`); the other arguments are
  `solve_clip`'s."""
  frames, width = y.shape
  held = ~free
  num_shape = shape.shape[0]
  inside = valid[:, None]

  def smoothing(y):
    return temporal.temporal_penalty(_variables(y, shape, params), weights, motion)

  def total_cost(shape, y):
    costs, ok = frame_terms(shape, y, False)
    cost = jnp.sum(jnp.where(valid, costs, 0.0)) + smoothing(y)
    return cost, jnp.all(jnp.where(valid, ok, True)) & jnp.isfinite(cost)

  def system_at(shape, y):
    """(A (T, N, N), b (T, N), g (T, M), majorizer weights) at (shape, y), N = S + M with
    `solve_shape`, else M."""
    _, ok, a, b = frame_terms(shape, y, True)
    gradient = jax.grad(smoothing)(y)
    majorizer = temporal.majorizer_weights(_variables(y, shape, params), weights, motion)
    return (jnp.where(inside[:, :, None], a, 0.0), jnp.where(inside, b, 0.0), gradient,
            majorizer), jnp.all(jnp.where(valid, ok, True)) & jnp.all(jnp.isfinite(gradient))

  def quadratic(majorizer):
    """v -> Q v, the majorizer's matrix (half the gradient of the weighted squares)."""
    return lambda v: 0.5 * jax.grad(
        lambda u: temporal.weighted_squares(_variables(u, 0.0 * shape, params), majorizer))(v)

  def newton_step(system, mu):
    a, b, gradient, majorizer = system
    first = num_shape if solve_shape else 0
    a_yy, b_y = a[:, first:, first:], b[:, first:]
    apply_q = quadratic(majorizer)
    q_diagonal = _band_diagonal(apply_q, frames, width)
    diagonal = jnp.diagonal(a_yy, axis1=1, axis2=2) + q_diagonal
    diagonal = jnp.maximum(diagonal, _DIAGONAL_FLOOR * jnp.max(diagonal, axis=0) + 1e-12)

    def apply(v, damping):
      v = jnp.where(held, 0.0, v)
      out = jnp.einsum("tij,tj->ti", a_yy, v) + apply_q(v) + damping * diagonal * v
      return jnp.where(held, v, out)

    blocks = a_yy + jax.vmap(jnp.diag)(q_diagonal + mu * diagonal)
    blocks = jnp.where(held[None, :, None] | held[None, None, :], 0.0, blocks) + jnp.diag(
        held.astype(a.dtype))
    factors = jax.vmap(lambda m: jax.scipy.linalg.cho_factor(m, lower=True)[0])(blocks)
    block_solve = jax.vmap(lambda f, v: jax.scipy.linalg.cho_solve((f, True), v))
    rhs = jnp.where(held, 0.0, -(b_y + 0.5 * gradient))
    d_shape = jnp.zeros_like(shape)
    if solve_shape:
      a_ys = jnp.where(held[None, :, None], 0.0, a[:, first:, :first])       # (T, M, S)
      a_ss = jnp.sum(a[:, :first, :first], axis=0)
      coupled = block_solve(factors, a_ys)                                   # (T, M, S)
      schur = a_ss - jnp.einsum("tms,tmr->sr", a_ys, coupled)
      schur = schur + mu * jnp.diag(jnp.maximum(jnp.diag(a_ss), 1e-12))
      shape_rhs = -jnp.sum(b[:, :first], axis=0) - jnp.einsum("tms,tm->s", coupled, rhs)
      d_shape = jnp.linalg.solve(schur, shape_rhs)
      rhs = rhs - jnp.einsum("tms,s->tm", a_ys, d_shape)
    d_y = _conjugate_gradients(lambda v: apply(v, mu), lambda r: block_solve(factors, r), rhs,
                               cg_iterations)
    # The model's decrease: -(2 b + g) . d - d^T (A + Q) d over the frames' (d_shape, d_y).
    step = (jnp.concatenate([jnp.broadcast_to(d_shape, (frames, first)), d_y], axis=1)
            if solve_shape else d_y)
    curvature = jnp.sum(step * jnp.einsum("tij,tj->ti", a, step)) + jnp.sum(d_y * apply_q(d_y))
    predicted = -jnp.sum(2.0 * b * step) - jnp.sum(gradient * d_y) - curvature
    return d_shape, d_y, predicted

  cost, ok = total_cost(shape, y)
  moving = jnp.asarray(active) & ok

  def step(carry, _):
    shape, y, cost, mu, nu, moving = carry
    system, system_ok = system_at(shape, y)
    d_shape, d_y, predicted = newton_step(system, mu)
    trial_shape, trial = shape + d_shape, y + d_y
    trial_cost, trial_ok = total_cost(trial_shape, trial)
    decrease = cost - trial_cost
    accepted = moving & system_ok & trial_ok & (decrease > 0)
    new_mu, new_nu = solve.nielsen(mu, nu, decrease / jnp.maximum(predicted, 1e-30), accepted)
    keep = lambda new, old: jnp.where(accepted, new, old)
    carry = (keep(trial_shape, shape), keep(trial, y), keep(trial_cost, cost),
             jnp.where(moving, new_mu, mu), jnp.where(moving, new_nu, nu), moving)
    return carry, carry[2]

  carry = (shape, y, cost, jnp.asarray(initial_damping, y.dtype), jnp.asarray(2.0, y.dtype),
           moving)
  (shape, y, *_), history = jax.lax.scan(step, carry, None, length=iterations)
  return shape, y, history, jnp.asarray(active) & ~ok
