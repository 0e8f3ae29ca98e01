"""jflame-annotate and the dataset store: exactly one row per input whatever it is, atomic
shards that survive kills, resume that redoes only what changed, one run per folder, split
runs, and memory that stays flat."""

import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest
import skimage.data

from jflame import dataset, engine, output_folder, sinks, sources
from jflame.config import FitConfig
from jflame.errors import ConfigError
from tests.conftest import (HOLD_AFTER_FIRST_SHARD, PROJECT_ROOT, QUICK_FLAGS, by_relpath,
                            ended_by_interrupt)

QUICK = FitConfig(rigid_iterations=3, full_iterations=3)


def _write(path, rgb):
  path.parent.mkdir(parents=True, exist_ok=True)
  cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
  return path


def _face(scale=0.5):
  return cv2.resize(skimage.data.astronaut(), None, fx=scale, fy=scale,
                    interpolation=cv2.INTER_AREA)


def _annotate(loaded, inputs, out, config=QUICK, rows_per_shard=1000, batch_size=4):
  found = sources.iter_sources([str(i) for i in inputs], recursive=True, exclude_folder=out)
  with output_folder.claim_output_folder(out) as folder:
    run = engine.Engine(loaded, config, engine.EngineOptions(batch_size=batch_size))
    settings = sinks.dataset_settings(loaded, config, 256, run.landmark_indices)
    sink = sinks.DatasetSink(folder, loaded.model.faces, loaded.model.name, settings,
                             rows_per_shard=rows_per_shard, overlays="none")
    return run.run(found, sink)


def _rows(folder):
  """The current rows keyed by their source's path under the input root."""
  rows = dataset.open(folder).to_table().to_pylist()
  assert len({row["id"] for row in rows}) == len(rows)
  return by_relpath(rows)


def _relpaths(folder):
  return sorted(dataset.open(folder).to_table(columns=["source_relpath"]).column(
      "source_relpath").to_pylist())


def test_every_input_gets_exactly_one_row(loaded_model, tmp_path):
  photos = tmp_path / "photos"
  _write(photos / "face.png", _face())
  _write(photos / "a" / "same.png", _face(0.4))
  _write(photos / "b" / "same.png", _face(0.45)[:, ::-1])
  _write(photos / "tiny.png", np.full((8, 8, 3), 128, np.uint8))
  _write(photos / "coffee.png", skimage.data.coffee())
  _write(photos / "visage é 顔.png", _face(0.3))
  (photos / "empty.jpg").write_bytes(b"")
  (photos / "text.jpg").write_text("not an image at all")
  (photos / "truncated.png").write_bytes((photos / "face.png").read_bytes()[:3000])
  (photos / "broken.png").symlink_to(tmp_path / "nowhere.png")
  (photos / "loop").symlink_to(photos)  # a link loop in the input tree
  (photos / "self.jpg").symlink_to(photos / "self.jpg")
  summary = _annotate(loaded_model, [photos], tmp_path / "out", rows_per_shard=3)
  rows = _rows(tmp_path / "out")
  expected = {"face.png": "ok", "a/same.png": "ok", "b/same.png": "ok", "tiny.png": "no_face",
              "coffee.png": "no_face", "visage é 顔.png": "ok", "empty.jpg": "unreadable",
              "text.jpg": "unreadable", "truncated.png": "unreadable",
              "broken.png": "unreadable", "self.jpg": "unreadable"}
  assert {key: row["status"] for key, row in rows.items()} == expected
  assert dataset.open(tmp_path / "out").count_rows() == len(expected)
  assert summary["this_run"] == {"ok": 4, "no_face": 2, "unreadable": 5}
  face = rows["face.png"]
  assert len(face["shape"]) == QUICK.num_shape and face["source_size"] > 0
  assert 0 < face["landmark_error_relative"] < 0.2 and face["suspect"] in (True, False)
  assert rows["empty.jpg"]["message"] and rows["empty.jpg"]["shape"] is None
  # The mesh rebuilt from a row is the model evaluated at that row's parameters.
  vertices = dataset.vertices(face, loaded_model.model)
  assert vertices.shape == (loaded_model.model.num_vertices, 3)
  assert np.all(np.isfinite(vertices)) and np.ptp(vertices[:, 1]) > 0.1  # a head, in metres


def test_resume_redoes_only_a_changed_source_and_keeps_one_row(loaded_model, tmp_path):
  photos = tmp_path / "photos"
  for index in range(3):
    _write(photos / f"p{index}.png", _face(0.3 + 0.05 * index))
  out = tmp_path / "out"
  _annotate(loaded_model, [photos], out, rows_per_shard=2)
  shards = dataset.read_index(out)["shards"]
  assert [s["rows"] for s in shards] == [2, 1]
  again = _annotate(loaded_model, [photos], out)
  assert again["this_run"] == {"skipped": 3} and dataset.read_index(out)["shards"] == shards
  _write(photos / "p1.png", _face(0.42)[:, ::-1])
  third = _annotate(loaded_model, [photos], out)
  assert third["this_run"] == {"skipped": 2, "ok": 1}
  index = dataset.read_index(out)
  assert len(index["shards"]) == 3 and len(index["shards"][-1]["supersedes"]) == 1
  rows = _rows(out)
  assert len(rows) == 3 == dataset.open(out).count_rows()
  assert rows["p1.png"]["source_size"] == (photos / "p1.png").stat().st_size
  with pytest.raises(ConfigError, match="other settings"):
    _annotate(loaded_model, [photos], out, config=QUICK.replace(full_iterations=4))


def test_kills_at_any_moment_lose_only_uncommitted_rows(tmp_path, command_env):
  photos = tmp_path / "photos"
  for index in range(7):
    _write(photos / f"p{index}.png", _face(0.25 + 0.02 * index))
  (photos / "bad.jpg").write_bytes(b"junk")
  out = tmp_path / "out"
  args = [sys.executable, "-m", "jflame.cli.annotate", "--input", str(photos), "--output",
          str(out), "--batch_size", "1", "--rows_per_shard", "1", "--workers", "1",
          "--overlays", "none", *QUICK_FLAGS]
  for committed_before_kill in (1, 3):
    process = subprocess.Popen(args, cwd=PROJECT_ROOT, env=command_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
      index = dataset.read_index(out) if (out / "index.json").is_file() else None
      if index and len(index["shards"]) >= committed_before_kill:
        break
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows = dataset.open(out).to_table(columns=["id"]).column("id").to_pylist()
    assert len(rows) == len(set(rows)) >= committed_before_kill  # every shard reads
  # What a kill in the middle of a commit leaves: an unlisted shard and a temporary file.
  (out / "shards" / "shard-000999.parquet").write_bytes(b"half a shard")
  (out / "shards" / ".shard-001000.parquet.jflame-tmp-x.parquet").write_bytes(b"torn")
  done = subprocess.run(args, cwd=PROJECT_ROOT, env=command_env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  rows = dataset.open(out).to_table(columns=["source_relpath", "status"]).to_pylist()
  assert sorted(row["source_relpath"] for row in rows) == sorted(p.name for p in photos.iterdir())
  assert {row["status"] for row in rows if row["source_relpath"] != "bad.jpg"} == {"ok"}
  listed = {s["name"] for s in dataset.read_index(out)["shards"]}
  assert {p.name for p in (out / "shards").iterdir()} == listed


def test_ctrl_c_keeps_what_is_committed_and_says_how_to_finish(tmp_path, command_env):
  """SIGINT (Ctrl-C) in the middle: exit 130, one line on what is kept and how to go on, no
  traceback; every committed row reads, and the same command finishes the rest. The run's
  writer holds after its first committed shard until the run ends (conftest's
  HOLD_AFTER_FIRST_SHARD), so the signal arrives mid-run whatever the machine's load. (A named
  pipe among the inputs does not hold a run: a source that is not a regular file is refused
  unread, which is how a run survives one.)"""
  photos = tmp_path / "photos"
  for index in range(12):
    _write(photos / f"p{index:02d}.png", _face(0.25 + 0.01 * index))
  out = tmp_path / "out"
  flags = ["--input", str(photos), "--output", str(out), "--batch_size", "1",
           "--rows_per_shard", "1", "--workers", "1", "--overlays", "none", "--noreport",
           *QUICK_FLAGS]
  args = [sys.executable, "-m", "jflame.cli.annotate", *flags]
  process = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_SHARD, *flags],
                             cwd=PROJECT_ROOT, env=command_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    if (out / "index.json").is_file() and dataset.read_index(out)["shards"]:
      break
    time.sleep(0.02)
  assert process.poll() is None, "the run ended before it could be interrupted"
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert ended_by_interrupt(process.returncode), (process.returncode, stderr[-2000:])
  assert "Traceback" not in stderr
  assert "interrupted: every committed shard is kept in" in stderr
  kept = dataset.open(out).to_table(columns=["id"]).column("id").to_pylist()
  assert 1 <= len(kept) <= 12 and len(kept) == len(set(kept))
  _write(photos / "zz_new.png", _face(0.3))   # and one input more for the next run
  done = subprocess.run(args, cwd=PROJECT_ROOT, env=command_env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _relpaths(out) == sorted(p.name for p in photos.iterdir())
  summary = json.loads((out / "run_summary.json").read_text())
  assert summary["this_run"] == {"skipped": len(kept), "ok": 13 - len(kept)}


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path, command_env):
  _write(tmp_path / "photos" / "a.png", _face(0.25))
  with output_folder.claim_output_folder(tmp_path / "out"):
    done = subprocess.run([sys.executable, "-m", "jflame.cli.annotate", "--input",
                           str(tmp_path / "photos"), "--output", str(tmp_path / "out")],
                          cwd=PROJECT_ROOT, env=command_env, capture_output=True, text=True,
                          timeout=120)
  assert done.returncode == 2 and "another jflame run is writing" in done.stderr
  assert "Traceback" not in done.stderr


def test_split_runs_cover_every_input_once(tmp_path, command_env):
  photos = tmp_path / "photos"
  for index in range(4):
    _write(photos / f"p{index}.png", _face(0.25 + 0.02 * index))
  listing = tmp_path / "inputs.txt"
  listing.write_text("".join(f"photos/p{index}.png\n" for index in range(4)))
  out = tmp_path / "out"
  for part in range(2):
    done = subprocess.run(
        [sys.executable, "-m", "jflame.cli.annotate", "--input", str(listing), "--output",
         str(out), "--num_shards", "2", "--shard_index", str(part), "--workers", "1",
         "--overlays", "none", *QUICK_FLAGS], cwd=PROJECT_ROOT, env=command_env,
        capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr
    # The first part to finish names the command for the whole; the last one writes it.
    assert (f"jflame-report {out} writes" in done.stdout) == (part == 0), done.stdout
    assert (out / "report.html").is_file() == (part == 1)
  assert len(dataset.dataset_folders(out)) == 2
  assert "2 (a split run, all parts together)" in (out / "report.html").read_text()
  assert _relpaths(out) == [f"photos/p{index}.png" for index in range(4)]
  table = dataset.open(out).to_table(filter=pc.field("status") == "ok")
  assert table.num_rows == 4


def test_a_part_without_inputs_is_an_empty_dataset_that_counts_as_a_part(loaded_model, tmp_path):
  """Which part an input belongs to follows its id's hash, so a part can get none: it still
  leaves an index (no rows), so open() and the whole-run report see every part."""
  out = tmp_path / "out"
  (tmp_path / "photos").mkdir()
  _annotate(loaded_model, [tmp_path / "photos"], out / "part-0000-of-0001")
  assert dataset.dataset_folders(out) == [out / "part-0000-of-0001"]
  assert dataset.open(out).count_rows() == 0
  assert dataset.read_index(out / "part-0000-of-0001")["shards"] == []


def _rss_kib():
  with open("/proc/self/status") as status:
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_memory_stays_flat_over_a_long_run(loaded_model, tmp_path):
  """RSS after 1,200 inputs within 10% of RSS after 300: every 50th a face (the fit), a third of
  the others faceless tiles (MediaPipe's detectors, every orientation tried), the rest
  unreadable files (cheap rows), so the fit, the detectors, the writer and the shards all take
  part."""
  photos = tmp_path / "photos"
  photos.mkdir()
  blank = cv2.imencode(".png", np.full((48, 48, 3), 200, np.uint8))[1].tobytes()
  face = cv2.imencode(".png", cv2.cvtColor(_face(0.25), cv2.COLOR_RGB2BGR))[1].tobytes()
  listing = tmp_path / "inputs.txt"
  with open(listing, "w") as lines:
    for index in range(1200):
      path = photos / f"{index:05d}.png"
      path.write_bytes(face if index % 50 == 0 else blank if index % 3 == 0 else b"not a png")
      lines.write(f"{path}\n")
  samples = {}
  settled = [0]

  def progress(count):
    settled[0] += count
    for mark in (300, 1200):
      if settled[0] >= mark and mark not in samples:
        samples[mark] = _rss_kib()

  found = sources.iter_sources([str(listing)], exclude_folder=tmp_path / "out")
  with output_folder.claim_output_folder(tmp_path / "out") as folder:
    run = engine.Engine(loaded_model, QUICK, engine.EngineOptions(batch_size=16),
                        progress=progress)
    sink = sinks.DatasetSink(folder, loaded_model.model.faces, loaded_model.model.name,
                             dict(model="test"), rows_per_shard=250, overlays="none")
    summary = run.run(found, sink)
  faces = len(range(0, 1200, 50))
  blanks = sum(1 for i in range(1200) if i % 50 and i % 3 == 0)
  assert summary["this_run"]["ok"] == faces and summary["this_run"]["no_face"] == blanks, summary
  assert sum(summary["this_run"].values()) == 1200
  assert samples[1200] <= 1.10 * samples[300], samples


def test_a_cpu_fit_beside_preprocessing_workers_runs_single_threaded():
  """With worker processes preprocessing on the same cores, the commands make XLA's CPU fit
  single-threaded (its spinning threads took a fifth of the workers' time), keeping any other
  XLA flag, and leave a user's own choice and worker-free runs alone."""
  from jflame import process_settings
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  process_settings.fit_beside_workers(2, environ)
  assert environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x",
                                          "--xla_cpu_multi_thread_eigen=false"]
  process_settings.fit_beside_workers(2, environ)  # idempotent
  assert environ["XLA_FLAGS"].count("multi_thread_eigen") == 1
  users = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
  process_settings.fit_beside_workers(4, users)
  assert users == {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
  empty = {}
  process_settings.fit_beside_workers(0, empty)
  assert empty == {}
  process_settings.fit_beside_workers(1, empty)
  assert empty == {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
