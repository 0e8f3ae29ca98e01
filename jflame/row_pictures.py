"""Pictures of a dataset's fits drawn again from its rows, for the report (`jflame.report`).

    model, note = row_pictures.dataset_model(jflame.dataset.settings(folder))
    draw = row_pictures.row_drawer(model)       # row (dict of columns) -> (H, W, 3) uint8 RGB
    jflame.report.write_report(folder, draw=draw)

A dataset keeps pictures of only a few rows (jflame-annotate --overlays), so the report draws
the rows it shows from what every row stores: its source photo (`source_path`), its fitted
parameters and the camera of the original photo (the mesh, through the model the dataset was
made with) and its landmarks. Without that model only the landmarks are drawn. A row whose
source is gone, changed since its fit or unreadable raises `report.NoPicture` with a message
that says so, which the report shows on its tile.

This module needs the model (it sits above `jflame.report`, which only handles files and
pictures it is given).
"""

import re
from typing import Callable, Mapping, Optional, Tuple

import jax
import numpy as np

from jflame import dataset, model_loading, output
from jflame.pictures import MAX_PICTURE_SIDE, compose_affine, fit_within
from jflame.assets import find_asset
from jflame.camera import Camera, apply_affine, project
from jflame.errors import ImageReadError, JFlameError
from jflame.flame import FlameModel, flame_forward
from jflame.preprocess.image_io import decode_image, read_source
from jflame.report import NoPicture

MAX_REDUCTION = 8  # a JPEG is decoded at 1/2, 1/4 or 1/8 when that still covers the picture


def dataset_model(settings: Mapping, flame_path: Optional[str] = None
                  ) -> Tuple[Optional[FlameModel], str]:
  """(the model the dataset's rows were fitted with, a note), or (None, why not).

  The synthetic head is made again from the seed in its name. A FLAME file found in the search
  folders ($JFLAME_HOME, ~/.cache/jflame) must be the one the dataset names (another release
  would draw a wrong mesh from the same coefficients); one given as `flame_path` is taken as
  the dataset's model, and the note says so when its name differs.
  """
  name = str(settings.get("model") or "")
  variant = settings.get("model_variant")
  try:
    if variant == "synthetic" and not flame_path:
      seed = re.search(r"seed (\d+)", name)
      model = model_loading.synthetic_model(int(seed.group(1)) if seed else 0)[0]
    else:
      path = find_asset(flame_path, model_loading.FLAME_FILE_NAMES, "FLAME model")
      if path is None:
        return None, (f"the dataset was made with {name}, and no FLAME model file was given or "
                      "found; pass --flame_model to draw meshes")
      from jflame import flame_io
      model = flame_io.load_flame(path, variant=variant if variant in (
          "flame2020", "flame2023", "flame2023_open") else None)
  except JFlameError as error:
    return None, f"model not loaded ({error})"
  if model.name == name:
    return model, ""
  if flame_path:  # the user says this is the dataset's model (a copy under another name)
    return model, f"meshes drawn with {model.name}, given for the dataset's {name}"
  return None, (f"the dataset was made with {name}, and {model.name} was found; pass the "
                "dataset's model file with --flame_model to draw meshes")


def row_drawer(model: Optional[FlameModel], max_side: int = MAX_PICTURE_SIDE
               ) -> Callable[[Mapping], np.ndarray]:
  """A function from a dataset row (a dict of its columns) to (its picture, the face's box):
  the photo with the fitted mesh's wireframe (when `model` is given), the detected (green) and
  the fitted (red) landmarks, at most `max_side` pixels on its longer side; the box (x0, y0,
  x1, y1) frames the face for the report's thumbnail. Raises `report.NoPicture`."""
  mesh_pixels = None if model is None else jax.jit(_mesh_pixels)
  faces = np.zeros((0, 3), np.int64) if model is None else np.asarray(model.faces)

  def draw(row: Mapping) -> np.ndarray:
    photo, to_picture = _photo(row, max_side)
    detected, fitted = (_points(row, name) for name in ("landmarks_detected_original",
                                                        "landmarks_fitted_original"))
    if detected is None or fitted is None:
      raise NoPicture("the row holds no landmarks (not fitted)")
    mesh = np.zeros((0, 2))
    if mesh_pixels is not None:
      if row.get("status") != "ok":
        raise NoPicture(f"status {row.get('status')}: no fit to draw")
      mesh = np.asarray(mesh_pixels(model, dataset.flame_params(row), _camera(row)), np.float64)
    detected, fitted = apply_affine(to_picture, detected), apply_affine(to_picture, fitted)
    picture = output.draw_overlay(photo, apply_affine(to_picture, mesh), faces, detected, fitted)
    return picture, face_box(np.concatenate([detected, fitted]))

  return draw


def face_box(points: np.ndarray, margin: float = 0.35) -> np.ndarray:
  """(x0, y0, x1, y1) a square around the points, `margin` of its side added on each side."""
  low, high = points.min(axis=0), points.max(axis=0)
  centre, half = (low + high) / 2.0, (1.0 + 2.0 * margin) * float(np.max(high - low)) / 2.0
  return np.concatenate([centre - half, centre + half])


def _mesh_pixels(model: FlameModel, params, camera: Camera):
  """(V, 2) the fitted mesh projected into the original photo."""
  return project(camera, flame_forward(model, params)[0])


def _camera(row: Mapping) -> Camera:
  values = {key: row.get(f"original_camera_{key}") for key in output.CAMERA_FIELDS}
  if any(value is None for value in values.values()):
    raise NoPicture("the row holds no camera of the original photo")
  return Camera(**{key: np.asarray(value, np.float32) for key, value in values.items()})


def _points(row: Mapping, name: str) -> Optional[np.ndarray]:
  values = row.get(name)
  return None if values is None else np.asarray(values, np.float64).reshape(-1, 2)


def _photo(row: Mapping, max_side: int) -> Tuple[np.ndarray, np.ndarray]:
  """(the row's source photo at most `max_side` pixels long, the (2, 3) affine from the
  original's pixels to its pixels). The file must still be the one that was fitted."""
  path = row.get("source_path")
  if not path:
    raise NoPicture("no source path recorded (an in-memory image)")
  try:
    source = read_source(path)
  except ImageReadError as error:
    raise NoPicture(f"source gone or unreadable: {error}") from None
  stored = row.get("source_hash")
  if (stored and stored != source.content_hash) or (
      row.get("source_size") is not None and row["source_size"] != source.size):
    raise NoPicture(f"source changed since its fit: {path} (rerun jflame-annotate to refit it)")
  try:
    decoded = decode_image(source.data, str(path), MAX_REDUCTION, max_side)
  except ImageReadError as error:
    raise NoPicture(f"source unreadable: {error}") from None
  photo, smaller = fit_within(decoded.pixels, max_side)
  # Original -> decoded (a point x there is at reduction * x in the original) -> downscaled.
  return photo, compose_affine(smaller, np.eye(2, 3) / decoded.reduction)
