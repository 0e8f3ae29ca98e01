"""`make demo`: fit the astronaut photograph that ships with scikit-image (public domain, NASA).

Writes the photo to <output>/input/astronaut.png and runs `jflame-fit` on it (all of its flags
work here too), with the real FLAME model when one is configured ($JFLAME_HOME or
~/.cache/jflame, see WORKSPACE.md) and the built-in SYNTHETIC model otherwise; the first line
printed says which.
"""

import sys
from pathlib import Path

from absl import app, flags

from jflame.cli import fit as fit_command

FLAGS = flags.FLAGS


def main(argv):
  del argv
  import cv2
  import skimage.data
  input_dir = Path(FLAGS.output) / "input"
  input_dir.mkdir(parents=True, exist_ok=True)
  photo = input_dir / "astronaut.png"
  cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  FLAGS.input = [str(photo)]
  status = fit_command.main([])
  print(f"overlay: {Path(FLAGS.output) / 'astronaut_overlay.png'}")
  return status


if __name__ == "__main__":
  FLAGS.set_default("output", "demo_output")
  FLAGS.set_default("batch_size", 1)
  app.run(lambda argv: sys.exit(main(argv)))
