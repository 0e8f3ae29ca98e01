"""The installed commands' entry points. Importing a command pulls in JAX, OpenCV and MediaPipe
(a second or two) and parsing its flags takes a moment more; a Ctrl-C in that time would
otherwise end in a traceback, so each entry point imports and runs its command here and turns
such an interrupt into one line and exit 130. This module itself imports nothing heavy."""

import importlib
import sys

EXIT_INTERRUPTED = 130  # as a shell reports a Ctrl-C (jflame.cli.app takes it from here)


def start(module: str, command: str) -> int:
  """Imports `module` and runs its `run()`. An interrupt while importing, or one the command
  did not handle itself (while it parses flags, before its work begins), exits 130 with one
  line; the commands handle an interrupt during their work themselves and say what is kept."""
  try:
    entry = importlib.import_module(module).run
  except KeyboardInterrupt:
    print(f"{command}: interrupted while starting; nothing was done.", file=sys.stderr)
    return EXIT_INTERRUPTED
  try:
    return entry()
  except KeyboardInterrupt:
    print(f"{command}: interrupted; what was finished is kept, and the same command run "
          "again goes on from there.", file=sys.stderr)
    return EXIT_INTERRUPTED


def fit():
  return start("jflame.cli.fit", "jflame-fit")


def annotate():
  return start("jflame.cli.annotate", "jflame-annotate")


def track():
  return start("jflame.cli.track", "jflame-track")


def convert_flame():
  return start("jflame.cli.convert_flame", "jflame-convert-flame")


def build_embedding():
  return start("jflame.cli.build_embedding", "jflame-build-embedding")


def report():
  return start("jflame.cli.report", "jflame-report")


def export():
  return start("jflame.cli.export", "jflame-export")
