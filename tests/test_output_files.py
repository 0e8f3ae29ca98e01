"""`jflame-fit` end to end with non-default flags, checked by the CONTENT of what it writes:
every flag reaches the configuration and the files, every batch is fitted, each result belongs
to its photo, meshes are the fitted model in metres, renders are the renderer's.

The command runs as a subprocess (as a user runs it) with its search folders pointed at an empty
place, so it always uses the built-in synthetic head; per-image results are found by globbing,
not by file name, and matched to their photos by the image size each photo is given.
"""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from jflame import flame, synthetic
from jflame.camera import Camera, apply_affine, screen_space, to_camera_space
from jflame.config import FitConfig
from jflame.render import (Appearance, face_adjacency, laplacian_albedo_model, render_mesh,
                           vertex_normals)
from jflame.landmarks import LandmarkWeights
from tests.conftest import PROJECT_ROOT, expected_region_weights, share_caches, user_xla_flags

PARAM_KEYS = ("shape", "expression", "global_rotation", "neck_rotation", "jaw_rotation",
              "left_eye_rotation", "right_eye_rotation")
CAMERA_KEYS = ("rotation", "translation", "focal_length", "principal_point")


def isolated_env(tmp_path, cold=False):
  """The environment of a command that must not find any model file of this machine's user;
  `cold`: nor the suite's compiled programs and synthetic head (a new user's first run)."""
  home = tmp_path / "home"
  (home / "jflame").mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, HOME=str(home), JFLAME_HOME=str(home / "jflame"))
  if cold:   # and compiled as a user's run compiles (the suite's own XLA flag left out)
    return user_xla_flags(env)
  share_caches(home / "jflame")
  return env


def run_command(args, tmp_path, timeout=600, script=("-m", "jflame.cli.fit"), cold=False):
  done = subprocess.run([sys.executable, *script, *map(str, args)], cwd=PROJECT_ROOT,
                        env=isolated_env(tmp_path, cold), capture_output=True, text=True,
                        timeout=timeout)
  return done


def load_results(folder):
  """{image_size (w, h): dict of arrays} of every .npz result under `folder`."""
  results = {}
  for path in sorted(folder.rglob("*.npz")):
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
    results[tuple(int(v) for v in arrays["image_size"])] = dict(arrays, path=path)
  return results


def params_of(arrays):
  return flame.FlameParams(**{key: jnp.asarray(arrays[key], jnp.float32) for key in PARAM_KEYS})


def camera_of(arrays, prefix="camera_"):
  return Camera(**{key: jnp.asarray(arrays[prefix + key], jnp.float32) for key in CAMERA_KEYS})


def obj_vertices(path):
  """The `v x y z` lines of a Wavefront .obj, read without a mesh library."""
  rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
  return np.asarray(rows, np.float64)


def write_rgb(path, rgb):
  assert cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def synthetic_head():
  """The model the command uses when it finds no FLAME file (seed 0)."""
  return synthetic.synthetic_flame("flame", seed=0)


# --- Five photos, batches of two, non-default flags --------------------------------------------

def _variants():
  """Five different photos of the astronaut, each with its own size, and the map from the
  original photo's pixels to each one's (x, y) -> (x', y')."""
  photo = skimage.data.astronaut()
  size = photo.shape[0]
  grey = np.full_like(photo, 128)
  variants = {}
  variants["original"] = (photo, lambda p: p)
  mirrored = np.concatenate([photo[:, ::-1], grey[:48]], axis=0)           # 512 x 560
  variants["mirrored"] = (mirrored, lambda p: np.stack([size - p[:, 0], p[:, 1]], axis=1))
  small = cv2.resize(photo, (410, 410), interpolation=cv2.INTER_AREA)
  small = np.concatenate([small, np.full((410, 20, 3), 128, np.uint8)], axis=1)  # 430 x 410
  variants["small"] = (small, lambda p: p * (410 / size))
  shifted = np.concatenate([grey[:, :40], photo], axis=1)                  # 552 x 512
  variants["shifted"] = (shifted, lambda p: p + [40.0, 0.0])
  angle = 8.0
  matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
  matrix[:, 2] += 4.0                                                       # onto a 520 canvas
  turned = cv2.warpAffine(photo, matrix, (520, 520), flags=cv2.INTER_LINEAR,
                          borderValue=(128, 128, 128))
  # OpenCV maps pixel centres (integers); jflame's centres sit at +0.5.
  variants["turned"] = (turned, lambda p: (p - 0.5) @ matrix[:, :2].T + matrix[:, 2] + 0.5)
  return variants


@pytest.fixture(scope="module")
def five_photo_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("five")
  folder = tmp / "photos"
  folder.mkdir()
  variants = _variants()
  for name, (image, _) in variants.items():
    write_rgb(folder / f"{name}.png", image)
  out = tmp / "out"
  done = run_command(["--input", folder, "--output", out, "--batch_size", 2, "--num_shape", 37,
                      "--num_expression", 13, "--crop_size", 192, "--mesh_format", "ply",
                      "--nooverlay", "--landmark_solver", "adam", "--rigid_iterations", 30,
                      "--full_iterations", 30], tmp)
  assert done.returncode == 0, done.stdout + done.stderr
  return variants, out, load_results(out)


def test_every_batch_is_fitted_and_each_result_is_its_photos(five_photo_run):
  """Five photos with --batch_size 2 (three batches, the last padded): each photo gets its own
  successful fit, whose landmarks sit on that photo's face (the original photo's fit carried
  over by the known flip, scale, shift or rotation that made it)."""
  variants, _, results = five_photo_run
  sizes = {name: (image.shape[1], image.shape[0]) for name, (image, _) in variants.items()}
  assert sorted(results) == sorted(sizes.values())
  reference = results[sizes["original"]]["landmarks_fitted_original"]
  shapes = []
  for name, (image, transform) in variants.items():
    result = results[sizes[name]]
    assert str(result["status"]) == "ok"
    error = float(result["landmark_error_relative"])
    assert error < 0.02, (name, error)
    fitted = result["landmarks_fitted_original"]
    expected = transform(reference)
    scale = np.sqrt(np.prod(np.ptp(expected, axis=0)))
    centre_error = np.linalg.norm(fitted.mean(axis=0) - expected.mean(axis=0))
    assert centre_error < 0.03 * scale, (name, centre_error, scale)
    assert np.sqrt(np.prod(np.ptp(fitted, axis=0))) == pytest.approx(scale, rel=0.05), name
    shapes.append(result["shape"])
  differences = [np.abs(a - b).max() for i, a in enumerate(shapes) for b in shapes[i + 1:]]
  assert min(differences) > 1e-4  # five fits, not one written five times


def test_flags_reach_the_configuration_and_the_files(five_photo_run):
  """--num_shape, --num_expression, --landmark_solver adam with --rigid/--full_iterations,
  --crop_size, --mesh_format ply and --nooverlay each show in what is written; the fitted
  landmarks are MediaPipe's 162 feature points."""
  _, out, results = five_photo_run
  expected_indices = sorted(expected_region_weights(LandmarkWeights()))
  for result in results.values():
    assert result["shape"].shape == (37,) and result["expression"].shape == (13,)
    assert result["rigid_loss_history"].shape == (30,)
    assert result["full_loss_history"].shape == (30,)
    assert str(result["mode"]) == "landmark"
    assert int(result["crop_size"]) == 192
    np.testing.assert_allclose(
        apply_affine(result["crop_from_original"], result["landmarks_detected_original"]),
        result["landmarks_detected"], atol=1e-3)
    assert np.all((result["landmarks_detected"] > 0) & (result["landmarks_detected"] < 192))
    assert sorted(result["landmark_indices"].tolist()) == expected_indices
    mesh = result["path"].with_suffix(".ply")
    assert mesh.is_file(), mesh
  assert len(list(out.rglob("*.ply"))) == 5
  assert not list(out.rglob("*.obj")) and not list(out.rglob("*.png"))


def test_ply_meshes_are_the_fitted_model_in_metres(five_photo_run, synthetic_head):
  """Each .ply holds the fitted FLAME mesh (the forward model at the written parameters), axis by
  axis, in metres, with the model's triangles."""
  import trimesh
  model, _ = synthetic_head
  _, _, results = five_photo_run
  for result in results.values():
    mesh = trimesh.load(result["path"].with_suffix(".ply"), process=False)
    vertices, _ = flame.flame_forward(model, params_of(result))
    vertices = np.asarray(vertices)
    for axis in range(3):
      np.testing.assert_allclose(mesh.vertices[:, axis], vertices[:, axis], atol=2e-6,
                                 err_msg=f"axis {'xyz'[axis]}")
    np.testing.assert_array_equal(mesh.faces, np.asarray(model.faces))
    assert 0.1 < np.ptp(mesh.vertices[:, 1]) < 0.4  # a head, in metres


# --- Photometric mode, default mesh and pictures ------------------------------------------------

@pytest.fixture(scope="module")
def photometric_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("photometric")
  folder = tmp / "photos"
  folder.mkdir()
  write_rgb(folder / "astronaut.png", skimage.data.astronaut())
  out = tmp / "out"
  done = run_command(["--input", folder, "--output", out, "--mode", "photometric",
                      "--crop_size", 128, "--batch_size", 1, "--rigid_iterations", 10,
                      "--full_iterations", 10], tmp)
  assert done.returncode == 0, done.stdout + done.stderr
  (result,) = load_results(out).values()
  return out, result


@pytest.mark.slow
def test_mode_flag_makes_a_photometric_fit(photometric_run):
  """--mode photometric reaches the fit: appearance is fitted and written, and pictures of the
  render are written next to the result."""
  out, result = photometric_run
  assert str(result["mode"]) == "photometric" and str(result["status"]) == "ok"
  assert result["sh_lighting"].shape == (9, 3) and result["texture"].ndim == 1
  assert np.abs(result["texture"]).max() > 0 or np.abs(result["sh_lighting"][1:]).max() > 0
  assert int(result["crop_size"]) == 128
  assert len(list(out.rglob("*compare*.png"))) == 1 and len(list(out.rglob("*overlay*.png"))) == 1


@pytest.mark.slow
def test_obj_mesh_is_the_fitted_model_in_metres(photometric_run, synthetic_head):
  """The .obj holds the forward model at the written parameters, axis by axis, in metres."""
  model, _ = synthetic_head
  _, result = photometric_run
  written = obj_vertices(result["path"].with_suffix(".obj"))
  vertices = np.asarray(flame.flame_forward(model, params_of(result))[0])
  assert written.shape == vertices.shape
  for axis in range(3):
    np.testing.assert_allclose(written[:, axis], vertices[:, axis], atol=2e-6,
                               err_msg=f"axis {'xyz'[axis]}")


@pytest.mark.slow
def test_written_render_is_the_renderers_output(photometric_run, synthetic_head):
  """The comparison picture's render panel is the renderer's image of the written fit (mesh,
  camera, albedo coefficients and SH lighting), at the right brightness; its third panel is that
  render laid over the crop at 75% opacity."""
  out, result = photometric_run
  model, _ = synthetic_head
  config = FitConfig(mode="photometric")
  size = int(result["crop_size"])
  albedo = laplacian_albedo_model(model.v_template, model.faces, config.albedo_per_channel)
  vertices, _ = flame.flame_forward(model, params_of(result))
  camera = camera_of(result)
  appearance = Appearance(texture=jnp.asarray(result["texture"], jnp.float32),
                          lighting=jnp.asarray(result["sh_lighting"], jnp.float32))
  normals = vertex_normals(to_camera_space(camera, vertices), model.faces)
  rendered = render_mesh(screen_space(camera, vertices), model.faces, normals, albedo, appearance,
                         size, size, config.raster,
                         jnp.asarray(face_adjacency(np.asarray(model.faces))))
  render, alpha = np.asarray(rendered.image), np.asarray(rendered.alpha)
  (compare_path,) = out.rglob("*compare*.png")
  compare = cv2.cvtColor(cv2.imread(str(compare_path)), cv2.COLOR_BGR2RGB).astype(np.float64)
  assert compare.shape == (size, 3 * size, 3)
  crop, panel, blended = compare[:, :size], compare[:, size:2 * size], compare[:, 2 * size:]
  expected = np.clip(render * 255.0, 0, 255)
  covered = alpha > 0.5
  assert covered.mean() > 0.2
  assert np.abs(panel - expected).mean() < 1.5
  assert panel[covered].mean() == pytest.approx(expected[covered].mean(), rel=0.03)
  weight = 0.75 * np.clip(alpha, 0, 1)[..., None]
  colour = np.clip(render / np.maximum(alpha, 1e-6)[..., None], 0, 1) * 255.0
  expected_blend = crop * (1 - weight) + colour * weight
  assert np.abs(blended - expected_blend)[covered].mean() < 2.0


# --- tools/demo.py ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("original_from_crop", [[[2.0, 0.0, 10.0], [0.0, 2.0, 20.0]],
                                                [[0.0, -1.5, 90.0], [1.5, 0.0, 7.0]]])
def test_a_render_lands_on_the_photo_where_the_crop_says(original_from_crop):
  """warp_to_photo (the overlay pictures) puts a crop pixel's centre where the crop transform
  sends it, in jflame's convention (pixel centres at +0.5), to a twentieth of a pixel; a
  half-pixel convention slip or a one-pixel shift would move every overlay."""
  from jflame.output import warp_to_photo
  original_from_crop = np.asarray(original_from_crop)
  crop = np.zeros((24, 24, 1), np.float32)
  crop[9:12, 14:17, 0] = [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]  # centred on (15, 10)
  photo = warp_to_photo(crop, original_from_crop, (120, 120, 3))
  photo = photo if photo.ndim == 2 else photo[..., 0]
  rows, cols = np.indices(photo.shape)
  mass = photo.sum()
  centroid = np.array([(cols * photo).sum(), (rows * photo).sum()]) / mass + 0.5  # +0.5: centres
  expected = original_from_crop[:, :2] @ np.array([15.5, 10.5]) + original_from_crop[:, 2]
  np.testing.assert_allclose(centroid, expected, atol=0.05)


def test_the_overlay_wireframe_draws_front_facing_triangles_only():
  """draw_overlay's wireframe leaves out triangles that face away (clockwise on screen with y
  down, i.e. counter-clockwise seen from behind): a front-facing triangle on the left is drawn,
  the same triangle mirrored to face away on the right is not."""
  from jflame.output import draw_overlay
  photo = np.zeros((100, 200, 3), np.uint8)
  # Screen y points down: (10,80) -> (90,80) -> (50,10) has negative signed area (front).
  pixels = np.array([[10, 80], [90, 80], [50, 10], [110, 80], [190, 80], [150, 10]], float)
  faces = np.array([[0, 1, 2], [3, 5, 4]])
  canvas = draw_overlay(photo, pixels, faces, np.zeros((0, 2)), np.zeros((0, 2)))
  assert canvas[:, :100].max() > 50        # the front-facing triangle's wire
  assert canvas[:, 100:].max() == 0        # nothing for the one facing away


def test_demo_script_fits_the_astronaut(tmp_path):
  """`make demo`'s script runs: it writes the astronaut photo, fits it with the synthetic head
  (saying so first), and leaves a successful result and its overlay in the output folder. The
  suite's one cold start: an empty home, as a new user's first `make demo` has."""
  out = tmp_path / "demo"
  done = run_command(["--output", out, "--rigid_iterations", 20, "--full_iterations", 20],
                     tmp_path, script=("tools/demo.py",), cold=True)
  assert done.returncode == 0, done.stdout + done.stderr
  assert done.stdout.splitlines()[0].startswith("model: SYNTHETIC")
  assert (out / "input" / "astronaut.png").is_file()
  (result,) = load_results(out).values()
  assert str(result["status"]) == "ok" and tuple(result["image_size"]) == (512, 512)
  assert float(result["landmark_error_relative"]) < 0.02, result["landmark_error_relative"]
  assert len(list(out.rglob("*overlay*.png"))) == 1
  overlay = Path(done.stdout.splitlines()[-1].split("overlay: ")[1])
  assert overlay.is_file() and overlay.name.startswith("astronaut.png~")
