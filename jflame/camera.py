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


# OpenCV's distortion coefficients, padded to its longest vector: (k1, k2, p1, p2, k3, k4, k5, k6,
# s1, s2, s3, s4, tx, ty); zeros leave a point where it is, exactly.
DISTORTION_SIZE = 14


def distort(coefficients, x, y):
  """OpenCV's lens model on normalised image coordinates x, y (any shape): radial (k1..k6),
  tangential (p1, p2) and thin prism (s1..s4) terms; `coefficients` (DISTORTION_SIZE,), the
  tilt terms tx, ty unused (camera_files refuses them)."""
  k1, k2, p1, p2, k3, k4, k5, k6, s1, s2, s3, s4 = (coefficients[i] for i in range(12))
  r2 = x * x + y * y
  radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
  xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x) + s1 * r2 + s2 * r2 * r2
  yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y + s3 * r2 + s4 * r2 * r2
  return xd, yd


def project_calibrated(intrinsics, world_to_camera, distortion, points, min_depth=1e-4):
  """(N, 3) world points -> (N, 2) pixels of a calibrated camera: (3, 3) intrinsics K (fx, fy,
  skew, cx, cy), (4, 4) world-to-camera, (DISTORTION_SIZE,) OpenCV distortion. Depth is clamped
  away from zero as in `pinhole`."""
  points_cam = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
  depth = jnp.maximum(points_cam[:, 2], min_depth)
  x, y = distort(distortion, points_cam[:, 0] / depth, points_cam[:, 1] / depth)
  k = intrinsics
  return jnp.stack([k[0, 0] * x + k[0, 1] * y + k[0, 2], k[1, 1] * y + k[1, 2]], axis=-1)


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
