"""`jflame-fit --cameras FILE`: a calibrated capture, one head per moment (host side).

    input: one folder per moment (timestep) holding cam_<serial>.<ext> per camera, or one such
           folder (a single moment)
      ──► MediaPipe landmarks of every view (jflame's Preprocessor, full-image coordinates)
      ──► multiview.fit_moments: every moment with its own shape, then (several moments) again
          with the run's shape (the median over the moments fitted) held
      ──► per moment: <moment>.npz, <moment>.obj (world coordinates, metres),
          <moment>_views.png (every view with the fitted mesh and the detected and fitted
          landmarks), overlays/<moment>/cam_<serial>.png (each view alone, full size up to
          MAX_PICTURE_SIDE; unless overlays are turned off); manifest.json for the run

Detection is the slow part (a MediaPipe pass per view) and the fit needs every moment at once
(the run's shape is their median), so each moment's landmarks are committed as they are read, to
`.landmarks/<moment>.npz` in the output folder, keyed by its images (path, size, mtime): a run
killed or interrupted anywhere loses at most the moment being read, and the rerun reads the
landmarks of unchanged moments back instead of detecting them again, then fits and writes every
moment (each file written atomically).

In photometric mode (`FitConfig.mode`) each view's face crop and skin mask are made from its
image and the landmarks found on it (`view_photos`, one moment at a time: no detection again),
and the moments are fitted one at a time (a moment's renders are V images).

A view whose landmark error stands out from the others' (`multiview.disagreeing_views`) makes
its moment `suspect` with "view <serial> disagrees with the others (calibration?)"; with three
views or fewer the disagreement is reported without a camera (it cannot be told which). A moment
where only one view had a face is `suspect` too: one view cannot tell size from distance.
"""

import dataclasses
import datetime
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from jflame import camera_files, multiview, output
from jflame.atomic import TEMP_MARKER, atomic_path, write_bytes
from jflame.config import FitConfig
from jflame.errors import ImageReadError, InputError
from jflame.flame import flame_forward
from jflame.manifest import write_json
from jflame.model_loading import LoadedModel, prepare_fit_model, run_provenance
from jflame.camera import apply_affine
from jflame.pictures import MAX_PICTURE_SIDE, fit_within
from jflame.preprocess import Preprocessor
from jflame.rotation import axis_angle_to_matrix

STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"   # fewer than one view with a face
LANDMARKS_FOLDER = ".landmarks"  # in the output folder: one committed .npz per moment read
OVERLAYS_FOLDER = "overlays"      # in the output folder: <moment>/cam_<serial>.png


def capture_moments(folder) -> List[Path]:
  """The moment folders of a capture: `folder` itself when it holds cam_* images, else its
  subfolders that do, sorted by name."""
  folder = Path(folder)
  if not folder.is_dir():
    raise InputError(f"--input for --cameras must be a folder (of moments, or of one moment's "
                     f"cam_<serial> images), got {folder}")

  def has_views(path: Path) -> bool:
    return any(child.name.startswith("cam_") and child.suffix.lower()
               in camera_files.IMAGE_SUFFIXES for child in path.iterdir())

  if has_views(folder):
    return [folder]
  moments = sorted(child for child in folder.iterdir() if child.is_dir() and has_views(child))
  if not moments:
    raise InputError(f"{folder} holds no cam_<serial>.<ext> images, directly or in moment "
                     f"subfolders (NeRSemble's layout: <moment>/cam_<serial>.png)")
  return moments


@dataclasses.dataclass
class Moment:
  name: str
  images: Dict[str, Path]
  landmarks: np.ndarray           # (V, 478, 2) image pixels (NaN-free; weight 0 when missing)
  weights: np.ndarray             # (V, 478)
  valid: np.ndarray               # (V,)
  messages: List[str]


def read_moment(folder: Path, rig, preprocessor) -> Moment:
  """One moment's images and MediaPipe landmarks (full-image pixels), view by view."""
  serials = [camera.serial for camera in rig]
  images = camera_files.moment_images(folder, serials)
  records = preprocessor.prepare([images[s] for s in serials], [f"cam_{s}" for s in serials])
  for camera, record in zip(rig, records):
    size = (record.image_width, record.image_height)
    if record.image_width and size != tuple(camera.image_size):
      raise InputError(f"{images[camera.serial]} is {size[0]} x {size[1]} but camera "
                       f"{camera.serial} is calibrated for {camera.image_size[0]} x "
                       f"{camera.image_size[1]} (all moments must share the cameras' sizes)")
  landmarks = np.zeros((len(serials), 478, 2), np.float32)
  weights = np.zeros((len(serials), 478), np.float32)
  valid = np.zeros(len(serials), bool)
  messages = []
  for view, (serial, record) in enumerate(zip(serials, records)):
    if record.ok:
      landmarks[view] = record.landmarks_original
      weights[view] = record.landmark_weights
      valid[view] = True
    else:
      messages.append(f"view {serial}: {record.status}: {record.message}")
  return Moment(folder.name, images, landmarks, weights, valid, messages)


def view_photos(moment: Moment, rig, crop_size: int) -> multiview.ViewPhotos:
  """Each view's face crop (framed as a photo's crop is, from the landmarks found on it), its
  skin mask and the crop's transform, for the photometric stage. A view without a face, or whose
  image can no longer be read, gets an empty mask (its render is compared on nothing)."""
  from jflame.preprocess.image_io import read_image
  count = len(rig)
  images = np.zeros((count, crop_size, crop_size, 3), np.float32)
  masks = np.zeros((count, crop_size, crop_size), np.float32)
  affines = np.tile(np.eye(2, 3, dtype=np.float32), (count, 1, 1))
  for view, camera in enumerate(rig):
    if not moment.valid[view]:
      continue
    try:
      pixels = read_image(moment.images[camera.serial])
    except ImageReadError as error:
      said = f"view {camera.serial}: not compared photometrically: {error}"
      if said not in moment.messages:   # the run's passes read the moment again
        moment.messages.append(said)
      continue
    images[view], masks[view], affines[view] = view_crop(pixels, moment.landmarks[view],
                                                         crop_size)
  return multiview.ViewPhotos(images=images, face_masks=masks, crop_from_image=affines)


def view_crop(pixels, landmarks, crop_size: int):
  """One view's face crop for the photometric stage, framed as a photo's crop is from the
  landmarks (478, 2) found on the image `pixels` (H, W, 3 uint8 RGB): (crop (S, S, 3) float32 in
  [0, 1], its skin mask (S, S) without the eyebrows and inside the image, the crop's similarity
  (2, 3) from image pixels)."""
  from jflame.preprocess.align import crop_from_landmarks, inside_image_mask, warp_affine
  from jflame.preprocess.masks import face_region_mask
  affine = crop_from_landmarks(landmarks, crop_size)
  image = warp_affine(pixels, affine, crop_size).astype(np.float32) / 255.0
  mask = face_region_mask(apply_affine(affine, landmarks), crop_size, without_brows=True) * (
      inside_image_mask(affine, crop_size, pixels.shape[1], pixels.shape[0]))
  return image, mask.astype(np.float32), np.asarray(affine, np.float32)


def comparison_picture(photos: multiview.ViewPhotos, renders, valid, serials) -> Optional[bytes]:
  """Photometric mode's picture of a moment as PNG bytes (held until the moment's files are
  written): (crop | render | overlay) per view with a face (as a photo's `_compare.png`), in view
  order down each column, no larger than MAX_PICTURE_SIDE; None without a view with a face."""
  rows = []
  for view in np.flatnonzero(valid):
    row = np.ascontiguousarray(output.side_by_side(
        np.clip(photos.images[view] * 255, 0, 255).astype(np.uint8), renders.image[view],
        renders.alpha[view]))
    cv2.putText(row, serials[view], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    rows.append(row)
  if not rows:
    return None
  # Up to 4 views one above the other; a larger rig in columns of as many (16 views: 4 x 4), so
  # that a view keeps a readable size within MAX_PICTURE_SIDE.
  per_column = min(len(rows), max(4, int(np.ceil(np.sqrt(len(rows))))))
  rows += [np.zeros_like(rows[0])] * (-len(rows) % per_column)
  columns = [np.concatenate(rows[start:start + per_column], axis=0)
             for start in range(0, len(rows), per_column)]
  return output.png_bytes(fit_within(np.concatenate(columns, axis=1))[0])


def moment_key(images: Dict[str, Path]) -> str:
  """What a moment's committed landmarks were read from: each view's serial, resolved path,
  size and modification time (a changed or replaced image makes another key)."""
  views = []
  for serial, path in images.items():
    stat = path.stat()
    views.append([serial, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
  return json.dumps(views)


def _rig_sizes(rig) -> np.ndarray:
  return np.array([camera.image_size for camera in rig], np.int64)


def commit_moment(store: Path, moment: Moment, rig) -> None:
  """Writes a moment's landmarks to `store`/<moment>.npz atomically, keyed by its images (and
  the camera image sizes they were checked against)."""
  with atomic_path(store / f"{moment.name}.npz") as tmp:
    np.savez(tmp, key=np.array(moment_key(moment.images)), sizes=_rig_sizes(rig),
             landmarks=moment.landmarks, weights=moment.weights, valid=moment.valid,
             messages=np.array(moment.messages, dtype=str))


def committed_moment_count(store: Path) -> int:
  """How many moments' landmarks `store` holds (a write in progress is not one of them)."""
  if not store.is_dir():
    return 0
  return sum(1 for path in store.glob("*.npz") if TEMP_MARKER not in path.name)


def committed_moment(store: Path, folder: Path, rig) -> Optional[Moment]:
  """The moment's landmarks committed by an earlier run from the same images, else None (none
  committed, images or camera sizes changed, or a file that cannot be read: the moment is read
  again)."""
  path = store / f"{folder.name}.npz"
  if not path.is_file():
    return None
  images = camera_files.moment_images(folder, [camera.serial for camera in rig])
  try:
    with np.load(path, allow_pickle=False) as stored:
      if (str(stored["key"]) != moment_key(images)
          or not np.array_equal(stored["sizes"], _rig_sizes(rig))):
        return None
      return Moment(folder.name, images, stored["landmarks"], stored["weights"],
                    stored["valid"], [str(m) for m in stored["messages"]])
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None


def read_moments(folders, rig, preprocessor, store: Path, progress=None):
  """(moments, how many were read back from `store`): each moment's landmarks from an earlier
  run's commit when its images are unchanged, else detected and committed at once."""
  moments, reused = [], 0
  for folder in folders:
    moment = committed_moment(store, folder, rig)
    if moment is None:
      moment = read_moment(folder, rig, preprocessor)
      commit_moment(store, moment, rig)
    else:
      reused += 1
    moments.append(moment)
    if progress:
      progress(1)
  return moments, reused


def _view_pictures(moment: Moment, rig, mesh_pixels, faces, fitted, indices):
  """Each view's image with the fitted mesh (wireframe) and, where the view had a face, the
  detected (green) and fitted (red) landmarks (`output.draw_overlay`), downscaled to at most
  MAX_PICTURE_SIDE: a list of RGB images, one per view. A view whose image cannot be read
  (its landmarks were refused with a message) is drawn on a dark canvas of the camera's size."""
  pictures = []
  for view, camera in enumerate(rig):
    image = cv2.imread(str(moment.images[camera.serial]), cv2.IMREAD_COLOR)
    if image is None:
      width, height = (int(side) for side in camera.image_size)
      image = np.full((height, width, 3), 40, np.uint8)
      cv2.putText(image, "image unreadable", (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX,
                  max(0.5, width / 800), (255, 255, 255), max(1, width // 400))
    image, to_picture = fit_within(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    keep = (moment.weights[view, indices] > 0) if moment.valid[view] else np.zeros(
        len(indices), bool)
    pictures.append(output.draw_overlay(
        image, apply_affine(to_picture, np.asarray(mesh_pixels[view], np.float64)), faces,
        apply_affine(to_picture, np.asarray(moment.landmarks[view, indices], np.float64)),
        apply_affine(to_picture, np.asarray(fitted[view], np.float64)), keep))
  return pictures


def _contact_sheet(pictures, serials) -> np.ndarray:
  """Every view's picture side by side (each scaled to a common height), its serial written in
  its corner, capped at MAX_PICTURE_SIDE (RGB)."""
  tiles = []
  height = min(512, MAX_PICTURE_SIDE // max(len(serials), 1) * 4 // 3)
  for picture, serial in zip(pictures, serials):
    scale = height / picture.shape[0]
    tile = cv2.resize(picture, (max(1, round(picture.shape[1] * scale)), height),
                      interpolation=cv2.INTER_AREA)
    cv2.putText(tile, serial, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    tiles.append(tile)
  return fit_within(np.concatenate(tiles, axis=1))[0]


def open_capture(cameras_path, input_folder):
  """(moment folders, serial -> RigCamera) of a capture, checked before anything is written:
  the camera file read with the image sizes of the first moment's images (NeRSemble's file has
  none)."""
  moments_folders = capture_moments(input_folder)
  first = moments_folders[0]
  sizes = {path.stem[len("cam_"):]: camera_files.image_size_of(path)
           for path in sorted(first.iterdir())
           if path.name.startswith("cam_") and path.suffix.lower() in camera_files.IMAGE_SUFFIXES}
  return moments_folders, camera_files.load_cameras(cameras_path, image_sizes=sizes)


def fit_capture(loaded: LoadedModel, config: FitConfig, cameras_path, input_folder,
                output_dir, crop_size: int = 256, progress=None, opened=None,
                overlays: bool = True, albedo=None, fit_progress=None) -> dict:
  """Fits every moment of a capture and writes its files; returns the manifest. `opened`: what
  `open_capture(cameras_path, input_folder)` returned, when the caller has checked it already;
  `overlays`: write each view's picture (overlays/<moment>/cam_<serial>.png); `crop_size`: the
  side of each view's face crop (the landmarks' scale, and the photometric stage's renders);
  `albedo`: photometric mode's albedo model (None: the built-in basis); `progress(1)` after
  each moment read, and in photometric mode, whose fits take seconds a moment,
  `fit_progress(stage, done, total)` as a pass starts and after each moment fitted."""
  started = datetime.datetime.now(datetime.timezone.utc)
  moments_folders, cameras = opened or open_capture(cameras_path, input_folder)
  serials = list(cameras)
  rig = [cameras[s] for s in serials]
  out = Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  with Preprocessor(crop_size, workers=1, landmarks_only=True) as preprocessor:
    moments, reused = read_moments(moments_folders, rig, preprocessor, out / LANDMARKS_FOLDER,
                                   progress)
  facts = dict(cameras=str(cameras_path), cameras_file=_file_facts(cameras_path),
               input=str(input_folder), serials=serials, overlays=overlays, crop_size=crop_size,
               **run_provenance(loaded, config))
  if reused == len(moments):
    finished = finished_run(out, facts, [m.name for m in moments])
    if finished is not None:
      return dict(finished, unchanged=True)
  fit_model = prepare_fit_model(loaded, config, albedo)
  views = [multiview.rig_views(rig, m.landmarks, m.weights, m.valid, config) for m in moments]
  batch = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *views)
  views_with_face = np.array([np.sum(v.valid) for v in views])
  fittable = views_with_face >= 1

  comparisons = []   # photometric mode: each moment's (crop | render | overlay), PNG bytes

  def fitted(shape):
    if shape is not None:
      shape = jnp.asarray(shape, jnp.float32)
    if not config.photometric:
      return jax.device_get(multiview.fit_moments(fit_model, batch, config, shape))
    results = []
    comparisons.clear()
    stage = "own shapes" if shape is None else "the run's shape"
    if fit_progress:
      fit_progress(stage, 0, len(moments))
    for index, moment in enumerate(moments):   # V renders a moment: one at a time
      photos = view_photos(moment, rig, crop_size)
      one = jax.tree.map(lambda x: x[index:index + 1], batch)
      fitted_one = multiview.fit_moments(fit_model, one, config, shape,
                                         jax.tree.map(lambda x: jnp.asarray(x)[None], photos))
      results.append(jax.device_get(fitted_one))
      renders = multiview.render_moment(fit_model, views[index], photos,
                                        jax.tree.map(lambda x: x[0], fitted_one), config.raster)
      comparisons.append(comparison_picture(photos, jax.device_get(renders), moment.valid, serials))
      if fit_progress:
        fit_progress(stage, index + 1, len(moments))
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *results)

  result = fitted(None)
  ok = fittable & ~np.asarray(result.failed)
  # One identity for the run: the median of the moments' own (those seen by two views or more
  # when there are such: one view guesses the size), then every moment again with it.
  trusted = ok & (views_with_face >= 2) if np.any(ok & (views_with_face >= 2)) else ok
  shape = None
  if ok.sum() >= 2:
    shape = np.median(np.asarray(result.params.shape)[trusted], axis=0)
    result = fitted(shape)
    ok = fittable & ~np.asarray(result.failed)
  indices = np.asarray(fit_model.landmark_indices)
  entries = []
  for index, moment in enumerate(moments):
    entries.append(_write_moment(out, moment, views[index], rig,
                                 jax.tree.map(lambda x: x[index], result), bool(fittable[index]),
                                 bool(ok[index]), indices, loaded, overlays,
                                 fit_model.albedo.name if config.photometric else "",
                                 comparisons[index] if comparisons else None))
  manifest = dict(jflame_capture=1, started=started.isoformat(), moments=entries,
                  landmarks_read_back=reused,
                  shared_shape=None if shape is None else shape.tolist(), **facts)
  write_json(out / "manifest.json", manifest)
  return manifest


def _finite_list(values) -> list:
  """Per-view numbers for JSON: None where a view has none."""
  return [float(value) if np.isfinite(value) else None for value in values]


def _file_facts(path) -> dict:
  stat = Path(path).stat()
  return dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)


# What must match for a rerun to keep a finished run: the run's inputs and settings, not the
# machine it ran on (device, Python and JAX versions are recorded, not compared).
_SAME_RUN_KEYS = ("cameras", "cameras_file", "input", "serials", "overlays", "crop_size",
                  "model", "model_variant", "embedding", "config")


def finished_run(out: Path, facts: dict, moment_names) -> Optional[dict]:
  """The manifest of a finished run in `out` that this one would only repeat (the same
  inputs, camera file, model and settings; every moment's landmarks read back unchanged, the
  caller checks that; every file it lists still there), else None."""
  try:
    manifest = json.loads((out / "manifest.json").read_text())
  except (OSError, ValueError):
    return None
  normal = json.loads(json.dumps({key: facts.get(key) for key in _SAME_RUN_KEYS}))
  if not isinstance(manifest, dict) or any(manifest.get(key) != value
                                           for key, value in normal.items()):
    return None
  entries = manifest.get("moments") or []
  if [entry.get("moment") for entry in entries] != list(moment_names):
    return None
  if not all((out / name).is_file() for entry in entries for name in entry.get("files", [])):
    return None
  return manifest


@jax.jit
def _mesh_in_views(views: multiview.RigViews, vertices_world):
  """(V, N, 2) the world mesh in every view's image (one compiled program per rig)."""
  return multiview.project_views(views, vertices_world)


@jax.jit
def _world_vertices(model, params, rotation, translation):
  """(V, 3) the fitted mesh moved into the world (one compiled program for every moment)."""
  return flame_forward(model, params)[0] @ axis_angle_to_matrix(rotation).T + translation


def _write_moment(out: Path, moment: Moment, views: multiview.RigViews, rig, result,
                  fittable: bool, ok: bool, indices, loaded: LoadedModel, overlays: bool,
                  albedo_name: str = "", comparison: Optional[bytes] = None) -> dict:
  serials = [camera.serial for camera in rig]
  entry = dict(moment=moment.name, views=len(serials), views_with_face=int(moment.valid.sum()),
               messages=moment.messages)
  if not fittable:
    entry.update(status=STATUS_NO_FACE, suspect=True,
                 suspect_reason="no view had a face", files=[])
    return entry
  if not ok:
    entry.update(status="fit_failed", suspect=True, suspect_reason="the fit diverged", files=[])
    return entry
  detected = moment.landmarks[:, indices]
  face_sizes = np.array([output.face_size(d[moment.weights[v, indices] > 0])
                         if moment.valid[v] else np.nan for v, d in enumerate(detected)])
  errors_px = np.where(moment.valid, np.asarray(result.landmark_error), np.nan)
  relative = errors_px / face_sizes
  flagged = multiview.disagreeing_views(relative)
  reasons = []
  if moment.valid.sum() < 2:
    reasons.append(f"a face in {int(moment.valid.sum())} view of {len(serials)}: its size and "
                   f"distance are a single view's guess")
  if flagged and len(serials) >= 4:
    reasons += [f"view {serials[v]} disagrees with the others (calibration?)" for v in flagged]
  elif flagged:
    reasons.append("the views disagree (calibration?); with this few cameras the wrong one "
                   "cannot be told")
  rotation = np.asarray(result.head_rotation, np.float64)
  translation = np.asarray(result.head_translation, np.float64)
  params = result.params
  arrays = dict(format_version=1, status=STATUS_OK, moment=moment.name, serials=np.array(serials),
                model=loaded.model.name, **{k: np.asarray(v) for k, v in params.as_dict().items()},
                head_rotation=rotation, head_translation=translation,
                landmark_indices=indices, landmarks_detected=detected,
                landmarks_fitted=np.asarray(result.landmarks_2d),
                view_has_face=moment.valid, landmark_error_px=errors_px,
                landmark_error_relative=relative, suspect=bool(reasons),
                suspect_reason="; ".join(reasons))
  photometric_error = None
  if result.appearance is not None:
    photometric_error = np.where(moment.valid, np.asarray(result.photometric_error), np.nan)
    arrays.update(texture=np.asarray(result.appearance.texture),
                  sh_lighting=np.asarray(result.appearance.lighting),
                  albedo_model=albedo_name, photometric_error=photometric_error,
                  view_colour_gain=np.asarray(result.view_gains))
  name = moment.name
  output.save_parameters(out / f"{name}.npz", arrays)
  world = np.asarray(_world_vertices(loaded.model, params, jnp.asarray(rotation, jnp.float32),
                                     jnp.asarray(translation, jnp.float32)), np.float64)
  output.save_mesh(out / f"{name}.obj", world, loaded.model.faces,
                   header=f"{loaded.model.name}, world coordinates of the camera file, metres")
  fitted = np.asarray(result.landmarks_2d)
  mesh_pixels = np.asarray(_mesh_in_views(views, jnp.asarray(world, jnp.float32)))
  pictures = _view_pictures(moment, rig, mesh_pixels, np.asarray(loaded.model.faces), fitted,
                            indices)
  files = [f"{name}.npz", f"{name}.obj", f"{name}_views.png"]
  output.save_png(out / files[-1], _contact_sheet(pictures, serials))
  if comparison is not None:
    files.append(f"{name}_compare.png")
    write_bytes(out / files[-1], comparison)
  if overlays:
    (out / OVERLAYS_FOLDER / name).mkdir(parents=True, exist_ok=True)
    for serial, picture in zip(serials, pictures):
      files.append(f"{OVERLAYS_FOLDER}/{name}/cam_{serial}.png")
      output.save_png(out / files[-1], picture)
  entry.update(status=STATUS_OK, suspect=bool(reasons), suspect_reason="; ".join(reasons),
               landmark_error_relative=_finite_list(relative), files=files)
  if photometric_error is not None:
    entry["photometric_error"] = _finite_list(photometric_error)
  return entry
