"""jflame-track: fit FLAME to a video: one identity for the clip, a smooth per-frame track.

  jflame-track --input clip.mp4 --output tracked/ [--mode landmark|photometric]
               [--flame_model generic_model.npz --embedding mediapipe_landmark_embedding.npz]
  jflame-track --cameras camera_params.json --input clips/ --output tracked/

Writes track.parquet (one row per frame: status, every FLAME parameter, cameras, detected and
fitted landmarks, landmark error), overlay.mp4 (the mesh over every frame), track.png (the main
parameters over time) and manifest.json (the clip's shape, settings, counts, timings). With
--cameras (a calibrated rig: one clip per camera, cam_<serial>.mp4 or cam_<serial>/ frames,
synchronised), rig_track.npz (per moment: parameters, the head's pose in the camera file's world,
every view's landmarks and errors), overlay_cam_<serial>.mp4 per view and manifest.json. Exits 1
when no frame could be fitted, 2 for a usage problem (one line on stderr: a missing input, an
output folder that cannot be written or that another jflame run is writing to).
"""

import sys
from pathlib import Path

from absl import flags, logging
from tqdm import tqdm

from jflame.cli import app as cli_app
from jflame.cli import model_flags

_INPUT = flags.DEFINE_string("input", None, "A video file (anything OpenCV reads) or a folder of "
                             "ordered frames (sorted by name).")
_OUTPUT = flags.DEFINE_string("output", "jflame_track", "Output folder.")
_MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "Fitting mode.")
_CROP_SIZE = flags.DEFINE_integer(
    "crop_size", None, f"Side of the clip's crop in pixels, {cli_app.MIN_CROP_SIZE}.."
    f"{cli_app.MAX_CROP_SIZE} (one crop for the whole clip). Default: 256 for landmark mode, 128 "
    "for photometric (the render size).", lower_bound=cli_app.MIN_CROP_SIZE,
    upper_bound=cli_app.MAX_CROP_SIZE)
_NUM_SHAPE = flags.DEFINE_integer("num_shape", 100, "Shape coefficients fitted.", lower_bound=1)
_NUM_EXPRESSION = flags.DEFINE_integer("num_expression", 50, "Expression coefficients fitted.",
                                       lower_bound=1)
_FULL_ITERATIONS = flags.DEFINE_integer("full_iterations", 150, "Landmark-stage Adam steps.",
                                        lower_bound=0, upper_bound=cli_app.MAX_ITERATIONS)
_PHOTOMETRIC_ITERATIONS = flags.DEFINE_integer(
    "photometric_iterations", 40, "Photometric-stage Adam steps (with --cameras, unless given: "
    "100, over the whole clip).", lower_bound=0,
    upper_bound=cli_app.MAX_ITERATIONS)
_SEGMENT_LENGTH = flags.DEFINE_integer("segment_length", 32, "Frames per segment (segments "
                                       "are fitted in parallel), >= 2.", lower_bound=2)
_OVERLAP = flags.DEFINE_integer("overlap", 4, "Frames shared by neighbouring segments, below "
                                "--segment_length.", lower_bound=0)
_SMOOTHING = flags.DEFINE_float("smoothing", 1.0, "Multiplies every temporal-prior weight, >= 0 "
                                "(0 fits frames independently but with one shape).",
                                lower_bound=0.0)
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "Track at most this many frames (0: all).",
                                   lower_bound=0)
_OVERLAY = flags.DEFINE_bool("overlay", True, "Write overlay.mp4.")
_PLOT = flags.DEFINE_bool("plot", True, "Write track.png.")
_SOLVE_FOCAL = flags.DEFINE_bool(
    "solve_focal", False, "Solve the camera's focal length from the clip (16 frames with a face, "
    "one joint solve) instead of assuming a 20 degree field of view across the crop. For an "
    "unknown lens: on synthetic clips shot with a 1000 px lens it lands within 3% for most "
    "faces and up to 8% off for some, against 27% for the assumed default.")
_LANDMARKS = flags.DEFINE_enum(
    "landmarks", "auto", ["auto", "mediapipe", "device"], "Where MediaPipe's face mesh tracks "
    "the clip: mediapipe (on the CPU), device (its JAX port on the accelerator, frames of at most "
    "512 pixels; the same tracking mode) or auto (device on an accelerator, else mediapipe).")
_CAMERAS = flags.DEFINE_string(
    "cameras", None, "A calibrated rig's camera file (NeRSemble camera_params.json, Ava-256 "
    "camera_calibration.json or jflame's cameras.json, docs/FORMAT.md): --input is then a "
    "folder holding one synchronised clip per camera, cam_<serial>.mp4 (any video OpenCV "
    "reads) or cam_<serial>/ (ordered frames); one head per moment, its pose in the file's "
    "world coordinates. Landmark mode.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep the compiled clip fit on disk (in "
    "$JFLAME_HOME/compilation_cache or ~/.cache/jflame/compilation_cache) so the next clip of a "
    "similar length starts without compiling.")


def make_config():
  """The TrackConfig the flags ask for."""
  import dataclasses
  from jflame.config import TRACK_FIT, TrackConfig
  base = TrackConfig()

  def scaled(smoothness):
    return dataclasses.replace(smoothness, **{
        field.name: getattr(smoothness, field.name) * _SMOOTHING.value
        for field in dataclasses.fields(smoothness)})
  fit = TRACK_FIT.replace(num_shape=_NUM_SHAPE.value, num_expression=_NUM_EXPRESSION.value,
                          full_iterations=_FULL_ITERATIONS.value, mode=_MODE.value)
  return base.replace(fit=fit, segment_length=_SEGMENT_LENGTH.value, overlap=_OVERLAP.value,
                      photometric_iterations=_PHOTOMETRIC_ITERATIONS.value,
                      velocity=scaled(base.velocity), acceleration=scaled(base.acceleration),
                      agreement=base.agreement * max(_SMOOTHING.value, 0.0))


def make_rig_config():
  """The TrackConfig of a rig's clips: the flags' temporal weights and coefficient counts, each
  moment fitted as `jflame-fit --cameras` fits one (`multiview.rig_config`, LM_ITERATIONS)."""
  from jflame import multiview, rig_track
  from jflame.config import FitConfig
  config = make_config()
  fit = multiview.rig_config(FitConfig(num_shape=_NUM_SHAPE.value,
                                       num_expression=_NUM_EXPRESSION.value,
                                       lm_iterations=multiview.LM_ITERATIONS, mode=_MODE.value),
                             photometric_weight=rig_track.PHOTOMETRIC_WEIGHT)
  iterations = (_PHOTOMETRIC_ITERATIONS.value if _PHOTOMETRIC_ITERATIONS.present
                else rig_track.PHOTOMETRIC_ITERATIONS)
  return config.replace(fit=fit, photometric_iterations=iterations)


def _claimed_run(job, interrupted: str, check=None):
  """Runs `job(loaded, folder)` in the claimed output folder, the compilation cache on and the
  model loaded (`check()` first, before the folder is touched): (manifest, folder, cache), or
  an exit code: one line for a usage problem, 130 and the line `interrupted` when
  interrupted."""
  from jflame import output_folder, process_settings
  from jflame.errors import JFlameError
  try:
    if check is not None:
      check()
    with output_folder.claim_output_folder(Path(_OUTPUT.value).expanduser()) as folder:
      cache = process_settings.use_default_compilation_cache() if _COMPILATION_CACHE.value else None
      loaded = model_flags.load_model()
      print(f"model: {loaded.description}", flush=True)
      manifest = job(loaded, folder)
  except JFlameError as err:
    return cli_app.usage_error(str(err))
  except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through run_command
    print(interrupted, file=sys.stderr)
    return cli_app.EXIT_INTERRUPTED
  return manifest, folder, cache


def _track_rig(source: Path) -> int:
  """`--cameras`: a rig's clips in the folder `source`."""
  from jflame import rig_track_runner
  from jflame.engine import landmark_source
  if _SOLVE_FOCAL.value:
    return cli_app.usage_error("--solve_focal has nothing to solve with --cameras: the camera "
                               "file gives every camera's focal length.")

  checked = {}

  def check():
    checked.update(config=make_rig_config(),
                   opened=rig_track_runner.open_rig_clips(_CAMERAS.value, source))

  def job(loaded, folder):
    # Photometric mode's view crops and skin masks are made on the host from the landmarks
    # found, wherever they ran.
    landmarks, _ = landmark_source(_LANDMARKS.value, photometric=False)
    with tqdm(unit="frame", desc="landmarks", delay=1.0) as bar:
      return rig_track_runner.track_rig_clips(
          loaded, checked["config"], _CAMERAS.value, source, folder,
          max_frames=_MAX_FRAMES.value, overlays=_OVERLAY.value, landmarks_where=landmarks,
          progress=bar.update, opened=checked["opened"], crop_size=_CROP_SIZE.value or 128)
  # The camera file and the clips are checked before the output folder is touched.
  store = Path(_OUTPUT.value).expanduser() / rig_track_runner.LANDMARKS_FOLDER
  interrupted = (f"interrupted: the landmarks of every camera read so far are kept in {store}; "
                 "run the same command again to finish (it reads them back instead of tracking "
                 "those clips again).")
  outcome = _claimed_run(job, interrupted, check=check)
  if isinstance(outcome, int):
    return outcome
  manifest, folder, cache = outcome
  reused = len(manifest["landmarks_read_back"])
  print(f"done: {manifest['frames']} moments of {len(manifest['serials'])} views "
        f"{manifest['counts']} ({manifest['status']})"
        + (f" (the landmarks of {reused} camera{'' if reused == 1 else 's'} read back from the "
           "last run)" if reused else "")
        + f" -> {folder}/manifest.json" + (f" (compilation cache: {cache})" if cache else ""))
  for line in manifest["messages"] + ([manifest["suspect_reason"]] if manifest["suspect"]
                                      else []):
    print(f"  {line}")
  return cli_app.EXIT_OK if manifest["status"] == "ok" else cli_app.EXIT_NOTHING_FITTED


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # heavy imports after flag parsing
  from jflame import track_runner
  from jflame.engine import landmark_source
  if not _INPUT.value:
    return cli_app.usage_error("--input is required (a video file or a folder of frames).")
  source = Path(_INPUT.value).expanduser()
  if not source.exists():
    return cli_app.usage_error(f"--input {source} does not exist; pass a video file or a folder "
                               "of frames.")
  if _CAMERAS.value:
    return _track_rig(source)
  crop_size = _CROP_SIZE.value or (128 if _MODE.value == "photometric" else 256)

  def job(loaded, folder):
    # The clip's photometric masks are drawn on the host from the tracked landmarks, so
    # device landmarks serve both modes here.
    landmarks, note = landmark_source(_LANDMARKS.value, photometric=False)
    options = track_runner.TrackOptions(output_dir=str(folder), crop_size=crop_size,
                                        max_frames=_MAX_FRAMES.value,
                                        write_overlay=_OVERLAY.value, write_plot=_PLOT.value,
                                        solve_focal=_SOLVE_FOCAL.value, landmarks=landmarks,
                                        landmarks_note=note)
    with tqdm(unit="frame", desc="landmarks", delay=1.0) as bar:
      return track_runner.track_video(loaded, make_config(), options, str(source),
                                      progress=bar.update)
  outcome = _claimed_run(job, "interrupted: each of the clip's files is written whole or not at "
                         "all; run the same command again to track it.", check=make_config)
  if isinstance(outcome, int):
    return outcome
  manifest, folder, cache = outcome
  print(f"done: {manifest['counts']} ({manifest['status']}) -> {folder}/manifest.json"
        + (f" (compilation cache: {cache})" if cache else ""))
  if manifest.get("message"):
    print(f"  {manifest['message']}")
  if manifest.get("focal_length_note"):
    print(f"  focal length: {manifest['focal_length_note']}")
  return cli_app.EXIT_OK if manifest["status"] == "ok" else cli_app.EXIT_NOTHING_FITTED


def run():
  cli_app.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
