"""The run manifest of a results folder: one JSON line per image, appended and flushed batch by
batch while the run goes, so a killed run keeps the record of everything it finished.

`manifest.jsonl` is the record: a later line for the same name replaces an earlier one (a
refitted photo). `run_summary.json` is written from it at the end of every run: the entries of
all runs so far (a rerun that had nothing to do still lists every earlier status), this run's
counts, timings and settings.
"""

import json
from pathlib import Path
from typing import Dict, Iterable, Mapping

import numpy as np

from jflame.atomic import write_text

MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "run_summary.json"
# The entry that ends an older jflame's result (named in a way that could collide) once a
# rerun has removed its files; `read_entries` leaves it out.
STATUS_RETIRED = "retired"


def json_default(value):
  """JSON for the NumPy scalars/arrays and paths that entries carry."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, Path):
    return str(value)
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_entries(folder) -> Dict[str, dict]:
  """name -> latest entry of `folder`'s manifest ({} when there is none). A torn last line (a
  kill in the middle of a write) is ignored."""
  path = Path(folder) / MANIFEST_NAME
  entries: Dict[str, dict] = {}
  if not path.is_file():
    return entries
  with open(path, "r", encoding="utf-8") as lines:
    for line in lines:
      try:
        entry = json.loads(line)
      except ValueError:
        continue
      if isinstance(entry, dict) and "name" in entry:
        entries[entry["name"]] = entry
  return {name: entry for name, entry in entries.items()
          if entry.get("status") != STATUS_RETIRED}


def is_older_entry(entry: Mapping) -> bool:
  """Whether an entry was written by a jflame whose names could collide (before every entry
  recorded `source_relpath`)."""
  return "source_relpath" not in entry


def append_entries(folder, entries: Iterable[Mapping]) -> None:
  """Appends entries as JSON lines and flushes them to the file system."""
  text = "".join(json.dumps(dict(entry), default=json_default) + "\n" for entry in entries)
  if not text:
    return
  with open(Path(folder) / MANIFEST_NAME, "a", encoding="utf-8") as stream:
    stream.write(text)
    stream.flush()


def write_json(path, data: Mapping) -> Path:
  """Writes a JSON document (NumPy values allowed) atomically; returns its path."""
  write_text(path, json.dumps(dict(data), indent=2, default=json_default) + "\n")
  return Path(path)


def write_summary(folder, summary: Mapping) -> Path:
  """Writes run_summary.json atomically; returns its path."""
  return write_json(Path(folder) / SUMMARY_NAME, summary)


def count_statuses(entries: Iterable[Mapping]) -> Dict[str, int]:
  counts: Dict[str, int] = {}
  for entry in entries:
    counts[entry["status"]] = counts.get(entry["status"], 0) + 1
  return counts
