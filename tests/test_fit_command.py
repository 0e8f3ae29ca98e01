"""`jflame-fit` end to end on real photographs: outputs, accuracy, and bad inputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from jflame import engine, model_loading, sinks, sources
from jflame.config import FitConfig
from jflame.errors import InputError, ModelFileError
from jflame.landmarks import LandmarkWeights
from tests.conftest import PROJECT_ROOT, expected_region_weights, shared_photos


@pytest.fixture(scope="module")
def loaded_model():
  return model_loading.load_model(None, None)


def _write_rgb(path, rgb):
  cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  return path


def _run(loaded, inputs, output_dir, config=FitConfig(), mesh_format="obj", pictures=True,
         **options):
  """The engine as jflame-fit drives it; returns the run_summary.json it wrote."""
  inputs = [str(entry) for entry in (inputs if isinstance(inputs, list) else [inputs])]
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  sink = sinks.FilesSink(output_dir, loaded.model.faces, loaded.model.name, mesh_format,
                         pictures)
  engine.Engine(loaded, config, engine.EngineOptions(**options)).run(
      sources.list_sources(inputs, exclude_folder=output_dir), sink)
  return json.loads((output_dir / "run_summary.json").read_text())


@pytest.fixture(scope="module")
def astronaut_run(loaded_model, tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  _write_rgb(folder / "astronaut.png", skimage.data.astronaut())
  (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
  _write_rgb(folder / "coffee.png", skimage.data.coffee())  # a real photo without a face
  output_dir = tmp_path_factory.mktemp("out")
  manifest = _run(loaded_model, folder, output_dir, batch_size=4)
  return folder, output_dir, manifest


def _entry(manifest, relpath):
  """The entry of the input at `relpath` under its input root."""
  return next(image for image in manifest["images"] if image["source_relpath"] == relpath)


def _file(manifest, relpath, suffix):
  """The result file `<id><suffix>` of the input at `relpath`."""
  return _entry(manifest, relpath)["name"] + suffix


def test_real_photograph_fits_within_two_percent_of_face_size(astronaut_run):
  _, output_dir, manifest = astronaut_run
  entry = _entry(manifest, "astronaut.png")
  assert entry["status"] == "ok"
  assert manifest["synthetic_model"] is True and "SYNTHETIC" in manifest["model"]
  with np.load(output_dir / _file(manifest, "astronaut.png", ".npz")) as result:
    assert float(result["landmark_error_relative"]) < 0.02
    assert str(result["status"]) == "ok" and "SYNTHETIC" in str(result["model"])
    # Fitted landmarks mapped back to the photo agree with the detections there too.
    distance = np.linalg.norm(result["landmarks_fitted_original"] -
                              result["landmarks_detected_original"], axis=1)
    face = np.ptp(result["landmarks_detected_original"], axis=0)
    assert distance.mean() < 0.02 * np.sqrt(face[0] * face[1])
    assert result["shape"].shape == (100,) and result["expression"].shape == (50,)


def test_original_camera_projects_onto_the_photo(astronaut_run, loaded_model):
  """The camera re-expressed for the original photo puts the fitted landmarks where the crop
  camera put them (mapped back through the crop transform)."""
  import jax.numpy as jnp
  from jflame import flame
  from jflame.camera import Camera, project
  _, output_dir, manifest = astronaut_run
  with np.load(output_dir / _file(manifest, "astronaut.png", ".npz")) as result:
    params = flame.FlameParams(**{k: jnp.asarray(result[k]) for k in (
        "shape", "expression", "global_rotation", "neck_rotation", "jaw_rotation",
        "left_eye_rotation", "right_eye_rotation")})
    camera = Camera(**{k: jnp.asarray(result[f"original_camera_{k}"], jnp.float32) for k in (
        "rotation", "translation", "focal_length", "principal_point")})
    vertices, _ = flame.flame_forward(loaded_model.model, params)
    # The expected landmarks come from MediaPipe's own region sets, not from the function the
    # runner selects them with.
    expected = sorted(expected_region_weights(LandmarkWeights()))
    assert sorted(result["landmark_indices"].tolist()) == expected
    # The synthetic embedding is exact: MediaPipe landmark i is model vertex i (i < 468) or sits
    # on an iris disc; take the embedding's row for each written landmark index.
    embedding = loaded_model.embedding
    rows = [int(np.flatnonzero(np.asarray(embedding.landmark_indices) == i)[0])
            for i in result["landmark_indices"]]
    points = embedding.replace(face_indices=embedding.face_indices[np.asarray(rows)],
                               barycentrics=embedding.barycentrics[np.asarray(rows)],
                               landmark_indices=embedding.landmark_indices[np.asarray(rows)]
                               ).points(vertices, loaded_model.model.faces)
    np.testing.assert_allclose(project(camera, points), result["landmarks_fitted_original"],
                               atol=0.05)


def test_outputs_are_complete(astronaut_run, loaded_model):
  import trimesh
  _, output_dir, manifest = astronaut_run
  mesh = trimesh.load(output_dir / _file(manifest, "astronaut.png", ".obj"), process=False)
  assert mesh.vertices.shape == (loaded_model.model.num_vertices, 3)
  assert len(mesh.faces) == loaded_model.model.faces.shape[0]
  overlay = cv2.imread(str(output_dir / _file(manifest, "astronaut.png", "_overlay.png")))
  assert overlay.shape == (512, 512, 3)
  photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
  changed = np.any(overlay != photo, axis=2)
  assert changed[150:300, 180:320].mean() > 0.1 and changed[400:, :100].mean() < 0.01
  on_disk = json.loads((output_dir / "run_summary.json").read_text())
  assert on_disk["counts"] == manifest["counts"] == {"ok": 1, "unreadable": 1, "no_face": 1}
  assert set(_entry(manifest, "astronaut.png")["files"]) == {
      _file(manifest, "astronaut.png", suffix) for suffix in (".npz", ".obj", "_overlay.png")}
  leftovers = [p.name for p in output_dir.iterdir()
               if p.name.startswith(".") and p.name != ".jflame.lock"]
  assert not leftovers  # atomic writes leave no temporary files behind


def test_bad_images_get_a_status_and_no_files(astronaut_run):
  _, output_dir, manifest = astronaut_run
  corrupt, coffee = _entry(manifest, "corrupt.jpg"), _entry(manifest, "coffee.png")
  assert corrupt["status"] == "unreadable" and "corrupt.jpg" in corrupt["message"]
  assert coffee["status"] == "no_face"
  assert not list(output_dir.glob("corrupt*")) and not list(output_dir.glob("coffee*"))


def test_finished_results_are_never_overwritten(astronaut_run, loaded_model, tmp_path):
  folder, output_dir, manifest = astronaut_run
  copy = tmp_path / "out"
  shutil.copytree(output_dir, copy)
  result = _file(manifest, "astronaut.png", ".npz")
  before = (copy / result).read_bytes()
  again = _run(loaded_model, folder / "astronaut.png", copy, batch_size=4)
  assert again["this_run"] == {"skipped": 1}
  assert _entry(again, "astronaut.png")["status"] == "ok"  # the earlier record carries forward
  (folder / "astronaut.png").write_bytes(b"not a png any more")
  forced = _run(loaded_model, folder / "astronaut.png", copy, batch_size=4)
  assert _entry(forced, "astronaut.png")["status"] == "unreadable"
  assert (copy / result).read_bytes() == before


def test_missing_inputs_and_models_say_what_to_do(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="No image files found"):
    sources.list_sources([str(tmp_path / "empty")])
  with pytest.raises(ModelFileError, match=r"absent\.pkl.*WORKSPACE\.md"):
    model_loading.load_model(str(tmp_path / "absent.pkl"), None)


def test_command_exit_codes(tmp_path):
  """The installed command: non-zero when nothing could be fitted, with the reason printed."""
  (tmp_path / "empty").mkdir()
  command = [sys.executable, "-m", "jflame.cli.fit", "--output", str(tmp_path / "out")]
  empty = subprocess.run(command + ["--input", str(tmp_path / "empty")], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300)
  assert empty.returncode == 2 and "No image files found" in empty.stderr
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"junk")
  bad = subprocess.run(command + ["--input", str(tmp_path / "bad"), "--rigid_iterations", "1",
                                  "--full_iterations", "1", "--batch_size", "1"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "unreadable" in bad.stdout


def test_shared_photographs_fit(loaded_model, tmp_path):
  photos = shared_photos()
  manifest = _run(loaded_model, [str(p) for p in photos], tmp_path / "out", batch_size=8)
  for image in manifest["images"]:
    assert image["status"] == "ok", image
    assert image["landmark_error_relative"] < 0.02, image


def test_photometric_mode_writes_render_overlay_and_comparison(loaded_model, tmp_path):
  folder = tmp_path / "in"
  folder.mkdir()
  _write_rgb(folder / "astronaut.png", skimage.data.astronaut())
  config = FitConfig(mode="photometric", rigid_iterations=30, full_iterations=30)
  manifest = _run(loaded_model, folder, tmp_path / "out", config, batch_size=1)
  entry = _entry(manifest, "astronaut.png")
  assert entry["status"] == "ok"
  stem = entry["name"]
  assert set(entry["files"]) >= {f"{stem}_overlay.png", f"{stem}_compare.png"}
  with np.load(tmp_path / "out" / f"{stem}.npz") as result:
    assert result["sh_lighting"].shape == (9, 3) and result["texture"].ndim == 1
    assert "Laplacian" in str(result["albedo_model"])
    assert float(result["photometric_error"]) < 0.15
  compare = cv2.imread(str(tmp_path / "out" / f"{stem}_compare.png"))
  assert compare.shape == (256, 768, 3)
  render = compare[:, 256:512]
  assert (render.sum(axis=2) > 0).mean() > 0.2  # the head is drawn
  overlay = cv2.imread(str(tmp_path / "out" / f"{stem}_overlay.png"))
  photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
  changed = np.any(np.abs(overlay.astype(int) - photo) > 8, axis=2)
  # The fitted render resembles the face, so only part of it differs visibly from the photo.
  assert changed[150:300, 180:320].mean() > 0.03 and changed[400:, :100].mean() < 0.01


def test_landmarks_on_the_device_fit_like_mediapipes(loaded_model, tmp_path):
  """`--landmarks device` (issue 22): the shared photos and two of them turned upside down and
  by a quarter turn fit through the engine with the face mesh in JAX; every row ok, and the
  relative landmark errors' median and largest within 5% of the MediaPipe run's on the upright
  photos (the issue's bar; measured 1-3%), the turned photos no worse than the upright ones'
  largest; the run summary says where the landmarks ran. A photometric fit with device
  landmarks exits 2 with one line."""
  photos = shared_photos()
  folder = tmp_path / "in"
  folder.mkdir()
  for photo in photos:
    shutil.copy(photo, folder / photo.name)
  for photo, turn in zip(photos[:2], (cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE)):
    cv2.imwrite(str(folder / f"turned_{photo.stem}.jpg"), cv2.rotate(cv2.imread(str(photo)), turn))
  device = _run(loaded_model, folder, tmp_path / "device", batch_size=8, landmarks_only=True,
                landmarks="device")
  reference = _run(loaded_model, [str(p) for p in photos], tmp_path / "mediapipe", batch_size=8,
                   landmarks_only=True)
  assert device["options"]["landmarks"] == "device"
  assert all(image["status"] == "ok" for image in device["images"]), device["images"]

  def errors(manifest, turned):
    return np.array([image["landmark_error_relative"] for image in manifest["images"]
                     if image["source_relpath"].startswith("turned_") == turned])
  upright, expected = errors(device, False), errors(reference, False)
  assert len(upright) == len(expected) == len(photos)
  for statistic in (np.median, np.max):
    assert abs(statistic(upright) / statistic(expected) - 1.0) <= 0.05, (upright, expected)
  assert errors(device, True).max() <= upright.max()
  usage = subprocess.run(
      [sys.executable, "-m", "jflame.cli.fit", "--input", str(folder), "--output",
       str(tmp_path / "out"), "--mode", "photometric", "--landmarks", "device"],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
  assert usage.returncode == 2 and "--landmarks mediapipe" in usage.stderr
  assert len(usage.stderr.strip().splitlines()) == 1, usage.stderr
