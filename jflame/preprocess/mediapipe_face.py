"""MediaPipe face detection, 478-point face mesh and selfie segmentation, held in one object.

All models ship inside the mediapipe 0.10.21 wheel and run offline. `FaceAnalyzer` owns the
MediaPipe graphs: create one per process, use it for many images, close it (it is a context
manager). Nothing here is global.

Pixel convention. MediaPipe reports coordinates normalised by the image size. Measured on real
photographs (mirror an image and compare the mean landmark x: it moves by W - x - 1, not W - x;
halve an image with area averaging: landmarks move to x / 2 - 0.25, not x / 2; both with an
error well under 0.1 px over dozens of images and face sizes of 40-170 px), `x * W` puts pixel
centres at integers. In the convention of `jflame.camera` (centres at +0.5) a landmark is at
`x * W + 0.5`, `y * H + 0.5`. Every coordinate this module returns is in that convention.
MediaPipe's relative depth `z` is scaled like x (`z * W`, pixels, no offset); smaller is closer
to the camera and the origin is near the centre of the head.
"""

import dataclasses
import os
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np

from jflame.errors import ModelFileError

NUM_LANDMARKS = 478
# MediaPipe's full-range detector looks at a 192 x 192 letterboxed copy, so detecting on a
# larger image only costs time; bigger photographs are area-downscaled to this side first.
DETECTION_MAX_SIDE = 1024
# Tiled search (when the whole image gives no face): levels of tiles of 1/2, 1/4 ... of the
# longer side, none smaller than TILE_MIN_SIDE pixels; boxes overlapping more than
# DUPLICATE_BOX_IOU are one face seen by two tiles.
TILE_LEVELS = 2
TILE_MIN_SIDE = 512
DUPLICATE_BOX_IOU = 0.3
# A face mesh may find other faces near the chosen one in its window; a landmark set belongs to
# the chosen face only if its box overlaps the detection box at least this much (IoU).
MIN_LANDMARK_BOX_IOU = 0.3

FACE_LANDMARKER_DOWNLOAD_URL = ("https://storage.googleapis.com/mediapipe-models/face_landmarker/"
                                "face_landmarker/float16/1/face_landmarker.task")


@dataclasses.dataclass(frozen=True)
class AnalyzerOptions:
  """Settings of a `FaceAnalyzer` (picklable, so worker processes can build their own).

  Attributes:
    min_detection_confidence: score threshold of the face detectors.
    min_landmark_confidence: presence threshold of the face mesh.
    landmarker_task_path: optional path of a MediaPipe Tasks FaceLandmarker `.task` file; when
      set, landmarks come from the Tasks API instead of the bundled face mesh. Never required.
    max_mesh_faces: faces the mesh may return per analysis window (the chosen one is then
      picked by overlap with the detection box, so a neighbour in a group photo is not taken).
  """
  min_detection_confidence: float = 0.5
  min_landmark_confidence: float = 0.5
  landmarker_task_path: Optional[str] = None
  max_mesh_faces: int = 3


@dataclasses.dataclass(frozen=True)
class FaceDetection:
  """One detected face, in pixels of the image given to `FaceAnalyzer.detect_faces`.

  Attributes:
    box: (4,) float64 (x_min, y_min, x_max, y_max).
    score: detector confidence in [0, 1].
    keypoints: (6, 2) float64: right eye, left eye, nose tip, mouth centre, right ear tragion,
      left ear tragion ("right" is the subject's right).
  """
  box: np.ndarray
  score: float
  keypoints: np.ndarray

  @property
  def size(self) -> float:
    """The longer side of the box in pixels."""
    return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

  @property
  def area(self) -> float:
    return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))

  @property
  def center(self) -> np.ndarray:
    return np.array([(self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0])


def _mediapipe():
  """MediaPipe, imported when a graph is built: `--landmarks device` runs (and machines without
  MediaPipe) import this package without it."""
  import mediapipe
  return mediapipe


class PersonSegmenter:
  """MediaPipe's selfie segmentation alone (the person: head, hair, body), for callers that need
  no face graphs. Close when done, or use as a context manager."""

  def __init__(self):
    self._graph = _mediapipe().solutions.selfie_segmentation.SelfieSegmentation(
        model_selection=0)

  def foreground(self, image: np.ndarray) -> np.ndarray:
    """(H, W) float32 foreground probability in [0, 1] of an RGB image."""
    mask = self._graph.process(np.ascontiguousarray(image)).segmentation_mask
    return np.clip(np.asarray(mask, np.float32), 0.0, 1.0)

  def close(self) -> None:
    if self._graph is not None:
      self._graph.close()
      self._graph = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class FaceAnalyzer:
  """MediaPipe graphs for face detection, face mesh (with irises) and selfie segmentation.

  Create once per process and close when done:

    with FaceAnalyzer() as analyzer:
      records = [prepare_image(path, analyzer) for path in paths]

  Detection uses the full-range model (faces up to about 5 m away) and falls back to the
  short-range model when that finds nothing: the full-range model misses faces that fill the
  whole frame, such as tight portrait crops. Large photographs without a face at whole-image
  scale are then searched in tiles (see `detect_faces`).

  Raises (from the constructor):
    ModelFileError: `options.landmarker_task_path` is set but missing or not a FaceLandmarker.
  """

  def __init__(self, options: AnalyzerOptions = AnalyzerOptions()):
    self.options = options
    self._closed = False
    solutions = _mediapipe().solutions
    self._full_range_detector = solutions.face_detection.FaceDetection(
        model_selection=1, min_detection_confidence=options.min_detection_confidence)
    self._short_range_detector = solutions.face_detection.FaceDetection(
        model_selection=0, min_detection_confidence=options.min_detection_confidence)
    self._segmenter = PersonSegmenter()
    self._face_mesh = None
    self._task_landmarker = None
    try:
      if options.landmarker_task_path is None:
        self._face_mesh = solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=options.max_mesh_faces, refine_landmarks=True,
            min_detection_confidence=options.min_detection_confidence,
            min_tracking_confidence=options.min_landmark_confidence)
      else:
        self._task_landmarker = _create_task_landmarker(options)
    except BaseException:
      self.close()
      raise

  def detect_faces(self, image: np.ndarray) -> List[FaceDetection]:
    """All faces in an RGB uint8 (H, W, 3) image, largest box first.

    The whole image is searched first. Only when that finds nothing, overlapping square tiles
    are searched (half, then a quarter of the longer side, never below `TILE_MIN_SIDE`): the
    detector sees a 192-pixel copy, so in a large photograph it misses faces smaller than about
    1/14 of the longer side. Faces counted are those of the first search that finds any.

    Raises:
      RuntimeError: MediaPipe failed on this image.
    """
    self._check_open()
    detections = self._detect(image, short_range_fallback=True)
    if not detections:
      detections = self._detect_in_tiles(image)
    return sorted(detections, key=lambda detection: -detection.area)

  def detect_close_faces(self, image: np.ndarray) -> List[FaceDetection]:
    """Faces in an image that a face fills a good part of (a window cut around one face), with
    the short-range model only, highest score first. Its score says how upright the face looks:
    measured on real photos turned by multiples of 30 degrees, the quarter turn that brings a
    face nearest upright always scored highest (see `pipeline.upright_window`).

    Raises:
      RuntimeError: MediaPipe failed on this image.
    """
    self._check_open()
    detections = self._detect(image, short_range_fallback=False,
                              detector=self._short_range_detector)
    return sorted(detections, key=lambda detection: -detection.score)

  def _detect(self, image: np.ndarray, short_range_fallback: bool,
              detector=None) -> List[FaceDetection]:
    """One detector pass over a whole image; boxes in its pixels."""
    height, width = image.shape[:2]
    scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    if scale < 1.0:
      small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
      detection_input = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    else:
      detection_input = np.ascontiguousarray(image)
    small_height, small_width = detection_input.shape[:2]
    detector = detector if detector is not None else self._full_range_detector
    results = detector.process(detection_input).detections
    if not results and short_range_fallback:
      results = self._short_range_detector.process(detection_input).detections
    # Normalised coordinates -> pixels of the detection input (see module docstring) -> pixels of
    # `image`; the resize above scaled each axis by exactly small_size / size.
    to_pixels = np.array([width / small_width, height / small_height])
    detections = []
    for result in results or []:
      location = result.location_data
      relative_box = location.relative_bounding_box
      corners = np.array([[relative_box.xmin, relative_box.ymin],
                          [relative_box.xmin + relative_box.width,
                           relative_box.ymin + relative_box.height]])
      keypoints = np.array([[point.x, point.y] for point in location.relative_keypoints])
      corners = _normalized_to_pixels(corners, small_width, small_height) * to_pixels
      keypoints = _normalized_to_pixels(keypoints, small_width, small_height) * to_pixels
      detections.append(FaceDetection(box=corners.reshape(4), score=float(result.score[0]),
                                      keypoints=keypoints))
    return detections

  def _detect_in_tiles(self, image: np.ndarray) -> List[FaceDetection]:
    """Detection over half-overlapping square tiles, coarse to fine; the first level with any
    face wins. A face cut by a tile's inner edge is dropped: a neighbouring tile holds it whole."""
    height, width = image.shape[:2]
    previous_side = None
    for level in range(1, TILE_LEVELS + 1):
      side = int(min(max(height, width) / 2**level, height, width))
      if side < TILE_MIN_SIDE or side == previous_side:
        break
      previous_side = side
      margin = 0.01 * side
      found = []
      for x0 in _tile_starts(width, side):
        for y0 in _tile_starts(height, side):
          offset = np.array([x0, y0], np.float64)
          # Which tile edges (x_min, y_min, x_max, y_max) lie inside the image.
          inner_edges = np.array([x0 > 0, y0 > 0, x0 + side < width, y0 + side < height])
          tile = image[y0:y0 + side, x0:x0 + side]
          for detection in self._detect(tile, short_range_fallback=False):
            box = detection.box
            touches = np.array([box[0] < margin, box[1] < margin, box[2] > side - margin,
                                box[3] > side - margin])
            if np.any(touches & inner_edges):
              continue
            found.append(FaceDetection(box=box + np.tile(offset, 2), score=detection.score,
                                       keypoints=detection.keypoints + offset))
      if found:
        return _non_maximum_suppression(found)
    return []

  def face_landmarks(self, image: np.ndarray) -> List[np.ndarray]:
    """478-point face meshes (irises included) of the faces in an RGB uint8 (H, W, 3) image.

    Returns:
      One (478, 3) float64 array per face: x and y in pixels of `image` (convention of
      `jflame.camera`), z MediaPipe's relative depth in the same pixel units.

    Raises:
      RuntimeError: MediaPipe failed on this image.
      ModelFileError: the `.task` model does not give 478 landmarks.
    """
    self._check_open()
    height, width = image.shape[:2]
    image = np.ascontiguousarray(image)
    if self._task_landmarker is not None:
      mp = _mediapipe()
      result = self._task_landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
      faces = [[(p.x, p.y, p.z) for p in face] for face in result.face_landmarks]
    else:
      result = self._face_mesh.process(image)
      faces = [[(p.x, p.y, p.z) for p in face.landmark]
               for face in (result.multi_face_landmarks or [])]
    meshes = []
    for face in faces:
      normalized = np.asarray(face, np.float64)
      if normalized.shape != (NUM_LANDMARKS, 3):
        raise ModelFileError(
            f"The landmark model gave {normalized.shape[0]} landmarks, expected {NUM_LANDMARKS} "
            "(face mesh with irises); use MediaPipe's face_landmarker.task or no .task file.")
      mesh = np.empty_like(normalized)
      mesh[:, :2] = _normalized_to_pixels(normalized[:, :2], width, height)
      mesh[:, 2] = normalized[:, 2] * width
      meshes.append(mesh)
    return meshes

  def segment_foreground(self, image: np.ndarray) -> np.ndarray:
    """Selfie-segmentation foreground probability (H, W) float32 in [0, 1] of an RGB image.

    Raises:
      RuntimeError: MediaPipe failed on this image.
    """
    self._check_open()
    return self._segmenter.foreground(image)

  def close(self) -> None:
    """Releases the MediaPipe graphs. Safe to call more than once."""
    for attribute in ("_full_range_detector", "_short_range_detector", "_segmenter",
                      "_face_mesh", "_task_landmarker"):
      graph = getattr(self, attribute, None)
      if graph is not None:
        graph.close()
        setattr(self, attribute, None)
    self._closed = True

  def __enter__(self) -> "FaceAnalyzer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _check_open(self) -> None:
    # ValueError like I/O on a closed file: a caller bug, not a per-image failure.
    if self._closed:
      raise ValueError("This FaceAnalyzer is closed; create a new one.")


def _normalized_to_pixels(points: np.ndarray, width: int, height: int) -> np.ndarray:
  """MediaPipe normalised (N, 2) -> pixels with centres at +0.5 (see module docstring)."""
  return points * np.array([width, height], np.float64) + 0.5


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
  """(4,) (x_min, y_min, x_max, y_max) of (N, >=2) landmarks."""
  return np.concatenate([landmarks[:, :2].min(axis=0), landmarks[:, :2].max(axis=0)])


def box_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
  """Intersection over union of two (x_min, y_min, x_max, y_max) boxes."""
  top_left = np.maximum(box_a[:2], box_b[:2])
  bottom_right = np.minimum(box_a[2:], box_b[2:])
  intersection = float(np.prod(np.clip(bottom_right - top_left, 0.0, None)))
  area_a = float(np.prod(np.clip(box_a[2:] - box_a[:2], 0.0, None)))
  area_b = float(np.prod(np.clip(box_b[2:] - box_b[:2], 0.0, None)))
  union = area_a + area_b - intersection
  return intersection / union if union > 0 else 0.0


def _tile_starts(length: int, side: int) -> List[int]:
  """Start offsets of tiles of `side` covering [0, length) with at least half-tile overlap."""
  count = int(np.ceil(max(length - side, 0) / (side / 2))) + 1
  return sorted({int(round(start)) for start in np.linspace(0, length - side, count)})


def _non_maximum_suppression(detections: List[FaceDetection]) -> List[FaceDetection]:
  """Keeps the best-scoring detection of every group of overlapping boxes."""
  kept = []
  for detection in sorted(detections, key=lambda detection: -detection.score):
    if all(box_iou(detection.box, other.box) <= DUPLICATE_BOX_IOU for other in kept):
      kept.append(detection)
  return kept


def check_landmarker_task_path(options: AnalyzerOptions) -> Optional[Path]:
  """The `.task` file named by `options` (None when unset), checked to exist.

  Raises:
    ModelFileError: the file is named but missing.
  """
  if options.landmarker_task_path is None:
    return None
  path = Path(os.path.expanduser(options.landmarker_task_path))
  if not path.is_file():
    raise ModelFileError(
        f"FaceLandmarker model file {path} not found. Download face_landmarker.task from "
        f"{FACE_LANDMARKER_DOWNLOAD_URL} and put it at {path.resolve()} (or pass the path where "
        "it is), or leave the option unset to use the face mesh bundled with mediapipe.")
  return path


def _create_task_landmarker(options: AnalyzerOptions):
  """A MediaPipe Tasks FaceLandmarker from a user-supplied `.task` file (image mode)."""
  path = check_landmarker_task_path(options)
  from mediapipe.tasks.python import vision
  from mediapipe.tasks.python.core.base_options import BaseOptions
  landmarker_options = vision.FaceLandmarkerOptions(
      base_options=BaseOptions(model_asset_path=str(path)),
      running_mode=vision.RunningMode.IMAGE,
      num_faces=options.max_mesh_faces,
      min_face_detection_confidence=options.min_detection_confidence,
      min_face_presence_confidence=options.min_landmark_confidence)
  try:
    return vision.FaceLandmarker.create_from_options(landmarker_options)
  except (RuntimeError, ValueError) as error:
    raise ModelFileError(f"{path}: MediaPipe could not load this as a FaceLandmarker .task "
                         f"model ({error}); use MediaPipe's face_landmarker.task.") from None
