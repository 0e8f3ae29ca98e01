"""Benchmark of dataset annotation end to end (jflame-annotate's engine and store).

  python tools/bench_annotate.py [--images 512] [--workers 2] [--batch_size 64]
                                 [--resume_rows 10000] [--json_out FILE]
  python tools/bench_annotate.py --compare_ray [--rounds 2] [--images 128]   # needs the ray extra

Makes a dataset of copies of ../shared/assets/photos (half JPEG quality 90, half PNG, each copy
shifted a little so no two files are equal; skimage's astronaut when the shared photos are
missing), then measures:
* end to end: images/s of a full landmark-mode run (preprocessing in --workers processes, the
  fit on this machine's device, Parquet shards), compile excluded by a warm-up run;
* the preprocessing bound: images/s of the same preprocessing alone with the same workers,
  counted from the pool's start as the engine's wall time is (and once more with the workers
  already up: the steady rate that a long run approaches);
* the steady state: the engine's rate after its first batch is written (start-up, tracing and
  the first compile behind it) against the preprocessing rate with the workers up: how well the
  fit and the writes hide behind the preprocessing, which is what a long run sees;
* per stage: the engine's own timings (fit and write seconds per image);
* resume: the seconds a rerun needs to decide that a finished --resume_rows dataset has nothing
  left to do (rows are written directly through the store, then the real command is timed).

With --compare_ray it measures instead the local engine against `--engine=ray` on a Ray started
by the command on this machine: each engine warmed up once (compiles into the cache), then
--rounds rounds of local, ray interleaved (a loaded machine slows both alike), whole-command and
steady-state rates and their ratios.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags

import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_IMAGES = flags.DEFINE_integer("images", 512, "Images in the generated dataset.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Preprocessing processes.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Fit batch size.")
_RESUME_ROWS = flags.DEFINE_integer("resume_rows", 10_000, "Rows of the resume check.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results as JSON here.")
_COMPARE_RAY = flags.DEFINE_bool("compare_ray", False, "Local engine against --engine=ray, "
                                 "interleaved, instead of the measures above.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "With --compare_ray: rounds of local, ray.")
_LANDMARKS = flags.DEFINE_enum("landmarks", "mediapipe", ["mediapipe", "device"],
                               "jflame-annotate's --landmarks. device: the preprocessing bound "
                               "is the workers' read + decode alone (the host's share).")

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "assets" / "photos"


def make_dataset(folder: Path, count: int) -> list:
  photos = [cv2.imread(str(p)) for p in sorted(PHOTOS.glob("*.png"))]
  if not photos:
    import skimage.data
    photos = [cv2.cvtColor(cv2.resize(skimage.data.astronaut(), (1024, 1024)),
                           cv2.COLOR_RGB2BGR)]
  paths = []
  for index in range(count):
    photo = np.roll(photos[index % len(photos)], index // len(photos), axis=1)
    path = folder / f"{index:06d}.{'jpg' if index % 2 else 'png'}"
    cv2.imwrite(str(path), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    paths.append(path)
  return paths


def run_annotate(inputs: Path, output: Path, extra=()) -> float:
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "jflame.cli.annotate", "--input", str(inputs),
                         "--output", str(output), "--workers", str(_WORKERS.value),
                         "--batch_size", str(_BATCH.value), "--overlays", "none", "--noreport",
                         "--landmarks", _LANDMARKS.value, *extra], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="local"))
  if done.returncode not in (0, 1):  # 1: nothing fitted, as in the resume check's dataset
    raise RuntimeError(done.stderr[-2000:])
  return time.perf_counter() - start


def preprocessing_rates(paths):
  """Images/s of the engine's preprocessing alone: (from the pool's start, as the engine's wall
  time counts; once the workers are up)."""
  from jflame.preprocess import Preprocessor
  if _LANDMARKS.value == "device":
    return decoding_rates(paths)
  start = time.perf_counter()
  with Preprocessor(256, workers=_WORKERS.value, landmarks_only=True) as preprocessor:
    records = list(preprocessor.prepare_iter(paths))
    with_start = time.perf_counter() - start
    start = time.perf_counter()
    records = list(preprocessor.prepare_iter(paths))
    steady = time.perf_counter() - start
  assert sum(r.ok for r in records) > 0.9 * len(records)
  return len(paths) / with_start, len(paths) / steady


def decoding_rates(paths):
  """Images/s of device mode's host share alone (read, hash, decode at most 512 pixels) in the
  same workers: (from the pool's start; once the workers are up)."""
  import multiprocessing
  from jflame.preprocess.pipeline import decode_for_device
  jobs = [(path, path.name) for path in paths]
  start = time.perf_counter()
  with multiprocessing.get_context("spawn").Pool(_WORKERS.value) as pool:
    decoded = list(pool.imap(decode_for_device, jobs, chunksize=8))
    with_start = time.perf_counter() - start
    start = time.perf_counter()
    decoded = list(pool.imap(decode_for_device, jobs, chunksize=8))
    steady = time.perf_counter() - start
  assert all(image.pixels is not None for image in decoded)
  return len(paths) / with_start, len(paths) / steady


def resume_check(folder: Path, rows: int) -> float:
  """A finished dataset of `rows` rows over `rows` real files; returns the seconds the real
  command takes to find nothing to do (process start, model load, listing, key columns)."""
  from jflame import dataset, model_loading, sinks, sources
  from jflame.config import FitConfig
  from jflame.engine import Engine, EngineOptions
  inputs = folder / "inputs"
  inputs.mkdir(parents=True)
  blob = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
  for index in range(rows):
    (inputs / f"{index:06d}.png").write_bytes(blob)
  loaded = model_loading.load_model()
  config = FitConfig()
  engine = Engine(loaded, config, EngineOptions())
  settings = sinks.dataset_settings(loaded, config, 256, engine.landmark_indices)
  writer = dataset.ShardWriter(folder / "out", settings, rows_per_shard=1000)
  # Rows under the ids and paths the command gives these files (name~hash of the path): rows
  # under other ids are other sources to it, and it would fit every file again.
  for source in sources.list_sources([str(inputs)]):
    stat = source.path.stat()
    writer.add([dict(id=source.name, source_path=str(source.path),
                     source_relpath=source.relpath, source_size=stat.st_size,
                     source_mtime_ns=stat.st_mtime_ns, status="no_face", message="")])
  writer.commit()
  seconds = run_annotate(inputs, folder / "out")
  this_run = json.loads((folder / "out" / "run_summary.json").read_text())["this_run"]
  if this_run != {"skipped": rows}:  # a figure of something else: say so, not a number
    raise RuntimeError(f"the resume check's rerun did work: {this_run}")
  return seconds


def compare_ray(scratch: Path) -> dict:
  """Local and Ray engine runs of the same dataset, interleaved; rates per run and the ratios
  ray / local of their medians."""
  engines = dict(local=[], ray=["--engine", "ray"])
  for name, extra in engines.items():  # warm-up: compile into the cache
    run_annotate(scratch / "data", scratch / f"warm_{name}", extra)
  runs = {name: [] for name in engines}
  for round_index in range(_ROUNDS.value):
    for name, extra in engines.items():
      output = scratch / f"{name}_{round_index}"
      seconds = run_annotate(scratch / "data", output, extra)
      summary = json.loads((output / "run_summary.json").read_text())
      timings = summary["timings"]
      runs[name].append(dict(
          command_images_per_s=_IMAGES.value / seconds, command_s=seconds,
          engine_images_per_s=_IMAGES.value / timings["wall_s"],
          steady_images_per_s=timings["steady_images"] / timings["steady_s"],
          counts=summary["counts"], device=summary["device"]))
      print(name, json.dumps(runs[name][-1]), flush=True)
  medians = {name: {key: float(np.median([run[key] for run in rows]))
                    for key in ("command_images_per_s", "engine_images_per_s",
                                "steady_images_per_s")}
             for name, rows in runs.items()}
  return dict(device=benchmarking.device_description(), images=_IMAGES.value,
              workers=_WORKERS.value, batch_size=_BATCH.value, rounds=_ROUNDS.value, runs=runs,
              medians=medians,
              ray_over_local={key: medians["ray"][key] / medians["local"][key]
                              for key in medians["local"]})


def main(argv):
  del argv
  scratch = Path(tempfile.mkdtemp(prefix="bench_annotate_"))
  try:
    (scratch / "data").mkdir()
    paths = make_dataset(scratch / "data", _IMAGES.value)
    if _COMPARE_RAY.value:
      result = compare_ray(scratch)
      print(json.dumps(result, indent=2))
      if _JSON_OUT.value:
        Path(_JSON_OUT.value).write_text(json.dumps(result, indent=2) + "\n")
      return
    # A first run into another folder compiles the batch buckets (kept in the compilation cache).
    run_annotate(scratch / "data", scratch / "warm")
    seconds = run_annotate(scratch / "data", scratch / "out")
    summary = json.loads((scratch / "out" / "run_summary.json").read_text())
    end_to_end = _IMAGES.value / seconds
    bound, steady_bound = preprocessing_rates(paths)
    timings = summary["timings"]
    result = dict(
        device=benchmarking.device_description(), images=_IMAGES.value,
        landmarks=summary["options"]["landmarks"],
        workers=_WORKERS.value, batch_size=_BATCH.value, counts=summary["counts"],
        end_to_end_images_per_s=end_to_end, end_to_end_wall_s=seconds,
        engine_wall_s=timings["wall_s"], engine_images_per_s=_IMAGES.value / timings["wall_s"],
        preprocessing_bound_images_per_s=bound,
        preprocessing_steady_images_per_s=steady_bound,
        end_to_end_share_of_bound=end_to_end / bound,
        engine_share_of_bound=_IMAGES.value / timings["wall_s"] / bound,
        engine_steady_images_per_s=timings["steady_images"] / timings["steady_s"],
        engine_steady_share_of_steady_bound=(timings["steady_images"] / timings["steady_s"]
                                             / steady_bound),
        fit_ms_per_image=1000 * (timings["fit_s"] + (timings["first_fit_s"] or 0))
        / _IMAGES.value, write_ms_per_image=1000 * timings["write_s"] / _IMAGES.value,
        resume_rows=_RESUME_ROWS.value)
    print(json.dumps(result, indent=2), flush=True)
    result["resume_nothing_to_do_s"] = resume_check(scratch / "resume", _RESUME_ROWS.value)
    print(json.dumps(result, indent=2))
    if _JSON_OUT.value:
      Path(_JSON_OUT.value).write_text(json.dumps(result, indent=2) + "\n")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
