"""Two-stage FLAME fitting of a batch of images in one compiled program.

Stage 1 moves only the rigid camera; stage 2 moves shape, expression, jaw, eyes (and, in
photometric mode, texture and lighting) with per-group learning rates. Each stage is one
`lax.scan` over iterations; the whole fit of ONE image is written here and `jax.vmap` batches
it, so images never interact: one that diverges is marked failed and stops moving, and its
neighbours are computed exactly as if it were not there.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jflame import losses, solve
from jflame.camera import Camera, focal_length_from_fov, pinhole, project
from jflame.config import FitConfig, LandmarkSolver, LearningRates
from jflame.errors import ConfigError
from jflame.flame import (FlameModel, FlameParams, SurfaceRows, flame_forward, make_surface_rows,
                          surface_points_forward, vertices_of_batch)
from jflame.starting_point import InitialGuess, initial_identity_and_camera
from jflame.render import (NEUTRAL_AMBIENT, AlbedoModel, Appearance, RasterSettings, RenderOutput,
                           face_adjacency, laplacian_albedo_model, render_mesh, vertex_normals)
from jflame.observation import Observation
from jflame.optim import make_optimizer
from jflame.rotation import axis_angle_to_matrix, matrix_to_axis_angle


@struct.dataclass
class FitModel:
  """The device-side model a fit needs, prepared once on the host by `make_fit_model`.

  Attributes:
    landmark_rows: the FLAME rows under the embedded landmarks (fast path).
    landmark_indices: (K,) detector (MediaPipe) landmark index of each embedded point.
    landmark_weights: (K,) region weight of each embedded point.
    mesh: photometric mode only: the full model, its bases cut to the fitted coefficients.
    albedo: photometric mode only: the albedo model (UV texture space or per-vertex basis).
    face_neighbors: photometric mode only: `face_adjacency` of the mesh (silhouette edges).
  """
  landmark_rows: SurfaceRows
  landmark_indices: jax.Array
  landmark_weights: jax.Array
  mesh: Optional[FlameModel] = None
  albedo: Optional[AlbedoModel] = None
  face_neighbors: Optional[jax.Array] = None


def make_fit_model(model: FlameModel, face_indices, barycentrics, landmark_indices,
                   landmark_weights, config: FitConfig,
                   albedo: Optional[AlbedoModel] = None) -> FitModel:
  """Host-side preparation: gathers and precomposes the landmark rows for the config's
  coefficient counts; in photometric mode also the full mesh and an albedo model (the built-in
  Laplacian basis when none is given)."""
  for field, available in (("num_shape", model.num_shape),
                           ("num_expression", model.num_expression)):
    if getattr(config, field) > available:
      raise ConfigError(f"FitConfig.{field} is {getattr(config, field)} but the model "
                        f"({model.name}) has {available} such components; use at most "
                        f"{available}.")
  rows = make_surface_rows(model, face_indices, barycentrics, config.num_shape,
                           config.num_expression)
  fit_model = FitModel(landmark_rows=rows,
                       landmark_indices=jnp.asarray(landmark_indices, jnp.int32),
                       landmark_weights=jnp.asarray(landmark_weights, jnp.float32))
  if not config.photometric:
    return fit_model
  if albedo is None:
    albedo = laplacian_albedo_model(model.v_template, model.faces, config.albedo_per_channel)
  mesh = model.replace(shapedirs=model.shapedirs[..., :config.num_shape],
                       exprdirs=model.exprdirs[..., :config.num_expression])
  return fit_model.replace(mesh=mesh, albedo=albedo,
                           face_neighbors=jnp.asarray(face_adjacency(np.asarray(model.faces))))


@struct.dataclass
class FitVariables:
  """What the optimiser moves for one image.

  The camera rotation is a small axis-angle applied on the left of a fixed base rotation (set by
  the initialiser), so optimisation always happens near zero, far from the pi singularity of
  axis-angle that a camera facing the face sits at. `appearance` exists in photometric mode.
  """
  flame: FlameParams
  camera_rotation: jax.Array     # (3,) delta, radians
  camera_translation: jax.Array  # (3,) metres
  focal_length: jax.Array        # () pixels
  appearance: Optional[Appearance] = None


def group_labels(variables: FitVariables) -> FitVariables:
  """The optimiser group of every leaf (same structure as the variables)."""
  flame_labels = FlameParams(shape="shape", expression="expression",
                             global_rotation="global_rotation", neck_rotation="neck",
                             jaw_rotation="jaw", left_eye_rotation="eyes",
                             right_eye_rotation="eyes")
  appearance = None
  if variables.appearance is not None:
    appearance = Appearance(texture="texture", lighting="lighting")
  return FitVariables(flame=flame_labels, camera_rotation="camera_rotation",
                      camera_translation="camera_translation", focal_length="focal_length",
                      appearance=appearance)


@struct.dataclass
class FitResult:
  """The outcome for one image (a leading batch axis for a batch).

  Attributes:
    params: fitted FLAME parameters.
    camera: fitted camera in crop pixels (see jflame.camera).
    landmarks_2d: (K, 2) fitted landmarks projected into the crop.
    landmark_error: () mean distance to the detected landmarks in crop pixels
      (`losses.landmark_error`: every detected landmark counts the same).
    rigid_loss_history, full_loss_history: (iterations,) loss per step of each stage.
    failed: () True when the loss or a gradient became non-finite (the variables are the last
      finite ones).
    fitted: () True for a valid observation that did not fail.
    appearance: photometric mode: fitted albedo coefficients and SH lighting (camera space).
    photometric_error: photometric mode: () mean absolute colour error over the face mask.
  """
  params: FlameParams
  camera: Camera
  landmarks_2d: jax.Array
  landmark_error: jax.Array
  rigid_loss_history: jax.Array
  full_loss_history: jax.Array
  failed: jax.Array
  fitted: jax.Array
  appearance: Optional[Appearance] = None
  photometric_error: Optional[jax.Array] = None


def fitted_camera(variables: FitVariables, base_rotation, principal_point) -> Camera:
  """The one-image variables' camera (delta rotation composed with its base) as a Camera."""
  rotation = axis_angle_to_matrix(variables.camera_rotation) @ base_rotation
  return Camera(rotation=matrix_to_axis_angle(rotation),
                translation=variables.camera_translation,
                focal_length=variables.focal_length, principal_point=principal_point)


def _to_camera(variables: FitVariables, base_rotation, points):
  rotation = axis_angle_to_matrix(variables.camera_rotation) @ base_rotation
  return points @ rotation.T + variables.camera_translation


def _pixels(variables: FitVariables, principal_point, points_cam):
  return pinhole(points_cam, variables.focal_length, principal_point)


def project_landmarks(fit_model: FitModel, variables, base_rotation, principal_point):
  """(K, 2) crop pixels of the embedded landmarks for one image's variables (fast path)."""
  points, _ = surface_points_forward(fit_model.landmark_rows, variables.flame)
  return _pixels(variables, principal_point, _to_camera(variables, base_rotation, points))


# The fit moves SH lighting in units of the neutral ambient coefficient (1 = shading of 1 from
# every direction), so the seed table's rate of 0.005 per step means the same for lighting as
# for the other groups whatever the SH normalisation.
_LIGHT_UNIT = NEUTRAL_AMBIENT


def fitted_appearance(variables: FitVariables) -> Appearance:
  """The appearance in the renderer's units (lighting as SH coefficients)."""
  appearance = variables.appearance
  return appearance.replace(lighting=appearance.lighting * _LIGHT_UNIT)


def render_fit(fit_model: FitModel, variables: FitVariables, base_rotation, principal_point,
               size: int, raster: RasterSettings) -> RenderOutput:
  """The shaded render of one image's current fit at `size` x `size` crop pixels."""
  vertices, _ = flame_forward(fit_model.mesh, variables.flame)
  vertices_cam = _to_camera(variables, base_rotation, vertices)
  screen = jnp.concatenate([_pixels(variables, principal_point, vertices_cam),
                            vertices_cam[:, 2:3]], axis=1)
  normals = vertex_normals(vertices_cam, fit_model.mesh.faces)
  return render_mesh(screen, fit_model.mesh.faces, normals, fit_model.albedo,
                     fitted_appearance(variables), size, size, raster, fit_model.face_neighbors)


def appearance_variables(appearance: Appearance) -> Appearance:
  """A fitted appearance (the renderer's units) back in the fit's (`fitted_appearance`
  undone)."""
  return appearance.replace(lighting=appearance.lighting / _LIGHT_UNIT)


def render_result(fit_model: FitModel, result: FitResult, size: int,
                  raster: RasterSettings) -> RenderOutput:
  """The shaded render of one fitted image (photometric mode), e.g. for output pictures."""
  variables = FitVariables(flame=result.params, camera_rotation=jnp.zeros(3, jnp.float32),
                           camera_translation=result.camera.translation,
                           focal_length=result.camera.focal_length,
                           appearance=appearance_variables(result.appearance))
  return render_fit(fit_model, variables, axis_angle_to_matrix(result.camera.rotation),
                    result.camera.principal_point, size, raster)


def initial_appearance(albedo: AlbedoModel, image, mask) -> Appearance:
  """Mean albedo under ambient light whose colour matches the photo's mean over the face mask,
  so the photometric stage starts from the right brightness and white balance (lighting in the
  fit's units, see `_LIGHT_UNIT`)."""
  weight = mask[..., None]
  photo_mean = jnp.sum(weight * image, axis=(0, 1)) / jnp.maximum(jnp.sum(weight), 1.0)
  albedo_mean = jnp.maximum(jnp.mean(albedo.mean, axis=0), 1e-3)
  neutral = Appearance.neutral(albedo.num_coefficients)
  gain = jnp.where(jnp.sum(mask) > 0, photo_mean / albedo_mean, 1.0)
  return neutral.replace(lighting=neutral.lighting * gain[None, :] / _LIGHT_UNIT)


def regularization(flame_params: FlameParams, config: FitConfig):
  """The L2 priors of one face's coefficients (config.regularization weights)."""
  weights = config.regularization
  return (losses.l2(flame_params.shape, weights.shape)
          + losses.l2(flame_params.expression, weights.expression)
          + losses.l2(flame_params.jaw_rotation, weights.jaw)
          + losses.l2(flame_params.left_eye_rotation, weights.eyes)
          + losses.l2(flame_params.right_eye_rotation, weights.eyes))


def _all_finite(tree):
  leaves = jax.tree.leaves(tree)
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves],
                          jnp.asarray(True))


def _tree_where(condition, new, old):
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def run_stage(loss_fn, variables, rates: LearningRates, iterations: int, active):
  """Adam with per-group rates for `iterations` steps of one compiled scan.

  A step whose loss or gradient is not finite is discarded, and the image stops moving for the
  rest of the fit; `active` False (padding, failed preprocessing) also holds it still.

  Returns:
    (variables, loss history (iterations,), failed flag).
  """
  if iterations == 0:
    # Nothing to run; not tracing the step keeps a landmark fit's trace a quarter shorter.
    return variables, jnp.zeros((0,), jnp.float32), jnp.asarray(False)
  optimizer = make_optimizer(rates, group_labels(variables), iterations)

  def step(carry, _):
    variables, opt_state, failed = carry
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, new_opt_state = optimizer.update(grads, opt_state, variables)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep = finite & ~failed & active
    variables = _tree_where(keep, optax.apply_updates(variables, updates), variables)
    opt_state = _tree_where(keep, new_opt_state, opt_state)
    return (variables, opt_state, failed | (active & ~finite)), loss

  carry = solve.like_the_steps(active, (variables, optimizer.init(variables), jnp.asarray(False)))
  (variables, _, failed), history = jax.lax.scan(step, carry, None, length=iterations)
  return variables, history, failed


# How strongly the closed-form start holds a given shape (relative to the data term): enough to
# keep it to a fraction of a standard deviation, while the solve stays well conditioned.
_GIVEN_SHAPE_PRIOR = 1e3


def initial_variables(fit_model: FitModel, landmarks, weights, crop_size, config: FitConfig,
                      guess: Optional[InitialGuess] = None, focal_length=None):
  """Start for one image from its landmarks: a closed-form camera alternated with a
  regularised linear solve for shape and expression (see jflame.starting_point).

  A `guess` (one image's slice of an InitialGuess) supplies a shape that is kept, an expression
  that the solve starts from as its prior mean, and a jaw rotation. `focal_length` (crop
  pixels) replaces the config's field-of-view focal. Returns (variables, base rotation,
  principal point).
  """
  rows = fit_model.landmark_rows
  focal = jnp.asarray(focal_length_from_fov(crop_size, config.fov_degrees), jnp.float32)
  if focal_length is not None:
    focal = jnp.asarray(focal_length, jnp.float32)
  principal_point = jnp.full((2,), crop_size / 2.0, jnp.float32)
  shape_prior = jnp.full(rows.num_shape, config.regularization.shape, jnp.float32)
  shape_mean = jnp.zeros(rows.num_shape, jnp.float32)
  expression_mean = jnp.zeros(rows.num_expression, jnp.float32)
  jaw = jnp.zeros(3, jnp.float32)
  if guess is not None:
    if guess.shape is not None:
      shape_mean = jnp.where(guess.estimated, guess.shape, shape_mean)
      shape_prior = jnp.where(guess.estimated, _GIVEN_SHAPE_PRIOR, shape_prior)
    if guess.expression is not None:
      expression_mean = jnp.where(guess.estimated, guess.expression, expression_mean)
    if guess.jaw_rotation is not None:
      jaw = jnp.where(guess.estimated, guess.jaw_rotation, jaw)
  prior_weights = jnp.concatenate(
      [shape_prior, jnp.full(rows.num_expression, config.regularization.expression, jnp.float32)])
  coefficients, rotation, translation = initial_identity_and_camera(
      rows, landmarks, weights, focal, principal_point, config.landmark_scale / crop_size,
      prior_weights, jnp.concatenate([shape_mean, expression_mean]), rounds=config.init_rounds,
      num_solved=(config.init_num_shape, config.init_num_expression))
  shape = coefficients[:rows.num_shape]
  if guess is not None and guess.shape is not None:
    shape = jnp.where(guess.estimated, guess.shape, shape)  # kept exactly, not just nearly
  params = FlameParams.zeros(config.num_shape, config.num_expression)
  params = params.replace(shape=shape,
                          expression=coefficients[rows.num_shape:], jaw_rotation=jaw)
  variables = FitVariables(flame=params, camera_rotation=jnp.zeros(3, jnp.float32),
                           camera_translation=translation, focal_length=focal)
  return variables, rotation, principal_point


def landmark_targets(fit_model: FitModel, observation: Observation):
  """Detected landmarks in the embedding's order, their fitting weights (detection times
  region weight), which of them were detected, and whether the image has enough of them to
  fit. A non-finite detection is a missing landmark, not a lost image."""
  landmarks = observation.landmarks[fit_model.landmark_indices]
  detection_weights = observation.landmark_weights[fit_model.landmark_indices]
  weights = detection_weights * fit_model.landmark_weights * observation.valid
  finite = jnp.all(jnp.isfinite(landmarks), axis=-1) & jnp.isfinite(weights)
  landmarks = jnp.where(finite[:, None], landmarks, 0.0)
  weights = jnp.where(finite, weights, 0.0)
  is_detected = finite & (detection_weights > 0) & observation.valid
  return landmarks, weights, is_detected, observation.valid & (jnp.sum(weights > 0) >= 6)


def _finite_start(variables: FitVariables, base_rotation, config: FitConfig):
  """Degenerate landmarks (e.g. absurdly large coordinates) can defeat the closed-form start;
  such an image keeps a finite rest pose. Returns (variables, base rotation, ok)."""
  ok = _all_finite((variables, base_rotation))
  fallback = FitVariables(
      flame=FlameParams.zeros(config.num_shape, config.num_expression),
      camera_rotation=jnp.zeros(3, jnp.float32),
      camera_translation=jnp.asarray([0.0, 0.0, 1.0], jnp.float32),
      focal_length=jnp.where(jnp.isfinite(variables.focal_length), variables.focal_length, 1.0))
  return (_tree_where(ok, variables, fallback),
          jnp.where(ok, base_rotation, jnp.eye(3, dtype=jnp.float32)), ok)


def _photometric_start(fit_model: FitModel, observation: Observation,
                       guess: Optional[InitialGuess]) -> Appearance:
  """Lighting matched to the photo's mean colour over the mean albedo, unless the fit uses a
  texture space and an encoder estimated texture and lighting: then the encoder's pair (DECA
  estimates its light together with its texture, so the light only fits that albedo)."""
  appearance = initial_appearance(fit_model.albedo, observation.image, observation.face_mask)
  if guess is None or not fit_model.albedo.is_texture:
    return appearance
  if guess.texture is not None:
    count = fit_model.albedo.num_coefficients
    texture = jnp.pad(guess.texture[:count], (0, max(0, count - guess.texture.shape[0])))
    appearance = appearance.replace(
        texture=jnp.where(guess.estimated, texture, appearance.texture))
  if guess.lighting is not None:
    appearance = appearance.replace(lighting=jnp.where(
        guess.estimated, guess.lighting / _LIGHT_UNIT, appearance.lighting))
  return appearance


def _landmark_start(fit_model: FitModel, observation: Observation, config: FitConfig,
                    guess: Optional[InitialGuess], focal_length=None):
  """Targets and finite start of one image: (landmarks, weights, is_detected, active,
  init_failed, variables, base rotation, principal point)."""
  landmarks, weights, is_detected, active = landmark_targets(fit_model, observation)
  variables, base_rotation, principal_point = initial_variables(
      fit_model, landmarks, weights, observation.crop_size, config, guess, focal_length)
  variables, base_rotation, start_ok = _finite_start(variables, base_rotation, config)
  return (landmarks, weights, is_detected, active & start_ok, active & ~start_ok, variables,
          base_rotation, principal_point)


def landmark_problem(fit_model: FitModel, landmarks, weights, crop_size, config: FitConfig,
                     base_rotation, principal_point) -> solve.LandmarkProblem:
  """The landmark stage's objective for one image as a least-squares problem (the same
  terms as the Adam stage: landmark_loss + the L2 regularisers)."""
  rows = fit_model.landmark_rows
  free = jnp.ones(rows.num_shape + rows.num_expression + solve.NUM_POSE_UNKNOWNS, bool)
  if not config.fit_shape:
    free = free.at[:rows.num_shape].set(False)
  return solve.LandmarkProblem(
      targets=landmarks, weights=weights, base_rotation=base_rotation,
      principal_point=principal_point,
      pixel_scale=jnp.asarray(config.landmark_scale / crop_size, jnp.float32),
      robust_scale=jnp.asarray(config.landmark_robust_scale, jnp.float32),
      prior=solve.landmark_priors(rows.num_shape, rows.num_expression, config.regularization),
      free=free)


def _lm_stage(fit_model: FitModel, variables: FitVariables, problem: solve.LandmarkProblem,
              config: FitConfig, active):
  """The landmark stage by Levenberg-Marquardt: (variables, cost history, failed)."""
  x = solve.pack(variables.flame, variables.camera_rotation, variables.camera_translation)
  x, info = solve.solve_landmarks(fit_model.landmark_rows, problem, variables.flame, x,
                                  jnp.log(variables.focal_length), config.lm_iterations, active)
  params, rotation, translation = solve.unpack(x, variables.flame)
  return (variables.replace(flame=params, camera_rotation=rotation,
                            camera_translation=translation), info.cost_history, info.failed)


def shared_focal_length(fit_model: FitModel, observations: Observation, config: FitConfig,
                        guess: Optional[InitialGuess] = None):
  """One focal length (crop pixels, ()) for a batch of images known to share one camera,
  solved jointly with every image's unknowns from the fov_degrees start
  (jflame.solve.solve_shared_focal). Images must share the crop size; invalid ones are left
  out. Returns (focal length, (B,) images that took part)."""
  def start(observation, one_guess):
    (landmarks, weights, _, active, _, variables, base_rotation,
     principal_point) = _landmark_start(fit_model, observation, config, one_guess)
    problem = landmark_problem(fit_model, landmarks, weights, observation.crop_size, config,
                               base_rotation, principal_point)
    x = solve.pack(variables.flame, variables.camera_rotation, variables.camera_translation)
    return problem, variables.flame, x, active, variables.focal_length

  problems, params, x, active, focals = jax.vmap(start)(observations, guess)
  _, log_focal, _, members = solve.solve_shared_focal(
      fit_model.landmark_rows, problems, params, x, jnp.log(focals[0]),
      config.shared_focal_iterations, active)
  return jnp.exp(log_focal), members


def fit_one(fit_model: FitModel, observation: Observation, config: FitConfig,
            guess: Optional[InitialGuess] = None, focal_length=None):
  """Fits ONE image (vmap for a batch). `guess` holds this image's initialiser estimates; a
  given shape is kept as the start (and held fixed when config.fit_shape is False).
  `focal_length` (crop pixels) replaces the config's field-of-view focal."""
  crop_size = observation.crop_size
  (landmarks, weights, is_detected, active, init_failed, variables, base_rotation,
   principal_point) = _landmark_start(fit_model, observation, config, guess, focal_length)

  def data_loss(variables):
    predicted = project_landmarks(fit_model, variables, base_rotation, principal_point)
    return losses.landmark_loss(predicted, landmarks, weights, crop_size, config.landmark_scale,
                                config.landmark_robust_scale)

  photometric = config.photometric

  def photometric_loss(variables):
    rendered = render_fit(fit_model, variables, base_rotation, principal_point, crop_size,
                          config.raster)
    return losses.photometric_loss(rendered.image, observation.image, observation.face_mask,
                                   config.photometric_robust_scale)

  def full_loss(variables):
    loss = data_loss(variables) + regularization(variables.flame, config)
    if photometric:
      loss = (loss + config.photometric_weight * photometric_loss(variables)
              + losses.l2(variables.appearance.texture, config.regularization.texture))
    return loss

  full_rates = config.full_rates
  if not config.fit_shape:
    full_rates = dataclasses.replace(full_rates, shape=None)
  full_iterations = config.full_iterations
  if config.landmark_solver == LandmarkSolver.LM:
    # One solve replaces the landmark stages; photometric mode goes on with its Adam stage.
    problem = landmark_problem(fit_model, landmarks, weights, crop_size, config, base_rotation,
                               principal_point)
    if guess is not None and guess.shape is not None:
      # An encoder's shape (MICA, the identity specialist) is kept as given: the solve would
      # otherwise trade it for whatever one view's landmarks prefer within a few steps.
      num_shape = fit_model.landmark_rows.num_shape
      problem = problem.replace(free=problem.free.at[:num_shape].set(
          problem.free[:num_shape] & ~guess.estimated))
    variables, rigid_history, rigid_failed = _lm_stage(fit_model, variables, problem, config,
                                                       active)
    full_iterations = full_iterations if photometric else 0
  else:
    variables, rigid_history, rigid_failed = run_stage(
        data_loss, variables, config.rigid_rates, config.rigid_iterations, active)
  if photometric:
    variables = variables.replace(appearance=_photometric_start(fit_model, observation, guess))
  variables, full_history, full_failed = run_stage(
      full_loss, variables, full_rates, full_iterations, active & ~rigid_failed)
  predicted = project_landmarks(fit_model, variables, base_rotation, principal_point)
  failed = init_failed | rigid_failed | full_failed
  extra = {}
  if photometric:
    rendered = render_fit(fit_model, variables, base_rotation, principal_point, crop_size,
                          config.raster)
    extra = dict(appearance=fitted_appearance(variables),
                 photometric_error=losses.masked_mean_abs(rendered.image, observation.image,
                                                          observation.face_mask))
  return FitResult(params=variables.flame,
                   camera=fitted_camera(variables, base_rotation, principal_point),
                   landmarks_2d=predicted,
                   landmark_error=losses.landmark_error(predicted, landmarks, is_detected),
                   rigid_loss_history=rigid_history, full_loss_history=full_history,
                   failed=failed, fitted=active & ~failed, **extra)


def _chunked_vmap(function, inputs, chunk: int, batch: int):
  """vmap over chunks of `chunk` images run one after another (`lax.map(batch_size=...)`
  without its reshape(-1), which fails on zero-size outputs such as an empty loss history)."""
  full = batch - batch % chunk
  head = jax.tree.map(lambda x: x[:full].reshape((full // chunk, chunk) + x.shape[1:]), inputs)
  out = jax.lax.map(jax.vmap(function), head)
  out = jax.tree.map(lambda y: y.reshape((full,) + y.shape[2:]), out)
  if full == batch:
    return out
  tail = jax.vmap(function)(jax.tree.map(lambda x: x[full:], inputs))
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)


@functools.partial(jax.jit, static_argnames=("config",))
def fit_batch(fit_model: FitModel, observations: Observation, config: FitConfig,
              guess: Optional[InitialGuess] = None):
  """Fits a batch of observations (leading axis B on every array) in one compiled program.

  `guess`, optional, holds initialiser estimates per slot (see jflame.starting_point.InitialGuess).
  Images are vmapped, in chunks of `config.vmap_chunk` (or, for the "lm" solver,
  `config.lm_vmap_chunk`) run one after another when it is set (the results are the same
  either way). The program is compiled once per (batch size, crop
  size, config, model sizes, which guess fields are present); new values never recompile.
  """
  focal_length = None
  if config.shared_focal:
    focal_length, _ = shared_focal_length(fit_model, observations, config, guess)

  def fit_slot(inputs):
    observation, one_guess = inputs
    return fit_one(fit_model, observation, config, one_guess, focal_length)

  batch = observations.valid.shape[0]
  chunk = config.vmap_chunk
  if not chunk and config.landmark_solver == LandmarkSolver.LM:
    chunk = config.lm_vmap_chunk
  if not chunk or chunk >= batch:
    return jax.vmap(fit_slot)((observations, guess))
  return _chunked_vmap(fit_slot, (observations, guess), chunk, batch)


@struct.dataclass
class FittedMeshes:
  """What the writers need of a batch of fits beyond the FitResult (leading axis B).

  Attributes:
    vertices: (B, V, 3) fitted meshes in FLAME model space (metres).
    pixels: (B, V, 2) the vertices projected into the crop by the fitted camera.
    render: photometric mode: (B, S, S, 3) shaded render (premultiplied alpha), crop frame.
    alpha: photometric mode: (B, S, S) its coverage.
  """
  vertices: jax.Array
  pixels: jax.Array
  render: Optional[jax.Array] = None
  alpha: Optional[jax.Array] = None


@functools.partial(jax.jit, static_argnames=("config", "crop_size"))
def fitted_meshes(model: FlameModel, fit_model: FitModel, results: FitResult, config: FitConfig,
                  crop_size: int) -> FittedMeshes:
  """Full meshes, their projections into the crop and (photometric mode) renders at the crop
  size of a batch of fits, in one compiled program."""
  vertices = vertices_of_batch(model, results.params)
  pixels = jax.vmap(project)(results.camera, vertices)
  if not config.photometric:
    return FittedMeshes(vertices=vertices, pixels=pixels)
  renders = jax.vmap(lambda result: render_result(fit_model, result, crop_size, config.raster))(
      results)
  return FittedMeshes(vertices=vertices, pixels=pixels, render=renders.image,
                      alpha=renders.alpha)


def take(tree, slot: int):
  """One image of a batched pytree (every leaf indexed on its leading axis)."""
  return jax.tree.map(lambda x: x[slot], tree)
