"""jflame-export: a jflame folder in the files another tool reads.

  jflame-export --input tracked/ --format gaussian_avatars --output ga_dataset/
                [--flame_model flame2023.pkl --embedding mediapipe_landmark_embedding.npz]
  jflame-export --input results/ --format now --output now_predictions/

Formats (docs/FORMAT.md, "Exports", has every key and convention):
  gaussian_avatars         from a jflame-track folder or a jflame-fit --cameras folder:
                           GaussianAvatars / VHAP's NeRF-style dataset: transforms_*.json,
                           images/, flame_param/, canonical_flame_param.npz (FLAME 2023)
  gaussian_avatars_motion  from a jflame-track folder: one motion.npz that drives a trained
                           GaussianAvatars avatar
  imavatar                 from a jflame-track folder: IMavatar's capture folder (image/,
                           flame_params.json; FLAME 2020), also read by PointAvatar and
                           SplattingAvatar
  metrical                 from a jflame-track folder: metrical-tracker's output folder
                           (checkpoint/*.frame, mesh/, input/, canonical.obj; FLAME 2020),
                           read by INSTA and FlashAvatar
  now                      from a jflame-fit folder or a jflame-annotate dataset: per photo a
                           mesh in millimetres and NoW's 7 landmarks (.npy), for the NoW and
                           NeRSemble single-image benchmarks

The model flags must name the model the clip was tracked with (the export needs its joints).
A fit made with another FLAME release than the format's readers expect is refused (never
converted); the synthetic head exports with a warning, on the console and in README.md. Each
file is written whole or not at all; the same command again finishes an interrupted export.
Exits 2 with one line for a usage problem, 130 when interrupted.
"""

import sys
from pathlib import Path

from absl import flags, logging
from tqdm import tqdm

from jflame.cli import app as cli_app
from jflame.cli import model_flags

CLIP_FORMATS = ("gaussian_avatars", "gaussian_avatars_motion", "imavatar", "metrical")
PHOTO_FORMATS = ("now",)
FORMATS = CLIP_FORMATS + PHOTO_FORMATS
_INPUT = flags.DEFINE_string("input", None, "A jflame-track output folder (gaussian_avatars*, "
                             "imavatar, metrical), a jflame-fit --cameras folder "
                             "(gaussian_avatars), or a jflame-fit folder or jflame-annotate "
                             "dataset (now).")
_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "What to write.")
_OUTPUT = flags.DEFINE_string("output", None, "The export's folder (created if absent).")
_SOURCE = flags.DEFINE_string(
    "source", None, "gaussian_avatars, imavatar, metrical: the tracked video (or folder of "
    "frames), when it is no longer where the track's manifest says.")
_TEST_FRACTION = flags.DEFINE_float(
    "test_fraction", 0.1, "gaussian_avatars: the share of the clip's last frames held out as "
    "the test (and val) split, 0..0.9.", lower_bound=0.0, upper_bound=0.9)
_FITTED_FACE = flags.DEFINE_bool(
    "fitted_face", False, "now: write the fitted face (expression, jaw, eyes) instead of the "
    "identity alone (NoW's scans are neutral).")
_KEEP_SUSPECT = flags.DEFINE_bool(
    "keep_suspect", False, "gaussian_avatars, imavatar, metrical: keep the frames the track "
    "marked suspect (frames without a face are always left out).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  for flag, what in ((_INPUT, "a jflame folder"), (_FORMAT, "one of " + ", ".join(FORMATS)),
                     (_OUTPUT, "the export's folder")):
    if not flag.value:
      return cli_app.usage_error(f"--{flag.name} is required ({what}).")
  from jflame import output_folder
  from jflame.errors import JFlameError
  from jflame.exports import capture_export, clip_export, common, fit_export
  source_folder = Path(_INPUT.value).expanduser()
  output = Path(_OUTPUT.value).expanduser()
  try:
    if output.resolve() == source_folder.resolve():
      return cli_app.usage_error("--output is the --input folder; export into another folder.")
    kind = common.folder_kind(source_folder) if _FORMAT.value == "gaussian_avatars" else None
    capture = {common.CAPTURE_FOLDER: capture_export.export_capture_dataset,
               common.RIG_TRACK_FOLDER: capture_export.export_rig_track_dataset}.get(kind)
    if kind == common.CAPTURE_FOLDER:
      total = len(capture_export.read_capture(source_folder)["moments"])
    elif kind == common.RIG_TRACK_FOLDER:
      total = capture_export.read_rig_track(source_folder)["counts"]["tracked"]
    elif _FORMAT.value in CLIP_FORMATS:
      clip = common.read_tracked_clip(source_folder, _FORMAT.value)
      total = clip.num_frames
    else:
      photos = fit_export.read_fitted_photos(source_folder)
      total = len(photos)
    with output_folder.claim_output_folder(output) as folder:
      loaded = model_flags.load_model()
      with tqdm(total=total, unit="item", desc="jflame-export", delay=1.0) as bar:
        if capture:
          warnings = capture(source_folder, loaded.model, folder, _TEST_FRACTION.value,
                             _KEEP_SUSPECT.value, progress=bar.update)
        elif _FORMAT.value == "gaussian_avatars_motion":
          warnings = clip_export.export_motion(clip, loaded.model, folder)
        elif _FORMAT.value == "metrical":
          warnings = clip_export.export_metrical(clip, loaded.model, folder, _SOURCE.value,
                                                 _KEEP_SUSPECT.value, progress=bar.update)
        elif _FORMAT.value == "imavatar":
          warnings = clip_export.export_imavatar(clip, loaded.model, folder, _SOURCE.value,
                                                 _KEEP_SUSPECT.value, progress=bar.update)
        elif _FORMAT.value == "gaussian_avatars":
          warnings = clip_export.export_dataset(clip, loaded.model, folder, _SOURCE.value,
                                                _TEST_FRACTION.value, _KEEP_SUSPECT.value,
                                                progress=bar.update)
        else:
          warnings = fit_export.export_now(photos, loaded.model, loaded.embedding, folder,
                                           _FITTED_FACE.value, progress=bar.update)
  except JFlameError as error:
    return cli_app.usage_error(str(error))
  except KeyboardInterrupt:
    print("interrupted: each file is written whole or not at all; run the same command again "
          "to finish the export.", file=sys.stderr)
    return cli_app.EXIT_INTERRUPTED
  for warning in warnings:
    print(f"warning: {warning}", file=sys.stderr)
  print(f"done: {_FORMAT.value} -> {folder} (see {folder / common.README_NAME})")
  return cli_app.EXIT_OK


def run():
  cli_app.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
