"""The whole-clip Levenberg-Marquardt (jflame.clip_solve) and the temporal model it majorizes
(jflame.temporal), against references written here: autodiff gradients of the objective it
claims to minimise, a dense diagonal, the Jacobian with every column."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jflame import clip_solve, solve, synthetic, temporal
from jflame.camera import FRONTAL_ROTATION
from jflame.config import TRACK_FIT, TrackConfig
from jflame.fit import FitVariables, landmark_problem, landmark_targets
from jflame.flame import FlameParams
from jflame.observation import Observation
from jflame.rotation import axis_angle_to_matrix
from jflame.track import ClipTargets
from tests.conftest import fit_model_over_embedding

CROP = 256
NUM_SHAPE, NUM_EXPRESSION = 20, 10
CONFIG = TrackConfig(fit=TRACK_FIT.replace(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION))
WEIGHTS = temporal.temporal_weights(CONFIG)
FRAMES = 24


def _random_variables(rng, frames=FRAMES):
  flame = FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION)
  flame = jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=0.2, size=(frames,) + x.shape),
                                             jnp.float32), flame)
  return FitVariables(flame=flame,
                      camera_rotation=jnp.asarray(rng.normal(scale=0.05, size=(frames, 3)),
                                                  jnp.float32),
                      camera_translation=jnp.asarray(rng.normal(scale=0.01, size=(frames, 3)),
                                                     jnp.float32),
                      focal_length=jnp.zeros(()))


def test_majorizer_touches_the_temporal_penalty_and_lies_above_it():
  rng = np.random.default_rng(0)
  motion = jnp.asarray(rng.uniform(0.2, 1.0, size=(FRAMES, 2)), jnp.float32)
  at = _random_variables(rng)
  weights = temporal.majorizer_weights(at, WEIGHTS, motion)
  penalty = lambda v: temporal.temporal_penalty(v, WEIGHTS, motion)
  squares = lambda v: temporal.weighted_squares(v, weights)
  grad_penalty, grad_squares = jax.grad(penalty)(at), jax.grad(squares)(at)
  for a, b in zip(jax.tree.leaves(grad_penalty), jax.tree.leaves(grad_squares)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)
  for _ in range(5):
    other = _random_variables(rng)
    assert (penalty(other) - penalty(at)
            <= squares(other) - squares(at) + 1e-3 * abs(float(squares(other))))


def test_band_diagonal_is_the_dense_diagonal():
  rng = np.random.default_rng(1)
  weights = temporal.majorizer_weights(_random_variables(rng), WEIGHTS, None)
  width = NUM_EXPRESSION + 15
  shape = jnp.zeros(NUM_SHAPE)
  params = jax.tree.map(lambda x: jnp.zeros((FRAMES,) + x.shape),
                        FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION))
  apply = lambda v: 0.5 * jax.grad(lambda u: temporal.weighted_squares(
      clip_solve._variables(u, shape, params), weights))(v)
  dense = jax.jacfwd(apply)(jnp.zeros((FRAMES, width))).reshape(FRAMES * width, -1)
  np.testing.assert_allclose(clip_solve._band_diagonal(apply, FRAMES, width).reshape(-1),
                             np.diag(dense), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def clip_problem():
  """A small synthetic head turning and talking over FRAMES frames, 1 px landmark noise: the
  per-frame problems, a start near the truth, and the objective F written independently."""
  from jflame.camera import Camera, project
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  fit_model = fit_model_over_embedding(model, embedding, CONFIG.fit)
  rng = np.random.default_rng(2)
  t = np.arange(FRAMES) / 25.0
  shape = jnp.asarray(rng.normal(size=NUM_SHAPE) * 0.5, jnp.float32)
  params = jax.tree.map(lambda x: jnp.zeros((FRAMES,) + x.shape),
                        FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION))
  expression = np.zeros((FRAMES, NUM_EXPRESSION))
  expression[:, 0] = np.sin(2 * np.pi * t)
  truth = params.replace(shape=jnp.broadcast_to(shape, (FRAMES, NUM_SHAPE)),
                         expression=jnp.asarray(expression, jnp.float32))
  yaw = 0.3 * np.sin(2 * np.pi * 1.5 * t)
  base = axis_angle_to_matrix(jnp.asarray(FRONTAL_ROTATION, jnp.float32))
  deltas = jnp.asarray(np.stack([0 * t, yaw, 0 * t], 1), jnp.float32)
  translation = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.75], jnp.float32), (FRAMES, 3))
  observed = np.zeros((FRAMES, 478, 2), np.float32)
  indices = np.asarray(embedding.landmark_indices)
  from jflame import flame
  from jflame.rotation import matrix_to_axis_angle

  @jax.jit
  @jax.vmap
  def landmarks_of(frame, delta, shift):
    vertices = flame.flame_forward(model, frame)[0]
    camera = Camera(rotation=matrix_to_axis_angle(axis_angle_to_matrix(delta) @ base),
                    translation=shift, focal_length=jnp.asarray(726.0),
                    principal_point=jnp.full(2, CROP / 2.0))
    return project(camera, embedding.points(vertices, model.faces))
  observed[:, indices] = np.asarray(landmarks_of(truth, deltas, translation))
  observed[:, indices] += rng.normal(size=(FRAMES, len(indices), 2))
  observation = Observation(landmarks=observed, landmark_weights=np.ones((FRAMES, 478),
                                                                         np.float32),
                            image=None, face_mask=None, size=CROP, valid=np.ones(FRAMES, bool))
  landmarks, weights, is_detected, valid = jax.jit(jax.vmap(
      lambda o: landmark_targets(fit_model, o)))(observation)
  principal_point = jnp.full(2, CROP / 2.0, jnp.float32)
  problems = jax.jit(jax.vmap(lambda lm, w: landmark_problem(
      fit_model, lm, w, CROP, CONFIG.fit, base, principal_point)))(landmarks, weights)
  targets = ClipTargets(landmarks=landmarks, weights=weights, is_detected=is_detected,
                        valid=valid)
  motion = jax.jit(temporal.motion_weights, static_argnums=1)(
      targets, CONFIG.fit.landmark_scale / CROP, CONFIG.motion_scale)
  start = jnp.concatenate([jnp.zeros((FRAMES, NUM_EXPRESSION + 9)), deltas * 0.5,
                           translation + 0.005], axis=1)
  log_focal = jnp.log(jnp.asarray(726.0, jnp.float32))
  rows = fit_model.landmark_rows

  def objective(clip_shape, y):
    """F = sum_t f_t + temporal penalty, from the per-frame objective (with the shape prior:
    once per frame, as the clip's loss counts it once per frame count) and the penalty."""
    def frame(problem, p, frame_y):
      x = jnp.concatenate([clip_shape, frame_y])
      return solve.objective(problem, solve.residuals(rows, problem, p, x, log_focal), x)
    return jnp.sum(jax.vmap(frame)(problems, params, y)) + temporal.temporal_penalty(
        clip_solve._variables(y, clip_shape, params), WEIGHTS, motion)

  return dict(rows=rows, problems=problems, params=params, shape=shape, start=start,
              log_focal=log_focal, valid=valid, motion=motion, objective=objective)


def test_residuals_and_the_held_shape_jacobian_match_the_full_ones(clip_problem):
  p = clip_problem
  problem = jax.tree.map(lambda x: x[3], p["problems"])
  params = jax.tree.map(lambda x: x[3], p["params"])
  x = jnp.concatenate([p["shape"], p["start"][3]])
  both = jax.jit(lambda x: (
      solve.residuals(p["rows"], problem, params, x, p["log_focal"]),
      solve.residuals_and_jacobian(p["rows"], problem, params, x, p["log_focal"]),
      solve.residuals_and_jacobian(p["rows"], problem, params, x, p["log_focal"],
                                   held_shape=True)[1]))
  alone, (residual, jacobian, _), held = both(x)
  np.testing.assert_allclose(alone, residual, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(held, jacobian[..., NUM_SHAPE:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solve_shape", [False, True])
def test_clip_solve_reaches_a_stationary_point_of_the_clip_objective(clip_problem, solve_shape):
  """From a start near the truth (the shape off by 0.3 per coefficient when it is solved), the
  solve's objective falls at every step and its gradient, taken by autodiff of F written
  above, all but vanishes."""
  p = clip_problem
  free = jnp.ones(NUM_EXPRESSION + 15, bool)
  start_shape = p["shape"] + (0.3 if solve_shape else 0.0)
  run = jax.jit(lambda free, iterations: clip_solve.solve_clip(
      p["rows"], p["problems"], p["params"], start_shape, p["start"], p["log_focal"],
      p["valid"], p["motion"], WEIGHTS, free, iterations, 40, solve_shape), static_argnums=1)
  shape, solved, history, failed = run(free, 12)
  assert not bool(failed)
  costs = np.asarray(history)
  assert np.all(np.diff(costs) <= 1e-5 * costs[0]), costs      # a step is kept only if F falls
  objective = jax.jit(p["objective"])
  start_cost = float(objective(start_shape, p["start"]))
  np.testing.assert_allclose(costs[-1], float(objective(shape, solved)), rtol=1e-4)
  assert costs[-1] < 0.5 * start_cost
  gradient = jax.jit(lambda s, y: jnp.linalg.norm(jnp.concatenate(
      [g.reshape(-1) for g in jax.grad(p["objective"], argnums=(0, 1) if solve_shape else 1)(
          s, y)] if solve_shape else [jax.grad(p["objective"], argnums=1)(s, y).reshape(-1)])))
  assert gradient(shape, solved) < 0.02 * gradient(start_shape, p["start"]), (
      gradient(shape, solved), gradient(start_shape, p["start"]))
  if solve_shape:     # (its minimiser is not the truth: 24 frames against the shape prior)
    assert np.linalg.norm(shape - start_shape) > 0.1
  else:
    np.testing.assert_array_equal(shape, start_shape)
  # A held group does not move.
  held = free.at[NUM_EXPRESSION:NUM_EXPRESSION + 3].set(False)
  _, solved_held, _, _ = run(held, 12)
  np.testing.assert_array_equal(solved_held[:, NUM_EXPRESSION:NUM_EXPRESSION + 3],
                                p["start"][:, NUM_EXPRESSION:NUM_EXPRESSION + 3])
