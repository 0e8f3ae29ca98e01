"""A calibrated rig's synchronised clips: one head per moment seen by V fixed cameras, followed
through time with the single-view track's temporal model (the library side of a multi-view
track; one clip is one example).

    each moment:  multiview.fit_moment with the clip's shape held (its views' landmarks, the
                  triangulated start)
    the clip:     one Levenberg-Marquardt over every moment (clip_solve.solve_clip_terms): each
                  moment's data term is its views' landmark objective (multiview.views_system),
                  plus the temporal penalty on expression, jaw, eyes and the head's world pose
                  (temporal.temporal_penalty), whose weights drop where the landmarks move
                  (motion weights of every view, the smallest kept)

The head's rotation is solved as a rotation from one base rotation for the clip (the chordal
mean of the moments' own), so consecutive moments' rotations are differences the temporal terms
can compare. Moments where no view had a face are interpolated between their neighbours
(`tracked` False). `clip_shape` gives the clip's identity from moments spread over it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame import clip_solve, losses, multiview, solve
from jflame.config import TrackConfig
from jflame.fit import FitModel
from jflame.flame import FlameParams, surface_points_forward
from jflame.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from jflame.temporal import (TemporalWeights, motion_weights, temporal_weights,
                             without_temporal_weights)
from jflame.track import ClipTargets, chordal_mean, gap_filled, spread_frames


@struct.dataclass
class RigTrackResult:
  """A rig's clip fitted (leading axis T, its moments).

  Attributes:
    params: per-moment FLAME parameters (`shape` the clip's, repeated).
    head_rotation: (T, 3) axis-angle, model -> world.
    head_translation: (T, 3) metres, world.
    landmarks_2d: (T, V, K, 2) the fitted landmarks in each view's image pixels.
    landmark_error: (T, V) mean distance to the detected landmarks, image pixels (0 where the
      view had no face).
    tracked: (T,) some view had a face and the moment was fitted; elsewhere interpolated.
    failed: () a non-finite cost stopped the clip's solve (the moments' own fits are kept).
    clip_cost_history: (iterations,) the clip objective after each step.
  """
  params: FlameParams
  head_rotation: jax.Array
  head_translation: jax.Array
  landmarks_2d: jax.Array
  landmark_error: jax.Array
  tracked: jax.Array
  failed: jax.Array
  clip_cost_history: jax.Array


def rig_motion_weights(landmarks, detected, views: multiview.RigViews, valid, motion_scale):
  """(T, 2) factors of the temporal weights (`temporal.motion_weights`), per view from its
  landmarks in reference pixels (its `face_scale`), the smallest over the views: a motion seen
  by any camera lets the track follow it. `landmarks` (T, V, K, 2), `detected` (T, V, K)."""
  def one_view(view_landmarks, view_detected, view_valid, scale):
    targets = ClipTargets(landmarks=view_landmarks * scale[:, None, None],
                          weights=view_detected.astype(jnp.float32),
                          is_detected=view_detected & view_valid[:, None], valid=valid)
    return motion_weights(targets, 1.0, motion_scale)
  per_view = jax.vmap(one_view, in_axes=(1, 1, 1, 1))(landmarks, detected, views.valid,
                                                       views.face_scale)
  return jnp.min(per_view, axis=0)


@functools.partial(jax.jit, static_argnames=("config", "count"))
def clip_shape(fit_model: FitModel, views: multiview.RigViews, config: TrackConfig,
               count: int = 16):
  """(S,) the clip's identity: the median of the own shapes of `count` moments with a face
  spread over the clip (`config.fit`'s moment fit)."""
  valid = jnp.sum(views.valid, axis=1) >= 1
  picked = spread_frames(valid, count)
  fitted = jax.vmap(multiview.fit_moment, in_axes=(None, 0, None, None))(
      fit_model, jax.tree.map(lambda x: x[picked], views), config.fit, None)
  return jnp.median(fitted.params.shape, axis=0)


def track_rig(fit_model: FitModel, views: multiview.RigViews, config: TrackConfig, shape,
              photo_landmarks: int) -> RigTrackResult:
  """Fits a rig's clip of T moments (`views` with leading axis T, from `multiview.rig_views`)
  with the identity `shape` (S,) held (`clip_shape`) and `config`'s temporal terms (all zero:
  every moment alone); `config.fit` is each moment's fit (`multiview.rig_config` of a photo's),
  `config.clip_lm_iterations` and `clip_cg_iterations` the clip solve. Configs that differ only
  in their temporal weights share one compiled program.

  The single-view track's weights were set against one photo's landmarks; a moment of a rig has
  several views' worth (of every landmark). So that they weigh against a moment's data as they
  do against a frame's, the weights of the differences are multiplied by the clip's detected
  landmarks per moment over `photo_landmarks`, the count one photo's fit uses
  (`model_loading.fitted_landmark_indices(loaded, FitConfig())`: 162 of MediaPipe's)."""
  return _track_rig(fit_model, views, without_temporal_weights(config), temporal_weights(config),
                    shape, jnp.float32(photo_landmarks))


def _data_scaled(weights: TemporalWeights, factor) -> TemporalWeights:
  """The weights of the differences (not their robust scales) times `factor`."""
  times = lambda groups: {group: value * factor for group, value in groups.items()}
  return dataclasses.replace(weights, velocity=times(weights.velocity),
                             acceleration=times(weights.acceleration))


@functools.partial(jax.jit, static_argnames=("config",))
def _track_rig(fit_model: FitModel, views: multiview.RigViews, config: TrackConfig,
               weights: TemporalWeights, shape, photo_landmarks) -> RigTrackResult:
  fit_config = config.fit
  rows = fit_model.landmark_rows
  shape = jnp.asarray(shape, jnp.float32)
  num_shape = shape.shape[0]
  moments = jax.vmap(multiview.fit_moment, in_axes=(None, 0, None, None))(
      fit_model, views, fit_config, shape)
  valid = (jnp.sum(views.valid, axis=1) >= 1) & ~moments.failed
  rotations = jax.vmap(axis_angle_to_matrix)(moments.head_rotation)
  base_rotation = chordal_mean(rotations, valid.astype(jnp.float32))
  deltas = jax.vmap(matrix_to_axis_angle)(rotations @ base_rotation.T)
  params = moments.params
  x = gap_filled(jax.vmap(solve.pack)(params, deltas, moments.head_translation), valid)
  landmarks, landmark_weights, detected = jax.vmap(
      multiview.landmark_targets, in_axes=(None, 0))(fit_model, views)
  motion = rig_motion_weights(landmarks, detected, views, valid, weights.motion_scale)
  per_moment = jnp.sum(jnp.where(valid[:, None, None], detected, False)) / jnp.maximum(
      jnp.sum(valid), 1)
  weights = _data_scaled(weights, per_moment / photo_landmarks)

  def frame_terms(shape, y, with_system: bool):
    def one(moment_views, moment_landmarks, moment_weights, moment_params, moment_y):
      terms = (rows, moment_views, moment_landmarks, moment_weights, fit_config, moment_params,
               base_rotation, jnp.concatenate([shape, moment_y]))
      if not with_system:   # a trial step's cost: no Jacobian
        cost = multiview.views_cost(*terms)
        return cost, jnp.isfinite(cost)
      cost, (a, b), ok = multiview.views_system(*terms)
      return cost, ok, a[num_shape:, num_shape:], b[num_shape:]
    return jax.vmap(one)(views, landmarks, landmark_weights, params, y)

  rates = fit_config.full_rates
  moving = [(rates.expression, params.expression.shape[1]), (rates.jaw, 3), (rates.eyes, 6),
            (rates.camera_rotation, 3), (rates.camera_translation, 3)]
  free = jnp.asarray(np.concatenate([np.full(width, rate is not None)
                                     for rate, width in moving]))
  _, y, history, failed = clip_solve.solve_clip_terms(
      frame_terms, params, shape, x[:, num_shape:], valid, motion, weights, free,
      config.clip_lm_iterations, config.clip_cg_iterations, active=jnp.any(valid))
  solved, deltas, translations = jax.vmap(solve.unpack)(
      jnp.concatenate([jnp.broadcast_to(shape, (y.shape[0], num_shape)), y], axis=1), params)
  head_rotations = jax.vmap(axis_angle_to_matrix)(deltas) @ base_rotation

  def evaluate(flame, rotation, translation, moment_views, moment_landmarks, moment_detected):
    points, _ = surface_points_forward(rows, flame)
    predicted = multiview.project_views(moment_views, points @ rotation.T + translation)
    return predicted, jax.vmap(losses.landmark_error)(predicted, moment_landmarks,
                                                      moment_detected)
  predicted, errors = jax.vmap(evaluate)(solved, head_rotations, translations, views, landmarks,
                                         detected)
  return RigTrackResult(
      params=solved.replace(shape=jnp.broadcast_to(shape, solved.shape.shape)),
      head_rotation=jax.vmap(matrix_to_axis_angle)(head_rotations),
      head_translation=translations, landmarks_2d=predicted, landmark_error=errors,
      tracked=valid, failed=failed, clip_cost_history=history)
