"""jflame-fit: fit FLAME to every face photograph in files, folders, globs or list files.

  jflame-fit --input photos/ --output results/ [--flame_model generic_model.npz]
             [--embedding mediapipe_landmark_embedding.npz] [--batch_size 16] [--mode landmark]

Per image it writes <name>.npz (parameters, cameras, landmarks, crop transform, losses, source,
quality), a mesh and <name>_overlay.png, where <name> is the image's path relative to its input
folder with "/" as "__" (sub/a.jpg -> sub__a.jpg). manifest.jsonl records every image as it is
written; run_summary.json sums up every run into the folder. A rerun skips images whose result
was made from the same file, refits those whose file changed, and fits the rest.

Exit status: 0 when at least one image has a fitted result, 1 when none could be fitted, 2 for
a usage problem (a bad flag, no input found, a missing model file, an output folder that cannot
be written or that another run is using). Ctrl-C or SIGTERM stops after the batch in hand; what
was written stays, and a rerun finishes the rest.
"""

import sys
from pathlib import Path

from absl import flags

from jflame.cli import common, model_flags

_INPUT = flags.DEFINE_list("input", None, "Image file(s), folder(s), glob pattern(s) or list "
                           "files (.txt: one path per line).")
_OUTPUT = flags.DEFINE_string("output", "jflame_output", "Output folder (created if missing; "
                              "must not be an input folder).")
_RECURSIVE = flags.DEFINE_bool("recursive", False, "Search input folders recursively.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Preprocessing worker processes, 1..64.",
                                lower_bound=1, upper_bound=64)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo images that already have a finished "
                               "result made from the same file.")
_MESH_FORMAT = flags.DEFINE_enum("mesh_format", "obj", ["obj", "ply", ""], "Mesh file format "
                                 "('' writes none).")
_CAMERAS = flags.DEFINE_string(
    "cameras", None, "A calibrated rig's camera file (NeRSemble camera_params.json, Ava-256 "
    "camera_calibration.json or jflame's cameras.json, docs/FORMAT.md): --input is then one "
    "folder of moments (timesteps), each holding cam_<serial>.<ext> per camera, or one such "
    "folder; one head per moment, its pose in the file's world coordinates. Landmark or "
    "photometric mode (every view's render against its crop).")
_OVERLAY = flags.DEFINE_bool(
    "overlay", True, "Write the overlay picture(s). Drawing on the full-size photo re-reads it, "
    "which can cost more than a landmark fit: --nooverlay for the fastest runs.")


def main(argv) -> int:
  if len(argv) > 1:
    return common.usage_error(f"unexpected arguments {argv[1:]}; name inputs with --input.")
  common.quiet_logging()
  if not _INPUT.value:
    return common.usage_error("--input is required (a file, folder, glob or list file).")
  if _CAMERAS.value:
    return _fit_capture()
  # Heavy imports after flag parsing, so --help and usage errors are instant.
  from tqdm import tqdm
  from jflame import engine, output_folder, process_settings, sinks, sources
  from jflame.errors import JFlameError
  output = Path(_OUTPUT.value).expanduser()
  try:
    sources.check_output_not_an_input(_INPUT.value, output, _RECURSIVE.value)
    inputs = sources.list_sources(_INPUT.value, _RECURSIVE.value, exclude_folder=output)
    with output_folder.claim_output_folder(output) as folder:
      cache = common.enable_compilation_cache()
      process_settings.fit_beside_workers(_WORKERS.value)
      loaded = model_flags.load_model()
      config = common.fit_config()
      print(f"model: {loaded.description}", flush=True)
      sink = sinks.FilesSink(folder, loaded.model.faces, loaded.model.name,
                             _MESH_FORMAT.value, _OVERLAY.value,
                             retire_older_names=_OVERWRITE.value)
      options = common.engine_options(_WORKERS.value, config, overwrite=_OVERWRITE.value)
      with tqdm(total=len(inputs), unit="image", desc="jflame-fit") as bar:
        run = engine.Engine(loaded, config, options, progress=bar.update)
        summary = common.run_until_interrupted(
            run, inputs, sink, bar, f"the finished results are kept in {folder}")
        if summary is None:
          return common.EXIT_INTERRUPTED
  except JFlameError as error:
    return common.usage_error(str(error))
  return _report(summary, folder, cache)


def _fit_capture() -> int:
  """--cameras: every moment of a calibrated capture (jflame.capture_runner)."""
  if len(_INPUT.value) != 1:
    return common.usage_error("with --cameras, --input is one folder (of moments, or of one "
                              "moment's cam_<serial> images).")
  from tqdm import tqdm
  from jflame import capture_runner, output_folder, sources
  from jflame.errors import JFlameError
  output = Path(_OUTPUT.value).expanduser()
  try:
    sources.check_output_not_an_input(_INPUT.value, output, True)
    # The camera file and the capture are checked before the output folder is touched.
    opened = capture_runner.open_capture(_CAMERAS.value, _INPUT.value[0])
    with output_folder.claim_output_folder(output) as folder:
      cache = common.enable_compilation_cache()
      loaded = model_flags.load_model()
      config = common.fit_config()
      from jflame import multiview
      from jflame.model_loading import load_albedo
      albedo = load_albedo(loaded, common.engine_options(1, config)) if config.photometric else None
      config = multiview.rig_config(config)
      if not common.FULL_ITERATIONS.present and not config.photometric:
        # Adam's landmark stage over several views; a photometric stage keeps a photo's count.
        config = config.replace(full_iterations=multiview.FULL_ITERATIONS)
      if not common.LM_ITERATIONS.present:
        config = config.replace(lm_iterations=multiview.LM_ITERATIONS)
      if config.photometric and not common.LANDMARK_SOLVER.present:
        config = config.replace(landmark_solver=multiview.PHOTOMETRIC_LANDMARK_SOLVER)
      print(f"model: {loaded.description}", flush=True)
      fit_bars = {}

      def close_fit_bars():
        for fit_bar in fit_bars.values():
          fit_bar.close()

      def fitted(stage, done, total):
        """A bar per photometric pass (its fits take seconds a moment)."""
        if stage not in fit_bars:
          close_fit_bars()
          fit_bars[stage] = tqdm(total=total, unit="moment", desc=f"photometric fit ({stage})")
        fit_bars[stage].update(done - fit_bars[stage].n)

      with tqdm(total=len(opened[0]), unit="moment", desc="jflame-fit --cameras") as bar:
        try:
          manifest = capture_runner.fit_capture(loaded, config, _CAMERAS.value,
                                                _INPUT.value[0], folder, progress=bar.update,
                                                opened=opened, overlays=_OVERLAY.value,
                                                crop_size=common.CROP_SIZE.value, albedo=albedo,
                                                fit_progress=fitted)
          close_fit_bars()
        except KeyboardInterrupt:
          bar.close()
          close_fit_bars()
          store = folder / capture_runner.LANDMARKS_FOLDER
          kept = capture_runner.committed_moment_count(store)
          print(f"interrupted: the landmarks of {kept} moment{'' if kept == 1 else 's'} are "
                f"kept in {store}; run the same command again to finish (it reads them back "
                f"instead of detecting them again).", file=sys.stderr)
          return common.EXIT_INTERRUPTED
  except JFlameError as error:
    return common.usage_error(str(error))
  counts = {}
  for entry in manifest["moments"]:
    counts[entry["status"]] = counts.get(entry["status"], 0) + 1
  suspect = [entry for entry in manifest["moments"] if entry.get("suspect")]
  reused = manifest["landmarks_read_back"]
  print(f"done: {len(manifest['moments'])} moments {counts}, {len(suspect)} suspect"
        + (" (nothing changed since the last run: its files are kept)"
           if manifest.get("unchanged") else
           f" (the landmarks of {reused} read back from the last run)" if reused else "")
        + f" -> {folder / 'manifest.json'}"
        + (f" (compilation cache: {cache})" if cache else ""))
  for entry in suspect:
    print(f"  {entry['moment']}: {entry['status']}: {entry['suspect_reason']}")
  return common.EXIT_OK if counts.get("ok", 0) else common.EXIT_NOTHING_FITTED


def _report(summary, folder, cache) -> int:
  from jflame import manifest
  entries = manifest.read_entries(folder)
  counts = manifest.count_statuses(entries.values())
  print(f"done: this run {summary['this_run']}; the folder holds {counts} -> "
        f"{folder / manifest.SUMMARY_NAME}" + (f" (compilation cache: {cache})" if cache else "")
        + common.missing_note(summary))
  for entry in entries.values():
    if entry["status"] != "ok":
      print(f"  {entry['name']}: {entry['status']}: {entry.get('message', '')}")
  return common.EXIT_OK if counts.get("ok", 0) else common.EXIT_NOTHING_FITTED


def run():
  common.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
