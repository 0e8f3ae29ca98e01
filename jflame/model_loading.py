"""Model loading: what a run needs before its first image (the model and its embedding, the
device-side fit model, the optional albedo space and encoders). The run itself is
`jflame.engine`; process-wide JAX settings are `jflame.process_settings`."""

import dataclasses
import hashlib
import platform
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from absl import logging

from jflame import flame_io, landmarks, landmarks_io
from jflame.albedo_io import load_texture_albedo
from jflame.assets import find_asset, search_folders
from jflame.config import FitConfig
from jflame.errors import ConfigError, JFlameError, ModelFileError
from jflame.fit import FitModel, make_fit_model
from jflame.flame import FlameModel

FLAME_FILE_NAMES = ("generic_model.npz", "flame2023.npz", "generic_model.pkl", "flame2023.pkl",
                    "flame2023_Open.pkl")
EMBEDDING_FILE_NAMES = ("mediapipe_landmark_embedding.npz",)
TEXTURE_FILE_NAMES = ("FLAME_albedo_from_BFM.npz", "FLAME_texture.npz")


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
    model, embedding = synthetic_model(seed)
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


def _synthetic_fingerprint() -> str:
  """Changes whenever the code or data the synthetic model is generated from changes."""
  package = Path(__file__).resolve().parent
  digest = hashlib.blake2b(digest_size=8)
  for path in sorted((package / "synthetic").glob("*.py")) + [
      package / "data" / "mediapipe_face.npz", package / "flame_io.py"]:
    digest.update(path.read_bytes())
  return digest.hexdigest()


def synthetic_model(seed: int = 0):
  """The synthetic FLAME-size head and its embedding. Generating it takes seconds, so the
  result is kept under $JFLAME_HOME (or ~/.cache/jflame)/synthetic, keyed by the generating
  code; a missing, stale or unreadable copy is simply generated again."""
  folder = search_folders()[0] / "synthetic"
  stem = folder / f"synthetic-flame-seed{seed}-{_synthetic_fingerprint()}"
  model_path, embedding_path = Path(f"{stem}.npz"), Path(f"{stem}-embedding.npz")
  if model_path.is_file() and embedding_path.is_file():
    try:
      return (flame_io.load_flame(model_path),
              landmarks_io.load_mediapipe_embedding(embedding_path))
    except JFlameError as error:
      logging.warning("regenerating the synthetic model: %s", error)
  from jflame import synthetic  # only needed without a real model
  model, embedding = synthetic.synthetic_flame("flame", seed=seed)
  try:
    flame_io.save_flame_npz(model, model_path)
    landmarks_io.save_mediapipe_embedding(embedding, embedding_path)
  except OSError as error:  # a read-only home: generate every time
    logging.info("synthetic model not cached: %s", error)
  return model, embedding


def load_albedo(loaded: LoadedModel, options):
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


def _fitted_embedding(loaded: LoadedModel, config: FitConfig, reference):
  """The embedding restricted to the landmark regions the fit uses."""
  return landmarks.select_regions(loaded.embedding, config.landmark_regions, reference)


def run_provenance(loaded: LoadedModel, config) -> dict:
  """What produced a run's results, as every command's summary or manifest records it: the
  model, its variant and embedding, this process's first device, Python, JAX and the fit
  settings (a FitConfig or TrackConfig)."""
  return dict(model=loaded.description, model_variant=loaded.model.variant,
              synthetic_model=loaded.model.is_synthetic, embedding=loaded.embedding.name,
              device=str(jax.devices()[0]), python=platform.python_version(),
              jax=jax.__version__, config=dataclasses.asdict(config))


def fitted_landmark_indices(loaded: LoadedModel, config: FitConfig) -> np.ndarray:
  """(K,) the MediaPipe landmark of each fitted point, without building the fit model (for a
  driver whose fits run elsewhere)."""
  reference = landmarks_io.load_mediapipe_reference()
  return np.asarray(_fitted_embedding(loaded, config, reference).landmark_indices)


def prepare_fit_model(loaded: LoadedModel, config: FitConfig, albedo=None) -> FitModel:
  reference = landmarks_io.load_mediapipe_reference()
  region = landmarks.mediapipe_landmark_weights(reference, config.region_weights)
  embedding = _fitted_embedding(loaded, config, reference)
  return make_fit_model(loaded.model, np.asarray(embedding.face_indices),
                        np.asarray(embedding.barycentrics), np.asarray(embedding.landmark_indices),
                        region[np.asarray(embedding.landmark_indices)], config, albedo)


def load_encoders(loaded: LoadedModel, options):
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
