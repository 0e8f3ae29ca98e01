"""metrical-tracker's output folder (read by INSTA and FlashAvatar): per frame a checkpoint
`checkpoint/<frame>.frame`, the mesh `mesh/<frame>.ply` and the image `input/<frame>.png`, and
`canonical.obj`.

Their conventions, from metrical-tracker's `tracker.py` (`save_checkpoint`, `save_canonical`)
and `flame/FLAME.py`:
- FLAME 2020 with 300 shape and 100 expression coefficients and every joint rotation as a 6D
  rotation (PyTorch3D's `matrix_to_rotation_6d`: the first two ROWS of the matrix; Gram-Schmidt
  gives the matrix back); the global rotation is the identity and there is no translation: the
  mesh stays in FLAME's space, metres, and the head's pose is the camera's;
- `opencv`: world-to-camera `R` (1, 3, 3) and `t` (1, 3) (p_cam = R p + t, OpenCV axes) and `K`
  (1, 3, 3) in pixels, converted from PyTorch3D's camera by `opencv_from_cameras_projection`,
  so pixel centres lie at +0.5 (pixel i covers [i, i + 1]), as in jflame;
- `camera`: the same camera in PyTorch3D's form (NDC, +X left, +Y up, row vectors:
  X_view = X_world R + T): `R` as 6D (1, 6), `t` (1, 3), `fl` (1, 1) and `pp` (1, 2) in NDC;
- `img_size` = (height, width) (their `config.image_size`); the frames are padded to a square so
  that readers which unpack it as (width, height) (FlashAvatar) read it right too;
- `eyelids` (1, 2) drive their eyelid blendshapes: zeros (jflame has none); `tex` (1, 140) and
  `sh` (1, 9, 3) zeros;
- `canonical.obj`: the identity with the jaw opened 12 degrees about x, nothing else.

jflame keeps the head in an OpenCV camera (p_cam = R_c p_model + t_c, the model posed with its
own global rotation G about its root joint J0). With their global rotation the identity:

    R = R_c G,   t = R_c J0 + t_c - R_c G J0

so that R v + t = R_c (G (v - J0) + J0) + t_c for every vertex v of the model posed without its
global rotation (the pose correctives do not depend on it).
"""

import io
import math
import pickle
from typing import Dict, Tuple

import jax
import numpy as np
from scipy.spatial.transform import Rotation

from jflame.exports import gaussian_avatars as ga
from jflame.flame import FlameModel, FlameParams, flame_forward

EXPECTED_VARIANT = "flame2020"
READER = "metrical-tracker / INSTA / FlashAvatar"
NUM_SHAPE, NUM_EXPRESSION = 300, 100   # their config: num_shape_params, num_exp_params
NUM_TEXTURE = 140                      # their config: tex_params
CANONICAL_JAW_DEGREES = 12.0           # their save_canonical


def rotation_6d(rotvec) -> np.ndarray:
  """(..., 6) PyTorch3D's 6D form (first two rows of the matrix) of (..., 3) axis-angles."""
  rotvec = np.asarray(rotvec, np.float64)
  matrices = Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix()
  return matrices[:, :2, :].reshape(rotvec.shape[:-1] + (6,))


def extrinsics(camera_rotation, camera_translation, global_rotation, root_joint
               ) -> Tuple[np.ndarray, np.ndarray]:
  """(T, 3, 3) R and (T, 3) t, world-to-camera, for their FLAME (global rotation the identity)
  to appear where jflame's camera saw the head (module doc)."""
  rotation, translation = ga.head_pose_in_fixed_camera(camera_rotation, camera_translation,
                                                       global_rotation, root_joint)
  matrices = Rotation.from_rotvec(rotation).as_matrix()
  root = np.asarray(root_joint, np.float64)
  # GaussianAvatars' translation is R_c J0 + t_c - J0; theirs is R_c J0 + t_c - R J0.
  return matrices, translation + root - np.einsum("tij,tj->ti", matrices, root)


def intrinsics(focal_length: float, principal_point, offset: Tuple[int, int]) -> np.ndarray:
  """(3, 3) K in pixels of jflame's frame camera with the frame placed at `offset` (x, y) on
  the square canvas (both keep pixel centres at +0.5: no half-pixel shift)."""
  return np.array([[focal_length, 0.0, float(principal_point[0]) + offset[0]],
                   [0.0, focal_length, float(principal_point[1]) + offset[1]],
                   [0.0, 0.0, 1.0]])


def pytorch3d_camera(rotation: np.ndarray, translation: np.ndarray, intrinsic: np.ndarray,
                     side: int) -> Dict[str, np.ndarray]:
  """`camera` of one frame: the OpenCV camera in PyTorch3D's form on a square `side` image
  (the inverse of `opencv_from_cameras_projection`: R transposed, x and y flipped; focal length
  and principal point over half the side, the principal point's sign flipped)."""
  flip = np.diag([-1.0, -1.0, 1.0])
  rotation_p3d = np.asarray(rotation, np.float64).T @ flip
  translation_p3d = flip @ np.asarray(translation, np.float64)
  half = side / 2.0
  principal = -(intrinsic[:2, 2] - half) / half
  return {"R": rotation_p3d[:2, :].reshape(1, 6).astype(np.float32),
          "t": translation_p3d.reshape(1, 3).astype(np.float32),
          "fl": np.array([[intrinsic[0, 0] / half]], np.float32),
          "pp": principal.reshape(1, 2).astype(np.float32)}


def checkpoint(shape: np.ndarray, expression: np.ndarray, jaw, left_eye, right_eye,
               rotation: np.ndarray, translation: np.ndarray, intrinsic: np.ndarray, side: int,
               frame_id: str) -> dict:
  """One frame's checkpoint dict, as their `save_checkpoint` builds it (numpy float32 arrays
  with a leading axis of 1). `shape` and `expression` are already padded to 300 / 100."""
  f32 = lambda value, *size: np.asarray(value, np.float32).reshape(size)
  return {
      "flame": {"exp": f32(expression, 1, NUM_EXPRESSION), "shape": f32(shape, 1, NUM_SHAPE),
                "tex": np.zeros((1, NUM_TEXTURE), np.float32),
                "sh": np.zeros((1, 9, 3), np.float32),
                "eyes": f32(np.concatenate([rotation_6d(left_eye), rotation_6d(right_eye)]),
                            1, 12),
                "eyelids": np.zeros((1, 2), np.float32),
                "jaw": f32(rotation_6d(jaw), 1, 6)},
      "camera": pytorch3d_camera(rotation, translation, intrinsic, side),
      "opencv": {"R": f32(rotation, 1, 3, 3), "t": f32(translation, 1, 3),
                 "K": f32(intrinsic, 1, 3, 3)},
      "img_size": np.array([side, side], np.int64),
      "frame_id": frame_id,
      "global_step": 0,
  }


@jax.jit
def unrotated_vertices(model: FlameModel, params: FlameParams) -> jax.Array:
  """(T, V, 3) every frame's mesh with the global rotation left out (their mesh/<frame>.ply:
  FLAME's space, metres), one vmapped call for the clip."""
  def one(p):
    return flame_forward(model, p.replace(global_rotation=jax.numpy.zeros_like(
        p.global_rotation)))[0]
  return jax.vmap(one)(params)


def canonical_jaw() -> np.ndarray:
  """(3,) axis-angle of their canonical mesh's jaw: 12 degrees about x."""
  return np.array([math.radians(CANONICAL_JAW_DEGREES), 0.0, 0.0])


# torch.save's legacy (pre-zip) serialisation: four pickles and the object's; an object that
# holds no tensor has no storages after it. torch.load reads it at every version since 0.4.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_TORCH_SYS_INFO = {"protocol_version": _TORCH_PROTOCOL, "little_endian": True,
                   "type_sizes": {"short": 2, "int": 4, "long": 4}}


def torch_file_bytes(payload) -> bytes:
  """`payload` (dicts, numpy arrays, strings, numbers; no tensors) as the bytes torch.save
  writes for it in its legacy format, without torch."""
  stream = io.BytesIO()
  for value in (_TORCH_MAGIC, _TORCH_PROTOCOL, _TORCH_SYS_INFO, payload, []):
    pickle.dump(value, stream, protocol=2)
  return stream.getvalue()
