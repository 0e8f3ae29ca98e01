"""`make demo`: fit the astronaut photograph that ships with scikit-image (public domain, NASA).

Writes the photo to <output>/input/astronaut.png and runs `jflame-fit` on it into <output>/fit
(all of jflame-fit's flags work here too), with the real FLAME model when one is configured
($JFLAME_HOME or ~/.cache/jflame, see WORKSPACE.md) and the built-in SYNTHETIC model otherwise;
the first line printed says which.
"""

from pathlib import Path

from absl import flags

from jflame import sources
from jflame.cli import common
from jflame.cli import fit as fit_command

FLAGS = flags.FLAGS


def main(argv):
  import cv2
  import skimage.data
  root = Path(FLAGS.output)
  input_dir = root / "input"
  input_dir.mkdir(parents=True, exist_ok=True)
  photo = input_dir / "astronaut.png"
  if not photo.exists():  # rewriting it would make every rerun refit a "changed" photo
    cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  FLAGS.input = [str(photo)]
  FLAGS.output = str(root / "fit")
  status = fit_command.main(argv)
  (source,) = sources.list_sources([str(photo)])
  print(f"overlay: {root / 'fit' / (source.name + '_overlay.png')}")
  return status


if __name__ == "__main__":
  FLAGS.set_default("output", "demo_output")
  FLAGS.set_default("batch_size", 1)
  common.run_command(main, fit_command.__name__, __doc__ + "\n" + fit_command.__doc__)
