"""The engine's stages on Ray Data (`jflame-annotate --engine=ray`): the host work spread over a
cluster's CPUs, the fits in accelerator actors, the writing where the local engine writes.

    driver:  sources (streamed) ──► skip what the sink holds (the local engine's rules)
    cluster: ray.data.from_items(paths, names)          a chunk of the todo list, one row
                                                          (and block) per fit batch
               ──► map(prepare_fit_batch)                CPU tasks, one per fit batch
               ──► map(FitActor)                         actors, one per GPU (else one on a
                                                          CPU), one fit batch per call
    driver:  iter_rows ──► the writer thread ──► the same Sink

Only the middle runs on the cluster. The driver keeps deciding what to fit and keeps writing,
through `Engine.run` itself, so shards, index, resume and superseding are the local engine's by
construction; each actor fits with a plain `Engine` built from the driver's own model, so a row
is the row the local engine would write. The driver forms the batches as the local engine
does (consecutive runs of batch_size in todo order), so the actors fit the same batches with the
same compiled programs and give the same numbers. Records and fitted images travel between the
stages as pickles (lists of dataclasses of NumPy arrays).

The worker nodes need jflame installed and the input files at the same paths (a shared file
system); the output folder is written by the driver only. The model travels from the driver
in Ray's object store, so the FLAME files need only be on the driver; optional texture and
encoder files are looked up on each actor's node.

This is the only module besides jflame.cli that imports Ray (`pip install 'jflame[ray]'`).
"""

import pickle
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import ray

from jflame import engine, runner
from jflame.config import FitConfig
from jflame.engine import Engine, EngineOptions, FittedImage
from jflame.preprocess import AnalyzerOptions, FaceAnalyzer, prepare_image
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
  if not ray.is_initialized():
    ray.init(address=address, **init_args)


def _pack(items: Sequence) -> bytes:
  """Records (dataclasses of arrays) as one pickle: Arrow holds bytes as they are, where a
  column of objects makes Ray Data try an Arrow conversion first, fail and warn."""
  return pickle.dumps(list(items), protocol=pickle.HIGHEST_PROTOCOL)


def _sources(row: dict) -> List[Source]:
  return [Source(Path(str(path)), str(name)) for path, name in zip(row["paths"], row["names"])]


# --- prepare: CPU tasks ------------------------------------------------------------------------

# One FaceAnalyzer per Ray worker process, shared by every task that process runs (building one
# takes about a second).
_analyzer: Optional[FaceAnalyzer] = None


def _process_analyzer() -> FaceAnalyzer:
  global _analyzer
  if _analyzer is None:
    _analyzer = FaceAnalyzer(AnalyzerOptions())
  return _analyzer


def prepare_fit_batch(row: dict, crop_size: int) -> dict:
  """Ray Data stage: one fit batch {paths, names} -> the same plus `records` (its
  PreparedImages, made as the local engine's Preprocessor makes them: the same defaults) and
  `prepare_s`."""
  analyzer = _process_analyzer()
  start = time.perf_counter()
  records = [prepare_image(source.path, analyzer, crop_size, name=source.name)
             for source in _sources(row)]
  return dict(paths=row["paths"], names=row["names"], records=_pack(records),
              prepare_s=time.perf_counter() - start)


# --- fit: accelerator actors -------------------------------------------------------------------

class FitActor:
  """Ray Data stage (a callable class, so an actor pool): builds the device side once, as the
  local engine does, then fits one batch (one row) per call.

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
      runner.use_compilation_cache(compilation_cache)
    self.engine = Engine(ray.get(model[0]), config, options)

  def __call__(self, row: dict) -> dict:
    images = self.engine.fit_batch(_sources(row), pickle.loads(row["records"]))
    for image in images:
      image.result = None  # no sink reads it; the entry and arrays hold what it writes
    return dict(images=_pack(images), prepare_s=row["prepare_s"])


def fit_resources(fit_actors: Optional[int] = None):
  """(resources per actor, actor count): a GPU each and one per GPU in the cluster when it has
  GPUs, else a CPU each and one actor (the fit then competes with preprocessing for CPUs)."""
  gpus = int(ray.cluster_resources().get("GPU", 0))
  if gpus:
    return dict(num_gpus=1), fit_actors or gpus
  return dict(num_cpus=1), fit_actors or 1


# --- the driver --------------------------------------------------------------------------------

class RayEngine(Engine):
  """`Engine` whose prepare and fit stages run on Ray Data; `run(sources, sink)` as the local
  one (the driver skips, counts, writes and summarises). Connect first (`connect`).

  Args:
    loaded, config, options, progress: as for `Engine` (options.workers is not used: Ray
      spreads the preprocessing).
    fit_actors: fit actors (default: one per GPU of the cluster, else one).
    compilation_cache: the actors' JAX compilation cache folder, or None.
    chunk_size: todo items per Ray dataset.
  """

  def __init__(self, loaded: runner.LoadedModel, config: FitConfig, options: EngineOptions,
               progress=None, *, fit_actors: Optional[int] = None,
               compilation_cache: Optional[str] = None, chunk_size: int = CHUNK_SIZE):
    self.fit_actors, self.compilation_cache = fit_actors, compilation_cache
    self.chunk_size = max(1, chunk_size)
    super().__init__(loaded, config, options, progress)

  def _load_device_side(self):
    # The driver fits nothing: each actor builds its own device side. Fail here, not in every
    # task, when MediaPipe's model file is missing.
    check_landmarker_task_path(AnalyzerOptions())
    self.context = dict(landmark_indices=runner.fitted_landmark_indices(self.loaded,
                                                                        self.config))
    self._model_ref = None

  def dataset_of(self, chunk: List[Source]):
    """The Ray dataset of one chunk: a row per fit batch, prepared by a CPU task, fitted by an
    actor."""
    options = self.options
    # The local engine's batches (consecutive todo items): the same buckets, the same
    # compiled programs, the same numbers. A block each, so the tasks spread.
    items = [dict(paths=[str(source.path) for source in batch],
                  names=[source.name for source in batch])
             for batch in engine.batches(chunk, options.batch_size)]
    data = ray.data.from_items(items, override_num_blocks=len(items))
    data.context.enable_progress_bars = False  # the command's own bar counts the images
    data = data.map(prepare_fit_batch, num_cpus=1, memory=PREPARE_MEMORY,
                    fn_kwargs=dict(crop_size=options.crop_size))
    resources, actors = fit_resources(self.fit_actors)
    if self._model_ref is None:
      self._model_ref = ray.put(self.loaded)
    return data.map(
        FitActor, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_args=([self._model_ref], self.config, options, self.compilation_cache),
        **resources)

  def _fitted(self, chunk: List[Source]) -> Iterator[List[FittedImage]]:
    for row in self.dataset_of(chunk).iter_rows():
      images = pickle.loads(row["images"])
      self.timings["preprocess_s"] += float(row["prepare_s"])
      self.timings["fit_s"] += sum(image.entry.get("fit_ms", 0.0) for image in images) / 1000
      yield images

  def _pipeline(self, todo: Iterator[Source], writer):
    for chunk in engine.batches(todo, self.chunk_size):
      for images in self._fitted(chunk):
        writer.put(images)

  def _summary(self, started_at, interrupted) -> dict:
    summary = super()._summary(started_at, interrupted)
    resources = ray.cluster_resources()
    summary.update(engine="ray", device=(f"ray cluster: {int(resources.get('CPU', 0))} CPUs, "
                                         f"{int(resources.get('GPU', 0))} GPUs"))
    return summary
