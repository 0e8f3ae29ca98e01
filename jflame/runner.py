"""The main job: a list of photographs in, per-image FLAME fits out.

Host and device stages alternate per batch: preprocess (MediaPipe, optionally in worker
processes) -> one compiled fit of the whole padded batch -> writers. Every batch has the same
shape, so the fit compiles once per run. A bad image becomes a status line in the manifest,
never an exception that ends the run, and finished results are never overwritten unless asked.
"""

import dataclasses
import datetime
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from jflame import flame_io, landmarks, landmarks_io, sharding
from jflame.albedo_io import load_texture_albedo
from jflame.assets import find_asset
from jflame.config import FitConfig
from jflame.errors import ConfigError, ModelFileError
from jflame.fit import FitModel, fit_batch, fitted_meshes, make_fit_model
from jflame.flame import FlameModel
from jflame.initializers.initial_guess import initial_guess_for_batch

if TYPE_CHECKING:
  from jflame.preprocess import PreparedImage

# The preprocessing (OpenCV, MediaPipe) and writer (OpenCV, trimesh) modules are imported where a
# run uses them, so loading a model and preparing a fit (benchmarks, a bare accelerator image)
# needs neither.

FLAME_FILE_NAMES = ("generic_model.npz", "flame2023.npz", "generic_model.pkl", "flame2023.pkl",
                    "flame2023_Open.pkl")
EMBEDDING_FILE_NAMES = ("mediapipe_landmark_embedding.npz",)
TEXTURE_FILE_NAMES = ("FLAME_albedo_from_BFM.npz", "FLAME_texture.npz")


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Host-side settings of a run (the device-side ones are in FitConfig)."""
  output_dir: Path
  batch_size: int = 16
  crop_size: int = 256
  workers: int = 1
  overwrite: bool = False
  mesh_format: str = "obj"
  write_overlay: bool = True
  deca_model: Optional[str] = None
  mica_model: Optional[str] = None
  texture_model: Optional[str] = None
  texture_components: int = 50
  texture_size: int = 256


@dataclasses.dataclass
class LoadedModel:
  model: FlameModel
  embedding: landmarks.LandmarkEmbedding
  description: str


def load_model(flame_path: Optional[str] = None, embedding_path: Optional[str] = None,
               seed: int = 0, variant: Optional[str] = None):
  """The FLAME model and its MediaPipe embedding: the given/configured files, else the
  synthetic model (which carries its own embedding). The description says which. `variant`
  states the FLAME release when the file does not show it (see flame_io.detect_variant)."""
  path = find_asset(flame_path, FLAME_FILE_NAMES, "FLAME model")
  if path is None:
    from jflame import synthetic  # only needed without a real model
    model, embedding = synthetic.synthetic_flame("flame", seed=seed)
    return LoadedModel(model, embedding,
                       f"{model.name} (no FLAME model file given or found in $JFLAME_HOME or "
                       "~/.cache/jflame; see WORKSPACE.md)")
  model = flame_io.load_flame(path, variant=variant)
  embedding_file = find_asset(embedding_path, EMBEDDING_FILE_NAMES, "MediaPipe landmark embedding")
  if embedding_file is None:
    raise ModelFileError(
        f"the FLAME model {path} needs a MediaPipe landmark embedding "
        "(mediapipe_landmark_embedding.npz): pass --embedding or put it next to the model in "
        "$JFLAME_HOME or ~/.cache/jflame. See WORKSPACE.md.")
  embedding = landmarks_io.load_mediapipe_embedding(embedding_file)
  landmarks.check_embedding_fits(embedding, model.faces.shape[0], str(embedding_file))
  return LoadedModel(model, embedding,
                     f"{model.name} ({model.variant}) with {embedding_file.name}")


def load_albedo(loaded: LoadedModel, options: RunOptions):
  """The FLAME texture space for photometric fitting when the user has one (flag, then the
  search folders), else None (the fit then uses the built-in Laplacian basis). A FLAME UV map
  means nothing on the synthetic head, so there a texture file is refused if given and
  ignored if merely found."""
  path = find_asset(options.texture_model, TEXTURE_FILE_NAMES, "FLAME texture space")
  if path is None:
    return None
  if loaded.model.is_synthetic:
    if options.texture_model:
      raise ConfigError(f"{path} is a FLAME UV texture space; it does not fit the synthetic "
                        "head. Pass a real FLAME model, or drop --texture_model.")
    logging.info("texture space %s not used with the synthetic model", path)
    return None
  uv_path = find_asset(None, ("FLAME_texture.npz",), "FLAME texture UVs")
  return load_texture_albedo(path, np.asarray(loaded.model.faces), options.texture_components,
                             options.texture_size, uv_path=uv_path)


def prepare_fit_model(loaded: LoadedModel, config: FitConfig, albedo=None) -> FitModel:
  reference = landmarks_io.load_mediapipe_reference()
  region = landmarks.mediapipe_landmark_weights(reference, config.region_weights)
  embedding = landmarks.select_regions(loaded.embedding, config.landmark_regions, reference)
  return make_fit_model(loaded.model, np.asarray(embedding.face_indices),
                        np.asarray(embedding.barycentrics), np.asarray(embedding.landmark_indices),
                        region[np.asarray(embedding.landmark_indices)], config, albedo)


def load_encoders(loaded: LoadedModel, options: RunOptions):
  """DECA and MICA encoders (ONNX) when the user has them, else None each. Their coefficients
  are FLAME 2020's, so with any other head model they are not used (and a given path is an
  error rather than a silent mismatch)."""
  from jflame.initializers.deca import DecaEncoder
  from jflame.initializers.mica import MicaEncoder
  deca = DecaEncoder.find(options.deca_model)
  mica = MicaEncoder.find(options.mica_model)
  variant = loaded.model.variant
  if (deca or mica) and variant != "flame2020":
    if options.deca_model or options.mica_model:
      raise ConfigError(
          f"DECA/MICA estimate FLAME 2020 coefficients, but the model {loaded.model.name} is "
          f"{variant}. Use FLAME 2020 (generic_model.pkl); if this file is FLAME 2020 under "
          "another name, say so with --flame_variant=flame2020; or drop --deca_model/"
          "--mica_model.")
    logging.info("DECA/MICA files found but not used: the model is %s, not flame2020", variant)
    return None, None
  return deca, mica


def _chunks(items: Sequence, size: int):
  for start in range(0, len(items), size):
    yield items[start:start + size]


def take(tree, slot: int):
  """One image of a batched pytree (every leaf indexed on its leading axis)."""
  return jax.tree.map(lambda x: x[slot], tree)


class Run:
  """One run over a list of images: preprocess -> fit -> write, a batch at a time. Call
  `fit(paths, names)`; it returns the manifest (also written to the output folder)."""

  def __init__(self, loaded: LoadedModel, config: FitConfig, options: RunOptions,
               progress: Optional[Callable[[int], None]] = None):
    self.loaded, self.config, self.options = loaded, config, options
    self.progress = progress or (lambda count: None)
    self.mesh = sharding.batch_mesh() if len(jax.local_devices()) > 1 else None
    if self.mesh is not None and options.batch_size % self.mesh.size:
      raise ConfigError(f"--batch_size {options.batch_size} must be a multiple of the "
                        f"{self.mesh.size} local devices the batch is split over.")
    albedo = load_albedo(loaded, options) if config.photometric else None
    self.fit_model = sharding.replicate(prepare_fit_model(loaded, config, albedo), self.mesh)
    self.encoders = load_encoders(loaded, options)
    self.images: List[dict] = []
    self.timings = dict(preprocess_s=0.0, fit_s=0.0, first_fit_s=None, write_s=0.0)

  def fit(self, paths: Sequence[Path], names: Sequence[str]):
    """Fits every image; returns the manifest dict (also written to the output folder)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    from jflame import output
    from jflame.preprocess import Preprocessor
    out = Path(self.options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for path, name in zip(paths, names):
      if not self.options.overwrite and output.result_is_finished(out, name):
        self.images.append(dict(name=name, source=str(path), status="skipped",
                                message="a finished result exists (pass --overwrite to redo)"))
        self.progress(1)
      else:
        todo.append((path, name))
    chunks = list(_chunks(todo, self.options.batch_size))
    with Preprocessor(self.options.crop_size, workers=self.options.workers) as preprocessor:
      pending = preprocessor.prepare_iter(*zip(*chunks[0])) if chunks else None
      for index in range(len(chunks)):
        start = time.perf_counter()
        records = list(pending)
        self.timings["preprocess_s"] += time.perf_counter() - start
        if index + 1 < len(chunks):
          # With worker processes the next chunk is preprocessed while this one is fitted.
          pending = preprocessor.prepare_iter(*zip(*chunks[index + 1]))
        self._write_batch(records, *self._fit_batch(records))
    manifest = self._manifest(started)
    output.write_manifest(out / "run_summary.json", manifest)
    return manifest

  def _fit_batch(self, records: List["PreparedImage"]):
    """The device part of one batch: (FitResult, FittedMeshes) as host arrays."""
    from jflame.preprocess import stack_observations
    options, config = self.options, self.config
    start = time.perf_counter()
    observations = stack_observations(records, options.batch_size, options.crop_size)
    guess = None
    if any(encoder is not None for encoder in self.encoders):
      guess = initial_guess_for_batch(records, options.batch_size, *self.encoders,
                                      num_shape=config.num_shape,
                                      num_expression=config.num_expression)
    results = fit_batch(self.fit_model, sharding.shard_batch(observations, self.mesh), config,
                        sharding.shard_batch(guess, self.mesh))
    meshes = fitted_meshes(self.loaded.model, self.fit_model, results, config, options.crop_size)
    results, meshes = jax.device_get((results, meshes))
    elapsed = time.perf_counter() - start
    if self.timings["first_fit_s"] is None:
      self.timings["first_fit_s"] = elapsed  # includes compilation
    else:
      self.timings["fit_s"] += elapsed
    return results, meshes

  def _write_batch(self, records: List["PreparedImage"], results, meshes):
    start = time.perf_counter()
    for slot, record in enumerate(records):
      self.images.append(self._write(record, take(results, slot), take(meshes, slot)))
      self.progress(1)
    self.timings["write_s"] += time.perf_counter() - start

  def _write(self, record: "PreparedImage", result, meshes) -> dict:
    """Writes one image's files; returns its manifest entry."""
    from jflame import output
    entry = dict(name=record.name, source=str(record.source) if record.source else None,
                 status=record.status, message=record.message, num_faces=record.num_faces)
    if not record.ok:
      return entry
    if not bool(result.fitted):
      entry.update(status="fit_failed",
                   message="the optimisation diverged (non-finite loss or gradient); the last "
                           "finite values were discarded and nothing was written")
      return entry
    out = Path(self.options.output_dir)
    albedo = self.fit_model.albedo
    arrays = output.result_record(
        record, result, model_name=self.loaded.model.name, mode=self.config.mode.value,
        crop_size=self.options.crop_size, landmark_indices=self.fit_model.landmark_indices,
        albedo_name=albedo.name if albedo is not None else None)
    files = []
    if self.options.mesh_format:
      mesh_path = out / f"{record.name}.{self.options.mesh_format}"
      output.save_mesh(mesh_path, meshes.vertices, self.loaded.model.faces,
                       header=f"jflame fit of {record.name}; model: {self.loaded.model.name}")
      files.append(mesh_path.name)
    if self.options.write_overlay:
      files += output.write_pictures(out, record, arrays, meshes, self.loaded.model.faces)
    # The parameters file goes last: its presence with status ok marks the result finished.
    output.save_parameters(out / f"{record.name}.npz", arrays)
    files.insert(0, f"{record.name}.npz")
    entry.update(landmark_error_px=arrays["landmark_error_px"],
                 landmark_error_relative=arrays["landmark_error_relative"], files=files)
    return entry

  def _manifest(self, started) -> dict:
    counts = {}
    for image in self.images:
      counts[image["status"]] = counts.get(image["status"], 0) + 1
    return dict(
        jflame_run=1, started=started.isoformat(),
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        model=self.loaded.description, model_variant=self.loaded.model.variant,
        synthetic_model=self.loaded.model.is_synthetic,
        embedding=self.loaded.embedding.name, device=str(jax.devices()[0]),
        python=platform.python_version(), jax=jax.__version__,
        config=dataclasses.asdict(self.config),
        options={k: str(v) for k, v in dataclasses.asdict(self.options).items()},
        timings=self.timings, counts=counts, images=self.images)
