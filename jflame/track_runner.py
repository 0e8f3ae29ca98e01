"""The clip job: a video (or a folder of frames) in, one identity and a smooth FLAME track out.

read + landmarks (host, MediaPipe tracking mode) -> one clip crop -> one compiled clip fit
(jflame.track) -> writers (Parquet table, overlay video, plot, manifest). A frame without a face
is marked, and its values come from the temporal priors between tracked frames, never invented
silently.
"""

import contextlib
import dataclasses
import datetime
import itertools
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import jax
import numpy as np

from jflame import output, quality, track_output
from jflame.camera import apply_affine, invert_affine
from jflame.errors import InputError
from jflame.manifest import write_json
from jflame.preprocess.video import VideoLandmarker, clip_crop, clip_observations, open_clip
from jflame.model_loading import LoadedModel, prepare_fit_model, run_provenance
from jflame.config import TrackConfig
from jflame.track import clip_focal_length, clip_meshes, fit_clip


# Below this many frames with a face a solved focal length gets a warning (one image leaves it
# +-12% or worse, docs/ACCURACY.md).
FEW_FOCAL_FRAMES = 8


@dataclasses.dataclass(frozen=True)
class TrackOptions:
  """Host-side settings of a clip job (the device-side ones are in TrackConfig)."""
  output_dir: Path
  crop_size: int = 256
  max_frames: int = 0            # 0: every frame
  write_overlay: bool = True
  write_plot: bool = True
  default_fps: float = 25.0      # for folders of frames
  solve_focal: bool = False      # one focal length solved from the clip (track.clip_focal_length)
  landmarks: str = "mediapipe"   # or "device": MediaPipe's tracking mode in JAX (landmark_nets)
  landmarks_note: str = ""       # why, when jflame chose


def focal_solved(focal_length: float, frames_used: int) -> bool:
  return bool(np.isfinite(focal_length) and focal_length > 0 and frames_used > 0)


def solved_focal_note(focal_length: float, frames_used: int) -> Optional[str]:
  """What the manifest (and the command) say about a clip's solved focal length, if anything."""
  if not focal_solved(focal_length, frames_used):
    return ("the focal length could not be solved from this clip; the fit assumed the default "
            "field of view")
  if frames_used < FEW_FOCAL_FRAMES:
    return (f"solved from {frames_used} frame(s) with a face: so few determine a focal length "
            "weakly; without --solve_focal the fit assumes the default field of view")
  return None


def error_percentiles(name: str, values: np.ndarray) -> dict:
  """{name_median, name_p90, name_max} of the tracked frames' errors (None without any): a track
  is judged by its worst frames, not its median."""
  values = np.asarray(values, np.float64)
  figures = dict(median=50, p90=90, max=100)
  return {f"{name}_{key}": float(np.percentile(values, q)) if values.size else None
          for key, q in figures.items()}


def frames_landmarks(frames: Iterable[np.ndarray], max_frames: int = 0,
                     progress: Optional[Callable[[int], None]] = None, where: str = "mediapipe"):
  """Landmarks of RGB frames in MediaPipe's tracking mode, run by MediaPipe or (`where` =
  "device") by its JAX port on the device (`landmark_nets.landmarker.DeviceTracker`).

  Returns:
    (landmarks (T, 478, 2) float32 frame pixels (zeros where none), found (T,) bool).
  """
  if max_frames:
    frames = itertools.islice(frames, max_frames)
  points, found = [], []
  with contextlib.ExitStack() as stack:
    if where == "device":
      from jflame.landmark_nets.landmarker import DeviceTracker
      from jflame.preprocess.pipeline import DEVICE_MAX_SIDE
      detections = DeviceTracker(DEVICE_MAX_SIDE).track(frames)
    else:
      landmarker = stack.enter_context(VideoLandmarker())
      detections = (landmarker.landmarks(frame) for frame in frames)
    for detected in detections:
      found.append(detected is not None)
      points.append(detected if detected is not None else np.zeros((478, 2), np.float32))
      if progress:
        progress(1)
  if not points:
    return np.zeros((0, 478, 2), np.float32), np.zeros(0, bool)
  return np.stack(points), np.asarray(found, bool)


def read_landmarks(source, max_frames: int = 0, default_fps: float = 25.0,
                   progress: Optional[Callable[[int], None]] = None, where: str = "mediapipe"):
  """Landmarks of every frame of a clip in tracking mode (`where`: as `frames_landmarks`).

  Returns:
    (VideoInfo, landmarks (T, 478, 2) float32 frame pixels (zeros where none), found (T,)).
  """
  info, frames = open_clip(source, default_fps)
  landmarks, found = frames_landmarks(frames, max_frames, progress, where)
  if not len(found):
    raise InputError(f"{source}: no frames could be read.")
  return info, landmarks, found


def _frames(source, count: int, default_fps: float):
  _, frames = open_clip(source, default_fps)
  for index, frame in enumerate(frames):
    if index >= count:
      return
    yield frame


def track_columns(result, times: np.ndarray, status: np.ndarray, frame_cameras,
                  detected: np.ndarray, fitted: np.ndarray, error_px: np.ndarray,
                  error_relative: np.ndarray, suspect: np.ndarray,
                  suspect_reason: np.ndarray) -> dict:
  """The columns of track.parquet (`track_output.TABLE_COLUMNS`), name -> (T, ...) array.

  Args:
    result: the host copy of `fit_clip`'s result; times, status: (T,); frame_cameras: T dicts
      of the frame camera (`output.camera_in_original_image`); detected (NaN without a face),
      fitted: (T, K, 2) frame pixels; error_px, error_relative, suspect, suspect_reason: (T,).
  """
  params, camera = result.params, result.camera
  columns = dict(
      frame=np.arange(len(times)), time_s=times, status=status.astype(str),
      **{name: value for name, value in params.as_dict().items() if name != "shape"},
      head_rotation_deg=track_output.head_rotation_degrees(np.asarray(camera.rotation)),
      **{f"camera_{key}": np.asarray(getattr(camera, key)) for key in output.CAMERA_FIELDS},
      **{f"frame_camera_{key}": np.stack([np.asarray(c[key], np.float64) for c in frame_cameras])
         for key in output.CAMERA_FIELDS},
      landmarks_detected=detected, landmarks_fitted=fitted, landmark_error_px=error_px,
      landmark_error_relative=error_relative, suspect=suspect,
      suspect_reason=suspect_reason.astype(str))
  if result.photometric_error is not None:
    columns["photometric_error"] = np.asarray(result.photometric_error)
  return columns


def track_video(loaded: LoadedModel, config: TrackConfig, options: TrackOptions, source,
                progress: Optional[Callable[[int], None]] = None) -> dict:
  """Tracks one clip and writes its files into `options.output_dir`; returns the manifest."""
  started = datetime.datetime.now(datetime.timezone.utc)
  out = Path(options.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  timings = {}
  clock = time.perf_counter()
  info, landmarks, found = read_landmarks(source, options.max_frames, options.default_fps,
                                          progress, options.landmarks)
  count = len(found)
  timings["landmarks_s"] = time.perf_counter() - clock
  manifest = dict(jflame_track=1, source=str(source), started=started.isoformat(),
                  frames=count, fps=info.fps, frame_size=[info.width, info.height],
                  **run_provenance(loaded, config),
                  options={k: str(v) for k, v in dataclasses.asdict(options).items()})
  if not found.any():
    manifest.update(status="no_face", message="MediaPipe found no face in any frame; nothing "
                    "was fitted.", counts={track_output.STATUS_NO_FACE: count}, timings=timings)
    write_json(out / "manifest.json", manifest)
    return manifest

  clock = time.perf_counter()
  crop_size = options.crop_size
  crop_from_frame = clip_crop(landmarks, found, crop_size)
  frames = (list(_frames(source, count, options.default_fps)) if config.fit.photometric
            else None)
  observations = clip_observations(landmarks, found, crop_from_frame, crop_size, frames)
  del frames
  fit_model = prepare_fit_model(loaded, config.fit)
  timings["prepare_s"] = time.perf_counter() - clock
  clock = time.perf_counter()
  focal_length = None
  if options.solve_focal:
    focal_length, focal_frames_used = clip_focal_length(fit_model, observations, config)
    focal_length = float(focal_length)
    note = solved_focal_note(focal_length, focal_frames_used)
    if note:
      manifest.update(focal_length_note=note)
    if not focal_solved(focal_length, focal_frames_used):
      # A solve that failed must not sink the fit: keep the assumed lens.
      focal_length, focal_frames_used = None, 0
    manifest.update(focal_length_solved_crop_px=focal_length,
                    focal_length_solved_from_frames=focal_frames_used)
    timings["focal_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
  result = jax.device_get(fit_clip(fit_model, observations, config, crop_size, focal_length))
  _, crop_pixels = jax.device_get(clip_meshes(loaded.model, result.params, result.camera))
  timings["fit_s"] = time.perf_counter() - clock   # includes compiling on a first clip

  clock = time.perf_counter()
  tracked = np.asarray(result.tracked)
  status = track_output.frame_statuses(tracked)
  indices = np.asarray(fit_model.landmark_indices)
  frame_from_crop = invert_affine(crop_from_frame)
  scale = float(np.sqrt(abs(np.linalg.det(crop_from_frame[:, :2]))))
  detected = landmarks[:, indices].astype(np.float64)
  fitted = apply_affine(frame_from_crop, np.asarray(result.landmarks_2d, np.float64))
  # Frame pixels like every other column here; the relative error (over the face size, as in
  # jflame-fit's and jflame-annotate's outputs) compares across resolutions and commands.
  error_px = np.where(tracked, np.asarray(result.landmark_error) / scale, np.nan)
  error_relative = error_px / np.asarray([output.face_size(points) for points in detected])
  params, camera = result.params, result.camera
  cameras = [output.camera_in_original_image(
      {key: np.asarray(getattr(camera, key))[t] for key in output.CAMERA_FIELDS},
      crop_from_frame) for t in range(count)]
  times = np.arange(count) / info.fps
  suspect, suspect_reason = quality.clip_frame_quality(
      error_relative, tracked, detected, np.asarray(camera.rotation))
  detected_or_nan = np.where(found[:, None, None], detected, np.nan)
  columns = track_columns(result, times, status, cameras, detected_or_nan, fitted, error_px,
                          error_relative, suspect, suspect_reason)
  shape = np.asarray(params.shape[0])
  metadata = dict(format_version=track_output.TABLE_FORMAT_VERSION, model=loaded.model.name,
                  mode=config.fit.mode.value, shape=shape.tolist(),
                  landmark_indices=indices.tolist(), crop_from_frame=crop_from_frame.tolist(),
                  crop_size=crop_size, fps=info.fps)
  schema = track_output.table_schema(np.shape(params.expression)[1], len(indices),
                                     result.photometric_error is not None)
  track_output.write_table(out / "track.parquet", columns, schema,
                           {key: json.dumps(value) for key, value in metadata.items()})
  files = ["track.parquet"]
  if options.write_plot:
    track_output.plot_track(out / "track.png", times, status, columns["head_rotation_deg"],
                            np.asarray(camera.translation), np.asarray(params.jaw_rotation),
                            np.asarray(params.expression),
                            columns["landmark_error_px"], suspect)
    files.append("track.png")
  timings["write_s"] = time.perf_counter() - clock
  if options.write_overlay:
    clock = time.perf_counter()
    mesh_pixels = apply_affine(frame_from_crop, crop_pixels.reshape(-1, 2).astype(np.float64))
    track_output.write_overlay_video(
        out / "overlay.mp4", _frames(source, count, options.default_fps), info.fps,
        mesh_pixels.reshape(crop_pixels.shape), np.asarray(loaded.model.faces), detected, fitted,
        found)
    files.append("overlay.mp4")
    timings["overlay_s"] = time.perf_counter() - clock
  counts = {name: int(np.sum(status == name)) for name in
            (track_output.STATUS_TRACKED, track_output.STATUS_INTERPOLATED,
             track_output.STATUS_NO_FACE)}
  manifest.update(
      status="failed" if bool(result.failed) else "ok",
      message=("the optimisation diverged (non-finite loss or gradient)" if bool(result.failed)
               else ""),
      finished=datetime.datetime.now(datetime.timezone.utc).isoformat(), counts=counts,
      shape=shape.tolist(), crop_from_frame=crop_from_frame, crop_size=crop_size,
      focal_length_frame_px=float(cameras[0]["focal_length"]),
      **error_percentiles("landmark_error_px", error_px[tracked]),
      **error_percentiles("landmark_error_relative", error_relative[tracked]),
      suspect_frames=int(np.sum(suspect)),
      files=files + ["manifest.json"], timings=timings)
  write_json(out / "manifest.json", manifest)
  return manifest
