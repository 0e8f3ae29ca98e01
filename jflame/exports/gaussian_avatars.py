"""GaussianAvatars / VHAP: a tracked clip as their "NeRF-style" dataset and as a motion file.

Their FLAME (`flame_model/flame.py` of GaussianAvatars) is FLAME 2023 with 120 teeth vertices
appended after FLAME's own, 300 shape and 100 expression coefficients, and places the head in
the world by `vertices = LBS(shape, expr, [rotation, neck, jaw, eyes]) + translation`: the
global rotation turns the head about FLAME's root joint J0, then the translation moves it.
jflame keeps the head's pose in the camera (p_cam = R_c p_model + t_c, the model posed with its
own global rotation G), so with the camera fixed at the world's origin:

    rotation    = R_c G            (axis-angle)
    translation = R_c J0 + t_c - J0

where J0 is the root joint of the shaped, expression-blended mesh of that frame. Their cameras
are NeRF's: camera-to-world 4 x 4 with OpenGL axes (x right, y up, z backwards) and a field of
view; the principal point is assumed at the image centre and pixels square, so each frame is
placed on a canvas that puts jflame's principal point at its centre (nothing is cropped away).
"""

import math
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np
from scipy.spatial.transform import Rotation

from jflame.flame import FlameModel, FlameParams, rest_joints

EXPECTED_VARIANT = "flame2023"
READER = "GaussianAvatars / VHAP"
NUM_SHAPE, NUM_EXPRESSION = 300, 100
TEETH_VERTICES = 120   # GaussianAvatars' FlameHead(add_teeth=True) appends them
# OpenCV camera axes -> OpenGL's (y up, z backwards): the reader flips them back.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


@jax.jit
def root_joints(model: FlameModel, params: FlameParams) -> jax.Array:
  """(T, 3) FLAME's root joint J0 of every frame's shaped, expression-blended mesh (one vmapped
  call for the clip)."""
  return jax.vmap(lambda p: rest_joints(model, p)[0])(params)


def head_pose_in_fixed_camera(camera_rotation, camera_translation, global_rotation, root_joint
                              ) -> Tuple[np.ndarray, np.ndarray]:
  """(T, 3) axis-angle `rotation` and (T, 3) `translation` of GaussianAvatars' FLAME that put
  the head where jflame's camera saw it, with the camera at the world's origin (module doc)."""
  camera = Rotation.from_rotvec(np.asarray(camera_rotation, np.float64))
  combined = camera * Rotation.from_rotvec(np.asarray(global_rotation, np.float64))
  root = np.asarray(root_joint, np.float64)
  translation = camera.apply(root) + np.asarray(camera_translation, np.float64) - root
  return combined.as_rotvec(), translation


def motion_arrays(params: FlameParams, rotation, translation, num_vertices: int,
                  expression: np.ndarray) -> Dict[str, np.ndarray]:
  """The motion file's arrays (T frames), float32 only: the reader drops any other dtype.
  `expression` is already padded to NUM_EXPRESSION."""
  frames = len(rotation)
  f32 = lambda value: np.ascontiguousarray(value, np.float32)
  return dict(
      translation=f32(translation), rotation=f32(rotation),
      neck_pose=f32(params.neck_rotation), jaw_pose=f32(params.jaw_rotation),
      eyes_pose=f32(np.concatenate([params.left_eye_rotation, params.right_eye_rotation], -1)),
      expr=f32(expression),
      dynamic_offset=np.zeros((frames, num_vertices + TEETH_VERTICES, 3), np.float32))


def frame_parameters(motion: Dict[str, np.ndarray], shape: np.ndarray, frame: int
                     ) -> Dict[str, np.ndarray]:
  """One frame's `flame_param/{t:05d}.npz` arrays (leading axis 1, as VHAP writes them)."""
  num_vertices = motion["dynamic_offset"].shape[1]
  keep = ("translation", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "expr")
  arrays = {key: motion[key][frame:frame + 1] for key in keep}
  arrays.update(shape=np.asarray(shape, np.float32),
                static_offset=np.zeros((1, num_vertices, 3), np.float32))
  return arrays


def canonical_parameters(shape: np.ndarray, num_vertices: int) -> Dict[str, np.ndarray]:
  """`canonical_flame_param.npz`: the identity with every pose and expression at zero."""
  zeros = lambda *size: np.zeros(size, np.float32)
  return dict(shape=np.asarray(shape, np.float32), expr=zeros(1, NUM_EXPRESSION),
              rotation=zeros(1, 3), neck_pose=zeros(1, 3), jaw_pose=zeros(1, 3),
              eyes_pose=zeros(1, 6), translation=zeros(1, 3),
              static_offset=zeros(1, num_vertices + TEETH_VERTICES, 3))


def frame_entry(index: int, canvas: Tuple[int, int], focal_length: float, image_path: str,
                parameter_path: str, camera_index: int = 0,
                camera_to_world: np.ndarray = OPENCV_TO_OPENGL,
                fg_mask_path: Optional[str] = None) -> dict:
  """One `frames` entry of the transforms files: the camera (OpenGL camera-to-world; a clip's
  is fixed at the origin), its intrinsics on the canvas and the frame's files."""
  width, height = canvas
  masks = {} if fg_mask_path is None else dict(fg_mask_path=fg_mask_path)
  return dict(timestep_index=index, camera_index=camera_index, file_path=image_path, **masks,
              flame_param_path=parameter_path,
              transform_matrix=np.asarray(camera_to_world).tolist(), w=width, h=height,
              fl_x=focal_length, fl_y=focal_length, cx=width / 2.0, cy=height / 2.0,
              camera_angle_x=2.0 * math.atan(width / (2.0 * focal_length)),
              camera_angle_y=2.0 * math.atan(height / (2.0 * focal_length)))


def splits(frames: List[int], test_fraction: float) -> Dict[str, List[int]]:
  """train: the first frames; test (and val, the same frames): the last `test_fraction` (at
  least one when there are two frames or more), as monocular avatar benchmarks hold out the
  end of the clip."""
  held = min(len(frames) - 1, max(1, round(test_fraction * len(frames)))) if len(
      frames) > 1 else 0
  cut = len(frames) - held
  return dict(train=frames[:cut], val=frames[cut:], test=frames[cut:])


def transforms(entries: List[dict], shared: Optional[dict] = None) -> dict:
  """One transforms file: the frames' entries, and the camera they share at the top level
  when there is one (a clip's; each entry carries its own camera too)."""
  top = {}
  if shared is not None:
    top = {key: shared[key] for key in ("camera_angle_x", "w", "h", "fl_x", "fl_y", "cx", "cy")}
  return dict(top, timestep_indices=sorted({entry["timestep_index"] for entry in entries}),
              camera_indices=sorted({entry["camera_index"] for entry in entries}),
              frames=entries)


def undistorting_maps(intrinsics, distortion, image_size: Tuple[int, int]
                      ) -> Tuple[Tuple[int, int], float, np.ndarray, np.ndarray]:
  """A calibrated camera's image as the reader's camera sees it: (canvas (width, height), focal
  length, map_x, map_y for cv2.remap) of a pinhole with square pixels, no lens distortion and
  the principal point at the canvas centre, holding the undistorted frame. jflame's K has pixel
  centres at +0.5, OpenCV's maps at 0: both Ks are shifted by half a pixel."""
  import cv2
  k = np.asarray(intrinsics, np.float64)
  width, height = image_size
  focal = float(k[0, 0])
  half_width = focal * max(k[0, 2], width - k[0, 2]) / k[0, 0]
  half_height = focal * max(k[1, 2], height - k[1, 2]) / k[1, 1]
  canvas = (2 * int(math.ceil(half_width)), 2 * int(math.ceil(half_height)))
  source = k.copy()
  source[:2, 2] -= 0.5
  target = np.array([[focal, 0.0, canvas[0] / 2.0 - 0.5], [0.0, focal, canvas[1] / 2.0 - 0.5],
                     [0.0, 0.0, 1.0]])
  map_x, map_y = cv2.initUndistortRectifyMap(source, np.asarray(distortion, np.float64), None,
                                             target, canvas, cv2.CV_32FC1)
  return canvas, focal, map_x, map_y


def camera_to_world_opengl(world_to_camera) -> np.ndarray:
  """(4, 4) NeRF's camera-to-world (OpenGL axes) of an OpenCV world-to-camera."""
  return np.linalg.inv(np.asarray(world_to_camera, np.float64)) @ OPENCV_TO_OPENGL
