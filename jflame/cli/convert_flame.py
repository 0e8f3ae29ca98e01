"""jflame-convert-flame: official FLAME pickle -> jflame float32 .npz (a few times smaller,
instant to load, no pickle).

  jflame-convert-flame generic_model.pkl generic_model.npz [--num_expression 100]

Exit status: 0 when written, 2 for a usage or file problem (one line), 130 when interrupted.
"""

from absl import flags

from jflame.cli import app as cli_app

_NUM_EXPRESSION = flags.DEFINE_integer(
    "num_expression", None,
    "How many trailing shapedirs columns are expression components (default: inferred from the "
    "basis norms; FLAME 2020 and 2023 hold 300 identity + 100 expression).")


_FLAME_VARIANT = flags.DEFINE_enum(
    "flame_variant", None, ["flame2020", "flame2023", "flame2023_open"],
    "Which FLAME release the input is, when its file name does not say; recorded in the .npz.")


def convert(source: str, target: str, num_expression=None, variant=None) -> int:
  """Converts one file; returns a process exit code."""
  from jflame import flame_io
  from jflame.errors import JFlameError
  try:
    model = flame_io.load_flame(source, num_expression, variant)
    flame_io.save_flame_npz(model, target)
  except (JFlameError, OSError) as err:
    return cli_app.usage_error(str(err))
  print(f"{model.name} ({model.variant}): {model.num_vertices} vertices, "
        f"{model.faces.shape[0]} triangles, {model.num_shape} shape + "
        f"{model.num_expression} expression components -> {target}")
  return cli_app.EXIT_OK


def main(argv):
  if len(argv) != 3:
    return cli_app.usage_error("takes INPUT.pkl OUTPUT.npz (two paths); pass --help for more.")
  return convert(argv[1], argv[2], _NUM_EXPRESSION.value, _FLAME_VARIANT.value)


def run():
  cli_app.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
