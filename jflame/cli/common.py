"""What jflame-fit and jflame-annotate share: the fit and engine flags with their ranges (the
model flags, shared with jflame-track too, are jflame.cli.model_flags), the flag parser (usage
problems exit 2 with one line, --help lists the command's flags), the persistent compilation
cache, and turning flags into settings.

Exit status of every command: 0 when something was fitted (or everything was already done),
1 when nothing could be fitted, 2 for a usage problem (bad flag, no input found, missing model
file, unusable output folder, another run holding it).
"""

import sys
from typing import Optional

from absl import flags, logging

from jflame.cli.app import (EXIT_INTERRUPTED, EXIT_NOTHING_FITTED, EXIT_OK, EXIT_USAGE,
                            MAX_CROP_SIZE, MAX_ITERATIONS, MIN_CROP_SIZE, run_command,
                            usage_error)

# The commands that use these flags reach the runner through this module too.
__all__ = ["EXIT_INTERRUPTED", "EXIT_NOTHING_FITTED", "EXIT_OK", "EXIT_USAGE", "run_command",
           "usage_error", "run_until_interrupted",
           "enable_compilation_cache", "engine_options",
           "fit_config", "missing_note", "quiet_logging"]

MAX_BATCH_SIZE = 4096

MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "Fitting mode.")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, f"Most images fitted at once, 1..{MAX_BATCH_SIZE} (one compiled program per "
    "batch bucket: fewer images use the smallest power of two that holds them).",
    lower_bound=1, upper_bound=MAX_BATCH_SIZE)
CROP_SIZE = flags.DEFINE_integer(
    "crop_size", 256, f"Side of the aligned face crop in pixels, {MIN_CROP_SIZE}..{MAX_CROP_SIZE}.",
    lower_bound=MIN_CROP_SIZE, upper_bound=MAX_CROP_SIZE)
LANDMARK_SOLVER = flags.DEFINE_enum(
    "landmark_solver", "lm", ["lm", "adam"], "The landmark stage: lm (Levenberg-Marquardt, "
    "converges in a few steps; docs/ACCURACY.md) or adam (the --rigid/--full_iterations "
    "stages). Photometric mode runs its Adam stage after either.")
LM_ITERATIONS = flags.DEFINE_integer("lm_iterations", 5, "Levenberg-Marquardt steps.",
                                     lower_bound=0, upper_bound=1000)
RIGID_ITERATIONS = flags.DEFINE_integer("rigid_iterations", 200, "Adam stage 1 (camera) steps "
                                        "(--landmark_solver adam).", lower_bound=0,
                                        upper_bound=MAX_ITERATIONS)
FULL_ITERATIONS = flags.DEFINE_integer("full_iterations", 200, "Adam stage 2 (all groups) steps "
                                       "(--landmark_solver adam, or photometric mode).",
                                       lower_bound=0, upper_bound=MAX_ITERATIONS)
NUM_SHAPE = flags.DEFINE_integer("num_shape", 100, "Shape coefficients fitted (at most the "
                                 "model's).", lower_bound=1, upper_bound=10_000)
NUM_EXPRESSION = flags.DEFINE_integer("num_expression", 50, "Expression coefficients fitted "
                                      "(at most the model's).", lower_bound=1,
                                      upper_bound=10_000)
DECA_MODEL = flags.DEFINE_string(
    "deca_model", None, "DECA encoder exported to ONNX (optional initialiser; FLAME 2020 only). "
    "Default: deca_encoder.onnx in $JFLAME_HOME or ~/.cache/jflame when present.")
MICA_MODEL = flags.DEFINE_string(
    "mica_model", None, "MICA identity encoder exported to ONNX (optional initialiser; FLAME "
    "2020 only). Default: mica.onnx in $JFLAME_HOME or ~/.cache/jflame when present.")
TEXTURE_MODEL = flags.DEFINE_string(
    "texture_model", None, "FLAME texture space (FLAME_albedo_from_BFM.npz or FLAME_texture.npz) "
    "for --mode=photometric. Default: found in $JFLAME_HOME or ~/.cache/jflame, else the built-in "
    "Laplacian albedo basis.")
TEXTURE_COMPONENTS = flags.DEFINE_integer("texture_components", 50,
                                          "Texture-space components fitted.", lower_bound=1,
                                          upper_bound=1000)
TEXTURE_SIZE = flags.DEFINE_integer("texture_size", 256, "Texture resolution used in fitting "
                                    "(must divide the file's; smaller is faster).",
                                    lower_bound=8, upper_bound=4096)
LANDMARKS = flags.DEFINE_enum(
    "landmarks", "auto", ["auto", "mediapipe", "device"], "Where the 478-point face mesh runs. "
    "mediapipe: MediaPipe in the preprocessing workers (with jflame's search of tiles and turned "
    "copies for hard photos). device (landmark mode, local engine): MediaPipe's detector and "
    "mesh ported to JAX, batched on the accelerator; the workers only read and decode, at most "
    "512 pixels. auto: device on an accelerator in landmark mode, else mediapipe.")
COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled fitting programs on disk (in "
    "$JFLAME_HOME/compilation_cache or ~/.cache/jflame/compilation_cache) so the next run with "
    "the same shapes starts without compiling.")


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache unless --nocompilation_cache; returns the
  folder (None when off or when it cannot be created)."""
  if not COMPILATION_CACHE.value:
    return None
  from jflame import process_settings
  return process_settings.use_default_compilation_cache()


def fit_config():
  """The FitConfig the flags describe."""
  from jflame.config import FitConfig
  return FitConfig(num_shape=NUM_SHAPE.value, num_expression=NUM_EXPRESSION.value,
                   rigid_iterations=RIGID_ITERATIONS.value,
                   full_iterations=FULL_ITERATIONS.value, mode=MODE.value,
                   landmark_solver=LANDMARK_SOLVER.value, lm_iterations=LM_ITERATIONS.value)


def engine_options(workers: int, config, engine: str = "local", **extra):
  """The EngineOptions the flags describe for a run of `config` on `engine`.

  Raises:
    ConfigError: --landmarks device with a photometric fit or the Ray engine.
  """
  from jflame.engine import EngineOptions, landmark_source
  landmarks, note = landmark_source(LANDMARKS.value, config.photometric, engine)
  return EngineOptions(batch_size=BATCH_SIZE.value, crop_size=CROP_SIZE.value, workers=workers,
                       deca_model=DECA_MODEL.value, mica_model=MICA_MODEL.value,
                       texture_model=TEXTURE_MODEL.value,
                       texture_components=TEXTURE_COMPONENTS.value,
                       texture_size=TEXTURE_SIZE.value, landmarks_only=not config.photometric,
                       landmarks=landmarks, landmarks_note=note, **extra)


def run_until_interrupted(run, sources, sink, bar, kept: str):
  """`run.run(sources, sink)`; on Ctrl-C closes the progress bar, says on stderr what is kept
  (`kept`) and returns None (the caller exits with EXIT_INTERRUPTED)."""
  try:
    return run.run(sources, sink)
  except KeyboardInterrupt:
    bar.close()
    print(f"interrupted: {kept}; run the same command again to finish the rest.",
          file=sys.stderr)
    return None


def missing_note(summary) -> str:
  """The done line's note on results whose source file is gone ('' when none)."""
  missing = (summary or {}).get("source_missing") or {}
  if not missing.get("count"):
    return ""
  return (f"; {missing['count']} earlier result(s) whose source file is gone are kept "
          f"(ids in run_summary.json under source_missing, e.g. {missing['ids'][0]})")


def quiet_logging():
  """Progress and results go to stdout; log lines only for warnings and errors unless asked
  for with --verbosity (JAX's backend probing is noise on a normal run)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
