"""The track follows fast motion and smooths only the noise: known truth on a synthetic head that
shakes at >= 400 degrees / s, opens its jaw and blinks quickly and holds still between, and the
default track against the frames-independent one (`--smoothing 0`) on real landmarks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import flame, synthetic
from jflame.camera import FRONTAL_ROTATION, Camera, project
from jflame.observation import Observation
from jflame.config import TRACK_FIT, TrackConfig
from jflame.track import fit_clip
from tests.conftest import (SHARED_ASSETS, fit_model_over_embedding, optimised_for_runs,
                            shared_photos)

CROP = 256
FPS = 25.0
NUM_SHAPE, NUM_EXPRESSION = 20, 10
CONFIG = TrackConfig(fit=TRACK_FIT.replace(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION))
STILL = (slice(2, 23), slice(77, 98))   # still stretches (away from the moves' edges)


def without_smoothing(config):
  zero = lambda s: dataclasses.replace(s, **{f.name: 0.0 for f in dataclasses.fields(s)})
  return config.replace(velocity=zero(config.velocity), acceleration=zero(config.acceleration),
                        agreement=0.0)


def _pulse(t, centre, width):
  """A quick smooth bump of height 1 and `width` seconds at half height."""
  return np.exp(-0.5 * ((t - centre) / (width / 2.355)) ** 2)


def fast_motion(frames=100):
  """Still (0-24), a head shake of +-0.5 rad at 2.5 Hz (peak yaw velocity 450 degrees / s,
  25-49), two quick jaw openings and two blinks (50-74), still again (75-99)."""
  t = np.arange(frames) / FPS
  head = np.zeros((frames, 3))
  shake = (t >= 1.0) & (t < 2.0)
  head[shake, 1] = 0.5 * np.sin(2 * np.pi * 2.5 * (t[shake] - 1.0))
  head[:, 0] = 0.1                                       # a slight constant pitch
  jaw = 0.02 + 0.3 * (_pulse(t, 2.2, 0.16) + _pulse(t, 2.6, 0.2))
  expression = np.zeros((frames, NUM_EXPRESSION))
  expression[:, 0] = 2.0 * (_pulse(t, 2.4, 0.12) + _pulse(t, 2.8, 0.12))   # blink-like
  expression[:, 1] = 0.3
  return head, jaw, expression


def known_truth_clip(model, embedding, noise_px=1.0, seed=3):
  """The synthetic head along `fast_motion`: true face points (T, P, 3) in model space and the
  Observation of its landmarks with `noise_px` Gaussian noise."""
  rng = np.random.default_rng(seed)
  head, jaw, expression = fast_motion()
  frames = len(jaw)
  shape = rng.normal(size=NUM_SHAPE) * 0.8
  params = flame.FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION)
  params = jax.tree.map(lambda x: jnp.broadcast_to(x, (frames,) + x.shape), params).replace(
      shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (frames, NUM_SHAPE)),
      expression=jnp.asarray(expression, jnp.float32),
      jaw_rotation=jnp.asarray(np.stack([jaw, 0 * jaw, 0 * jaw], 1), jnp.float32))
  points = face_points(model, embedding, params)
  rotation = (Rotation.from_rotvec(FRONTAL_ROTATION) * Rotation.from_rotvec(head)).as_rotvec()
  camera = Camera(rotation=jnp.asarray(rotation, jnp.float32),
                  translation=jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.75], jnp.float32),
                                               (frames, 3)),
                  focal_length=jnp.full((frames,), 726.0, jnp.float32),
                  principal_point=jnp.full((frames, 2), CROP / 2, jnp.float32))
  observed = np.zeros((frames, 478, 2), np.float32)
  indices = np.asarray(embedding.landmark_indices)
  observed[:, indices] = np.asarray(jax.vmap(project)(camera, points))
  observed[:, indices] += rng.normal(scale=noise_px, size=(frames, len(indices), 2))
  observation = Observation(landmarks=observed, landmark_weights=np.ones((frames, 478),
                                                                         np.float32),
                            image=None, face_mask=None, size=CROP, valid=np.ones(frames, bool))
  return np.asarray(points), head, observation


@jax.jit
def face_points(model, embedding, params):
  """(T, P, 3) the face's landmark surface points in model space (shape, expression, jaw)."""
  vertices = jax.vmap(lambda p: flame.flame_forward(model, p)[0])(params)
  return jax.vmap(lambda v: embedding.points(v, model.faces))(vertices)


# Noise draws of the known-truth clip (the shape and the landmark noise): one draw flatters or
# condemns the vertex-error comparison (before the clip solve, seed 3 alone gave 1.006x and
# these four 1.006-1.42x; over eight draws the default was worse on six). All eight since the
# clip solve's 30 conjugate-gradient iterations (docs/ACCURACY.md).
TRUTH_SEEDS = (3, 0, 2, 7, 1, 4, 5, 6)


@pytest.fixture(scope="module")
def known_truth_tracks():
  """seed -> (truth points, true head rotations, {"default" | "independent": track result}) of
  the synthetic head's fast-motion clip, tracked by the default TrackConfig and without
  smoothing (one compiled program for both: the temporal weights are its arguments, not part of
  it), shared by the draws. Sixteen runs of one program: compiled for its runs
  (`optimised_for_runs`)."""
  from jflame import track
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  fit_model = fit_model_over_embedding(model, embedding, CONFIG.fit)
  runs = {}
  with optimised_for_runs(track, "track_padded", ("config", "crop_size")) as track_padded:
    for seed in TRUTH_SEEDS:
      truth, head, observation = known_truth_clip(model, embedding, seed=seed)
      tracks = {"default": jax.device_get(fit_clip(fit_model, observation, CONFIG, CROP))}
      # The default track's program is there now, and the track without smoothing adds none.
      programs = track_padded._cache_size()
      tracks["independent"] = jax.device_get(
          fit_clip(fit_model, observation, without_smoothing(CONFIG), CROP))
      assert track_padded._cache_size() == programs == 1
      runs[seed] = (truth, head, tracks)
  return model, embedding, runs


def _vertex_errors(model, embedding, truth, result):
  """(T,) mm: per frame, the mean distance of the fitted face points to the truth after removing
  their mean offset (the model's origin is not observable apart from the camera translation)."""
  fitted = np.asarray(face_points(model, embedding, result.params))
  offset = (fitted - truth).mean(axis=1, keepdims=True)
  return 1000 * np.linalg.norm(fitted - truth - offset, axis=-1).mean(axis=1)


def test_known_truth_fast_motion_followed_and_still_stretches_smoothed(known_truth_tracks):
  _, _, runs = known_truth_tracks
  for seed, (_, head, tracks) in runs.items():
    peak = np.degrees(np.max(np.abs(np.diff(head[:, 1])))) * FPS
    assert peak >= 400.0, peak
    jitter = {}
    for name, result in tracks.items():
      assert not bool(result.failed) and np.all(result.tracked), (seed, name)
      landmarks = np.asarray(result.landmarks_2d)
      jitter[name] = np.mean([np.linalg.norm(np.diff(landmarks[s], 2, axis=0), axis=-1).mean()
                              for s in STILL])
    assert jitter["default"] <= 0.5 * jitter["independent"], (seed, jitter)
    # The shake itself is followed: the fitted yaw against the truth, in degrees.
    yaw = Rotation.from_rotvec(FRONTAL_ROTATION).inv() * Rotation.from_rotvec(
        tracks["default"].camera.rotation)
    yaw_error = np.degrees(np.abs(yaw.as_rotvec()[:, 1] - head[:, 1]))
    assert np.percentile(yaw_error, 90) < 3.0 and yaw_error.max() < 6.0, (seed, yaw_error.max())


def test_known_truth_default_track_face_points_no_worse_than_independent(known_truth_tracks):
  """Issue 18's criterion: per-frame face-point error, median and p90, no worse than frames
  fitted independently with one shape, on every draw."""
  model, embedding, runs = known_truth_tracks
  for seed, (truth, _, tracks) in runs.items():
    errors = {name: _vertex_errors(model, embedding, truth, result)
              for name, result in tracks.items()}
    for statistic in (np.median, lambda e: np.percentile(e, 90)):
      default, independent = statistic(errors["default"]), statistic(errors["independent"])
      assert default <= independent, (seed, default, independent)


CLIP = SHARED_ASSETS / "clips" / "talking_head_182.mp4"


def shaken_photo(photo, frames=60, size=384, roll_degrees=20.0, hertz=2.5, shift=0.12):
  """A photo shaken fast by a warp: in-plane rotation of +-20 degrees at 2.5 Hz (peak 314
  degrees / s at 25 frames / s) and a sideways shift of 12% of the frame."""
  import cv2
  t = np.arange(frames) / FPS
  angle = roll_degrees * np.sin(2 * np.pi * hertz * t)
  offset = shift * size * np.sin(2 * np.pi * hertz * t + 0.5)
  height, width = photo.shape[:2]
  zoom = size / max(height, width) * 0.9
  for a, d in zip(angle, offset):
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), a, zoom)
    matrix[:, 2] += np.array([size / 2 - width / 2 + d, size / 2 - height / 2])
    yield cv2.warpAffine(photo, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def real_landmarks():
  """MediaPipe's landmarks (tracking mode) of the shared clip and of a shaken shared photo,
  read once for the module: {name: ((T, 478, 2), found (T,))}."""
  import cv2
  from jflame.track_runner import frames_landmarks, read_landmarks
  if not CLIP.is_file():
    pytest.skip(f"no shared clip at {CLIP}")
  _, landmarks, found = read_landmarks(str(CLIP))
  photo = cv2.cvtColor(cv2.imread(str(shared_photos()[0])), cv2.COLOR_BGR2RGB)
  points, seen = frames_landmarks(shaken_photo(photo))
  return {"clip": (landmarks, found), "clip every 3rd frame": (landmarks[::3], found[::3]),
          "clip every 5th frame": (landmarks[::5], found[::5]),
          "shaken photo": (points, seen)}


def relative_errors(loaded, config, landmarks, found, crop_size=256):
  """(frames with a face,) the track's landmark error over the detected face's size."""
  from jflame import output
  from jflame.preprocess.video import clip_crop, clip_observations
  from jflame.model_loading import prepare_fit_model
  crop_from_frame = clip_crop(landmarks, found, crop_size)
  observations = clip_observations(landmarks, found, crop_from_frame, crop_size)
  fit_model = prepare_fit_model(loaded, config.fit)
  result = jax.device_get(fit_clip(fit_model, observations, config, crop_size))
  assert not bool(result.failed)
  detected = observations.landmarks[:, np.asarray(fit_model.landmark_indices)]
  size = np.asarray([output.face_size(points) for points in detected])
  tracked = np.asarray(result.tracked)
  return np.asarray(result.landmark_error)[tracked] / size[tracked]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "clip every 3rd frame", "clip every 5th frame",
                                  "shaken photo"])
def test_default_track_stays_on_real_landmarks(real_landmarks, name):
  """Issue 18: the default track's relative landmark error within 1.1x of the frames-
  independent track's at the median and 1.25x at p90 and max (it was 9x at p90)."""
  from jflame.model_loading import LoadedModel
  landmarks, found = real_landmarks[name]
  assert found.sum() >= 0.9 * len(found)
  model, embedding = synthetic.synthetic_flame("flame", seed=0)
  loaded = LoadedModel(model, embedding, "synthetic")
  default = relative_errors(loaded, TrackConfig(), landmarks, found)
  independent = relative_errors(loaded, without_smoothing(TrackConfig()), landmarks, found)
  for statistic, limit in ((np.median, 1.1), (lambda e: np.percentile(e, 90), 1.25),
                           (np.max, 1.25)):
    assert statistic(default) <= limit * statistic(independent), (
        statistic(default), statistic(independent), limit)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["photometric", "solve_focal"])
def test_photometric_and_solved_focal_tracks_stay_on_real_landmarks(real_landmarks, variant):
  """The same terms in photometric mode (30 frames of the shaken photo, crop 128, the small
  synthetic head: the render of every step is most of the time, so its track is compiled for
  its runs, `optimised_for_runs`) and with the clip's focal length solved: within the same
  bounds of the frames-independent track."""
  from jflame import track
  if variant != "photometric":
    _check_variant(real_landmarks, variant)
    return
  with optimised_for_runs(track, "track_padded", ("config", "crop_size")):
    _check_variant(real_landmarks, variant)


def _check_variant(real_landmarks, variant):
  import cv2
  from jflame import output
  from jflame.preprocess.video import clip_crop, clip_observations
  from jflame.model_loading import LoadedModel, prepare_fit_model
  from jflame.track import clip_focal_length
  model, embedding = synthetic.synthetic_flame("small" if variant == "photometric" else "flame",
                                               seed=0)
  loaded = LoadedModel(model, embedding, "synthetic")
  frames = 30 if variant == "photometric" else 60
  landmarks, found = (x[:frames] for x in real_landmarks["shaken photo"])
  crop_size = 128 if variant == "photometric" else 256
  base = TrackConfig()
  images = None
  if variant == "photometric":
    base = base.replace(fit=base.fit.replace(mode="photometric", num_shape=20,
                                             num_expression=10))
    photo = cv2.cvtColor(cv2.imread(str(shared_photos()[0])), cv2.COLOR_BGR2RGB)
    images = list(shaken_photo(photo, frames=frames))
  crop_from_frame = clip_crop(landmarks, found, crop_size)
  observations = clip_observations(landmarks, found, crop_from_frame, crop_size, images)
  fit_model = prepare_fit_model(loaded, base.fit)
  focal = (clip_focal_length(fit_model, observations, base)[0] if variant == "solve_focal"
           else None)
  detected = observations.landmarks[:, np.asarray(fit_model.landmark_indices)]
  size = np.asarray([output.face_size(points) for points in detected])
  errors = {}
  for name, config in (("default", base), ("independent", without_smoothing(base))):
    result = jax.device_get(fit_clip(fit_model, observations, config, crop_size, focal))
    assert not bool(result.failed) and np.all(result.tracked[found])
    errors[name] = np.asarray(result.landmark_error)[found] / size[found]
  for statistic, limit in ((np.median, 1.1), (lambda e: np.percentile(e, 90), 1.25),
                           (np.max, 1.25)):
    assert statistic(errors["default"]) <= limit * statistic(errors["independent"]), (
        statistic(errors["default"]), statistic(errors["independent"]))


def test_motion_weights_fall_where_the_landmarks_move_and_stop_at_the_last_face():
  """1 px of independent jitter leaves the weights near 1; a 10 px jump between two frames
  drops the weights of the differences across it; differences reaching past the last face
  (padding) get none."""
  from jflame.temporal import motion_weights
  from jflame.track import ClipTargets
  rng = np.random.default_rng(0)
  frames, count = 12, 400
  face = rng.random((count, 2)) * 120 + 60
  landmarks = np.repeat(face[None], frames, 0) + rng.normal(scale=1.0, size=(frames, count, 2))
  landmarks[6:] += [10.0, 0.0]             # the head moves between frames 5 and 6
  valid = np.ones(frames, bool)
  valid[10:] = False                       # padding after the last face
  targets = ClipTargets(landmarks=jnp.asarray(landmarks, jnp.float32),
                        weights=jnp.ones((frames, count)), is_detected=jnp.ones((frames, count),
                                                                               bool),
                        valid=jnp.asarray(valid))
  # Jitted as track_padded runs it (one compile; op by op it took 13 s on CPU).
  weights = np.asarray(jax.jit(motion_weights, static_argnums=1)(
      targets, CONFIG.fit.landmark_scale / CROP, CONFIG.motion_scale))
  velocity, acceleration = weights[:, 0], weights[:, 1]
  still = [0, 1, 2, 3, 7, 8]
  assert np.all(velocity[still] > 0.5), velocity
  assert velocity[5] < 0.02, velocity      # difference 5 -> 6
  assert acceleration[4] < 0.02 and acceleration[5] < 0.02, acceleration
  assert np.all(velocity[9:] == 0) and np.all(acceleration[8:] == 0), weights
  with pytest.raises(Exception, match="motion_scale"):
    TrackConfig(motion_scale=-1.0)
