"""Writers for a tracked clip (host side): the per-frame Parquet table, the overlay video, the
parameter plot and the manifest. Every file is written atomically (temporary name, rename).
"""

from typing import Dict, Iterable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial.transform import Rotation

from jflame.atomic import atomic_path
from jflame.camera import FRONTAL_ROTATION

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


def _column(array: np.ndarray) -> pa.Array:
  """A NumPy (T, ...) array as a column of nested fixed-size lists (one row per frame)."""
  array = np.ascontiguousarray(array)
  if array.ndim == 1:
    return pa.array(array)
  column = pa.array(array.reshape(-1))
  for size in reversed(array.shape[1:]):
    column = pa.FixedSizeListArray.from_arrays(column, size)
  return column


def write_table(path, columns: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
  """One Parquet file, one row per frame; `metadata` goes into the schema (JSON strings)."""
  table = pa.table({name: _column(np.asarray(values)) for name, values in columns.items()})
  table = table.replace_schema_metadata({key: str(value) for key, value in metadata.items()})
  with atomic_path(path, suffix=".parquet") as tmp:
    pq.write_table(table, tmp)


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
  """A PNG of the main parameters over time; frames without a face are shaded. The landmark
  error (NaN where no face was fitted: a gap in its line, not a zero) is titled with its median,
  p90 and max; `suspect` (T,) frames are marked on it."""
  import matplotlib  # lazily: only this writer needs it
  matplotlib.use("Agg")
  from matplotlib import pyplot
  figure, axes = pyplot.subplots(5, 1, figsize=(10, 11), sharex=True)
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
  with atomic_path(path, suffix=".png") as tmp:
    figure.savefig(tmp, dpi=90, format="png")
  pyplot.close(figure)


def _step(times: np.ndarray) -> float:
  return float(np.median(np.diff(times))) if len(times) > 1 else 1.0
