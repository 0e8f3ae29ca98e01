"""Photograph -> `PreparedImage`: read, detect, landmark, align, mask (host side, never in jit).

For one image:
1. `read_image` (upright RGB uint8).
2. Detect every face (`FaceAnalyzer.detect_faces`); choose the largest box.
3. Cut a square analysis window around the chosen face (`ANALYSIS_WINDOW_SCALE` box sizes,
   `ANALYSIS_WINDOW_SIZE` pixels) and run the face mesh and the selfie segmentation on it. On the
   window a small face in a group photo is as large as a portrait, and the mesh whose box
   overlaps the detection box is taken, so the landmarks belong to the chosen face.
4. Map the landmarks back to the original, frame the face in a levelled square crop
   (`align.crop_from_landmarks`), warp image and segmentation into it, draw the face mask.

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
                                     square_window, warp_affine)
from jflame.preprocess.image_io import deduplicate_names, read_image
from jflame.preprocess.masks import face_region_mask
from jflame.preprocess.mediapipe_face import (MIN_LANDMARK_BOX_IOU, AnalyzerOptions, FaceAnalyzer,
                                              box_iou, check_landmarker_task_path,
                                              landmark_box)

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
                  level_eyes: bool = True, mask_with_foreground: bool = False) -> PreparedImage:
  """Preprocesses one photograph. Never raises for a problem of the image itself.

  Args:
    source: an image file, or an RGB uint8 (H, W, 3) (or greyscale (H, W)) array.
    analyzer: the process's `FaceAnalyzer`.
    crop_size: side S of the square crop in pixels.
    name: record name; defaults to the file stem ("image" for an array).
    crop_scale: crop side / longest side of the face mesh's box (see `align`).
    level_eyes: rotate the crop so the eyes are level.
    mask_with_foreground: multiply the face mask by the segmentation foreground.

  Returns:
    A `PreparedImage`; check `.ok`.
  """
  path = None if isinstance(source, np.ndarray) else Path(source)
  name = name if name is not None else ("image" if path is None else path.stem)
  failed = functools.partial(PreparedImage, name=name, source=path)
  try:
    image = read_image(path) if path is not None else _checked_array(source)
  except ImageReadError as error:
    return failed(status=STATUS_UNREADABLE, message=str(error))
  height, width = image.shape[:2]
  failed = functools.partial(failed, image_width=width, image_height=height)
  try:
    detections = analyzer.detect_faces(image)
    if not detections:
      return failed(status=STATUS_NO_FACE, message=(
          f"{_label(path, name)}: the MediaPipe face detectors found no face (confidence >= "
          f"{analyzer.options.min_detection_confidence}; the smallest faces it finds are about "
          "1/14 of the photo's longer side, 1/50 in photos over 2048 pixels)."))
    chosen = detections[0]
    failed = functools.partial(failed, num_faces=len(detections), detection_box=chosen.box,
                               detection_score=chosen.score)
    window_from_original = square_window(chosen.center, ANALYSIS_WINDOW_SCALE * chosen.size,
                                         ANALYSIS_WINDOW_SIZE)
    window = warp_affine(image, window_from_original, ANALYSIS_WINDOW_SIZE)
    mesh = _mesh_of_detected_face(analyzer.face_landmarks(window),
                                  _map_box(window_from_original, chosen.box))
    if mesh is None:
      return failed(status=STATUS_NO_FACE, message=(
          f"{_label(path, name)}: {len(detections)} face(s) detected, but the face mesh found no "
          f"landmarks on the largest one (box {np.round(chosen.box).astype(int).tolist()})."))
    foreground_window = analyzer.segment_foreground(window)
  except RuntimeError as error:
    return failed(status=STATUS_ANALYSIS_FAILED,
                  message=f"{_label(path, name)}: MediaPipe failed on this image: {error}")

  original_from_window = invert_affine(window_from_original)
  landmarks_original = apply_affine(original_from_window, mesh[:, :2])
  crop_from_original = crop_from_landmarks(landmarks_original, crop_size, crop_scale, level_eyes)
  landmarks = apply_affine(crop_from_original, landmarks_original)
  # Depth is scaled like x: window pixels -> original pixels -> crop pixels.
  landmarks_z = (mesh[:, 2] / affine_scale(window_from_original)
                 * affine_scale(crop_from_original))
  landmark_weights = (points_inside(landmarks, crop_size, crop_size)
                      & points_inside(landmarks_original, width, height))
  inside = inside_image_mask(crop_from_original, crop_size, width, height)
  foreground_mask = inside * warp_affine(
      foreground_window, compose_affine(crop_from_original, original_from_window), crop_size)
  face_mask = face_region_mask(landmarks, crop_size) * inside
  if mask_with_foreground:
    face_mask = face_mask * foreground_mask
  return PreparedImage(
      name=name, source=path, status=STATUS_OK, message="", image_width=width,
      image_height=height, num_faces=len(detections), detection_box=chosen.box,
      detection_score=chosen.score, crop_from_original=crop_from_original,
      crop=warp_affine(image, crop_from_original, crop_size),
      landmarks=landmarks.astype(np.float32), landmarks_original=landmarks_original,
      landmarks_z=landmarks_z.astype(np.float32),
      landmark_weights=landmark_weights.astype(np.float32),
      face_mask=face_mask.astype(np.float32), foreground_mask=foreground_mask.astype(np.float32))


def _label(path: Optional[Path], name: str) -> str:
  return str(path) if path is not None else name


def _checked_array(array: np.ndarray) -> np.ndarray:
  """An in-memory source as RGB uint8 (H, W, 3), or ImageReadError saying what is wrong."""
  if array.dtype != np.uint8:
    raise ImageReadError(f"In-memory image has dtype {array.dtype}; pass uint8 RGB.")
  if array.ndim == 2:
    array = np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) == 0:
    raise ImageReadError(f"In-memory image has shape {array.shape}; pass (H, W, 3) RGB.")
  return np.ascontiguousarray(array)


def _map_box(affine: np.ndarray, box: np.ndarray) -> np.ndarray:
  """An axis-aligned box through an axis-aligned (scale and shift) affine."""
  return apply_affine(affine, box.reshape(2, 2)).reshape(4)


def _mesh_of_detected_face(meshes: List[np.ndarray], box: np.ndarray) -> Optional[np.ndarray]:
  """The mesh whose landmark box overlaps the detection box most, if it overlaps enough."""
  overlaps = [box_iou(landmark_box(mesh), box) for mesh in meshes]
  if not overlaps or max(overlaps) < MIN_LANDMARK_BOX_IOU:
    return None
  return meshes[int(np.argmax(overlaps))]


@dataclasses.dataclass(frozen=True)
class _CropSettings:
  """The per-image keyword settings of `prepare_image`, bundled to send to workers."""
  crop_size: int
  crop_scale: float
  level_eyes: bool
  mask_with_foreground: bool

  def prepare(self, job: Tuple[ImageSource, str], analyzer: FaceAnalyzer) -> PreparedImage:
    source, name = job
    return prepare_image(source, analyzer, self.crop_size, name=name, crop_scale=self.crop_scale,
                         level_eyes=self.level_eyes,
                         mask_with_foreground=self.mask_with_foreground)


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

  Raises:
    ModelFileError: the analyzer could not be built: a missing `.task` file (from the
      constructor) or an invalid one (from the constructor, or with workers from the first
      result).
  """

  def __init__(self, crop_size: int = DEFAULT_CROP_SIZE, *, workers: int = 1,
               analyzer_options: AnalyzerOptions = AnalyzerOptions(),
               crop_scale: float = DEFAULT_CROP_SCALE, level_eyes: bool = True,
               mask_with_foreground: bool = False):
    self.settings = _CropSettings(crop_size, crop_scale, level_eyes, mask_with_foreground)
    self.workers = max(1, workers)
    self._analyzer = None
    self._pool = None
    check_landmarker_task_path(analyzer_options)   # fail here, not in every worker
    if self.workers == 1:
      self._analyzer = FaceAnalyzer(analyzer_options)
    else:
      self._pool = multiprocessing.get_context("spawn").Pool(
          processes=self.workers, initializer=_start_worker, initargs=(analyzer_options,))

  def prepare_iter(self, sources: Sequence[ImageSource],
                   names: Optional[Sequence[str]] = None) -> Iterator[PreparedImage]:
    """Records for `sources`, in order. With workers the work starts now, in the background,
    and the iterator yields as results arrive; without, each record is made as it is taken.

    Args:
      sources: image files and/or RGB uint8 arrays.
      names: one per source; default: unique file stems ("image" for arrays).
    """
    if self._analyzer is None and self._pool is None:
      raise ValueError("This Preprocessor is closed; create a new one.")
    sources = list(sources)
    if names is None:
      names = deduplicate_names(
          ["image" if isinstance(source, np.ndarray) else Path(source).stem
           for source in sources])
    if len(names) != len(sources):
      raise ValueError(f"Got {len(names)} names for {len(sources)} sources.")
    jobs = list(zip(sources, names))
    if self._pool is not None:
      return self._pool.imap(functools.partial(_prepare_in_worker, settings=self.settings), jobs)
    return (self.settings.prepare(job, self._analyzer) for job in jobs)

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
                   mask_with_foreground: bool = False) -> List[PreparedImage]:
  """Preprocesses many photographs in one go, in input order: a `Preprocessor` used once.

  For a run in several chunks, keep one `Preprocessor` instead (no restart per chunk).

  Args:
    sources: image files and/or RGB uint8 arrays.
    crop_size: side of the square crops.
    workers: worker processes (capped at the number of sources); 1 runs in this process.
    analyzer_options: settings of the `FaceAnalyzer`(s).
    names: one per source; default: unique file stems ("image" for arrays).
    progress: called with each record as it completes, in input order.
    crop_scale, level_eyes, mask_with_foreground: as in `prepare_image`.

  Returns:
    One `PreparedImage` per source, in the same order.

  Raises:
    ModelFileError: the analyzer could not be built (e.g. a missing `.task` file).
  """
  sources = list(sources)
  with Preprocessor(crop_size, workers=min(workers, max(len(sources), 1)),
                    analyzer_options=analyzer_options, crop_scale=crop_scale,
                    level_eyes=level_eyes, mask_with_foreground=mask_with_foreground
                    ) as preprocessor:
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
