"""Shared test fixtures: where the team's real assets live, a tiny random FLAME-format model,
and the numerics pin for tests that compare with float64 or NumPy references."""

import contextlib
import functools
import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.precision import highest_matmul_precision

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The numerical suites that run on an accelerator (`make test-device`, `pytest -m device`): they
# need JAX, NumPy, SciPy, optax, flax and absl only (no MediaPipe, OpenCV, trimesh or Pillow).
DEVICE_SUITES = ("test_bare_image", "test_fit", "test_fit_photometric", "test_flame", "test_optim",
                 "test_render_albedo", "test_render_gradients", "test_render_rasterize",
                 "test_render_recovery", "test_render_reference", "test_render_shading",
                 "test_solve", "test_synthetic")
SHARED_ASSETS = PROJECT_ROOT.parent / "shared" / "assets"
FLAME_FILE_NAMES = ("generic_model.pkl", "male_model.pkl", "female_model.pkl", "flame2023.pkl",
                    "flame2023_no_jaw.pkl", "flame2023_Open.pkl")


def shared_photos():
  """The real photographs under ../shared/assets/photos, or a skip that says why."""
  folder = SHARED_ASSETS / "photos"
  photos = sorted(folder.glob("*.png")) if folder.is_dir() else []
  if not photos:
    pytest.skip(f"no real photographs under {folder} (a fresh clone has no ../shared)")
  return photos


def real_flame_files():
  """Official FLAME model files somewhere under ../shared/assets (usually none: FLAME is
  licensed by its authors, see WORKSPACE.md)."""
  if not SHARED_ASSETS.is_dir():
    return []
  return sorted(p for name in FLAME_FILE_NAMES for p in SHARED_ASSETS.rglob(name))


def random_flame_arrays(seed=0, num_vertices=60, num_faces=80, num_shape=12, num_expression=6):
  """A small random model with the official FLAME pickle keys. Numbers are meaningless; the
  structure (5-joint chain, decreasing basis norms per group) is FLAME's."""
  rng = np.random.default_rng(seed)
  weights = rng.random((num_vertices, 5)) ** 3
  j_regressor = rng.random((5, num_vertices)) * (rng.random((5, num_vertices)) < 0.3)
  return dict(
      v_template=rng.normal(scale=0.1, size=(num_vertices, 3)),
      f=rng.integers(0, num_vertices, (num_faces, 3)).astype(np.uint32),
      shapedirs=np.concatenate(
          [rng.normal(scale=0.01, size=(num_vertices, 3, num_shape)) *
           np.geomspace(1.0, 0.05, num_shape),
           rng.normal(scale=0.01, size=(num_vertices, 3, num_expression)) *
           np.geomspace(1.0, 0.2, num_expression)], axis=-1),
      posedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 36)),
      J_regressor=j_regressor / j_regressor.sum(1, keepdims=True),
      weights=weights / weights.sum(1, keepdims=True),
      kintree_table=np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
      J=np.zeros((5, 3)))


# Two tiers (`make test-fast`, `make test-slow`; `make test` runs both, fast first). Every test
# file is in one list (tests/test_layout.py checks it). The fast tier: unit suites, engine, dataset,
# source and config rules, small-model fits; a test in a fast file that starts a command or fits
# the FLAME-size head carries `@pytest.mark.slow`. The slow tier: commands as subprocesses,
# FLAME-size fits, MediaPipe on photographs, rasterizer gradients and recoveries. SLOW_SUITES
# runs longest first (measured, docs/TESTING.md; the Makefile's `--no-loadscope-reorder` keeps
# xdist from ordering the files by their number of tests), so that the two workers finish
# together.
SLOW_SUITES = ("test_capture_command", "test_track_motion", "test_rig_track_command",
               "test_ray_engine", "test_track", "test_rig_track", "test_annotate",
               "test_fit_photometric", "test_export_commands", "test_output_files",
               "test_fit_hostile", "test_solve", "test_fit_command", "test_track_command",
               "test_fit", "test_ids", "test_fit_behaviour", "test_render_recovery",
               "test_sharding", "test_bare_image", "test_render_gradients",
               "test_rotated_photos", "test_library")
FAST_SUITES = ("test_build_embedding", "test_camera_files", "test_clip_solve", "test_engine_rules",
               "test_export",
               "test_flame", "test_flame_files", "test_flame_io", "test_initializers_onnx",
               "test_landmark_nets", "test_landmarks",
               "test_layout", "test_multiview", "test_optim", "test_preprocess_align",
               "test_preprocess_batch", "test_preprocess_image_io", "test_preprocess_pipeline",
               "test_render_albedo", "test_render_rasterize", "test_render_reference",
               "test_render_shading", "test_report", "test_starting_point", "test_synthetic",
               "test_track_quality")


def pytest_ignore_collect(collection_path, config):
  """The fast tier (`-m "not slow"`) does not import the slow files: every test in them is
  slow, and importing them (Ray among them) is seconds of each worker's start. The slow tier
  (`-m slow`) skips the fast files that mark no test slow (the marker is always spelled
  `mark.slow`)."""
  if config.option.markexpr == "not slow" and collection_path.stem in SLOW_SUITES:
    return True
  if (config.option.markexpr == "slow" and collection_path.stem in FAST_SUITES
      and "mark.slow" not in collection_path.read_text()):
    return True
  return None


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.stem in DEVICE_SUITES:
      item.add_marker(pytest.mark.device)
    if item.path.stem in SLOW_SUITES:
      item.add_marker(pytest.mark.slow)
  # Longest files first (a stable sort keeps each file's own order); the fast files after.
  rank = {stem: index for index, stem in enumerate(SLOW_SUITES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture
def random_arrays():
  return random_flame_arrays()


@pytest.fixture
def reference_precision():
  """Full float32 matmul precision for the test (GPUs default to TF32). Modules that compare
  with float64 or NumPy references use it for every test:
  `pytestmark = pytest.mark.usefixtures("reference_precision")`."""
  with highest_matmul_precision():
    yield


QUICK_FLAGS = ["--rigid_iterations", "3", "--full_iterations", "3"]


def ended_by_interrupt(returncode: int) -> bool:
  """Whether a command's exit status is the one of a Ctrl-C: 130, or death by SIGINT (-2 from
  subprocess). After the command has handled the interrupt (its one line said, exit 130
  asked for), CPython now and then still ends the process by SIGINT itself (strace: its own
  kill(getpid(), SIGINT) after finalising; about 1 run in 5 with two busy loops beside it). A
  shell reports both as 130."""
  return returncode in (130, -signal.SIGINT)


# `python -c HOLD_AFTER_FIRST_SHARD <jflame-annotate flags>`: jflame-annotate (with Python's
# default Ctrl-C handling, whatever the test run inherited) whose writer, once
# it has committed a new shard, waits until the run finishes (an interrupt's cleanup finishes
# it): a test signals after that shard and the run cannot have ended first, at any load.
HOLD_AFTER_FIRST_SHARD = """
import faulthandler, signal, threading
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does
# A test run started in the background by a shell inherits SIGINT ignored, and Python then
# keeps it ignored: Ctrl-C as a terminal delivers it needs the default handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
from jflame import engine, sinks
release, shards_before = threading.Event(), []
write, finish = sinks.DatasetSink.write, engine._Writer.finish
def write_then_hold(self, images):
  if not shards_before:
    shards_before.append(len(self.writer.shard_names()))
  write(self, images)
  if len(self.writer.shard_names()) > shards_before[0]:
    release.wait()
def release_then_finish(self):
  release.set()
  finish(self)
sinks.DatasetSink.write, engine._Writer.finish = write_then_hold, release_then_finish
from jflame.cli import annotate
annotate.run()
"""


@pytest.fixture(scope="module")
def loaded_model():
  """The model a user without FLAME files gets (the synthetic head, cached on disk)."""
  from jflame import model_loading
  return model_loading.load_model()


@pytest.fixture(scope="module")
def command_env(tmp_path_factory):
  """Environment for running a command as a subprocess: its own JFLAME_HOME, whose compiled
  programs and synthetic head come from the suite's shared folder (`share_caches`), and this
  checkout on the path."""
  home = tmp_path_factory.mktemp("jflame_home")
  share_caches(home)
  return dict(os.environ, JFLAME_HOME=str(home), PYTHONPATH=str(PROJECT_ROOT))


def suite_cache_folder() -> Path:
  """The folder whose compiled programs and synthetic head every test process and command of
  the suite shares: $JFLAME_TEST_CACHE (tools/mutation_sample.py points it at its own), or
  .pytest_cache/jflame_home in this checkout, so a second `make test` starts warm. Compiled
  programs are keyed by their HLO and the head by its generating code, so a stale entry is
  never used; `make clean` removes the folder."""
  return Path(os.environ.get("JFLAME_TEST_CACHE") or PROJECT_ROOT / ".pytest_cache" / "jflame_home")


def share_caches(home):
  """Links a command's JFLAME_HOME to the suite's shared compiled programs and synthetic head,
  so commands compile what an earlier test compiled once instead of once per test module."""
  for name in ("compilation_cache", "synthetic"):
    shared = suite_cache_folder() / name
    shared.mkdir(parents=True, exist_ok=True)
    link = Path(home) / name
    if not link.exists():
      link.symlink_to(shared, target_is_directory=True)


# Compiling is most of the suite's time. Most of an XLA:CPU compile is LLVM optimising the
# generated code (level 0 skips that) and XLA's MLIR fusion emitters generating it (the classic
# emitters generate the same kernels' code faster); XLA:CPU keeps IEEE arithmetic either way (no
# fast-math), so the tests check the same numbers. The commands the tests start inherit the
# flags; `user_xla_flags()` gives a command the flags a user runs with (the demo's cold start
# does), `render_xla_flags()` those of a command whose renders outweigh its compile, and
# `optimised_for_runs` compiles one program of a test process so.
LEVEL_FLAG = "--xla_backend_optimization_level=0"
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def fast_compile_flags() -> list:
  """FAST_COMPILE_FLAG where the installed XLA is the one it was measured with (jaxlib 0.7, the
  pinned one): XLA aborts the process on a flag it does not know, and a newer XLA (an
  accelerator image's) may have dropped it."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return []
  return [FAST_COMPILE_FLAG] if version.startswith("0.7.") else []


TEST_XLA_FLAGS = " ".join([LEVEL_FLAG, *fast_compile_flags()])


def user_xla_flags(env: dict) -> dict:
  """`env` without the TEST_XLA_FLAGS that `pytest_configure` added to XLA_FLAGS."""
  env = dict(env)
  flags = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                   if flag not in (LEVEL_FLAG, FAST_COMPILE_FLAG))
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env


def render_xla_flags(env: dict) -> dict:
  """`env` compiled for a test whose renders outweigh its compile: LLVM's optimisation on (the
  renders run faster), the classic fusion emitters (they compile faster; the renders run about
  as fast)."""
  env = user_xla_flags(env)
  flags = " ".join([env.get("XLA_FLAGS", ""), *fast_compile_flags()]).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  return env


# One program of a test process compiled with LLVM's optimisation (a compile option of that
# program: the process's XLA_FLAGS stay TEST_XLA_FLAGS for the rest).
RUN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


@contextlib.contextmanager
def optimised_for_runs(module, name: str, static_argnames):
  """Within: `module.name`, a jitted function, compiled with RUN_COMPILER_OPTIONS in this test
  process; yields that function. For a test whose program runs many times, or renders at every
  step, so that its run outweighs its compile at TEST_XLA_FLAGS' level 0: the same program,
  slower to compile, faster to run."""
  import jax
  optimised = jax.jit(getattr(module, name), static_argnames=static_argnames,
                      compiler_options=RUN_COMPILER_OPTIONS)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(module, name, optimised)
    yield optimised


def shared_compilation_cache() -> Path:
  """The persistent compilation cache of every test process, the commands the tests start
  (`share_caches`) and the Ray actors they make: one folder, so a program compiled in a test
  is loaded by a command or an actor that runs it with the same XLA flags (the key holds
  them), and the other way round."""
  folder = suite_cache_folder() / "compilation_cache"
  folder.mkdir(parents=True, exist_ok=True)
  # Its real path, as the commands' process_settings gives theirs through their linked
  # JFLAME_HOME: JAX puts the path into every program's cache key.
  return folder.resolve()


def one_line_exit_2(done, program: str) -> str:
  """The one line a command writes for a usage problem, "<program>: <message>" (`program` is
  the module's file name under `python -m`), after checking exit 2 and no traceback."""
  assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-2000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith(f"{program}: ")]
  assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
  return lines[0]


def make_synthetic_capture(folder, env, *flags) -> Path:
  """`tools/make_multiview_capture.py --output folder *flags` run as its users run it (a SYNTHETIC
  calibrated capture, NeRSemble's layout, with its truth); the folder."""
  made = subprocess.run([sys.executable, "tools/make_multiview_capture.py", "--output",
                         str(folder), *map(str, flags)], cwd=PROJECT_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  return Path(folder)


def pytest_configure(config):
  """The tests' own JAX programs also go through the shared persistent compilation cache (the
  two workers and both tiers compile most of the same fits), and are released after a test
  module once the worker holds many memory mappings (`release_compiled_programs`). XLA's
  backend is compiled as TEST_XLA_FLAGS say unless the caller's XLA_FLAGS chose a level."""
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in current:
    os.environ["XLA_FLAGS"] = f"{current} {TEST_XLA_FLAGS}".strip()
  import jax
  jax.config.update("jax_compilation_cache_dir", str(shared_compilation_cache()))
  # Every program, as the commands keep them: with the flags above most fits compile in about a
  # second, under JAX's default threshold for keeping one, and the other worker, the other tier
  # and the commands load them instead.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# A third of the kernel's default limit (vm.max_map_count, 65530): far more than one test module
# maps (the whole suite's programs reached ~61,000 in one worker), so no module can cross the
# limit between two checks.
MAPPINGS_BEFORE_RELEASE = 22000


def memory_mappings() -> int:
  """How many memory mappings this process holds (0 where /proc is not there)."""
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:
    return 0


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Frees every compiled program after a test module once this worker holds many memory
  mappings. Each compiled XLA:CPU program holds a few, and a test worker that compiled a whole
  suite's programs reached the kernel's limit of 65530 mappings per process
  (vm.max_map_count); the next compile then crashed with SIGSEGV. Below the threshold the
  programs stay: the next module that runs the same fit (most run the same few) reuses the
  traced and compiled program instead of tracing it again and loading it from the persistent
  cache, and the small operations JAX compiles one by one stay compiled."""
  yield
  if memory_mappings() < MAPPINGS_BEFORE_RELEASE:
    return
  import gc
  import jax
  jax.clear_caches()
  gc.collect()


@functools.lru_cache(maxsize=None)
def connection_regions() -> dict:
  """MediaPipe's own region sets (its face-mesh connection lists), independent of jflame's
  reference file; the refined model's 10 iris points are 468..477 (centres 468 and 473)."""
  from mediapipe.python.solutions import face_mesh_connections as mp

  def points(edges):
    return frozenset(i for edge in edges for i in edge)
  return dict(iris=frozenset(range(468, 478)),
              eyes=points(mp.FACEMESH_LEFT_EYE | mp.FACEMESH_RIGHT_EYE),
              lips=points(mp.FACEMESH_LIPS),
              brows=points(mp.FACEMESH_LEFT_EYEBROW | mp.FACEMESH_RIGHT_EYEBROW),
              nose=points(mp.FACEMESH_NOSE), face_oval=points(mp.FACEMESH_FACE_OVAL))


def expected_region_weights(weights, regions=None) -> dict:
  """{MediaPipe index: weight} of the landmarks in `regions` (default all six) under the
  LandmarkWeights `weights`, written out from MediaPipe's sets: a landmark in several regions
  takes the first one's weight (iris, eyes, lips, brows, nose, face oval)."""
  sets = connection_regions()
  expected = {}
  for region, members in sets.items():
    for index in members:
      expected.setdefault(index, getattr(weights, region))
  wanted = set().union(*(sets[r] for r in (regions or sets)))
  return {index: weight for index, weight in expected.items() if index in wanted}


def fit_model_over_embedding(model, embedding, config):
  """A FitModel over every row of `embedding` (no region selection), with the config's region
  weights: what the fit tests run on synthetic landmarks."""
  from jflame import landmarks, landmarks_io
  from jflame.fit import make_fit_model
  region = landmarks.mediapipe_landmark_weights(landmarks_io.load_mediapipe_reference(),
                                               config.region_weights)
  indices = np.asarray(embedding.landmark_indices)
  return make_fit_model(model, embedding.face_indices, embedding.barycentrics, indices,
                        region[indices], config)


def by_relpath(entries):
  """Manifest entries (name -> entry) or dataset rows (a list or id -> row) keyed by the path
  of their source under its input root: ids end in a path hash that tests need not spell."""
  values = entries.values() if isinstance(entries, dict) else entries
  keyed = {}
  for entry in values:
    keyed[entry["source_relpath"]] = entry
  return keyed
