"""The one camera convention of jflame, stated once.

OpenCV style: camera space has x right, y down, z forward (into the scene); a point in front of
the camera has z > 0. Pixel (row i, column j) covers [j, j+1) x [i, i+1) and its centre is at
(j + 0.5, i + 0.5), so the principal point of a W x H image centred on the optical axis is
(W / 2, H / 2). Extrinsics map model space to camera space: p_cam = R p_model + t.

FLAME's model space has y up and z towards the viewer, so a camera looking straight at the face
has R = diag(1, -1, -1), the axis-angle (pi, 0, 0) (`FRONTAL_ROTATION`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.rotation import axis_angle_to_matrix

FRONTAL_ROTATION = (np.pi, 0.0, 0.0)


@struct.dataclass
class Camera:
  """A pinhole camera for one image, in pixels of the image it projects to.

  Attributes:
    rotation: (3,) axis-angle of R (model -> camera).
    translation: (3,) t in metres.
    focal_length: () focal length in pixels (square pixels).
    principal_point: (2,) (cx, cy) in pixels.
  """
  rotation: jax.Array
  translation: jax.Array
  focal_length: jax.Array
  principal_point: jax.Array

  @classmethod
  def frontal(cls, image_size, fov_degrees=20.0, distance=None, face_width=0.16):
    """A camera that looks at the model origin from the front and frames a face of the given
    width (metres) across about 60% of a square image of `image_size` pixels."""
    focal = focal_length_from_fov(image_size, fov_degrees)
    if distance is None:
      distance = focal * face_width / (0.6 * image_size)
    return cls(rotation=jnp.asarray(FRONTAL_ROTATION, jnp.float32),
               translation=jnp.asarray([0.0, 0.0, distance], jnp.float32),
               focal_length=jnp.asarray(focal, jnp.float32),
               principal_point=jnp.asarray([image_size / 2.0, image_size / 2.0], jnp.float32))


def focal_length_from_fov(image_size, fov_degrees):
  """Focal length in pixels for a horizontal field of view across `image_size` pixels."""
  return (image_size / 2.0) / np.tan(np.deg2rad(fov_degrees) / 2.0)


def to_camera_space(camera: Camera, points):
  """(N, 3) model-space points -> (N, 3) camera-space points."""
  rotation = axis_angle_to_matrix(camera.rotation)
  return points @ rotation.T + camera.translation


def pinhole(points_cam, focal_length, principal_point, min_depth=1e-4):
  """(N, 3) camera-space points -> (N, 2) pixel coordinates. Depth is clamped away from zero
  so a point behind the camera gives a large finite value instead of a NaN."""
  depth = jnp.maximum(points_cam[:, 2:3], min_depth)
  return focal_length * points_cam[:, :2] / depth + principal_point


def project_camera_space(camera: Camera, points_cam):
  """(N, 3) camera-space points -> (N, 2) pixel coordinates (see `pinhole`)."""
  return pinhole(points_cam, camera.focal_length, camera.principal_point)


def project(camera: Camera, points):
  """(N, 3) model-space points -> (N, 2) pixel coordinates."""
  return project_camera_space(camera, to_camera_space(camera, points))


def screen_space(camera: Camera, points):
  """(N, 3) model-space points -> (N, 3) as (x_pixel, y_pixel, depth in metres): what the
  rasterizer takes."""
  points_cam = to_camera_space(camera, points)
  return jnp.concatenate([project_camera_space(camera, points_cam), points_cam[:, 2:3]], axis=1)


def apply_affine(affine, points):
  """Maps (N, 2) pixel points by a (2, 3) affine matrix (host or device arrays)."""
  return points @ affine[:, :2].T + affine[:, 2]


def invert_affine(affine):
  """Inverse of a (2, 3) affine map, NumPy, for going from crop pixels back to the original."""
  affine = np.asarray(affine, np.float64)
  # The 2 x 2 inverse written out: np.linalg.inv goes through LAPACK and OpenBLAS, whose threads
  # wake up slowly next to MediaPipe's busy ones during preprocessing (docs/BENCHMARKS.md).
  (a, b), (c, d) = affine[:, :2]
  linear_inv = np.array([[d, -b], [-c, a]]) / (a * d - b * c)
  return np.concatenate([linear_inv, -linear_inv @ affine[:, 2:3]], axis=1)
