"""Photograph -> `PreparedImage`: read, detect, landmark, align, mask (host side, never in jit).

For one image:
1. Read the file's bytes once (`read_source`: size, mtime, content hash for the record) and
   decode them (`decode_image`; upright RGB uint8). A large JPEG is decoded at 1/2, 1/4 or 1/8
   of its size for detection (`DETECTION_MIN_SIDE`), which costs a fraction of a full decode.
2. Detect every face (`FaceAnalyzer.detect_faces`); choose the largest box. When a reduced image
   shows no face, the full-size one is searched (tiles included) before giving up.
3. Cut a square analysis window around the chosen face (`ANALYSIS_WINDOW_SCALE` box sizes,
   `ANALYSIS_WINDOW_SIZE` pixels) and run the face mesh (and, unless `landmarks_only`, the selfie
   segmentation) on it. On the window a small face in a group photo is as large as a portrait,
   and the mesh whose box overlaps the detection box is taken, so the landmarks belong to the
   chosen face.
4. Map the landmarks back to the original, frame the face in a levelled square crop
   (`align.crop_from_landmarks`), warp the image (and segmentation) into it, draw the face mask
   (not in `landmarks_only` mode: the landmark fit uses neither mask).

The window and the crop are each cut from the coarsest decoded size that still has a source
pixel per output pixel, so a reduced decode never upsamples what MediaPipe or the fit sees; a
small face in a large JPEG is decoded again at the size it needs.

`prepare_image` never raises for a problem of one image (unreadable file, no face, MediaPipe
failure): the record's `status` and `message` say what happened. A `Preprocessor` does many for
a whole run, optionally in worker processes, keeping the input order; `prepare_images` is one
`Preprocessor` used once.
"""

import dataclasses
import functools
import multiprocessing
import multiprocessing.util
import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from jflame.camera import apply_affine, invert_affine
from jflame.errors import ImageReadError
from jflame.preprocess.align import (DEFAULT_CROP_SCALE, affine_scale, compose_affine,
                                     crop_from_landmarks, inside_image_mask, points_inside,
                                     quarter_turns, rotation_about, square_window, warp_affine)
from jflame.preprocess.image_io import MAX_REDUCTION, DecodedImage, decode_image, read_source
from jflame.preprocess.masks import face_region_mask
from jflame.preprocess.mediapipe_face import (MIN_LANDMARK_BOX_IOU, AnalyzerOptions, FaceAnalyzer,
                                              FaceDetection, box_iou,
                                              check_landmarker_task_path, landmark_box)
from jflame.sources import file_id

STATUS_OK = "ok"
STATUS_UNREADABLE = "unreadable"
STATUS_NO_FACE = "no_face"
STATUS_ANALYSIS_FAILED = "analysis_failed"

DEFAULT_CROP_SIZE = 256
# Side of the analysis window in detection-box sizes: room for the whole head and for the
# selfie segmentation to see some shoulders, with the face still large for the mesh's own
# short-range detector. The window's resolution is well above the mesh's 192-pixel input.
ANALYSIS_WINDOW_SCALE = 2.4
ANALYSIS_WINDOW_SIZE = 384
# Fewest pixels on the longer side of a reduced decode used for detection: the detector looks
# at a 192-pixel copy, and a photo over 1024 pixels is shrunk to 1024 before it anyway
# (`mediapipe_face.DETECTION_MAX_SIDE`), so this loses none of its reach.
DETECTION_MIN_SIDE = 512
# Longest side of the images sent to the device in `--landmarks device` mode.
DEVICE_MAX_SIDE = 512
# `upright_window`: a detection in a turned window is the chosen face when its centre is within
# this fraction of the window side of the window's centre; a face already upright (no turn,
# eyes within this many degrees of level) keeps the level window, as the mesh's own detector
# levels small rolls itself.
UPRIGHT_CENTRE_TOLERANCE = 0.2
# A turned window is used only when it beats the level one by this much. Measured on the shared
# photos and the astronaut: faces turned by 90, 180 or 270 degrees won by 0.09-0.26; a half-
# occluded or cut upright face lost to a wrong turn by up to 0.06 (then fitted upside down).
UPRIGHT_TURN_MARGIN = 0.08
# A level window that scores this much is taken without trying the turns (each try is one more
# MediaPipe call: on a loaded 2-core machine the search made preprocessing 1.9x slower). Faces
# turned 90, 180 or 270 degrees scored at most 0.82 level; upright ones 0.89-0.95.
UPRIGHT_ENOUGH_SCORE = 0.88
# A face found only in the photo turned by quarter turns must score this much (`_detect_faces`).
TURNED_MIN_DETECTION_SCORE = 0.75
MIN_WINDOW_ROLL_DEGREES = 20.0

ImageSource = Union[str, os.PathLike, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
  """Everything preprocessing learned about one photograph (host NumPy arrays).

  Crop-frame arrays are float32 (they go to the device through `stack_observations`);
  original-frame arrays and transforms are float64. The array fields are None unless
  `status == "ok"`.

  Attributes:
    name: file stem, unique within a run.
    source: the image file, or None for an in-memory array.
    status: "ok", "unreadable", "no_face" or "analysis_failed".
    message: human-readable explanation ("" when ok).
    image_width, image_height: size of the (upright) original in pixels (0 if unreadable).
    num_faces: faces the detector found in the whole image.
    detection_box: (4,) x_min, y_min, x_max, y_max of the chosen (largest) face, original pixels.
    detection_score: detector confidence of the chosen face.
    crop_from_original: (2, 3) similarity, original pixels -> crop pixels.
    crop: (S, S, 3) uint8 RGB aligned crop.
    landmarks: (478, 2) float32 MediaPipe landmarks in crop pixels.
    landmarks_original: (478, 2) float64 the same in original pixels.
    landmarks_z: (478,) float32 MediaPipe relative depth in crop pixels (same scale as x; smaller
      is closer to the camera; origin near the head centre). Divide by `crop_scale` for
      original pixels.
    landmark_weights: (478,) float32, 1, or 0 for a landmark outside the crop or the original.
    face_mask: (S, S) float32 in [0, 1]: face oval minus eyes and mouth opening, zero where
      the crop lies outside the original (and times `foreground_mask` if asked for).
    foreground_mask: (S, S) float32 in [0, 1]: selfie-segmentation person probability.
    source_size: the file's size in bytes (None for an array or a file that could not be read).
    source_mtime_ns: its modification time in ns since the epoch, as read.
    source_hash: hex SHA-256 (`jflame.sources.hash_bytes`) of exactly the bytes that were decoded.
    upright_scores: (4,) float32 short-range detector scores of the face's window turned 0, 1,
      2, 3 quarter turns counter-clockwise (`upright_window`; 0: no face, or not tried).
    upright_turns: which of those turns was fitted.
    upright_score: the detector's score in the window as fitted (`jflame.quality` flags a low
      one).

  `face_mask` and `foreground_mask` are None in `landmarks_only` mode. `message` is not empty on
  an ok record when there is something to know: more than one face, or a very large image.
  """
  name: str
  source: Optional[Path]
  status: str
  message: str = ""
  image_width: int = 0
  image_height: int = 0
  num_faces: int = 0
  detection_box: Optional[np.ndarray] = None
  detection_score: Optional[float] = None
  crop_from_original: Optional[np.ndarray] = None
  crop: Optional[np.ndarray] = None
  landmarks: Optional[np.ndarray] = None
  landmarks_original: Optional[np.ndarray] = None
  landmarks_z: Optional[np.ndarray] = None
  landmark_weights: Optional[np.ndarray] = None
  face_mask: Optional[np.ndarray] = None
  foreground_mask: Optional[np.ndarray] = None
  source_size: Optional[int] = None
  source_mtime_ns: Optional[int] = None
  source_hash: Optional[str] = None
  upright_scores: Optional[np.ndarray] = None
  upright_turns: Optional[int] = None
  upright_score: Optional[float] = None

  @property
  def ok(self) -> bool:
    return self.status == STATUS_OK

  @property
  def crop_size(self) -> Optional[int]:
    return None if self.crop is None else self.crop.shape[0]

  @property
  def crop_scale(self) -> Optional[float]:
    """Crop pixels per original pixel."""
    return None if self.crop_from_original is None else affine_scale(self.crop_from_original)


def prepare_image(source: ImageSource, analyzer: FaceAnalyzer, crop_size: int = DEFAULT_CROP_SIZE,
                  *, name: Optional[str] = None, crop_scale: float = DEFAULT_CROP_SCALE,
                  level_eyes: bool = True, mask_with_foreground: bool = False,
                  landmarks_only: bool = False) -> PreparedImage:
  """Preprocesses one photograph. Never raises for a problem of the image itself.

  Args:
    source: an image file, or an RGB uint8 (H, W, 3) (or greyscale (H, W)) array.
    analyzer: the process's `FaceAnalyzer`.
    crop_size: side S of the square crop in pixels.
    name: record name; defaults to the file stem ("image" for an array).
    crop_scale: crop side / longest side of the face mesh's box (see `align`).
    level_eyes: rotate the crop so the eyes are level.
    mask_with_foreground: multiply the face mask by the segmentation foreground.
    landmarks_only: make only what a landmark fit needs (landmarks, weights, crop and its
      transform): no selfie segmentation and no masks, which only the photometric fit uses
      (`mask_with_foreground` is then moot).

  Returns:
    A `PreparedImage`; check `.ok`.
  """
  path = None if isinstance(source, np.ndarray) else Path(source)
  name = name if name is not None else ("image" if path is None else path.stem)
  make_record = functools.partial(PreparedImage, name=name, source=path)
  try:
    if path is None:
      pixels = _Pixels(_decoded_array(source))
    else:
      source_file = read_source(path)
      make_record = functools.partial(make_record, source_size=source_file.size,
                                      source_mtime_ns=source_file.mtime_ns,
                                      source_hash=source_file.content_hash)
      pixels = _Pixels(decode_image(source_file.data, str(path), MAX_REDUCTION,
                                    DETECTION_MIN_SIDE), source_file.data, str(path))
    make_record = functools.partial(make_record, image_width=pixels.width,
                                    image_height=pixels.height)
    settings = _CropSettings(crop_size, crop_scale, level_eyes, mask_with_foreground,
                             landmarks_only)
    return _analyse(pixels, analyzer, settings, make_record, _label(path, name))
  except ImageReadError as error:
    return make_record(status=STATUS_UNREADABLE, message=str(error))


def _analyse(pixels: "_Pixels", analyzer: FaceAnalyzer, settings: "_CropSettings",
             make_record: Callable[..., PreparedImage], label: str) -> PreparedImage:
  """Steps 2-4 of the module docstring on decoded pixels; `make_record` makes a record with
  the source facts already filled in. Raises ImageReadError only from a further decode."""
  notes = list(pixels.notes)
  try:
    detections = _detect_faces(pixels, analyzer)
    if not detections:
      return make_record(status=STATUS_NO_FACE, message=_joined(
          f"{label}: the MediaPipe face detectors found no face (confidence >= "
          f"{analyzer.options.min_detection_confidence}; the smallest faces it finds are about "
          "1/14 of the photo's longer side, 1/50 in photos over 2048 pixels).", notes))
    chosen = detections[0]
    if len(detections) > 1:
      notes.insert(0, f"{len(detections)} faces; fitted the largest")
    make_record = functools.partial(make_record, num_faces=len(detections),
                                    detection_box=chosen.box, detection_score=chosen.score)
    window_from_original, window, scores, turns, score = upright_window(pixels, analyzer,
                                                                        chosen)
    make_record = functools.partial(make_record, upright_scores=scores, upright_turns=turns,
                                    upright_score=score)
    mesh = _mesh_of_detected_face(analyzer.face_landmarks(window), _centred_box(chosen))
    if mesh is None:
      return make_record(status=STATUS_NO_FACE, message=_joined(
          f"{label}: {len(detections)} face(s) detected, but the face mesh found no "
          f"landmarks on the largest one (box {np.round(chosen.box).astype(int).tolist()}).",
          notes))
    foreground_window = (None if settings.landmarks_only
                         else analyzer.segment_foreground(window))
  except RuntimeError as error:
    return make_record(status=STATUS_ANALYSIS_FAILED, message=_joined(
        f"{label}: MediaPipe failed on this image: {error}", notes))
  return make_record(status=STATUS_OK, message=_joined("", notes),
                     **_framed(pixels, settings, mesh, window_from_original, foreground_window))


def _framed(pixels: "_Pixels", settings: "_CropSettings", mesh: np.ndarray,
            window_from_original: np.ndarray, foreground_window: Optional[np.ndarray]) -> dict:
  """The crop-frame fields of an ok record, from the mesh (and segmentation) of the window."""
  crop_size = settings.crop_size
  width, height = pixels.width, pixels.height
  original_from_window = invert_affine(window_from_original)
  # Depth is scaled like x: window pixels -> original pixels.
  frame = _crop_frame(apply_affine(original_from_window, mesh[:, :2]),
                      mesh[:, 2] / affine_scale(window_from_original), width, height, settings)
  crop_from_original, landmarks = frame["crop_from_original"], frame["landmarks"]
  crop = pixels.warp(crop_from_original, crop_size,
                     crop_size / affine_scale(crop_from_original))
  face_mask = foreground_mask = None
  if not settings.landmarks_only:
    inside = inside_image_mask(crop_from_original, crop_size, width, height)
    foreground_mask = (inside * warp_affine(
        foreground_window, compose_affine(crop_from_original, original_from_window), crop_size)
                       ).astype(np.float32)
    face_mask = face_region_mask(landmarks, crop_size) * inside
    if settings.mask_with_foreground:
      face_mask = face_mask * foreground_mask
    face_mask = face_mask.astype(np.float32)
  return dict(frame, crop=crop, face_mask=face_mask, foreground_mask=foreground_mask)


def _crop_frame(landmarks_original: np.ndarray, depth_original: np.ndarray, width: int,
                height: int, settings: "_CropSettings") -> dict:
  """The crop frame of landmarks (N, 2) and depths (N,) in original pixels: the transform, the
  landmarks and depths in crop pixels, and their weights (1 inside both the crop and the
  original)."""
  crop_size = settings.crop_size
  crop_from_original = crop_from_landmarks(landmarks_original, crop_size, settings.crop_scale,
                                           settings.level_eyes)
  landmarks = apply_affine(crop_from_original, landmarks_original)
  landmark_weights = (points_inside(landmarks, crop_size, crop_size)
                      & points_inside(landmarks_original, width, height))
  return dict(crop_from_original=crop_from_original, landmarks=landmarks.astype(np.float32),
              landmarks_original=landmarks_original,
              landmarks_z=(depth_original * affine_scale(crop_from_original)).astype(np.float32),
              landmark_weights=landmark_weights.astype(np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceImage:
  """A photograph read and decoded for landmarks on the device (`--landmarks device`): the
  host's whole share of the work.

  Attributes:
    record: a PreparedImage with the source facts and size filled in; its status is ok until
      the device says otherwise, or "unreadable" (then `pixels` is None).
    pixels: (h, w, 3) uint8 RGB, the longer side at most DEVICE_MAX_SIDE.
    scale: (2,) original pixels per pixel of `pixels` along x and y (a point (x, y) there,
      centres at +0.5, is at scale * (x, y) in the original).
  """
  record: PreparedImage
  pixels: Optional[np.ndarray]
  scale: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(2))


def decode_for_device(job: Tuple[ImageSource, str], max_side: int = DEVICE_MAX_SIDE
                      ) -> DeviceImage:
  """Reads and decodes one image for the device's landmarks: a JPEG at the coarsest DCT
  reduction whose longer side keeps `max_side` pixels, then shrunk (area averaging) to at most
  `max_side`; never the full-size image of a large JPEG. Never raises for the image's own
  problems (an unreadable record instead)."""
  import cv2
  source, name = job
  path = None if isinstance(source, np.ndarray) else Path(source)
  make_record = functools.partial(PreparedImage, name=name, source=path)
  try:
    if path is None:
      decoded = _decoded_array(source)
    else:
      source_file = read_source(path)
      make_record = functools.partial(make_record, source_size=source_file.size,
                                      source_mtime_ns=source_file.mtime_ns,
                                      source_hash=source_file.content_hash)
      decoded = decode_image(source_file.data, str(path), MAX_REDUCTION, max_side)
  except ImageReadError as error:
    return DeviceImage(make_record(status=STATUS_UNREADABLE, message=str(error)), None)
  pixels = decoded.pixels
  # A reduced decode's point x is at reduction * x in the original; a shrink after it scales
  # each axis by its own rounding.
  scale = np.full(2, float(decoded.reduction))
  longest = max(pixels.shape[:2])
  if longest > max_side:
    shrink = max_side / longest
    size = (max(1, round(pixels.shape[1] * shrink)), max(1, round(pixels.shape[0] * shrink)))
    scale *= (pixels.shape[1] / size[0], pixels.shape[0] / size[1])
    pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
  record = make_record(status=STATUS_OK, message=_joined("", list(decoded.notes)),
                       image_width=decoded.width, image_height=decoded.height)
  return DeviceImage(record, np.ascontiguousarray(pixels), scale)


def prepared_from_device(image: DeviceImage, found: bool, landmarks: np.ndarray,
                         box: np.ndarray, score: float, settings: "_CropSettings",
                         with_crop: bool = True) -> PreparedImage:
  """The landmark-mode record of an image whose face mesh ran on the device: `landmarks`
  (478, 3) and `box` (4,) in pixels of `image.pixels` (centres at +0.5), the crop cut from
  those pixels unless not `with_crop` (a landmark fit without encoders reads no crop; the
  pictures are drawn on the source)."""
  record = image.record
  if not record.ok:
    return record
  label = _label(record.source, record.name)
  if not found:
    return dataclasses.replace(record, status=STATUS_NO_FACE, message=_joined(
        f"{label}: MediaPipe's face detector and mesh (on the device) found no face "
        "(the short-range detector finds faces of about 1/14 of the photo's longer side and "
        "more; --landmarks mediapipe also searches tiles and turned copies).",
        [record.message] if record.message else []))
  scale = np.asarray(image.scale, np.float64)
  # Depth is scaled like x.
  frame = _crop_frame(np.asarray(landmarks[:, :2], np.float64) * scale,
                      np.asarray(landmarks[:, 2], np.float64) * scale[0], record.image_width,
                      record.image_height, settings)
  original_from_device = np.array([[scale[0], 0.0, 0.0], [0.0, scale[1], 0.0]])
  crop = None if not with_crop else warp_affine(
      image.pixels, compose_affine(frame["crop_from_original"], original_from_device),
      settings.crop_size)
  return dataclasses.replace(
      record, num_faces=1, detection_box=np.asarray(box, np.float64) * np.tile(scale, 2),
      detection_score=float(score), upright_score=float(score), upright_turns=0, crop=crop,
      **frame)


def upright_window(pixels: "_Pixels", analyzer: FaceAnalyzer, chosen: FaceDetection
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
  """The analysis window around a detected face, turned so the face in it is upright.

  The face mesh trusts the roll its own detector reads from the eyes, and that detector cannot
  tell an upside-down face from an upright one (on the shared photos turned by 180 degrees it
  put the eyes on the mouth and gave a scrambled mesh whose fit still looked good). So the
  level window is shown to the short-range detector in its four quarter turns: the turn that
  brings the face nearest upright scores highest (measured on real photos at every 30 degrees),
  and its eye keypoints give the rest of the roll. A half-hidden face can score a little higher
  turned the wrong way, so a turn must beat the level window by `UPRIGHT_TURN_MARGIN`. The
  window is then cut once more from the original, turned by the whole angle.

  Returns:
    window_from_original: (2, 3) similarity, original pixels -> window pixels.
    window: (ANALYSIS_WINDOW_SIZE, ANALYSIS_WINDOW_SIZE, 3) uint8, the face upright in it.
    upright_scores: (4,) float32 the detector's best score near the window centre with the
      window turned 0, 1, 2, 3 times by 90 degrees counter-clockwise (0 where none, or not
      tried: the level window scored `UPRIGHT_ENOUGH_SCORE`).
    upright_turns: the quarter turns of the window fitted.
    upright_score: the detector's score in the window as fitted (detected again when the
      window was turned: a face left at 60 degrees by the quarter turns scores low).
  """
  size = ANALYSIS_WINDOW_SIZE
  side = ANALYSIS_WINDOW_SCALE * chosen.size
  level_from_original = square_window(chosen.center, side, size)
  level = pixels.warp(level_from_original, size, side)
  center = np.array([size / 2.0, size / 2.0])
  scores = np.zeros(4, np.float32)
  rolls = np.zeros(4)
  for turns in range(4):
    face = _centred_face(analyzer, np.ascontiguousarray(np.rot90(level, turns)))
    if face is not None:
      scores[turns] = face.score
      right_eye, left_eye = face.keypoints[:2]
      rolls[turns] = np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0])
    if turns == 0 and scores[0] >= UPRIGHT_ENOUGH_SCORE:
      return level_from_original, level, scores, 0, float(scores[0])
  best = int(np.argmax(scores))
  if scores[best] < scores[0] + UPRIGHT_TURN_MARGIN:
    best = 0   # most photos are upright: a turn must win clearly
  if scores[best] == 0.0:
    return level_from_original, level, scores, best, 0.0
  window_from_original = compose_affine(
      rotation_about(center, -rolls[best]),
      compose_affine(quarter_turns(size, size, best), level_from_original))
  if best == 0 and abs(rolls[best]) < np.deg2rad(MIN_WINDOW_ROLL_DEGREES):
    return level_from_original, level, scores, best, float(scores[best])
  window = pixels.warp(window_from_original, size, side)
  face = _centred_face(analyzer, window)
  return window_from_original, window, scores, best, 0.0 if face is None else face.score


def _centred_face(analyzer: FaceAnalyzer, window: np.ndarray) -> Optional[FaceDetection]:
  """The best-scoring short-range detection near the centre of a window, if any."""
  center = np.array([ANALYSIS_WINDOW_SIZE / 2.0, ANALYSIS_WINDOW_SIZE / 2.0])
  for face in analyzer.detect_close_faces(window):
    if np.max(np.abs(face.center - center)) < UPRIGHT_CENTRE_TOLERANCE * ANALYSIS_WINDOW_SIZE:
      return face
  return None


def _centred_box(detection: FaceDetection) -> np.ndarray:
  """The detection's box as it lies in a window from `upright_window`: centred, scaled like the
  window; turned with the window, a face's near-square box stays about where it was."""
  scale = ANALYSIS_WINDOW_SIZE / (ANALYSIS_WINDOW_SCALE * detection.size)
  half = scale * (detection.box[2:] - detection.box[:2]) / 2.0
  center = np.full(2, ANALYSIS_WINDOW_SIZE / 2.0)
  return np.concatenate([center - half, center + half])


def _detect_faces(pixels: "_Pixels", analyzer: FaceAnalyzer) -> List[FaceDetection]:
  """Faces in original pixels, largest first: on the first decode, and when that is reduced and
  shows none, again on the full-size image, whose tiled search reaches smaller faces; when that
  too shows none, on the first decode turned by 90, 180 and 270 degrees (the full-range
  detector missed one of the six shared photos upside down, and found it turned back; a turned
  photo without a face gives false detections more easily: skimage's coffee cup, 0.61)."""
  image, reduction = pixels.first
  detections = analyzer.detect_faces(image)
  if not detections and reduction > 1:
    detections = analyzer.detect_faces(pixels.at(1)[0])
    if detections:
      return detections
  if not detections:
    for turns in (2, 1, 3):
      original_from_turned = invert_affine(quarter_turns(image.shape[1], image.shape[0], turns))
      turned = np.ascontiguousarray(np.rot90(image, turns))
      detections = [_turned_back(detection, original_from_turned)
                    for detection in analyzer.detect_faces(turned)
                    if detection.score >= TURNED_MIN_DETECTION_SCORE]
      if detections:
        break
  return [_scaled_detection(detection, reduction) for detection in detections]


def _turned_back(detection: FaceDetection, original_from_turned: np.ndarray) -> FaceDetection:
  """A detection in a quarter-turned image, in the image's own pixels."""
  corners = apply_affine(original_from_turned, detection.box.reshape(2, 2))
  box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
  return FaceDetection(box=box, score=detection.score,
                       keypoints=apply_affine(original_from_turned, detection.keypoints))


def _scaled_detection(detection: FaceDetection, factor: int) -> FaceDetection:
  """A detection in a reduced image, in pixels of an image `factor` times larger."""
  if factor == 1:
    return detection
  return FaceDetection(box=detection.box * factor, score=detection.score,
                       keypoints=detection.keypoints * factor)


def _joined(message: str, notes: Sequence[str]) -> str:
  return "; ".join(part for part in [message, *notes] if part)


class _Pixels:
  """A photograph at the reductions asked for (see `image_io.DecodedImage`), each decoded once.

  An in-memory array exists at reduction 1 only; a file's bytes are kept to decode it again at a
  finer reduction (never a coarser one than the first decode: that one was chosen for detection).
  """

  def __init__(self, first: DecodedImage, data: Optional[bytes] = None, label: str = ""):
    self.width, self.height, self.notes = first.width, first.height, first.notes
    self.first = (first.pixels, first.reduction)
    self._decoded = {first.reduction: first.pixels}
    self._data, self._label = data, label

  def at(self, reduction: int) -> Tuple[np.ndarray, int]:
    """(pixels, reduction) at the coarsest decodable reduction <= `reduction`."""
    if reduction not in self._decoded:
      decoded = decode_image(self._data, self._label, max_reduction=reduction)
      self._decoded[decoded.reduction] = decoded.pixels
      reduction = decoded.reduction
    return self._decoded[reduction], reduction

  def warp(self, dst_from_original: np.ndarray, size: int, source_side: float) -> np.ndarray:
    """`warp_affine` of the original onto (size, size), from the coarsest decode in which the
    `source_side` original pixels under the output still span `size` pixels or more."""
    reduction = self.first[1]
    while reduction > 1 and source_side / reduction < size:
      reduction //= 2
    image, reduction = self.at(reduction)
    original_from_reduced = np.array([[reduction, 0.0, 0.0], [0.0, reduction, 0.0]])
    return warp_affine(image, compose_affine(dst_from_original, original_from_reduced), size)


def _label(path: Optional[Path], name: str) -> str:
  return str(path) if path is not None else name


def _decoded_array(array: np.ndarray) -> DecodedImage:
  """An in-memory source as full-size RGB uint8 (H, W, 3), or ImageReadError saying what is
  wrong."""
  if array.dtype != np.uint8:
    raise ImageReadError(f"In-memory image has dtype {array.dtype}; pass uint8 RGB.")
  if array.ndim == 2:
    array = np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) == 0:
    raise ImageReadError(f"In-memory image has shape {array.shape}; pass (H, W, 3) RGB.")
  height, width = array.shape[:2]
  return DecodedImage(pixels=np.ascontiguousarray(array), reduction=1, width=width,
                      height=height)


def _mesh_of_detected_face(meshes: List[np.ndarray], box: np.ndarray) -> Optional[np.ndarray]:
  """The mesh whose landmark box overlaps the detection box most, if it overlaps enough."""
  overlaps = [box_iou(landmark_box(mesh), box) for mesh in meshes]
  if not overlaps or max(overlaps) < MIN_LANDMARK_BOX_IOU:
    return None
  return meshes[int(np.argmax(overlaps))]


@dataclasses.dataclass(frozen=True)
class _CropSettings:
  """The per-image keyword settings of `prepare_image`, bundled (to send to workers, too)."""
  crop_size: int
  crop_scale: float
  level_eyes: bool
  mask_with_foreground: bool
  landmarks_only: bool = False

  def prepare(self, job: Tuple[ImageSource, str], analyzer: FaceAnalyzer) -> PreparedImage:
    source, name = job
    return prepare_image(source, analyzer, self.crop_size, name=name, crop_scale=self.crop_scale,
                         level_eyes=self.level_eyes,
                         mask_with_foreground=self.mask_with_foreground,
                         landmarks_only=self.landmarks_only)


class Preprocessor:
  """Preprocessing for a whole run: one `FaceAnalyzer` in this process (workers=1), or a pool
  of worker processes that each build their own in their initializer.

  Create it once per run (starting workers and MediaPipe graphs takes about a second) and close
  it at the end; it is a context manager. Workers are started with "spawn", not "fork": the
  caller may already run JAX or MediaPipe threads, and forking a multi-threaded process can
  deadlock. As with any spawn pool, a script using workers must guard its entry point with
  `if __name__ == "__main__":`.

    with Preprocessor(crop_size=256, workers=4) as preprocessor:
      pending = preprocessor.prepare_iter(first_paths)    # workers start on it at once
      for next_paths in later_chunks:
        records = list(pending)
        pending = preprocessor.prepare_iter(next_paths)   # overlaps with the fit below
        fit(stack_observations(records, batch_size, 256))

  Settings are those of `prepare_image`; `landmarks_only=True` for a landmark-mode run skips
  the selfie segmentation and the masks. With `device_landmarks` (landmark mode only) the
  workers only read and decode (`decode_for_device`) and the face mesh runs on the device:
  `device_landmarks(pixels)` takes a list of (h, w, 3) uint8 images and returns NumPy arrays
  (found (n,), landmarks (n, 478, 3), box (n, 4), score (n,)) in their pixels
  (`jflame.landmark_nets.landmarker.DeviceLandmarker`); no MediaPipe graph is built, and
  without `device_crops` the records carry no crop (`crop` None).

  Raises:
    ModelFileError: the analyzer could not be built: a missing `.task` file (from the
      constructor) or an invalid one (from the constructor, or with workers from the first
      result).
  """

  def __init__(self, crop_size: int = DEFAULT_CROP_SIZE, *, workers: int = 1,
               analyzer_options: AnalyzerOptions = AnalyzerOptions(),
               crop_scale: float = DEFAULT_CROP_SCALE, level_eyes: bool = True,
               mask_with_foreground: bool = False, landmarks_only: bool = False,
               device_landmarks: Optional[Callable] = None, device_crops: bool = True):
    if device_landmarks is not None and not landmarks_only:
      raise ValueError("landmarks on the device serve landmark-mode runs only")
    self.settings = _CropSettings(crop_size, crop_scale, level_eyes, mask_with_foreground,
                                  landmarks_only)
    self.workers = max(1, workers)
    self._device_landmarks, self._device_crops = device_landmarks, device_crops
    self._analyzer = None
    self._pool = None
    self._open = True
    context = multiprocessing.get_context("spawn")
    if device_landmarks is not None:
      if self.workers > 1:
        self._pool = context.Pool(processes=self.workers)
      return
    check_landmarker_task_path(analyzer_options)   # fail here, not in every worker
    if self.workers == 1:
      self._analyzer = FaceAnalyzer(analyzer_options)
    else:
      self._pool = context.Pool(processes=self.workers, initializer=_start_worker,
                                initargs=(analyzer_options,))

  def prepare_iter(self, sources: Sequence[ImageSource],
                   names: Optional[Sequence[str]] = None) -> Iterator[PreparedImage]:
    """Records for `sources`, in order. With workers the work starts now, in the background,
    and the iterator yields as results arrive; without, each record is made as it is taken.

    Args:
      sources: image files and/or RGB uint8 arrays.
      names: one per source; default: a file's id as the commands give it
        (`jflame.sources.file_id`: name~hash of its path), "image~<position>" for an array.
    """
    if not self._open:
      raise ValueError("This Preprocessor is closed; create a new one.")
    sources = list(sources)
    if names is None:
      names = [f"image~{index}" if isinstance(source, np.ndarray) else file_id(source)
               for index, source in enumerate(sources)]
    if len(names) != len(sources):
      raise ValueError(f"Got {len(names)} names for {len(sources)} sources.")
    jobs = list(zip(sources, names))
    if self._device_landmarks is not None:
      decoded = (self._pool.imap(decode_for_device, jobs) if self._pool is not None
                 else map(decode_for_device, jobs))
      return self._landmarks_on_device(decoded)
    if self._pool is not None:
      return self._pool.imap(functools.partial(_prepare_in_worker, settings=self.settings), jobs)
    return (self.settings.prepare(job, self._analyzer) for job in jobs)

  def _landmarks_on_device(self, decoded: Iterator[DeviceImage]) -> Iterator[PreparedImage]:
    """The records of decoded images, their face meshes found on the device in one call."""
    images = list(decoded)
    readable = [image for image in images if image.pixels is not None]
    results = iter([])
    if readable:
      found, landmarks, boxes, scores = self._device_landmarks([i.pixels for i in readable])
      results = iter(zip(found, landmarks, boxes, scores))
    for image in images:
      if image.pixels is None:
        yield image.record
      else:
        yield prepared_from_device(image, *next(results), self.settings, self._device_crops)

  def prepare(self, sources: Sequence[ImageSource], names: Optional[Sequence[str]] = None,
              progress: Optional[Callable[[PreparedImage], None]] = None) -> List[PreparedImage]:
    """Records for `sources`, in order; `progress` is called with each as it completes."""
    records = []
    for record in self.prepare_iter(sources, names):
      records.append(record)
      if progress is not None:
        progress(record)
    return records

  def close(self, cancel: bool = False) -> None:
    """Closes the analyzer or lets the workers finish (or, with `cancel`, stops them)."""
    self._open = False
    if self._analyzer is not None:
      self._analyzer.close()
      self._analyzer = None
    if self._pool is not None:
      if cancel:
        self._pool.terminate()
      else:
        self._pool.close()
      self._pool.join()
      self._pool = None

  def __enter__(self) -> "Preprocessor":
    return self

  def __exit__(self, exc_type, *exc_info) -> None:
    self.close(cancel=exc_type is not None)


def prepare_images(sources: Sequence[ImageSource], crop_size: int = DEFAULT_CROP_SIZE, *,
                   workers: int = 1, analyzer_options: AnalyzerOptions = AnalyzerOptions(),
                   names: Optional[Sequence[str]] = None,
                   progress: Optional[Callable[[PreparedImage], None]] = None,
                   crop_scale: float = DEFAULT_CROP_SCALE, level_eyes: bool = True,
                   mask_with_foreground: bool = False,
                   landmarks_only: bool = False) -> List[PreparedImage]:
  """Preprocesses many photographs in one go, in input order: a `Preprocessor` used once.

  For a run in several chunks, keep one `Preprocessor` instead (no restart per chunk).

  Args:
    sources: image files and/or RGB uint8 arrays.
    crop_size: side of the square crops.
    workers: worker processes (capped at the number of sources); 1 runs in this process.
    analyzer_options: settings of the `FaceAnalyzer`(s).
    names: one per source; default: unique file stems ("image" for arrays).
    progress: called with each record as it completes, in input order.
    crop_scale, level_eyes, mask_with_foreground, landmarks_only: as in `prepare_image`.

  Returns:
    One `PreparedImage` per source, in the same order.

  Raises:
    ModelFileError: the analyzer could not be built (e.g. a missing `.task` file).
  """
  sources = list(sources)
  with Preprocessor(crop_size, workers=min(workers, max(len(sources), 1)),
                    analyzer_options=analyzer_options, crop_scale=crop_scale,
                    level_eyes=level_eyes, mask_with_foreground=mask_with_foreground,
                    landmarks_only=landmarks_only) as preprocessor:
    return preprocessor.prepare(sources, names, progress)


# Per-process state of a worker: set only in pool worker processes, by `_start_worker`. A pool
# initializer has nowhere else to leave what the tasks of that process share.
_worker_analyzer: Optional[FaceAnalyzer] = None
_worker_start_error: Optional[BaseException] = None


def _start_worker(analyzer_options: AnalyzerOptions) -> None:
  """Pool initializer: builds this worker's analyzer, closed when the worker exits.

  A failure is kept and re-raised by the first task (so it reaches the caller): raising here
  would make the pool restart the worker forever.
  """
  global _worker_analyzer, _worker_start_error
  try:
    _worker_analyzer = FaceAnalyzer(analyzer_options)
  except Exception as error:  # pylint: disable=broad-except
    _worker_start_error = error
    return
  multiprocessing.util.Finalize(_worker_analyzer, _worker_analyzer.close, exitpriority=10)


def _prepare_in_worker(job: Tuple[ImageSource, str], settings: _CropSettings) -> PreparedImage:
  if _worker_start_error is not None:
    raise _worker_start_error
  return settings.prepare(job, _worker_analyzer)
