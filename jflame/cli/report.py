"""jflame-report: write report.html about a jflame dataset folder, drawing its fits again.

  jflame-report FOLDER [--gallery_size 12] [--sample_seed 0] [--flame_model FILE] [--nodraw]

FOLDER is the --output of jflame-annotate: one dataset folder, or the folder that holds a split
run's parts (part-<i>-of-<N>, from --num_shards), in which case the page is about all the parts
together and is written to FOLDER/report.html. The page shows status counts (failure messages
grouped with their paths taken out), quality histograms, throughput, the rows whose source was
gone at the last run, and the worst fits, the other suspect fits and a random sample, each
drawn for the page from its source photo and stored parameters whatever --overlays the run had
(the pictures go to FOLDER/report_pictures/, at most 2048 pixels long). The mesh is drawn with
the model the dataset names: the synthetic head is made again, a FLAME file is --flame_model or
the one in $JFLAME_HOME or ~/.cache/jflame; without it only the landmarks are drawn. A row whose
source is gone or unreadable gets a tile that says so. See `jflame.report`.

Exit status: 0 when the page was written, 2 for a usage problem (no such folder, not a
dataset, an unreadable index), 130 when interrupted (an earlier report.html is kept as it was).
"""

import sys
from pathlib import Path

from absl import flags, logging

from jflame.cli import app

_GALLERY_SIZE = flags.DEFINE_integer("gallery_size", 12, "Pictures in each gallery (worst "
                                     "fits, other suspect fits, random sample).", lower_bound=0,
                                     upper_bound=200)
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "Seed of the random sample (the same "
                                    "dataset and seed give the same page).")
_FLAME_MODEL = flags.DEFINE_string("flame_model", None, "The FLAME model file (.pkl or .npz) "
                                   "the dataset was made with, for drawing meshes. Default: the "
                                   "one in $JFLAME_HOME or ~/.cache/jflame; a dataset made with "
                                   "the synthetic head needs none.")
_DRAW = flags.DEFINE_bool("draw", True, "Draw the galleries' fits from the sources (without: "
                          "the pictures the run kept, if any).")


def main(argv) -> int:
  if len(argv) != 2:
    return app.usage_error("name one dataset folder: jflame-report FOLDER (the --output of "
                           "jflame-annotate).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  folder = Path(argv[1]).expanduser()
  if not folder.is_dir():
    return app.usage_error(f"{folder}: no such folder.")
  from jflame import dataset, report
  from jflame.errors import JFlameError
  try:
    parts = dataset.dataset_folders(folder)
    if not parts:
      return app.usage_error(f"{folder} is not a jflame dataset (no index.json, no "
                             "part-*-of-* folders); name the --output of jflame-annotate.")
    draw, note = None, ""
    if _DRAW.value:
      from jflame import row_pictures
      model, note = row_pictures.dataset_model(dataset.settings(folder), _FLAME_MODEL.value)
      draw = row_pictures.row_drawer(model)
      if model is None:
        note = f"Only landmarks drawn: {note}"
      if note:
        print(f"note: {note}", file=sys.stderr)
    path = report.write_report(folder, _GALLERY_SIZE.value, _SAMPLE_SEED.value, draw, note)
  except JFlameError as error:
    return app.usage_error(str(error))
  except KeyboardInterrupt:
    print("jflame-report: interrupted; report.html not written (an earlier one is kept).",
          file=sys.stderr)
    return app.EXIT_INTERRUPTED
  rows = dataset.open(folder).count_rows()
  print(f"report: {path} ({rows:,} rows" + (f", {len(parts)} parts" if len(parts) > 1 else "")
        + ")")
  return app.EXIT_OK


def run():
  app.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
