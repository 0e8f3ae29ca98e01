"""Fitting a video clip: one identity for the whole clip, a smooth track of everything else.

A clip is a batch whose frames share an identity and move smoothly. Its frames are cut into
segments of fixed length that overlap by a few frames. The loss of ONE segment is written over
its frames (vmap over frames for the per-frame terms, differences along the frame axis for the
temporal priors) and `jax.vmap` evaluates every segment at once, so a long clip is one large
batch, not a sequential loop. Shape, focal length and (photometric mode) albedo and lighting are
single leaves shared by all segments; the per-frame leaves of neighbouring segments are pulled
together where they overlap and cross-faded when the clip is assembled.

The per-frame terms are fit.py's (Charbonnier landmark loss, L2 priors, photometric term). The
temporal terms (`jflame.temporal`) smooth noise, not motion: each difference is Charbonnier
beyond about twice its noise, and its weight falls where the detected landmarks themselves move,
so the data term never gives way before they do. The landmark fit runs in two parts: Adam
settles the clip's shape with the frames otherwise independent, then a Levenberg-Marquardt over
the whole clip (`jflame.clip_solve`, shape held) adds the temporal terms; under Adam alone they
slowed the shape's convergence. The photometric stage keeps them in its Adam steps.
Camera rotations are small axis-angles on the left of ONE base rotation for the clip (the
chordal mean of the per-frame closed-form starts), so differences between frames mean something.
A frame without a face carries no data term: the temporal priors interpolate it.

The fit is one compiled program per (segment count, segment length); `fit_clip` pads a clip to a
bucket of segment counts, so clip lengths do not recompile one by one.
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame import clip_solve, losses, solve
from jflame.camera import Camera, focal_length_from_fov, project
from jflame.config import FitConfig, TrackConfig
from jflame.errors import ConfigError
from jflame.fit import (FitModel, FitVariables, fitted_appearance, fitted_camera,
                        initial_appearance, landmark_problem, landmark_targets, project_landmarks,
                        regularization, render_fit, run_stage, shared_focal_length)
from jflame.flame import FlameParams, surface_points_forward, vertices_of_batch
from jflame.starting_point import identity_normal_equations, initial_rigid_camera, landmark_basis
from jflame.observation import Observation
from jflame.temporal import (TemporalWeights, agreement_penalty, motion_weights, temporal_penalty,
                             temporal_weights, without_temporal_weights)
from jflame.render import Appearance
from jflame.rotation import matrix_to_axis_angle


# Landmark-mode clips shorter than this many segments are padded to it: every short clip (116
# frames at the default segment length) then runs one compiled program, whose compile costs far
# more than fitting the padding (docs/BENCHMARKS.md, video tracking). Not in photometric mode,
# where every padded frame is rendered at every step.
MIN_SEGMENTS = 4


def segment_count(num_frames: int, config: TrackConfig) -> int:
  """Segments that cover `num_frames`, rounded up to a bucket (at least MIN_SEGMENTS in landmark
  mode, exact below 16, then steps of an eighth of the power of two below: at most 1/8 of the
  segments are padding), so that clip lengths share compiled programs (about four per doubling
  of the length)."""
  fewest = MIN_SEGMENTS if config.fit.mode == "landmark" else 1
  needed = max(fewest, math.ceil(max(num_frames - config.overlap, 1) / config.stride))
  step = 1 << max(needed.bit_length() - 4, 0)
  return step * math.ceil(needed / step)


def padded_length(num_segments: int, config: TrackConfig) -> int:
  """Frames covered by `num_segments` segments."""
  return num_segments * config.stride + config.overlap


def _segment_index(num_segments: int, config: TrackConfig) -> np.ndarray:
  """(G, L) frame index of every segment slot."""
  return (np.arange(num_segments)[:, None] * config.stride
          + np.arange(config.segment_length)[None, :])


def _blend_weights(config: TrackConfig) -> np.ndarray:
  """(L,) cross-fade weights: a frame shared by two segments takes (j+1)/(O+1) of the later one
  and the rest of the earlier one at overlap position j."""
  weights = np.ones(config.segment_length, np.float32)
  ramp = (np.arange(config.overlap) + 1.0) / (config.overlap + 1.0)
  if config.overlap:
    weights[:config.overlap] = ramp
    weights[-config.overlap:] = 1.0 - ramp
  return weights


def frames_from_segments(tree, config: TrackConfig):
  """Per-segment leaves (G, L, ...) -> per-frame leaves (G * stride + overlap, ...), cross-faded
  where segments overlap."""
  first = jax.tree.leaves(tree)[0]
  num_segments = first.shape[0]
  index = jnp.asarray(_segment_index(num_segments, config))
  weights = jnp.broadcast_to(jnp.asarray(_blend_weights(config)), index.shape)
  length = padded_length(num_segments, config)
  total = jnp.zeros(length).at[index].add(weights)

  def assemble(x):
    w = weights.reshape(weights.shape + (1,) * (x.ndim - 2))
    summed = jnp.zeros((length,) + x.shape[2:], x.dtype).at[index].add(w * x)
    return summed / total.reshape((length,) + (1,) * (x.ndim - 2))
  return jax.tree.map(assemble, tree)


def _shared_axes(variables: FitVariables, axis):
  """in_axes for vmap over frames or segments: shape, focal length and appearance are shared
  (None), every other leaf is mapped over `axis`."""
  flame = jax.tree.map(lambda _: axis, variables.flame).replace(shape=None)
  return FitVariables(flame=flame, camera_rotation=axis, camera_translation=axis,
                      focal_length=None, appearance=None)


def _map_per_frame(fn, variables: FitVariables, drop_shared: bool = False):
  """`fn` applied to the per-frame leaves; shared leaves kept (or set to None)."""
  return jax.tree.map(lambda axis, x: (None if drop_shared else x) if axis is None else fn(x),
                      _shared_axes(variables, 0), variables, is_leaf=lambda x: x is None)


def _with_shared(frame: FitVariables, variables: FitVariables) -> FitVariables:
  """One frame's per-frame leaves completed with the clip's shared ones."""
  return frame.replace(flame=frame.flame.replace(shape=variables.flame.shape),
                       focal_length=variables.focal_length, appearance=variables.appearance)


@struct.dataclass
class ClipTargets:
  """What the fit matches in each frame slot (leading axis T, or (G, L) inside segments).

  Attributes:
    landmarks, weights, is_detected: `fit.landmark_targets` of each frame: (T, K, 2), (T, K),
      (T, K).
    valid: (T,) the frame has a face with enough landmarks.
    image, face_mask: photometric mode: (T, S, S, 3) and (T, S, S); else None.
    motion: (T, 2) `motion_weights` of the differences starting at each frame.
  """
  landmarks: jax.Array
  weights: jax.Array
  is_detected: jax.Array
  valid: jax.Array
  image: Optional[jax.Array] = None
  face_mask: Optional[jax.Array] = None
  motion: Optional[jax.Array] = None


@struct.dataclass
class TrackResult:
  """The fitted clip (leading axis T, the clip's frames).

  Attributes:
    params: per-frame FLAME parameters; `shape` is the clip's one identity repeated per frame.
    camera: per-frame camera in crop pixels (one focal length for the clip).
    landmarks_2d: (T, K, 2) fitted landmarks in crop pixels.
    landmark_error: (T,) mean distance to the detected landmarks, crop pixels (0 where none).
    tracked: (T,) the frame had a face and was fitted; elsewhere the values are interpolated
      (between tracked frames) or held (before the first, after the last).
    failed: () True when the loss or a gradient became non-finite.
    rigid_loss_history, full_loss_history: (iterations,) clip loss per step of each stage.
    clip_cost_history: with the clip solve (`TrackConfig.clip_lm_iterations`): (iterations,)
      its objective after each step.
    photometric_loss_history: photometric mode: (iterations,) of the photometric stage.
    appearance: photometric mode: the clip's albedo coefficients and SH lighting.
    photometric_error: photometric mode: (T,) mean absolute colour error over the face mask.
  """
  params: FlameParams
  camera: Camera
  landmarks_2d: jax.Array
  landmark_error: jax.Array
  tracked: jax.Array
  failed: jax.Array
  rigid_loss_history: jax.Array
  full_loss_history: jax.Array
  clip_cost_history: Optional[jax.Array] = None
  photometric_loss_history: Optional[jax.Array] = None
  appearance: Optional[Appearance] = None
  photometric_error: Optional[jax.Array] = None


def chordal_mean(rotations, weights):
  """The rotation nearest (Frobenius) to the weighted mean of (T, 3, 3) rotation matrices."""
  mean = jnp.einsum("t,tab->ab", weights, rotations)
  u, _, vt = jnp.linalg.svd(mean)
  fix = jnp.diag(jnp.asarray([1.0, 1.0, 0.0])) + jnp.diag(
      jnp.asarray([0.0, 0.0, 1.0])) * jnp.linalg.det(u @ vt)
  return u @ fix @ vt


def gap_filled(tree, valid):
  """Per-frame leaves (T, ...) with every frame without a face replaced by the linear
  interpolation of the nearest frames with one (held at the ends)."""
  frames = valid.shape[0]
  index = jnp.arange(frames)
  before = jax.lax.cummax(jnp.where(valid, index, -1))
  after = jax.lax.cummin(jnp.where(valid, index, frames), reverse=True)
  before_ok, after_ok = before >= 0, after < frames
  before = jnp.where(before_ok, before, after)
  after = jnp.where(after_ok, after, before)
  before, after = jnp.clip(before, 0, frames - 1), jnp.clip(after, 0, frames - 1)
  span = jnp.maximum(after - before, 1)
  alpha = jnp.where(after > before, (index - before) / span, 0.0)

  def fill(x):
    a = alpha.reshape((frames,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return (1.0 - a) * x[before] + a * x[after]
  return jax.tree.map(fill, tree)


def joint_identity_solve(normals, rhs, valid, prior_weights, num_shape: int):
  """One shape for every frame and an expression per frame, by one regularised linear solve.

  Minimises sum_f [c_f^T N_f c_f / 2 - b_f^T c_f + expression prior] + T shape prior over
  frames with a face, where c_f = (shape, expression_f): each frame's expression is eliminated
  (Schur complement), which leaves an S x S system for the shared shape.

  Args:
    normals, rhs: (T, N, N), (T, N) per-frame `init.identity_normal_equations`, N = S + E.
    valid: (T,) frames with a face.
    prior_weights: (N,) L2 weight of each coefficient (the fit's regularisation).
    num_shape: S.
  Returns:
    (shape (S,), expressions (T, E)).
  """
  count = jnp.maximum(jnp.sum(valid), 1.0)
  scale = valid.astype(normals.dtype)
  normals = normals * scale[:, None, None]
  rhs = rhs * scale[:, None]
  a_ss, a_se = normals[:, :num_shape, :num_shape], normals[:, :num_shape, num_shape:]
  a_ee = normals[:, num_shape:, num_shape:] + 2.0 * jnp.diag(prior_weights[num_shape:])
  b_s, b_e = rhs[:, :num_shape], rhs[:, num_shape:]
  # M_f^-1 [A_es, b_e] for every frame in one batched solve.
  eliminated = jnp.linalg.solve(a_ee, jnp.concatenate(
      [jnp.swapaxes(a_se, 1, 2), b_e[:, :, None]], axis=2))
  system = (jnp.sum(a_ss - a_se @ eliminated[:, :, :num_shape], axis=0)
            + 2.0 * count * jnp.diag(prior_weights[:num_shape]))
  target = jnp.sum(b_s - jnp.einsum("tse,te->ts", a_se, eliminated[:, :, num_shape]), axis=0)
  shape = jnp.linalg.solve(system, target)
  expressions = eliminated[:, :, num_shape] - eliminated[:, :, :num_shape] @ shape
  return shape, expressions


# A small pull of the linearised jaw towards rest keeps the start's solve well conditioned.
_JAW_INIT_PRIOR = 1e-3


def _jaw_basis(rows):
  """(K, 3, 3) derivative of the rest-pose landmarks with respect to the jaw's axis-angle."""
  zeros = FlameParams.zeros(rows.num_shape, rows.num_expression)

  def points(jaw):
    return surface_points_forward(rows, zeros.replace(jaw_rotation=jaw))[0]
  return jax.jacfwd(points)(jnp.zeros(3, jnp.float32))


def initial_clip_variables(fit_model: FitModel, targets: ClipTargets, crop_size: int,
                           config: FitConfig, focal_length=None):
  """The clip's start, weight-free like a photo's (see jflame.starting_point) but with one identity:
  closed-form per-frame cameras alternated with `joint_identity_solve`; then one base rotation
  for the clip (chordal mean) with per-frame deltas, and frames without a face filled from their
  neighbours.

  `focal_length` (crop pixels, e.g. from `clip_focal_length`) replaces the field-of-view focal.

  Returns:
    (variables with per-frame leaves (T, ...) and a shared shape and focal length, base
    rotation (3, 3), principal point (2,)).
  """
  rows = fit_model.landmark_rows
  num_shape, num_expression = rows.num_shape, rows.num_expression
  focal = jnp.asarray(focal_length_from_fov(crop_size, config.fov_degrees)
                      if focal_length is None else focal_length, jnp.float32)
  principal_point = jnp.full((2,), crop_size / 2.0, jnp.float32)
  pixel_scale = config.landmark_scale / crop_size
  template, basis = landmark_basis(rows)
  # The jaw moves the lips and chin as much as expression does: linearised at the rest pose it
  # joins the solve as three more per-frame columns, so it is not mistaken for expression.
  basis = jnp.concatenate([basis, _jaw_basis(rows)], axis=2)
  solved_shape = min(config.init_num_shape, num_shape)
  solved_expression = min(config.init_num_expression, num_expression)
  columns = np.r_[np.arange(solved_shape), num_shape + np.arange(solved_expression),
                  num_shape + num_expression + np.arange(3)]
  prior_weights = jnp.asarray(np.r_[np.full(solved_shape, config.regularization.shape),
                                    np.full(solved_expression, config.regularization.expression),
                                    np.full(3, max(config.regularization.jaw, _JAW_INIT_PRIOR))],
                              jnp.float32)
  frames = targets.valid.shape[0]
  coefficients = jnp.zeros((frames, num_shape + num_expression + 3), jnp.float32)

  def cameras(coefficients):
    return jax.vmap(lambda c, landmarks, weights: initial_rigid_camera(
        template + basis @ c, landmarks, weights, focal, principal_point))(
            coefficients, targets.landmarks, targets.weights)

  rotations, translations = cameras(coefficients)
  for _ in range(config.init_rounds):
    normals, rhs = jax.vmap(lambda c, landmarks, weights, rotation, translation:
                            identity_normal_equations(
                                template, basis[:, :, columns], landmarks, weights, rotation,
                                translation, focal, principal_point, pixel_scale))(
        coefficients, targets.landmarks, targets.weights, rotations, translations)
    shape, expressions = joint_identity_solve(normals, rhs, targets.valid, prior_weights,
                                              solved_shape)
    solved = jnp.concatenate([jnp.broadcast_to(shape, (frames, solved_shape)), expressions],
                             axis=1)
    coefficients = coefficients.at[:, columns].set(solved)
    rotations, translations = cameras(coefficients)
  valid_weight = targets.valid.astype(jnp.float32) / jnp.maximum(jnp.sum(targets.valid), 1.0)
  base = chordal_mean(rotations, valid_weight)
  deltas = jax.vmap(lambda r: matrix_to_axis_angle(r @ base.T))(rotations)
  flame = jax.vmap(lambda c: FlameParams.zeros(config.num_shape, config.num_expression).replace(
      shape=c[:num_shape], expression=c[num_shape:num_shape + num_expression],
      jaw_rotation=c[num_shape + num_expression:]))(coefficients)
  per_frame = FitVariables(flame=flame, camera_rotation=deltas,
                           camera_translation=translations,
                           focal_length=jnp.broadcast_to(focal, (frames,)))
  per_frame = gap_filled(jax.lax.stop_gradient(per_frame), targets.valid)
  ok = jnp.all(jnp.isfinite(coefficients)) & _finite(per_frame)
  return (per_frame.replace(flame=per_frame.flame.replace(shape=coefficients[0, :num_shape]),
                            focal_length=focal), base, principal_point, ok)


def _finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _frame_loss(fit_model, frame, target, base_rotation, principal_point, crop_size,
                config: FitConfig, photometric: bool):
  """ONE frame's data term (zero without a face) and its priors without the shape prior (the
  clip's shape prior is counted once)."""
  predicted = project_landmarks(fit_model, frame, base_rotation, principal_point)
  data = losses.landmark_loss(predicted, target.landmarks, target.weights, crop_size,
                              config.landmark_scale, config.landmark_robust_scale)
  if photometric:
    rendered = render_fit(fit_model, frame, base_rotation, principal_point, crop_size,
                          config.raster)
    data = data + config.photometric_weight * losses.photometric_loss(
        rendered.image, target.image, target.face_mask, config.photometric_robust_scale)
  flame = frame.flame
  prior = regularization(flame.replace(shape=jnp.zeros_like(flame.shape)), config)
  return jnp.where(target.valid, data, 0.0) + prior


def clip_loss(fit_model: FitModel, variables: FitVariables, targets: ClipTargets, base_rotation,
              principal_point, crop_size: int, config: TrackConfig, weights: TemporalWeights,
              photometric: bool, smoothed: bool = True):
  """The clip's objective over segments (per-frame leaves and targets (G, L, ...)): per-frame
  terms and temporal priors summed over segment slots and divided by the frames with a face,
  plus the shape (and texture) prior once and the agreement of overlapping segments
  (`smoothed` False: the per-frame terms alone, frames independent but for the shape)."""
  fit_config = config.fit

  def segment(segment_variables, segment_targets):
    frame_loss = functools.partial(_frame_loss, fit_model, base_rotation=base_rotation,
                                   principal_point=principal_point, crop_size=crop_size,
                                   config=fit_config, photometric=photometric)
    per_frame = jax.vmap(frame_loss, in_axes=(_shared_axes(segment_variables, 0), 0))(
        segment_variables, segment_targets)
    if not smoothed:
      return jnp.sum(per_frame)
    return jnp.sum(per_frame) + temporal_penalty(segment_variables, weights,
                                                 segment_targets.motion)

  chunk = config.photometric_segment_chunk if photometric else config.segment_chunk
  if not chunk or chunk >= targets.valid.shape[0]:
    per_segment = jax.vmap(segment, in_axes=(_shared_axes(variables, 0), 0))(variables, targets)
  else:
    per_segment = jax.lax.map(
        lambda inputs: segment(_with_shared(inputs[0], variables), inputs[1]),
        (_map_per_frame(lambda x: x, variables, drop_shared=True), targets),
        batch_size=chunk)
  frames_with_data = jnp.maximum(jnp.sum(targets.valid), 1.0)
  agreement = agreement_penalty(variables, config.overlap, weights) if smoothed else 0.0
  loss = ((jnp.sum(per_segment) + agreement) / frames_with_data
          + losses.l2(variables.flame.shape, fit_config.regularization.shape))
  if photometric:
    loss = loss + losses.l2(variables.appearance.texture, fit_config.regularization.texture)
  return loss


def _frame_targets(fit_model: FitModel, observations: Observation, photometric: bool):
  landmarks, weights, is_detected, valid = jax.vmap(
      functools.partial(landmark_targets, fit_model))(observations)
  extra = {}
  if photometric:
    extra = dict(image=observations.image, face_mask=observations.face_mask)
  return ClipTargets(landmarks=landmarks, weights=weights, is_detected=is_detected, valid=valid,
                     **extra)


def _clip_appearance(fit_model: FitModel, targets: ClipTargets) -> Appearance:
  """One start for the clip: the mean over frames with a face of each frame's start."""
  starts = jax.vmap(functools.partial(initial_appearance, fit_model.albedo))(
      targets.image, targets.face_mask)
  weight = targets.valid.astype(jnp.float32) / jnp.maximum(jnp.sum(targets.valid), 1.0)
  return jax.tree.map(lambda x: jnp.tensordot(weight, x, axes=1), starts)


def spread_frames(valid, count: int):
  """(count,) indices of frames with a face spread evenly over the clip, first to last (a frame
  repeats when fewer have one; frame 0 when none has); every frame when `count` is 0 or not
  below the clip's length."""
  frames = valid.shape[0]
  if count == 0 or count >= frames:
    return jnp.arange(frames)
  with_face = jnp.nonzero(valid, size=frames, fill_value=0)[0]
  last = jnp.maximum(jnp.sum(valid), 1) - 1
  return with_face[jnp.round(jnp.linspace(0.0, 1.0, count) * last).astype(jnp.int32)]


def _frames_put(variables: FitVariables, picked, fitted: FitVariables) -> FitVariables:
  """`variables` (per-frame leaves (T, ...)) with the frames `picked` replaced by `fitted`'s
  (per-frame leaves (1, len(picked), ...)), and `fitted`'s shared leaves."""
  return jax.tree.map(lambda axis, full, part: part if axis is None else full.at[picked].set(part[0]),
                      _shared_axes(variables, 0), variables, fitted,
                      is_leaf=lambda x: x is None)


def shape_held(rates, fit_config):
  """The rates of a stage, with shape frozen when the config holds it (fit_shape False)."""
  return rates if fit_config.fit_shape else dataclasses.replace(rates, shape=None)


def _clip_solve(fit_model: FitModel, frames: FitVariables, targets: ClipTargets, base_rotation,
                principal_point, crop_size: int, config: TrackConfig, weights: TemporalWeights,
                active):
  """The landmark objective with the temporal terms over the clip's frames (per-frame leaves
  (T, ...)), the shape held, by `clip_solve.solve_clip` from `frames`: (frames, cost history,
  failed)."""
  fit_config = config.fit
  rates = fit_config.full_rates
  problems = jax.vmap(lambda landmarks, weights: landmark_problem(
      fit_model, landmarks, weights, crop_size, fit_config, base_rotation, principal_point))(
          targets.landmarks, targets.weights)
  shape = frames.flame.shape
  params = frames.flame.replace(shape=jnp.broadcast_to(shape, frames.flame.expression.shape[:1]
                                                       + shape.shape))
  x = jax.vmap(solve.pack)(params, frames.camera_rotation, frames.camera_translation)
  num_shape = shape.shape[0]
  # Groups the landmark stage does not move stay where they are.
  moving = [(rates.expression, params.expression.shape[1]), (rates.jaw, 3), (rates.eyes, 6),
            (rates.camera_rotation, 3), (rates.camera_translation, 3)]
  free = jnp.asarray(np.concatenate([np.full(width, rate is not None)
                                     for rate, width in moving]))
  solve_with = functools.partial(
      clip_solve.solve_clip, fit_model.landmark_rows, problems, params,
      log_focal=jnp.log(frames.focal_length), valid=targets.valid, motion=targets.motion,
      weights=weights, free=free, iterations=config.clip_lm_iterations,
      cg_iterations=config.clip_cg_iterations)
  # The shape stays where the Adam stages put it (frames independent): solved here with the
  # temporal terms, or first alone, it came out worse against the truth on some known-truth
  # draws (docs/ACCURACY.md).
  _, y, history, failed = solve_with(shape=shape, y=x[:, num_shape:], active=active)
  solved, rotation, translation = jax.vmap(solve.unpack)(
      jnp.concatenate([jnp.broadcast_to(shape, x[:, :num_shape].shape), y], axis=1), params)
  return (frames.replace(flame=solved.replace(shape=shape), camera_rotation=rotation,
                         camera_translation=translation), history, failed)


@functools.partial(jax.jit, static_argnames=("config", "crop_size"))
def track_padded(fit_model: FitModel, observations: Observation, config: TrackConfig,
                 crop_size: int, weights: TemporalWeights, focal_length=None) -> TrackResult:
  """Fits a clip already padded to `padded_length(G, config)` frames (padding frames have
  `valid` False), with the temporal weights `weights` (`config`'s own are not read: pass
  `without_temporal_weights(config)`, so that every weighting shares one program). Compiled once
  per (G, segment length, crop size, config). `focal_length` (crop pixels) replaces the
  field-of-view focal; it stays fixed in the fit."""
  fit_config = config.fit
  photometric = fit_config.photometric
  frames = observations.valid.shape[0]
  num_segments = (frames - config.overlap) // config.stride
  if padded_length(num_segments, config) != frames:
    raise ConfigError(f"a clip of {frames} frames is not padded to whole segments; use "
                      "fit_clip, which pads it.")
  targets = _frame_targets(fit_model, observations, photometric)
  targets = targets.replace(motion=motion_weights(
      targets, fit_config.landmark_scale / crop_size, weights.motion_scale))
  variables, base_rotation, principal_point, start_ok = initial_clip_variables(
      fit_model, targets, crop_size, fit_config, focal_length)
  index = jnp.asarray(_segment_index(num_segments, config))
  per_frame_axes = _shared_axes(variables, 0)
  segment_targets = jax.tree.map(lambda x: x[index], targets)
  to_segments = functools.partial(_map_per_frame, lambda x: x[index])
  to_frames = functools.partial(_map_per_frame, lambda x: frames_from_segments(x, config))
  active = jnp.any(targets.valid) & start_ok

  def loss_fn(photometric_term, smoothed=True, loss_targets=segment_targets):
    return lambda v: clip_loss(fit_model, v, loss_targets, base_rotation, principal_point,
                               crop_size, config, weights, photometric_term, smoothed)

  def landmark_stages(variables, loss):
    variables, rigid_history, rigid_failed = run_stage(
        loss, variables, fit_config.rigid_rates, fit_config.rigid_iterations, active)
    variables, full_history, full_failed = run_stage(
        loss, variables, shape_held(fit_config.full_rates, fit_config),
        fit_config.full_iterations, active & ~rigid_failed)
    return variables, rigid_history, full_history, rigid_failed | full_failed

  extra = {}
  if config.clip_lm_iterations > 0:
    # The Adam stages settle the shared shape on frames fitted independently (under Adam the
    # temporal terms slow the shape down), on `shape_frames` of them as one segment; the clip
    # solve then fits every frame with the temporal terms, the shape held.
    picked = spread_frames(targets.valid, config.shape_frames)
    take = lambda x: x[picked][None]
    fitted, rigid_history, full_history, failed = landmark_stages(
        _map_per_frame(take, variables),
        loss_fn(False, smoothed=False, loss_targets=jax.tree.map(take, targets)))
    solved, clip_history, clip_failed = _clip_solve(
        fit_model, _frames_put(variables, picked, fitted), targets, base_rotation,
        principal_point, crop_size, config, weights, active & ~failed)
    variables = to_segments(solved)
    failed = failed | clip_failed
    extra["clip_cost_history"] = clip_history
  else:
    variables, rigid_history, full_history, failed = landmark_stages(
        to_segments(variables), loss_fn(False))
  if photometric:
    variables = variables.replace(appearance=_clip_appearance(fit_model, targets))
    variables, photometric_history, photometric_failed = run_stage(
        loss_fn(True), variables, shape_held(config.photometric_rates, fit_config),
        config.photometric_iterations, active & ~failed)
    failed = failed | photometric_failed
    extra.update(photometric_loss_history=photometric_history,
                 appearance=fitted_appearance(variables))
  frame_variables = _map_per_frame(lambda x: gap_filled(x, targets.valid), to_frames(variables))

  def evaluate(frame, target):
    predicted = project_landmarks(fit_model, frame, base_rotation, principal_point)
    return (frame.flame.replace(shape=variables.flame.shape),
            fitted_camera(frame, base_rotation, principal_point), predicted,
            losses.landmark_error(predicted, target.landmarks, target.is_detected))

  params, camera, predicted, error = jax.vmap(evaluate, in_axes=(per_frame_axes, 0))(
      frame_variables, targets)
  if photometric:
    def colour_error(frame, target):
      rendered = render_fit(fit_model, frame, base_rotation, principal_point, crop_size,
                            fit_config.raster)
      return losses.masked_mean_abs(rendered.image, target.image, target.face_mask)
    # One frame's render at a time: a whole clip of renders need not fit in memory.
    extra["photometric_error"] = jax.lax.map(
        lambda inputs: colour_error(_with_shared(inputs[0], frame_variables), inputs[1]),
        (_map_per_frame(lambda x: x, frame_variables, drop_shared=True), targets),
        batch_size=8)
  return TrackResult(params=params, camera=camera, landmarks_2d=predicted,
                     landmark_error=error, tracked=targets.valid & ~failed, failed=failed,
                     rigid_loss_history=rigid_history, full_loss_history=full_history, **extra)


def pad_clip(observations: Observation, config: TrackConfig) -> Observation:
  """A clip of T frames (host or device arrays) padded with empty frames to its bucket."""
  frames = observations.valid.shape[0]
  length = padded_length(segment_count(frames, config), config)

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((length - frames,) + x.shape[1:], x.dtype)])
  return jax.tree.map(pad, observations)


def fit_clip(fit_model: FitModel, observations: Observation, config: TrackConfig,
             crop_size: int, focal_length=None) -> TrackResult:
  """Fits a clip of T frames (Observation with leading axis T; `crop_size` is the side of the
  frame in which its landmarks are given). Returns the TrackResult of the T frames.
  `focal_length` (crop pixels, e.g. `clip_focal_length`'s) replaces the config's
  field-of-view focal."""
  frames = observations.valid.shape[0]
  if frames == 0:
    raise ConfigError("the clip has no frames")
  result = track_padded(fit_model, pad_clip(observations, config),
                        without_temporal_weights(config), crop_size, temporal_weights(config),
                        focal_length)
  per_frame = ("params", "camera", "landmarks_2d", "landmark_error", "tracked",
               "photometric_error")
  return result.replace(**{name: jax.tree.map(lambda x: x[:frames], getattr(result, name))
                           for name in per_frame if getattr(result, name) is not None})


def focal_frames(valid: np.ndarray, count: int = 16) -> np.ndarray:
  """Indices of up to `count` frames with a face, spread evenly over the clip (host)."""
  with_face = np.flatnonzero(np.asarray(valid))
  if len(with_face) <= count:
    return with_face
  return with_face[np.round(np.linspace(0, len(with_face) - 1, count)).astype(int)]


_shared_focal = jax.jit(shared_focal_length, static_argnames="config")


def clip_focal_length(fit_model: FitModel, observations: Observation, config: TrackConfig,
                      count: int = 16):
  """One focal length (crop pixels) for a clip: `jflame.fit.shared_focal_length` (the joint
  Levenberg-Marquardt solve of images known to share a camera) over `focal_frames`. Each
  frame keeps its own shape in that solve, so frames far apart in the clip (different poses)
  carry the most. Weakly determined: see docs/ACCURACY.md. Returns (focal, frames used)."""
  chosen = focal_frames(observations.valid, count)
  if len(chosen) == 0:
    raise ConfigError("no frame of the clip has a face; no focal length to solve")
  subset = jax.tree.map(lambda x: np.asarray(x)[chosen], observations)
  solver = config.fit.replace(landmark_solver="lm", shared_focal=True, mode="landmark")
  focal, members = _shared_focal(fit_model, subset, solver)
  return focal, int(np.sum(np.asarray(members)))


@jax.jit
def clip_meshes(model, params: FlameParams, camera: Camera):
  """Full meshes of a tracked clip (T leading) and their projections: ((T, V, 3) model space,
  (T, V, 2) crop pixels)."""
  vertices = vertices_of_batch(model, params)
  return vertices, jax.vmap(project)(camera, vertices)
