"""The GaussianAvatars / VHAP dataset of a calibrated capture (a `jflame-fit --cameras` folder,
or a rig track, `jflame-track --cameras`, whose frames come from its clips): every moment a
timestep, every camera of the rig a camera of the dataset, in the camera file's
world. The head's pose is already in that world (p_world = R_h p + t_h), so rotation = R_h G and
translation = R_h J0 + t_h - J0 as for a clip (`gaussian_avatars.head_pose_in_fixed_camera`).
Each view is resampled once (`cv2.remap`) into the reader's camera: lens distortion removed,
square pixels, the principal point at the canvas centre."""

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from jflame import camera_files
from jflame.errors import InputError
from jflame.exports import common, gaussian_avatars as ga
from jflame.flame import PARAMETER_NAMES, FlameModel, FlameParams
from jflame.preprocess.mediapipe_face import PersonSegmenter
from jflame.preprocess.video import open_clip


def read_capture(folder) -> dict:
  """A jflame-fit --cameras folder's manifest; InputError when the folder is not one."""
  if common.folder_kind(folder) != common.CAPTURE_FOLDER:
    raise common.wrong_folder(folder, "gaussian_avatars", "a jflame-track folder or a "
                              "jflame-fit --cameras folder")
  return json.loads((Path(folder) / "manifest.json").read_text())


def _moment_folder(manifest: dict, moment: str) -> Path:
  root = Path(manifest["input"])
  return root if root.name == moment and not (root / moment).is_dir() else root / moment


def _write_view(load: Callable[[], np.ndarray], image_target: Path, mask_target: Path, map_x,
                map_y, segmenter: PersonSegmenter) -> None:
  """One view's image (`load()`: RGB) and foreground mask resampled into the reader's camera
  (`map_x`, `map_y`), each kept when a killed export already wrote it (the image not even
  read then)."""
  if image_target.is_file() and mask_target.is_file():
    return
  rgb = load()
  resample = lambda values: cv2.remap(values, map_x, map_y, cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT)
  if not image_target.is_file():
    common.write_image(image_target, resample(rgb))
  if not mask_target.is_file():
    alpha = np.round(segmenter.foreground(rgb) * 255.0).astype(np.uint8)
    common.write_gray(mask_target, resample(alpha))


def _read_rgb(path: Path) -> np.ndarray:
  image = cv2.imread(str(path), cv2.IMREAD_COLOR)
  if image is None:
    raise InputError(f"cannot read {path}.")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _moments_arrays(folder: Path, moments: List[str], model: FlameModel) -> Dict[str, np.ndarray]:
  """The moments' parameters and head poses stacked (leading axis: the moments)."""
  arrays = []
  for moment in moments:
    with np.load(folder / f"{moment}.npz", allow_pickle=False) as data:
      _check_model(str(data["model"]), model, moment)
      arrays.append({key: np.asarray(data[key]) for key in
                     (*PARAMETER_NAMES, "head_rotation", "head_translation")})
  return {key: np.stack([a[key] for a in arrays]) for key in arrays[0]}


def _check_model(fitted_with: str, model: FlameModel, what: str) -> None:
  if fitted_with != model.name:
    raise InputError(f"{what} was fitted with the model {fitted_with!r}, but the export loaded "
                     f"{model.name!r}: pass the same --flame_model (and --seed) as the fit.")


def export_capture_dataset(folder, model: FlameModel, output: Path, test_fraction: float,
                           keep_suspect: bool,
                           progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`gaussian_avatars` from a capture folder. Returns the warnings."""
  folder = Path(folder)
  manifest = read_capture(folder)
  notes: List[str] = []
  moments = []
  for entry in manifest["moments"]:
    if entry.get("status") != "ok":
      notes.append(f"moment {entry['moment']}: {entry.get('status')}, left out.")
    elif entry.get("suspect") and not keep_suspect:
      notes.append(f"moment {entry['moment']}: suspect ({entry.get('suspect_reason')}), left "
                   "out (--keep_suspect keeps it).")
    else:
      moments.append(entry["moment"])
  if not moments:
    raise InputError(f"{folder}: no moment is fitted and trusted; nothing to export.")
  serials = [str(serial) for serial in manifest["serials"]]
  first = camera_files.moment_images(_moment_folder(manifest, moments[0]), serials)
  cameras = camera_files.load_cameras(manifest["cameras"], image_sizes={
      serial: camera_files.image_size_of(path) for serial, path in first.items()})
  stacked = _moments_arrays(folder, moments, model)
  if not np.allclose(stacked["shape"], stacked["shape"][0], atol=1e-6):
    raise InputError(f"{folder}: the moments have different identities (shapes); the dataset "
                     "holds one. Fit the capture again in one run (it shares the shape).")

  def view_frames(serial):
    for index, moment in enumerate(moments):
      path = camera_files.moment_images(_moment_folder(manifest, moment), serials)[serial]
      yield index, lambda path=path: _read_rgb(path)
  return _write_dataset(output, model, manifest, [cameras[serial] for serial in serials],
                        stacked, view_frames, test_fraction, notes, progress,
                        f"From `{folder}` (cameras `{manifest['cameras']}`): {len(moments)} "
                        "moments")


def read_rig_track(folder) -> dict:
  """A jflame-track --cameras folder's manifest; InputError when the folder is not one."""
  if common.folder_kind(folder) != common.RIG_TRACK_FOLDER:
    raise common.wrong_folder(folder, "gaussian_avatars", "a jflame-track folder or a "
                              "jflame-fit --cameras folder")
  return json.loads((Path(folder) / "manifest.json").read_text())


def export_rig_track_dataset(folder, model: FlameModel, output: Path, test_fraction: float,
                             keep_suspect: bool,
                             progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`gaussian_avatars` from a rig track (jflame-track --cameras): its tracked moments, each
  view's frame decoded from the camera's clip. Returns the warnings."""
  folder = Path(folder)
  manifest = read_rig_track(folder)
  if manifest.get("suspect") and not keep_suspect:
    raise InputError(f"{folder}: the track is suspect ({manifest.get('suspect_reason')}); "
                     "--keep_suspect exports it anyway.")
  serials = [str(serial) for serial in manifest["serials"]]
  clips = {serial: Path(manifest["clips"][serial]) for serial in serials}
  sizes = {}
  for serial, clip in clips.items():
    if not clip.exists():
      raise InputError(f"{folder}: the clip of camera {serial} is gone ({clip}); the export "
                       "reads the frames from the clips the track was made from.")
    info, _ = open_clip(clip)
    sizes[serial] = (info.width, info.height)
  cameras = camera_files.load_cameras(manifest["cameras"], image_sizes=sizes)
  with np.load(folder / "rig_track.npz", allow_pickle=False) as data:
    _check_model(str(data["model"]), model, str(folder))
    tracked = np.asarray(data["tracked"], bool)
    moments = np.flatnonzero(tracked)
    stacked = {key: np.asarray(data[key])[moments] for key in
               (*PARAMETER_NAMES, "head_rotation", "head_translation") if key != "shape"}
    stacked["shape"] = np.broadcast_to(np.asarray(data["shape"]),
                                       (len(moments), data["shape"].shape[0]))
  if not len(moments):
    raise InputError(f"{folder}: no moment was tracked; nothing to export.")
  notes = [f"{len(tracked) - len(moments)} moments without a face in any view left out."] if (
      len(moments) < len(tracked)) else []
  wanted = {int(moment): index for index, moment in enumerate(moments)}

  def view_frames(serial):
    _, frames = open_clip(clips[serial])
    for frame_number, rgb in enumerate(frames):
      if frame_number in wanted:
        yield wanted[frame_number], lambda rgb=rgb: rgb
      if frame_number >= moments[-1]:
        return
  return _write_dataset(output, model, manifest, [cameras[serial] for serial in serials],
                        stacked, view_frames, test_fraction, notes, progress,
                        f"From the rig track `{folder}` (cameras `{manifest['cameras']}`): "
                        f"{len(moments)} moments")


def _write_dataset(output: Path, model: FlameModel, manifest: dict, rig, stacked: dict,
                   view_frames, test_fraction: float, notes: List[str], progress,
                   source_line: str) -> List[str]:
  """The dataset of `stacked` moments (parameters and world head poses, leading axis M) seen by
  `rig`: `view_frames(serial)` yields (moment index, load RGB) for every moment. Returns the
  warnings."""
  warnings = common.check_variant(manifest.get("model_variant", "unknown"),
                                  ga.EXPECTED_VARIANT, "gaussian_avatars", ga.READER)
  serials = [camera.serial for camera in rig]
  count = len(stacked["head_rotation"])
  views = [ga.undistorting_maps(camera.intrinsics, camera_files.padded_distortion(camera),
                                camera.image_size) for camera in rig]
  params = FlameParams(**{key: np.asarray(stacked[key]).astype(np.float32)
                          for key in PARAMETER_NAMES})
  root = np.asarray(ga.root_joints(model, params), np.float64)
  rotation, translation = ga.head_pose_in_fixed_camera(
      stacked["head_rotation"], stacked["head_translation"], params.global_rotation, root)
  expression = common.padded(params.expression, ga.NUM_EXPRESSION, "expression", notes)
  motion = ga.motion_arrays(params, rotation, translation, model.num_vertices, expression)
  shape = common.padded(np.asarray(stacked["shape"][0]), ga.NUM_SHAPE, "shape", notes)
  entries = {}
  for index in range(count):
    common.write_npz(output / f"flame_param/{index:05d}.npz",
                     ga.frame_parameters(motion, shape, index))
  with PersonSegmenter() as segmenter:
    for view, (serial, camera, (canvas, focal, map_x, map_y)) in enumerate(
        zip(serials, rig, views)):
      for index, load in view_frames(serial):
        image_path = f"images/{index:05d}_{view:02d}.png"
        mask_path = f"fg_masks/{index:05d}_{view:02d}.png"
        _write_view(load, output / image_path, output / mask_path, map_x, map_y, segmenter)
        entries[index, view] = ga.frame_entry(
            index, canvas, focal, image_path, f"flame_param/{index:05d}.npz",
            camera_index=view, camera_to_world=ga.camera_to_world_opengl(camera.world_to_camera),
            fg_mask_path=mask_path)
        if progress and view == len(rig) - 1:
          progress(1)
  missing = [key for key in ((i, v) for i in range(count) for v in range(len(rig)))
             if key not in entries]
  if missing:
    raise InputError(f"the source ended before moment {missing[0][0]} of camera "
                     f"{serials[missing[0][1]]}; nothing more to export.")
  common.write_npz(output / "canonical_flame_param.npz",
                   ga.canonical_parameters(shape, model.num_vertices))
  chosen = ga.splits(list(range(count)), test_fraction)
  for name, members in chosen.items():
    common.write_json(output / f"transforms_{name}.json", ga.transforms(
        [entries[index, view] for index in members for view in range(len(rig))]))
  common.write_json(output / "transforms.json", ga.transforms(
      [entries[key] for key in sorted(entries)]))
  notes.append("fg_masks/<timestep>_<camera>.png: the person's foreground from MediaPipe's "
               "selfie segmentation of each view, resampled like the image.")
  common.write_readme(output, "GaussianAvatars / VHAP dataset of a capture (jflame-export)", [
      f"{source_line} x {len(rig)} cameras; timesteps train {len(chosen['train'])}, val and "
      f"test {len(chosen['test'])} (the last moments). Image `images/<timestep>_<camera>.png`; "
      f"camera index = position in {serials}.",
      "Each view resampled once into the reader's camera: lens distortion removed, square "
      "pixels (the focal length fx), the principal point at the canvas centre; the head and the "
      "cameras in the camera file's world (docs/FORMAT.md, Exports).", ""]
      + [f"- {note}" for note in notes], warnings)
  return warnings
