"""Writers for fit results (host side): parameters (.npz), mesh (.obj), overlay picture (.png),
and the run manifest (.json). Every file is written atomically, and a finished result is never
replaced by the output of a failed attempt.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import trimesh

from jflame.atomic import atomic_path, write_text
from jflame.camera import invert_affine
from jflame.rotation import matrix_to_axis_angle_np
from scipy.spatial.transform import Rotation

RESULT_FORMAT_VERSION = 1


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


def save_png(path, rgb):
  ok, data = cv2.imencode(".png", cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f"PNG encoding failed for {path}")
  with atomic_path(path) as tmp:
    tmp.write_bytes(data.tobytes())


def result_is_finished(output_dir, name) -> bool:
  """True when a previous run already wrote a complete, successful result for `name`."""
  path = Path(output_dir) / f"{name}.npz"
  if not path.is_file():
    return False
  try:
    with np.load(path, allow_pickle=False) as data:
      return str(data["status"]) == "ok"
  except Exception:  # a damaged file is not a finished result
    return False


def write_manifest(path, manifest: dict):
  write_text(path, json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, Path):
    return str(value)
  raise TypeError(f"cannot write {type(value).__name__} to JSON")
