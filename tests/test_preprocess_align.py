"""Crop transforms, warps and polygon masks against independent NumPy/SciPy references."""

import numpy as np
import pytest
import scipy.ndimage

from jflame.camera import apply_affine, invert_affine
from jflame.preprocess import align, masks
from jflame.preprocess.align import (compose_affine, crop_from_landmarks, inside_image_mask,
                                     opencv_affine, warp_affine)


def _similarity(scale, angle, translation):
  cos, sin = np.cos(angle), np.sin(angle)
  return np.array([[scale * cos, -scale * sin, translation[0]],
                   [scale * sin, scale * cos, translation[1]]])


def _pixel_centres(height, width):
  """(H, W, 2) x, y of every pixel centre (+0.5 convention)."""
  rows, cols = np.mgrid[0:height, 0:width]
  return np.stack([cols + 0.5, rows + 0.5], axis=-1)


def _blob(height, width, center, sigma):
  offsets = _pixel_centres(height, width) - np.asarray(center)
  return np.exp(-np.sum(offsets**2, axis=-1) / (2 * sigma**2)).astype(np.float32)


def _centroid(image):
  centres = _pixel_centres(*image.shape)
  return np.sum(centres * image[..., None], axis=(0, 1)) / image.sum()


@pytest.mark.parametrize("scale", [1.7, 0.6, 0.2])   # 0.2 takes the area pre-filter path
def test_warp_moves_a_blob_to_where_the_affine_maps_its_centre(scale):
  center = np.array([101.3, 77.8])
  sigma = 3.0 / scale   # about 3 output pixels wide at every scale
  source = _blob(200, 240, center, sigma)
  size = 64
  # Put the blob near (but not at) the middle of the output, rotated.
  target = np.array([30.4, 35.9])
  affine = _similarity(scale, 0.4, [0.0, 0.0])
  affine[:, 2] = target - apply_affine(affine, center[None])[0]
  warped = warp_affine(source, affine, size)
  np.testing.assert_allclose(_centroid(warped), target, atol=0.03)


def test_warp_matches_an_independent_bilinear_sampler():
  rng = np.random.default_rng(0)
  source = rng.random((40, 50, 3)).astype(np.float32)
  affine = _similarity(1.3, -0.3, [5.0, 20.0])
  size = 48
  warped = warp_affine(source, affine, size)
  # Reference: each output pixel centre, mapped back, sampled bilinearly (SciPy puts pixel
  # centres at integers, hence -0.5).
  back = apply_affine(invert_affine(affine), _pixel_centres(size, size).reshape(-1, 2)) - 0.5
  reference = np.stack([scipy.ndimage.map_coordinates(source[..., c], [back[:, 1], back[:, 0]],
                                                      order=1) for c in range(3)], axis=-1)
  reference = reference.reshape(size, size, 3)
  interior = ((back[:, 0] > 1) & (back[:, 0] < 48) & (back[:, 1] > 1) & (back[:, 1] < 38))
  interior = interior.reshape(size, size)
  assert interior.sum() > 500
  # OpenCV quantises sample positions to 1/32 pixel; a convention slip would be off by ~0.2.
  difference = np.abs(warped[interior] - reference[interior])
  assert difference.max() < 1 / 32 and difference.mean() < 5e-3
  # Outside the source the border is constant zero.
  outside = ((back[:, 0] < -1) | (back[:, 0] > 50) | (back[:, 1] < -1) | (back[:, 1] > 40))
  assert outside.sum() > 100
  assert np.all(warped.reshape(-1, 3)[outside] == 0)


def test_opencv_affine_shifts_by_half_pixel_and_compose_round_trips():
  affine = _similarity(2.0, 0.0, [3.0, 4.0])
  # x_cv + 0.5 = 2 (x_src_cv + 0.5) + 3  =>  x_cv = 2 x_src_cv + 3.5
  np.testing.assert_allclose(opencv_affine(affine), [[2, 0, 3.5], [0, 2, 4.5]])
  other = _similarity(0.7, 1.1, [-8.0, 2.5])
  points = np.random.default_rng(1).random((10, 2)) * 100
  np.testing.assert_allclose(apply_affine(compose_affine(affine, other), points),
                             apply_affine(affine, apply_affine(other, points)), atol=1e-9)
  np.testing.assert_allclose(compose_affine(invert_affine(other), other),
                             [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def _synthetic_face(angle, scale, offset):
  """478 points shaped like a face (eyes on a horizontal line, mesh in an oval), then rotated
  by `angle`, scaled and shifted."""
  rng = np.random.default_rng(3)
  theta = rng.uniform(0, 2 * np.pi, 478)
  points = np.stack([60 * np.cos(theta), 80 * np.sin(theta)], axis=1)   # 120 x 160 box
  ring = np.linspace(0, 2 * np.pi, 16, endpoint=False)
  eye = np.stack([12 * np.cos(ring), 5 * np.sin(ring)], axis=1)
  points[list(masks.RIGHT_EYE)] = eye + [-25, -15]   # subject's right eye: image left
  points[list(masks.LEFT_EYE)] = eye + [25, -15]
  points[[0, 1]] = [[0, -80], [0, 80]]               # make the box exactly 120 x 160
  points[[2, 3]] = [[-60, 0], [60, 0]]
  return apply_affine(_similarity(scale, angle, offset), points)


def test_crop_from_landmarks_levels_eyes_centres_and_scales_the_face():
  crop_size, crop_scale = 200, 1.6
  landmarks = _synthetic_face(angle=0.5, scale=2.5, offset=[900.0, 600.0])
  crop_from_original = crop_from_landmarks(landmarks, crop_size, crop_scale)
  in_crop = apply_affine(crop_from_original, landmarks)
  right_eye = in_crop[list(masks.RIGHT_EYE)].mean(axis=0)
  left_eye = in_crop[list(masks.LEFT_EYE)].mean(axis=0)
  assert abs(right_eye[1] - left_eye[1]) < 1e-6 and left_eye[0] > right_eye[0]
  low, high = in_crop[:468].min(axis=0), in_crop[:468].max(axis=0)
  np.testing.assert_allclose((low + high) / 2, [100, 100], atol=1e-6)
  np.testing.assert_allclose(high - low, np.array([120, 160]) * 200 / (1.6 * 160), atol=1e-6)
  # Without levelling the map is a scale and shift only.
  axis_aligned = crop_from_landmarks(landmarks, crop_size, crop_scale, level_eyes=False)
  assert axis_aligned[0, 1] == 0 and axis_aligned[1, 0] == 0


def test_polygon_loops_orders_shuffled_edge_sets():
  loop_a, loop_b = [5, 9, 2, 7], [30, 11, 40]
  edges = {(a, b) for loop in (loop_a, loop_b) for a, b in zip(loop, loop[1:] + loop[:1])}
  edges = frozenset((b, a) if i % 2 else (a, b) for i, (a, b) in enumerate(sorted(edges)))
  loops = masks.polygon_loops(edges)
  assert loops == [(2, 7, 5, 9), (11, 30, 40)]
  with pytest.raises(ValueError, match="not a union of loops"):
    masks.polygon_loops(frozenset({(1, 2), (2, 3)}))


def test_mediapipe_regions_are_closed_loops_of_the_right_landmarks():
  assert len(masks.FACE_OVAL) == 36 and len(masks.LEFT_EYE) == 16 and len(masks.RIGHT_EYE) == 16
  assert set(align.LEFT_EYE_CONTOUR) == set(masks.LEFT_EYE)     # written out for device mode
  assert set(align.RIGHT_EYE_CONTOUR) == set(masks.RIGHT_EYE)
  assert {13, 14} <= set(masks.INNER_LIPS) and {0, 17} <= set(masks.OUTER_LIPS)
  assert not set(masks.INNER_LIPS) & set(masks.OUTER_LIPS)
  assert 10 in masks.FACE_OVAL and 152 in masks.FACE_OVAL   # forehead top, chin


def test_polygon_mask_area_and_centroid_match_the_polygon():
  angles = np.linspace(0, 2 * np.pi, 7, endpoint=False) + 0.2
  polygon = np.stack([30.3 + 17 * np.cos(angles), 25.7 + 12 * np.sin(angles)], axis=1)
  mask = masks.polygon_mask(polygon, 64)
  x, y = polygon[:, 0], polygon[:, 1]
  cross = x * np.roll(y, -1) - np.roll(x, -1) * y
  area = cross.sum() / 2
  centroid = np.array([((x + np.roll(x, -1)) * cross).sum(),
                       ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)
  perimeter = np.sum(np.linalg.norm(polygon - np.roll(polygon, -1, axis=0), axis=1))
  assert mask.min() >= 0 and mask.max() <= 1
  # Coverage error under a tenth of a pixel along the boundary; a half-pixel shift of the grid
  # would move the centroid by 0.5.
  assert abs(mask.sum() - area) < 0.1 * perimeter
  np.testing.assert_allclose(_centroid(mask), centroid, atol=0.05)


def test_inside_image_mask_covers_exactly_the_original():
  # The crop shows a 30 x 20 original at 2x, shifted by (4, 6) crop pixels.
  crop_from_original = np.array([[2.0, 0.0, 4.0], [0.0, 2.0, 6.0]])
  mask = inside_image_mask(crop_from_original, 80, width=30, height=20)
  expected = np.zeros((80, 80), np.float32)
  expected[6:46, 4:64] = 1
  np.testing.assert_array_equal(mask, expected)
