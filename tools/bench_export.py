"""Benchmark of jflame-export on a finished jflame-track folder: reading the track, the
vmapped root joints and the motion file, and the whole dataset export with and without its
image writing (a rerun keeps the images, so its time is the export without them).

  .venv/bin/python tools/bench_export.py --track tracked/ [--repeats 5]
      [--flame_model ... --embedding ...]   # the model the clip was tracked with

Figures are medians of --repeats runs after one warm-up (which also compiles the joints).
"""

import json
import shutil
import tempfile
from pathlib import Path

from absl import app, flags

import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path
from jflame.cli import model_flags

_TRACK = flags.DEFINE_string("track", None, "A jflame-track output folder.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures here.")


def main(argv):
  del argv
  from jflame.exports import clip_export, common
  loaded = model_flags.load_model()
  folder = Path(_TRACK.value)
  clip = common.read_tracked_clip(folder)
  scratch = Path(tempfile.mkdtemp(prefix="bench_export_"))
  try:
    figures = dict(frames=clip.num_frames, frame_size=clip.manifest["frame_size"])
    figures["read_track_s"] = benchmarking.median_seconds(
        lambda: common.read_tracked_clip(folder), _REPEATS.value)
    figures["motion_s"] = benchmarking.median_seconds(
        lambda: clip_export.export_motion(clip, loaded.model, scratch / "motion"), _REPEATS.value)

    # Each image-writing format from an empty folder, then again with its images kept.
    exports = dict(
        dataset=lambda out: clip_export.export_dataset(clip, loaded.model, out, None, 0.1, False),
        imavatar=lambda out: clip_export.export_imavatar(clip, loaded.model, out, None, False),
        metrical=lambda out: clip_export.export_metrical(clip, loaded.model, out, None, False))
    for name, export in exports.items():
      out = scratch / name

      def fresh(export=export, out=out):
        shutil.rmtree(out, ignore_errors=True)
        export(out)
      figures[f"{name}_with_images_s"] = benchmarking.median_seconds(fresh, _REPEATS.value)
      figures[f"{name}_images_kept_s"] = benchmarking.median_seconds(
          lambda export=export, out=out: export(out), _REPEATS.value)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(json.dumps(figures, indent=1))
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
