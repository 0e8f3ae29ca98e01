"""Writes a synthetic calibrated capture in NeRSemble's layout, with its truth.

  python tools/make_multiview_capture.py --output /tmp/capture [--views 3] [--moments 2]
      [--width 550] [--height 802] [--seed 0] [--texture astronaut|PHOTO|none] [--clip]

    <output>/camera_params.json          NeRSemble: world_2_cam serial -> 4x4 (OpenCV),
                                         intrinsics serial -> 3x3 (per camera, no image size)
    <output>/frames/<moment>/cam_<serial>.png
    <output>/truth.npz                   FLAME parameters per moment, the head's world pose,
                                         its world vertices (metres), the serials
    <output>/clips/cam_<serial>.mp4      with --clip: each camera's moments as a video (25 / s),
                                         for `jflame-track --cameras`

The SYNTHETIC FLAME-size head (labelled so in truth.npz), one identity, an expression and jaw per
moment, rendered by jflame's rasterizer from cameras spread over +-30 degrees (yaw) around it,
each with its own focal length and an off-centre principal point, in non-square images. The
renders are pinhole: the file has no distortion. For tests (tests/test_capture_command.py) and
for users to try `jflame-fit --cameras`.

Texture: MediaPipe places its points on the untextured head 8-12 px off (docs/ACCURACY.md), so by
default the head wears a photograph (`--texture`: scikit-image's public-domain astronaut, or a
face photo of your own; `none` renders it untextured, as before). The photo is fitted with the head (every landmark),
each vertex takes the photo pixel it projects to, and a thin-plate spline through the landmarks
moves those pixels so that each landmark's point on the head shows exactly where MediaPipe found
that landmark in the photo: the texture is attached to the vertices, so features stay at the
head's landmark points whatever the moment's expression and the camera. Where each vertex takes
its colour is kept under $JFLAME_HOME (or ~/.cache/jflame)/synthetic, keyed by the photo, the
head and jflame's code, so only the first capture made with a photo fits it.
"""

import hashlib
import io
import json
import tempfile
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from scipy.interpolate import RBFInterpolator
from scipy.spatial.transform import Rotation

import jflame
from jflame import FitConfig, atomic, camera_files, fit_images, flame, model_loading
from jflame.assets import search_folders
from jflame.camera import apply_affine, invert_affine, project_calibrated
from jflame.render import (Appearance, RasterSettings, face_adjacency, interpolate,
                           laplacian_albedo_model, neutral_lighting, rasterize, render_mesh,
                           vertex_normals)

_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the capture into.")
_VIEWS = flags.DEFINE_integer("views", 3, "Cameras.")
_MOMENTS = flags.DEFINE_integer("moments", 2, "Moments (timesteps).")
_WIDTH = flags.DEFINE_integer("width", 550, "Image width.")
_HEIGHT = flags.DEFINE_integer("height", 802, "Image height.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_CLIP = flags.DEFINE_bool(
    "clip", False, "The moments are a clip: the head turns smoothly (yaw +-20 degrees, nodding "
    "+-6, 1 Hz at 25 moments / s), opens its jaw and changes expression slowly; each camera's "
    "moments are also written as clips/cam_<serial>.mp4 (without: independent random moments).")
_TEXTURE = flags.DEFINE_string(
    "texture", "astronaut", "What the head wears: 'astronaut' (scikit-image's public-domain "
    "photograph), the path of a face photo, or 'none' (untextured: the albedo model's mean "
    "colour, lit).")
flags.register_validator(
    "texture", lambda value: value in ("astronaut", "none") or Path(value).is_file(),
    "--texture must be 'astronaut', 'none' or the path of an existing photo")


def rig(views: int, width: int, height: int, distance: float = 0.8):
  """serial -> (K, world-to-camera) of cameras spread over +-30 degrees yaw, looking at the
  world origin (where the head is), y down."""
  cameras = {}
  yaws = np.linspace(-30.0, 30.0, views) if views > 1 else np.zeros(1)
  for index, yaw in enumerate(yaws):
    centre = distance * np.array([np.sin(np.radians(yaw)), -0.04, np.cos(np.radians(yaw))])
    world_to_camera = camera_files.look_at(centre)
    focal = 2.2 * width * (1 + 0.03 * index)
    k = np.array([[focal, 0, width / 2 + 9 * (index - 1)],
                  [0, focal * 1.001, height / 2 - 17 + 5 * index], [0, 0, 1]])
    cameras[f"2222000{37 + index}"] = (k, world_to_camera)
  return cameras


def render(model, vertices_world, k, world_to_camera, width, height, albedo, neighbors):
  """An untextured render of the mesh (the albedo model's mean colour, lit by one light fixed in
  the world, as a rig's lamps are) through a pinhole camera: (image (H, W, 3), alpha (H, W))."""
  camera_space = vertices_world @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
  pixels = project_calibrated(k, world_to_camera, jnp.zeros(14), vertices_world)
  screen = jnp.concatenate([pixels, camera_space[:, 2:3]], axis=1)
  lighting = neutral_lighting() * 0.75
  lighting = lighting.at[1].set(0.9).at[2].set(0.9)   # from above and the cameras' side
  output = render_mesh(screen, model.faces, vertex_normals(vertices_world, model.faces), albedo,
                       Appearance(texture=jnp.zeros(3), lighting=lighting), height, width,
                       RasterSettings(cull_backfaces=True), neighbors)
  return output.image, output.alpha


def smooth_motion(rng, moments: int, fps: float = 25.0):
  """Per moment of a clip: expression (50,), jaw opening (radians), head (yaw, pitch) in
  degrees, head translation (3,) metres: a turn of +-20 degrees and a nod of +-6 at 1 Hz, the jaw
  opening twice, expressions blended slowly between two random ones."""
  t = np.arange(moments) / fps
  angles = np.stack([20.0 * np.sin(2 * np.pi * t), 6.0 * np.sin(2 * np.pi * t + 1.0)], axis=1)
  jaw = 0.12 * np.sin(np.pi * t) ** 2
  start, end = rng.normal(scale=0.5, size=(2, 50))
  blend = 0.5 - 0.5 * np.cos(np.pi * t / max(t[-1], 1e-6))
  expression = start + blend[:, None] * (end - start)
  translation = np.stack([0.01 * np.sin(2 * np.pi * 0.5 * t), np.zeros_like(t),
                          np.zeros_like(t)], axis=1)
  return expression, jaw, angles, translation


def photo_texture(loaded, photo: Path):
  """The photo (H, W, 3 RGB, uint8) and where each vertex of the head takes its colour in it,
  (V, 2) photo pixels (centres at +0.5).

  The photo is fitted with the head on every landmark; each vertex gets the pixel it projects
  to, moved by a thin-plate spline through the landmarks that carries each fitted landmark onto
  the detected one, so every landmark point of the head wears the pixel where MediaPipe found
  that landmark. Raises SystemExit with one line when the photo has no fittable face."""
  fitted = fit_images([photo], loaded, FitConfig().replace(landmark_regions=None))[0]
  if not fitted.ok:
    raise SystemExit(f"--texture {photo}: {fitted.entry['status']}: {fitted.entry['message']}")
  arrays = fitted.arrays
  original_from_crop = invert_affine(np.asarray(arrays["crop_from_original"]).reshape(2, 3))
  pixels = apply_affine(original_from_crop, np.asarray(fitted.meshes.pixels, np.float64))
  landmarks = np.asarray(arrays["landmarks_fitted_original"], np.float64).reshape(-1, 2)
  detected = np.asarray(arrays["landmarks_detected_original"], np.float64).reshape(-1, 2)
  known = np.all(np.isfinite(detected), axis=1)
  warp = RBFInterpolator(landmarks[known], detected[known] - landmarks[known],
                         kernel="thin_plate_spline")
  image = cv2.cvtColor(cv2.imread(str(photo), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  return image, pixels + warp(pixels)


def texture_cache_path(loaded, photo: Path) -> Path:
  """Where `photo_texture`'s vertex pixels for this photo and head are kept: a name that
  changes with the photo's bytes, the head's arrays and any of jflame's or this tool's code."""
  digest = hashlib.blake2b(photo.read_bytes(), digest_size=10)
  model = loaded.model
  for array in (model.v_template, model.faces, model.shapedirs):
    digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
  package = Path(jflame.__file__).resolve().parent
  for path in sorted(package.rglob("*.py")) + [Path(__file__).resolve()]:
    digest.update(path.read_bytes())
  return search_folders()[0] / "synthetic" / f"texture-{digest.hexdigest()}.npy"


def cached_photo_texture(loaded, photo: Path):
  """`photo_texture`, its vertex pixels read from `texture_cache_path` when there (a missing,
  unreadable or unwritable copy only means fitting the photo again)."""
  path = texture_cache_path(loaded, photo)
  try:
    pixels = np.load(path)
    if pixels.shape == (loaded.model.v_template.shape[0], 2):
      image = cv2.cvtColor(cv2.imread(str(photo), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
      return image, pixels
  except (OSError, ValueError):
    pass
  image, pixels = photo_texture(loaded, photo)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, _npy_bytes(pixels))
  except OSError:
    pass
  return image, pixels


def _npy_bytes(array) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  return buffer.getvalue()


def photo_coordinates(model, vertices_world, k, world_to_camera, width, height, texture_pixels,
                      neighbors):
  """Per pixel of a view, where its colour lies in the texture photo: ((H, W, 2) photo pixels,
  (H, W) coverage)."""
  camera_space = vertices_world @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
  pixels = project_calibrated(k, world_to_camera, jnp.zeros(14), vertices_world)
  screen = jnp.concatenate([pixels, camera_space[:, 2:3]], axis=1)
  fragments = rasterize(screen, model.faces, height, width,
                        RasterSettings(cull_backfaces=True), neighbors)
  return interpolate(texture_pixels, fragments, model.faces), fragments.coverage


def textured_bgr(photo, coordinates, coverage):
  """uint8 BGR: the photo sampled where the head covers the view, on a dark grey background."""
  coordinates = np.asarray(coordinates, np.float32) - 0.5   # cv2 puts pixel centres at integers
  colour = cv2.remap(photo, coordinates[..., 0], coordinates[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE).astype(np.float32) / 255
  coverage = np.clip(np.asarray(coverage, np.float32), 0, 1)[..., None]
  image = colour * coverage + (1 - coverage) * 0.15
  return cv2.cvtColor(np.clip(image * 255, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def view_drawer(loaded, texture: str, width: int, height: int):
  """draw(world vertices, K, world-to-camera) -> uint8 BGR view, the head wearing `texture`
  (the --texture flag's value)."""
  model = loaded.model
  neighbors = jnp.asarray(face_adjacency(np.asarray(model.faces)))
  if texture == "none":
    albedo = laplacian_albedo_model(model.v_template, model.faces, 1)
    grey = jax.jit(lambda v, k, e: render(model, v, k, e, width, height, albedo, neighbors))
    return lambda v, k, e: to_bgr(*grey(v, k, e))
  with tempfile.TemporaryDirectory() as scratch:
    photo = Path(texture)
    if texture == "astronaut":
      from skimage import data  # only this texture needs scikit-image
      photo = Path(scratch) / "astronaut.png"
      cv2.imwrite(str(photo), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    image, texture_pixels = cached_photo_texture(loaded, photo)
  locate = jax.jit(lambda v, k, e: photo_coordinates(
      model, v, k, e, width, height, jnp.asarray(texture_pixels, jnp.float32), neighbors))
  return lambda v, k, e: textured_bgr(image, *locate(v, k, e))


def to_bgr(image, alpha):
  """uint8 BGR on a dark grey background."""
  image = np.asarray(image) + (1 - np.asarray(alpha))[..., None] * 0.15
  return cv2.cvtColor(np.clip(image * 255, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def main(argv):
  del argv
  out = Path(_OUTPUT.value)
  loaded = model_loading.load_model(None, None)
  model = loaded.model
  rng = np.random.default_rng(_SEED.value)
  width, height = _WIDTH.value, _HEIGHT.value
  cameras = rig(_VIEWS.value, width, height)
  shape = rng.normal(scale=0.5, size=100)
  draw = view_drawer(loaded, _TEXTURE.value, width, height)
  truth = dict(synthetic_model=model.name, serials=np.array(list(cameras)), shape=shape,
               texture=_TEXTURE.value,
               expression=[], jaw_rotation=[], head_rotation=[], head_translation=[],
               vertices_world=[], moments=[])
  motion = smooth_motion(rng, _MOMENTS.value) if _CLIP.value else None
  for moment in range(_MOMENTS.value):
    if motion is None:
      expression = rng.normal(scale=0.5, size=50)
      jaw = abs(rng.normal(scale=0.08))
      head_rotation = Rotation.from_euler("yx", rng.normal(scale=8.0, size=2), degrees=True)
      head_translation = rng.normal(scale=0.01, size=3)
    else:
      expression, jaw, angles, head_translation = (part[moment] for part in motion)
      head_rotation = Rotation.from_euler("yx", angles, degrees=True)
    params = flame.FlameParams.zeros(100, 50).replace(
        shape=jnp.asarray(shape, jnp.float32), expression=jnp.asarray(expression, jnp.float32),
        jaw_rotation=jnp.asarray([jaw, 0, 0], jnp.float32))
    vertices = np.asarray(flame.flame_forward(model, params)[0], np.float64)
    # The synthetic head's face centre at the world origin, the head turned about it.
    centre = vertices[vertices[:, 2] > np.percentile(vertices[:, 2], 70)].mean(axis=0)
    world = (vertices - centre) @ head_rotation.as_matrix().T + head_translation
    translation = head_translation - head_rotation.as_matrix() @ centre
    name = f"timestep_{moment:06d}"
    folder = out / "frames" / name
    folder.mkdir(parents=True, exist_ok=True)
    for serial, (k, world_to_camera) in cameras.items():
      image = draw(jnp.asarray(world, jnp.float32), jnp.asarray(k, jnp.float32),
                   jnp.asarray(world_to_camera, jnp.float32))
      cv2.imwrite(str(folder / f"cam_{serial}.png"), image)
    truth["expression"].append(np.asarray(params.expression))
    truth["jaw_rotation"].append(np.asarray(params.jaw_rotation))
    truth["head_rotation"].append(head_rotation.as_rotvec())
    truth["head_translation"].append(translation)
    truth["vertices_world"].append(world)
    truth["moments"].append(name)
  if _CLIP.value:
    (out / "clips").mkdir(exist_ok=True)
    for serial in cameras:
      writer = cv2.VideoWriter(str(out / "clips" / f"cam_{serial}.mp4"),
                               cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (width, height))
      for name in truth["moments"]:
        writer.write(cv2.imread(str(out / "frames" / name / f"cam_{serial}.png")))
      writer.release()
  (out / "camera_params.json").write_text(json.dumps(dict(
      world_2_cam={s: e.tolist() for s, (k, e) in cameras.items()},
      intrinsics={s: k.tolist() for s, (k, e) in cameras.items()})))
  np.savez(out / "truth.npz", **{key: np.asarray(value) for key, value in truth.items()})
  print(f"wrote {_MOMENTS.value} moments x {len(cameras)} views of the SYNTHETIC head to {out}")


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main)
