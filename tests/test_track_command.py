"""jflame-track as a user runs it: a short real-photo clip in, every promised file out, and one
clear line (exit 2) for each usage problem."""

import json
import signal
import subprocess
import sys
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data

from jflame import output_folder, synthetic, track_output
from jflame.camera import Camera, project
from jflame.flame import FlameParams, barycentric_points, flame_forward
from tests.conftest import PROJECT_ROOT, ended_by_interrupt
from tests.test_output_files import isolated_env, run_command

TRACK = ("-m", "jflame.cli.track")
FRAMES = 12
QUICK = ["--num_shape", "10", "--num_expression", "5", "--full_iterations", "20",
         "--segment_length", "8", "--overlap", "2", "--nocompilation_cache"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """12 frames of the astronaut drifting right and turning a little, as an mp4."""
  path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
  photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (512, 512))
  for index in range(FRAMES):
    warp = cv2.getRotationMatrix2D((256.0, 200.0), 0.5 * index, 1.0)
    warp[0, 2] += 1.5 * index
    writer.write(cv2.warpAffine(photo, warp, (512, 512), borderMode=cv2.BORDER_REFLECT))
  writer.release()
  return path


def manifest_of(folder):
  return json.loads((folder / "manifest.json").read_text())


def test_a_clip_gives_a_row_per_frame_an_overlay_video_a_plot_and_a_manifest(clip, tmp_path):
  out = tmp_path / "tracked"
  done = run_command(["--input", clip, "--output", out, *QUICK, "--solve_focal"], tmp_path,
                     script=TRACK)
  assert done.returncode == 0, done.stderr[-2000:]
  table = pq.read_table(out / "track.parquet")
  assert table.num_rows == FRAMES
  assert table.column("frame").to_pylist() == list(range(FRAMES))
  assert set(table.column("status").to_pylist()) == {"tracked"}
  assert np.asarray(table.column("expression").to_pylist()).shape == (FRAMES, 5)
  error_px = np.asarray(table.column("landmark_error_px").to_pylist())
  assert np.all(error_px < 10.0)
  # Frame pixels, and over the face size of the frame's detections like jflame-fit's.
  detected = np.asarray(table.column("landmarks_detected").to_pylist())
  extent = detected.max(axis=1) - detected.min(axis=1)
  np.testing.assert_allclose(table.column("landmark_error_relative").to_pylist(),
                             error_px / np.sqrt(extent[:, 0] * extent[:, 1]), rtol=1e-5)
  manifest = manifest_of(out)
  relative = np.asarray(table.column("landmark_error_relative").to_pylist())
  # A track is judged by its worst frames: the manifest has p90 and max beside the median.
  assert 0.0 < manifest["landmark_error_relative_median"] < 0.1
  assert manifest["landmark_error_relative_p90"] == pytest.approx(np.percentile(relative, 90))
  assert manifest["landmark_error_relative_max"] == pytest.approx(relative.max())
  assert manifest["landmark_error_px_max"] == pytest.approx(error_px.max())
  # Each row says whether to trust it, as photos do.
  suspect = table.column("suspect").to_pylist()
  reasons = table.column("suspect_reason").to_pylist()
  assert [bool(r) for r in reasons] == suspect
  assert manifest["suspect_frames"] == sum(suspect)
  assert not any(suspect[i] for i in range(FRAMES) if relative[i] <= 0.05), reasons
  video = cv2.VideoCapture(str(out / "overlay.mp4"))
  assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
  assert (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))) \
      == (512, 512)
  plot = cv2.imread(str(out / "track.png"))
  assert plot is not None and plot.std() > 5  # a picture, not a blank
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["counts"]["tracked"] == FRAMES and manifest["status"] == "ok"
  assert len(manifest["shape"]) == 10  # one identity for the clip
  # --solve_focal: solved from the 12 frames, and the cameras written use it.
  assert manifest["focal_length_solved_from_frames"] == FRAMES
  assert "focal_length_note" not in manifest
  np.testing.assert_allclose(table.column("camera_focal_length").to_pylist(),
                             manifest["focal_length_solved_crop_px"], rtol=1e-5)
  with output_folder.claim_output_folder(out):  # the finished run let go of its lock
    pass
  check_table_schema_and_rows(table)


def written_types(num_landmarks):
  """What track.parquet's columns have been since format 2 (docs/FORMAT.md), written out here
  rather than taken from jflame.track_output."""
  f32, f64 = pa.float32(), pa.float64()
  vec3_32, vec3_64 = pa.list_(f32, 3), pa.list_(f64, 3)
  points = pa.list_(pa.list_(f64, 2), num_landmarks)
  return dict(
      frame=pa.int64(), time_s=f64, status=pa.string(), expression=pa.list_(f32, 5),
      global_rotation=vec3_32, neck_rotation=vec3_32, jaw_rotation=vec3_32,
      left_eye_rotation=vec3_32, right_eye_rotation=vec3_32, head_rotation_deg=vec3_64,
      camera_rotation=vec3_32, camera_translation=vec3_32, camera_focal_length=f32,
      camera_principal_point=pa.list_(f32, 2), frame_camera_rotation=vec3_64,
      frame_camera_translation=vec3_64, frame_camera_focal_length=f64,
      frame_camera_principal_point=pa.list_(f64, 2), landmarks_detected=points,
      landmarks_fitted=points, landmark_error_px=f32, landmark_error_relative=f64,
      suspect=pa.bool_(), suspect_reason=pa.string())


def check_table_schema_and_rows(table):
  """track.parquet has the declared schema (jflame.track_output), and each row rebuilds its
  frame: the row's FLAME parameters with the clip's one shape (metadata), through the synthetic
  head the command used and the row's frame camera, land on the row's fitted landmarks."""
  metadata = {key.decode(): json.loads(value) for key, value in table.schema.metadata.items()}
  indices = metadata["landmark_indices"]
  assert table.schema.equals(track_output.table_schema(5, len(indices), photometric=False))
  assert {field.name: field.type for field in table.schema} == written_types(len(indices))
  assert metadata["format_version"] == track_output.TABLE_FORMAT_VERSION
  model, embedding = synthetic.synthetic_flame("flame", seed=0)
  assert metadata["model"] == model.name
  order = list(np.asarray(embedding.landmark_indices))
  rows = np.asarray([order.index(index) for index in indices])
  params_keys = ("expression", "global_rotation", "neck_rotation", "jaw_rotation",
                 "left_eye_rotation", "right_eye_rotation")
  camera_keys = ("rotation", "translation", "focal_length", "principal_point")
  columns = {name: jnp.asarray(table.column(name).to_pylist(), jnp.float32)
             for name in params_keys + tuple(f"frame_camera_{key}" for key in camera_keys)}

  def fitted_landmarks(row):
    params = FlameParams(shape=jnp.asarray(metadata["shape"], jnp.float32),
                         **{key: row[key] for key in params_keys})
    camera = Camera(**{key: row[f"frame_camera_{key}"] for key in camera_keys})
    vertices, _ = flame_forward(model, params)
    return project(camera, barycentric_points(vertices, model.faces,
                                              embedding.face_indices[rows],
                                              embedding.barycentrics[rows]))
  np.testing.assert_allclose(jax.jit(jax.vmap(fitted_landmarks))(columns),
                             table.column("landmarks_fitted").to_pylist(), atol=1e-2)


@pytest.mark.parametrize("problem", ["missing input", "not a video", "output is a file",
                                     "output held by another run"])
def test_usage_problems_exit_2_with_one_line(problem, clip, tmp_path):
  args = {"missing input": ["--input", tmp_path / "absent.mp4", "--output", tmp_path / "o"],
          "not a video": ["--input", tmp_path / "text.mp4", "--output", tmp_path / "o"],
          "output is a file": ["--input", clip, "--output", tmp_path / "file"],
          "output held by another run": ["--input", clip, "--output", tmp_path / "held"]}[problem]
  expected = {"missing input": "absent.mp4 does not exist",
              "not a video": "cannot open",
              "output is a file": "file",
              "output held by another run": "another jflame run is writing to"}[problem]
  (tmp_path / "text.mp4").write_text("not a video")
  (tmp_path / "file").write_text("a file where the output folder should be")
  with output_folder.claim_output_folder(tmp_path / "held"):
    done = run_command([*args, *QUICK], tmp_path, script=TRACK)
  assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert "Traceback" not in done.stderr
  assert expected in lines[-1], lines[-1]
  assert not (tmp_path / "o" / "track.parquet").exists()


@pytest.mark.parametrize("flag, value", [("crop_size", "5"), ("max_frames", "-1"),
                                         ("smoothing", "-1"), ("segment_length", "1"),
                                         ("full_iterations", "-3"), ("overlap", "40")])
def test_out_of_range_flags_exit_2_naming_the_flag(flag, value, clip, tmp_path):
  done = run_command(["--input", clip, "--output", tmp_path / "o", f"--{flag}", value],
                     tmp_path, script=TRACK)
  assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert "Traceback" not in done.stderr and flag in lines[-1], lines[-1]
  assert not (tmp_path / "o").exists()  # refused before anything was made


# `python -c HOLD_IN_THE_FIT <marker> <jflame-track flags>`: jflame-track whose clip fit writes
# `marker` and then waits for a signal, so a test interrupts it mid-run at any load.
HOLD_IN_THE_FIT = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as HOLD_AFTER_FIRST_SHARD says
from jflame import track_runner
marker = Path(sys.argv.pop(1))
def fit_then_wait(*args, **kwargs):
  marker.write_text("fitting")
  while True:
    time.sleep(0.5)
track_runner.fit_clip = fit_then_wait
from jflame.cli import track
track.run()
"""


def test_ctrl_c_ends_with_one_line_and_no_half_written_file(clip, tmp_path):
  """SIGINT while the clip is being fitted: exit 130, one line saying what happens to the files,
  no traceback; no file of the output folder is half written (each appears whole or not)."""
  out, marker = tmp_path / "tracked", tmp_path / "fitting"
  process = subprocess.Popen([sys.executable, "-c", HOLD_IN_THE_FIT, str(marker), "--input",
                              str(clip), "--output", str(out), *QUICK], cwd=PROJECT_ROOT,
                             env=isolated_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None and not marker.exists():
    time.sleep(0.05)
  assert process.poll() is None, process.communicate()[1][-2000:]
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  assert ended_by_interrupt(process.returncode), (process.returncode, stderr[-2000:])
  assert "Traceback" not in stderr and "interrupted: each of the clip's files" in stderr
  assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_a_solved_focal_length_from_few_frames_or_none_is_said_so():
  from jflame.track_runner import FEW_FOCAL_FRAMES, focal_solved, solved_focal_note
  assert solved_focal_note(900.0, FEW_FOCAL_FRAMES) is None and focal_solved(900.0, 16)
  assert "1 frame(s)" in solved_focal_note(900.0, 1)
  for focal, frames in ((float("nan"), 16), (-5.0, 16), (900.0, 0)):
    assert not focal_solved(focal, frames)
    assert "could not be solved" in solved_focal_note(focal, frames)


def test_ctrl_c_while_a_command_starts_is_one_line(tmp_path):
  """The installed entry points (jflame.cli.start) import and run their command themselves: an
  interrupt during those seconds of imports, or before the command's own handling begins,
  exits 130 with one line, not a traceback. The commands here are modules interrupted while
  importing and while running."""
  def start(module):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from jflame.cli.start import start; "
         f"sys.path.insert(0, {str(tmp_path)!r}); sys.exit(start({module!r}, 'jflame-x'))"],
        capture_output=True, text=True, cwd=PROJECT_ROOT)
  (tmp_path / "interrupted_on_import.py").write_text("raise KeyboardInterrupt\n")
  (tmp_path / "interrupted_on_run.py").write_text("def run():\n  raise KeyboardInterrupt\n")
  probe = start("interrupted_on_import")
  assert probe.returncode == 130
  assert probe.stderr.strip() == "jflame-x: interrupted while starting; nothing was done."
  probe = start("interrupted_on_run")
  assert probe.returncode == 130 and "Traceback" not in probe.stderr
  assert probe.stderr.startswith("jflame-x: interrupted; what was finished is kept")
  # Every installed command goes through it.
  scripts = (PROJECT_ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]
  entries = [line for line in scripts.split("\n\n")[0].splitlines() if line.startswith("jflame-")]
  assert entries and all('"jflame.cli.start:' in line for line in entries), entries
