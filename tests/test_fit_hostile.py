"""jflame-fit used as a hostile new user would: odd names, reruns, changed files, bad flags, a
kill in the middle, unusable output folders, broken links. Each ends in a clear message or an
entry in the manifest, never a traceback, and nothing finished is lost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from jflame import engine, manifest, output_folder, sinks, sources
from jflame.config import FitConfig
from jflame.errors import InputError, OutputError
from tests.conftest import PROJECT_ROOT, QUICK_FLAGS, by_relpath

QUICK = FitConfig(rigid_iterations=3, full_iterations=3)


def _jflame_fit(args, env, timeout=600, **kwargs):
  return subprocess.run([sys.executable, "-m", "jflame.cli.fit", *args], cwd=PROJECT_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _photo(path, scale=1.0, flip=False):
  image = skimage.data.astronaut()
  if scale != 1.0:
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
  if flip:
    image = image[:, ::-1]
  path.parent.mkdir(parents=True, exist_ok=True)
  cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
  return path


def _fit(loaded, inputs, out, config=QUICK, **options):
  out.mkdir(parents=True, exist_ok=True)
  sink = sinks.FilesSink(out, loaded.model.faces, loaded.model.name, "", pictures=False)
  options.setdefault("batch_size", 4)
  found = sources.list_sources([str(i) for i in inputs], exclude_folder=out)
  summary = engine.Engine(loaded, config, engine.EngineOptions(**options)).run(found, sink)
  return summary, by_relpath(manifest.read_entries(out))


# --- 1. names and resume --------------------------------------------------------------------

def test_names_come_from_the_path_under_the_input_root_whatever_the_order(tmp_path):
  for name in ("x/a.jpg", "x/a.png", "x/sub/a.jpg", "y/a.jpg", "x/.hidden.jpg"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  forward = sources.list_sources([str(tmp_path / "x"), str(tmp_path / "y")], recursive=True)
  backward = sources.list_sources([str(tmp_path / "y"), str(tmp_path / "x")], recursive=True)
  names = {str(s.path.relative_to(tmp_path.resolve())): s.name for s in forward}
  assert names == {str(s.path.relative_to(tmp_path.resolve())): s.name for s in backward}
  assert names["x/a.png"].startswith("a.png~") and names["x/sub/a.jpg"].startswith("a.jpg~")
  # x/a.jpg and y/a.jpg have the same readable part and their own path hash, in any order.
  assert names["x/a.jpg"].startswith("a.jpg~") and names["y/a.jpg"].startswith("a.jpg~")
  assert names["x/a.jpg"] != names["y/a.jpg"]
  assert all("/" not in n and not n.startswith(".") for n in names.values())


def test_names_cannot_escape_the_output_folder(tmp_path):
  listing = tmp_path / "lists" / "inputs.txt"
  _photo(tmp_path / "photos" / "a.png", scale=0.1)
  listing.parent.mkdir()
  listing.write_text(f"../photos/a.png\n# a comment\n\n{tmp_path}/photos/a.png\n")
  found = sources.list_sources([str(listing)])
  assert [s.relpath for s in found] == ["../photos/a.png"]  # listed twice: one source
  assert found[0].name.startswith("a.png~") and found[0].path == (tmp_path / "photos" / "a.png")
  assert sources.readable_name(["..", "..", "etc", "passwd"]) == "up__up__etc__passwd"
  assert sources.readable_name([".ssh", "id"]) == "_.ssh__id"
  long_name = sources.source_id(tmp_path / ("d" * 300 + ".jpg"))
  assert len(long_name.encode()) <= 180 and "~" in long_name


def test_a_rerun_refits_exactly_what_changed_and_records_the_source(loaded_model, tmp_path):
  """The defect: with a.jpg and a.png fitted, adding a.bmp was reported skipped. Now every
  result records its source, and a rerun skips only results whose source still matches."""
  photos = tmp_path / "photos"
  _photo(photos / "a.jpg", 0.5)
  _photo(photos / "a.png", 0.5, flip=True)
  out = tmp_path / "out"
  _, first = _fit(loaded_model, [photos], out)
  assert {n: e["status"] for n, e in first.items()} == {"a.jpg": "ok", "a.png": "ok"}
  with np.load(out / f"{first['a.jpg']['name']}.npz") as result:
    assert str(result["source"]) == str(photos / "a.jpg")
    assert str(result["source_relpath"]) == "a.jpg"
    assert int(result["source_size"]) == (photos / "a.jpg").stat().st_size
    assert int(result["source_mtime_ns"]) == (photos / "a.jpg").stat().st_mtime_ns
  _photo(photos / "a.bmp", 0.5)
  summary, second = _fit(loaded_model, [photos], out)
  assert summary["this_run"] == {"skipped": 2, "ok": 1} and second["a.bmp"]["status"] == "ok"
  # A touched file (same bytes, new time) is not refitted when its hash was recorded;
  # a changed one is.
  os.utime(photos / "a.png", ns=(time.time_ns(), time.time_ns()))
  for name in ("a.jpg", "a.png", "a.bmp"):
    second[name]["source_hash"] = sources.content_hash(photos / name)
  manifest.append_entries(out, second.values())
  _photo(photos / "a.jpg", 0.4)
  summary, third = _fit(loaded_model, [photos], out)
  assert summary["this_run"] == {"skipped": 2, "ok": 1}
  assert third["a.jpg"]["source_size"] == (photos / "a.jpg").stat().st_size


def test_the_same_file_name_in_another_folder_is_another_result(loaded_model, tmp_path):
  out = tmp_path / "out"
  _, first = _fit(loaded_model, [_photo(tmp_path / "one" / "face.png", 0.5)], out)
  summary, _ = _fit(loaded_model, [_photo(tmp_path / "two" / "face.png", 0.4)], out)
  assert summary["this_run"] == {"ok": 1}
  entries = list(manifest.read_entries(out).values())
  assert sorted(e["source"] for e in entries) == [str(tmp_path / f / "face.png")
                                                  for f in ("one", "two")]
  assert len({e["name"] for e in entries}) == 2
  assert first["face.png"]["source"] == str(tmp_path / "one" / "face.png")


# --- 2, 6, 10. usage problems: exit 2 with one line, before any work ----------------------

def _one_line_usage_error(done):
  assert done.returncode == 2, (done.stdout, done.stderr)
  assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
  return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,expected", [
    (["--batch_size", "0"], "batch_size"), (["--batch_size", "-3"], "batch_size"),
    (["--batch_size", "1000000"], "batch_size"), (["--crop_size", "100000"], "crop_size"),
    (["--crop_size", "8"], "crop_size"), (["--workers", "0"], "workers"),
    (["--mode", "photometic"], "mode"), (["--full_iterations", "-1"], "full_iterations"),
    (["--no_such_flag"], "no_such_flag"), ([], "--input is required"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, tmp_path, command_env):
  args = flags if flags == [] else ["--input", str(tmp_path)] + flags
  line = _one_line_usage_error(_jflame_fit(args + ["--output", str(tmp_path / "o")],
                                           command_env, timeout=120))
  assert expected in line


def test_help_lists_every_flag_with_defaults_and_ranges(command_env):
  done = _jflame_fit(["--help"], command_env, timeout=120)
  assert done.returncode == 0
  for flag in ("--input", "--output", "--batch_size", "--crop_size", "--mode", "--[no]overwrite",
               "--flame_model", "--embedding", "--[no]compilation_cache", "--[no]recursive"):
    assert flag in done.stdout, flag
  assert "default: '16'" in done.stdout and "4096" in done.stdout and "1024" in done.stdout


def test_unusable_output_folders_exit_2_before_the_model_loads(tmp_path, command_env):
  photos = tmp_path / "photos"
  _photo(photos / "a.png", 0.25)
  a_file = tmp_path / "taken.txt"
  a_file.write_text("x")
  line = _one_line_usage_error(_jflame_fit(["--input", str(photos), "--output", str(a_file)],
                                           command_env, timeout=120))
  assert str(a_file) in line and "not a folder" in line
  line = _one_line_usage_error(_jflame_fit(
      ["--input", str(photos), "--output", str(a_file / "sub")], command_env, timeout=120))
  assert "cannot create" in line
  if os.geteuid() == 0:
    unwritable = Path("/sys/kernel")  # root may write anywhere else
    if not unwritable.is_dir() or os.access(unwritable, os.W_OK) and _writable(unwritable):
      pytest.skip("no folder here that even root cannot write")
  else:
    unwritable = tmp_path / "readonly"
    unwritable.mkdir(mode=0o500)
  line = _one_line_usage_error(_jflame_fit(["--input", str(photos), "--output",
                                            str(unwritable)], command_env, timeout=120))
  assert str(unwritable) in line and "cannot write" in line


def _writable(folder):
  try:
    (folder / ".probe").write_bytes(b"")
    (folder / ".probe").unlink()
    return True
  except OSError:
    return False


def test_the_output_folder_is_never_an_input(tmp_path, loaded_model):
  photos = tmp_path / "photos"
  _photo(photos / "a.png", 0.25)
  with pytest.raises(InputError, match="is the input folder"):
    sources.check_output_not_an_input([str(photos)], photos, recursive=False)
  with pytest.raises(InputError, match="inside the input folder"):
    sources.check_output_not_an_input([str(photos)], photos / "out", recursive=True)
  sources.check_output_not_an_input([str(photos)], photos / "out", recursive=False)
  # A glob that also matches the outputs: the output folder's files are never inputs.
  (photos / "out").mkdir()
  _photo(photos / "out" / "a.png_overlay.png", 0.25)
  found = sources.list_sources([str(photos / "**" / "*.png")], recursive=True,
                               exclude_folder=photos / "out")
  assert [s.path.name for s in found] == ["a.png"]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, command_env):
  photos = tmp_path / "photos"
  _photo(photos / "a.png", 0.25)
  with output_folder.claim_output_folder(tmp_path / "out"):
    line = _one_line_usage_error(_jflame_fit(["--input", str(photos), "--output",
                                              str(tmp_path / "out")], command_env, timeout=120))
    assert "another jflame run is writing" in line and f"pid {os.getpid()}" in line
    with pytest.raises(OutputError, match="another jflame run"):
      with output_folder.claim_output_folder(tmp_path / "out"):
        pass
  with output_folder.claim_output_folder(tmp_path / "out"):  # released with its holder
    pass


# --- 4. one photo pays for one image ------------------------------------------------------------

def test_batches_pad_to_the_smallest_bucket_and_compile_once_per_bucket(loaded_model, tmp_path):
  from jflame.fit import fit_batch
  assert [engine.bucket_size(n, 16) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 16]
  assert engine.bucket_size(3, 12) == 4 and engine.bucket_size(9, 12) == 12
  assert engine.bucket_size(1, 16, multiple=8) == 8
  photos = tmp_path / "photos"
  for index in range(5):
    _photo(photos / f"p{index}.png", 0.3 + 0.05 * index)
  config = FitConfig(rigid_iterations=2, full_iterations=4)
  before = fit_batch._cache_size()
  summary, entries = _fit(loaded_model, [photos], tmp_path / "out", config, batch_size=4)
  assert summary["batch_buckets"] == [1, 4]  # 4 + 1, not 4 + 4
  assert fit_batch._cache_size() - before == 2
  single, _ = _fit(loaded_model, [photos / "p0.png"], tmp_path / "one", config, batch_size=16)
  assert single["batch_buckets"] == [1] and fit_batch._cache_size() - before == 2
  assert all(e["status"] == "ok" for e in entries.values())


# --- 7. a kill in the middle ------------------------------------------------------------------

def test_a_kill_keeps_every_finished_entry_and_a_rerun_finishes_cleanly(tmp_path, command_env):
  photos = tmp_path / "photos"
  for index in range(6):
    _photo(photos / f"p{index}.png", 0.25 + 0.02 * index)
  out = tmp_path / "out"
  args = ["--input", str(photos), "--output", str(out), "--batch_size", "1", "--nooverlay",
          "--mesh_format", "", *QUICK_FLAGS]
  process = subprocess.Popen([sys.executable, "-m", "jflame.cli.fit", *args], cwd=PROJECT_ROOT,
                             env=command_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  while time.time() < deadline and process.poll() is None:
    if len(manifest.read_entries(out)) >= 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  finished = manifest.read_entries(out)
  assert len(finished) >= 2  # kept as it went, not written at the end
  for name in finished:
    with np.load(out / f"{name}.npz") as result:
      assert str(result["status"]) == "ok"
  (out / ".p9.png.npz.jflame-tmp-abc123.npz").write_bytes(b"torn")  # what a kill leaves
  done = _jflame_fit(args, command_env)
  assert done.returncode == 0, done.stderr
  summary = json.loads((out / "run_summary.json").read_text())
  assert summary["this_run"].get("skipped", 0) == len(finished)
  assert summary["counts"] == {"ok": 6} and len(summary["images"]) == 6
  assert not [p for p in out.iterdir() if ".jflame-tmp-" in p.name]
  # A rerun with nothing left to do keeps every earlier entry in its summary.
  again = _jflame_fit(args, command_env)
  summary = json.loads((out / "run_summary.json").read_text())
  assert again.returncode == 0 and summary["this_run"] == {"skipped": 6}
  assert summary["counts"] == {"ok": 6}


# --- 8, 9. broken links and file modes ----------------------------------------------------------

def test_broken_links_get_an_entry_and_files_get_the_umask_mode(tmp_path, command_env):
  photos = tmp_path / "photos"
  _photo(photos / "a.png", 0.25)
  (photos / "gone.png").symlink_to(tmp_path / "nowhere.png")
  (tmp_path / "direct.jpg").symlink_to(tmp_path / "nowhere.jpg")
  out = tmp_path / "out"
  previous = os.umask(0o022)  # the child inherits it
  try:
    done = _jflame_fit(["--input", f"{photos},{tmp_path / 'direct.jpg'}", "--output", str(out),
                        *QUICK_FLAGS], command_env)
  finally:
    os.umask(previous)
  assert done.returncode == 0, done.stderr
  entries = by_relpath(manifest.read_entries(out))
  assert entries["a.png"]["status"] == "ok"
  for name in ("gone.png", "direct.jpg"):
    assert entries[name]["status"] == "unreadable"
    assert "broken symbolic link" in entries[name]["message"], entries[name]
  for path in out.iterdir():
    if path.is_file() and path.name != ".jflame.lock":
      assert path.stat().st_mode & 0o777 == 0o644, path
