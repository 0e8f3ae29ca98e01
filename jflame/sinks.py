"""Where the engine's results go: the `Sink` interface and its implementations.

* `FilesSink` (jflame-fit): per image `<name>.npz` (parameters, cameras, landmarks, source,
  quality), a mesh and pictures, and the folder's `manifest.jsonl` appended batch by batch;
  `run_summary.json` at the end.
* `DatasetSink` (jflame-annotate): rows in Parquet shards committed atomically (see
  `jflame.dataset`), optional meshes and pictures, the same manifest summary.
* `KeptResults` (`engine.fit_images`, tools): every fitted image kept in memory, in order.
"""

import dataclasses
import hashlib
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from jflame import dataset, manifest, output
from jflame.fitted_image import FittedImage
from jflame.errors import ConfigError

OVERLAY_POLICIES = ("none", "sample", "failures", "all")
SAMPLE_ONE_IN = 500


class Sink:
  """Where fitted images go. Called from the writer thread only (plus `committed` before the
  run starts and `close` after it ends)."""

  def committed(self) -> Mapping[str, Mapping]:
    """name -> entry of every image already finished in the output (with source facts)."""
    raise NotImplementedError

  def write(self, images: Sequence[FittedImage]) -> None:
    """Writes one batch of images; each is finished (durably recorded) on return or after the
    next `flush`."""
    raise NotImplementedError

  def flush(self) -> None:
    """Commits whatever `write` has buffered."""

  def close(self, summary: Mapping) -> None:
    """Ends the run: flushes and writes the run's summary."""


class KeptResults(Sink):
  """Keeps every fitted image in memory, in the order written (a library call's or a tool's
  sink: nothing is committed anywhere, so nothing is skipped)."""

  def __init__(self):
    self.images: List[FittedImage] = []
    self.summary: Dict = {}

  def committed(self) -> Mapping[str, Mapping]:
    return {}

  def write(self, images: Sequence[FittedImage]) -> None:
    self.images.extend(images)

  def close(self, summary: Mapping) -> None:
    self.summary = dict(summary)


def _entry_with_files(image: FittedImage, files: List[str]) -> dict:
  entry = dict(image.entry)
  if files:
    entry["files"] = files
  return entry


class FilesSink(Sink):
  """Per-image files in one folder (what `jflame-fit` writes).

  Args:
    folder: the output folder (claimed by `output_folder.claim_output_folder`).
    faces: (F, 3) the model's triangles, for meshes and pictures.
    model_name: written into mesh headers.
    mesh_format: "obj", "ply" or "" for none.
    pictures: write `<name>_overlay.png` (and `_compare.png` in photometric mode).
    retire_older_names: continue a folder whose results an older jflame named (names that
      could collide): their files are removed and their entries retired at the first write,
      so every input is refitted under its new name. Without it such a folder is refused.
  """

  def __init__(self, folder, faces, model_name: str, mesh_format: str = "obj",
               pictures: bool = True, retire_older_names: bool = False):
    self.folder = Path(folder)
    self.faces = np.asarray(faces)
    self.model_name, self.mesh_format, self.pictures = model_name, mesh_format, pictures
    self._entries = manifest.read_entries(self.folder)
    self._retiring = {name: entry for name, entry in self._entries.items()
                      if manifest.is_older_entry(entry)}
    if self._retiring and not retire_older_names:
      raise ConfigError(
          f"{self.folder} holds {len(self._retiring)} results named by an older jflame (names "
          "that could belong to two photos). Rerun with --overwrite to refit them under "
          "collision-free names (their old files are removed), or write to a new --output.")
    for name in self._retiring:
      del self._entries[name]

  def committed(self) -> Mapping[str, Mapping]:
    finished = {}
    for name, entry in self._entries.items():
      # An ok entry counts only while its parameters file is still there.
      if entry.get("status") != "ok" or (self.folder / f"{name}.npz").is_file():
        finished[name] = entry
    return finished

  def write(self, images: Sequence[FittedImage]) -> None:
    if self._retiring:
      self._retire_older()
    entries = []
    for image in images:
      entries.append(_entry_with_files(image, self._write_files(image) if image.ok else []))
    manifest.append_entries(self.folder, entries)
    for entry in entries:
      self._entries[entry["name"]] = entry

  def _write_files(self, image: FittedImage) -> List[str]:
    name = image.record.name
    files = []
    if self.mesh_format:
      mesh_path = self.folder / f"{name}.{self.mesh_format}"
      output.save_mesh(mesh_path, image.meshes.vertices, self.faces,
                       header=f"jflame fit of {image.entry['source']}; model: {self.model_name}")
      files.append(mesh_path.name)
    if self.pictures:
      files += output.write_pictures(self.folder, image.record, image.arrays, image.meshes,
                                     self.faces)
    # The parameters file goes last: its presence marks the result finished.
    output.save_parameters(self.folder / f"{name}.npz", image.arrays)
    return [f"{name}.npz"] + files

  def _retire_older(self) -> None:
    retired = []
    for name, entry in self._retiring.items():
      for file_name in entry.get("files", []):
        path = self.folder / Path(file_name).name  # only this folder's own files
        if path.is_file():
          path.unlink()
      retired.append(dict(name=name, status=manifest.STATUS_RETIRED))
    manifest.append_entries(self.folder, retired)
    self._retiring = {}

  def close(self, summary: Mapping) -> None:
    entries = list(self._entries.values())
    manifest.write_summary(self.folder, dict(summary, counts=manifest.count_statuses(entries),
                                             images=entries))


def wants_overlay(policy: str, name: str, ok: bool, suspect: bool) -> bool:
  """Whether a dataset row gets a picture: never, all, failures (failed or suspect fits), or
  a sample (about 1 in SAMPLE_ONE_IN, chosen by the name's hash so reruns pick the same ones)
  plus every suspect fit, the worst ones."""
  if policy == "none":
    return False
  if policy == "all":
    return True
  if policy == "failures":
    return not ok or suspect
  digest = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"),
                                          digest_size=4).digest(), "little")
  return suspect or digest % SAMPLE_ONE_IN == 0

def dataset_settings(loaded, config, crop_size, landmark_indices) -> dict:
  """What the rows of a dataset mean: one dataset folder, one set of these."""
  return dict(model=loaded.model.name, model_variant=loaded.model.variant,
              embedding=loaded.embedding.name, mode=config.mode.value,
              config=dataclasses.asdict(config), crop_size=crop_size,
              landmark_indices=[int(i) for i in landmark_indices])


class DatasetSink(Sink):
  """Rows in Parquet shards (what `jflame-annotate` writes), see `jflame.dataset`.

  Args:
    folder: the dataset folder (claimed).
    faces: (F, 3) the model's triangles.
    model_name: for mesh headers.
    settings: what produced the rows (model, variant, mode, fit settings); a folder holds
      rows of one set of settings only.
    rows_per_shard: rows buffered before a shard is committed.
    meshes: also write `meshes/<name>.obj` per fitted image.
    overlays: one of OVERLAY_POLICIES.
    retire_older_format: continue a folder of an older dataset format (`dataset.ShardWriter`).
  """

  def __init__(self, folder, faces, model_name: str, settings: Mapping,
               rows_per_shard: int = 1000, meshes: bool = False, overlays: str = "sample",
               retire_older_format: bool = False):
    if overlays not in OVERLAY_POLICIES:
      raise ValueError(f"overlays must be one of {OVERLAY_POLICIES}, got {overlays!r}")
    self.folder = Path(folder)
    self.faces = np.asarray(faces)
    self.model_name = model_name
    self.meshes, self.overlays = meshes, overlays
    self.writer = dataset.ShardWriter(self.folder, settings, rows_per_shard,
                                      retire_older_format=retire_older_format)

  def committed(self) -> Mapping[str, Mapping]:
    return self.writer.committed_sources()

  def write(self, images: Sequence[FittedImage]) -> None:
    rows = []
    for image in images:
      files = []
      if image.ok and self.meshes:
        path = self.folder / "meshes" / f"{image.record.name}.obj"
        output.save_mesh(path, image.meshes.vertices, self.faces,
                         header=f"jflame fit of {image.entry['source']}; model: "
                                f"{self.model_name}")
        files.append(f"meshes/{path.name}")
      if image.ok and wants_overlay(self.overlays, image.record.name, True,
                                    bool(image.entry.get("suspect"))):
        files += [f"pictures/{name}" for name in output.write_pictures(
            self.folder / "pictures", image.record, image.arrays, image.meshes, self.faces)]
      rows.append(dataset.row_of(image.entry, image.arrays, files))
    self.writer.add(rows)

  def flush(self) -> None:
    self.writer.commit()

  def close(self, summary: Mapping) -> None:
    self.writer.commit()
    counts = self.writer.status_counts()
    manifest.write_summary(self.folder, dict(summary, counts=counts,
                                             shards=self.writer.shard_names()))
