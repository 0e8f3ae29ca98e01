"""IMavatar's `flame_params.json` (read by IMavatar, PointAvatar and SplattingAvatar): a tracked
clip as one of their capture folders (`image/`, `flame_params.json`).

Their conventions, from IMavatar's `code/datasets/real_dataset.py`, `code/utils/rend_util.py`,
`code/flame/FLAME.py` and the preprocessing that writes the file (`preprocess/DECA/optimize.py`):
- their FLAME (FLAME 2020, 100 shape and `num_exp` expression coefficients, 50 by default) is
  scaled by 4: every template, shape, expression and pose-corrective offset, so the head and its
  joints are 4 times FLAME's;
- `pose` (15) is FLAME's full pose [global, neck, jaw, left eye, right eye], the global rotation
  about the root joint; `world_mat` (3 x 4) is world-to-camera [I | t] (the preprocessing keeps
  the head's rotation in `pose` and the camera's rotation the identity);
- camera axes are OpenGL's (x right, y up, z backwards: the head in front has z < 0); a camera
  point (X, Y, Z) is at pixel u = fx X / Z + cx, v = fy Y / Z + cy, with `intrinsics` =
  [fx, fy, cx, cy] divided by the image side and fx NEGATIVE (their `lift` at depth -1), and
  pixel centres at whole numbers (their pixel grid is `np.mgrid`);
- images are square (their resolution `img_res` scales fx and cx by one side, fy and cy by the
  other), `image/<n>.png`, masks in `mask/<n>.png`; `bbox` is the face's box in [-1, 1].

jflame keeps the head in an OpenCV camera (p_cam = R_c p_model + t_c, the model posed with its
own global rotation G about its root joint J0). With F = diag(1, -1, -1) (OpenCV to OpenGL axes)
and their world four times larger (a projection does not see a common scale):

    pose[:3] = F R_c G            (axis-angle)
    t        = 4 (F (R_c J0 + t_c) - J0)

so that 4 (their FLAME) + t = 4 F (R_c (G (v - J0) + J0) + t_c): jflame's camera-space head,
in their axes, four times larger. Each frame is padded (never resampled) to a square canvas.
"""

import math
from typing import Dict, List, Tuple

import numpy as np
from scipy.spatial.transform import Rotation

from jflame.exports import gaussian_avatars as ga

EXPECTED_VARIANT = "flame2020"
READER = "IMavatar / PointAvatar / SplattingAvatar"
SCALE = 4.0                 # their FLAME.py: factor = 4
NUM_SHAPE = 100             # their implicit_morphable_model.py: FLAME(n_shape=100, ...)
DEFAULT_NUM_EXPRESSION = 50  # their confs: deformer_network.num_exp
OPENCV_TO_OPENGL = ga.OPENCV_TO_OPENGL[:3, :3]


def head_pose(camera_rotation, camera_translation, global_rotation, root_joint
              ) -> Tuple[np.ndarray, np.ndarray]:
  """(T, 3) axis-angle global rotation and (T, 3) world-to-camera translation of their FLAME
  that put the head where jflame's camera saw it (module doc): GaussianAvatars' head pose in a
  camera at the origin (R_c G and R_c J0 + t_c - J0), turned into OpenGL axes and scaled."""
  rotation, translation = ga.head_pose_in_fixed_camera(camera_rotation, camera_translation,
                                                       global_rotation, root_joint)
  flip = Rotation.from_matrix(OPENCV_TO_OPENGL)
  root = np.asarray(root_joint, np.float64)
  return ((flip * Rotation.from_rotvec(rotation)).as_rotvec(),
          SCALE * (flip.apply(translation + root) - root))


def square_canvas(frame_size: Tuple[int, int]) -> Tuple[int, Tuple[int, int]]:
  """(side, (x, y) offset of the frame on it): the frame padded to a square, centred."""
  width, height = frame_size
  side = max(width, height)
  return side, ((side - width) // 2, (side - height) // 2)


def intrinsics(focal_length: float, principal_point, frame_size: Tuple[int, int]) -> List[float]:
  """Their [fx, fy, cx, cy] over the square side, fx negative, for jflame's frame camera
  (pixel centres at +0.5) with the frame on the square canvas."""
  side, offset = square_canvas(frame_size)
  cx = float(principal_point[0]) - 0.5 + offset[0]
  cy = float(principal_point[1]) - 0.5 + offset[1]
  return [-focal_length / side, focal_length / side, cx / side, cy / side]


def face_box(landmarks: np.ndarray, frame_size: Tuple[int, int]) -> List[float]:
  """[x0, y0, x1, y1] of the landmarks (jflame frame pixels) on the square canvas, in [-1, 1]
  as their loader reads it ((bbox + 1) * side / 2 gives their pixels)."""
  side, offset = square_canvas(frame_size)
  finite = landmarks[np.all(np.isfinite(landmarks), axis=-1)]
  if not len(finite):
    return [-1.0, -1.0, 1.0, 1.0]
  pixels = finite - 0.5 + np.asarray(offset, np.float64)
  low, high = pixels.min(axis=0), pixels.max(axis=0)
  return [float(v) for v in (np.concatenate([low, high]) / side * 2.0 - 1.0)]


def frame_entry(name: str, pose: np.ndarray, translation: np.ndarray, expression: np.ndarray,
                box: List[float]) -> Dict:
  """One element of `frames`."""
  world_mat = np.concatenate([np.eye(3), np.asarray(translation, np.float64)[:, None]], axis=1)
  return {"file_path": f"./image/{name}", "world_mat": world_mat.tolist(),
          "expression": [float(v) for v in expression], "pose": [float(v) for v in pose],
          "bbox": box}


def full_pose(global_rotation, neck, jaw, left_eye, right_eye) -> np.ndarray:
  """(T, 15) FLAME's full pose in their order."""
  return np.concatenate([np.asarray(v, np.float64) for v in
                         (global_rotation, neck, jaw, left_eye, right_eye)], axis=-1)


def field_of_view_degrees(focal_length: float, side: int) -> float:
  return math.degrees(2.0 * math.atan(side / (2.0 * focal_length)))
