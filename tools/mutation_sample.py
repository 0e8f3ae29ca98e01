"""Sampled mutation testing with mutmut's mutation operators, each mutant in a fresh process.

mutmut 3 forks a warm test process per mutant, which hangs once JAX has started its threads;
mutmut 2 applies a mutant on disk and runs the tests as a subprocess, which JAX tolerates, but
running every mutant of the fitting modules would take days on 2 cores (a compile per mutant).
So this script uses mutmut 2.5's own mutant generator (`mutmut.list_mutations` / `mutate`),
draws a seeded random sample of the mutants of each module, and runs each one against the
module's test files in a fresh `pytest -x` process. The killed fraction of a random sample
estimates the module's mutation score (its 95% interval is printed).

It mutates the files of the working tree it runs in, restoring each file after every mutant
(also on Ctrl-C), so run it in a separate checkout:

    git worktree add /tmp/jflame-mutation HEAD
    cd /tmp/jflame-mutation && PYTHONPATH=$PWD python tools/mutation_sample.py --per_module 20

mutmut is not a dependency of jflame: install `mutmut==2.5.1` into the environment first
(`make mutation` does). Results go to --output (JSON lines, one per mutant, with its diff).
"""

import argparse
import difflib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module -> the test files that protect it, fastest first (pytest -x stops at the first failure).
MODULE_TESTS = {
    "jflame/losses.py": ["tests/test_fit_behaviour.py", "tests/test_solve.py",
                         "tests/test_fit_photometric.py"],
    "jflame/fit.py": ["tests/test_optim.py", "tests/test_fit_behaviour.py", "tests/test_fit.py",
                      "tests/test_fit_photometric.py"],
    "jflame/solve.py": ["tests/test_solve.py", "tests/test_fit_behaviour.py"],
    "jflame/output.py": ["tests/test_output_files.py", "tests/test_fit_command.py"],
    "jflame/cli/fit.py": ["tests/test_fit_hostile.py", "tests/test_output_files.py"],
}
# A mutant that survives its module's tests runs once more against these (the end-to-end
# command tests, slow: each command compiles afresh), before it counts as a survivor.
WIDER_TESTS = {
    "jflame/losses.py": ["tests/test_fit.py"],
    "jflame/fit.py": ["tests/test_optim.py", "tests/test_output_files.py",
                      "tests/test_fit_command.py"],
    "jflame/solve.py": ["tests/test_fit.py", "tests/test_output_files.py"],
}


def mutants_of(path: Path):
  import mutmut
  context = mutmut.Context(filename=str(path))
  return mutmut.list_mutations(context)


def mutated_source(path: Path, mutation_id) -> str:
  import mutmut
  context = mutmut.Context(filename=str(path), mutation_id=mutation_id)
  source, count = mutmut.mutate(context)
  if count != 1:
    raise RuntimeError(f"{path}: mutant {mutation_id} made {count} changes")
  return source


def run_tests(tests, timeout, cache):
  """(outcome, seconds): 'killed' (a test failed), 'survived' or 'timeout'.

  Every run shares one persistent compilation cache (`cache`, the tests' JFLAME_TEST_CACHE:
  their own programs and those of the commands they start), so a mutant recompiles only the
  programs it changes: most of a test run's time on a CPU is compiling."""
  start = time.perf_counter()
  env = dict(os.environ, JFLAME_TEST_CACHE=str(cache),  # tests/conftest.py
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  try:
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=ROOT, capture_output=True, env=env,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - start
  outcome = "survived" if done.returncode == 0 else "killed"
  if done.returncode not in (0, 1):  # collection error, crash: the mutant broke the import
    outcome = "killed"
  return outcome, time.perf_counter() - start


def wilson_interval(killed: int, total: int, z: float = 1.96):
  if total == 0:
    return 0.0, 1.0
  p = killed / total
  centre = (p + z * z / (2 * total)) / (1 + z * z / total)
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
  return max(0.0, centre - half), min(1.0, centre + half)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("modules", nargs="*", default=list(MODULE_TESTS),
                      help="modules to mutate (default: all of MODULE_TESTS)")
  parser.add_argument("--per_module", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="mutation_sample.jsonl",
                      help="JSON lines, one per mutant; a rerun skips the mutants it holds "
                           "(timeouts run again, survivors meet WIDER_TESTS if they have not)")
  parser.add_argument("--cache", default=str(Path.home() / ".cache" / "jflame-mutation"),
                      help="the shared JAX compilation cache of the test runs")
  args = parser.parse_args()
  done = {}
  if Path(args.output).exists():
    for line in Path(args.output).read_text().splitlines():
      entry = json.loads(line)
      if entry["outcome"] != "timeout" and entry.get("wider") != "timeout":
        done[(entry["module"], entry["line"], entry["diff"])] = entry  # the last one counts
  if os.environ.get("PYTHONPATH", "").split(os.pathsep)[:1] != [str(ROOT)]:
    sys.exit(f"run with PYTHONPATH={ROOT} so the tests import this checkout's jflame")
  totals = {}
  Path(args.cache).mkdir(parents=True, exist_ok=True)
  with open(args.output, "a") as log:
    for module in args.modules:
      path = ROOT / module
      original = path.read_text()
      tests = MODULE_TESTS[module]
      baseline, baseline_s = run_tests(tests, timeout=3600, cache=args.cache)
      if baseline != "survived":
        sys.exit(f"{module}: its tests fail without any mutant; fix that first")
      ids = mutants_of(path)
      sample = random.Random(f"{args.seed}:{module}").sample(ids, min(args.per_module, len(ids)))
      print(f"{module}: {len(ids)} mutants, sampling {len(sample)}; tests take {baseline_s:.0f} s",
            flush=True)
      killed = 0
      try:
        for number, mutation_id in enumerate(sample, 1):
          source = mutated_source(path, mutation_id)
          diff = "".join(difflib.unified_diff(original.splitlines(True), source.splitlines(True),
                                              n=0))
          diff = "\n".join(line for line in diff.splitlines() if line[:3] not in ("---", "+++"))
          entry = done.get((module, mutation_id.line_number + 1, diff))
          recheck = (entry is not None and entry["outcome"] == "survived"
                     and module in WIDER_TESTS and "wider" not in entry)
          if entry is None or recheck:
            path.write_text(source)
            try:
              if entry is None:
                outcome, seconds = run_tests(tests, timeout=max(3 * baseline_s, 900),
                                             cache=args.cache)
                entry = dict(module=module, line=mutation_id.line_number + 1, outcome=outcome,
                             seconds=round(seconds, 1), diff=diff)
              if entry["outcome"] == "survived" and module in WIDER_TESTS:
                entry["wider"], wider_s = run_tests(WIDER_TESTS[module], timeout=1800,
                                                    cache=args.cache)
                entry["seconds"] = round(entry["seconds"] + wider_s, 1)
            finally:
              path.write_text(original)
            log.write(json.dumps(entry) + "\n")
            log.flush()
          outcome, seconds = entry["outcome"], entry["seconds"]
          if outcome == "survived" and entry.get("wider") not in (None, "survived"):
            outcome = "killed (wider suite)"
          killed += outcome != "survived"
          print(f"  {number:3d} line {mutation_id.line_number + 1:4d} {outcome:20s} "
                f"{seconds:5.0f} s  {diff.splitlines()[-1].strip()[:90] if diff else ''}",
                flush=True)
      finally:
        path.write_text(original)
      low, high = wilson_interval(killed, len(sample))
      totals[module] = (killed, len(sample))
      print(f"{module}: {killed}/{len(sample)} killed ({100 * killed / len(sample):.0f}%, "
            f"95% interval {100 * low:.0f}-{100 * high:.0f}%)", flush=True)
  killed = sum(k for k, _ in totals.values())
  total = sum(n for _, n in totals.values())
  if total:
    low, high = wilson_interval(killed, total)
    print(f"all: {killed}/{total} killed ({100 * killed / total:.0f}%, 95% interval "
          f"{100 * low:.0f}-{100 * high:.0f}%)")


if __name__ == "__main__":
  main()
