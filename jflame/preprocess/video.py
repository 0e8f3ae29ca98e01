"""Video in (host side): frames from a video file or a folder, MediaPipe landmarks in its video
(tracking) mode, and one crop for the whole clip.

The face mesh in tracking mode runs its detector only when it has lost the face and otherwise
follows it from the previous frame: faster than detecting in every frame and steadier. A frame
where it finds no face is reported as such (`found` False), never filled in here.

The clip is fitted in ONE crop (a similarity of the frame, the same for every frame), so the
camera's focal length means the same in every frame: it is the same camera.
"""

import dataclasses
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np

from jflame.errors import ConfigError, ImageReadError, InputError
from jflame.observation import Observation
from jflame.preprocess.align import warp_affine
from jflame.preprocess.image_io import read_image
from jflame.sources import list_sources
from jflame.preprocess.masks import face_region_mask
from jflame.preprocess.mediapipe_face import NUM_LANDMARKS

# Crop side / longest side of the box around every frame's landmarks: the crop holds the face
# wherever it goes in the clip, with the margin of a photo's crop.
CLIP_CROP_SCALE = 1.3


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What a clip source says about itself."""
  path: Path
  fps: float
  num_frames: int      # as reported (a video container may be wrong; frames read are counted)
  width: int
  height: int


def open_clip(source: Union[str, Path], default_fps: float = 25.0) -> Tuple[VideoInfo,
                                                                             Iterator[np.ndarray]]:
  """A video file (OpenCV) or a folder of ordered frames (sorted by name).

  Returns:
    (info, iterator of RGB uint8 (H, W, 3) frames). Folders report `default_fps`.
  Raises:
    InputError: nothing there; ImageReadError: a video OpenCV cannot open.
  """
  path = Path(source)
  if path.is_dir():
    try:
      files = [source.path for source in list_sources([str(path)])]  # sorted by name
    except InputError:
      raise InputError(f"{path} holds no image files; pass a video file or a folder of "
                       "frames.") from None
    first = read_image(files[0])
    info = VideoInfo(path, default_fps, len(files), first.shape[1], first.shape[0])
    return info, (read_image(file) for file in files)
  if not path.is_file():
    raise InputError(f"{path} does not exist; pass a video file or a folder of frames.")
  capture = cv2.VideoCapture(str(path))
  if not capture.isOpened():
    raise ImageReadError(f"OpenCV cannot open {path} as a video (is it a video file?).")
  fps = capture.get(cv2.CAP_PROP_FPS) or default_fps
  info = VideoInfo(path, float(fps), int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
                   int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                   int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))

  def frames():
    try:
      while True:
        ok, bgr = capture.read()
        if not ok:
          return
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
      capture.release()
  return info, frames()


class VideoLandmarker:
  """MediaPipe's 478-point face mesh (irises included) in tracking mode, for ONE clip: frames
  must come in order. A context manager; create one per clip."""

  def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
    import mediapipe as mp
    self._mesh = mp.solutions.face_mesh.FaceMesh(
        static_image_mode=False, max_num_faces=1, refine_landmarks=True,
        min_detection_confidence=min_detection_confidence,
        min_tracking_confidence=min_tracking_confidence)

  def landmarks(self, frame: np.ndarray) -> Optional[np.ndarray]:
    """(478, 2) float32 landmarks of the face in an RGB uint8 frame, in frame pixels with pixel
    centres at +0.5 (`jflame.camera`, as `FaceAnalyzer` reports them), or None."""
    result = self._mesh.process(np.ascontiguousarray(frame))
    if not result.multi_face_landmarks:
      return None
    face = result.multi_face_landmarks[0].landmark
    normalized = np.array([(p.x, p.y) for p in face], np.float32)
    if normalized.shape[0] != NUM_LANDMARKS:
      return None
    height, width = frame.shape[:2]
    return normalized * np.array([width, height], np.float32) + 0.5

  def close(self) -> None:
    if self._mesh is not None:
      self._mesh.close()
      self._mesh = None

  def __enter__(self) -> "VideoLandmarker":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def clip_crop(landmarks: np.ndarray, found: np.ndarray, crop_size: int,
              scale: float = CLIP_CROP_SCALE) -> np.ndarray:
  """(2, 3) crop_from_frame: the square around every frame's landmarks (times `scale`), scaled
  to `crop_size` pixels, with no rotation.

  Args:
    landmarks: (T, 478, 2) frame pixels; found: (T,) frames with a face (at least one).
  """
  if not np.any(found):
    raise ConfigError("no frame of the clip has a face; nothing to crop")
  points = landmarks[np.asarray(found)].reshape(-1, 2)
  low, high = points.min(axis=0), points.max(axis=0)
  side = scale * float(np.max(high - low))
  centre = (low + high) / 2.0
  zoom = crop_size / side
  return np.array([[zoom, 0.0, crop_size / 2.0 - zoom * centre[0]],
                   [0.0, zoom, crop_size / 2.0 - zoom * centre[1]]])


def clip_observations(landmarks: np.ndarray, found: np.ndarray, crop_from_frame: np.ndarray,
                      crop_size: int, frames: Optional[List[np.ndarray]] = None) -> Observation:
  """The clip as an Observation with leading axis T (NumPy), landmarks in crop pixels.

  Without `frames` (landmark mode) there is no image or mask (None); with them (photometric
  mode) every frame is warped into the crop and gets its face mask.
  """
  crop_landmarks = (landmarks @ crop_from_frame[:, :2].T + crop_from_frame[:, 2]).astype(
      np.float32)
  crop_landmarks[~found] = 0.0
  inside = np.all((crop_landmarks >= 0) & (crop_landmarks <= crop_size), axis=-1)
  weights = (inside & found[:, None]).astype(np.float32)
  image = mask = None
  if frames is not None:
    image = np.stack([warp_affine(frame, crop_from_frame, crop_size) for frame in frames])
    image = image.astype(np.float32) / 255.0
    mask = np.stack([face_region_mask(points, crop_size) if ok else
                     np.zeros((crop_size, crop_size), np.float32)
                     for points, ok in zip(crop_landmarks, found)]).astype(np.float32)
  return Observation(landmarks=crop_landmarks, landmark_weights=weights, image=image,
                     face_mask=mask, valid=np.asarray(found, bool), size=crop_size)
