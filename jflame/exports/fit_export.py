"""The export jobs of fitted photos (host side): a jflame-fit result folder or a jflame-annotate
dataset read back as one record per ok fit, each written in the format's layout."""

import dataclasses
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional

import jax.numpy as jnp
import numpy as np
import pyarrow.dataset as pads

from jflame import atomic, dataset, manifest, output
from jflame.errors import InputError
from jflame.exports import common, now
from jflame.flame import PARAMETER_NAMES, FlameModel, FlameParams
from jflame.landmarks import LandmarkEmbedding


@dataclasses.dataclass(frozen=True)
class FittedPhoto:
  """One ok fit: its unique name, its path under its input root, its model's name and its
  FLAME parameters (NumPy)."""
  name: str
  relpath: str
  model: str
  params: Dict[str, np.ndarray]


def _from_fit_folder(folder: Path) -> List[FittedPhoto]:
  fitted = []
  for name, entry in manifest.read_entries(folder).items():
    if entry.get("status") != "ok":
      continue
    npz = [file for file in entry.get("files", []) if file.endswith(".npz")]
    if not npz or not (folder / npz[0]).is_file():
      raise InputError(f"{folder}: the result {name} has no parameters file; run jflame-fit "
                       "again to finish the folder.")
    with np.load(folder / npz[0], allow_pickle=False) as arrays:
      fitted.append(FittedPhoto(name, str(entry.get("source_relpath") or name),
                                str(arrays["model"]),
                                {key: np.asarray(arrays[key]) for key in PARAMETER_NAMES}))
  return fitted


def _from_dataset(folder: Path) -> List[FittedPhoto]:
  model = str((dataset.read_index(folder) or {}).get("settings", {}).get("model", ""))
  rows = dataset.open(folder).to_table(
      columns=["id", "source_relpath", *PARAMETER_NAMES],
      filter=pads.field("status") == "ok").to_pylist()
  return [FittedPhoto(row["id"], row["source_relpath"] or row["id"], model,
                      {key: np.asarray(row[key], np.float32) for key in PARAMETER_NAMES})
          for row in rows]


def read_fitted_photos(folder) -> List[FittedPhoto]:
  """The ok fits of a jflame-fit folder (manifest.jsonl) or a jflame-annotate dataset
  (index.json); InputError when the folder is neither."""
  folder = Path(folder)
  if (folder / "index.json").is_file():
    return _from_dataset(folder)
  if (folder / manifest.MANIFEST_NAME).is_file():
    return _from_fit_folder(folder)
  raise common.wrong_folder(folder, "now", "a jflame-fit result folder or a jflame-annotate "
                           "dataset")


def _target(relpath: str) -> Optional[PurePosixPath]:
  """The photo's path under its input root without its extension, when it is a safe relative
  path (no `..`, not absolute)."""
  path = PurePosixPath(relpath)
  if path.is_absolute() or ".." in path.parts or not path.name:
    return None
  return path.with_suffix("")


def export_now(photos: List[FittedPhoto], model: FlameModel, embedding: LandmarkEmbedding,
               output_folder: Path, fitted_face: bool,
               progress: Optional[Callable[[int], None]] = None) -> List[str]:
  """`now`: per photo `<relpath without extension>.obj` (millimetres, no vertex colours) and
  `.npy` (7, 3) in the same coordinates, the input's folder tree mirrored (NoW's
  subject/challenge/image layout). Returns the warnings."""
  if not photos:
    raise InputError("no ok fit in the folder; nothing to export.")
  warnings = []
  if model.is_synthetic:
    warnings.append("These meshes were fitted with jflame's SYNTHETIC head, not FLAME: the NoW "
                    "evaluation will run, but its figures say nothing about a face method.")
  for photo in photos:
    if photo.model != model.name:
      raise InputError(f"{photo.name} was fitted with the model {photo.model!r}, but the export "
                       f"loaded {model.name!r}: pass the same --flame_model (and --seed) as the "
                       "fit.")
  try:
    rows = jnp.asarray(now.embedding_rows(embedding))
  except ValueError as error:
    raise InputError(str(error)) from None
  targets = [_target(photo.relpath) for photo in photos]
  counts: Dict[PurePosixPath, int] = {}
  for target in targets:
    counts[target] = counts.get(target, 0) + 1
  notes = []
  for photo, target in zip(photos, targets):
    if target is None or counts[target] > 1:
      notes.append(f"{photo.relpath}: written as {photo.name} (its path "
                   f"{'is shared by another input' if target else 'is not a relative path'}).")
      target = PurePosixPath(photo.name)
    params = FlameParams(**{key: jnp.asarray(value, jnp.float32)
                            for key, value in photo.params.items()})
    if not fitted_face:
      params = now.neutral(params)
    vertices, points = now.mesh_and_points(model, embedding, params, rows)
    scale = now.MILLIMETRES_PER_METRE
    mesh_path = output_folder / f"{target}.obj"
    mesh_path.parent.mkdir(parents=True, exist_ok=True)
    output.save_mesh(mesh_path, np.asarray(vertices, np.float64) * scale, model.faces)
    with atomic.atomic_path(output_folder / f"{target}.npy", suffix=".npy") as tmp:
      np.save(tmp, np.asarray(points, np.float64) * scale)
    if progress:
      progress(1)
  common.write_readme(output_folder, "NoW benchmark predictions (jflame-export)", [
      f"{len(photos)} photos: per photo `<path>.obj` (the FLAME mesh, millimetres, model space: "
      + ("the fitted face" if fitted_face else "the fitted identity with expression and pose "
         "zero, as NoW's scans are neutral")
      + ") and `<path>.npy` (7, 3), NoW's 7 points in the same coordinates (right eye outer and "
      "inner corner, left eye inner and outer corner, below the nose, right and left mouth "
      "corner). Paths mirror the photos' paths under their input folder.",
      "Evaluate with the NoW repository's `compute_error.py --predicted_mesh_folder <this "
      "folder>` (add `--predicted_mesh_unit mm` for its metrical protocol).", ""]
      + [f"- {note}" for note in notes], warnings)
  return warnings
