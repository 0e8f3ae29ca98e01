"""Fitting one moment of a calibrated capture rig: one head seen by several fixed cameras.

The cameras are known (`jflame.camera_files`), so there is no focal length or camera pose to
fit: the unknowns are the FLAME parameters and the head's pose in WORLD coordinates (model ->
world rotation and translation, metres). Every view's landmarks pull on the same head through
its own calibrated projection (`camera.project_calibrated`, lens distortion included), which is
what fixes the size and the distance that one view cannot tell apart.

    start: each landmark triangulated from the views that detected it (linear, distortion
           ignored), the neutral model's landmarks rigidly aligned to those points (Kabsch)
    then, with config.landmark_solver "lm" (the default): one Levenberg-Marquardt solve of
           every unknown over all views (`jflame.solve.levenberg_marquardt`, lm_iterations)
    or, with "adam":
      stage 1: Adam on the head pose      (config.rigid_rates, rigid_iterations)
      stage 2: Adam on everything          (config.full_rates, full_iterations) + the priors
    photometric mode (each view's face crop given as `ViewPhotos`): then Adam on everything
           with the landmarks, the priors and every view's render against its crop, summed
           (full_iterations; the albedo and the SH lighting are one for all views, the lighting
           fixed in the world, as a rig's lamps are; each view's colour gain, `view_gains`,
           takes up how its camera's exposure and white balance differ)

Residuals are measured per view in pixels of a `config.landmark_scale` crop framing that view's
detected face as a photo's crop does (`RigViews.face_scale`), so a 4K camera and a 512-pixel
one weigh the same, and summed over the views: more views, more data against the same priors. One moment is one
example; batch moments with `jax.vmap`.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame import losses, solve
from jflame.camera import apply_affine, project_calibrated
from jflame.camera_files import RigCamera, padded_distortion
from jflame.config import FitConfig, LandmarkSolver
from jflame.fit import (FitModel, FitVariables, appearance_variables, fitted_appearance,
                        initial_appearance, regularization, run_stage)
from jflame.flame import FlameParams, flame_forward, surface_points_forward
from jflame.render import Appearance, RenderOutput, render_mesh, vertex_normals
from jflame.rotation import axis_angle_to_matrix, matrix_to_axis_angle


# Adam's full stage with several views' data needs more steps than a photo's 200 to reach the
# noise floor (docs/ACCURACY.md, multi-view): what `jflame-fit --cameras` runs with
# --landmark_solver adam unless told.
FULL_ITERATIONS = 800
# What `jflame-fit --cameras` runs unless told. From the triangulated start the solve settles in
# 2 steps on the FLAME-size scenes with every landmark (2, 3 and 5 read the same, synthetic and
# textured end to end), and each step over 478 points costs what three over a photo's 162 do
# (docs/ACCURACY.md and docs/BENCHMARKS.md, multi-view).
LM_ITERATIONS = 2
# A rig's shape and expression priors against a photo's: the views pin the face down, and the
# photo's priors, set for what one view cannot tell, hold it back (docs/ACCURACY.md, multi-view).
RIG_PRIOR_SCALE = 0.25
# A rig's photometric weight (a photo's: FitConfig.photometric_weight). One photo's render
# cannot tell depth, so there the landmarks hold the geometry and the render mostly fits colour;
# several views' renders pin the surface down, and MediaPipe's view-dependent placement (2-4 px)
# is what limits the landmarks, so the renders get the say (docs/ACCURACY.md, multi-view
# photometric: 3e3, 1e4, 3e4 and 1e5 compared on textured and untextured captures).
RIG_PHOTOMETRIC_WEIGHT = 1e4
# What `jflame-fit --cameras --mode photometric` runs before its renders unless told: Adam's
# pose stage, then the renders in Adam's full stage from the rigid start. Starting the renders
# from the Levenberg-Marquardt's landmark optimum instead leaves the head nearer that optimum's
# bias: 1.52 against 0.94 mm median untextured, 2.65 against 2.12 textured (docs/ACCURACY.md,
# multi-view photometric).
PHOTOMETRIC_LANDMARK_SOLVER = LandmarkSolver.ADAM


def rig_config(config: FitConfig, prior_scale: float = RIG_PRIOR_SCALE,
               every_landmark: bool = True,
               photometric_weight: float = RIG_PHOTOMETRIC_WEIGHT) -> FitConfig:
  """A photo fit's settings `config` as a calibrated rig fits them unless told: every landmark
  of the embedding (MediaPipe's cheek and forehead points, which a photo's fit leaves out, carry
  the face's shape once several views place them; `every_landmark` False keeps the config's
  regions), the shape and expression priors times `prior_scale` and, for photometric mode, the
  rig's `photometric_weight`. (The iteration counts are the command's to set: LM_ITERATIONS,
  FULL_ITERATIONS.)"""
  prior = config.regularization
  if every_landmark:
    config = config.replace(landmark_regions=None)
  return config.replace(photometric_weight=photometric_weight,
                        regularization=dataclasses.replace(
                            prior, shape=prior.shape * prior_scale,
                            expression=prior.expression * prior_scale))


@struct.dataclass
class RigViews:
  """One moment seen by V calibrated cameras (leading axis V; a further leading axis for a batch
  of moments).

  Attributes:
    intrinsics: (V, 3, 3) K in pixels of each view's image.
    world_to_camera: (V, 4, 4).
    distortion: (V, 14) OpenCV coefficients, zero padded.
    landmarks: (V, N, 2) detected landmarks in image pixels, the detector's order (N = 478).
    landmark_weights: (V, N) detection weights (0: missing).
    valid: (V,) the view has a face to fit.
    face_scale: (V,) crop pixels per image pixel (see `rig_views`), so residuals weigh the same
      in every view whatever its resolution.
  """
  intrinsics: jax.Array
  world_to_camera: jax.Array
  distortion: jax.Array
  landmarks: jax.Array
  landmark_weights: jax.Array
  valid: jax.Array
  face_scale: jax.Array


def rig_views(cameras: Sequence[RigCamera], landmarks, landmark_weights, valid,
              config: FitConfig) -> RigViews:
  """RigViews of one moment from its cameras and each view's detections (host side). A view's
  residuals are scaled as the photo fit's crop frames a face (its longest side is
  crop_size / DEFAULT_CROP_SCALE of the crop), so priors weigh against one view's landmarks as
  they do for a photo."""
  from jflame.preprocess.align import DEFAULT_CROP_SCALE  # host only: OpenCV
  landmarks = np.asarray(landmarks, np.float32)
  weights = np.asarray(landmark_weights, np.float32)
  valid = np.asarray(valid, bool)
  scales = []
  for view_landmarks, view_weights in zip(landmarks, weights):
    seen = view_landmarks[view_weights > 0]
    size = float(np.max(np.ptp(seen, axis=0))) if len(seen) >= 2 else 0.0
    scales.append(config.landmark_scale / DEFAULT_CROP_SCALE / size if size > 0 else 0.0)
  return RigViews(
      intrinsics=np.stack([c.intrinsics for c in cameras]).astype(np.float32),
      world_to_camera=np.stack([c.world_to_camera for c in cameras]).astype(np.float32),
      distortion=np.stack([padded_distortion(c) for c in cameras]).astype(np.float32),
      landmarks=landmarks, landmark_weights=weights, valid=valid & (np.asarray(scales) > 0),
      face_scale=np.asarray(scales, np.float32))


@struct.dataclass
class ViewPhotos:
  """Each view's face crop of one moment, for the photometric stage (leading axis V).

  Attributes:
    images: (V, S, S, 3) float32 in [0, 1], the view's image warped into a square crop framing
      the face (as a photo's crop is made).
    face_masks: (V, S, S) float32 in [0, 1], the skin region the render is compared on.
    crop_from_image: (V, 2, 3) the similarity that took the view's image pixels to the crop.
  """
  images: jax.Array
  face_masks: jax.Array
  crop_from_image: jax.Array


@struct.dataclass
class MomentResult:
  """The fit of one moment.

  Attributes:
    params: FLAME parameters (`shape` the run's when given, else this moment's).
    head_rotation: (3,) axis-angle, model -> world.
    head_translation: (3,) metres, world.
    landmarks_2d: (V, K, 2) the fitted landmarks in each view's image pixels.
    landmark_error: (V,) mean distance to the detected landmarks per view, image pixels.
    rigid_loss_history, full_loss_history: (iterations,).
    failed: () a non-finite loss or gradient stopped the fit.
    appearance: photometric mode: the albedo coefficients and SH lighting (world axes, the
      renderer's units).
    photometric_error: photometric mode: (V,) mean absolute colour error of each view's render
      (times its colour gain) over its face mask.
    view_gains: photometric mode: (V, 3) each view's colour gain (`view_gains`).
  """
  params: FlameParams
  head_rotation: jax.Array
  head_translation: jax.Array
  landmarks_2d: jax.Array
  landmark_error: jax.Array
  rigid_loss_history: jax.Array
  full_loss_history: jax.Array
  failed: jax.Array
  appearance: Optional[Appearance] = None
  photometric_error: Optional[jax.Array] = None
  view_gains: Optional[jax.Array] = None


def triangulate(projections, pixels, weights):
  """(3,) the point whose projections through `projections` (V, 3, 4) best meet `pixels`
  (V, 2), weighted by `weights` (V,) (0: that view did not see it): linear (DLT)."""
  rows = jnp.concatenate([pixels[:, 0:1] * projections[:, 2] - projections[:, 0],
                          pixels[:, 1:2] * projections[:, 2] - projections[:, 1]], axis=0)
  rows = rows * jnp.concatenate([weights, weights])[:, None]
  _, _, vh = jnp.linalg.svd(rows, full_matrices=False)
  homogeneous = vh[-1]
  return homogeneous[:3] / jnp.where(jnp.abs(homogeneous[3]) > 1e-12, homogeneous[3], 1e-12)


def rigid_alignment(source, target, weights):
  """(R, t) with R source + t closest to target (weighted least squares, Kabsch): (K, 3)
  points, (K,) weights."""
  total = jnp.maximum(jnp.sum(weights), 1e-9)
  source_mean = jnp.sum(weights[:, None] * source, 0) / total
  target_mean = jnp.sum(weights[:, None] * target, 0) / total
  covariance = ((target - target_mean) * weights[:, None]).T @ (source - source_mean)
  u, _, vt = jnp.linalg.svd(covariance)
  sign = jnp.sign(jnp.linalg.det(u @ vt))
  rotation = u @ jnp.diag(jnp.array([1.0, 1.0, 1.0]).at[2].set(sign)) @ vt
  return rotation, target_mean - rotation @ source_mean


def project_views(views: RigViews, points_world):
  """(V, K, 2) the world points in every view's image (lens distortion applied)."""
  return jax.vmap(project_calibrated, in_axes=(0, 0, 0, None))(
      views.intrinsics, views.world_to_camera, views.distortion, points_world)


def landmark_targets(fit_model: FitModel, views: RigViews):
  """The fitted landmarks of every view: (targets (V, K, 2), weights (V, K), detected (V, K))."""
  landmarks = views.landmarks[:, fit_model.landmark_indices]
  detection = views.landmark_weights[:, fit_model.landmark_indices]
  finite = jnp.all(jnp.isfinite(landmarks), axis=-1)
  landmarks = jnp.where(finite[..., None], landmarks, 0.0)
  detected = finite & (detection > 0) & views.valid[:, None]
  weights = jnp.where(detected, detection * fit_model.landmark_weights, 0.0)
  return landmarks, weights, detected


def render_views(fit_model: FitModel, views: RigViews, photos: ViewPhotos,
                 variables: FitVariables, base_rotation, raster) -> RenderOutput:
  """The head of `variables` (rotation delta composed with `base_rotation`, world translation)
  rendered into every view's crop (leading axis V): projected through the view's calibrated
  camera with its distortion, then the crop's similarity. The normals, and so the lighting,
  are in world axes: one light for all views."""
  vertices, _ = flame_forward(fit_model.mesh, variables.flame)
  rotation = axis_angle_to_matrix(variables.camera_rotation) @ base_rotation
  world = vertices @ rotation.T + variables.camera_translation
  normals = vertex_normals(world, fit_model.mesh.faces)
  appearance = fitted_appearance(variables)
  size = photos.images.shape[-2]

  def view(intrinsics, world_to_camera, distortion, crop_from_image):
    depth = world @ world_to_camera[2, :3] + world_to_camera[2, 3]
    pixels = apply_affine(crop_from_image,
                          project_calibrated(intrinsics, world_to_camera, distortion, world))
    return render_mesh(jnp.concatenate([pixels, depth[:, None]], axis=1), fit_model.mesh.faces,
                       normals, fit_model.albedo, appearance, size, size, raster,
                       fit_model.face_neighbors)

  return jax.vmap(view)(views.intrinsics, views.world_to_camera, views.distortion,
                        photos.crop_from_image)


def view_gains(rendered, images, masks, valid, limit: float = 4.0):
  """(V, 3) the colour gain of each view's camera: per channel, the least-squares factor from
  its render to its crop over its mask, clipped to [1 / limit, limit], then divided by the
  geometric mean over the views with a face, so the gains carry only how the cameras differ
  (exposure, white balance) and the shared albedo and light carry the colour. Held constant for
  the gradient (at the optimum a gain's own derivative is zero). rendered, images: (V, S, S, 3);
  masks: (V, S, S); valid: (V,)."""
  weight = masks[..., None]
  numerator = jnp.sum(weight * rendered * images, axis=(1, 2))
  denominator = jnp.sum(weight * rendered * rendered, axis=(1, 2))
  gains = jnp.where(denominator > 1e-6, numerator / jnp.maximum(denominator, 1e-6), 1.0)
  logs = jnp.log(jnp.clip(gains, 1.0 / limit, limit))
  used = (valid & (jnp.sum(masks, axis=(1, 2)) > 0))[:, None]
  mean = jnp.sum(jnp.where(used, logs, 0.0), axis=0) / jnp.maximum(jnp.sum(used), 1)
  return jax.lax.stop_gradient(jnp.where(used, jnp.exp(logs - mean), 1.0))


def gained_renders(renders: RenderOutput, photos: ViewPhotos, valid):
  """(renders' images times each view's colour gain (V, S, S, 3), the gains (V, 3))."""
  gains = view_gains(renders.image, photos.images, photos.face_masks, valid)
  return renders.image * gains[:, None, None, :], gains


def render_moment(fit_model: FitModel, views: RigViews, photos: ViewPhotos, result: MomentResult,
                  raster) -> RenderOutput:
  """A fitted moment's (photometric mode) render in every view's crop (times the view's colour
  gain), for its pictures."""
  return render_fitted(fit_model, views, photos, result.params, result.head_rotation,
                       result.head_translation, result.appearance, result.view_gains, raster)


@functools.partial(jax.jit, static_argnames=("raster",))
def render_fitted(fit_model: FitModel, views: RigViews, photos: ViewPhotos, params, head_rotation,
                  head_translation, appearance: Appearance, view_gains, raster) -> RenderOutput:
  """One moment's head (FLAME `params`, axis-angle `head_rotation` and `head_translation` model
  -> world, `appearance` in the renderer's units) rendered in every view's crop times its colour
  gain (V, 3)."""
  variables = FitVariables(flame=params, camera_rotation=jnp.zeros(3, jnp.float32),
                           camera_translation=head_translation, focal_length=jnp.ones(()),
                           appearance=appearance_variables(appearance))
  renders = render_views(fit_model, views, photos, variables, axis_angle_to_matrix(head_rotation),
                         raster)
  return renders.replace(image=renders.image * view_gains[:, None, None, :])


def views_appearance(fit_model: FitModel, views: RigViews, photos: ViewPhotos) -> Appearance:
  """The photometric stage's start: the mean albedo under ambient light of the views' mean
  colour over their face masks (in the fit's lighting units, as `fit.initial_appearance`)."""
  size = photos.images.shape[-2]
  masks = photos.face_masks * views.valid[:, None, None]
  return initial_appearance(fit_model.albedo, photos.images.reshape(-1, size, 3),
                            masks.reshape(-1, size))


def fit_moment(fit_model: FitModel, views: RigViews, config: FitConfig, shape=None,
               photos: Optional[ViewPhotos] = None) -> MomentResult:
  """Fits ONE moment of a calibrated rig (vmap for several). `shape` (S,): the run's identity,
  held fixed; None fits this moment's own. `photos`: each view's face crop, required in
  photometric mode (and only used there)."""
  photometric = config.photometric
  if photometric and photos is None:
    raise ValueError("a photometric fit of a rig needs each view's face crop (photos)")
  landmarks, weights, detected = landmark_targets(fit_model, views)
  rows = fit_model.landmark_rows
  zeros = FlameParams.zeros(config.num_shape, config.num_expression)
  if shape is not None:
    zeros = zeros.replace(shape=jnp.asarray(shape, jnp.float32))
  neutral, _ = surface_points_forward(rows, zeros)
  projections = views.intrinsics @ views.world_to_camera[:, :3, :]
  seen = detected.astype(jnp.float32)
  world = jax.vmap(triangulate, in_axes=(None, 1, 1))(projections, landmarks, seen)
  usable = (jnp.sum(seen, axis=0) >= 2) & jnp.all(jnp.isfinite(world), axis=-1)
  base_rotation, translation = rigid_alignment(neutral, jnp.where(usable[:, None], world, 0.0),
                                               usable.astype(jnp.float32))
  variables = FitVariables(flame=zeros, camera_rotation=jnp.zeros(3),
                           camera_translation=translation, focal_length=jnp.ones(()))
  scale = views.face_scale[:, None, None]

  def predicted(variables):
    points, _ = surface_points_forward(rows, variables.flame)
    rotation = axis_angle_to_matrix(variables.camera_rotation) @ base_rotation
    return project_views(views, points @ rotation.T + variables.camera_translation)

  def data_loss(variables):
    per_view = jax.vmap(losses.landmark_loss, in_axes=(0, 0, 0, None, None, None))(
        predicted(variables) * scale, landmarks * scale, weights, config.landmark_scale,
        config.landmark_scale, config.landmark_robust_scale)
    return jnp.sum(jnp.where(views.valid, per_view, 0.0))

  def photometric_loss(variables):
    renders = render_views(fit_model, views, photos, variables, base_rotation, config.raster)
    images, _ = gained_renders(renders, photos, views.valid)
    per_view = jax.vmap(losses.photometric_loss, in_axes=(0, 0, 0, None))(
        images, photos.images, photos.face_masks, config.photometric_robust_scale)
    return jnp.sum(jnp.where(views.valid, per_view, 0.0))

  def full_loss(variables):
    loss = data_loss(variables) + regularization(variables.flame, config)
    if photometric:
      loss = (loss + config.photometric_weight * photometric_loss(variables)
              + losses.l2(variables.appearance.texture, config.regularization.texture))
    return loss

  active = jnp.sum(views.valid) >= 1
  shape_held = shape is not None or not config.fit_shape
  full_rates = config.full_rates
  if shape_held:
    full_rates = dataclasses.replace(full_rates, shape=None)
  full_iterations = config.full_iterations
  if config.landmark_solver == LandmarkSolver.LM:
    # One solve replaces the landmark stages; photometric mode goes on with its Adam stage.
    x = solve.pack(variables.flame, variables.camera_rotation, variables.camera_translation)
    free = jnp.ones(x.shape, bool).at[:rows.num_shape].set(not shape_held)
    x, info = solve.levenberg_marquardt(
        functools.partial(views_system, rows, views, landmarks, weights, config,
                          variables.flame, base_rotation),
        x, free, config.lm_iterations, active)
    flame, rotation, translation = solve.unpack(x, variables.flame)
    variables = variables.replace(flame=flame, camera_rotation=rotation,
                                  camera_translation=translation)
    rigid_history, rigid_failed = info.cost_history, info.failed
    full_iterations = full_iterations if photometric else 0
  else:
    variables, rigid_history, rigid_failed = run_stage(
        data_loss, variables, config.rigid_rates, config.rigid_iterations, active)
  if photometric:
    variables = variables.replace(appearance=views_appearance(fit_model, views, photos))
  variables, full_history, full_failed = run_stage(
      full_loss, variables, full_rates, full_iterations, active & ~rigid_failed)
  fitted = predicted(variables)
  errors = jax.vmap(losses.landmark_error)(fitted, landmarks, detected)
  rotation = axis_angle_to_matrix(variables.camera_rotation) @ base_rotation
  extra = {}
  if photometric:
    renders = render_views(fit_model, views, photos, variables, base_rotation, config.raster)
    images, gains = gained_renders(renders, photos, views.valid)
    extra = dict(appearance=fitted_appearance(variables), view_gains=gains,
                 photometric_error=jax.vmap(losses.masked_mean_abs)(
                     images, photos.images, photos.face_masks))
  return MomentResult(params=variables.flame, head_rotation=matrix_to_axis_angle(rotation),
                      head_translation=variables.camera_translation, landmarks_2d=fitted,
                      landmark_error=errors, rigid_loss_history=rigid_history,
                      full_loss_history=full_history, failed=rigid_failed | full_failed,
                      **extra)


def _view_problem(config: FitConfig, prior):
  """A view's `solve.LandmarkProblem` without its weights: the robust scale, and no prior (the
  priors are counted once per moment, not per view)."""
  return solve.LandmarkProblem(
      targets=None, weights=None, base_rotation=None, principal_point=None, pixel_scale=None,
      robust_scale=jnp.asarray(config.landmark_robust_scale, jnp.float32),
      prior=jnp.zeros_like(prior), free=None)


def views_cost(rows, views: RigViews, landmarks, weights, config: FitConfig, params,
               base_rotation, x):
  """The cost of `views_system` at x without its system (no Jacobian): what a trial step
  needs."""
  n = rows.num_shape + rows.num_expression
  points = solve.model_points(rows, params, x)
  rotation = axis_angle_to_matrix(x[n + 9:n + 12]) @ base_rotation
  residuals = (project_views(views, points @ rotation.T + x[n + 12:]) - landmarks) * (
      views.face_scale[:, None, None])
  prior = solve.landmark_priors(rows.num_shape, rows.num_expression, config.regularization)
  unweighted = _view_problem(config, prior)
  costs = jax.vmap(lambda residual, view_weights: solve.objective(
      unweighted.replace(weights=view_weights), residual, x))(residuals, weights)
  return jnp.sum(costs) + jnp.sum(prior * x * x)


def views_system(rows, views: RigViews, landmarks, weights, config: FitConfig, params,
                  base_rotation, x):
  """The landmark objective of `fit_moment` over all views at x (see `solve.pack`; its camera
  part is the head's rotation delta and world translation): (cost, (A, b), finite) as
  `solve.evaluate` gives for a photo, each view's residuals in its face-scaled pixels and the
  priors counted once.

  Every view sees the same world points, so a view's Jacobian is its projection's (2 x 3 per
  point) times the points' own (3 x N, shared). The views' IRLS-weighted 2 x 3 blocks are summed
  into one 3 x 3 matrix per point before the one N x N product over the points: A costs what one
  view's would (with 3 rows per point) however many views there are."""
  n = rows.num_shape + rows.num_expression
  points, d_model = solve.model_points_and_jacobian(rows, params, x)
  delta, translation = x[n + 9:n + 12], x[n + 12:]
  rotate = lambda d: points @ (axis_angle_to_matrix(d) @ base_rotation).T
  rotation = axis_angle_to_matrix(delta) @ base_rotation
  d_rotation = jax.jacfwd(rotate)(delta)                                      # (K, 3, 3)
  world = rotate(delta) + translation
  d_world = jnp.concatenate([                                                 # (K, 3, N)
      solve.chain_points(jnp.broadcast_to(rotation, (points.shape[0], 3, 3)), d_model),
      d_rotation, jnp.broadcast_to(jnp.eye(3), (points.shape[0], 3, 3))], axis=-1)
  prior = solve.landmark_priors(rows.num_shape, rows.num_expression, config.regularization)
  unweighted = _view_problem(config, prior)

  def view(intrinsics, world_to_camera, distortion, targets, view_weights, scale):
    """This view's cost and, per point, its weighted J^T J block (3, 3) and J^T r (3,)."""
    project = lambda p: project_calibrated(intrinsics, world_to_camera, distortion, p[None])[0]
    pixels = jax.vmap(project)(world)
    d_pixel = jax.vmap(jax.jacfwd(project))(world) * scale                  # (K, 2, 3)
    residual = (pixels - targets) * scale
    problem = unweighted.replace(weights=view_weights)
    row_weight = solve.irls_weights(problem, residual)                        # (K,)
    # Written out over the two pixel rows (as solve.chain_points, for the same reason).
    block = sum(d_pixel[:, r, :, None] * d_pixel[:, r, None, :] for r in range(2))
    gradient = sum(d_pixel[:, r, :] * residual[:, r, None] for r in range(2))
    return (solve.objective(problem, residual, x), block * row_weight[:, None, None],
            gradient * row_weight[:, None])

  costs, blocks, gradients = jax.vmap(view)(views.intrinsics, views.world_to_camera,
                                            views.distortion, landmarks, weights,
                                            views.face_scale)
  block, gradient = jnp.sum(blocks, axis=0), jnp.sum(gradients, axis=0)      # (K, 3, 3), (K, 3)
  weighted = solve.chain_points(block, d_world)                               # (K, 3, N)
  flat = d_world.shape[-1]
  cost = jnp.sum(costs) + jnp.sum(prior * x * x)
  a = d_world.reshape(-1, flat).T @ weighted.reshape(-1, flat)
  a = 0.5 * (a + a.T) + jnp.diag(prior)   # J^T (M J) is symmetric only up to rounding
  b = d_world.reshape(-1, flat).T @ gradient.reshape(-1) + prior * x
  return cost, (a, b), jnp.isfinite(cost) & jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))


@functools.partial(jax.jit, static_argnames=("config",))
def fit_moments(fit_model: FitModel, views: RigViews, config: FitConfig, shape=None,
                photos: Optional[ViewPhotos] = None) -> MomentResult:
  """`fit_moment` over a batch of moments (leading axis M on every leaf of `views`, and of
  `photos` in photometric mode), one compiled program."""
  return jax.vmap(fit_moment, in_axes=(None, 0, None, None, 0))(fit_model, views, config, shape,
                                                                 photos)


def disagreeing_views(relative_errors, ratio: float = 3.0, floor: float = 0.02):
  """Indices of the views whose landmark error (over the face size) is above `floor` and
  `ratio` times the median of the other views': a wrong camera (calibration, a swapped serial,
  another convention) shows as one view that cannot agree with the rest."""
  errors = np.asarray(relative_errors, np.float64)
  flagged = []
  for view, error in enumerate(errors):
    others = np.delete(errors, view)
    others = others[np.isfinite(others)]
    if len(others) and np.isfinite(error) and error > floor and error > ratio * np.median(
        others):
      flagged.append(view)
  return flagged
