"""What every export shares: the clip it reads, the FLAME variant its readers expect, the
coefficient counts they require, and the README written beside the files."""

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np

from jflame import atomic, track_output
from jflame.errors import InputError
from jflame.flame import ROTATION_NAMES, FlameParams

README_NAME = "README.md"


@dataclasses.dataclass(frozen=True)
class TrackedClip:
  """A jflame-track folder as read: its manifest, its table's metadata and its columns
  (`track_output.read_table`)."""
  folder: Path
  manifest: dict
  metadata: dict
  columns: Dict[str, np.ndarray]

  @property
  def num_frames(self) -> int:
    return len(self.columns["frame"])

  def params(self) -> FlameParams:
    """(T, ...) FLAME parameters of every frame, the clip's one shape repeated."""
    frames = self.num_frames
    shape = np.broadcast_to(np.asarray(self.metadata["shape"], np.float32),
                            (frames, len(self.metadata["shape"])))
    return FlameParams(shape=shape, expression=self.columns["expression"].astype(np.float32),
                       **{name: self.columns[name].astype(np.float32)
                          for name in ROTATION_NAMES})


TRACK_FOLDER, CAPTURE_FOLDER = "a jflame-track folder", "a jflame-fit --cameras folder"
RIG_TRACK_FOLDER = "a jflame-track --cameras folder"
# What each kind of jflame folder can be exported as (for the messages that refuse a folder).
EXPORTS_OF = {TRACK_FOLDER: "gaussian_avatars, gaussian_avatars_motion, imavatar, metrical",
              CAPTURE_FOLDER: "gaussian_avatars", RIG_TRACK_FOLDER: "gaussian_avatars",
              "a jflame-fit result folder": "now", "a jflame-annotate dataset": "now"}


def folder_kind(folder) -> Optional[str]:
  """Which jflame output `folder` is (a key of EXPORTS_OF), None when none."""
  folder = Path(folder)
  if (folder / "index.json").is_file():
    return "a jflame-annotate dataset"
  if (folder / "manifest.jsonl").is_file():
    return "a jflame-fit result folder"
  try:
    manifest = json.loads((folder / "manifest.json").read_text())
  except (OSError, ValueError):
    return None
  if isinstance(manifest, dict) and "jflame_capture" in manifest:
    return CAPTURE_FOLDER
  if isinstance(manifest, dict) and "jflame_rig_track" in manifest:
    return RIG_TRACK_FOLDER
  if isinstance(manifest, dict) and "jflame_track" in manifest:
    return TRACK_FOLDER
  return None


def wrong_folder(folder, format_name: str, wanted: str) -> InputError:
  """The one-line refusal of a folder that is not what `format_name` reads."""
  folder = Path(folder)
  if not folder.exists():
    return InputError(f"--input {folder} does not exist.")
  kind = folder_kind(folder)
  found = (f"it is {kind}, which exports as {EXPORTS_OF[kind]}" if kind
           else "it is no jflame output folder")
  return InputError(f"--format {format_name} reads {wanted}; {folder}: {found}.")


def read_tracked_clip(folder, format_name: str = "gaussian_avatars") -> TrackedClip:
  """A jflame-track output folder; InputError (one line) when it is not one or holds no fit."""
  folder = Path(folder)
  manifest_path, table_path = folder / "manifest.json", folder / "track.parquet"
  if folder_kind(folder) != TRACK_FOLDER:
    raise wrong_folder(folder, format_name, "a jflame-track folder" + (
        " or a jflame-fit --cameras folder" if format_name == "gaussian_avatars" else ""))
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("status") == "no_face" or not table_path.is_file():
    raise InputError(f"{folder} holds no track (status {manifest.get('status')!r}, "
                     f"track.parquet {'present' if table_path.is_file() else 'absent'}).")
  if manifest.get("status") != "ok":
    raise InputError(f"{folder}: the track did not finish well (status "
                     f"{manifest.get('status')!r}: {manifest.get('message', '')}); track the "
                     "clip again before exporting it.")
  try:
    metadata, columns = track_output.read_table(table_path)
  except Exception as error:  # pyarrow raises several types for a damaged file
    raise InputError(f"{table_path} cannot be read ({type(error).__name__}: {error}).") from None
  return TrackedClip(folder, manifest, metadata, columns)


def check_variant(recorded: str, expected: str, format_name: str, reader: str) -> List[str]:
  """The FLAME variant rule: a fit with `recorded` exports to a reader that expects `expected`
  only when they are the same release (never converted); the synthetic head exports with a
  warning. Returns the warnings; raises InputError when refused."""
  if recorded == expected:
    return []
  if recorded == "synthetic":
    return [f"This export was fitted with jflame's SYNTHETIC head, not FLAME: {reader} will read "
            f"the files, but their shape and expression coefficients mean nothing to its "
            f"{expected} model. Fit with the official {expected} model to use them."]
  files = {"flame2023": "flame2023.pkl (FLAME 2023, with jaw rotation)",
           "flame2020": "generic_model.pkl (FLAME 2020)"}
  raise InputError(
      f"--format {format_name}: {reader} expects {expected}, but this fit was made with "
      f"{recorded!r}; coefficients are not converted between releases. Fit again with "
      f"--flame_model {files.get(expected, expected)}"
      + (" and --flame_variant to say which release it is" if recorded == "unknown" else "")
      + ".")


def padded(values, count: int, name: str, notes: List[str]) -> np.ndarray:
  """(..., k) -> (..., count) float32 with zeros after the fitted k (k <= count); the padding is
  recorded in `notes`."""
  values = np.asarray(values, np.float32)
  fitted = values.shape[-1]
  if fitted > count:
    raise InputError(f"{fitted} {name} coefficients, more than the {count} the format holds.")
  if fitted < count:
    notes.append(f"{name}: {fitted} fitted coefficients padded with zeros to {count}.")
  return np.concatenate([values, np.zeros(values.shape[:-1] + (count - fitted,), np.float32)],
                        axis=-1)


def write_npz(path: Path, arrays: dict) -> None:
  with atomic.atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


def write_json(path: Path, value) -> None:
  atomic.write_text(path, json.dumps(value, indent=2) + "\n")


def write_image(path: Path, rgb: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path) as tmp:
    if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
      raise InputError(f"cannot write {path}.")


def write_gray(path: Path, values: np.ndarray) -> None:
  """A one-channel uint8 PNG (a mask), atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path) as tmp:
    if not cv2.imwrite(str(tmp), np.ascontiguousarray(values, np.uint8)):
      raise InputError(f"cannot write {path}.")


def write_readme(folder: Path, title: str, lines: List[str], warnings: List[str]) -> None:
  """README.md beside an export: what it holds, and every warning first."""
  text = [f"# {title}", ""]
  if warnings:
    text += ["## Warnings", ""] + [f"- {warning}" for warning in warnings] + [""]
  text += lines
  atomic.write_text(folder / README_NAME, "\n".join(text) + "\n")
