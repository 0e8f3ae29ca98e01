"""Writers for fit results (host side): the result record, parameters (.npz), mesh (.obj/.ply)
and pictures (.png); the manifest is `jflame.manifest`. Every file is written atomically, and a finished result is never
replaced by the output of a failed attempt.
"""

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from jflame.atomic import atomic_path, write_bytes
from jflame.camera import apply_affine, invert_affine
from jflame.pictures import MAX_PICTURE_SIDE, compose_affine, fit_within
from jflame.rotation import matrix_to_axis_angle_np
from scipy.spatial.transform import Rotation

RESULT_FORMAT_VERSION = 1
CAMERA_FIELDS = ("rotation", "translation", "focal_length", "principal_point")


def camera_in_original_image(camera: dict, crop_from_original) -> dict:
  """The fitted crop camera re-expressed as a pinhole camera of the original photograph.

  The crop is a similarity s R2 x + b of the original, so undoing it scales the focal length by
  1/s, moves the principal point, and turns the in-plane rotation R2 into a rotation of the
  camera about its optical axis.
  """
  affine = np.asarray(crop_from_original, np.float64)
  scale = np.sqrt(abs(np.linalg.det(affine[:, :2])))
  in_plane = affine[:, :2] / scale  # R2
  roll = np.eye(3)
  roll[:2, :2] = in_plane.T
  rotation = roll @ Rotation.from_rotvec(camera["rotation"]).as_matrix()
  principal = invert_affine(affine)[:, :2] @ np.asarray(camera["principal_point"]) + \
      invert_affine(affine)[:, 2]
  return dict(rotation=matrix_to_axis_angle_np(rotation),
              translation=np.asarray(camera["translation"], np.float64) @ roll.T,
              focal_length=float(camera["focal_length"]) / scale, principal_point=principal)


def result_record(record, result, *, model_name: str, mode: str, crop_size: int,
                  landmark_indices, albedo_name: Optional[str] = None) -> dict:
  """What a finished fit writes: a flat dict of arrays, numbers and strings (the `.npz`).

  Args:
    record: the image's `PreparedImage` (status ok).
    result: that image's `jflame.fit.FitResult`, host arrays without a batch axis.
    model_name, mode: the FLAME model's name and the fitting mode.
    crop_size: side of the aligned crop the fit saw.
    landmark_indices: (K,) the detector landmark of each fitted point.
    albedo_name: photometric mode: which albedo model the texture coefficients belong to.
  """
  landmark_indices = np.asarray(landmark_indices)
  detected = record.landmarks[landmark_indices]
  fitted = np.asarray(result.landmarks_2d)
  crop_to_original = invert_affine(record.crop_from_original)
  error_px = float(result.landmark_error)
  camera = {key: np.asarray(getattr(result.camera, key)) for key in CAMERA_FIELDS}
  params = result.params
  arrays = dict(
      format_version=RESULT_FORMAT_VERSION, status="ok", name=record.name, model=model_name,
      mode=str(getattr(mode, "value", mode)), **params.as_dict(),
      **{f"camera_{key}": value for key, value in camera.items()},
      **{f"original_camera_{key}": value for key, value in
         camera_in_original_image(camera, record.crop_from_original).items()},
      crop_from_original=record.crop_from_original, crop_size=crop_size,
      image_size=np.array([record.image_width, record.image_height]),
      landmark_indices=landmark_indices, landmarks_detected=detected,
      landmarks_fitted=fitted, landmark_weights=record.landmark_weights[landmark_indices],
      landmarks_detected_original=record.landmarks_original[landmark_indices],
      landmarks_fitted_original=apply_affine(crop_to_original, fitted.astype(np.float64)),
      landmark_error_px=error_px, landmark_error_relative=error_px / face_size(detected),
      rigid_loss_history=result.rigid_loss_history, full_loss_history=result.full_loss_history)
  if result.appearance is not None:
    arrays.update(texture=result.appearance.texture, sh_lighting=result.appearance.lighting,
                  albedo_model=albedo_name or "", photometric_error=result.photometric_error)
  return arrays


def face_size(landmarks) -> float:
  """Face size in pixels: geometric mean of the width and height of the landmarks' box (the
  unit of the relative landmark error reported by jflame)."""
  extent = np.ptp(np.asarray(landmarks), axis=0)
  return float(np.sqrt(max(extent[0], 1e-6) * max(extent[1], 1e-6)))


def save_parameters(path, arrays: dict):
  """Writes a flat dict of arrays/scalars/strings as .npz, atomically."""
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **{key: np.asarray(value) for key, value in arrays.items()})


def save_mesh(path, vertices, faces, header: str = ""):
  """Writes a triangle mesh (.obj or .ply by the extension) through trimesh, atomically."""
  import trimesh   # here, not at the top: slow to import, and annotate and track write no mesh
  mesh = trimesh.Trimesh(vertices=np.asarray(vertices, np.float64),
                         faces=np.asarray(faces, np.int64), process=False)
  data = mesh.export(file_type=Path(path).suffix[1:])
  if isinstance(data, str):
    data = (f"# {header}\n" if header and path.suffix == ".obj" else "") + data
    data = data.encode("utf-8")
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def draw_overlay(photo, mesh_pixels, faces, detected, fitted, weights=None):
  """The fit drawn over the photograph: front-facing mesh wireframe (light), detected landmarks
  (green) and fitted landmarks (red), joined by short lines where they disagree.

  Args:
    photo: (H, W, 3) uint8 RGB.
    mesh_pixels: (V, 2) projected vertices in photo pixels.
    faces: (F, 3) triangles.
    detected, fitted: (K, 2) landmarks in photo pixels, same order.
    weights: (K,) landmarks with weight 0 are not drawn.
  """
  canvas = np.ascontiguousarray(photo).copy()
  thickness = max(1, round(max(canvas.shape[:2]) / 700))
  corners = np.asarray(mesh_pixels, np.float64)[np.asarray(faces)]
  edge_a, edge_b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
  # Pixel y points down, so a front-facing (counter-clockwise in model space) triangle has a
  # negative signed area here.
  facing = edge_a[:, 0] * edge_b[:, 1] - edge_a[:, 1] * edge_b[:, 0] < 0
  wire = canvas.copy()
  shift = 4  # sub-pixel precision for OpenCV drawing
  polygons = [np.round(c * (1 << shift)).astype(np.int32) for c in corners[facing]]
  if polygons:  # none when only landmarks are drawn
    cv2.polylines(wire, polygons, True, (235, 235, 235), 1, cv2.LINE_AA, shift)
  canvas = cv2.addWeighted(wire, 0.35, canvas, 0.65, 0)
  keep = np.ones(len(detected), bool) if weights is None else np.asarray(weights) > 0
  radius = thickness
  for (dx, dy), (fx, fy) in zip(np.asarray(detected)[keep], np.asarray(fitted)[keep]):
    a = (int(round(dx * 16)), int(round(dy * 16)))
    b = (int(round(fx * 16)), int(round(fy * 16)))
    cv2.line(canvas, a, b, (255, 255, 0), thickness, cv2.LINE_AA, shift)
    cv2.circle(canvas, a, radius * 16, (0, 255, 0), -1, cv2.LINE_AA, shift)
    cv2.circle(canvas, b, radius * 16, (255, 40, 40), -1, cv2.LINE_AA, shift)
  return canvas


def blend_render(photo, render, alpha, opacity=0.75):
  """A premultiplied-alpha render laid over a photo of the same size (uint8 RGB out)."""
  photo = np.asarray(photo, np.float32) / 255.0
  weight = opacity * np.clip(np.asarray(alpha, np.float32), 0.0, 1.0)[..., None]
  covered = np.asarray(render, np.float32) / np.maximum(np.asarray(alpha)[..., None], 1e-6)
  blended = photo * (1.0 - weight) + np.clip(covered, 0.0, 1.0) * weight
  return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def warp_to_photo(image, original_from_crop, photo_shape):
  """Warps a crop-frame image (H, W, C) into the original photo's frame (bilinear)."""
  height, width = photo_shape[:2]
  # OpenCV's pixel centres sit at integers, jflame's at +0.5: shift in, shift back out.
  shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
  unshift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
  matrix = (unshift @ np.vstack([original_from_crop, [0, 0, 1]]) @ shift)[:2]
  return cv2.warpAffine(np.asarray(image, np.float32), matrix, (width, height),
                        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def side_by_side(crop, render, alpha):
  """(input | render | overlay) in the crop frame, uint8 RGB."""
  crop = np.asarray(crop, np.uint8)
  # The render is premultiplied by its alpha, so as it stands it is drawn over black.
  render_only = np.clip(np.asarray(render) * 255.0, 0, 255).astype(np.uint8)
  return np.concatenate([crop, render_only, blend_render(crop, render, alpha)], axis=1)


def photo_of(record, crop_size: Optional[int] = None, min_side: int = MAX_PICTURE_SIDE):
  """(the record's original photo for drawing on, the affine from the original's pixels to
  its pixels), or (its crop, None) when the file cannot be read any more (changed or gone
  since preprocessing; a grey square of `crop_size`, by default the default crop's, when the
  record kept no crop). A JPEG is
  decoded at 1/2, 1/4 or 1/8 where that still leaves `min_side` pixels: a picture is never
  larger, so a huge photo need not be held whole."""
  from jflame.preprocess.image_io import decode_image, read_source
  from jflame.preprocess.pipeline import DEFAULT_CROP_SIZE
  if record.source is not None:
    try:
      decoded = decode_image(read_source(record.source).data, str(record.source), 8, min_side)
      return decoded.pixels, np.eye(2, 3) / decoded.reduction
    except Exception:  # pylint: disable=broad-except
      pass
  if record.crop is None:
    side = crop_size or DEFAULT_CROP_SIZE
    return np.full((side, side, 3), 128, np.uint8), None
  return record.crop, None


def write_pictures(folder, record, arrays: dict, meshes, faces) -> list:
  """The pictures of one fit; returns the names written.

  Landmark mode: `<name>_overlay.png`, the mesh wireframe with detected (green) and fitted
  (red) landmarks over the photo. Photometric mode: the shaded render laid over the photo, and
  `<name>_compare.png`, (input | render | overlay) in the crop frame. The photo is downscaled
  first to at most MAX_PICTURE_SIDE pixels on its longer side (the drawing with it).

  Args:
    folder: the output folder.
    record: the image's PreparedImage.
    arrays: its `result_record`.
    meshes: its slice of `jflame.fit.FittedMeshes` (host arrays).
    faces: (F, 3) the model's triangles.
  """
  folder = Path(folder)
  photo, from_original = photo_of(record, arrays.get("crop_size"))
  on_crop = from_original is None
  to_photo = np.eye(2, 3) if on_crop else compose_affine(
      from_original, invert_affine(record.crop_from_original))
  photo, smaller = fit_within(photo)
  to_photo = compose_affine(smaller, to_photo)
  name = record.name
  if meshes.render is None:
    overlay = draw_overlay(
        photo, apply_affine(to_photo, np.asarray(meshes.pixels, np.float64)), np.asarray(faces),
        apply_affine(to_photo, np.asarray(arrays["landmarks_detected"], np.float64)),
        apply_affine(to_photo, np.asarray(arrays["landmarks_fitted"], np.float64)),
        arrays["landmark_weights"])
    save_png(folder / f"{name}_overlay.png", overlay)
    return [f"{name}_overlay.png"]
  image, alpha = np.asarray(meshes.render), np.asarray(meshes.alpha)
  if on_crop:
    photo_image, photo_alpha = image, alpha
  else:
    photo_image = warp_to_photo(image, to_photo, photo.shape)
    photo_alpha = warp_to_photo(alpha, to_photo, photo.shape)
  save_png(folder / f"{name}_overlay.png", blend_render(photo, photo_image, photo_alpha))
  # Three crops side by side are 3072 pixels wide at the largest crop size.
  save_png(folder / f"{name}_compare.png", fit_within(side_by_side(record.crop, image, alpha))[0])
  return [f"{name}_overlay.png", f"{name}_compare.png"]


def png_bytes(rgb, label="a picture") -> bytes:
  """uint8 RGB as the bytes of a PNG file."""
  ok, data = cv2.imencode(".png", cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f"PNG encoding failed for {label}")
  return data.tobytes()


def save_png(path, rgb):
  write_bytes(path, png_bytes(rgb, path))
