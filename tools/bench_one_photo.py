"""What one photo costs a user: wall time of `jflame-fit` on the astronaut, landmark and
photometric mode, first run (empty compilation cache) and second run (--overwrite, warm cache),
with the default --batch_size 16.

  python tools/bench_one_photo.py [--old_tree /path/to/old/checkout] [--json_out FILE]

With --old_tree, the same runs of an older checkout (its own `python -m tools.fit` or
`python -m jflame.cli.fit`) are timed too, for before/after figures on the same machine.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import skimage.data
from absl import app, flags

_OLD_TREE = flags.DEFINE_string("old_tree", None, "An older checkout to time the same way.")
_MODES = flags.DEFINE_list("modes", ["landmark", "photometric"], "Fitting modes.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results as JSON here.")

ROOT = Path(__file__).resolve().parents[1]


def _command(tree: Path):
  module = "jflame.cli.fit" if (tree / "jflame" / "cli" / "fit.py").exists() else "tools.fit"
  return [sys.executable, "-m", module]


def _time(tree: Path, photo: Path, output: Path, mode: str, home: Path, extra=()) -> float:
  start = time.perf_counter()
  subprocess.run(_command(tree) + ["--input", str(photo), "--output", str(output), "--mode",
                                   mode, *extra], cwd=tree, check=True, capture_output=True,
                 env=dict(os.environ, PYTHONPATH=str(tree), JFLAME_HOME=str(home)))
  return time.perf_counter() - start


def _runs(tree: Path, scratch: Path, photo: Path) -> dict:
  results = {}
  for mode in _MODES.value:
    home = Path(tempfile.mkdtemp(dir=scratch))  # an empty cache: the first run compiles
    output = scratch / f"{tree.name}-{mode}"
    first = _time(tree, photo, output, mode, home)
    second = _time(tree, photo, output, mode, home, ["--overwrite"])
    results[mode] = dict(first_run_s=first, second_run_s=second)
  return results


def main(argv):
  del argv
  scratch = Path(tempfile.mkdtemp(prefix="bench_one_photo_"))
  photo = scratch / "astronaut.png"
  cv2.imwrite(str(photo), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  result = dict(cpu_count=os.cpu_count(), new=_runs(ROOT, scratch, photo))
  if _OLD_TREE.value:
    result["old"] = _runs(Path(_OLD_TREE.value).resolve(), scratch, photo)
  print(json.dumps(result, indent=2))
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
