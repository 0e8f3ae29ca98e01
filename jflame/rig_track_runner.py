"""`jflame-track --cameras FILE`: a calibrated rig's synchronised clips, one head per moment,
followed through time (host side).

    input: one folder holding a clip per camera: cam_<serial>.<video> (anything OpenCV reads) or
           cam_<serial>/ (a folder of ordered frames); frame t of every clip is moment t (the
           shortest clip sets the length)
      ──► MediaPipe's landmarks of every clip (tracking mode, `track_runner.read_landmarks`)
      ──► rig_track.clip_shape (one identity) and rig_track.track_rig (every moment's views
          with the single-view track's temporal model)
      ──► rig_track.npz (per moment: FLAME parameters, the head's pose in the camera file's
          world, every view's detected and fitted landmarks and errors),
          overlay_cam_<serial>.mp4 per view (unless overlays are off), manifest.json

Detection is the slow part (MediaPipe through every frame of every camera), so each camera's
landmarks are committed (atomically) to `.landmarks/cam_<serial>.npz` in the output folder as
soon as its clip is read, keyed by the clip (path, size and time, or a folder's listing) and the
settings that change them: a killed or interrupted run loses at most the camera in hand, and the
same command again reads the others back. Every other file is written whole or not at all. A
view whose landmark error over the clip stands out from the others' makes the run name it
(`multiview.disagreeing_views`: a wrong camera is the common failure).
"""

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jflame import atomic, camera_files, multiview, output, rig_track, track_output
from jflame.camera import project_calibrated
from jflame.config import FitConfig, TrackConfig
from jflame.errors import InputError
from jflame.flame import flame_forward
from jflame.manifest import write_json
from jflame.model_loading import (LoadedModel, fitted_landmark_indices, prepare_fit_model,
                                  run_provenance)
from jflame.preprocess.video import open_clip
from jflame.rotation import axis_angle_to_matrix
from jflame.track_runner import error_percentiles, read_landmarks

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
RESULT_FILE = "rig_track.npz"
COMPARISON_FILE = "compare_worst_moment.png"  # photometric mode
LANDMARKS_FOLDER = ".landmarks"  # in the output folder: one committed .npz per camera read


@dataclasses.dataclass(frozen=True)
class ClipLandmarks:
  """One camera's clip as MediaPipe tracked it."""
  fps: float
  landmarks: np.ndarray   # (T, 478, 2) frame pixels, zeros where no face
  found: np.ndarray       # (T,) bool
  read_back: bool         # from the store of an earlier run


def clip_key(clip: Path, max_frames: int, where: str) -> str:
  """What a camera's committed landmarks depend on (JSON): the clip's resolved path and size and
  time (a folder of frames: a digest of its files' names, sizes and times), the frames read and
  where MediaPipe ran."""
  clip = Path(clip).resolve()
  if clip.is_dir():
    files = sorted(path for path in clip.iterdir() if path.is_file())
    listing = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    facts = dict(path=str(clip), files=len(files),
                 listing=hashlib.blake2b(listing.encode(), digest_size=16).hexdigest())
  else:
    stat = clip.stat()
    facts = dict(path=str(clip), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
  return json.dumps(dict(facts, max_frames=max_frames, landmarks=where), sort_keys=True)


def clip_landmarks(serial: str, clip: Path, store: Path, max_frames: int = 0,
                   where: str = "mediapipe",
                   progress: Optional[Callable[[int], None]] = None) -> ClipLandmarks:
  """The camera's landmarks: read back from `store` when committed there for this clip and
  these settings, else tracked and committed."""
  target = store / f"cam_{serial}.npz"
  key = clip_key(clip, max_frames, where)
  if target.is_file():
    try:
      with np.load(target, allow_pickle=False) as data:
        if str(data["key"]) == key:
          return ClipLandmarks(float(data["fps"]), np.asarray(data["landmarks"]),
                               np.asarray(data["found"], bool), True)
    except (OSError, ValueError, KeyError):
      pass   # a damaged or older file: read the clip again
  info, landmarks, found = read_landmarks(clip, max_frames, progress=progress, where=where)
  store.mkdir(parents=True, exist_ok=True)
  output.save_parameters(target, dict(key=key, fps=info.fps, landmarks=landmarks, found=found))
  return ClipLandmarks(float(info.fps), landmarks, np.asarray(found, bool), False)


def camera_clips(folder) -> Dict[str, Path]:
  """serial -> the camera's clip in `folder`: cam_<serial>.<video> or cam_<serial>/ (frames)."""
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise InputError(f"--input {folder} is not a folder; with --cameras it is a folder holding "
                     "cam_<serial>.mp4 (or cam_<serial>/ frame folders) per camera.")
  clips: Dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    if not path.name.startswith("cam_"):
      continue
    if path.is_dir():
      serial = path.name[len("cam_"):]
    elif path.suffix.lower() in VIDEO_SUFFIXES:
      serial = path.stem[len("cam_"):]
    else:
      continue
    if serial in clips:
      raise InputError(f"{folder}: two clips of camera {serial}: {clips[serial].name}, "
                       f"{path.name}")
    clips[serial] = path
  if not clips:
    raise InputError(f"{folder} holds no cam_<serial>.<video> file or cam_<serial>/ folder of "
                     f"frames (videos: {', '.join(VIDEO_SUFFIXES)}).")
  return clips


def open_rig_clips(cameras_path, folder, default_fps: float = 25.0):
  """(serial -> clip, the rig's RigCameras in the file's order) of a rig's clips, checked before
  anything is read further: each camera of the file has one clip and each clip a camera, the
  clips' frame sizes are the cameras' (the file is read with them where it has none)."""
  clips = camera_clips(folder)
  sizes = {}
  for serial, path in clips.items():
    info, _ = open_clip(path, default_fps)
    sizes[serial] = (info.width, info.height)
  cameras = camera_files.load_cameras(cameras_path, image_sizes=sizes)
  missing = [serial for serial in cameras if serial not in clips]
  if missing:
    raise InputError(f"{folder}: no clip of camera(s) {', '.join(missing[:5])} of "
                     f"{cameras_path} (cam_<serial>.mp4 or cam_<serial>/)")
  unknown = [serial for serial in clips if serial not in cameras]
  if unknown:
    raise InputError(f"{folder}: clips of cameras {cameras_path} does not have: "
                     f"{', '.join(clips[serial].name for serial in unknown[:5])}")
  return clips, list(cameras.values())


@jax.jit
def _world_meshes(model, params, rotations, translations):
  """(T, N, 3) every moment's mesh in the world."""
  def one(moment_params, rotation, translation):
    return flame_forward(model, moment_params)[0] @ axis_angle_to_matrix(rotation).T + translation
  return jax.vmap(one)(params, rotations, translations)


@jax.jit
def _mesh_in_view(intrinsics, world_to_camera, distortion, meshes):
  """(T, N, 2) the moments' world meshes in one view's image: one view at a time, as a whole
  rig's at once is V times that (640 MB for 16 cameras over 1,000 moments)."""
  return jax.vmap(lambda mesh: project_calibrated(intrinsics, world_to_camera, distortion,
                                                  mesh))(meshes)


def clip_photos(clip: Path, landmarks, found, crop_size: int):
  """Photometric mode: one camera's face crops of its first T frames (the landmarks (T, 478, 2)
  found on them, `found` (T,)): (crops (T, S, S, 3) float32, skin masks (T, S, S), similarities
  (T, 2, 3)); a frame without a face, or past the clip's end, gets an empty mask."""
  from jflame.capture_runner import view_crop
  frames = len(found)
  crops = np.zeros((frames, crop_size, crop_size, 3), np.float32)
  masks = np.zeros((frames, crop_size, crop_size), np.float32)
  affines = np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1))
  _, pixels_of_frames = open_clip(clip)
  for t, pixels in zip(range(frames), pixels_of_frames):
    if found[t]:
      crops[t], masks[t], affines[t] = view_crop(pixels, landmarks[t], crop_size)
  return crops, masks, affines


def rig_photos(clips, serials, landmarks, found, crop_size: int) -> multiview.ViewPhotos:
  """Every moment's view crops (leading axes T, V) for the photometric stage."""
  per_camera = [clip_photos(clips[serial], landmarks[:, v], found[:, v], crop_size)
                for v, serial in enumerate(serials)]
  images, masks, affines = (np.stack(parts, axis=1) for parts in zip(*per_camera))
  return multiview.ViewPhotos(images=jnp.asarray(images), face_masks=jnp.asarray(masks),
                              crop_from_image=jnp.asarray(affines))


def _worst_photometric_moment(photometric_error, tracked) -> Optional[int]:
  """The tracked moment whose views' median colour error is the largest (None: no such moment)."""
  medians = np.array([np.nanmedian(row) if np.isfinite(row).any() and tracked[t] else -np.inf
                      for t, row in enumerate(photometric_error)])
  return int(np.argmax(medians)) if np.isfinite(medians).any() else None


def _moment_comparison(fit_model, batch, photos, result, moment: int, serials, config):
  """PNG bytes of moment `moment`'s (crop | render | overlay) per view, as `jflame-fit
  --cameras --mode photometric` draws each moment (`capture_runner.comparison_picture`)."""
  from jflame.capture_runner import comparison_picture
  take = lambda tree: jax.tree.map(lambda x: x[moment], tree)
  views, view_photos = take(batch), take(photos)
  renders = multiview.render_fitted(
      fit_model, views, view_photos, take(result.params), result.head_rotation[moment],
      result.head_translation[moment], result.appearance, result.view_gains[moment],
      config.fit.raster)
  return comparison_picture(jax.device_get(view_photos), jax.device_get(renders),
                            np.asarray(views.valid), serials)


def track_rig_clips(loaded: LoadedModel, config: TrackConfig, cameras_path, input_folder,
                    output_dir, max_frames: int = 0, overlays: bool = True,
                    landmarks_where: str = "mediapipe",
                    progress: Optional[Callable[[int], None]] = None, opened=None,
                    crop_size: int = 128) -> dict:
  """Tracks a rig's clips and writes the run's files; returns the manifest. `opened`: what
  `open_rig_clips(cameras_path, input_folder)` returned, when the caller has checked it
  already; `crop_size`: photometric mode's side of each view's face crop (its renders)."""
  started = datetime.datetime.now(datetime.timezone.utc)
  clips, rig = opened or open_rig_clips(cameras_path, input_folder)
  serials = [camera.serial for camera in rig]
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  read = {serial: clip_landmarks(serial, clips[serial], out / LANDMARKS_FOLDER, max_frames,
                                 landmarks_where, progress) for serial in serials}
  lengths = {serial: len(read[serial].found) for serial in serials}
  frames = min(lengths.values())
  landmarks = np.stack([read[serial].landmarks[:frames] for serial in serials], axis=1)
  found = np.stack([read[serial].found[:frames] for serial in serials], axis=1)      # (T, V)
  weights = np.repeat(found[..., None], landmarks.shape[2], axis=-1).astype(np.float32)
  views = [multiview.rig_views(rig, landmarks[t], weights[t], found[t], config.fit)
           for t in range(frames)]
  batch = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *views)
  fit_model = prepare_fit_model(loaded, config.fit)
  shape = rig_track.clip_shape(fit_model, batch, config)
  photo_landmarks = len(fitted_landmark_indices(loaded, FitConfig()))
  photos = (rig_photos(clips, serials, landmarks, found, crop_size) if config.fit.photometric
            else None)
  result = jax.device_get(rig_track.track_rig(fit_model, batch, config, shape, photo_landmarks,
                                              photos))
  shape = result.params.shape[0]   # photometric mode moves the clip's shape
  indices = np.asarray(fit_model.landmark_indices)
  detected = landmarks[:, :, indices]
  has_face = np.asarray(batch.valid)
  tracked = np.asarray(result.tracked, bool) & (not bool(result.failed))
  errors_px = np.where(has_face, np.asarray(result.landmark_error, np.float64), np.nan)
  face_sizes = np.array([[output.face_size(detected[t, v]) if has_face[t, v] else np.nan
                          for v in range(len(serials))] for t in range(frames)])
  relative = errors_px / face_sizes
  per_view = {serial: error_percentiles("landmark_error_relative",
                                        relative[tracked & has_face[:, v], v])
              for v, serial in enumerate(serials)}
  view_medians = [per_view[serial]["landmark_error_relative_median"] for serial in serials]
  flagged = multiview.disagreeing_views([np.nan if m is None else m for m in view_medians])
  reasons = [f"view {serials[v]} disagrees with the others (calibration?)" for v in flagged]
  params = result.params
  fps = read[serials[0]].fps
  arrays = dict(format_version=1, serials=np.array(serials), model=loaded.model.name,
                frame=np.arange(frames), time_s=np.arange(frames) / fps, tracked=tracked,
                **{key: np.asarray(value) for key, value in params.as_dict().items()},
                head_rotation=np.asarray(result.head_rotation),
                head_translation=np.asarray(result.head_translation),
                landmark_indices=indices, landmarks_detected=detected,
                landmarks_fitted=np.asarray(result.landmarks_2d), view_has_face=has_face,
                landmark_error_px=errors_px, landmark_error_relative=relative)
  arrays["shape"] = np.asarray(shape)
  if result.appearance is not None:
    photometric_error = np.where(has_face, np.asarray(result.photometric_error, np.float64),
                                 np.nan)
    arrays.update(texture=np.asarray(result.appearance.texture),
                  sh_lighting=np.asarray(result.appearance.lighting),
                  albedo_model=fit_model.albedo.name, view_colour_gain=np.asarray(
                      result.view_gains), photometric_error=photometric_error)
    for v, serial in enumerate(serials):
      errors = photometric_error[tracked & has_face[:, v], v]
      per_view[serial]["photometric_error_median"] = (float(np.median(errors)) if errors.size
                                                      else None)
  output.save_parameters(out / RESULT_FILE, arrays)
  files = [RESULT_FILE]
  worst = None
  if photos is not None:
    worst = _worst_photometric_moment(photometric_error, tracked)
    picture = None if worst is None else _moment_comparison(
        fit_model, batch, photos, result, worst, serials, config)
    if picture is not None:
      atomic.write_bytes(out / COMPARISON_FILE, picture)
      files.append(COMPARISON_FILE)
  del photos
  if overlays:
    meshes = _world_meshes(loaded.model, params, result.head_rotation, result.head_translation)
    for v, serial in enumerate(serials):
      name = f"overlay_cam_{serial}.mp4"
      _, clip_frames = open_clip(clips[serial])
      mesh_pixels = np.asarray(_mesh_in_view(batch.intrinsics[0, v], batch.world_to_camera[0, v],
                                             batch.distortion[0, v], meshes))
      track_output.write_overlay_video(
          out / name, clip_frames, fps, mesh_pixels, np.asarray(loaded.model.faces),
          detected[:, v], np.asarray(result.landmarks_2d)[:, v], has_face[:, v] & tracked)
      files.append(name)
  messages: List[str] = []
  rates = {serial: read[serial].fps for serial in serials}
  if max(rates.values()) > 1.01 * min(rates.values()):
    listed = ", ".join(f"{serial}: {rate:g}" for serial, rate in rates.items())
    messages.append(f"the clips' frame rates differ ({listed} / s): frame t of each is taken "
                    f"as the same moment, timed at {fps:g} / s")
  if len(set(lengths.values())) > 1:
    messages.append(f"the clips have {', '.join(f'{s}: {n}' for s, n in lengths.items())} "
                    f"frames; the first {frames} of each were tracked")
  manifest = dict(
      jflame_rig_track=1, started=started.isoformat(), cameras=str(cameras_path),
      input=str(input_folder), serials=serials, clips={s: str(clips[s]) for s in serials},
      frames=frames, fps=fps, frames_per_clip=lengths,
      landmarks_read_back=[serial for serial in serials if read[serial].read_back],
      counts=dict(tracked=int(tracked.sum()), not_tracked=int(frames - tracked.sum())),
      status="ok" if tracked.any() else "no_face", failed=bool(result.failed),
      shape=np.asarray(shape).tolist(), views=per_view, suspect=bool(reasons),
      suspect_reason="; ".join(reasons), messages=messages, files=files,
      **(dict(crop_size=crop_size, comparison_moment=worst) if config.fit.photometric else {}),
      **run_provenance(loaded, config))
  write_json(out / "manifest.json", manifest)
  return manifest
