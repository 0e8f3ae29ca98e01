"""A calibrated rig's clip (issue 20: tracking with cameras), known truth: the small synthetic
head seen by three calibrated cameras (distortion, off-centre principal points) while it is
still, shakes its head at 270 degrees / s and opens its jaw, then is still again; 1 px landmark
noise in every view. With the temporal terms the still stretches jitter far less than moments
fitted alone, the shake is followed, and the per-moment error in the world is no worse."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import flame, model_loading, multiview, rig_track, synthetic
from jflame.config import FitConfig, TrackConfig
from jflame.flame import FlameParams
from tests.conftest import fit_model_over_embedding
from tests.test_multiview import rig, views_landmarks

pytestmark = pytest.mark.slow

NUM_SHAPE, NUM_EXPRESSION = 20, 10
FPS = 25.0
FRAMES = 40
STILL = (slice(0, 12), slice(28, 40))
CONFIG = TrackConfig(fit=multiview.rig_config(FitConfig(
    num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION, lm_iterations=multiview.LM_ITERATIONS)))


def _alone(config):
  zero = lambda s: dataclasses.replace(s, **{f.name: 0.0 for f in dataclasses.fields(s)})
  return config.replace(velocity=zero(config.velocity), acceleration=zero(config.acceleration),
                        agreement=0.0)


def motion():
  """Per frame: head yaw (radians), jaw opening: still, a shake of +-0.3 rad at 2.5 Hz with the
  jaw opening once, still."""
  t = np.arange(FRAMES) / FPS
  moving = (np.arange(FRAMES) >= 12) & (np.arange(FRAMES) < 28)
  phase = 2 * np.pi * 2.5 * (t - 12 / FPS)
  yaw = np.where(moving, 0.3 * np.sin(phase), 0.0)
  jaw = np.where(moving, 0.15 * np.sin(phase / 2) ** 2, 0.0)
  return yaw, jaw


@pytest.fixture(scope="module")
def clip():
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  cameras = rig()
  rng = np.random.default_rng(11)
  shape = rng.normal(size=NUM_SHAPE) * 0.8
  expression = rng.normal(size=NUM_EXPRESSION) * 0.4
  yaw, jaw = motion()
  face = np.unique(np.asarray(model.faces)[np.asarray(embedding.face_indices)])
  views, truth_world = [], []
  for frame in range(FRAMES):
    params = FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(
        shape=jnp.asarray(shape, jnp.float32), expression=jnp.asarray(expression, jnp.float32),
        jaw_rotation=jnp.asarray([jaw[frame], 0.0, 0.0], jnp.float32))
    vertices = np.asarray(flame.flame_forward(model, params)[0], np.float64)
    rotation = Rotation.from_euler("yx", [yaw[frame], -0.08], degrees=False).as_matrix()
    translation = np.array([0.01, -0.015, 0.02])
    world = vertices @ rotation.T + translation
    points = np.asarray(embedding.points(jnp.asarray(world, jnp.float32), model.faces),
                        np.float64)
    landmarks, weights = views_landmarks(cameras, points, embedding, rng)
    views.append(multiview.rig_views(cameras, landmarks, weights, np.ones(len(cameras), bool),
                                     CONFIG.fit))
    truth_world.append(world[face])
  batch = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *views)
  fit_model = fit_model_over_embedding(model, embedding, CONFIG.fit)
  shape_fitted = rig_track.clip_shape(fit_model, batch, CONFIG)
  photo_landmarks = len(model_loading.fitted_landmark_indices(
      model_loading.LoadedModel(model, embedding, "synthetic"), FitConfig()))
  tracks = {name: jax.device_get(rig_track.track_rig(fit_model, batch, config, shape_fitted,
                                                         photo_landmarks))
            for name, config in (("default", CONFIG), ("alone", _alone(CONFIG)))}
  return dict(model=model, face=face, truth=np.stack(truth_world), yaw=yaw, tracks=tracks)


def _world_face(clip, result):
  """(T, F, 3) the fitted face region in the world."""
  vertices = np.asarray(jax_vertices(clip["model"], result.params))
  rotations = Rotation.from_rotvec(np.asarray(result.head_rotation, np.float64)).as_matrix()
  world = np.einsum("tab,tvb->tva", rotations, vertices) + np.asarray(
      result.head_translation)[:, None]
  return world[:, clip["face"]]


def jax_vertices(model, params):
  return jax.vmap(lambda p: flame.flame_forward(model, p)[0])(params)


def test_still_stretches_jitter_less_and_the_shake_is_followed(clip):
  tracks = clip["tracks"]
  for name, result in tracks.items():
    assert not bool(result.failed) and np.all(result.tracked), name
    # Every view fitted near the noise (1 px per coordinate: about 1.25 px mean distance).
    assert np.median(result.landmark_error) < 1.6, (name, np.median(result.landmark_error))
  jitter = {}
  for name, result in tracks.items():
    world = _world_face(clip, result)
    jitter[name] = np.mean([1000 * np.linalg.norm(np.diff(world[s], 2, axis=0), axis=-1).mean()
                            for s in STILL])
  # Measured: 0.40x (seed 11; 0.23-0.29x with seeds 12-14).
  assert jitter["default"] <= 0.55 * jitter["alone"], jitter
  # The shake is followed: the fitted yaw against the truth, in degrees.
  rotation = Rotation.from_rotvec(np.asarray(tracks["default"].head_rotation, np.float64))
  yaw = rotation.as_euler("yxz")[:, 0]
  error = np.degrees(np.abs(yaw - clip["yaw"]))
  # Measured: p90 0.09, max 0.11 degrees (moments alone: 0.07, 0.09).
  assert np.percentile(error, 90) < 0.5 and error.max() < 1.0, error.max()


def test_per_moment_world_error_no_worse_than_moments_fitted_alone(clip):
  """The face region's mean distance to the truth per moment: median no worse than moments
  fitted alone, p90 and max within 3% and 10% (measured over seeds 11-14: median 0.97-0.98x,
  p90 0.98-1.00x, max 0.95-1.05x; most of the error is the clip's identity, the same in both)."""
  errors = {}
  for name, result in clip["tracks"].items():
    distance = 1000 * np.linalg.norm(_world_face(clip, result) - clip["truth"], axis=-1)
    errors[name] = distance.mean(axis=1)                                      # (T,) mm
  for statistic, limit in ((np.median, 1.0), (lambda e: np.percentile(e, 90), 1.03),
                           (np.max, 1.10)):
    assert statistic(errors["default"]) <= limit * statistic(errors["alone"]), (
        statistic(errors["default"]), statistic(errors["alone"]))


def test_photometric_mode_pulls_every_moment_to_what_the_views_show():
  """Photometric mode, known truth: a short clip (the head turning 0.25 rad and back) whose
  every view's crop is the true head rendered through that camera (projection and framing
  written in tests/test_multiview.py), lit by one light fixed in the world, while each view's
  landmarks carry a shift of its own (10 px, as MediaPipe's view-dependent placement does) and
  5 px of scatter. The landmark track keeps the head where the shifts put it; the renders over
  the clip bring every moment nearer the truth, match the crops, and find the light."""
  from jflame import camera_files, render
  from tests.test_multiview import _crop_framing
  frames, size = 6, 48
  config = CONFIG.replace(fit=CONFIG.fit.replace(mode="photometric",
                                                 photometric_weight=rig_track.PHOTOMETRIC_WEIGHT),
                          photometric_iterations=rig_track.PHOTOMETRIC_ITERATIONS)
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  cameras = rig()
  fit_model = fit_model_over_embedding(model, embedding, config.fit)
  rng = np.random.default_rng(11)
  params = FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(
      shape=jnp.asarray(rng.normal(size=NUM_SHAPE) * 0.8, jnp.float32),
      expression=jnp.asarray(rng.normal(size=NUM_EXPRESSION) * 0.4, jnp.float32))
  vertices = np.asarray(flame.flame_forward(model, params)[0], np.float64)
  texture = jnp.asarray(rng.normal(size=fit_model.albedo.num_coefficients) * 0.05, jnp.float32)
  light = np.array([0.5, -0.3, 0.8]) / np.linalg.norm([0.5, -0.3, 0.8])
  lighting = render.neutral_lighting() * 0.8
  lighting = lighting.at[1:4].set(jnp.asarray(light[[1, 2, 0]] * 0.6)[:, None])
  neighbors = jnp.asarray(render.face_adjacency(np.asarray(model.faces)))
  face = np.unique(np.asarray(model.faces)[np.asarray(embedding.face_indices)])
  indices = np.asarray(embedding.landmark_indices)
  shifts = rng.normal(size=(len(cameras), 2)) * 10.0
  views, photos, truth = [], [], []
  for yaw in 0.25 * np.sin(np.linspace(0, np.pi, frames)):
    rotation = Rotation.from_euler("yx", [yaw, -0.08]).as_matrix()
    world = vertices @ rotation.T + np.array([0.01, -0.015, 0.02])
    points = np.asarray(embedding.points(jnp.asarray(world, jnp.float32), model.faces))
    landmarks, weights = views_landmarks(cameras, points, embedding, rng)
    for view in range(len(cameras)):
      landmarks[view, indices] += shifts[view] + rng.normal(size=(len(indices), 2)) * 5.0
    views.append(multiview.rig_views(cameras, landmarks, weights, np.ones(len(cameras), bool),
                                     config.fit))
    normals = render.vertex_normals(jnp.asarray(world, jnp.float32), model.faces)
    crops, masks, framings = [], [], []
    for camera in cameras:
      pixels = camera_files.project_points(camera, world)
      framing = _crop_framing(pixels, size)
      depth = world @ camera.world_to_camera[2, :3] + camera.world_to_camera[2, 3]
      screen = np.concatenate([pixels @ framing[:, :2].T + framing[:, 2], depth[:, None]], 1)
      drawn = render.render_mesh(jnp.asarray(screen, jnp.float32), model.faces, normals,
                                 fit_model.albedo, render.Appearance(texture, lighting), size,
                                 size, config.fit.raster, neighbors)
      crops.append(np.asarray(drawn.image))
      masks.append(np.asarray(drawn.alpha > 0.99, np.float32))
      framings.append(framing.astype(np.float32))
    photos.append(multiview.ViewPhotos(images=np.stack(crops), face_masks=np.stack(masks),
                                       crop_from_image=np.stack(framings)))
    truth.append(world[face])
  stack = lambda items: jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *items)
  batch, photo_batch = stack(views), stack(photos)
  shape = rig_track.clip_shape(fit_model, batch, config)
  photo_landmarks = len(model_loading.fitted_landmark_indices(
      model_loading.LoadedModel(model, embedding, "synthetic"), FitConfig()))
  result = jax.device_get(rig_track.track_rig(fit_model, batch, config, shape, photo_landmarks,
                                              photo_batch))
  assert not bool(result.failed) and np.all(result.tracked)
  clip = dict(model=model, face=face)
  error = 1000 * np.linalg.norm(_world_face(clip, result) - np.stack(truth), axis=-1)
  # The landmark track of this clip: 6.73 mm median, p90 7.17, every moment 6.6-7.0 (measured
  # with `config.fit.mode` landmark); the renders: 1.61, 2.28, every moment 1.5-1.8 (3.80, 4.66
  # at a moment's photometric weight, 1e4).
  assert np.median(error) < 0.5 * 6.73 and np.percentile(error, 90) < 0.6 * 7.17, (
      np.median(error), np.percentile(error, 90))
  assert np.median(error, axis=1).max() < 0.5 * 6.6, np.median(error, axis=1)
  assert np.all(np.asarray(result.photometric_error) < 0.02), result.photometric_error  # ~0.005
  np.testing.assert_allclose(result.view_gains, 1.0, atol=0.02)   # one exposure
  found = np.asarray(result.appearance.lighting)[1:4].mean(axis=1)[[2, 0, 1]]
  angle = np.degrees(np.arccos(found @ light / np.linalg.norm(found)))
  assert angle < 35, angle                                                # measured 17
