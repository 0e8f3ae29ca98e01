"""Face-region masks drawn from the 478 MediaPipe landmarks (host side, crop pixels).

MediaPipe describes its face regions as unordered edge sets (FACEMESH_FACE_OVAL, _LEFT_EYE,
_RIGHT_EYE, _LIPS in `mediapipe.solutions.face_mesh`). Every vertex of those sets has exactly
two edges, so each set is a union of closed loops; `polygon_loops` walks them into ordered
polygons. "Left" and "right" are the subject's: the left eye appears on the image's right.
"""

import collections
from typing import FrozenSet, List, Tuple

import functools

import cv2
import numpy as np

# Landmarks that identify loops of the lips edge set: 13 is the middle of the upper INNER lip
# edge, 0 the middle of the upper OUTER lip edge.
_UPPER_INNER_LIP = 13
_UPPER_OUTER_LIP = 0
# Iris centres (with refine_landmarks): 468 in the subject's right eye, 473 in the left.
RIGHT_IRIS_CENTER = 468
LEFT_IRIS_CENTER = 473

# Sub-pixel precision of polygon vertices given to OpenCV (fractional bits), and the factor by
# which masks are drawn finer than the crop before averaging down.
_POLYGON_SHIFT_BITS = 4
_SUPERSAMPLING = 8


def polygon_loops(edges: FrozenSet[Tuple[int, int]]) -> List[Tuple[int, ...]]:
  """Splits an edge set whose vertices all have two edges into ordered closed loops.

  Each loop starts at its smallest vertex and goes first towards that vertex's smaller
  neighbour, so the result does not depend on set iteration order. Loops are sorted by their
  first vertex.

  Raises:
    ValueError: a vertex does not have exactly two edges.
  """
  neighbours = collections.defaultdict(list)
  for start, end in edges:
    neighbours[start].append(end)
    neighbours[end].append(start)
  unusual = sorted(vertex for vertex, adjacent in neighbours.items() if len(adjacent) != 2)
  if unusual:
    raise ValueError(f"Edge set is not a union of loops; vertices {unusual} do not have 2 edges.")
  unvisited = set(neighbours)
  loops = []
  while unvisited:
    first = min(unvisited)
    loop = [first]
    previous, current = first, min(neighbours[first])
    while current != first:
      loop.append(current)
      following = [vertex for vertex in neighbours[current] if vertex != previous]
      previous, current = current, following[0]
    unvisited.difference_update(loop)
    loops.append(tuple(loop))
  return sorted(loops)


def _single_loop(edges) -> Tuple[int, ...]:
  loops = polygon_loops(edges)
  if len(loops) != 1:
    raise ValueError(f"Expected one loop, found {len(loops)}.")
  return loops[0]


def _loop_containing(edges, vertex: int) -> Tuple[int, ...]:
  return next(loop for loop in polygon_loops(edges) if vertex in loop)


@functools.cache
def _regions() -> dict:
  """The ordered landmark polygons (immutable tuples of landmark indices), from MediaPipe's
  edge sets, read when first used (device-mode runs never draw masks, nor import MediaPipe)."""
  from mediapipe.python.solutions import face_mesh_connections as edges
  return dict(FACE_OVAL=_single_loop(edges.FACEMESH_FACE_OVAL),
              LEFT_EYE=_single_loop(edges.FACEMESH_LEFT_EYE),
              RIGHT_EYE=_single_loop(edges.FACEMESH_RIGHT_EYE),
              INNER_LIPS=_loop_containing(edges.FACEMESH_LIPS, _UPPER_INNER_LIP),
              OUTER_LIPS=_loop_containing(edges.FACEMESH_LIPS, _UPPER_OUTER_LIP))


def __getattr__(name: str):
  """masks.FACE_OVAL, LEFT_EYE, RIGHT_EYE, INNER_LIPS, OUTER_LIPS (see `_regions`)."""
  regions = _regions() if name.isupper() else {}
  if name in regions:
    return regions[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def polygon_mask(polygon: np.ndarray, size: int) -> np.ndarray:
  """Area coverage of a polygon on a (size, size) pixel grid.

  The polygon is filled at `_SUPERSAMPLING` x the resolution over its bounding box and box
  averaged. OpenCV's anti-aliased fill grows polygons by about half a pixel, and its plain fill
  by half a pixel of the grid it draws on; drawing 8x finer leaves a bias of 1/16 pixel.

  Args:
    polygon: (K, 2) vertices in pixels, centres at +0.5 (`jflame.camera`).
    size: side of the square mask.

  Returns:
    (size, size) float32 in [0, 1].
  """
  polygon = np.asarray(polygon, np.float64)
  mask = np.zeros((size, size), np.float32)
  low = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, size)
  high = np.clip(np.ceil(polygon.max(axis=0)).astype(int), 0, size)
  width, height = high - low
  if width <= 0 or height <= 0:
    return mask
  canvas = np.zeros((height * _SUPERSAMPLING, width * _SUPERSAMPLING), np.uint8)
  fine = (polygon - low) * _SUPERSAMPLING
  # OpenCV puts pixel centres at integers, hence the -0.5; vertices are fixed point.
  fixed_point = np.round((fine - 0.5) * (1 << _POLYGON_SHIFT_BITS)).astype(np.int32)
  cv2.fillPoly(canvas, [fixed_point], 255, lineType=cv2.LINE_8, shift=_POLYGON_SHIFT_BITS)
  # INTER_AREA with an integer factor is an exact box average.
  coverage = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
  mask[low[1]:high[1], low[0]:high[0]] = coverage.astype(np.float32) / 255.0
  return mask


# The eyebrows as polygons: each brow's lower contour, then its upper contour back (MediaPipe's
# FACEMESH_*_EYEBROW edge sets are the two open contours).
_BROWS = ((46, 53, 52, 65, 55, 107, 66, 105, 63, 70),
          (276, 283, 282, 295, 285, 336, 296, 334, 293, 300))


def brows_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
  """(size, size) float32 coverage of both eyebrows (the polygons between their contours),
  from (478, 2) MediaPipe landmarks in pixels of the (size, size) crop."""
  landmarks = np.asarray(landmarks, np.float64)
  mask = np.zeros((size, size), np.float32)
  for brow in _BROWS:
    mask = np.maximum(mask, polygon_mask(landmarks[list(brow)], size))
  return mask


# How far the eyebrows' polygons are grown when they are left out (crop pixels): the contour
# points lie on the brow's edge, the hair a little beyond.
_BROW_MARGIN = 2


def face_region_mask(landmarks: np.ndarray, size: int, without_brows: bool = False
                     ) -> np.ndarray:
  """The skin region of a face: face oval minus both eye openings and the mouth opening.

  Args:
    landmarks: (478, 2) MediaPipe landmarks in pixels of the (size, size) crop.
    size: side of the crop.
    without_brows: leave the eyebrows out too (`brows_mask` grown by _BROW_MARGIN pixels): hair
      that a smooth albedo space cannot draw (a rig's photometric fit).

  Returns:
    (size, size) float32 in [0, 1].
  """
  landmarks = np.asarray(landmarks, np.float64)
  regions = _regions()
  mask = polygon_mask(landmarks[list(regions["FACE_OVAL"])], size)
  for hole in (regions["LEFT_EYE"], regions["RIGHT_EYE"], regions["INNER_LIPS"]):
    mask *= 1.0 - polygon_mask(landmarks[list(hole)], size)
  if without_brows:
    side = 2 * _BROW_MARGIN + 1
    mask *= 1.0 - cv2.dilate(brows_mask(landmarks, size), np.ones((side, side), np.uint8))
  return mask
