"""A jflame dataset folder: one row per input in Parquet shards, committed atomically.

    rows = jflame.dataset.open("annotations/")               # a pyarrow dataset
    good = rows.to_table(filter=(pc.field("status") == "ok") & ~pc.field("suspect"))
    mesh = jflame.dataset.vertices(good.slice(0, 1).to_pylist()[0], model)

Layout (docs/FORMAT.md documents every column; FORMAT_VERSION below):

    <folder>/index.json                  the committed shards, the settings, the format version
    <folder>/shards/shard-000001.parquet  rows (at most rows_per_shard each)
    <folder>/meshes/, pictures/          optional per-image files
    <folder>/run_summary.json, report.html

A shard is written under a temporary name, flushed to disk, renamed, and only then listed in
index.json (itself replaced atomically): a shard not in the index does not exist, so a kill at
any moment loses at most the rows not yet committed, and a rerun redoes exactly those. A row
whose source changed is refitted; the new row supersedes the old one, which the index lists and
`open` filters out, so every input has exactly one current row.
"""

import datetime
import json
import uuid
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from jflame import flame
from jflame.atomic import atomic_path, write_text
from jflame.errors import ConfigError, IdConflictError, InputError

FORMAT_NAME = "jflame-dataset"
# 2: ids carry a hash of the source's absolute path and never collide; `source_path` is that
# absolute path and `source_relpath` the path under the input root. Format 1 stays readable; a
# run that continues a format-1 folder must be asked to refit it (`retire_older_format`).
FORMAT_VERSION = 2
INDEX_NAME = "index.json"
SHARD_FOLDER = "shards"

_F32_LIST = pa.list_(pa.float32())
_F64_LIST = pa.list_(pa.float64())
FLAME_PARAMETERS = flame.PARAMETER_NAMES
_CAMERA_LISTS = ("rotation", "translation", "principal_point")
_LANDMARK_COLUMNS = ("landmarks_detected", "landmarks_fitted", "landmarks_detected_original",
                     "landmarks_fitted_original")

SCHEMA = pa.schema(
    [("id", pa.string()), ("row_uid", pa.string()), ("source_path", pa.string()),
     ("source_relpath", pa.string()),
     ("source_size", pa.int64()), ("source_mtime_ns", pa.int64()), ("source_hash", pa.string()),
     ("status", pa.string()), ("message", pa.string()), ("num_faces", pa.int32()),
     ("image_width", pa.int32()), ("image_height", pa.int32()), ("mode", pa.string()),
     ("crop_size", pa.int32())]
    + [(name, _F32_LIST) for name in FLAME_PARAMETERS]
    + [(f"{frame}camera_{key}", _F32_LIST) for frame in ("", "original_")
       for key in _CAMERA_LISTS]
    + [("camera_focal_length", pa.float32()), ("original_camera_focal_length", pa.float32()),
       ("crop_from_original", _F64_LIST)]
    + [(name, _F64_LIST if name.endswith("original") else _F32_LIST)
       for name in _LANDMARK_COLUMNS]
    + [("landmark_error_px", pa.float32()), ("landmark_error_relative", pa.float32()),
       ("shape_prior_sigma", pa.float32()), ("expression_prior_sigma", pa.float32()),
       ("convergence", pa.float32()), ("suspect", pa.bool_()), ("suspect_reason", pa.string()),
       ("rigid_final_loss", pa.float32()), ("full_final_loss", pa.float32()),
       ("texture", _F32_LIST), ("sh_lighting", _F32_LIST), ("photometric_error", pa.float32()),
       ("fit_ms", pa.float32()), ("files", pa.list_(pa.string())),
       ("written_at", pa.timestamp("ms", tz="UTC"))])

# What a rerun reads to decide what is left to do.
_KEY_COLUMNS = ("id", "row_uid", "source_path", "source_size", "source_mtime_ns",
                "source_hash", "status")


def _flat(value, dtype=np.float32) -> Optional[list]:
  return None if value is None else np.asarray(value, dtype).reshape(-1).tolist()


def row_of(entry: Mapping, arrays: Optional[Mapping], files: Sequence[str] = ()) -> dict:
  """One table row from an engine entry and, for a successful fit, its result record."""
  row = dict(id=entry["name"], source_path=entry.get("source"),
             source_relpath=entry.get("source_relpath"),
             source_size=entry.get("source_size"), source_mtime_ns=entry.get("source_mtime_ns"),
             source_hash=entry.get("source_hash"), status=entry["status"],
             message=entry.get("message", ""), num_faces=entry.get("num_faces"),
             image_width=entry.get("image_width"), image_height=entry.get("image_height"),
             fit_ms=entry.get("fit_ms"), files=list(files))
  if arrays is None:
    return row
  row.update(mode=str(arrays["mode"]), crop_size=int(arrays["crop_size"]),
             crop_from_original=_flat(arrays["crop_from_original"], np.float64))
  for name in FLAME_PARAMETERS:
    row[name] = _flat(arrays[name])
  for frame in ("", "original_"):
    for key in _CAMERA_LISTS:
      row[f"{frame}camera_{key}"] = _flat(arrays[f"{frame}camera_{key}"])
    row[f"{frame}camera_focal_length"] = float(arrays[f"{frame}camera_focal_length"])
  for name in _LANDMARK_COLUMNS:
    row[name] = _flat(arrays[name], np.float64 if name.endswith("original") else np.float32)
  for name in ("landmark_error_px", "landmark_error_relative", "shape_prior_sigma",
               "expression_prior_sigma", "convergence", "suspect", "suspect_reason"):
    row[name] = arrays[name] if name in arrays else entry.get(name)
  row["rigid_final_loss"] = float(np.asarray(arrays["rigid_loss_history"])[-1]) if np.size(
      arrays["rigid_loss_history"]) else None
  row["full_final_loss"] = float(np.asarray(arrays["full_loss_history"])[-1]) if np.size(
      arrays["full_loss_history"]) else None
  if "texture" in arrays:
    row.update(texture=_flat(arrays["texture"]), sh_lighting=_flat(arrays["sh_lighting"]),
               photometric_error=float(arrays["photometric_error"]))
  return row


def _settings_json(settings: Mapping) -> str:
  return json.dumps(settings, sort_keys=True, default=str)


def read_index(folder) -> Optional[dict]:
  path = Path(folder) / INDEX_NAME
  if not path.is_file():
    return None
  try:
    index = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise InputError(f"{path}: unreadable dataset index ({error}).") from None
  if index.get("format") != FORMAT_NAME:
    raise InputError(f"{path} is not a jflame dataset index.")
  if index.get("version", 0) > FORMAT_VERSION:
    raise InputError(f"{path}: dataset format version {index['version']} is newer than this "
                     f"jflame reads ({FORMAT_VERSION}); upgrade jflame.")
  return index


class ShardWriter:
  """Buffers rows and commits them as Parquet shards listed in the folder's index.

  Args:
    folder: the dataset folder (the caller holds its lock).
    settings: JSON-able description of what produced the rows. A folder whose index records
      other settings is refused (ConfigError): one dataset, one set of settings.
    rows_per_shard: rows per shard; a shard is committed when it is full and at `commit`.
    retire_older_format: continue a folder written in an older format by retiring its shards
      (their rows stop being current at the first commit, so every input is refitted);
      without it such a folder is refused (ConfigError).
  """

  def __init__(self, folder, settings: Mapping, rows_per_shard: int = 1000,
               retire_older_format: bool = False):
    self.folder = Path(folder)
    self.rows_per_shard = max(int(rows_per_shard), 1)
    self.settings = json.loads(_settings_json(settings))
    index = read_index(self.folder)
    self._retiring = []
    if index is None:
      index = dict(format=FORMAT_NAME, version=FORMAT_VERSION, settings=self.settings,
                   created=_now(), dataset_id=uuid.uuid4().hex, shards=[])
    elif _settings_json(index.get("settings", {})) != _settings_json(self.settings):
      raise ConfigError(
          f"{self.folder} holds a dataset made with other settings "
          f"({_settings_difference(index.get('settings', {}), self.settings)}); write to "
          "another --output, or rerun with the settings it was made with.")
    elif index.get("version", 1) < FORMAT_VERSION:
      self._retiring = [shard["name"] for shard in _current_shards(index)]
      if self._retiring and not retire_older_format:
        raise ConfigError(
            f"{self.folder} was written by an older jflame (dataset format "
            f"{index.get('version', 1)}), whose ids could name two photos alike. It stays "
            "readable (jflame.dataset.open); to continue it, rerun with --overwrite (its rows "
            "are replaced as the inputs are refitted under collision-free ids), or write to "
            "a new --output.")
    self.index = index
    self._remove_unlisted_shards()
    self._current = self._read_current()
    self._pending: List[dict] = []

  def _remove_unlisted_shards(self):
    listed = {shard["name"] for shard in self.index["shards"]}
    folder = self.folder / SHARD_FOLDER
    if folder.is_dir():
      for path in folder.glob("shard-*.parquet"):
        if path.name not in listed:
          path.unlink()  # renamed by a killed run before the index listed it: never committed

  def _shard_paths(self) -> List[Path]:
    return [self.folder / SHARD_FOLDER / shard["name"] for shard in _current_shards(self.index)
            if shard["name"] not in self._retiring]

  def _superseded(self) -> set:
    return {uid for shard in self.index["shards"] for uid in shard.get("supersedes", [])}

  def _read_current(self) -> Dict[str, dict]:
    """id -> key columns of its current row."""
    paths = self._shard_paths()
    if not paths:
      return {}
    table = pads.dataset([str(p) for p in paths], format="parquet",
                         schema=SCHEMA).to_table(columns=list(_KEY_COLUMNS))
    superseded = self._superseded()
    current = {}
    for row in table.to_pylist():
      if row["row_uid"] not in superseded:
        current[row["id"]] = row
    return current

  def committed_sources(self) -> Dict[str, dict]:
    """id -> entry in the engine's vocabulary (name, source, size, mtime, hash, status)."""
    return {key: dict(name=key, source=row["source_path"], source_size=row["source_size"],
                      source_mtime_ns=row["source_mtime_ns"], source_hash=row["source_hash"],
                      status=row["status"]) for key, row in self._current.items()}

  def add(self, rows: Sequence[dict]) -> None:
    self._pending.extend(rows)
    while len(self._pending) >= self.rows_per_shard:
      self._commit(self._pending[:self.rows_per_shard])
      self._pending = self._pending[self.rows_per_shard:]

  def commit(self) -> None:
    if self._pending:
      self._commit(self._pending)
      self._pending = []
    elif not (self.folder / INDEX_NAME).is_file():
      # A run with nothing to write (a split run's part that no input hashed to) still leaves
      # a dataset, empty: readers and the split run's whole report find every part.
      write_text(self.folder / INDEX_NAME, json.dumps(self.index, indent=1) + "\n",
                 durable=True)

  def _check_ids(self, rows: Sequence[dict]) -> None:
    """A row may replace only a row of the same source, and an id appears once per commit:
    the store never attaches a result to another photo, whatever produced the ids."""
    batch = {}
    for row in rows:
      previous = batch.get(row["id"]) or self._current.get(row["id"])
      if previous is not None and previous["source_path"] != row["source_path"]:
        raise IdConflictError(
            f"{self.folder}: id {row['id']!r} belongs to {previous['source_path']}; refusing to "
            f"record {row['source_path']} under it. Nothing of this batch was committed; "
            "please report this with both paths.")
      if row["id"] in batch:
        raise IdConflictError(f"{self.folder}: id {row['id']!r} twice in one commit "
                              f"({row['source_path']}); nothing of this batch was committed.")
      batch[row["id"]] = row

  def _commit(self, rows: List[dict]) -> None:
    self._check_ids(rows)
    number = 1 + max([int(s["name"][6:12]) for s in self.index["shards"]], default=0)
    name = f"shard-{number:06d}.parquet"
    written_at = datetime.datetime.now(datetime.timezone.utc)
    supersedes = []
    for position, row in enumerate(rows):
      # Unique across the parts of a split run too: each part has its own dataset_id.
      row["row_uid"] = f"{self.index['dataset_id'][:12]}/{name}#{position}"
      row["written_at"] = written_at
      previous = self._current.get(row["id"])
      if previous is not None:
        supersedes.append(previous["row_uid"])
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.replace_schema_metadata({b"jflame_format_version": str(FORMAT_VERSION)})
    path = self.folder / SHARD_FOLDER / name
    with atomic_path(path, durable=True) as tmp:
      pq.write_table(table, tmp, compression="zstd")
    shard = dict(name=name, rows=len(rows), created=written_at.isoformat())
    if supersedes:
      shard["supersedes"] = supersedes
    self.index["shards"].append(shard)
    if self._retiring:  # the first commit into an older-format folder: its rows stop counting
      for old in self.index["shards"]:
        if old["name"] in self._retiring:
          old["retired"] = True
      self._retiring = []
    self.index["version"] = FORMAT_VERSION
    write_text(self.folder / INDEX_NAME, json.dumps(self.index, indent=1) + "\n", durable=True)
    for row in rows:
      self._current[row["id"]] = {key: row.get(key) for key in _KEY_COLUMNS}

  def status_counts(self) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for row in self._current.values():
      counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts

  def shard_names(self) -> List[str]:
    return [shard["name"] for shard in self.index["shards"]]


def _settings_difference(old: Mapping, new: Mapping, prefix: str = "") -> str:
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        return _settings_difference(a, b, f"{prefix}{key}.")
      return f"{prefix}{key}: {a!r} there, {b!r} now"
  return "none"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _current_shards(index: Mapping) -> List[dict]:
  """The shards of an index whose rows can be current (not retired by a format upgrade)."""
  return [shard for shard in index["shards"] if not shard.get("retired")]


def dataset_folders(folder) -> List[Path]:
  """The dataset folders under `folder`: itself, or the parts a split run wrote
  (part-<index>-of-<count>, see jflame-annotate --num_shards)."""
  folder = Path(folder)
  if (folder / INDEX_NAME).is_file():
    return [folder]
  return sorted(part.parent for part in folder.glob(f"part-*-of-*/{INDEX_NAME}"))


def open(folder) -> pads.Dataset:  # pylint: disable=redefined-builtin
  """The current rows of a dataset folder (or of all the parts of a split run) as a pyarrow
  dataset: one row per input.

  Raises:
    InputError: the folder holds no jflame dataset.
  """
  folders = dataset_folders(folder)
  if not folders:
    raise InputError(f"{folder}: no {INDEX_NAME}; not a jflame dataset folder.")
  paths, superseded = [], []
  for part in folders:
    index = read_index(part)
    paths += [str(part / SHARD_FOLDER / shard["name"]) for shard in _current_shards(index)]
    superseded += [uid for shard in index["shards"] for uid in shard.get("supersedes", [])]
  rows = pads.dataset(paths, format="parquet", schema=SCHEMA)
  if superseded:
    rows = rows.filter(~pc.field("row_uid").isin(superseded))
  return rows


def settings(folder) -> dict:
  """The settings a dataset folder was made with (model, mode, fit settings, landmarks)."""
  folders = dataset_folders(folder)
  if not folders:
    raise InputError(f"{folder}: no {INDEX_NAME}; not a jflame dataset folder.")
  return read_index(folders[0])["settings"]


def flame_params(row: Mapping):
  """The FlameParams of one row (a dict from `Table.to_pylist()` or any mapping of columns)."""
  import jax.numpy as jnp
  if row.get("status") != "ok":
    raise ValueError(f"row {row.get('id')!r} has status {row.get('status')!r}: no fit to rebuild")
  return flame.FlameParams(**{name: jnp.asarray(row[name], jnp.float32) for name in FLAME_PARAMETERS})


def vertices(row: Mapping, model) -> np.ndarray:
  """(V, 3) the fitted mesh of one row in FLAME model space (metres), rebuilt with `model`
  (the FlameModel the dataset was made with; see `settings(folder)["model"]`)."""
  return np.asarray(flame.flame_forward(model, flame_params(row))[0])

