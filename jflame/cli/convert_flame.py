"""jflame-convert-flame: official FLAME pickle -> jflame float32 .npz (a few times smaller,
instant to load, no pickle).

  jflame-convert-flame generic_model.pkl generic_model.npz [--num_expression 100]
"""

import sys

from absl import app, flags, logging

from jflame import flame_io
from jflame.errors import JFlameError

_NUM_EXPRESSION = flags.DEFINE_integer(
    "num_expression", None,
    "How many trailing shapedirs columns are expression components (default: inferred from the "
    "basis norms; FLAME 2020 and 2023 hold 300 identity + 100 expression).")


_FLAME_VARIANT = flags.DEFINE_enum(
    "flame_variant", None, ["flame2020", "flame2023", "flame2023_open"],
    "Which FLAME release the input is, when its file name does not say; recorded in the .npz.")


def convert(source: str, target: str, num_expression=None, variant=None) -> int:
  """Converts one file; returns a process exit code."""
  try:
    model = flame_io.load_flame(source, num_expression, variant)
    flame_io.save_flame_npz(model, target)
  except JFlameError as err:
    logging.error("%s", err)
    return 1
  print(f"{model.name} ({model.variant}): {model.num_vertices} vertices, {model.faces.shape[0]} triangles, "
        f"{model.num_shape} shape + {model.num_expression} expression components -> {target}")
  return 0


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: jflame-convert-flame INPUT.pkl OUTPUT.npz")
  sys.exit(convert(argv[1], argv[2], _NUM_EXPRESSION.value, _FLAME_VARIANT.value))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
