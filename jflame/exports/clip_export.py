"""The export jobs of a tracked clip (host side): read the folder, compute what the format
needs in one vmapped call, write each file atomically. A rerun rewrites the small files and
keeps the images already written, so an interrupted export finishes where it stopped."""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

import cv2
import jax
import numpy as np

from jflame import atomic, output as mesh_output
from jflame.errors import InputError
from jflame.exports import common, gaussian_avatars as ga, imavatar, metrical
from jflame.flame import FlameModel
from jflame.preprocess.mediapipe_face import PersonSegmenter
from jflame.preprocess.video import open_clip


def check_model(clip: common.TrackedClip, model: FlameModel) -> None:
  """The model given to the export must be the one the clip was tracked with (its root joints
  depend on it)."""
  if model.name != clip.metadata.get("model"):
    raise InputError(f"the clip was tracked with the model {clip.metadata.get('model')!r}, but "
                     f"the export loaded {model.name!r}: pass the same --flame_model (and "
                     "--flame_variant / --seed) as the jflame-track run.")


def _ga_motion(clip: common.TrackedClip, model: FlameModel, notes: List[str]):
  params = clip.params()
  root = np.asarray(ga.root_joints(model, params), np.float64)
  rotation, translation = ga.head_pose_in_fixed_camera(
      clip.columns["frame_camera_rotation"], clip.columns["frame_camera_translation"],
      params.global_rotation, root)
  expression = common.padded(params.expression, ga.NUM_EXPRESSION, "expression", notes)
  motion = ga.motion_arrays(params, rotation, translation, model.num_vertices, expression)
  shape = common.padded(np.asarray(clip.metadata["shape"]), ga.NUM_SHAPE, "shape", notes)
  return motion, shape


def _tracked_frames(clip: common.TrackedClip, keep_suspect: bool, notes: List[str]) -> List[int]:
  status = clip.columns["status"]
  suspect = clip.columns["suspect"]
  keep = (status == "tracked") & (keep_suspect | ~suspect)
  left = {"without a face": int(np.sum(status != "tracked")),
          "suspect (--keep_suspect keeps them)": int(np.sum((status == "tracked") & suspect
                                                            & ~keep))}
  for reason, count in left.items():
    if count:
      notes.append(f"{count} frame(s) {reason} left out of the splits.")
  return [int(frame) for frame in np.flatnonzero(keep)]


def _kept_frames(clip: common.TrackedClip, model: FlameModel, keep_suspect: bool,
                 format_name: str, expected_variant: str, reader: str
                 ) -> Tuple[List[str], List[str], List[int]]:
  """(warnings, notes, frames) of an export that writes the tracked, trusted frames: the FLAME
  release and the model checked, the frames left out said in the notes."""
  warnings = common.check_variant(clip.manifest.get("model_variant", "unknown"),
                                  expected_variant, format_name, reader)
  check_model(clip, model)
  notes: List[str] = []
  frames = _tracked_frames(clip, keep_suspect, notes)
  if not frames:
    raise InputError(f"{clip.folder}: no frame is tracked and trusted; nothing to export.")
  return warnings, notes, frames


def _on_square(frame_size: Tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
  """A frame padded (black, never resampled) to the centred square of imavatar.square_canvas."""
  side, (left, top) = imavatar.square_canvas(frame_size)

  def placed(image):   # RGB, or one channel (a mask)
    canvas = np.zeros((side, side) + image.shape[2:], np.uint8)
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas
  return placed


def _frames_of(clip: common.TrackedClip, source: Optional[str], frames: List[int], output: Path,
               placed: Callable[[np.ndarray], np.ndarray], image_path: Callable[[int], str],
               progress: Optional[Callable[[int], None]],
               mask_path: Optional[Callable[[int], str]] = None) -> str:
  """Writes `placed(frame)` (RGB) of each of `frames` of the clip's source to
  output / image_path(index), and with `mask_path` the person's foreground (MediaPipe's selfie
  segmentation of the frame, 0..255, placed the same way) to output / mask_path(index), keeping
  files a killed export already wrote; returns the source."""
  source = source or clip.manifest["source"]
  if not Path(source).exists():
    raise InputError(f"the clip's source {source} is gone; pass --source with the video (or "
                     "folder of frames) that was tracked.")
  frame_size = tuple(int(side) for side in clip.manifest["frame_size"])
  info, images = open_clip(source)
  if (info.width, info.height) != frame_size:
    raise InputError(f"{source} has {info.width} x {info.height} frames, the track "
                     f"{frame_size[0]} x {frame_size[1]}: not the clip that was tracked.")
  wanted, written = set(frames), set()
  segmenter = None
  try:
    for index, image in enumerate(images):
      if index >= clip.num_frames:
        break
      if index not in wanted:
        continue
      target = output / image_path(index)
      if not target.is_file():
        common.write_image(target, placed(image))
      if mask_path is not None and not (output / mask_path(index)).is_file():
        if segmenter is None:   # the graph starts only for an export that writes masks
          segmenter = PersonSegmenter()
        alpha = np.round(segmenter.foreground(image) * 255.0).astype(np.uint8)
        common.write_gray(output / mask_path(index), placed(alpha))
      written.add(index)
      if progress:
        progress(1)
  finally:
    if segmenter is not None:
      segmenter.close()
  missing = wanted - written
  if missing:
    raise InputError(f"{source} ended before frame {min(missing)}: not the clip that was "
                     "tracked.")
  return source


def _one_frame_camera(clip: common.TrackedClip) -> Tuple[float, np.ndarray]:
  """(focal length, principal point) of the clip's frame camera, the same for every frame."""
  focal = float(clip.columns["frame_camera_focal_length"][0])
  principal_point = clip.columns["frame_camera_principal_point"][0]
  if not (np.allclose(clip.columns["frame_camera_focal_length"], focal) and np.allclose(
      clip.columns["frame_camera_principal_point"], principal_point)):
    raise InputError(f"{clip.folder}: the frame camera's intrinsics change over the clip; "
                     "this export needs one camera.")
  return focal, principal_point


def export_imavatar(clip: common.TrackedClip, model: FlameModel, output: Path,
                    source: Optional[str], keep_suspect: bool,
                    progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`imavatar`: one of IMavatar's capture folders, `image/<frame>.png` and
  `flame_params.json` (jflame.exports.imavatar). Returns the warnings."""
  warnings, notes, frames = _kept_frames(clip, model, keep_suspect, "imavatar",
                                         imavatar.EXPECTED_VARIANT, imavatar.READER)
  focal, principal_point = _one_frame_camera(clip)
  frame_size = tuple(int(side) for side in clip.manifest["frame_size"])
  params = clip.params()
  shape = np.asarray(clip.metadata["shape"], np.float32)
  if shape.shape[-1] > imavatar.NUM_SHAPE:
    raise InputError(f"IMavatar's FLAME takes {imavatar.NUM_SHAPE} shape coefficients and this "
                     f"track has {shape.shape[-1]}: track again with --num_shape "
                     f"{imavatar.NUM_SHAPE} or fewer.")
  shape = common.padded(shape, imavatar.NUM_SHAPE, "shape", notes)
  num_expression = params.expression.shape[-1]
  expression = np.asarray(params.expression, np.float32)
  if num_expression < imavatar.DEFAULT_NUM_EXPRESSION:
    expression = common.padded(expression, imavatar.DEFAULT_NUM_EXPRESSION, "expression", notes)
  root = np.asarray(ga.root_joints(model, params), np.float64)
  rotation, translation = imavatar.head_pose(
      clip.columns["frame_camera_rotation"], clip.columns["frame_camera_translation"],
      params.global_rotation, root)
  pose = imavatar.full_pose(rotation, params.neck_rotation, params.jaw_rotation,
                            params.left_eye_rotation, params.right_eye_rotation)
  side, _ = imavatar.square_canvas(frame_size)
  source = _frames_of(clip, source, frames, output, _on_square(frame_size),
                      lambda index: f"image/{index:05d}.png", progress,
                      mask_path=lambda index: f"mask/{index:05d}.png")
  fitted = clip.columns["landmarks_fitted"]
  common.write_json(output / "flame_params.json", {
      "frames": [imavatar.frame_entry(f"{index:05d}", pose[index], translation[index],
                                      expression[index], imavatar.face_box(fitted[index],
                                                                           frame_size))
                 for index in frames],
      "intrinsics": imavatar.intrinsics(focal, principal_point, frame_size),
      "shape_params": [float(v) for v in shape]})
  notes.append("mask/<frame>.png: the person's foreground from MediaPipe's selfie segmentation "
               "(their preprocessing uses MODNet's matting; both keep hair and shoulders).")
  if expression.shape[-1] != imavatar.DEFAULT_NUM_EXPRESSION:
    notes.append(f"{expression.shape[-1]} expression coefficients: set the config's "
                 f"`deformer_network.num_exp = {expression.shape[-1]}` (theirs is "
                 f"{imavatar.DEFAULT_NUM_EXPRESSION}).")
  common.write_readme(output, "IMavatar capture folder (jflame-export)", [
      f"From `{clip.folder}` (source `{source}`): {len(frames)} frames, `image/<frame>.png` and "
      "`flame_params.json` (docs/FORMAT.md, Exports).",
      f"One camera: focal length {focal:.2f} px (field of view "
      f"{imavatar.field_of_view_degrees(focal, side):.1f} degrees across the {side} px side); "
      f"each {frame_size[0]} x {frame_size[1]} frame padded (black) to a {side} x {side} square, "
      "which their loader needs.",
      "Their FLAME is FLAME 2020 scaled by 4 (`code/flame/FLAME.py`); the head pose is in "
      "`pose` and `world_mat` is [I | t]. Put this folder at "
      "`<data>/<subject>/<subject>/<name>` and list `<name>` in the config's `sub_dir`.", ""]
      + [f"- {note}" for note in notes], warnings)
  return warnings


def export_metrical(clip: common.TrackedClip, model: FlameModel, output: Path,
                    source: Optional[str], keep_suspect: bool,
                    progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`metrical`: metrical-tracker's output folder (jflame.exports.metrical), the tracked frames
  numbered 0, 1, ... in clip order (their readers walk the numbers without gaps);
  `jflame_frames.json` maps each number to the clip's frame. Returns the warnings."""
  warnings, notes, frames = _kept_frames(clip, model, keep_suspect, "metrical",
                                         metrical.EXPECTED_VARIANT, metrical.READER)
  params = clip.params()
  if np.abs(params.neck_rotation).max() > 1e-6:
    raise InputError(f"{clip.folder}: the track turned the neck joint, which metrical-tracker's "
                     "checkpoints cannot hold (their FLAME keeps the neck still); track without "
                     "a neck schedule.")
  focal, principal_point = _one_frame_camera(clip)
  frame_size = tuple(int(side) for side in clip.manifest["frame_size"])
  side, offset = imavatar.square_canvas(frame_size)
  intrinsic = metrical.intrinsics(focal, principal_point, offset)
  shape = common.padded(np.asarray(clip.metadata["shape"], np.float32), metrical.NUM_SHAPE,
                        "shape", notes)
  expression = common.padded(params.expression, metrical.NUM_EXPRESSION, "expression", notes)
  root = np.asarray(ga.root_joints(model, params), np.float64)
  rotation, translation = metrical.extrinsics(
      clip.columns["frame_camera_rotation"], clip.columns["frame_camera_translation"],
      params.global_rotation, root)
  number = {frame: index for index, frame in enumerate(frames)}
  source = _frames_of(clip, source, frames, output, _on_square(frame_size),
                      lambda index: f"input/{number[index]:05d}.png", progress)
  # The kept frames' meshes and the canonical one (jaw open, all else zero) in one call.
  neutral = jax.tree.map(lambda x: np.zeros_like(x[:1]), params).replace(
      shape=params.shape[:1], jaw_rotation=metrical.canonical_jaw()[None].astype(np.float32))
  meshes = jax.tree.map(lambda x, n: np.concatenate([x[frames], n]), params, neutral)
  vertices = np.asarray(metrical.unrotated_vertices(model, meshes))
  faces = np.asarray(model.faces)
  for index, frame in enumerate(frames):
    name = f"{index:05d}"
    payload = metrical.checkpoint(
        shape, expression[frame], params.jaw_rotation[frame], params.left_eye_rotation[frame],
        params.right_eye_rotation[frame], rotation[frame], translation[frame], intrinsic, side,
        name)
    atomic.write_bytes(output / "checkpoint" / f"{name}.frame",
                       metrical.torch_file_bytes(payload))
    mesh_output.save_mesh(output / "mesh" / f"{name}.ply", vertices[index], faces)
  mesh_output.save_mesh(output / "canonical.obj", vertices[-1], faces)
  common.write_json(output / "jflame_frames.json", {"clip_frame": frames})
  warnings.append("No masks: INSTA and FlashAvatar read face-parsing masks (their preprocessing "
                  "runs a face parser) and jflame has no face parser; make them before training.")
  notes.append("eyelids, tex and sh are zeros: jflame fits no eyelid blendshapes, texture or "
               "lighting for their model.")
  common.write_readme(output, "metrical-tracker output folder (jflame-export)", [
      f"From `{clip.folder}` (source `{source}`): {len(frames)} frames numbered 00000 on in clip "
      "order, `checkpoint/<n>.frame`, `mesh/<n>.ply`, `input/<n>.png`, `canonical.obj`; "
      "`jflame_frames.json` gives each number's frame of the clip (docs/FORMAT.md, Exports).",
      f"One camera: focal length {focal:.2f} px; each {frame_size[0]} x {frame_size[1]} frame "
      f"padded (black) to a {side} x {side} square, so `img_size` reads the same as (height, "
      "width) and as (width, height).",
      "The checkpoints are torch.save files (its legacy format) holding NumPy arrays, as "
      "metrical-tracker writes them: with PyTorch 2.6 or newer read them with "
      "`torch.load(path, weights_only=False)`. FLAME 2020, global rotation the identity; the "
      "head's pose is in the camera (`opencv` R, t, K; `camera` in PyTorch3D's form).", ""]
      + [f"- {note}" for note in notes], warnings)
  return warnings


def export_motion(clip: common.TrackedClip, model: FlameModel, output: Path) -> List[str]:
  """`gaussian_avatars_motion`: motion.npz (every frame, in order). Returns the warnings."""
  warnings = common.check_variant(clip.manifest.get("model_variant", "unknown"),
                                  ga.EXPECTED_VARIANT, "gaussian_avatars_motion", ga.READER)
  check_model(clip, model)
  notes: List[str] = []
  motion, _ = _ga_motion(clip, model, notes)
  common.write_npz(output / "motion.npz", motion)
  common.write_readme(output, "GaussianAvatars motion file (jflame-export)", [
      f"`motion.npz`: {clip.num_frames} frames of `{clip.folder}` (every frame, in order; "
      "frames without a face carry the track's interpolated or held values), float32 arrays "
      "`translation`, `rotation`, `neck_pose`, `jaw_pose` (T, 3), `eyes_pose` (T, 6), `expr` "
      "(T, 100), `dynamic_offset` (T, V + 120, 3) zeros. The head moves in front of a camera "
      "fixed at the origin (docs/FORMAT.md, Exports). Drive a trained avatar with "
      "`local_viewer.py --point_path .../point_cloud.ply --motion_path motion.npz`.", ""]
      + [f"- {note}" for note in notes], warnings)
  return warnings


def export_dataset(clip: common.TrackedClip, model: FlameModel, output: Path,
                   source: Optional[str], test_fraction: float, keep_suspect: bool,
                   progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`gaussian_avatars`: the NeRF-style dataset VHAP writes for GaussianAvatars (module doc of
  jflame.exports.gaussian_avatars). Returns the warnings."""
  warnings, notes, frames = _kept_frames(clip, model, keep_suspect, "gaussian_avatars",
                                         ga.EXPECTED_VARIANT, ga.READER)
  motion, shape = _ga_motion(clip, model, notes)
  focal, principal_point = _one_frame_camera(clip)
  frame_size = tuple(int(side) for side in clip.manifest["frame_size"])
  # The frame camera as a K (square pixels, no lens): one remap puts its principal point at the
  # canvas centre, as for a capture's views.
  intrinsics = np.array([[focal, 0.0, principal_point[0]], [0.0, focal, principal_point[1]],
                         [0.0, 0.0, 1.0]])
  canvas, _, map_x, map_y = ga.undistorting_maps(intrinsics, np.zeros(5), frame_size)
  source = _frames_of(clip, source, frames, output, lambda image: cv2.remap(
      image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT),
      lambda index: f"images/{index:05d}.png", progress,
      mask_path=lambda index: f"fg_masks/{index:05d}.png")
  entries = {}
  for index in frames:
    image_path, parameter_path = f"images/{index:05d}.png", f"flame_param/{index:05d}.npz"
    common.write_npz(output / parameter_path, ga.frame_parameters(motion, shape, index))
    entries[index] = ga.frame_entry(index, canvas, focal, image_path, parameter_path,
                                    fg_mask_path=f"fg_masks/{index:05d}.png")
  common.write_npz(output / "canonical_flame_param.npz",
             ga.canonical_parameters(shape, model.num_vertices))
  chosen = ga.splits(frames, test_fraction)
  for name, members in chosen.items():
    common.write_json(output / f"transforms_{name}.json",
                ga.transforms([entries[frame] for frame in members], entries[frames[0]]))
  common.write_json(output / "transforms.json",
              ga.transforms([entries[frame] for frame in frames], entries[frames[0]]))
  notes.append("fg_masks/<frame>.png: the person's foreground from MediaPipe's selfie "
               "segmentation (VHAP's own masks come from background matting; both keep hair and "
               "shoulders). The canvas border is black, and 0 in the masks.")
  common.write_readme(output, "GaussianAvatars / VHAP dataset (jflame-export)", [
      f"From `{clip.folder}` (source `{source}`): {len(frames)} frames, train "
      f"{len(chosen['train'])}, val and test {len(chosen['test'])} (the last frames).",
      f"One camera, fixed at the world's origin; focal length {focal:.2f} px; each "
      f"{frame_size[0]} x {frame_size[1]} frame placed on a {canvas[0]} x {canvas[1]} canvas so "
      "that the principal point is its centre (the reader assumes it there).",
      "Train with GaussianAvatars' `train.py -s <this folder> --bind_to_mesh` and FLAME 2023 "
      "(docs/FORMAT.md, Exports).", ""] + [f"- {note}" for note in notes], warnings)
  return warnings
