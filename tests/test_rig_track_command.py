"""`jflame-track --cameras` as a subprocess on a synthetic rig clip (tools/make_multiview_capture.py
--clip: three calibrated cameras, the head turning and opening its jaw, one mp4 per camera): the
run's files, the head rebuilt in the world from the written parameters near the truth, an overlay
video per view, and one line with exit 2 for each way the clips and the camera file do not
match."""

import json
import shutil
import signal
import subprocess
import sys
import time

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import flame, model_loading, rig_track_runner
from jflame.flame import FlameParams
from tests.conftest import (PROJECT_ROOT, ended_by_interrupt, make_synthetic_capture,
                            one_line_exit_2)

pytestmark = pytest.mark.slow

# `python -c HOLD_AFTER_A_CAMERA <jflame-track flags>`: jflame-track --cameras whose runner,
# once it has read (and committed) a camera's landmarks, waits: a test signals then, and the run
# cannot have finished first, at any load.
HOLD_AFTER_A_CAMERA = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from jflame import rig_track_runner
read = rig_track_runner.clip_landmarks
def read_then_hold(*args, **kwargs):
  read(*args, **kwargs)
  while True:
    time.sleep(0.05)
rig_track_runner.clip_landmarks = read_then_hold
sys.argv[0] = "track.py"
from jflame.cli import track
track.run()
"""

MOMENTS = 12


def _track(args, env):
  return subprocess.run([sys.executable, "-m", "jflame.cli.track", *args], cwd=PROJECT_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rig_clip(tmp_path_factory, command_env):
  return make_synthetic_capture(tmp_path_factory.mktemp("rig_clip"), command_env, "--views", 3,
                                "--moments", MOMENTS, "--width", 360, "--height", 480, "--clip")


@pytest.fixture(scope="module")
def tracked(rig_clip, command_env, tmp_path_factory):
  out = tmp_path_factory.mktemp("rig_track_out")
  done = _track(["--cameras", str(rig_clip / "camera_params.json"), "--input",
                 str(rig_clip / "clips"), "--output", str(out)], command_env)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return out, done.stdout


def test_every_moment_tracked_in_the_world_with_an_overlay_per_view(rig_clip, tracked):
  out, stdout = tracked
  truth = np.load(rig_clip / "truth.npz")
  manifest = json.loads((out / "manifest.json").read_text())
  serials = list(truth["serials"])
  assert manifest["serials"] == serials and manifest["frames"] == MOMENTS
  assert manifest["counts"] == {"tracked": MOMENTS, "not_tracked": 0}
  assert f"done: {MOMENTS} moments of 3 views" in stdout
  assert manifest["files"] == ["rig_track.npz"] + [f"overlay_cam_{s}.mp4" for s in serials]
  result = np.load(out / "rig_track.npz")
  assert result["landmarks_fitted"].shape[:2] == (MOMENTS, 3)
  assert result["expression"].shape[0] == MOMENTS and result["shape"].ndim == 1
  # The head rebuilt from the written parameters with the model and the written pose
  # (p_world = R p_model + t): near the truth in the camera file's world (MediaPipe on these
  # renders is itself millimetres off, docs/ACCURACY.md: a frame check, not the accuracy figure).
  model = model_loading.load_model(None, None).model
  for t in range(MOMENTS):
    error_mm = 1000 * np.linalg.norm(_world_vertices(model, result, t)
                                     - truth["vertices_world"][t], axis=1)
    assert np.median(error_mm) < 12.0, (t, np.median(error_mm))
  # Every view fitted: its landmark error a small part of the face (measured 1-2.6%).
  for serial, figures in manifest["views"].items():
    assert figures["landmark_error_relative_max"] < 0.05, (serial, figures)
  for serial in serials:
    video = cv2.VideoCapture(str(out / f"overlay_cam_{serial}.mp4"))
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    size = (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    video.release()
    assert frames == MOMENTS and size == (360, 480), (serial, frames, size)


def _world_vertices(model, result, t):
  """Moment t's head in the world from a rig track's written parameters and pose."""
  params = FlameParams.zeros(len(result["shape"]), result["expression"].shape[1]).replace(
      shape=jnp.asarray(result["shape"]), expression=jnp.asarray(result["expression"][t]),
      jaw_rotation=jnp.asarray(result["jaw_rotation"][t]),
      left_eye_rotation=jnp.asarray(result["left_eye_rotation"][t]),
      right_eye_rotation=jnp.asarray(result["right_eye_rotation"][t]))
  vertices = np.asarray(flame.flame_forward(model, params)[0], np.float64)
  rotation = Rotation.from_rotvec(result["head_rotation"][t]).as_matrix()
  return vertices @ rotation.T + result["head_translation"][t]


def test_photometric_mode_renders_every_view_of_every_moment(rig_clip, tracked, command_env,
                                                             tmp_path):
  """`--mode photometric` as a user runs it (the landmarks read back from the landmark run, a
  small crop and few steps: the command's path, not its accuracy, which tests/test_rig_track.py
  and docs/ACCURACY.md measure): the clip's appearance, the world-axes light, each view's colour
  gain and colour error per moment in the files, the crop size in the manifest, the picture of
  the moment with the largest colour error, the head moved by the renders and still near the
  truth."""
  landmark_run, _ = tracked
  out = tmp_path / "photometric"
  shutil.copytree(landmark_run / rig_track_runner.LANDMARKS_FOLDER,
                  out / rig_track_runner.LANDMARKS_FOLDER)
  done = _track(["--cameras", str(rig_clip / "camera_params.json"), "--input",
                 str(rig_clip / "clips"), "--output", str(out), "--mode", "photometric",
                 "--crop_size", "64", "--photometric_iterations", "10", "--nooverlay"],
                command_env)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "the landmarks of 3 cameras read back" in done.stdout
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["config"]["fit"]["mode"] == "photometric" and manifest["crop_size"] == 64
  assert manifest["config"]["photometric_iterations"] == 10
  assert manifest["files"] == ["rig_track.npz", "compare_worst_moment.png"]
  result = np.load(out / "rig_track.npz")
  # The picture of the moment whose views' median colour error is the largest: (crop | render |
  # overlay) per view, the head drawn in every render.
  worst = manifest["comparison_moment"]
  medians = np.nanmedian(result["photometric_error"], axis=1)
  assert worst == int(np.argmax(medians)), (worst, medians)
  picture = cv2.imread(str(out / "compare_worst_moment.png"))
  assert picture.shape == (3 * 64, 3 * 64, 3), picture.shape
  for row in np.split(picture, 3, axis=0):
    rendered = np.split(row, 3, axis=1)[1]
    assert (rendered.sum(axis=-1) > 30).mean() > 0.3
  landmark_result = np.load(landmark_run / "rig_track.npz")
  assert result["sh_lighting"].shape == (9, 3) and result["texture"].ndim == 1
  assert result["view_colour_gain"].shape == (MOMENTS, 3, 3)
  np.testing.assert_allclose(result["view_colour_gain"], 1.0, atol=0.1)   # one exposure
  assert result["photometric_error"].shape == (MOMENTS, 3)
  assert np.all(result["photometric_error"] < 0.2), result["photometric_error"]
  for serial, figures in manifest["views"].items():
    assert figures["photometric_error_median"] < 0.2, (serial, figures)
  # The renders moved the head from where the landmark track left it, and it stays near the
  # truth (the accuracy itself: docs/ACCURACY.md).
  assert np.abs(result["expression"] - landmark_result["expression"]).max() > 1e-3
  model = model_loading.load_model(None, None).model
  truth = np.load(rig_clip / "truth.npz")
  for t in range(MOMENTS):
    error_mm = 1000 * np.linalg.norm(_world_vertices(model, result, t)
                                     - truth["vertices_world"][t], axis=1)
    assert np.median(error_mm) < 12.0, (t, np.median(error_mm))


def test_the_rig_track_exports_as_a_multi_view_dataset(tracked, command_env, tmp_path):
  """jflame-export reads the rig track as a user runs it: GaussianAvatars' dataset of every
  tracked moment x camera (its geometry is checked against the reader's conventions in
  test_export.py); a format that needs a single-view track says what this folder exports as."""
  out, _ = tracked
  done = subprocess.run([sys.executable, "-m", "jflame.cli.export", "--format",
                         "gaussian_avatars", "--input", str(out), "--output",
                         str(tmp_path / "ga")], cwd=PROJECT_ROOT, env=command_env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  frames = json.loads((tmp_path / "ga" / "transforms.json").read_text())["frames"]
  assert len(frames) == 3 * MOMENTS
  assert {(f["timestep_index"], f["camera_index"]) for f in frames} == {
      (t, c) for t in range(MOMENTS) for c in range(3)}
  line = one_line_exit_2(subprocess.run(
      [sys.executable, "-m", "jflame.cli.export", "--format", "metrical", "--input", str(out),
       "--output", str(tmp_path / "m")], cwd=PROJECT_ROOT, env=command_env,
      capture_output=True, text=True, timeout=600), "export.py")
  assert "jflame-track --cameras folder, which exports as gaussian_avatars" in line


def test_a_stopped_rig_track_keeps_each_cameras_landmarks_and_a_rerun_finishes_it(
    rig_clip, tracked, command_env, tmp_path):
  """Ctrl-C once the first camera's landmarks are committed: exit 130 with one line saying what
  is kept; the same command again reads that camera back, tracks the others and writes what an
  uninterrupted run writes."""
  out = tmp_path / "out"
  store = out / ".landmarks"
  args = ["--cameras", str(rig_clip / "camera_params.json"), "--input", str(rig_clip / "clips"),
          "--output", str(out), "--nooverlay"]
  process = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_A_CAMERA, *args],
                             cwd=PROJECT_ROOT, env=command_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not list(store.glob("cam_*.npz")):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "no camera committed in 10 minutes"
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert ended_by_interrupt(process.returncode) and "Traceback" not in stderr, stderr[-2000:]
  assert "interrupted: the landmarks of every camera read so far are kept" in stderr
  assert len(list(store.glob("cam_*.npz"))) == 1
  done = _track(args, command_env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "the landmarks of 1 camera read back" in done.stdout
  whole, _ = tracked
  with np.load(out / "rig_track.npz") as resumed, np.load(whole / "rig_track.npz") as reference:
    np.testing.assert_array_equal(resumed["landmarks_detected"], reference["landmarks_detected"])
    for key in ("expression", "head_rotation", "head_translation", "shape"):
      np.testing.assert_allclose(resumed[key], reference[key], atol=1e-5)


def _one_line_exit_2(done):
  return one_line_exit_2(done, "track.py")


def test_clips_that_do_not_match_the_camera_file_exit_2_with_one_line(rig_clip, command_env,
                                                                       tmp_path):
  cameras = str(rig_clip / "camera_params.json")
  clips = tmp_path / "clips"
  shutil.copytree(rig_clip / "clips", clips)
  first = sorted(clips.glob("cam_*.mp4"))[0]
  # A camera without a clip: refused before the output folder is made, the camera named (a
  # file without image sizes says so while it is read: "no image of that camera was given").
  moved = first.rename(tmp_path / first.name)
  line = _one_line_exit_2(_track(
      ["--cameras", cameras, "--input", str(clips), "--output", str(tmp_path / "a")],
      command_env))
  assert first.stem[len("cam_"):] in line and ("no clip" in line or "no image" in line), line
  assert not (tmp_path / "a").exists()
  # A clip of a camera the file does not have.
  shutil.copy(moved, clips / moved.name)
  shutil.copy(moved, clips / "cam_99999999.mp4")
  assert "does not have" in _one_line_exit_2(_track(
      ["--cameras", cameras, "--input", str(clips), "--output", str(tmp_path / "b")],
      command_env))
  (clips / "cam_99999999.mp4").unlink()
  # A folder without clips; a focal length to solve.
  (tmp_path / "empty").mkdir()
  assert "no cam_<serial>" in _one_line_exit_2(_track(
      ["--cameras", cameras, "--input", str(tmp_path / "empty"), "--output",
       str(tmp_path / "c")], command_env))
  assert "nothing to solve" in _one_line_exit_2(_track(
      ["--cameras", cameras, "--input", str(clips), "--output", str(tmp_path / "d"),
       "--solve_focal"], command_env))
