"""One id per input by construction (issue 23): names that sanitise alike, Unicode and case
twins and 255-byte names each get their own row and picture through jflame-fit and
jflame-annotate, first run and rerun; one folder typed three ways is one dataset; results
whose source is gone are counted; the store refuses to file a result under another source's
id; folders of the older naming are refused or retired, never mixed."""

import json
import os
import re
import subprocess
import sys
import unicodedata

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data

from jflame import dataset, manifest, sinks, sources
from jflame.errors import ConfigError, IdConflictError
from tests.conftest import PROJECT_ROOT, QUICK_FLAGS

# Relative paths of inputs whose old names collided or that file systems treat alike.
HOSTILE = ("new\nline.jpg", "new_line.jpg", "sub/x.jpg", "sub__x.jpg",
           unicodedata.normalize("NFC", "caf\u00e9.jpg"),
           unicodedata.normalize("NFD", "caf\u00e9.jpg"), "Face.jpg", "face.jpg",
           "l" * 251 + ".jpg")


def _hostile_folder(root):
  """Each input a different picture of the astronaut (its own width), so a row or picture
  attached to another input shows."""
  photos = root / "photos"
  for number, relpath in enumerate(HOSTILE):
    path = photos / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    width = 200 + 8 * number
    image = cv2.resize(skimage.data.astronaut(), (width, width), interpolation=cv2.INTER_AREA)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), path
  return photos


def _width(relpath):
  return 200 + 8 * HOSTILE.index(relpath)


def _command(module, args, env, cwd=PROJECT_ROOT):
  return subprocess.run([sys.executable, "-m", f"jflame.cli.{module}", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=900)


def test_ids_are_distinct_plain_file_names_for_every_hostile_name(tmp_path):
  photos = _hostile_folder(tmp_path)
  found = sources.list_sources([str(photos)], recursive=True)
  assert sorted(s.relpath for s in found) == sorted(HOSTILE)
  ids = [s.name for s in found]
  assert len(set(ids)) == len(HOSTILE)
  assert len({i.lower() for i in ids}) == len(HOSTILE)  # also on case-insensitive disks
  assert len({unicodedata.normalize("NFC", i) for i in ids}) == len(HOSTILE)
  for source in found:
    assert re.fullmatch(r".+~[0-9a-f]{8}", source.name)
    assert "/" not in source.name and "\n" not in source.name
    assert not source.name.startswith(".")
    assert len(f"{source.name}_overlay.png".encode()) <= 255
    assert source.path == photos.resolve() / source.relpath
  # The id depends on the file alone: not on the order of the inputs, nor on which folder
  # above it is the input.
  again = sources.list_sources([str(photos / "sub"), str(photos)], recursive=True)
  assert {s.path: s.name for s in again} == {s.path: s.name for s in found}


def test_one_folder_typed_three_ways_is_one_set_of_sources(tmp_path, monkeypatch):
  photos = _hostile_folder(tmp_path)
  (tmp_path / "link").symlink_to(photos, target_is_directory=True)
  monkeypatch.chdir(tmp_path)
  spellings = ("photos", str(photos.resolve()), "link/", "./link/../photos")
  found = [{s.name: (s.path, s.relpath) for s in sources.list_sources([typed], True)}
           for typed in spellings]
  assert all(each == found[0] for each in found[1:])
  # Given together they are still one source each.
  assert len(sources.list_sources(list(spellings), True)) == len(HOSTILE)


@pytest.mark.slow
def test_jflame_fit_gives_each_hostile_input_its_own_result_first_run_and_rerun(
    tmp_path, command_env):
  photos = _hostile_folder(tmp_path)
  out = tmp_path / "out"
  args = ["--input", str(photos), "--output", str(out), "--recursive", "--batch_size", "4",
          "--mesh_format", "", *QUICK_FLAGS]
  first = _command("fit", args, command_env)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = manifest.read_entries(out)
  assert sorted(e["source_relpath"] for e in entries.values()) == sorted(HOSTILE)
  for name, entry in entries.items():
    assert entry["status"] == "ok", entry
    with np.load(out / f"{name}.npz") as result:
      assert str(result["source_relpath"]) == entry["source_relpath"]
    overlay = cv2.imread(str(out / f"{name}_overlay.png"))
    assert overlay.shape[1] == _width(entry["source_relpath"])  # its own photo's picture
  assert "'ok': 9" in first.stdout
  again = _command("fit", args, command_env)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((out / manifest.SUMMARY_NAME).read_text())
  assert summary["this_run"] == {"skipped": len(HOSTILE)}
  assert manifest.read_entries(out) == entries


def _done_counts(stdout):
  """The dataset counts the done line states."""
  line = next(line for line in stdout.splitlines() if line.startswith("done:"))
  return eval(line.split("the dataset holds ")[1].split(" -> ")[0])  # pylint: disable=eval-used


@pytest.mark.slow
def test_jflame_annotate_one_row_per_hostile_input_three_spellings_and_gone_sources(
    tmp_path, command_env):
  photos = _hostile_folder(tmp_path)
  (tmp_path / "link").symlink_to(photos, target_is_directory=True)
  out = tmp_path / "out"
  common = ["--output", str(out), "--batch_size", "4", "--workers", "1", "--overlays", "all",
            "--noreport", *QUICK_FLAGS]
  first = _command("annotate", ["--input", "photos", *common], command_env, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = dataset.open(out).to_table().to_pylist()
  assert sorted(row["source_relpath"] for row in rows) == sorted(HOSTILE)
  assert len({row["id"] for row in rows}) == len(rows) == len(HOSTILE)
  assert _done_counts(first.stdout) == {"ok": len(rows)}
  pictures = set()
  for row in rows:
    assert row["status"] == "ok" and row["image_width"] == _width(row["source_relpath"])
    assert row["source_path"] == str(photos.resolve() / row["source_relpath"])
    picture = next(f for f in row["files"] if f.endswith("_overlay.png"))
    assert cv2.imread(str(out / picture)).shape[1] == row["image_width"]
    pictures.add(picture)
  assert len(pictures) == len(HOSTILE)
  # The same folder typed as an absolute path and through a link: nothing is refitted.
  for typed in (str(photos.resolve()), str(tmp_path / "link")):
    again = _command("annotate", ["--input", typed, *common], command_env)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / manifest.SUMMARY_NAME).read_text())
    assert summary["this_run"] == {"skipped": len(HOSTILE)}, typed
    assert summary["source_missing"] == {"count": 0, "ids": []}
  assert dataset.open(out).to_table().to_pylist() == rows
  # A deleted input keeps its row, and the run counts and names it.
  gone = next(row for row in rows if row["source_relpath"] == "sub/x.jpg")
  (photos / "sub" / "x.jpg").unlink()
  after = _command("annotate", ["--input", "photos", *common], command_env, cwd=tmp_path)
  assert after.returncode == 0, after.stderr[-3000:]
  summary = json.loads((out / manifest.SUMMARY_NAME).read_text())
  assert summary["source_missing"] == {"count": 1, "ids": [gone["id"]]}
  assert "1 earlier result(s) whose source file is gone" in after.stdout
  assert _done_counts(after.stdout) == {"ok": len(HOSTILE)} == {
      "ok": dataset.open(out).count_rows()}


def _row(relpath, root="/data"):
  path = f"{root}/{relpath}"
  return dataset.row_of(dict(name=sources.source_id(path), source=path,
                             source_relpath=relpath, status="no_face", message="none"), None)


def test_the_store_refuses_a_row_under_another_sources_id(tmp_path):
  writer = dataset.ShardWriter(tmp_path, dict(model="test"))
  writer.add([_row("a.jpg")])
  writer.commit()
  intruder = dict(_row("b.jpg"), id=_row("a.jpg")["id"])
  writer.add([_row("c.jpg"), intruder])
  with pytest.raises(IdConflictError, match="belongs to /data/a.jpg"):
    writer.commit()
  twice = dataset.ShardWriter(tmp_path, dict(model="test"))
  twice.add([_row("d.jpg"), dict(_row("e.jpg"), id=_row("d.jpg")["id"])])
  with pytest.raises(IdConflictError):
    twice.commit()
  assert dataset.open(tmp_path).to_table().column("source_relpath").to_pylist() == ["a.jpg"]
  # The same source refitted replaces its row.
  writer = dataset.ShardWriter(tmp_path, dict(model="test"))
  writer.add([_row("a.jpg")])
  writer.commit()
  assert dataset.open(tmp_path).count_rows() == 1


def _format_1_folder(folder):
  """A dataset as jflame wrote it before ids carried a path hash: index version 1, shards
  without `source_relpath`, sources as typed."""
  old_schema = pa.schema([field for field in dataset.SCHEMA if field.name != "source_relpath"])
  rows = [dict(id=name, row_uid=f"old/shard-000001.parquet#{i}", source_path=f"photos/{name}",
               status="ok", message="") for i, name in enumerate(("a.jpg", "new_line.jpg"))]
  (folder / dataset.SHARD_FOLDER).mkdir(parents=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=old_schema),
                 folder / dataset.SHARD_FOLDER / "shard-000001.parquet")
  index = dict(format=dataset.FORMAT_NAME, version=1, settings=dict(model="test"),
               dataset_id="0" * 32, shards=[dict(name="shard-000001.parquet", rows=2)])
  (folder / dataset.INDEX_NAME).write_text(json.dumps(index))


def test_a_format_1_dataset_reads_is_refused_for_writing_and_retired_on_overwrite(tmp_path):
  _format_1_folder(tmp_path)
  old = dataset.open(tmp_path).to_table().to_pylist()
  assert [row["id"] for row in old] == ["a.jpg", "new_line.jpg"]
  assert {row["source_relpath"] for row in old} == {None}
  with pytest.raises(ConfigError, match="older jflame .*--overwrite"):
    dataset.ShardWriter(tmp_path, dict(model="test"))
  writer = dataset.ShardWriter(tmp_path, dict(model="test"), retire_older_format=True)
  assert writer.committed_sources() == {}  # every input is refitted
  writer.add([_row("a.jpg")])
  writer.commit()
  assert dataset.open(tmp_path).to_table().column("source_relpath").to_pylist() == ["a.jpg"]
  index = dataset.read_index(tmp_path)
  assert index["version"] == dataset.FORMAT_VERSION and index["shards"][0]["retired"]
  dataset.ShardWriter(tmp_path, dict(model="test"))  # now an ordinary current folder


def test_a_results_folder_of_the_older_naming_is_refused_or_retired(tmp_path, loaded_model):
  (tmp_path / "a.jpg.npz").write_bytes(b"old result")
  (tmp_path / "a.jpg_overlay.png").write_bytes(b"old picture")
  manifest.append_entries(tmp_path, [dict(name="a.jpg", status="ok", source="photos/a.jpg",
                                          files=["a.jpg.npz", "a.jpg_overlay.png"])])
  faces = loaded_model.model.faces
  with pytest.raises(ConfigError, match="1 results named by an older jflame"):
    sinks.FilesSink(tmp_path, faces, "test")
  sink = sinks.FilesSink(tmp_path, faces, "test", retire_older_names=True)
  assert sink.committed() == {}
  sink.write([])
  assert not (tmp_path / "a.jpg.npz").exists() and not (tmp_path / "a.jpg_overlay.png").exists()
  assert manifest.read_entries(tmp_path) == {}
  sinks.FilesSink(tmp_path, faces, "test")  # nothing older left
  assert os.listdir(tmp_path) == [manifest.MANIFEST_NAME]
