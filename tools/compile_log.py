"""Where compiling goes in a whole run of the suite (or any jflame command): a log of JAX's
compile-phase events from every Python process, and its summary.

  .venv/bin/python tools/compile_log.py --install      # a sitecustomize in this venv
  JFLAME_COMPILE_LOG=/tmp/compile.jsonl make test      # every process appends to the log
  .venv/bin/python tools/compile_log.py --summary /tmp/compile.jsonl
  .venv/bin/python tools/compile_log.py --uninstall

The hook is a `sitecustomize` module in the venv's site-packages, because the suite starts its
commands with PYTHONPATH set to the checkout and Ray starts its actors with the venv's Python:
only the venv reaches all of them. It does nothing unless JFLAME_COMPILE_LOG names a file; then
each process imports JAX at start-up and appends one JSON line per duration event (tracing,
lowering, XLA compile or cache load, cache reads) with the pytest test that was running
(PYTEST_CURRENT_TEST, which the commands a test starts inherit). Measuring only: leave it
uninstalled otherwise.
"""

import collections
import json
import site
import sys
from pathlib import Path

from absl import app, flags

_INSTALL = flags.DEFINE_bool("install", False, "Write the hook into this venv.")
_UNINSTALL = flags.DEFINE_bool("uninstall", False, "Remove the hook from this venv.")
_SUMMARY = flags.DEFINE_string("summary", None, "Summarise this log.")
_TOP = flags.DEFINE_integer("top", 15, "Rows per table.", lower_bound=1)

MARKER = "# jflame tools/compile_log.py hook"
HOOK = MARKER + '''
import json, os, sys
_log = os.environ.get("JFLAME_COMPILE_LOG")
if _log:
  try:
    import jax.monitoring as _monitoring

    def _listen(event, secs, **kwargs):
      with open(_log, "a") as stream:
        stream.write(json.dumps({
            "pid": os.getpid(), "argv0": os.path.basename(sys.argv[0]) if sys.argv else "",
            "test": os.environ.get("PYTEST_CURRENT_TEST", ""), "event": event,
            "secs": round(secs, 4), "fun": kwargs.get("fun_name", "")}) + "\\n")

    _monitoring.register_event_duration_secs_listener(_listen)
  except Exception as error:  # a process without JAX: nothing to log
    print(f"compile log off in this process: {error}", file=sys.stderr)
'''
BACKEND = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def hook_path() -> Path:
  if sys.prefix == sys.base_prefix:
    raise SystemExit("run this with the venv's python (.venv/bin/python): the hook goes into a "
                     "venv, never into the system's Python")
  return Path(site.getsitepackages()[0]) / "sitecustomize.py"


def _function_name(row) -> str:
  """The traced function's name (compile events name it `jit(name)`, trace events `name`)."""
  name = row["fun"]
  return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


def summary(rows, top: int) -> str:
  """Seconds per event, then compile / trace / lower seconds per test file and per function."""
  lines = []
  totals, counts = collections.Counter(), collections.Counter()
  for row in rows:
    totals[row["event"]] += row["secs"]
    counts[row["event"]] += 1
  lines += [f"{seconds:9.1f} s {counts[event]:7d}  {event}" for event, seconds in
            totals.most_common()]
  for title, key in (("by test file", lambda r: r["test"].split("::")[0] or
                      f"(no test: {r['argv0']})"),
                     ("by function", _function_name)):
    per = collections.defaultdict(collections.Counter)
    for row in rows:
      if row["event"] in (BACKEND, TRACE, LOWER):
        per[key(row)][row["event"]] += row["secs"]
    lines += ["", f"{title}: compile or load / trace / lower, seconds"]
    ranked = sorted(per.items(), key=lambda item: -sum(item[1].values()))[:top]
    lines += [f"{c[BACKEND]:8.1f} {c[TRACE]:8.1f} {c[LOWER]:8.1f}  {name}" for name, c in ranked]
  return "\n".join(lines)


def main(argv):
  del argv
  if _INSTALL.value:
    path = hook_path()
    if path.exists() and MARKER not in path.read_text():
      raise SystemExit(f"{path} exists and is not this hook; leaving it alone")
    path.write_text(HOOK)
    print(f"installed {path}; set JFLAME_COMPILE_LOG=FILE to log")
  if _UNINSTALL.value:
    path = hook_path()
    if path.exists() and MARKER in path.read_text():
      path.unlink()
      print(f"removed {path}")
  if _SUMMARY.value:
    try:
      with open(_SUMMARY.value) as stream:
        rows = [json.loads(line) for line in stream if line.strip()]
    except (OSError, ValueError) as error:
      raise SystemExit(f"cannot read the compile log {_SUMMARY.value}: {error}") from None
    print(summary(rows, _TOP.value))


if __name__ == "__main__":
  app.run(main)
