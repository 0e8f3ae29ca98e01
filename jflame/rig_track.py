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

    photometric mode (each moment's view crops given, `multiview.ViewPhotos` with a leading T):
                  then Adam over every moment (config.photometric_iterations,
                  photometric_rates) on the same objective plus every view's render against its
                  crop (multiview.render_views, each view's colour gain per moment), one albedo
                  and one SH light for the clip, the light in the world's axes; the clip's shape
                  moves at the photometric rates

The head's rotation is solved as a rotation from one base rotation for the clip (the chordal
mean of the moments' own), so consecutive moments' rotations are differences the temporal terms
can compare. Moments where no view had a face are interpolated between their neighbours
(`tracked` False). `clip_shape` gives the clip's identity from moments spread over it.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame import clip_solve, losses, multiview, solve
from jflame.config import TrackConfig
from jflame.fit import FitModel, FitVariables, fitted_appearance, run_stage
from jflame.flame import FlameParams, surface_points_forward
from jflame.render import Appearance
from jflame.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from jflame.temporal import (TemporalWeights, motion_weights, temporal_penalty, temporal_weights,
                             without_temporal_weights)
from jflame.track import ClipTargets, chordal_mean, gap_filled, shape_held, spread_frames


# `jflame-track --cameras --mode photometric`'s Adam steps over the clip unless told: on the
# small head's known-truth clip the world error settles by 100 (docs/ACCURACY.md, multi-view
# tracking).
PHOTOMETRIC_ITERATIONS = 100
# `jflame-track --cameras --mode photometric`'s photometric weight (a moment's:
# multiview.RIG_PHOTOMETRIC_WEIGHT). 1e4, 3e4 and 1e5 compared on textured and untextured clips
# end to end: 3e4 lowers the median and the worst moment on both (docs/ACCURACY.md).
PHOTOMETRIC_WEIGHT = 3e4


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
    appearance: photometric mode: the clip's albedo coefficients and SH lighting (world axes).
    view_gains: photometric mode: (T, V, 3) each view's colour gain per moment.
    photometric_error: photometric mode: (T, V) mean absolute colour error over each view's
      skin mask.
    photometric_loss_history: photometric mode: (iterations,) of its Adam stage.
  """
  params: FlameParams
  head_rotation: jax.Array
  head_translation: jax.Array
  landmarks_2d: jax.Array
  landmark_error: jax.Array
  tracked: jax.Array
  failed: jax.Array
  clip_cost_history: jax.Array
  appearance: Optional[Appearance] = None
  view_gains: Optional[jax.Array] = None
  photometric_error: Optional[jax.Array] = None
  photometric_loss_history: Optional[jax.Array] = None


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
      fit_model, jax.tree.map(lambda x: x[picked], views), _landmark_mode(config.fit), None)
  return jnp.median(fitted.params.shape, axis=0)


def track_rig(fit_model: FitModel, views: multiview.RigViews, config: TrackConfig, shape,
              photo_landmarks: int,
              photos: Optional[multiview.ViewPhotos] = None) -> RigTrackResult:
  """Fits a rig's clip of T moments (`views` with leading axis T, from `multiview.rig_views`)
  with the identity `shape` (S,) held (`clip_shape`; photometric mode's renders move it) and
  `config`'s temporal terms (all zero: every moment alone); `config.fit` is each moment's fit
  (`multiview.rig_config` of a photo's),
  `config.clip_lm_iterations` and `clip_cg_iterations` the clip solve. Configs that differ only
  in their temporal weights share one compiled program.

  The single-view track's weights were set against one photo's landmarks; a moment of a rig has
  several views' worth (of every landmark). So that they weigh against a moment's data as they
  do against a frame's, the weights of the differences are multiplied by the clip's detected
  landmarks per moment over `photo_landmarks`, the count one photo's fit uses
  (`model_loading.fitted_landmark_indices(loaded, FitConfig())`: 162 of MediaPipe's).

  `photos`: each moment's view crops (leading axis T), required in photometric mode
  (`config.fit.mode`) and only used there."""
  if config.fit.photometric and photos is None:
    raise ValueError("a photometric track of a rig needs each moment's view crops (photos)")
  return _track_rig(fit_model, views, without_temporal_weights(config), temporal_weights(config),
                    shape, jnp.float32(photo_landmarks),
                    photos if config.fit.photometric else None)


def _landmark_mode(fit_config):
  """The moments' own fits and the clip solve are landmark fits whatever the mode (photometric
  mode's renders come after them, over the whole clip)."""
  return fit_config.replace(mode="landmark")


def _data_scaled(weights: TemporalWeights, factor) -> TemporalWeights:
  """The weights of the differences (not their robust scales) times `factor`."""
  times = lambda groups: {group: value * factor for group, value in groups.items()}
  return dataclasses.replace(weights, velocity=times(weights.velocity),
                             acceleration=times(weights.acceleration))


@functools.partial(jax.jit, static_argnames=("config",))
def _track_rig(fit_model: FitModel, views: multiview.RigViews, config: TrackConfig,
               weights: TemporalWeights, shape, photo_landmarks, photos) -> RigTrackResult:
  fit_config = config.fit
  rows = fit_model.landmark_rows
  shape = jnp.asarray(shape, jnp.float32)
  num_shape = shape.shape[0]
  moments = jax.vmap(multiview.fit_moment, in_axes=(None, 0, None, None))(
      fit_model, views, _landmark_mode(fit_config), shape)
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
  extra = {}
  if photos is not None:
    fitted, extra = _photometric_stage(
        fit_model, views, landmarks, landmark_weights, params, base_rotation, photos, config,
        weights, motion, valid,
        FitVariables(flame=solved.replace(shape=shape), camera_rotation=deltas,
                     camera_translation=translations, focal_length=jnp.ones(())),
        jnp.any(valid) & ~failed)
    shape = fitted.flame.shape[0]   # the clip's, repeated per moment
    solved, deltas, translations = fitted.flame, fitted.camera_rotation, fitted.camera_translation
    failed = failed | extra.pop("failed")
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
      tracked=valid, failed=failed, clip_cost_history=history, **extra)


def _photometric_stage(fit_model: FitModel, views: multiview.RigViews, landmarks,
                       landmark_weights, params, base_rotation, photos: multiview.ViewPhotos,
                       config: TrackConfig, weights: TemporalWeights, motion, valid,
                       variables: FitVariables, active):
  """Adam on every moment from the clip solve's `variables` (per-moment leaves (T, ...) but the
  clip's shape (S,) and appearance, rotation deltas from `base_rotation`, world translations):
  the clip solve's objective (each moment's views' landmark cost and priors,
  `multiview.views_cost`, and the temporal penalty) plus each moment's renders against its
  views' crops times the fit's photometric weight, and the clip's albedo prior. The shape moves
  at `config.photometric_rates`' shape rate, as a single view's photometric track moves it.
  Returns (variables with the shape repeated per moment, extra result fields)."""
  fit_config = config.fit
  rows = fit_model.landmark_rows
  chunk = max(1, config.photometric_segment_chunk)

  starts = jax.vmap(multiview.views_appearance, in_axes=(None, 0, 0))(fit_model, views, photos)
  share = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1.0)
  appearance = jax.tree.map(lambda x: jnp.tensordot(share, x, axes=1), starts)
  variables = variables.replace(appearance=appearance)

  def moment_cost(moment):
    variables_t, views_t, landmarks_t, weights_t, params_t, photos_t, valid_t = moment
    x = solve.pack(variables_t.flame, variables_t.camera_rotation,
                   variables_t.camera_translation)
    landmark_cost = multiview.views_cost(rows, views_t, landmarks_t, weights_t, fit_config,
                                         params_t, base_rotation, x)
    renders = multiview.render_views(fit_model, views_t, photos_t, variables_t, base_rotation,
                                     fit_config.raster)
    images, _ = multiview.gained_renders(renders, photos_t, views_t.valid)
    per_view = jax.vmap(losses.photometric_loss, in_axes=(0, 0, 0, None))(
        images, photos_t.images, photos_t.face_masks, fit_config.photometric_robust_scale)
    cost = landmark_cost + fit_config.photometric_weight * jnp.sum(
        jnp.where(views_t.valid, per_view, 0.0))
    return jnp.where(valid_t, cost, 0.0)

  frames = valid.shape[0]
  repeat = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (frames,) + x.shape), tree)

  def per_moment_of(variables):
    flame = variables.flame
    return variables.replace(flame=flame.replace(shape=repeat(flame.shape)),
                             focal_length=repeat(variables.focal_length), appearance=None)

  def loss(variables):
    per_moment = per_moment_of(variables)
    shared = repeat(variables.appearance)
    moments = (per_moment.replace(appearance=shared), views, landmarks, landmark_weights, params,
               photos, valid)
    costs = jax.lax.map(moment_cost, moments, batch_size=chunk)
    return (jnp.sum(costs) + temporal_penalty(per_moment, weights, motion)
            + losses.l2(variables.appearance.texture, fit_config.regularization.texture))

  fitted, history, failed = run_stage(loss, variables,
                                      shape_held(config.photometric_rates, fit_config),
                                      config.photometric_iterations, active)
  appearance = fitted.appearance
  fitted = per_moment_of(fitted)

  def evaluate(variables_t, views_t, photos_t):
    renders = multiview.render_views(fit_model, views_t, photos_t, variables_t, base_rotation,
                                     fit_config.raster)
    images, gains = multiview.gained_renders(renders, photos_t, views_t.valid)
    return gains, jax.vmap(losses.masked_mean_abs)(images, photos_t.images, photos_t.face_masks)
  gains, errors = jax.lax.map(lambda m: evaluate(*m),
                              (fitted.replace(appearance=repeat(appearance)), views, photos),
                              batch_size=chunk)
  return fitted, dict(appearance=fitted_appearance(fitted.replace(appearance=appearance)),
                      view_gains=gains,
                      photometric_error=errors, photometric_loss_history=history, failed=failed)
