"""Small helpers shared by the benchmark tools: timing compiled functions honestly."""

import json
import platform
import statistics
import time
from pathlib import Path

import jax


def device_description() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  cores = ""
  if device.platform == "cpu":
    import os
    cores = f", {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
  return f"{device.platform}: {kind}{cores}, jax {jax.__version__}"


def time_compiled(function, *args, repeats=5, min_seconds=0.2):
  """Compiles `function` (a jitted callable) for `args`, then times it.

  Returns:
    (compile_seconds, median_seconds_per_call). Compile time is the first call (trace + compile +
    run) minus one steady-state call; each timed repeat runs enough calls to last `min_seconds`.
  """
  start = time.perf_counter()
  jax.block_until_ready(function(*args))
  first_call = time.perf_counter() - start
  calls = 1
  while True:
    start = time.perf_counter()
    for _ in range(calls):
      result = function(*args)
    jax.block_until_ready(result)
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds or calls >= 1 << 14:
      break
    calls *= 2
  samples = [elapsed / calls]
  for _ in range(repeats - 1):
    start = time.perf_counter()
    for _ in range(calls):
      result = function(*args)
    jax.block_until_ready(result)
    samples.append((time.perf_counter() - start) / calls)
  per_call = statistics.median(samples)
  return max(first_call - per_call, 0.0), per_call


def median_seconds(run, repeats: int) -> float:
  """Median wall seconds of `repeats` calls of `run()` after one warm-up call (which compiles and
  fills the file cache)."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(statistics.median(times))


def write_json(path, payload):
  if path:
    Path(path).write_text(json.dumps(payload, indent=2))


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


# A report file may hold sections written by other tools, each between these markers; a tool
# that rewrites the file keeps them (`kept_sections`), and a tool replaces its own
# (`with_section`).
SECTION_BEGIN = "<!-- begin {} -->"
SECTION_END = "<!-- end {} -->"


def _section_spans(text):
  """(name, start, end) of every marked section in `text`."""
  spans = []
  start = text.find("<!-- begin ")
  while start >= 0:
    name = text[start + len("<!-- begin "):text.find(" -->", start)]
    end_marker = SECTION_END.format(name)
    end = text.find(end_marker, start)
    if end < 0:
      break
    spans.append((name, start, end + len(end_marker)))
    start = text.find("<!-- begin ", end)
  return spans


def kept_sections(path) -> str:
  """The marked sections of the file at `path` (empty when there is none), to append to a
  report that rewrites that file."""
  path = Path(path)
  if not path.is_file():
    return ""
  text = path.read_text()
  return "".join("\n" + text[start:end] + "\n" for _, start, end in _section_spans(text))


def with_section(text: str, name: str, section: str) -> str:
  """`text` with the section `name` replaced by `section` (appended when it has none)."""
  block = f"{SECTION_BEGIN.format(name)}\n{section.strip()}\n{SECTION_END.format(name)}"
  for found, start, end in _section_spans(text):
    if found == name:
      return text[:start] + block + text[end:]
  return text.rstrip("\n") + "\n\n" + block + "\n"
