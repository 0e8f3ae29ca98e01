"""Benchmark of host preprocessing: what each step costs per image, in one process.

  python tools/bench_preprocess.py [--rounds 3] [--crop_size 256] [--json_out FILE]

The shared FFHQ photographs (1024 x 1024; the astronaut, enlarged to 1024, when they are
missing) are written to a temporary folder as JPEG (quality 90) and PNG, and each is prepared
three ways:

* old: the preprocessing before issue 9 (Pillow decode at full size, segmentation and masks,
  fractional area pre-filter only above a 2x shrink, 2 x 2 inverses through np.linalg), rebuilt
  here by running today's `prepare_image` with the old pieces swapped in (`_legacy_*` below);
  its control flow was the same at full size.
* landmark: today's `prepare_image(..., landmarks_only=True)`.
* photometric: today's `prepare_image(...)` (segmentation and masks).
* device: the host's share of `--landmarks device` (`decode_for_device`: read, hash, a decode
  of at most 512 pixels; `prepared_from_device`: the crop frame, without the crop, as a run
  without encoders makes it), with the face mesh's result computed once beforehand by
  `DeviceLandmarker` (it runs on the device, not here).

Steps are timed by wrapping the functions `prepare_image` calls (monkeypatching, restored after),
so the figures are those of the real code path; "other" is the rest of `prepare_image`
(landmark maths, record). Paths run interleaved image by image so that the machine's noise
falls on all of them alike; each figure is the median over rounds of the mean over images.
"""

import contextlib
import functools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags
from PIL import Image

from jflame import camera
from jflame.preprocess import FaceAnalyzer, align, image_io, pipeline
from jflame.preprocess.image_io import DecodedImage, SourceFile
import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed passes over the images (median reported).")
_CROP = flags.DEFINE_integer("crop_size", 256, "Crop size.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results as JSON here.")
_STATISTIC = flags.DEFINE_enum(
    "statistic", "median", ["median", "min"],
    "Over rounds, per path and step: median, or min (on a machine shared with other work, the "
    "least disturbed round). Both go to the JSON.")

STEPS = ("read bytes", "hash", "decode", "detect", "window warp", "mesh", "segmentation",
         "crop warp", "masks", "other", "total")
PATHS = ("old", "landmark", "photometric", "device")
PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "photos"


def write_test_images(folder: Path):
  """{format: [paths]}: every source photo as 1024-pixel JPEG (q90) and PNG."""
  photos = sorted(PHOTOS.glob("*.png")) if PHOTOS.is_dir() else []
  if photos:
    images = {path.stem: np.asarray(Image.open(path).convert("RGB")) for path in photos}
  else:
    import skimage.data
    images = {"astronaut": cv2.resize(skimage.data.astronaut(), (1024, 1024),
                                      interpolation=cv2.INTER_CUBIC)}
  files = {"jpeg": [], "png": []}
  for stem, pixels in images.items():
    files["jpeg"].append(folder / f"{stem}.jpg")
    Image.fromarray(pixels).save(files["jpeg"][-1], quality=90)
    files["png"].append(folder / f"{stem}.png")
    Image.fromarray(pixels).save(files["png"][-1])
  return files, ("FFHQ" if photos else "astronaut x2")


# The old pieces (as of commit 9bcb518), for the "old" path.

def _legacy_invert_affine(affine):
  affine = np.asarray(affine, np.float64)
  linear_inv = np.linalg.inv(affine[:, :2])
  return np.concatenate([linear_inv, -linear_inv @ affine[:, 2:3]], axis=1)


def _legacy_affine_scale(dst_from_src):
  return float(np.sqrt(abs(np.linalg.det(np.asarray(dst_from_src, np.float64)[:, :2]))))


def _legacy_warp_affine(image, dst_from_src, size, interpolation=cv2.INTER_LINEAR):
  dst_from_src = np.asarray(dst_from_src, np.float64)
  height, width = image.shape[:2]
  output_shape = (size, size) + image.shape[2:]
  corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
  source_corners = camera.apply_affine(_legacy_invert_affine(dst_from_src), corners)
  margin = 2.0 / _legacy_affine_scale(dst_from_src) + 2.0
  x_min, y_min = np.floor(source_corners.min(axis=0) - margin).astype(int)
  x_max, y_max = np.ceil(source_corners.max(axis=0) + margin).astype(int)
  x_min, y_min = max(x_min, 0), max(y_min, 0)
  x_max, y_max = min(x_max, width), min(y_max, height)
  if x_min >= x_max or y_min >= y_max:
    return np.zeros(output_shape, image.dtype)
  region = image[y_min:y_max, x_min:x_max]
  dst_from_region = align.compose_affine(dst_from_src,
                                         np.array([[1.0, 0.0, x_min], [0.0, 1.0, y_min]]))
  shrink = 1.0 / _legacy_affine_scale(dst_from_src)
  if shrink > 2.0:
    region_height, region_width = region.shape[:2]
    small_width = max(1, round(region_width / shrink))
    small_height = max(1, round(region_height / shrink))
    region = cv2.resize(region, (small_width, small_height), interpolation=cv2.INTER_AREA)
    small_from_region = np.array([[small_width / region_width, 0.0, 0.0],
                                  [0.0, small_height / region_height, 0.0]])
    dst_from_region = align.compose_affine(dst_from_region,
                                           _legacy_invert_affine(small_from_region))
  warped = cv2.warpAffine(region, align.opencv_affine(dst_from_region), (size, size),
                          flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return warped.reshape(output_shape)


def _legacy_inside_image_mask(crop_from_original, crop_size, width, height):
  centers = (np.stack(np.meshgrid(np.arange(crop_size), np.arange(crop_size)), axis=-1)
             .reshape(-1, 2) + 0.5)
  original = camera.apply_affine(_legacy_invert_affine(crop_from_original), centers)
  return align.points_inside(original, width, height).reshape(crop_size, crop_size).astype(
      np.float32)


def _legacy_read_source(path):
  """The old path read no bytes of its own: Pillow read the file while decoding."""
  return SourceFile(path=Path(path), data=b"", size=0, mtime_ns=0, content_hash="")


def _legacy_decode_image(data, label, max_reduction=1, min_side=0):
  """The old read_image for an 8-bit RGB file: Pillow, full size."""
  del data, max_reduction, min_side
  with Image.open(label) as image:
    image.load()
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
  height, width = pixels.shape[:2]
  return DecodedImage(pixels=pixels, reduction=1, width=width, height=height)


class StepTimer:
  """Seconds per step of the image being prepared, filled by wrapped functions."""

  def __init__(self):
    self.seconds = {}

  def add(self, step, seconds):
    self.seconds[step] = self.seconds.get(step, 0.0) + seconds

  def wrap(self, step_of, function):
    """`function`, timed into the step `step_of(*args)` names (a str, or a function of args)."""
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return function(*args, **kwargs)
      finally:
        self.add(step_of(*args) if callable(step_of) else step_of, time.perf_counter() - start)
    return timed


@contextlib.contextmanager
def patched(replacements):
  """Sets (object, attribute) -> value for the duration, restoring the old values after."""
  saved = {key: getattr(*key) for key in replacements}
  try:
    for (owner, attribute), value in replacements.items():
      setattr(owner, attribute, value)
    yield
  finally:
    for (owner, attribute), value in saved.items():
      setattr(owner, attribute, value)


def instrumented(timer: StepTimer, legacy: bool):
  """The replacements that time each step (and, for the old path, swap the old pieces in)."""
  read_source = _legacy_read_source if legacy else image_io.read_source
  decode_image = _legacy_decode_image if legacy else pipeline.decode_image
  warp = _legacy_warp_affine if legacy else pipeline.warp_affine
  inside = _legacy_inside_image_mask if legacy else pipeline.inside_image_mask

  def warp_step(image, dst_from_src, size, *unused):
    if image.dtype == np.float32:
      return "masks"   # the segmentation, warped into the crop
    return "window warp" if size == pipeline.ANALYSIS_WINDOW_SIZE else "crop warp"

  replacements = {
      (pipeline, "read_source"): timer.wrap("read bytes", read_source),
      (image_io, "hash_bytes"): timer.wrap("hash", image_io.hash_bytes),
      (pipeline, "decode_image"): timer.wrap("decode", decode_image),
      (FaceAnalyzer, "detect_faces"): timer.wrap("detect", FaceAnalyzer.detect_faces),
      (FaceAnalyzer, "face_landmarks"): timer.wrap("mesh", FaceAnalyzer.face_landmarks),
      (FaceAnalyzer, "segment_foreground"): timer.wrap("segmentation",
                                                       FaceAnalyzer.segment_foreground),
      (pipeline, "warp_affine"): timer.wrap(warp_step, warp),
      (pipeline, "inside_image_mask"): timer.wrap("masks", inside),
      (pipeline, "face_region_mask"): timer.wrap("masks", pipeline.face_region_mask),
  }
  if legacy:
    replacements.update({(pipeline, "invert_affine"): _legacy_invert_affine,
                         (pipeline, "affine_scale"): _legacy_affine_scale,
                         (align, "invert_affine"): _legacy_invert_affine,
                         (align, "affine_scale"): _legacy_affine_scale})
  return replacements


def _time_one(analyzer, path, path_kind, crop_size, device_results):
  """{step: ms} for preparing one file one way (`device_results`: path -> the device's face
  mesh of its decode, for the device path)."""
  timer = StepTimer()
  with patched(instrumented(timer, legacy=path_kind == "old")):
    start = time.perf_counter()
    if path_kind == "device":
      settings = pipeline._CropSettings(crop_size, align.DEFAULT_CROP_SCALE, True, False, True)
      record = pipeline.prepared_from_device(pipeline.decode_for_device((path, path.stem)),
                                             *device_results[path], settings, with_crop=False)
    else:
      record = pipeline.prepare_image(path, analyzer, crop_size,
                                      landmarks_only=path_kind == "landmark")
    total = time.perf_counter() - start
  if not record.ok:
    raise RuntimeError(f"{path}: {record.message}")
  steps = dict(timer.seconds)
  # read_source's time includes the hash it computes.
  steps["read bytes"] = steps.get("read bytes", 0.0) - steps.get("hash", 0.0)
  steps["other"] = total - sum(steps.values())
  steps["total"] = total
  return {step: 1000.0 * steps.get(step, 0.0) for step in STEPS}


def device_results(files):
  """{path: (found, landmarks, box, score)}: the face mesh on the device, once per file."""
  from jflame.landmark_nets.landmarker import DeviceLandmarker
  landmarker = DeviceLandmarker(len(files), pipeline.DEVICE_MAX_SIDE)
  images = [pipeline.decode_for_device((path, path.stem)).pixels for path in files]
  return {path: tuple(field[number] for field in landmarker(images))
          for number, path in enumerate(files)}


def bench_format(analyzer, files, crop_size, rounds):
  """{statistic: {path: {step: ms per image}}}: median and min over rounds of the mean over
  images."""
  meshes = device_results(files)
  time_one = functools.partial(_time_one, device_results=meshes)
  for path in files[:2]:   # warm-up: MediaPipe graphs, caches
    for kind in PATHS:
      time_one(analyzer, path, kind, crop_size)
  per_round = {kind: [] for kind in PATHS}
  for _ in range(rounds):
    sums = {kind: dict.fromkeys(STEPS, 0.0) for kind in PATHS}
    for path in files:
      for kind in PATHS:
        for step, ms in time_one(analyzer, path, kind, crop_size).items():
          sums[kind][step] += ms / len(files)
    for kind in PATHS:
      per_round[kind].append(sums[kind])
  return {name: {kind: {step: function([r[step] for r in per_round[kind]]) for step in STEPS}
                 for kind in PATHS}
          for name, function in (("median", statistics.median), ("min", min))}


def machine_description():
  model = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return f"{os.cpu_count()} cores ({model}), load average {os.getloadavg()[0]:.1f} at start"


def main(argv):
  del argv
  results = {}
  machine = machine_description()
  with tempfile.TemporaryDirectory() as folder, FaceAnalyzer() as analyzer:
    files, source = write_test_images(Path(folder))
    for image_format, paths in files.items():
      results[image_format] = bench_format(analyzer, paths, _CROP.value, _ROUNDS.value)
      print(f"{image_format}: done", flush=True)
  count = len(files["jpeg"])
  header = ["step"] + [f"{image_format.upper()} {kind}" for image_format in results
                       for kind in PATHS]
  statistic = _STATISTIC.value
  rows = [[step] + [f"{results[image_format][statistic][kind][step]:.1f}"
                    for image_format in results for kind in PATHS] for step in STEPS]
  print(f"machine: {machine}; one process; {count} {source} images of 1024 x 1024 per format, "
        f"crop {_CROP.value}, {statistic} of {_ROUNDS.value} rounds; ms per image")
  print(benchmarking.markdown_table(header, rows))
  benchmarking.write_json(_JSON_OUT.value, dict(
      machine=machine, images_per_format=count, source=source, crop_size=_CROP.value,
      rounds=_ROUNDS.value, load_average_at_end=os.getloadavg()[0], ms_per_image=results))


if __name__ == "__main__":
  app.run(main)
