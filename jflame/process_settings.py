"""Process-wide JAX and XLA settings a command makes before its first computation: the
persistent compilation cache and the CPU fit's thread count. Nothing else in jflame changes
global JAX state; a library caller decides for its own process."""

import os
from pathlib import Path
from typing import Optional

import jax
from absl import logging


def use_compilation_cache(folder: str) -> None:
  """Keeps this process's compiled programs in `folder` (JAX's persistent cache).

  The folder is given to JAX by its real path: JAX writes paths under it into each program's
  compile options (its GPU kernel and autotune caches), which are part of the cache key, so the
  same folder reached through a link would key every program anew and never load one."""
  jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser().resolve()))
  # Cache every program: the fits compile in seconds, which is all a short run costs.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def fit_beside_workers(workers: int, environ=None):
  """Makes a CPU fit single-threaded when `workers` preprocessing processes share the cores.

  XLA's multi-threaded CPU kernels keep threads spinning between the fit's small operations,
  and those cycles come out of the workers, which are what limits a run's rate
  (tools/bench_annotate.py, docs/BENCHMARKS.md). Accelerators are unaffected.
  A choice the user made in XLA_FLAGS wins. `environ`: the environment to change (default
  os.environ). Call before the first JAX computation: XLA reads its flags then.
  """
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if workers < 1 or "xla_cpu_multi_thread_eigen" in current:
    return
  environ["XLA_FLAGS"] = f"{current} --xla_cpu_multi_thread_eigen=false".strip()


def compilation_cache_folder() -> Path:
  """$JFLAME_HOME/compilation_cache, or ~/.cache/jflame/compilation_cache."""
  home = os.environ.get("JFLAME_HOME")
  base = Path(home).expanduser() if home else Path.home() / ".cache" / "jflame"
  return base / "compilation_cache"


def use_default_compilation_cache() -> Optional[str]:
  """`use_compilation_cache` in `compilation_cache_folder()`; returns the folder, or None (with
  a warning) when it cannot be created: a run without the cache only compiles again."""
  folder = compilation_cache_folder()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    logging.warning("compilation cache off: cannot create %s (%s)", folder, error)
    return None
  use_compilation_cache(str(folder))
  return str(folder)
