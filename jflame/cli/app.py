"""How every jflame command runs (no flags are defined here, so any command may use it):
--help lists the command's flags (and the shared ones of jflame.cli.model_flags and
jflame.cli.common when it uses them)
with defaults and ranges and exits 0; a bad flag exits 2 with one line; SIGTERM stops a run like
Ctrl-C, so what is finished stays committed.
"""

import signal
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags

from jflame.cli import start

EXIT_OK, EXIT_NOTHING_FITTED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = start.EXIT_INTERRUPTED  # 130, as a shell reports a Ctrl-C
# The rasterizer and the crop arrays are sized for heads of a few hundred pixels; 1024 keeps a
# photometric batch of 16 within a few GiB.
MIN_CROP_SIZE, MAX_CROP_SIZE = 64, 1024
MAX_ITERATIONS = 100_000


def usage_error(message: str) -> int:
  """One line on stderr for a usage problem; returns the exit status."""
  program = Path(sys.argv[0]).name
  sys.stderr.write(f"{program}: {message}\n")
  return EXIT_USAGE


# Modules whose flags several commands share; a command's --help lists those it loaded.
SHARED_FLAG_MODULES = ("jflame.cli.model_flags", "jflame.cli.common")


def _help_text(module_name: str, doc: str) -> str:
  listed = [flags.FLAGS.module_help(module_name)]
  listed += [flags.FLAGS.module_help(name) for name in SHARED_FLAG_MODULES if name in sys.modules]
  return doc.strip() + "\n\nFlags:\n" + "\n".join(text for text in listed if text) + (
      "\n\n--helpfull lists absl's own flags too (logging, verbosity).\n")


def run_command(main: Callable, module_name: str, doc: str):
  """Runs an absl command: --help prints the command's flags with their defaults and ranges
  and exits 0; a bad flag exits 2 with one line; SIGTERM ends the run like Ctrl-C (what is
  finished stays committed)."""
  argv = sys.argv
  if any(arg in ("-h", "--help", "-help", "-?") for arg in argv[1:]):
    flags.FLAGS.mark_as_parsed()
    sys.stdout.write(_help_text(module_name, doc))
    sys.exit(EXIT_OK)

  def parse(arguments):
    try:
      return flags.FLAGS(arguments)
    except flags.Error as error:
      sys.exit(usage_error(f"{error}. Pass --help to list the flags."))

  def terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  def finished(arguments):
    code = main(arguments)
    # The run's work is done and written: a Ctrl-C now would only break the interpreter's own
    # shutdown (JAX's exit hooks) with a traceback after the "done" line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)

  signal.signal(signal.SIGTERM, terminate)
  app.run(finished, argv=argv, flags_parser=parse)
