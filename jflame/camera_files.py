"""Camera files of calibrated capture rigs, read and checked before anything is fitted with them.

Every camera of a rig comes out in jflame's one convention (`jflame.camera`: OpenCV, x right,
y down, z forward, pixels of the image the camera took): a `RigCamera` with its 3 x 3
intrinsics, its world-to-camera 4 x 4, its image size and OpenCV's lens distortion. A camera file
from another convention is the common failure of multi-view tools, so loading refuses, with one
line naming the file and the camera, anything that cannot be a camera (a rotation that is not
one, a non-positive focal length, a principal point outside the image, a distortion vector of a
length OpenCV does not define) and a rig whose cameras all look away from the point they share
(extrinsics given camera-to-world).

Formats (docs/FORMAT.md, "Camera files"):

* NeRSemble `camera_params.json`: `world_2_cam` serial -> 4 x 4 OpenCV world-to-camera;
  `intrinsics` one shared 3 x 3 or serial -> 3 x 3, pixels. The file holds no image size, and
  the intrinsics are in pixels of the images they were calibrated on, so the size comes from
  `height` / `width` in the file or from the images (`image_sizes`), never assumed.
* jflame's own `cameras.json`: `{"jflame_cameras": 1, "cameras": {serial: {"K", "R", "t",
  "width", "height", "distortion"?}}}`, R and t world-to-camera (OpenCV), t in metres.
* Ava-256 `camera_calibration.json`: `{"KRT": [{"cameraId", "K", "T", "distortion"}]}` with K
  (3 x 3) and T (4 x 4 world-to-camera) stored TRANSPOSED, the world in millimetres, OpenCV's
  (k1, k2, p1, p2), for 2668 x 4096 images (their `utils.load_camera_calibration`). The
  translation is read in metres; images downsampled by a whole factor (as Ava-256 ships them)
  scale the intrinsics by it, as their loader's `downsample` does.
"""

import dataclasses
import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from jflame.camera import DISTORTION_SIZE, distort
from jflame.errors import ConfigError, InputError

JFLAME_CAMERAS_VERSION = 1
# OpenCV's distortion vectors: (k1, k2, p1, p2[, k3[, k4, k5, k6[, s1, s2, s3, s4[, tx, ty]]]]).
DISTORTION_LENGTHS = (0, 4, 5, 8, 12, 14)
_ROTATION_TOLERANCE = 1e-4
# Ava-256: the image size its calibration is for (its loader's constants) and its world unit.
AVA256_IMAGE_SIZE = (2668, 4096)
AVA256_METRES_PER_UNIT = 0.001


@dataclasses.dataclass(frozen=True)
class RigCamera:
  """One calibrated camera of a rig, in jflame's convention.

  Attributes:
    serial: the camera's name in the file (images are `cam_<serial>.<ext>`).
    intrinsics: (3, 3) K in pixels of an image of `image_size`.
    world_to_camera: (4, 4) p_cam = R p_world + t, world units as the file's (metres for jflame's
      format; NeRSemble's are metres).
    image_size: (width, height) in pixels.
    distortion: OpenCV coefficients, one of DISTORTION_LENGTHS long (empty: none).
  """
  serial: str
  intrinsics: np.ndarray
  world_to_camera: np.ndarray
  image_size: Tuple[int, int]
  distortion: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

  @property
  def rotation(self) -> np.ndarray:
    return self.world_to_camera[:3, :3]

  @property
  def translation(self) -> np.ndarray:
    return self.world_to_camera[:3, 3]

  @property
  def centre(self) -> np.ndarray:
    """(3,) the camera's position in world coordinates."""
    return -self.rotation.T @ self.translation


def look_at(centre, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
  """(4, 4) world-to-camera (OpenCV: x right, y down, z forward) of a camera at `centre` looking
  at `target`, the world's `up` up in its image: for building a rig by hand."""
  centre = np.asarray(centre, np.float64)
  forward = np.asarray(target, np.float64) - centre
  forward /= np.linalg.norm(forward)
  right = np.cross(forward, up)
  right /= np.linalg.norm(right)
  rotation = np.stack([right, np.cross(forward, right), forward])
  matrix = np.eye(4)
  matrix[:3, :3], matrix[:3, 3] = rotation, -rotation @ centre
  return matrix


def padded_distortion(camera: RigCamera) -> np.ndarray:
  """(camera.DISTORTION_SIZE,) the camera's coefficients padded with zeros: one shape for every
  camera of a rig, so views batch."""
  padded = np.zeros(DISTORTION_SIZE)
  padded[:len(camera.distortion)] = camera.distortion
  return padded


def project_points(camera: RigCamera, points_world) -> np.ndarray:
  """(N, 3) world points -> (N, 2) pixels of the camera's image in float64 on the host, with the
  lens model the fit uses (`jflame.camera.distort`; `project_calibrated` is the JAX version)."""
  points = np.asarray(points_world, np.float64) @ camera.rotation.T + camera.translation
  x, y = distort(padded_distortion(camera), points[:, 0] / points[:, 2],
                 points[:, 1] / points[:, 2])
  k = camera.intrinsics
  return np.stack([k[0, 0] * x + k[0, 1] * y + k[0, 2], k[1, 1] * y + k[1, 2]], axis=-1)


# --- reading -------------------------------------------------------------------------------------

def load_cameras(path, image_sizes: Optional[Mapping[str, Tuple[int, int]]] = None
                 ) -> Dict[str, RigCamera]:
  """serial -> RigCamera of a camera file (NeRSemble's or jflame's, told apart by their keys).

  Args:
    path: the camera file.
    image_sizes: serial -> (width, height) of the images, for a file without image sizes; a
      size in the file must agree with it.

  Raises:
    InputError: the file is missing or not JSON.
    ConfigError: one line naming the file (and the camera) that says what is wrong.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise InputError(f"camera file not found: {path}")
  try:
    content = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise InputError(f"{path}: not a JSON camera file ({error})") from None
  if not isinstance(content, dict):
    raise ConfigError(f"{path}: a camera file is a JSON object, got {type(content).__name__}")
  if "jflame_cameras" in content:
    cameras = _jflame_cameras(content, path)
  elif "world_2_cam" in content:
    cameras = _nersemble_cameras(content, path)
  elif "KRT" in content:
    cameras = _ava256_cameras(content, path)
  else:
    raise ConfigError(f"{path}: not a camera file jflame reads: expected NeRSemble's "
                      f"'world_2_cam' and 'intrinsics', Ava-256's 'KRT' or jflame's "
                      f"'jflame_cameras' (docs/FORMAT.md), found keys {sorted(content)[:8]}")
  cameras = {serial: _sized(serial, fields, image_sizes, path)
             for serial, fields in cameras.items()}
  for camera in cameras.values():
    _check_camera(camera, path)
  check_rig_faces_inward(cameras, path)
  return cameras


def _matrix(value, shape, what, path) -> np.ndarray:
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    array = None
  if array is None or array.shape != shape or not np.all(np.isfinite(array)):
    got = "non-numbers" if array is None else f"shape {array.shape}"
    raise ConfigError(f"{path}: {what} must be {shape[0]} x {shape[1] if len(shape) > 1 else 1} "
                      f"finite numbers, got {got}")
  return array


def _size(width, height, what, path) -> Tuple[int, int]:
  if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
    raise ConfigError(f"{path}: {what}: image width and height must be positive integers, got "
                      f"{width!r} x {height!r}")
  return int(width), int(height)


def _nersemble_cameras(content, path) -> Dict[str, dict]:
  extrinsics, intrinsics = content["world_2_cam"], content.get("intrinsics")
  if not isinstance(extrinsics, dict) or not extrinsics:
    raise ConfigError(f"{path}: 'world_2_cam' must map camera serials to 4 x 4 matrices")
  if intrinsics is None:
    raise ConfigError(f"{path}: no 'intrinsics' (one shared 3 x 3, or serial -> 3 x 3)")
  size = None
  if "width" in content or "height" in content:
    size = _size(content.get("width"), content.get("height"), "the file's", path)
  cameras = {}
  for serial, matrix in extrinsics.items():
    serial = str(serial)
    if isinstance(intrinsics, dict):
      if serial not in intrinsics:
        raise ConfigError(f"{path}: camera {serial} has extrinsics but no intrinsics")
      k = intrinsics[serial]
    else:
      k = intrinsics
    cameras[serial] = dict(
        intrinsics=_matrix(k, (3, 3), f"camera {serial}'s intrinsics", path),
        world_to_camera=_matrix(matrix, (4, 4), f"camera {serial}'s world_2_cam", path),
        image_size=size, distortion=np.zeros(0))
  if isinstance(intrinsics, dict):
    extra = sorted(set(map(str, intrinsics)) - set(cameras))
    if extra:
      raise ConfigError(f"{path}: intrinsics for cameras without extrinsics: {extra[:5]}")
  return cameras


def _ava256_cameras(content, path) -> Dict[str, dict]:
  entries = content["KRT"]
  if not isinstance(entries, list) or not entries:
    raise ConfigError(f"{path}: 'KRT' must be a list of cameras, each with cameraId, K, T and "
                      f"distortion")
  cameras = {}
  for number, entry in enumerate(entries):
    if not isinstance(entry, dict) or "cameraId" not in entry:
      raise ConfigError(f"{path}: KRT entry {number} has no cameraId")
    serial = str(entry["cameraId"])
    missing = [key for key in ("K", "T") if key not in entry]
    if missing:
      raise ConfigError(f"{path}: camera {serial} has no {', '.join(missing)}")
    if serial in cameras:
      raise ConfigError(f"{path}: camera {serial} is listed twice")
    # Stored transposed: K's bottom row holds (cx, cy, 1), T's the translation.
    k = _matrix(entry["K"], (3, 3), f"camera {serial}'s K", path).T
    world_to_camera = _matrix(entry["T"], (4, 4), f"camera {serial}'s T", path).T
    world_to_camera[:3, 3] *= AVA256_METRES_PER_UNIT
    distortion = np.asarray(entry.get("distortion", []), np.float64).reshape(-1)
    cameras[serial] = dict(intrinsics=k, world_to_camera=world_to_camera,
                           image_size=AVA256_IMAGE_SIZE, distortion=distortion,
                           downsampled=True)
  return cameras


def _downsampling(calibrated: Tuple[int, int], image: Tuple[int, int]) -> Optional[float]:
  """The whole factor by which `image` is `calibrated` downsampled (each side rounded), else
  None."""
  factor = calibrated[0] / image[0]
  whole = round(factor)
  if whole < 1 or abs(factor - whole) > 0.01:
    return None
  if all(round(side / whole) == got or side // whole == got
         for side, got in zip(calibrated, image)):
    return float(whole)
  return None


def _jflame_cameras(content, path) -> Dict[str, dict]:
  version = content["jflame_cameras"]
  if version != JFLAME_CAMERAS_VERSION:
    raise ConfigError(f"{path}: jflame_cameras {version!r}; this jflame reads version "
                      f"{JFLAME_CAMERAS_VERSION}")
  entries = content.get("cameras")
  if not isinstance(entries, dict) or not entries:
    raise ConfigError(f"{path}: 'cameras' must map camera serials to their K, R, t, width "
                      f"and height")
  cameras = {}
  for serial, entry in entries.items():
    serial = str(serial)
    if not isinstance(entry, dict):
      raise ConfigError(f"{path}: camera {serial} must be an object with K, R, t, width, height")
    missing = [key for key in ("K", "R", "t") if key not in entry]
    if missing:
      raise ConfigError(f"{path}: camera {serial} has no {', '.join(missing)}")
    world_to_camera = np.eye(4)
    world_to_camera[:3, :3] = _matrix(entry["R"], (3, 3), f"camera {serial}'s R", path)
    world_to_camera[:3, 3] = _matrix(entry["t"], (3,), f"camera {serial}'s t", path)
    size = None
    if "width" in entry or "height" in entry:
      size = _size(entry.get("width"), entry.get("height"), f"camera {serial}", path)
    distortion = np.asarray(entry.get("distortion", []), np.float64).reshape(-1)
    cameras[serial] = dict(
        intrinsics=_matrix(entry["K"], (3, 3), f"camera {serial}'s K", path),
        world_to_camera=world_to_camera, image_size=size, distortion=distortion)
  return cameras


def _sized(serial: str, fields: dict, image_sizes, path) -> RigCamera:
  """The camera with its image size: the file's, else the images'; both must agree."""
  size = fields["image_size"]
  intrinsics = fields["intrinsics"]
  from_images = (image_sizes or {}).get(serial)
  if from_images is not None:
    from_images = _size(*from_images, what=f"camera {serial}'s image", path=path)
    factor = (_downsampling(size, from_images)
              if fields.get("downsampled") and size != from_images else None)
    if factor is not None:
      intrinsics = intrinsics.copy()
      intrinsics[:2] /= factor
      size = from_images
    elif size is not None and size != from_images:
      raise ConfigError(f"{path}: camera {serial} is calibrated for {size[0]} x {size[1]} "
                        f"images but its image is {from_images[0]} x {from_images[1]}: scale "
                        f"the intrinsics or give the images they were calibrated on")
    size = from_images
  if size is None:
    raise ConfigError(f"{path}: no image size for camera {serial}: the file has no "
                      f"width / height and no image of that camera was given (intrinsics are "
                      f"in pixels of one image size, so it is never assumed)")
  return RigCamera(serial=serial, intrinsics=intrinsics,
                   world_to_camera=fields["world_to_camera"], image_size=size,
                   distortion=fields["distortion"])


def _check_camera(camera: RigCamera, path) -> None:
  where = f"{path}: camera {camera.serial}"
  k = camera.intrinsics
  if not (k[0, 0] > 0 and k[1, 1] > 0):
    raise ConfigError(f"{where}: focal lengths must be positive pixels, got {k[0, 0]:g}, "
                      f"{k[1, 1]:g}")
  if abs(k[1, 0]) > 1e-9 or np.abs(k[2] - (0, 0, 1)).max() > 1e-9:
    raise ConfigError(f"{where}: intrinsics must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] "
                      f"(a transposed K puts cx, cy in the bottom row), got {k.tolist()}")
  width, height = camera.image_size
  if not (0 <= k[0, 2] <= width and 0 <= k[1, 2] <= height):
    raise ConfigError(f"{where}: principal point ({k[0, 2]:g}, {k[1, 2]:g}) lies outside its "
                      f"{width} x {height} image: intrinsics for another image size?")
  rotation, bottom = camera.rotation, camera.world_to_camera[3]
  if np.abs(bottom - (0, 0, 0, 1)).max() > 1e-9:
    raise ConfigError(f"{where}: a 4 x 4 world-to-camera ends in [0, 0, 0, 1], got "
                      f"{bottom.tolist()}")
  if (np.abs(rotation.T @ rotation - np.eye(3)).max() > _ROTATION_TOLERANCE
      or np.linalg.det(rotation) < 0):
    raise ConfigError(f"{where}: the extrinsics' 3 x 3 block is not a rotation (orthonormal, "
                      f"determinant +1)")
  if len(camera.distortion) not in DISTORTION_LENGTHS or not np.all(
      np.isfinite(camera.distortion)):
    raise ConfigError(f"{where}: distortion must be OpenCV's {DISTORTION_LENGTHS[1:]} "
                      f"coefficients, got {len(camera.distortion)}")
  if len(camera.distortion) == 14 and np.any(camera.distortion[12:] != 0):
    raise ConfigError(f"{where}: OpenCV's tilted-sensor terms (tx, ty) are not supported")


def check_rig_faces_inward(cameras: Mapping[str, RigCamera], path) -> None:
  """Refuses a rig of two or more cameras whose optical axes' nearest common point is not in
  front of most of them: a rig looks at its subject. A camera-to-world file read as
  world-to-camera puts every camera of a rig that looks at the world origin at one point (its
  distance from the origin along z), with that point at zero depth, so it is caught here; other
  conventions' axes (y up, z backwards) put the subject behind the cameras."""
  if len(cameras) < 2:
    return
  centres = np.stack([camera.centre for camera in cameras.values()])
  axes = np.stack([camera.rotation[2] for camera in cameras.values()])  # +z in world
  # The point nearest to every axis line: sum_i (I - a_i a_i^T) (p - c_i) = 0.
  projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
  system, target = projectors.sum(0), np.einsum("nij,nj->i", projectors, centres)
  if np.linalg.cond(system) > 1e8:
    return  # parallel axes: no common point to judge by
  point = np.linalg.solve(system, target)
  depths = np.einsum("ni,ni->n", point[None] - centres, axes)
  # In front: by more than a micrometre per metre of the rig's size (rounding, not geometry).
  in_front = depths > 1e-6 * max(np.abs(centres).max(), np.abs(point).max(), 1e-3)
  if np.sum(in_front) * 2 <= len(depths):
    raise ConfigError(
        f"{path}: the cameras look away from the point their axes meet ({int(np.sum(in_front))}"
        f" of {len(depths)} have it in front): extrinsics are read as world-to-camera (OpenCV); "
        f"a camera-to-world file must be inverted first")


# --- a moment's images -----------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def moment_images(folder, serials) -> Dict[str, Path]:
  """serial -> image of one moment (timestep) folder holding `cam_<serial>.<ext>` per camera
  (NeRSemble's naming), in the order of `serials`.

  Raises:
    InputError: one line naming what does not match: a camera of the file with no image, an
      image of a camera the file does not have, two images of one camera.
  """
  folder = Path(folder)
  found: Dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.name.startswith("cam_"):
      continue
    serial = path.stem[len("cam_"):]
    if serial in found:
      raise InputError(f"{folder}: two images of camera {serial}: {found[serial].name}, "
                       f"{path.name}")
    found[serial] = path
  serials = [str(serial) for serial in serials]
  unknown = sorted(set(found) - set(serials))
  if unknown:
    raise InputError(f"{folder}: images of cameras the camera file does not have: "
                     f"{', '.join('cam_' + s for s in unknown[:5])} (the file has "
                     f"{', '.join(serials[:8])})")
  missing = [serial for serial in serials if serial not in found]
  if missing:
    raise InputError(f"{folder}: no image of camera(s) {', '.join(missing[:5])} "
                     f"(expected cam_<serial>.<ext>, e.g. cam_{missing[0]}.png)")
  return {serial: found[serial] for serial in serials}


def image_size_of(path) -> Tuple[int, int]:
  """(width, height) of an image file."""
  import cv2
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise InputError(f"cannot read image {path}")
  return int(image.shape[1]), int(image.shape[0])
