"""Clip fitting with known truth: smooth trajectories recovered, one shape, less jitter."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import flame, synthetic
from jflame.camera import FRONTAL_ROTATION, Camera, project
from jflame.config import TRACK_FIT, FitConfig, Smoothness, TrackConfig
from jflame.errors import ConfigError
from jflame.fit import fit_batch
from jflame.observation import Observation
from jflame.track import (clip_focal_length, fit_clip, focal_frames, frames_from_segments,
                          spread_frames,
                          padded_length, segment_count)
from jflame.track_output import frame_statuses, head_rotation_degrees
from tests.conftest import fit_model_over_embedding, shared_photos

CROP = 256
NUM_SHAPE, NUM_EXPRESSION = 20, 10
FRAMES = 60
CONFIG = TrackConfig(fit=TRACK_FIT.replace(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION))


@pytest.fixture(scope="module")
def small_model():
  return synthetic.synthetic_flame("small", seed=0)


def _trajectories(frames, moving=True):
  """Smooth known motion at 25 frames/s (or a static head)."""
  t = np.arange(frames) / 25.0 * float(moving)
  expression = np.zeros((frames, NUM_EXPRESSION))
  expression[:, 0] = 0.8 * np.sin(2 * np.pi * 0.7 * t)
  expression[:, 1] = 0.6 * np.cos(2 * np.pi * 0.4 * t)
  expression[:, 2] = 0.5 * np.sin(2 * np.pi * 1.1 * t + 1.0)
  jaw = 0.12 + 0.1 * np.sin(2 * np.pi * 0.9 * t)
  head = np.stack([0.1 * np.sin(2 * np.pi * 0.5 * t), 0.35 * np.sin(2 * np.pi * 0.3 * t),
                   0.05 * np.sin(2 * np.pi * 0.2 * t)], axis=1)
  return expression, jaw, head


@jax.jit
def _projected_landmarks(model, embedding, params, camera):
  """(T, P, 2) the landmark points of the head with per-frame `params` seen by `camera`: one
  compiled program for every clip (op by op, 60 frames took 6 s on CPU)."""
  def frame(frame_params, frame_camera):
    vertices, _ = flame.flame_forward(model, frame_params)
    return project(frame_camera, embedding.points(vertices, model.faces))
  return jax.vmap(frame)(params, camera)


def _clip(model, embedding, frames, noise_px, seed, moving=True, focal=726.0):
  """Landmarks of the synthetic head with one identity moving along known trajectories."""
  rng = np.random.default_rng(seed)
  shape = rng.normal(size=NUM_SHAPE) * 0.8
  expression, jaw, head = _trajectories(frames, moving)
  params = flame.FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION)
  params = jax.tree.map(lambda x: jnp.broadcast_to(x, (frames,) + x.shape), params).replace(
      shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (frames, NUM_SHAPE)),
      expression=jnp.asarray(expression, jnp.float32),
      jaw_rotation=jnp.asarray(np.stack([jaw, 0 * jaw, 0 * jaw], axis=1), jnp.float32))
  rotation = (Rotation.from_rotvec(FRONTAL_ROTATION) * Rotation.from_rotvec(head)).as_rotvec()
  translation = np.zeros((frames, 3))
  translation[:, 0] = 0.01 * np.sin(np.arange(frames) / 25.0) * moving
  translation[:, 2] = 0.75
  camera = Camera(rotation=jnp.asarray(rotation, jnp.float32),
                  translation=jnp.asarray(translation, jnp.float32),
                  focal_length=jnp.full((frames,), focal, jnp.float32),
                  principal_point=jnp.full((frames, 2), CROP / 2, jnp.float32))
  observed = np.zeros((frames, 478, 2), np.float32)
  indices = np.asarray(embedding.landmark_indices)
  observed[:, indices] = np.asarray(_projected_landmarks(model, embedding, params, camera))
  observed[:, indices] += rng.normal(scale=noise_px, size=(frames, len(indices), 2))
  observation = Observation(
      landmarks=observed, landmark_weights=np.ones((frames, 478), np.float32),
      image=None, face_mask=None, size=CROP,
      valid=np.ones(frames, bool))
  return shape, (expression, jaw, head), observation


def _with_crop(observation, size=CROP):
  count = observation.valid.shape[0]
  return observation.replace(image=np.zeros((count, size, size, 3), np.float32),
                             face_mask=np.zeros((count, size, size), np.float32))


@jax.jit
def _neutral_faces(model, embedding, shapes):
  """(N, P, 3) the landmark points of the neutral faces (zero expression and pose) of N shapes."""
  def face(shape):
    params = flame.FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(shape=shape)
    return embedding.points(flame.flame_forward(model, params)[0], model.faces)
  return jax.vmap(face)(jnp.asarray(shapes, jnp.float32))


def _shape_errors_mm(model, embedding, fitted, truth):
  """(N,) mean distance between the neutral faces of N fitted shapes and the true shape's under
  the landmarks, after aligning centroid and scale (depth trades against size)."""
  faces = np.asarray(_neutral_faces(model, embedding, np.vstack([fitted, truth[None]])))
  faces = faces - faces.mean(axis=1, keepdims=True)
  a, b = faces[:-1], faces[-1]
  scale = np.sum(a * b, axis=(1, 2)) / np.sum(a * a, axis=(1, 2))
  return 1000 * np.linalg.norm(scale[:, None, None] * a - b, axis=-1).mean(axis=1)


def _head_rotations(camera_rotation):
  return (Rotation.from_rotvec(FRONTAL_ROTATION).inv()
          * Rotation.from_rotvec(np.asarray(camera_rotation))).as_rotvec()


@pytest.fixture(scope="module")
def moving_clip(small_model):
  model, embedding = small_model
  shape, truth, observation = _clip(model, embedding, FRAMES, noise_px=0.5, seed=1)
  result = fit_clip(fit_model_over_embedding(model, embedding, CONFIG.fit), observation, CONFIG, CROP)
  return shape, truth, observation, jax.device_get(result)


def test_recovers_smooth_trajectories(moving_clip):
  _, (expression, jaw, head), _, result = moving_clip
  assert not bool(result.failed) and np.all(result.tracked)
  assert result.params.expression.shape == (FRAMES, NUM_EXPRESSION)
  for k in range(3):
    correlation = np.corrcoef(result.params.expression[:, k], expression[:, k])[0, 1]
    assert correlation >= 0.9, (k, correlation)
  assert np.corrcoef(result.params.jaw_rotation[:, 0], jaw)[0, 1] >= 0.9
  fitted_head = _head_rotations(result.camera.rotation)
  for axis in (0, 1):  # pitch and yaw; roll moves too little here to correlate meaningfully
    assert np.corrcoef(fitted_head[:, axis], head[:, axis])[0, 1] >= 0.9, axis
  # One identity and one focal length for the clip.
  np.testing.assert_array_equal(result.params.shape, np.broadcast_to(result.params.shape[0],
                                                                      result.params.shape.shape))
  assert np.ptp(result.camera.focal_length) == 0.0
  assert np.median(result.landmark_error) < 1.0, np.median(result.landmark_error)


def test_shape_at_least_as_good_as_the_best_single_frame(small_model, moving_clip):
  model, embedding = small_model
  shape, _, observation, result = moving_clip
  config = FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION)
  singles = fit_batch(fit_model_over_embedding(model, embedding, config), _with_crop(observation), config)
  single_errors = _shape_errors_mm(model, embedding, np.asarray(singles.params.shape), shape)
  clip_error = _shape_errors_mm(model, embedding, result.params.shape[:1], shape)[0]
  # The best frame as a user would pick it: the one its own fit matches best. The clip's shape
  # is Adam's with the frames independent (the clip solve holds it, issue 18): 0.624 mm against
  # that frame's 0.612 and the median frame's 0.634 when measured, so 3% is allowed here.
  best = int(np.argmin(np.asarray(singles.landmark_error)))
  assert clip_error <= 1.03 * single_errors[best], (clip_error, single_errors[best],
                                                    np.median(single_errors))
  assert clip_error <= np.median(single_errors)


def test_shape_from_a_few_frames_tracks_every_frame(small_model, moving_clip):
  """`shape_frames`: the Adam stages settle the shape on 12 of the 60 frames; the clip solve
  starts the other 48 from their closed-form starts and tracks them as closely as when every
  frame had the Adam steps (landmark error, median and p90, within 10%; shape within 10%)."""
  model, embedding = small_model
  shape, _, observation, every = moving_clip
  config = CONFIG.replace(shape_frames=12)
  few = jax.device_get(fit_clip(fit_model_over_embedding(model, embedding, config.fit),
                                observation, config, CROP))
  assert not bool(few.failed) and np.all(few.tracked)
  for statistic in (np.median, lambda e: np.percentile(e, 90)):
    assert statistic(few.landmark_error) <= 1.1 * statistic(every.landmark_error)
  errors = _shape_errors_mm(model, embedding, np.stack([few.params.shape[0],
                                                        every.params.shape[0]]), shape)
  assert errors[0] <= 1.1 * errors[1], errors


def test_static_head_jitters_three_times_less_than_independent_fits(small_model):
  model, embedding = small_model
  frames = 32   # one segment (measured over the moving clip's two, the ratio was 2.9: the seam)
  # Drawn as long as the moving clip, so that the independent fits run the program compiled for
  # the shape test (compiling it for 32 frames took a third of this test's time); the first 32
  # frames are those a 32-frame clip draws, and each frame's independent fit is its own.
  _, _, observation = _clip(model, embedding, FRAMES, noise_px=1.0, seed=2, moving=False)
  fit_model = fit_model_over_embedding(model, embedding, CONFIG.fit)
  tracked = fit_clip(fit_model, jax.tree.map(lambda x: x[:frames], observation), CONFIG, CROP)
  config = FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION)
  independent = fit_batch(fit_model_over_embedding(model, embedding, config),
                          _with_crop(observation), config)
  independent = independent.landmarks_2d[:frames]

  def jitter(points):
    return np.linalg.norm(np.diff(np.asarray(points), axis=0), axis=-1).mean()
  ratio = jitter(independent) / jitter(tracked.landmarks_2d)
  assert ratio >= 3.0, ratio


def test_frames_without_a_face_are_interpolated(small_model, moving_clip):
  model, embedding = small_model
  _, _, observation, clean = moving_clip
  gap = slice(20, 26)
  valid = observation.valid.copy()
  valid[gap] = False
  valid[:2] = False
  result = jax.device_get(fit_clip(fit_model_over_embedding(model, embedding, CONFIG.fit),
                                   observation.replace(valid=valid), CONFIG, CROP))
  assert list(np.asarray(result.tracked)) == list(valid)
  status = frame_statuses(result.tracked)
  assert list(status[:3]) == ["no_face", "no_face", "tracked"]
  assert set(status[gap]) == {"interpolated"}
  # Inside the gap the values lie near the clean fit's (the motion is smooth).
  jaw_gap = np.abs(result.params.jaw_rotation[gap, 0] - clean.params.jaw_rotation[gap, 0])
  assert np.all(np.isfinite(result.params.expression)) and jaw_gap.max() < 0.05, jaw_gap


def test_segments_in_chunks_fit_what_all_at_once_fits(small_model, moving_clip):
  """Chunking the segments (a memory bound) runs the same objective in sequence."""
  model, embedding = small_model
  _, _, observation, together = moving_clip
  chunked = CONFIG.replace(segment_chunk=1)
  result = fit_clip(fit_model_over_embedding(model, embedding, chunked.fit), observation,
                    chunked, CROP)
  np.testing.assert_allclose(result.params.expression, together.params.expression, atol=2e-3)
  np.testing.assert_allclose(result.camera.rotation, together.camera.rotation, atol=2e-4)
  np.testing.assert_allclose(result.landmark_error, together.landmark_error, atol=2e-3)


def test_clip_lengths_share_a_compiled_bucket():
  # Every clip of up to 4 segments (116 frames) shares one program.
  assert [segment_count(n, CONFIG) for n in (1, 32, 33, 60, 61, 116, 117, 500)] == [
      4, 4, 4, 4, 4, 4, 5, 18]
  # A photometric step renders every frame, padding included: no padding to four segments.
  photometric = CONFIG.replace(fit=CONFIG.fit.replace(mode="photometric"))
  assert [segment_count(n, photometric) for n in (1, 32, 33, 60, 61, 117)] == [1, 1, 2, 2, 3, 5]
  assert padded_length(2, CONFIG) == 60
  # Cross-fading segments that agree gives back the frames.
  frames = np.arange(padded_length(3, CONFIG), dtype=np.float32)
  index = np.arange(3)[:, None] * CONFIG.stride + np.arange(CONFIG.segment_length)
  np.testing.assert_allclose(frames_from_segments(jnp.asarray(frames[index]), CONFIG), frames,
                             rtol=1e-6)


def test_track_config_refuses_nonsense():
  with pytest.raises(ConfigError, match="overlap"):
    TrackConfig(overlap=32)
  with pytest.raises(ConfigError, match="photometric_segment_chunk"):
    TrackConfig(photometric_segment_chunk=-1)
  with pytest.raises(ConfigError, match="shape_frames"):
    TrackConfig(shape_frames=2.5)
  with pytest.raises(ConfigError, match="velocity.jaw"):
    TrackConfig(velocity=Smoothness(jaw=-1.0))
  assert head_rotation_degrees(np.asarray([FRONTAL_ROTATION])).tolist() == [[0.0, 0.0, 0.0]]


def _warped_clip(photo, frames=60, size=512):
  """A photo moved smoothly: in-plane rotation, scale and translation (a known camera roll,
  distance and sideways motion of the head)."""
  import cv2
  t = np.linspace(0.0, 1.0, frames)
  angle = 12.0 * np.sin(2 * np.pi * t)                   # degrees
  scale = 1.0 + 0.15 * np.sin(np.pi * t)
  shift = np.stack([30.0 * np.sin(2 * np.pi * t), 15.0 * np.cos(2 * np.pi * t)], axis=1)
  height, width = photo.shape[:2]
  zoom = size / max(height, width) * 0.8
  out = []
  for a, s, d in zip(angle, scale, shift):
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), a, s * zoom)
    matrix[:, 2] += np.array([size / 2, size / 2]) - np.array([width / 2, height / 2]) + d
    out.append(cv2.warpAffine(photo, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE))
  return out, angle, scale


@pytest.mark.slow
def test_real_photo_warped_smoothly(tmp_path, small_model):
  """End to end on a real face: MediaPipe tracking, the clip fit, every output file."""
  import cv2
  import pyarrow.parquet as pq
  from jflame import track_runner
  from jflame.model_loading import LoadedModel
  photo = cv2.cvtColor(cv2.imread(str(shared_photos()[0])), cv2.COLOR_BGR2RGB)
  frames, angle, scale = _warped_clip(photo)
  folder = tmp_path / "frames"
  folder.mkdir()
  for i, frame in enumerate(frames):
    cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
  model, embedding = synthetic.synthetic_flame("flame", seed=0)
  loaded = LoadedModel(model, embedding, "synthetic")
  # jflame-track's defaults: the program of test_track_motion's real-clip tracks and of
  # test_export_commands' track, loaded from the suite's cache when one of them compiled it.
  config = TrackConfig()
  options = track_runner.TrackOptions(output_dir=tmp_path / "out")
  manifest = track_runner.track_video(loaded, config, options, folder)
  assert manifest["status"] == "ok" and manifest["counts"]["tracked"] == 60
  for name in ("track.parquet", "track.png", "overlay.mp4", "manifest.json"):
    assert (tmp_path / "out" / name).stat().st_size > 0, name
  table = pq.read_table(tmp_path / "out" / "track.parquet").to_pydict()
  assert len(table["frame"]) == 60 and set(table["status"]) == {"tracked"}
  # The photo's in-plane rotation is a roll of the head seen by the frame camera (OpenCV's
  # positive angle, counter-clockwise on screen, is a positive roll about the head's z, which
  # points at the camera); its zoom brings the head nearer.
  roll = np.degrees(_head_rotations(np.asarray(table["frame_camera_rotation"]))[:, 2])
  assert np.corrcoef(roll, angle)[0, 1] >= 0.9, np.corrcoef(roll, angle)[0, 1]
  assert np.abs(roll - roll.mean() - (angle - angle.mean())).max() < 3.0
  depth = np.asarray(table["frame_camera_translation"])[:, 2]
  assert np.corrcoef(depth, 1.0 / scale)[0, 1] >= 0.9, np.corrcoef(depth, 1.0 / scale)[0, 1]
  assert np.median(table["landmark_error_px"]) < 6.0
  video = cv2.VideoCapture(str(tmp_path / "out" / "overlay.mp4"))
  assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 60


def test_a_clip_solves_its_focal_length_and_then_its_distance(small_model):
  """Shot with a 1000 px lens, fitted assuming the 726 px default the head comes out 27% too
  near; with the focal length solved from the clip it is where it was filmed."""
  model, embedding = small_model
  _, _, observation = _clip(model, embedding, FRAMES, noise_px=0.5, seed=2, focal=1000.0)
  fit_model = fit_model_over_embedding(model, embedding, CONFIG.fit)
  focal, used = clip_focal_length(fit_model, observation, CONFIG)
  assert used == 16
  assert abs(float(focal) / 1000.0 - 1.0) < 0.05, float(focal)
  depth = lambda result: float(np.median(np.asarray(result.camera.translation)[:, 2]))
  assumed = fit_clip(fit_model, observation, CONFIG, CROP)
  solved = fit_clip(fit_model, observation, CONFIG, CROP, focal)
  assert abs(depth(assumed) / 0.75 - 1.0) > 0.2
  assert abs(depth(solved) / 0.75 - 1.0) < 0.05
  np.testing.assert_allclose(solved.camera.focal_length, float(focal), rtol=1e-6)


def test_shape_frames_spread_over_the_frames_with_a_face():
  valid = np.zeros(40, bool)
  valid[5:35] = True
  valid[20] = False
  picked = np.asarray(spread_frames(jnp.asarray(valid), 8))
  assert picked.shape == (8,) and valid[picked].all() and np.all(np.diff(picked) > 0)
  assert picked[0] == 5 and picked[-1] == 34 and np.ptp(np.diff(picked)) <= 2
  for count in (0, 40, 50):   # every frame
    np.testing.assert_array_equal(spread_frames(jnp.asarray(valid), count), np.arange(40))
  two = np.zeros(40, bool)
  two[[3, 9]] = True
  assert set(np.asarray(spread_frames(jnp.asarray(two), 8)).tolist()) == {3, 9}
  assert set(np.asarray(spread_frames(jnp.zeros(40, bool), 8)).tolist()) == {0}


def test_focal_frames_spread_over_the_frames_with_a_face():
  valid = np.zeros(100, bool)
  valid[10:90] = True
  chosen = focal_frames(valid, 16)
  assert len(chosen) == 16 and chosen[0] == 10 and chosen[-1] == 89 and valid[chosen].all()
  assert np.all(np.diff(chosen) >= 4)
  assert focal_frames(valid[:15], 16).tolist() == list(range(10, 15))
