"""Similarity transforms that cut square crops out of photographs, and the warps that apply them.

Every transform is a (2, 3) affine `dst_from_src` on continuous pixel coordinates with pixel
centres at +0.5 (`jflame.camera`); map points with `jflame.camera.apply_affine` and go back
with `jflame.camera.invert_affine`. OpenCV puts pixel centres at integers, and
`opencv_affine` converts once, in one place.

The aligned crop rotates the face so the eyes are level. A rotation of the image about any point
is a roll of the camera about its optical axis, so the crop is still an exact pinhole image of
the scene (the fit absorbs the roll into the head rotation), while the initialisers and the
fit always see an upright face, as in the data those networks were trained on, and a tilted
head needs no extra margin to fit in the square.
"""

import cv2
import numpy as np

from jflame.camera import apply_affine, invert_affine

# Crop side / longest side of the face mesh's bounding box in the levelled frame. The mesh spans
# forehead to chin, so 1.5 leaves room for hair, ears and jaw motion around it.
DEFAULT_CROP_SCALE = 1.5
# The first 468 landmarks are the face mesh; 468..477 are the irises (inside the eyes).
_NUM_MESH_LANDMARKS = 468
# A bilinear warp that shrinks by more than this is pre-filtered with area averaging. Not only
# against aliasing: MediaPipe's face mesh answers to the sharpness of its input, and on 1024-pixel
# photos a window shrunk 1.4x bilinearly moved the landmarks by ~1 px on average from an
# area-averaged one (0.2 px with the pre-filter).
_MAX_BILINEAR_SHRINK = 1.1


def opencv_affine(dst_from_src: np.ndarray) -> np.ndarray:
  """The (2, 3) matrix OpenCV needs for a map given with pixel centres at +0.5.

  With c = (0.5, 0.5): dst_cv = dst - c = L (src_cv + c) + t - c, so only t changes.
  """
  dst_from_src = np.asarray(dst_from_src, np.float64)
  linear = dst_from_src[:, :2]
  translation = dst_from_src[:, 2] + linear @ np.array([0.5, 0.5]) - 0.5
  return np.concatenate([linear, translation[:, None]], axis=1)


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
  """(2, 3) affine of `outer` after `inner` (x -> outer(inner(x)))."""
  outer = np.asarray(outer, np.float64)
  inner = np.asarray(inner, np.float64)
  return np.concatenate([outer[:, :2] @ inner[:, :2],
                         (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]], axis=1)


def affine_scale(dst_from_src: np.ndarray) -> float:
  """Destination pixels per source pixel of a similarity (sqrt of |det|)."""
  (a, b), (c, d) = np.asarray(dst_from_src, np.float64)[:, :2]
  return float(np.sqrt(abs(a * d - b * c)))   # not np.linalg.det: see camera.invert_affine


def warp_affine(image: np.ndarray, dst_from_src: np.ndarray, size: int,
                interpolation: int = cv2.INTER_LINEAR, prefilter: bool = True) -> np.ndarray:
  """Resamples `image` onto a (size, size) grid through `dst_from_src`.

  Bilinear by default. Outside the source the result is zero (constant border, not replicate):
  replicated edge pixels would look like real skin or hair to a photometric loss, whereas
  zeros are obviously not data and `inside_image_mask` says where they are. Only the part of
  the source under the output is touched, and a shrink is pre-filtered with area averaging
  (whole blocks of pixels first, which OpenCV does fast, then the fractional rest), so a small
  crop out of a 24-megapixel photo is cheap and not aliased.

  Args:
    image: (H, W) or (H, W, C) array (uint8 or float32).
    dst_from_src: (2, 3) affine, continuous pixel coordinates.
    size: side of the output.
    prefilter: area-average a shrink first (default). False samples the source directly, as
      cv2.warpAffine does: for inputs a network was trained on that way (ArcFace/MICA crops).

  Returns:
    (size, size[, C]) array of image's dtype.
  """
  dst_from_src = np.asarray(dst_from_src, np.float64)
  height, width = image.shape[:2]
  output_shape = (size, size) + image.shape[2:]
  shrink = 1.0 / affine_scale(dst_from_src) if prefilter else 1.0
  # Blocks of a whole number of pixels first: cheap, and the fractional rest is then small.
  factor = int(shrink) if shrink > _MAX_BILINEAR_SHRINK else 1
  # Source region under the output square, with a margin for the interpolation footprint.
  corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
  source_corners = apply_affine(invert_affine(dst_from_src), corners)
  margin = 2.0 / affine_scale(dst_from_src) + 2.0
  x_min, y_min = np.floor(source_corners.min(axis=0) - margin).astype(int)
  x_max, y_max = np.ceil(source_corners.max(axis=0) + margin).astype(int)
  x_min, y_min = max(x_min, 0), max(y_min, 0)
  # Whole blocks of `factor` pixels, as far as the image goes.
  x_max = min(x_min + -(-(x_max - x_min) // factor) * factor, width)
  y_max = min(y_min + -(-(y_max - y_min) // factor) * factor, height)
  if x_min >= x_max or y_min >= y_max:
    return np.zeros(output_shape, image.dtype)
  region = image[y_min:y_max, x_min:x_max]
  region_to_source = np.array([[1.0, 0.0, x_min], [0.0, 1.0, y_min]])
  dst_from_region = compose_affine(dst_from_src, region_to_source)
  if factor > 1:
    region = block_average(region, factor)
    # Block i covers region pixels [factor i, factor (i + 1)): region = factor * block.
    dst_from_region = compose_affine(dst_from_region, np.diag([factor, factor, 1.0])[:2])
  if shrink / factor > _MAX_BILINEAR_SHRINK:
    region_height, region_width = region.shape[:2]
    small_width = max(1, round(region_width * factor / shrink))
    small_height = max(1, round(region_height * factor / shrink))
    region = cv2.resize(region, (small_width, small_height), interpolation=cv2.INTER_AREA)
    # cv2.resize maps continuous coordinates by exactly new_size / old_size per axis.
    small_from_region = np.array([[small_width / region_width, 0.0, 0.0],
                                  [0.0, small_height / region_height, 0.0]])
    dst_from_region = compose_affine(dst_from_region, invert_affine(small_from_region))
  warped = cv2.warpAffine(region, opencv_affine(dst_from_region), (size, size),
                          flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return warped.reshape(output_shape)


def block_average(image: np.ndarray, factor: int) -> np.ndarray:
  """Means of `factor` x `factor` pixel blocks; a ragged last block is padded with zeros.

  OpenCV's INTER_AREA takes a fast path only for an exact integer ratio (docs/BENCHMARKS.md),
  hence the padding. The zeros lie
  outside the source, which `warp_affine` shows as zero anyway.
  """
  height, width = image.shape[:2]
  pad_y, pad_x = -height % factor, -width % factor
  if pad_x or pad_y:
    image = cv2.copyMakeBorder(image, 0, pad_y, 0, pad_x, cv2.BORDER_CONSTANT, value=0)
  small_size = (image.shape[1] // factor, image.shape[0] // factor)
  return cv2.resize(image, small_size, interpolation=cv2.INTER_AREA).reshape(
      small_size[::-1] + image.shape[2:])


def square_window(center: np.ndarray, side: float, size: int) -> np.ndarray:
  """Axis-aligned map of the square of `side` pixels centred on `center` onto (size, size)."""
  scale = size / side
  center = np.asarray(center, np.float64)
  return np.array([[scale, 0.0, size / 2.0 - scale * center[0]],
                   [0.0, scale, size / 2.0 - scale * center[1]]])


def quarter_turns(width: float, height: float, turns: int) -> np.ndarray:
  """The (2, 3) map of a (width, height) image onto itself turned `turns` times by 90 degrees
  counter-clockwise on screen, as `np.rot90(image, turns)` turns the pixels."""
  affine = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  for _ in range(turns % 4):
    # One turn: the top-right corner becomes the top-left, (x, y) -> (y, width - x).
    affine = compose_affine(np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, width]]), affine)
    width, height = height, width
  return affine


def rotation_about(center: np.ndarray, angle: float) -> np.ndarray:
  """The (2, 3) rotation by `angle` radians (image axes: positive turns x towards y, clockwise
  on screen) about the point `center`."""
  cos, sin = np.cos(angle), np.sin(angle)
  linear = np.array([[cos, -sin], [sin, cos]])
  center = np.asarray(center, np.float64)
  return np.concatenate([linear, (center - linear @ center)[:, None]], axis=1)


# The eyelid contours' landmarks (MediaPipe's FACEMESH_RIGHT_EYE and FACEMESH_LEFT_EYE vertex
# sets; tests/test_preprocess_align.py checks them against MediaPipe), written out so that
# device-mode preprocessing needs no MediaPipe.
RIGHT_EYE_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LEFT_EYE_CONTOUR = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384,
                    398)


def eye_line_angle(landmarks: np.ndarray) -> float:
  """Angle (radians, image axes: x right, y down) of the line from the subject's right eye to
  the left eye, each the mean of its eyelid contour (not the iris, which moves with gaze)."""
  right_eye = landmarks[list(RIGHT_EYE_CONTOUR), :2].mean(axis=0)
  left_eye = landmarks[list(LEFT_EYE_CONTOUR), :2].mean(axis=0)
  direction = left_eye - right_eye
  return float(np.arctan2(direction[1], direction[0]))


def crop_from_landmarks(landmarks: np.ndarray, crop_size: int,
                        crop_scale: float = DEFAULT_CROP_SCALE, level_eyes: bool = True):
  """The similarity `crop_from_original` that frames a face in a (crop_size, crop_size) crop.

  The face mesh's bounding box, taken in the levelled frame, is centred in the crop, and its
  longer side spans crop_size / crop_scale pixels.

  Args:
    landmarks: (478, >=2) MediaPipe landmarks in original pixels.
    crop_size: side of the crop in pixels.
    crop_scale: crop side / longest side of the landmark box.
    level_eyes: rotate so the eyes are level (see the module docstring); False keeps the
      photograph's axes (scale and shift only).

  Returns:
    (2, 3) float64 affine, original pixels -> crop pixels.
  """
  points = np.asarray(landmarks, np.float64)[:_NUM_MESH_LANDMARKS, :2]
  angle = eye_line_angle(points) if level_eyes else 0.0
  cos, sin = np.cos(-angle), np.sin(-angle)
  rotation = np.array([[cos, -sin], [sin, cos]])
  levelled = points @ rotation.T
  low, high = levelled.min(axis=0), levelled.max(axis=0)
  scale = crop_size / (crop_scale * float(np.max(high - low)))
  center = (low + high) / 2.0
  linear = scale * rotation
  translation = crop_size / 2.0 - scale * center
  return np.concatenate([linear, translation[:, None]], axis=1)


def points_inside(points: np.ndarray, width: float, height: float) -> np.ndarray:
  """(N,) bool: which (N, 2) pixel points lie inside the [0, width] x [0, height] image."""
  points = np.asarray(points)
  return ((points[:, 0] >= 0) & (points[:, 0] <= width) &
          (points[:, 1] >= 0) & (points[:, 1] <= height))


def inside_image_mask(crop_from_original: np.ndarray, crop_size: int, width: int,
                      height: int) -> np.ndarray:
  """(crop_size, crop_size) float32: 1 where a crop pixel's centre falls inside the original."""
  # Row and column centres broadcast against each other: no (S * S, 2) array of points.
  centers = np.arange(crop_size) + 0.5
  (a, b, tx), (c, d, ty) = invert_affine(crop_from_original)
  x = a * centers[None, :] + b * centers[:, None] + tx
  y = c * centers[None, :] + d * centers[:, None] + ty
  return ((x >= 0) & (x <= width) & (y >= 0) & (y <= height)).astype(np.float32)
