"""`jflame-fit --cameras` on a synthetic calibrated capture (tools/make_multiview_capture.py:
NeRSemble's layout, three cameras, two moments, renders of the synthetic head) as a subprocess:
the files of every moment, the mesh in the camera file's world near the truth, one line and
exit 2 for each way the capture and the camera file do not match."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT


def _run(args, env, timeout=600):
  return subprocess.run([sys.executable, "-m", "jflame.cli.fit", *args], cwd=PROJECT_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def capture(tmp_path_factory, command_env):
  folder = tmp_path_factory.mktemp("capture")
  made = subprocess.run([sys.executable, "tools/make_multiview_capture.py", "--output",
                         str(folder), "--views", "3", "--moments", "2", "--width", "440",
                         "--height", "640"], cwd=PROJECT_ROOT, env=command_env,
                        capture_output=True, text=True, timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  return folder


@pytest.fixture(scope="module")
def fitted(capture, command_env, tmp_path_factory):
  out = tmp_path_factory.mktemp("capture_out")
  done = _run(["--cameras", str(capture / "camera_params.json"), "--input",
               str(capture / "frames"), "--output", str(out)], command_env)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return out, done.stdout


def _obj_vertices(path):
  return np.array([[float(x) for x in line.split()[1:4]] for line in path.read_text().splitlines()
                   if line.startswith("v ")])


def test_every_moment_gets_its_files_and_its_world_mesh(capture, fitted):
  out, stdout = fitted
  truth = np.load(capture / "truth.npz")
  manifest = json.loads((out / "manifest.json").read_text())
  assert [entry["moment"] for entry in manifest["moments"]] == list(truth["moments"])
  assert manifest["serials"] == list(truth["serials"])
  assert "SYNTHETIC" in manifest["model"] and manifest["shared_shape"] is not None
  assert "done: 2 moments" in stdout
  several_views = 0
  for index, entry in enumerate(manifest["moments"]):
    name = entry["moment"]
    if entry["status"] != "ok":
      continue
    if entry["views_with_face"] < 2:
      # MediaPipe finds no face in some renders of turned heads: one view cannot give the
      # distance, and the moment says so.
      assert entry["suspect"] and "single view" in entry["suspect_reason"], entry
      continue
    several_views += 1
    assert entry["files"] == [f"{name}.npz", f"{name}.obj", f"{name}_views.png"]
    arrays = np.load(out / f"{name}.npz")
    assert arrays["landmarks_fitted"].shape[0] == 3 and arrays["head_rotation"].shape == (3,)
    vertices = _obj_vertices(out / f"{name}.obj")
    true_world = truth["vertices_world"][index]
    assert vertices.shape == true_world.shape
    # In the camera file's world, metres: near the truth. MediaPipe's landmarks on these renders
    # are themselves off by several millimetres (docs/ACCURACY.md), so this is a frame check
    # (a wrong convention or unit is decimetres off), not the accuracy figure.
    error_mm = 1000 * np.linalg.norm(vertices - true_world, axis=1)
    assert np.median(error_mm) < 25.0, np.median(error_mm)
  assert several_views >= 1, manifest["moments"]   # the check above ran


def _one_line_exit_2(done):
  assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-2000:]
  # The one line the command writes: "<program>: <message>" (fit.py under `python -m`).
  lines = [line for line in done.stderr.splitlines() if line.startswith("fit.py: ")]
  assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
  return lines[0]


def test_captures_and_camera_files_that_do_not_match_exit_2_with_one_line(capture, command_env,
                                                                          tmp_path):
  cameras = capture / "camera_params.json"
  # A moment without one camera's image.
  broken = tmp_path / "frames"
  shutil.copytree(capture / "frames", broken)
  next(iter(sorted((broken / "timestep_000001").glob("cam_*.png")))).unlink()
  assert "no image of camera" in _one_line_exit_2(_run(
      ["--cameras", str(cameras), "--input", str(broken), "--output", str(tmp_path / "a")],
      command_env))
  # Camera-to-world matrices given as world_2_cam.
  content = json.loads(cameras.read_text())
  content["world_2_cam"] = {serial: np.linalg.inv(np.array(matrix)).tolist()
                            for serial, matrix in content["world_2_cam"].items()}
  inverted = tmp_path / "inverted.json"
  inverted.write_text(json.dumps(content))
  assert "camera-to-world" in _one_line_exit_2(_run(
      ["--cameras", str(inverted), "--input", str(capture / "frames"), "--output",
       str(tmp_path / "b")], command_env))
  # A camera file that is not there: refused before the output folder is made.
  assert "camera file not found" in _one_line_exit_2(_run(
      ["--cameras", str(tmp_path / "absent.json"), "--input", str(capture / "frames"),
       "--output", str(tmp_path / "e")], command_env))
  assert not (tmp_path / "e").exists()
  # A folder without cam_* images, and two inputs.
  (tmp_path / "empty").mkdir()
  assert "no cam_<serial>" in _one_line_exit_2(_run(
      ["--cameras", str(cameras), "--input", str(tmp_path / "empty"), "--output",
       str(tmp_path / "c")], command_env))
  assert "one folder" in _one_line_exit_2(_run(
      ["--cameras", str(cameras), "--input", f"{capture / 'frames'},{tmp_path}", "--output",
       str(tmp_path / "d")], command_env))
