"""The engine's stages on Ray Data (`jflame-annotate --engine=ray`): the host work spread over a
cluster's CPUs, the fits in accelerator actors, the writing where the local engine writes.

    driver:  sources (streamed) ──► skip what the sink holds (the local engine's rules)
    cluster: ray.data.from_items(sources)               a chunk of the todo list, one row
                                                          (and block) per fit batch
               ──► map(prepare_fit_batch)                CPU tasks, one per fit batch
               ──► map(FitActor)                         actors, one per GPU (else one on a
                                                          CPU), one fit batch per call
    driver:  iter_rows ──► the writer thread ──► the same Sink

Only the middle runs on the cluster. The driver keeps deciding what to fit and keeps writing:
`RayFitter` is the fit stage an `engine.Engine` is given, so shards, index, resume and
superseding are the local engine's by construction; each actor fits with a `LocalFitter` built
from the driver's own model, so a row is the row the local engine would write. The driver forms the batches as the local engine
does (consecutive runs of batch_size in todo order), so the actors fit the same batches with the
same compiled programs and give the same numbers. Records and fitted images travel between the
stages as pickles (lists of dataclasses of NumPy arrays).

The worker nodes need jflame installed and the input files at the same paths (a shared file
system); the output folder is written by the driver only. The model travels from the driver
in Ray's object store, so the FLAME files need only be on the driver; optional texture and
encoder files are looked up on each actor's node.

This is the only module besides jflame.cli that imports Ray (`pip install 'jflame[ray]'`).
"""

import contextlib
import pickle
import signal
import threading
import time
from collections import Counter
from typing import Iterator, List, Optional

import ray
from absl import logging

from jflame import engine, model_loading, process_settings
from jflame.config import FitConfig
from jflame.engine import EngineOptions, FittedImage, LocalFitter
from jflame.preprocess import AnalyzerOptions, Preprocessor
from jflame.preprocess.mediapipe_face import check_landmarker_task_path
from jflame.sources import Source

# Heap reserved per preprocessing task: a decoded photo and its warps plus MediaPipe's graphs.
# It also keeps the stages apart: Ray Data fuses a task stage into the next actor stage when
# their resource requests match (as a CPU-only fit's would), and preprocessing would then run
# inside the few fit actors instead of over the whole cluster.
PREPARE_MEMORY = 512 * 1024 ** 2
# Todo items per Ray dataset: bounds what the driver holds for a list of millions. The fit
# actors start anew for each chunk (a model build and, without a warm compilation cache, a
# compile), so chunks are large.
CHUNK_SIZE = 50_000


def connect(address: Optional[str] = None, **init_args) -> None:
  """Joins the Ray cluster at `address` ("auto", "ray://host:10001"), or starts a local one
  (None; $RAY_ADDRESS is honoured as Ray does), unless this process is connected already."""
  if ray.is_initialized():
    return
  # ray.init replaces the caller's SIGTERM handler with sys.exit; jflame's commands turn SIGTERM
  # into their Ctrl-C path (rows kept, one line, exit 130), so the caller's handler stays.
  main_thread = threading.current_thread() is threading.main_thread()
  on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
  ray.init(address=address, **init_args)
  if on_sigterm is not None:
    signal.signal(signal.SIGTERM, on_sigterm)


def _pack(value) -> bytes:
  """Sources, records, fitted images, a batch's report (dataclasses of arrays, dicts) as one
  pickle: Arrow holds bytes as they are, where a column of objects makes Ray Data try an Arrow
  conversion first, fail and warn. Sources travel whole, whatever fields they have."""
  return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _node_id() -> str:
  return ray.get_runtime_context().get_node_id()


# --- prepare: CPU tasks ------------------------------------------------------------------------

# One Preprocessor per Ray worker process and settings, shared by every task that process runs
# (building its FaceAnalyzer takes about a second).
_preprocessors: dict = {}


def _process_preprocessor(options: EngineOptions) -> Preprocessor:
  key = (options.crop_size, options.landmarks_only)
  if key not in _preprocessors:
    _preprocessors[key] = engine.preprocessor_of(options, workers=1)
  return _preprocessors[key]


def prepare_fit_batch(row: dict, options: EngineOptions) -> dict:
  """Ray Data stage: one fit batch {sources} -> the same plus `records` (its PreparedImages,
  made by the local engine's Preprocessor settings) and `report` (seconds taken, node)."""
  preprocessor = _process_preprocessor(options)
  batch: List[Source] = pickle.loads(row["sources"])
  start = time.perf_counter()
  records = preprocessor.prepare([source.path for source in batch],
                                 [source.name for source in batch])
  report = dict(prepare_s=time.perf_counter() - start, prepare_node=_node_id())
  return dict(sources=row["sources"], records=_pack(records), report=_pack(report))


# --- fit: accelerator actors -------------------------------------------------------------------

class FitActor:
  """Ray Data stage (a callable class, so an actor pool): builds the device side once, as the
  local engine does, then fits one batch (one row) per call.

  Each actor is a `LocalFitter` of its own, so its first batch compiles and has fit_ms None, as
  the first batch of a local run has; the driver adds up the actors' timings from `report`.

  Args:
    model: [ObjectRef of the driver's LoadedModel] (in a list, so Ray hands over the reference
      and the actor fetches the model once).
    config, options: the driver's fit and host settings.
    compilation_cache: a folder for JAX's persistent compilation cache on the actor's node, or
      None.
  """

  def __init__(self, model: list, config: FitConfig, options: EngineOptions,
               compilation_cache: Optional[str] = None):
    if compilation_cache:
      process_settings.use_compilation_cache(compilation_cache)
    self.fitter = LocalFitter(ray.get(model[0]), config, options)

  def __call__(self, row: dict) -> dict:
    timings = self.fitter.timings
    fit_s, compiled_before = timings["fit_s"], timings["first_fit_s"] is not None
    images = self.fitter.fit_batch(pickle.loads(row["sources"]), pickle.loads(row["records"]))
    for image in images:
      image.result = None  # no sink reads it; the entry and arrays hold what it writes
    report = pickle.loads(row["report"])
    report.update(fit_s=timings["fit_s"] - fit_s, fit_node=_node_id(),
                  first_fit_s=None if compiled_before else timings["first_fit_s"],
                  buckets=sorted(self.fitter.buckets_used))
    return dict(images=_pack(images), report=_pack(report))


def fit_resources(fit_actors: Optional[int] = None):
  """(resources per actor, actor count): a GPU each and one per GPU in the cluster when it has
  GPUs, else a CPU each and one actor (the fit then competes with preprocessing for CPUs)."""
  gpus = int(ray.cluster_resources().get("GPU", 0))
  if gpus:
    return dict(num_gpus=1), fit_actors or gpus
  return dict(num_cpus=1), fit_actors or 1


# --- the driver --------------------------------------------------------------------------------

# The longest an interrupted run waits for Ray Data to stop a chunk's tasks and actors before it
# goes on to commit its rows and exit (Ray ends what is left when the driver disconnects).
CLOSE_SECONDS = 30.0


def _close_within(generator, seconds: float) -> None:
  """Closes `generator` (a suspended one: its cleanup stops the Ray execution), waiting at most
  `seconds`: an interrupt must reach the writer's commit however Ray's shutdown goes."""
  closer = threading.Thread(target=generator.close, name="jflame-ray-close", daemon=True)
  closer.start()
  closer.join(seconds)
  if closer.is_alive():
    logging.warning("Ray Data did not stop within %.0f s; going on without waiting.", seconds)


class RayFitter:
  """The fit stage on Ray Data (an `engine.Fitter`): preprocessing in CPU tasks over the
  cluster, fits in actors; give it to `engine.Engine`, which skips, counts, writes and
  summarises on the driver as for a local run. Connect first (`connect`).

  Timings add up the cluster's work: `preprocess_s` is the preprocessing tasks' seconds (over
  all nodes, not the driver's wait), `fit_s` the actors' fits after their first batch,
  `first_fit_s` the first compile-including batch to arrive (each actor compiles once); the
  summary's `ray` says where the batches ran.

  Args:
    loaded, config, options: as for `engine.LocalFitter` (options.workers is not used: Ray
      spreads the preprocessing).
    fit_actors: fit actors (default: one per GPU of the cluster, else one).
    compilation_cache: the actors' JAX compilation cache folder, or None.
    chunk_size: todo items per Ray dataset.
  """

  def __init__(self, loaded: model_loading.LoadedModel, config: FitConfig, options: EngineOptions,
               *, fit_actors: Optional[int] = None, compilation_cache: Optional[str] = None,
               chunk_size: int = CHUNK_SIZE):
    # The driver fits nothing: each actor builds its own device side. Fail here, not in every
    # task, when MediaPipe's model file is missing.
    check_landmarker_task_path(AnalyzerOptions())
    self.loaded, self.config, self.options = loaded, config, options
    self.fit_actors, self.compilation_cache = fit_actors, compilation_cache
    self.chunk_size = max(1, chunk_size)
    self.landmark_indices = model_loading.fitted_landmark_indices(loaded, config)
    self.timings = engine.fitter_timings()
    self.buckets_used: set = set()
    self._model_ref = None
    self._where = dict(prepare=Counter(), fit=Counter(), compiles=0)

  def dataset_of(self, chunk: List[Source]):
    """The Ray dataset of one chunk: a row per fit batch, prepared by a CPU task, fitted by an
    actor."""
    options = self.options
    # The local engine's batches (consecutive todo items): the same buckets, the same
    # compiled programs, the same numbers. A block each, so the tasks spread.
    items = [dict(sources=_pack(batch)) for batch in engine.batches(chunk, options.batch_size)]
    data = ray.data.from_items(items, override_num_blocks=len(items))
    data.context.enable_progress_bars = False  # the command's own bar counts the images
    data = data.map(prepare_fit_batch, num_cpus=1, memory=PREPARE_MEMORY,
                    fn_kwargs=dict(options=options))
    resources, actors = fit_resources(self.fit_actors)
    if self._model_ref is None:
      self._model_ref = ray.put(self.loaded)
    return data.map(
        FitActor, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_args=([self._model_ref], self.config, options, self.compilation_cache),
        **resources)

  def _settled(self, report: dict):
    """Adds one fitted batch's report to the run's timings and placement counts."""
    self.timings["preprocess_s"] += report["prepare_s"]
    self.timings["fit_s"] += report["fit_s"]
    if report["first_fit_s"] is not None:
      self._where["compiles"] += 1
      if self.timings["first_fit_s"] is None:
        self.timings["first_fit_s"] = report["first_fit_s"]
    self.buckets_used.update(report["buckets"])
    self._where["prepare"][report["prepare_node"]] += 1
    self._where["fit"][report["fit_node"]] += 1

  def _chunk_fitted(self, chunk: List[Source]) -> Iterator[List[FittedImage]]:
    # Closed on the way out (an interrupt, a writer error): Ray Data then stops the chunk's
    # tasks and actors instead of running on behind a driver that no longer reads.
    with contextlib.closing(iter(self.dataset_of(chunk).iter_rows())) as rows:
      for row in rows:
        self._settled(pickle.loads(row["report"]))
        yield pickle.loads(row["images"])

  def fitted(self, todo: Iterator[Source]) -> Iterator[List[FittedImage]]:
    self._where = dict(prepare=Counter(), fit=Counter(), compiles=0)
    for chunk in engine.batches(todo, self.chunk_size):
      fitted = self._chunk_fitted(chunk)
      try:
        for images in fitted:  # not `yield from`: closing must not wait on Ray unbounded
          yield images
      finally:
        _close_within(fitted, CLOSE_SECONDS)

  def describe(self) -> dict:
    resources = ray.cluster_resources()
    nodes = sum(node["Alive"] for node in ray.nodes())
    return dict(
        engine="ray",
        device=(f"ray cluster: {nodes} nodes, {int(resources.get('CPU', 0))} CPUs, "
                f"{int(resources.get('GPU', 0))} GPUs"),
        # Batches per node id: where the preprocessing and the fits ran; compiles: the actors
        # whose first batch (a compile) fell in this run.
        ray=dict(nodes=nodes, prepare_batches=dict(self._where["prepare"]),
                 fit_batches=dict(self._where["fit"]), compiles=self._where["compiles"]))


def engine_on_ray(loaded: model_loading.LoadedModel, config: FitConfig, options: EngineOptions,
               progress=None, **fitter_args) -> engine.Engine:
  """An `engine.Engine` whose fit stage is a `RayFitter(loaded, config, options, **fitter_args)`."""
  return engine.Engine(loaded, config, options, progress,
                       fitter=RayFitter(loaded, config, options, **fitter_args))
