"""The pipeline every front end shares: sources -> prepare -> fit -> write.

    sources (streamed) ──► skip what the output already holds for the same source
        ──► prepare: host workers, a few batches ahead (bounded)
        ──► fit: one compiled program per batch bucket, dispatched asynchronously
        ──► write: a writer thread behind a bounded queue, into a `Sink`
            (per-image files for jflame-fit, Parquet shards for jflame-annotate)

The batch is the unit of work from prepare to write. Batches are padded to a bucket: the
smallest power of two that holds them, up to the batch size, so one photo does not pay for a
batch of 16 and a run compiles at most one program per bucket it uses. Every input gets exactly
one entry: ok, or a status and a message that say what happened.
"""

import contextlib
import dataclasses
import datetime
import itertools
import os
import queue
import threading
import time
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol,
                    Sequence)

import jax
import numpy as np
from absl import logging

from jflame import sharding, sources
from jflame.config import FitConfig
from jflame.errors import ConfigError, JFlameError
from jflame.fit import FitModel, fit_batch, fitted_meshes, take
from jflame.fitted_image import FittedImage, describe_fit
from jflame.model_loading import (LoadedModel, load_albedo, load_encoders, load_model,
                                  prepare_fit_model, run_provenance)
from jflame.preprocess import PreparedImage, Preprocessor, stack_observations
from jflame.preprocess.pipeline import DEVICE_MAX_SIDE
from jflame.sinks import KeptResults, Sink
from jflame.sources import Source, SourceFacts, content_hash

STATUS_SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Host-side settings of a run (the device-side ones are in FitConfig).

  Attributes:
    batch_size: most images fitted at once (one compiled program per bucket up to it).
    crop_size: side of the aligned face crop, pixels.
    workers: preprocessing processes (1: in this process).
    prefetch: batches prepared ahead of the one being fitted.
    overwrite: redo images whose finished result matches their source.
    deca_model, mica_model: optional ONNX encoder files.
    texture_model, texture_components, texture_size: photometric albedo settings.
    landmarks_only: skip what landmark fitting does not use in preprocessing.
    landmarks: where the face mesh runs: "mediapipe" (MediaPipe in the preprocessing workers)
      or "device" (landmark mode: the workers only decode, `landmark_nets` on the device).
    landmarks_note: why `landmarks` was chosen when the user let jflame choose.
  """
  batch_size: int = 16
  crop_size: int = 256
  workers: int = 1
  prefetch: int = 2
  overwrite: bool = False
  deca_model: Optional[str] = None
  mica_model: Optional[str] = None
  texture_model: Optional[str] = None
  texture_components: int = 50
  texture_size: int = 256
  landmarks_only: bool = False
  landmarks: str = "mediapipe"
  landmarks_note: str = ""


def bucket_size(count: int, batch_size: int, multiple: int = 1) -> int:
  """The padded size of a batch of `count` images: the smallest power of two >= count (and a
  multiple of `multiple`, the device count), at most `batch_size`."""
  size = 1
  while size < count:
    size *= 2
  size = max(size, multiple)
  size = -(-size // multiple) * multiple
  return min(size, batch_size)


def needs_fit(source: Source, facts: Optional[SourceFacts], previous: Optional[Mapping],
              overwrite: bool) -> Optional[str]:
  """Why `source` must be fitted (a reason string), or None when the output already holds its
  result: a previous entry from the same file (path, size and modification time; if those
  changed, the same content hash)."""
  if previous is None:
    return "new"
  if overwrite:
    return "--overwrite"
  if facts is None:
    return None  # gone or unreadable now: keep what was recorded when it could be read
  if previous.get("source") != str(source.path):
    return f"the name now belongs to another file ({previous.get('source')} before)"
  if (previous.get("source_size"), previous.get("source_mtime_ns")) == (facts.size,
                                                                          facts.mtime_ns):
    return None
  recorded_hash = previous.get("source_hash")
  if recorded_hash and recorded_hash == content_hash(source.path):
    return None  # touched, not changed
  return "the file changed since it was fitted"


MISSING_IDS_LISTED = 1000  # ids of rows whose source is gone, listed in a run's summary


def missing_sources(committed: Mapping[str, Mapping], unseen: Iterable[str]) -> dict:
  """The results whose source file is gone: committed ids that this run's inputs did not list
  and whose recorded source path no longer exists (a result from a source that still exists
  but was not in this run's inputs is not missing). Their rows are kept; the run says so."""
  gone = sorted(name for name in unseen
                if not _exists(committed[name].get("source")))
  return dict(count=len(gone), ids=gone[:MISSING_IDS_LISTED])


def _exists(path) -> bool:
  try:
    return bool(path) and os.path.lexists(path)
  except (OSError, ValueError):
    return False


class _Writer(threading.Thread):
  """The writer thread: takes batches of FittedImages from a bounded queue into the sink.
  An error stops it and is re-raised in the main thread at the next hand-over."""

  def __init__(self, sink: Sink, depth: int, on_written: Callable[[List[FittedImage]], None]):
    super().__init__(name="jflame-writer", daemon=True)
    self.sink, self.on_written = sink, on_written
    self.queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
    self.error: Optional[BaseException] = None
    self.write_seconds = 0.0

  def run(self):
    while True:
      images = self.queue.get()
      if images is None:
        return
      if self.error is not None:
        continue  # drain, so the main thread never blocks on a full queue
      try:
        start = time.perf_counter()
        self.sink.write(images)
        self.write_seconds += time.perf_counter() - start
        self.on_written(images)
      except BaseException as error:  # pylint: disable=broad-except
        self.error = error

  def put(self, images: List[FittedImage]):
    self.check()
    self.queue.put(images)

  def check(self):
    if self.error is not None:
      raise self.error

  def finish(self):
    self.queue.put(None)
    self.join()
    self.check()


def batches(items: Iterable, size: int) -> Iterator[list]:
  """`items` in lists of `size` (the last one shorter), as they stream."""
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def preprocessor_of(options: EngineOptions, workers: Optional[int] = None,
                    crops: bool = True) -> Preprocessor:
  """The Preprocessor of a run with `options` (with `workers` instead of options.workers): the
  local pipeline's, and each Ray preprocessing process's, so both make the same records.
  `crops`: whether device-mode records need their crop (the encoders read it)."""
  device_landmarks = None
  if options.landmarks == "device":
    from jflame.landmark_nets.landmarker import DeviceLandmarker
    device_landmarks = DeviceLandmarker(options.batch_size, DEVICE_MAX_SIDE)
  return Preprocessor(options.crop_size, workers=options.workers if workers is None else workers,
                      landmarks_only=options.landmarks_only, device_landmarks=device_landmarks,
                      device_crops=crops)


def landmark_source(asked: str, photometric: bool, engine: str = "local"):
  """("mediapipe" or "device", a note on why auto chose it) for `--landmarks asked` ("auto",
  "mediapipe" or "device") in a run of that mode on `engine` ("local" or "ray").

  Raises:
    ConfigError: device landmarks asked for a photometric fit or the Ray engine.
  """
  if asked == "mediapipe":
    return "mediapipe", ""
  if asked == "device":
    if photometric:
      raise ConfigError("--landmarks device serves landmark-mode fits; a photometric fit needs "
                        "MediaPipe's person segmentation on the host (--landmarks mediapipe)")
    if engine != "local":
      raise ConfigError("--landmarks device runs with the local engine; the Ray engine's "
                        "workers run MediaPipe (--landmarks mediapipe)")
    return "device", ""
  if jax.default_backend() == "cpu":
    return "mediapipe", "auto: no accelerator (on a CPU MediaPipe annotates faster end to end)"
  if photometric or engine != "local":
    return "mediapipe", "auto: photometric mode or the Ray engine"
  from jflame.landmark_nets import interpreter, tflite_graph
  try:
    for graph in tflite_graph.face_graphs():
      interpreter.check_supported(graph.ops)
  except JFlameError as error:
    return "mediapipe", f"auto: the device's face mesh could not be read ({error})"
  return "device", "auto: an accelerator"


class Fitter(Protocol):
  """The fit stage of a run, the part an `Engine` is given: it turns the sources to fit into
  fitted images. `LocalFitter` prepares on this machine's worker processes and fits on its
  devices; `jflame.ray_engine.RayFitter` runs both stages on a Ray cluster; the tests plug in
  canned ones.

  Attributes:
    landmark_indices: (K,) the MediaPipe landmark of each fitted point (what a sink records).
    timings: preprocess_s, fit_s and first_fit_s (the first batch, compilation included, or
      None), added up over the fitter's runs.
    buckets_used: the padded batch sizes fitted so far.
  """
  landmark_indices: np.ndarray
  timings: dict
  buckets_used: set

  def fitted(self, todo: Iterator[Source]) -> Iterator[List[FittedImage]]:
    """One list of FittedImages per batch, every source of `todo` exactly once and in order.
    Closed early when the run stops (an interrupt, a sink error): it then stops its work."""
    ...

  def describe(self) -> dict:
    """What the run summary says of where the fit ran (at least `device`)."""
    ...


def fitter_timings() -> dict:
  return dict(preprocess_s=0.0, fit_s=0.0, first_fit_s=None)


class LocalFitter:
  """The fit stage on this machine: a pool of preprocessing processes a few batches ahead and
  one batch in flight on the local devices (a `Fitter`). Building one loads the device-side
  model and the optional encoders.

  Args:
    loaded: the model and its embedding (model_loading.load_model).
    config: the fit settings.
    options: host settings.
  """

  def __init__(self, loaded: LoadedModel, config: FitConfig, options: EngineOptions):
    self.loaded, self.config, self.options = loaded, config, options
    self.timings = fitter_timings()
    self.buckets_used: set = set()
    self.mesh = sharding.batch_mesh() if len(jax.local_devices()) > 1 else None
    self.devices = 1 if self.mesh is None else self.mesh.size
    if options.batch_size % self.devices:
      raise ConfigError(f"--batch_size {options.batch_size} must be a multiple of the "
                        f"{self.devices} local devices the batch is split over.")
    albedo = load_albedo(loaded, options) if config.photometric else None
    self.fit_model: FitModel = sharding.replicate(prepare_fit_model(loaded, config, albedo),
                                                  self.mesh)
    self.encoders = load_encoders(loaded, options)
    self.context = dict(model_name=loaded.model.name, mode=config.mode.value,
                        crop_size=options.crop_size,
                        landmark_indices=np.asarray(self.fit_model.landmark_indices),
                        albedo_name=(self.fit_model.albedo.name
                                     if self.fit_model.albedo is not None else None))

  @property
  def landmark_indices(self) -> np.ndarray:
    return self.context["landmark_indices"]

  def describe(self) -> dict:
    return dict(device=str(jax.devices()[0]))

  def _dispatch(self, records: List[PreparedImage]):
    """Dispatches the fit of one batch (asynchronously); returns device arrays, or (None, None)
    when no record of the batch was prepared (corrupt files, no faces)."""
    options, config = self.options, self.config
    if not any(record.ok for record in records):
      return None, None
    size = bucket_size(len(records), options.batch_size, self.devices)
    self.buckets_used.add(size)
    observations = stack_observations(records, size, options.crop_size,
                                      images=config.photometric)
    guess = None
    if any(encoder is not None for encoder in self.encoders):
      from jflame.initializers.initial_guess import initial_guess_for_batch
      guess = initial_guess_for_batch(records, size, *self.encoders,
                                      num_shape=config.num_shape,
                                      num_expression=config.num_expression)
    results = fit_batch(self.fit_model, sharding.shard_batch(observations, self.mesh), config,
                        sharding.shard_batch(guess, self.mesh))
    meshes = fitted_meshes(self.loaded.model, self.fit_model, results, config,
                           options.crop_size)
    return results, meshes

  def _settle(self, sources: List[Source], records: List[PreparedImage], results, meshes,
              started: float) -> List[FittedImage]:
    if results is None:  # nothing in the batch could be fitted: no device work was done
      return [describe_fit(record, source, None, None, self.context)
              for source, record in zip(sources, records)]
    results, meshes = jax.device_get((results, meshes))
    elapsed = time.perf_counter() - started
    first = self.timings["first_fit_s"] is None
    if first:
      self.timings["first_fit_s"] = elapsed  # includes compilation
    else:
      self.timings["fit_s"] += elapsed
    images = []
    for slot, (source, record) in enumerate(zip(sources, records)):
      images.append(describe_fit(record, source, take(results, slot), take(meshes, slot),
                              self.context))
      # The first batch of a run also compiles: its time says nothing about the fit.
      images[-1].entry["fit_ms"] = None if first else 1000.0 * elapsed / len(records)
    return images

  def fit_batch(self, sources: List[Source], records: List[PreparedImage]
                ) -> List[FittedImage]:
    """Fits one batch of prepared records and waits for it: one FittedImage per source, in
    order. `fitted` splits this in two to overlap the device with the host; the Ray fit actors
    call it whole."""
    started = time.perf_counter()
    results, meshes = self._dispatch(records)
    return self._settle(sources, records, results, meshes, started)

  def fitted(self, todo: Iterator[Source]) -> Iterator[List[FittedImage]]:
    options = self.options
    todo_batches = batches(todo, options.batch_size)
    first = next(todo_batches, None)
    if first is None:
      return  # nothing to do: no workers started, nothing compiled
    todo_batches = itertools.chain([first], todo_batches)
    encoders = any(encoder is not None for encoder in self.encoders)
    with preprocessor_of(options, crops=encoders) as preprocessor:
      pending = []  # (sources, record iterator), oldest first, at most prefetch + 1

      def submit():
        batch = next(todo_batches, None)
        if batch is not None:
          pending.append((batch, preprocessor.prepare_iter([s.path for s in batch],
                                                           [s.name for s in batch])))

      for _ in range(max(options.prefetch, 0) + 1):
        submit()
      in_flight = None  # the batch on the device: (sources, records, results, meshes, start)
      while pending:
        batch, records_iter = pending.pop(0)
        start = time.perf_counter()
        records = list(records_iter)
        self.timings["preprocess_s"] += time.perf_counter() - start
        submit()
        started = time.perf_counter()
        results, meshes = self._dispatch(records)
        # The device works on this batch while the caller writes the one before.
        if in_flight is not None:
          yield self._settle(*in_flight)
        in_flight = (batch, records, results, meshes, started)
      if in_flight is not None:
        yield self._settle(*in_flight)


class Engine:
  """Runs sources through a fit stage into a sink: `run(sources, sink)` fits what the sink does
  not hold yet and returns the summary. The engine keeps what every run shares (the resume
  decision, the writer thread, counts, timings, the summary); the fit stage is the `Fitter` it
  is given.

  Args:
    loaded: the model and its embedding (model_loading.load_model).
    config: the fit settings.
    options: host settings.
    progress: called with the number of inputs settled (skipped, written) as they settle.
    fitter: the fit stage (default: a LocalFitter of loaded, config and options).
  """

  def __init__(self, loaded: LoadedModel, config: FitConfig, options: EngineOptions,
               progress: Optional[Callable[[int], None]] = None,
               fitter: Optional[Fitter] = None):
    if options.batch_size < 1:
      raise ConfigError(f"batch_size must be >= 1, got {options.batch_size}.")
    self.loaded, self.config, self.options = loaded, config, options
    self.progress = progress or (lambda count: None)
    self.fitter: Fitter = fitter if fitter is not None else LocalFitter(loaded, config, options)
    self.counts: Dict[str, int] = {}
    self.timings = dict(write_s=0.0, wall_s=0.0, steady_s=0.0, steady_images=0)
    self.source_missing = None
    self._first_written = None

  @property
  def landmark_indices(self) -> np.ndarray:
    """(K,) the MediaPipe landmark of each fitted point."""
    return self.fitter.landmark_indices

  # --- what to do ---------------------------------------------------------------------------

  def _todo(self, sources: Iterable[Source], committed: Mapping[str, Mapping],
            unseen: set) -> Iterator[Source]:
    """The sources to fit; each one listed is taken out of `unseen` (committed ids)."""
    for source in sources:
      unseen.discard(source.name)
      reason = needs_fit(source, SourceFacts.of(source.path), committed.get(source.name),
                         self.options.overwrite)
      if reason is None:
        self._count(STATUS_SKIPPED)
        self.progress(1)
        continue
      if reason not in ("new",):
        logging.info("%s: refitting: %s", source.name, reason)
      yield source

  def _count(self, status: str, amount: int = 1):
    self.counts[status] = self.counts.get(status, 0) + amount

  # --- the run --------------------------------------------------------------------------------

  def run(self, sources: Iterable[Source], sink: Sink) -> dict:
    started_at = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    self.counts = {}
    self._first_written = None
    self.timings.update(steady_s=0.0, steady_images=0)
    committed = sink.committed()
    unseen = set(committed)
    self.source_missing = None
    writer = _Writer(sink, depth=2, on_written=self._written)
    writer.start()
    interrupted = None
    try:
      # Closed on the way out, so the fit stage stops its workers (or its cluster's tasks).
      with contextlib.closing(self.fitter.fitted(self._todo(sources, committed, unseen))) as fitted:
        for images in fitted:
          writer.put(images)
      self.source_missing = missing_sources(committed, unseen)
    except BaseException as error:  # KeyboardInterrupt, SystemExit from SIGTERM, disk full
      interrupted = error
      raise
    finally:
      try:
        writer.finish()
      finally:
        self.timings["write_s"] = writer.write_seconds
        self.timings["wall_s"] = time.perf_counter() - wall
        summary = self._summary(started_at, interrupted)
        sink.close(summary)
    return summary

  def _written(self, images: List[FittedImage]):
    for image in images:
      self._count(image.entry["status"])
    # The steady state: from the first batch written (start-up, tracing and the first compile
    # are behind) to the end; a long run's rate approaches steady_images / steady_s.
    now = time.perf_counter()
    if self._first_written is None:
      self._first_written = now
    else:
      self.timings["steady_images"] += len(images)
      self.timings["steady_s"] = now - self._first_written
    self.progress(len(images))

  def _summary(self, started_at, interrupted) -> dict:
    summary = dict(
        jflame_run=2, started=started_at.isoformat(),
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        interrupted=None if interrupted is None else type(interrupted).__name__,
        **run_provenance(self.loaded, self.config), options=dataclasses.asdict(self.options),
        batch_buckets=sorted(self.fitter.buckets_used),
        timings={**self.fitter.timings, **self.timings},
        this_run=dict(self.counts), source_missing=self.source_missing)
    summary.update(self.fitter.describe())
    return summary


def fit_images(paths: Sequence, loaded: Optional[LoadedModel] = None,
               config: Optional[FitConfig] = None,
               options: Optional[EngineOptions] = None) -> List[FittedImage]:
  """Fits photos through the engine the commands use and returns them, in input order.

  Args:
    paths: image files and folders (a folder's images sorted by name), as `--input` takes them.
    loaded: the model (default: `load_model()`: a FLAME file in $JFLAME_HOME or ~/.cache/jflame,
      else the SYNTHETIC head).
    config: fit settings (default FitConfig()).
    options: host settings (default EngineOptions(); landmarks_only follows the fit mode).

  Returns:
    one FittedImage per input: `entry` (id, source, status, message, quality), and for a fit
    `arrays` (the result record, as a result's .npz holds it), `result` and `meshes`.

  Raises:
    InputError: a path names nothing, or no image was found.
  """
  loaded = load_model() if loaded is None else loaded
  config = FitConfig() if config is None else config
  if options is None:
    options = EngineOptions(landmarks_only=not config.photometric)
  kept = KeptResults()
  Engine(loaded, config, options).run(sources.list_sources([str(path) for path in paths]), kept)
  return kept.images

