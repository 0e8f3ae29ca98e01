"""jflame: fit the FLAME head model to photographs with JAX.

    import jflame
    loaded = jflame.load_model()                  # a FLAME file + embedding, or the SYNTHETIC head
    config = jflame.FitConfig()
    fit_model = jflame.prepare_fit_model(loaded, config)
    with jflame.Preprocessor(crop_size=256) as preprocessor:
      records = preprocessor.prepare(["a.jpg", "b.jpg"])
    results = jflame.fit_batch(fit_model, jflame.stack_observations(records, 2, 256), config)
    meshes = jflame.fitted_meshes(loaded.model, fit_model, results, config, 256)
    arrays = jflame.result_record(records[0], jflame.take(results, 0), ...)

The names are loaded on first use, so `import jflame` stays light: the preprocessing names
bring in OpenCV and MediaPipe, the writers trimesh, and nothing else does.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "FitConfig": "jflame.config", "FitMode": "jflame.config",
    "FlameModel": "jflame.flame", "FlameParams": "jflame.flame", "flame_forward": "jflame.flame",
    "Camera": "jflame.camera", "project": "jflame.camera",
    "Observation": "jflame.observation",
    "InitialGuess": "jflame.starting_point",
    "FitModel": "jflame.fit", "FitResult": "jflame.fit", "FittedMeshes": "jflame.fit",
    "fit_batch": "jflame.fit", "fitted_meshes": "jflame.fit", "make_fit_model": "jflame.fit",
    "load_flame": "jflame.flame_io",
    "synthetic_flame": "jflame.synthetic",
    "Preprocessor": "jflame.preprocess", "PreparedImage": "jflame.preprocess",
    "stack_observations": "jflame.preprocess", "list_sources": "jflame.sources",
    "read_image": "jflame.preprocess",
    "LoadedModel": "jflame.model_loading", "load_model": "jflame.model_loading",
    "prepare_fit_model": "jflame.model_loading", "take": "jflame.fit",
    "fit_images": "jflame.engine", "FittedImage": "jflame.fitted_image",
    "result_record": "jflame.output", "save_mesh": "jflame.output",
    "save_parameters": "jflame.output", "write_pictures": "jflame.output",
    "JFlameError": "jflame.errors", "ConfigError": "jflame.errors",
    "ModelFileError": "jflame.errors", "InputError": "jflame.errors",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jflame' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
