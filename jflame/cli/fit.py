"""jflame-fit: fit FLAME to every face photograph in a file, folder or glob.

  jflame-fit --input photos/ --output results/ [--flame_model generic_model.npz]
             [--embedding mediapipe_landmark_embedding.npz] [--batch_size 16] [--mode landmark]

Writes per image <name>.npz (parameters, cameras, landmarks, crop transform, losses),
<name>.obj (mesh) and <name>_overlay.png (fit over the photo), plus run_summary.json. Exits
non-zero only when nothing could be fitted.
"""

import sys

from absl import app, flags, logging
from tqdm import tqdm

from jflame.config import FitConfig
from jflame.errors import JFlameError

_INPUT = flags.DEFINE_list("input", None, "Image file(s), folder(s) or glob pattern(s).")
_OUTPUT = flags.DEFINE_string("output", "jflame_output", "Output folder.")
_FLAME_MODEL = flags.DEFINE_string(
    "flame_model", None, "FLAME model (.pkl or .npz). Default: $JFLAME_HOME or ~/.cache/jflame, "
    "else the built-in SYNTHETIC model (not FLAME; for trying jflame out).")
_FLAME_VARIANT = flags.DEFINE_enum(
    "flame_variant", None, ["flame2020", "flame2023", "flame2023_open"],
    "Which FLAME release --flame_model is, when its file name does not say (FLAME 2020 and 2023 "
    "share their topology, so the arrays cannot tell). DECA/MICA need flame2020.")
_EMBEDDING = flags.DEFINE_string(
    "embedding", None, "MediaPipe landmark embedding (.npz) for a real FLAME model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images fitted at once (one compiled "
                                   "program; the last batch is padded).")
_CROP_SIZE = flags.DEFINE_integer("crop_size", 256, "Side of the aligned face crop, pixels.")
_MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "Fitting mode.")
_RIGID_ITERATIONS = flags.DEFINE_integer("rigid_iterations", 200, "Stage 1 (camera) steps.")
_FULL_ITERATIONS = flags.DEFINE_integer("full_iterations", 200, "Stage 2 (all groups) steps.")
_NUM_SHAPE = flags.DEFINE_integer("num_shape", 100, "Shape coefficients fitted.")
_NUM_EXPRESSION = flags.DEFINE_integer("num_expression", 50, "Expression coefficients fitted.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Preprocessing worker processes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo images that already have a finished "
                               "result in the output folder.")
_MESH_FORMAT = flags.DEFINE_enum("mesh_format", "obj", ["obj", "ply", ""], "Mesh file format "
                                 "('' writes none).")
_DECA_MODEL = flags.DEFINE_string(
    "deca_model", None, "DECA encoder exported to ONNX (optional initialiser; FLAME 2020 only). "
    "Default: deca_encoder.onnx in $JFLAME_HOME or ~/.cache/jflame when present.")
_MICA_MODEL = flags.DEFINE_string(
    "mica_model", None, "MICA identity encoder exported to ONNX (optional initialiser; FLAME "
    "2020 only). Default: mica.onnx in $JFLAME_HOME or ~/.cache/jflame when present.")
_TEXTURE_MODEL = flags.DEFINE_string(
    "texture_model", None, "FLAME texture space (FLAME_albedo_from_BFM.npz or FLAME_texture.npz) "
    "for --mode=photometric. Default: found in $JFLAME_HOME or ~/.cache/jflame, else the built-in "
    "Laplacian albedo basis.")
_TEXTURE_COMPONENTS = flags.DEFINE_integer("texture_components", 50,
                                           "Texture-space components fitted.")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", 256, "Texture resolution used in fitting "
                                     "(must divide the file's; smaller is faster).")
_OVERLAY = flags.DEFINE_bool(
    "overlay", True, "Write the overlay picture(s). Drawing on the full-size photo re-reads it, "
    "which can cost more than a landmark fit: --nooverlay for the fastest runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic model (used when no FLAME file).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Progress and results go to stdout; log lines only for warnings and errors unless asked
    # for with --verbosity=0 (JAX's backend probing is noise on a normal run).
    logging.set_verbosity(logging.WARNING)
  from jflame import runner  # heavy imports after flag parsing, so --help is instant
  from jflame.preprocess import list_images, unique_names
  if not _INPUT.value:
    raise app.UsageError("--input is required (a file, folder or glob).")
  config = FitConfig(num_shape=_NUM_SHAPE.value, num_expression=_NUM_EXPRESSION.value,
                     rigid_iterations=_RIGID_ITERATIONS.value,
                     full_iterations=_FULL_ITERATIONS.value, mode=_MODE.value)
  options = runner.RunOptions(output_dir=_OUTPUT.value, batch_size=_BATCH_SIZE.value,
                              crop_size=_CROP_SIZE.value, workers=_WORKERS.value,
                              overwrite=_OVERWRITE.value, mesh_format=_MESH_FORMAT.value,
                              deca_model=_DECA_MODEL.value, mica_model=_MICA_MODEL.value,
                              texture_model=_TEXTURE_MODEL.value,
                              texture_components=_TEXTURE_COMPONENTS.value,
                              texture_size=_TEXTURE_SIZE.value, write_overlay=_OVERLAY.value)
  try:
    paths = list_images(_INPUT.value)
    loaded = runner.load_model(_FLAME_MODEL.value, _EMBEDDING.value, _SEED.value,
                               _FLAME_VARIANT.value)
  except JFlameError as err:
    logging.error("%s", err)
    return 2
  print(f"model: {loaded.description}", flush=True)
  try:
    with tqdm(total=len(paths), unit="image", desc="jflame-fit") as bar:
      run = runner.Run(loaded, config, options, progress=bar.update)
      manifest = run.fit(paths, unique_names(paths))
  except JFlameError as err:  # a run-wide problem (e.g. an encoder file); images are per-item
    logging.error("%s", err)
    return 2
  counts = manifest["counts"]
  print(f"done: {counts} -> {options.output_dir}/run_summary.json")
  for image in manifest["images"]:
    if image["status"] not in ("ok", "skipped"):
      print(f"  {image['name']}: {image['status']}: {image['message']}")
  return 0 if counts.get("ok", 0) + counts.get("skipped", 0) > 0 else 1


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
