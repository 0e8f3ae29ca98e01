"""Writers for a tracked clip (host side): the per-frame Parquet table (and its reader), the
overlay video, the parameter plot and the manifest. Every file is written atomically (temporary
name, rename).
"""

import json
from typing import Dict, Iterable, Tuple

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial.transform import Rotation

from jflame.atomic import atomic_path
from jflame.camera import FRONTAL_ROTATION
from jflame.flame import ROTATION_NAMES

STATUS_TRACKED = "tracked"
STATUS_INTERPOLATED = "interpolated"   # no face; values interpolated between tracked frames
STATUS_NO_FACE = "no_face"             # no face before the first / after the last tracked frame
TABLE_FORMAT_VERSION = 2   # 2: suspect and suspect_reason columns


def frame_statuses(tracked: np.ndarray) -> np.ndarray:
  """(T,) status strings: tracked, interpolated (a gap between tracked frames) or no_face."""
  tracked = np.asarray(tracked, bool)
  status = np.full(tracked.shape, STATUS_NO_FACE, object)
  if tracked.any():
    first, last = np.flatnonzero(tracked)[[0, -1]]
    status[first:last + 1] = STATUS_INTERPOLATED
  status[tracked] = STATUS_TRACKED
  return status


def head_rotation_degrees(camera_rotation: np.ndarray) -> np.ndarray:
  """(T, 3) head rotation relative to a frontal view (axis-angle, degrees; x pitch, y yaw,
  z roll) of (T, 3) camera axis-angles (jflame.camera: R = R_frontal R_head)."""
  head = Rotation.from_rotvec(FRONTAL_ROTATION).inv() * Rotation.from_rotvec(camera_rotation)
  return np.degrees(head.as_rotvec())


# The columns of track.parquet, in order: (name, value type, per-frame shape). A size "E" is the
# clip's expression count, "K" its landmark count (metadata `landmark_indices`); a shape makes
# nested fixed-size lists, e.g. (K, 2) a list of K (x, y) lists.
_F32, _F64 = pa.float32(), pa.float64()
TABLE_COLUMNS = (
    ("frame", pa.int64(), ()), ("time_s", _F64, ()), ("status", pa.string(), ()),
    ("expression", _F32, ("E",)), *((name, _F32, (3,)) for name in ROTATION_NAMES),
    ("head_rotation_deg", _F64, (3,)),
    ("camera_rotation", _F32, (3,)), ("camera_translation", _F32, (3,)),
    ("camera_focal_length", _F32, ()), ("camera_principal_point", _F32, (2,)),
    ("frame_camera_rotation", _F64, (3,)), ("frame_camera_translation", _F64, (3,)),
    ("frame_camera_focal_length", _F64, ()), ("frame_camera_principal_point", _F64, (2,)),
    ("landmarks_detected", _F64, ("K", 2)), ("landmarks_fitted", _F64, ("K", 2)),
    ("landmark_error_px", _F32, ()), ("landmark_error_relative", _F64, ()),
    ("suspect", pa.bool_(), ()), ("suspect_reason", pa.string(), ()),
    ("photometric_error", _F32, ()))
PHOTOMETRIC_COLUMNS = ("photometric_error",)   # only in photometric mode


def table_schema(num_expression: int, num_landmarks: int, photometric: bool) -> pa.Schema:
  """The schema of a clip's track.parquet (without its metadata)."""
  sizes = dict(E=num_expression, K=num_landmarks)
  fields = []
  for name, value_type, shape in TABLE_COLUMNS:
    if name in PHOTOMETRIC_COLUMNS and not photometric:
      continue
    for size in reversed(shape):
      value_type = pa.list_(value_type, sizes.get(size, size))
    fields.append(pa.field(name, value_type))
  return pa.schema(fields)


def _column(array: np.ndarray, column_type: pa.DataType) -> pa.Array:
  """A NumPy (T, ...) array as a column of `column_type` (nested fixed-size lists of one value
  type: one row per frame)."""
  sizes = []
  while pa.types.is_fixed_size_list(column_type):
    sizes.append(column_type.list_size)
    column_type = column_type.value_type
  array = np.asarray(array, column_type.to_pandas_dtype())
  if array.shape[1:] != tuple(sizes):
    raise ValueError(f"an array of shape {array.shape} for a column of (T, *{sizes})")
  column = pa.array(np.ascontiguousarray(array).reshape(-1), column_type)
  for size in reversed(sizes):
    column = pa.FixedSizeListArray.from_arrays(column, size)
  return column


def write_table(path, columns: Dict[str, np.ndarray], schema: pa.Schema,
                metadata: Dict[str, str]) -> None:
  """One Parquet file of `schema`, one row per frame, from `columns` (name -> (T, ...) array, the
  schema's names exactly); `metadata` goes into the schema (JSON strings)."""
  if set(columns) != set(schema.names):
    raise ValueError(f"columns {sorted(set(columns) ^ set(schema.names))} are not in both the "
                     "arrays and the schema")
  table = pa.Table.from_arrays([_column(columns[field.name], field.type) for field in schema],
                               schema=schema)
  table = table.replace_schema_metadata({key: str(value) for key, value in metadata.items()})
  with atomic_path(path, suffix=".parquet") as tmp:
    pq.write_table(table, tmp)


def read_table(path) -> Tuple[dict, Dict[str, np.ndarray]]:
  """A clip's track.parquet as written by `write_table`: (metadata, each value parsed from its
  JSON string; columns, name -> (T, ...) NumPy array, fixed-size lists as trailing axes)."""
  table = pq.read_table(path)
  metadata = {key.decode(): json.loads(value) for key, value in
              (table.schema.metadata or {}).items()}
  columns = {}
  for field in table.schema:
    column = table.column(field.name).combine_chunks()
    shape, column_type = [], field.type
    while pa.types.is_fixed_size_list(column_type):
      shape.append(column_type.list_size)
      column_type = column_type.value_type
    values = column
    for _ in shape:
      values = values.flatten()
    array = values.to_numpy(zero_copy_only=False)
    columns[field.name] = np.array(array).reshape((len(column), *shape))  # writable copy
  return metadata, columns


def mesh_edges(faces: np.ndarray) -> np.ndarray:
  """(E, 2) unique vertex pairs of a triangle mesh's edges (computed once per clip)."""
  pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  return np.unique(np.sort(pairs, axis=1), axis=0)


def draw_frame(frame, mesh_pixels, faces, edges, detected, fitted):
  """A video frame's overlay, cheaper than `output.draw_overlay` (which is for single photos):
  every edge of a front-facing triangle once, no antialiasing, one polyline call; detected
  landmarks green, fitted red.

  Args:
    frame: (H, W, 3) uint8 RGB; mesh_pixels: (V, 2); faces: (F, 3); edges: `mesh_edges(faces)`;
    detected, fitted: (K, 2) (empty arrays draw none).
  """
  canvas = np.ascontiguousarray(frame).copy()
  corners = mesh_pixels[faces]
  edge_a, edge_b = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
  # Pixel y points down: a front-facing triangle has a negative signed area here.
  facing = edge_a[:, 0] * edge_b[:, 1] - edge_a[:, 1] * edge_b[:, 0] < 0
  seen = np.zeros(len(mesh_pixels), bool)
  seen[faces[facing].reshape(-1)] = True
  kept = edges[seen[edges[:, 0]] & seen[edges[:, 1]]]
  lines = np.round(mesh_pixels[kept] * 16).astype(np.int32)
  wire = canvas.copy()
  cv2.polylines(wire, list(lines), False, (235, 235, 235), 1, cv2.LINE_8, 4)
  canvas = cv2.addWeighted(wire, 0.4, canvas, 0.6, 0)
  for points, colour in ((detected, (0, 255, 0)), (fitted, (255, 40, 40))):
    for x, y in np.round(np.asarray(points)).astype(int):
      cv2.circle(canvas, (x, y), 1, colour, -1, cv2.LINE_8)
  return canvas


def write_overlay_video(path, frames: Iterable[np.ndarray], fps: float, mesh_pixels: np.ndarray,
                        faces: np.ndarray, detected: np.ndarray, fitted: np.ndarray,
                        drawn: np.ndarray) -> int:
  """The mesh wireframe and landmarks (detected green, fitted red) over every frame, mp4.

  Args:
    frames: RGB uint8 frames in order; mesh_pixels: (T, V, 2) frame pixels; faces: (F, 3);
    detected, fitted: (T, K, 2) frame pixels; drawn: (T,) frames that get the mesh (others are
    written as they are, so the video keeps its timing).
  Returns:
    frames written.
  """
  writer = None
  count = 0
  empty = np.zeros((0, 2))
  faces = np.asarray(faces)
  edges = mesh_edges(faces)
  with atomic_path(path, suffix=".mp4") as tmp:
    try:
      for index, frame in enumerate(frames):
        if index >= len(drawn):
          break
        if writer is None:
          height, width = frame.shape[:2]
          writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                   (width, height))
        if drawn[index]:
          frame = draw_frame(frame, mesh_pixels[index], faces, edges, detected[index],
                             fitted[index])
        else:  # no face: the interpolated mesh, without landmarks
          frame = draw_frame(frame, mesh_pixels[index], faces, edges, empty, empty)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        count += 1
    finally:
      if writer is not None:
        writer.release()
  return count


def plot_track(path, times: np.ndarray, status: np.ndarray, head_degrees: np.ndarray,
               translation: np.ndarray, jaw: np.ndarray, expression: np.ndarray,
               landmark_error: np.ndarray, suspect=None) -> None:
  """A PNG of `track_figure` (same arguments)."""
  # Drawn on a canvas of its own, without pyplot: a library caller's matplotlib backend and
  # figure list stay as they were.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: only this writer needs it
  figure = track_figure(times, status, head_degrees, translation, jaw, expression,
                        landmark_error, suspect)
  FigureCanvasAgg(figure)
  with atomic_path(path, suffix=".png") as tmp:
    figure.savefig(tmp, dpi=90, format="png")


def track_figure(times: np.ndarray, status: np.ndarray, head_degrees: np.ndarray,
                 translation: np.ndarray, jaw: np.ndarray, expression: np.ndarray,
                 landmark_error: np.ndarray, suspect=None):
  """A matplotlib Figure of the main parameters over time; frames without a face are shaded. The
  landmark error (NaN where no face was fitted: a gap in its line, not a zero) is titled with
  its median, p90 and max; `suspect` (T,) frames are marked on it."""
  from matplotlib.figure import Figure
  figure = Figure(figsize=(10, 11))
  axes = figure.subplots(5, 1, sharex=True)
  series = [
      ("head rotation (deg)", head_degrees, ("pitch", "yaw", "roll")),
      ("camera translation (mm)", 1000.0 * (translation - np.median(translation, axis=0)),
       ("x", "y", "z (minus median)")),
      ("jaw rotation (deg)", np.degrees(jaw), ("open", "side", "twist")),
      ("expression", expression[:, :5], tuple(f"e{i}" for i in range(min(5, expression.shape[1])))),
      ("landmark error (px)", landmark_error[:, None], ("mean",)),
  ]
  error = np.asarray(landmark_error, np.float64)
  fitted = error[np.isfinite(error)]
  gaps = np.asarray(status) != STATUS_TRACKED
  for axis, (title, values, labels) in zip(axes, series):
    for column, label in zip(np.asarray(values).T, labels):
      axis.plot(times, column, label=label, linewidth=1.2)
    for index in np.flatnonzero(gaps):
      axis.axvspan(times[index] - 0.5 * _step(times), times[index] + 0.5 * _step(times),
                   color="0.85", linewidth=0)
    axis.set_ylabel(title, fontsize=8)
    if axis is axes[-1]:
      if suspect is not None and np.any(suspect):
        marked = np.asarray(suspect, bool) & np.isfinite(error)
        axis.plot(times[marked], error[marked], "x", color="red", markersize=4, label="suspect")
      if fitted.size:
        axis.set_title(f"landmark error: median {np.median(fitted):.2f} px, p90 "
                       f"{np.percentile(fitted, 90):.2f} px, max {fitted.max():.2f} px",
                       fontsize=8)
    axis.legend(fontsize=7, loc="upper right", ncol=len(labels) + 1)
    axis.grid(alpha=0.3)
  axes[-1].set_xlabel("time (s); grey: no face (interpolated or held)")
  figure.tight_layout()
  return figure


def _step(times: np.ndarray) -> float:
  return float(np.median(np.diff(times))) if len(times) > 1 else 1.0
