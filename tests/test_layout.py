"""The house rules: one installed top-level package, imports that point one way, settings that
refuse nonsense, and a model variant read from data rather than from a file name."""

import ast
import dataclasses
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jflame import flame_io
from jflame.config import FitConfig, FitMode, LearningRates, Regularization, Schedule
from jflame.errors import ConfigError, ModelFileError
from jflame.landmarks import LandmarkWeights
from tests import flame_pickle
from tests.conftest import PROJECT_ROOT, random_flame_arrays

PACKAGE = PROJECT_ROOT / "jflame"
# Modules that run on the device or describe the model: no files, no host libraries.
DEVICE_MODULES = ("camera", "clip_solve", "config", "fit", "flame", "starting_point", "landmarks",
                  "losses", "observation", "optim", "rotation", "render", "solve", "temporal",
                  "track", "landmark_nets/interpreter", "landmark_nets/face_detector",
                  "landmark_nets/face_mesh")
HOST_ONLY_IMPORTS = ("cv2", "mediapipe", "trimesh", "PIL", "onnxruntime", "absl.flags",
                     "jflame.preprocess", "jflame.output", "jflame.model_loading", "jflame.engine",
                     "jflame.dataset", "jflame.initializers")
# The only modules that may use the optional ONNX layer.
ENCODER_USERS = ("jflame/model_loading.py", "jflame/engine.py")
# The only module besides the commands that may import the optional Ray (jflame[ray]).
RAY_USERS = ("jflame/ray_engine.py",)


def _imports(path: Path):
  """Every module name a file imports (absolute), at any depth (function-level imports too)."""
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _package_files():
  return sorted(PACKAGE.rglob("*.py"))


def _is_or_under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_wheel_has_exactly_one_top_level_package(tmp_path):
  """Built as a user's pip would build it: `jflame` is the only import package, the encoders
  are `jflame.initializers`, the commands `jflame.cli`, and tools/ is not installed."""
  pytest.importorskip("setuptools", minversion="77")
  pytest.importorskip("wheel")
  source = tmp_path / "source"
  tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
  for name in tracked:
    if (PROJECT_ROOT / name).is_file():
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(PROJECT_ROOT / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp_path / "dist"), str(source)], check=True,
                 capture_output=True, timeout=300)
  wheel, = (tmp_path / "dist").glob("jflame-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
      (".dist-info", ".data"))}
  assert top_level == {"jflame"}, top_level
  assert "jflame/initializers/deca.py" in names and "jflame/cli/fit.py" in names
  assert "jflame/data/mediapipe_face.npz" in names
  assert not any(name.startswith(("tools/", "tests/", "initializers/")) for name in names)
  entry_points = next(n for n in names if n.endswith("entry_points.txt"))
  scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
  assert "jflame-fit = jflame.cli.start:fit" in scripts


def test_tests_never_import_command_modules():
  """Importing a command defines its absl flags; two commands in one test process would
  collide. Tests run commands as subprocesses."""
  for path in sorted((PROJECT_ROOT / "tests").glob("*.py")):
    bad = [name for name in _imports(path) if _is_or_under(name, "jflame.cli")]
    assert not bad, f"{path.name} imports {bad}"


def test_imports_point_one_way():
  problems = []
  for path in _package_files():
    relative = path.relative_to(PROJECT_ROOT).as_posix()
    for name in _imports(path):
      if _is_or_under(name, "tools") or _is_or_under(name, "initializers"):
        problems.append(f"{relative} imports {name} (use jflame.* names; tools/ is scripts)")
      if (_is_or_under(name, "jflame.initializers") and not relative.startswith(
          ("jflame/initializers/", "jflame/cli/")) and relative not in ENCODER_USERS):
        problems.append(f"{relative} imports the optional encoder layer ({name})")
      if _is_or_under(name, "absl.flags") and not relative.startswith("jflame/cli/"):
        problems.append(f"{relative} defines or reads flags outside jflame/cli ({name})")
      if _is_or_under(name, "ray") and not relative.startswith("jflame/cli/") and (
          relative not in RAY_USERS):
        problems.append(f"{relative} imports the optional Ray ({name})")
      if _is_or_under(name, "jflame.ray_engine") and not relative.startswith("jflame/cli/"):
        problems.append(f"{relative} imports the Ray engine ({name}); only commands may")
  assert not problems, "\n".join(problems)


_NO_RAY = "import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:  # a parent is not a package
    return False


def test_every_name_the_tools_import_from_jflame_exists():
  """tools/ are scripts no test runs whole; a name moved between modules must not leave one
  failing at its first line (eval_synthetic did twice: a function moved to landmarks_io, and
  `from tools import ...`, which only works with the project root on sys.path)."""
  missing = []
  for path in sorted((PROJECT_ROOT / "tools").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
          _is_or_under(node.module, "jflame")):
        module = importlib.import_module(node.module)
        missing += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                    if not hasattr(module, alias.name) and
                    not _is_module(f"{node.module}.{alias.name}")]
      elif isinstance(node, ast.Import):
        missing += [f"{path.name}: {alias.name}" for alias in node.names
                    if _is_or_under(alias.name, "jflame") and not _is_module(alias.name)]
      # Run as `python tools/x.py`, a tool has its own folder on sys.path, not the project's.
      names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
               [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
      missing += [f"{path.name}: {name} (import the sibling by its own name)" for name in names
                  if _is_or_under(name, "tools")]
  assert not missing, "\n".join(missing)


LINTED = ("jflame", "tools", "tests")


def _ruff(*args, cwd=PROJECT_ROOT):
  if importlib.util.find_spec("ruff") is None:
    pytest.skip("ruff is not installed; the test extra pins it (make install, or "
                "pip install -e '.[test]')")
  return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_the_code_passes_the_linter():
  """`ruff check` with pyproject.toml's [tool.ruff] rules finds nothing in the code."""
  done = _ruff(*LINTED)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_linter_finds_an_unused_import_and_an_undefined_name(tmp_path):
  """The rules are live: a file with an unused import and an undefined name fails them."""
  (tmp_path / "bad.py").write_text("import os\n\n\ndef f():\n  return undefined_name\n")
  done = _ruff("--config", str(PROJECT_ROOT / "pyproject.toml"), "bad.py", cwd=tmp_path)
  assert done.returncode == 1, done.stdout + done.stderr
  assert "F401" in done.stdout and "F821" in done.stdout, done.stdout


def test_the_local_engine_needs_no_ray():
  probe = subprocess.run(
      [sys.executable, "-c", _NO_RAY + "import jflame.engine, jflame.sinks, jflame.cli.annotate"],
      capture_output=True, text=True, cwd=PROJECT_ROOT)
  assert probe.returncode == 0, probe.stderr


@pytest.mark.parametrize("flags,says", [
    (["--engine=ray"], "pip install 'jflame[ray]'"),
    (["--ray_address=auto"], "--ray_address is for --engine=ray")])
def test_ray_engine_usage_problems_say_what_to_do(tmp_path, flags, says):
  (tmp_path / "photos").mkdir()
  command = subprocess.run(
      [sys.executable, "-c", _NO_RAY + "from jflame.cli import annotate; annotate.run()",
       "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")] + flags,
      capture_output=True, text=True, cwd=PROJECT_ROOT)
  assert command.returncode == 2, command.stderr
  assert says in command.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_modules_touch_no_files_or_host_libraries(module):
  paths = [PACKAGE / f"{module}.py"] if (PACKAGE / f"{module}.py").exists() else sorted(
      (PACKAGE / module).glob("*.py"))
  assert paths
  for path in paths:
    source = path.read_text()
    bad = [name for name in _imports(path) if any(_is_or_under(name, h) for h in
                                                   HOST_ONLY_IMPORTS)]
    bad += [name for name in _imports(path) if name.startswith("jflame.") and
            name.split(".")[1].endswith("_io")]
    assert not bad, f"{path.name} imports {bad}"
    for call in ("np.load(", "open(", ".read_bytes(", ".write_bytes(", "np.save"):
      assert call not in source, f"{path.name} touches files ({call})"


_IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import jflame
from jax._src import xla_bridge
for module in pkgutil.walk_packages(jflame.__path__, "jflame."):
  if module.name.startswith("jflame.cli."):   # commands define flags; their modules import lazily
    continue
  importlib.import_module(module.name)
  if xla_bridge.backends_are_initialized():
    sys.exit("importing " + module.name + " started an XLA backend")
"""


def test_importing_a_module_starts_no_device():
  """A module-level JAX computation starts the backend at import: on an accelerator that takes
  the device (and most of its memory) in every process that imports jflame, the preprocessing
  pool's and Ray's included, and adds its start to every command's."""
  probe = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
  assert probe.returncode == 0, probe.stderr[-2000:]


def test_public_api_is_what_the_readme_uses():
  import jflame
  for name in jflame.__all__:
    assert getattr(jflame, name) is not None, name
  readme = (PROJECT_ROOT / "README.md").read_text()
  example = readme.split("```python", 1)[1].split("```", 1)[0]
  imported = [line for line in example.splitlines() if "import" in line]
  assert imported and all(line.startswith(("import jflame", "from jflame import ", "import jax"))
                          for line in imported), imported
  # `import jflame` stays light: no MediaPipe, OpenCV or trimesh until they are used.
  probe = subprocess.run(
      [sys.executable, "-c", "import sys, jflame; jflame.FitConfig; jflame.fit_batch; "
       "print(sorted(m for m in ('mediapipe', 'cv2', 'trimesh') if m in sys.modules))"],
      capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
  assert probe.stdout.strip() == "[]", probe.stdout


# --- Settings that refuse nonsense -------------------------------------------------------------

BAD_SETTINGS = [
    ("mode", "photometic"), ("mode", None), ("num_shape", 0), ("num_shape", 2.5),
    ("num_expression", -1), ("num_expression", True), ("rigid_iterations", -1),
    ("full_iterations", 1.5), ("init_rounds", -2), ("init_num_shape", -1),
    ("init_num_expression", "3"), ("vmap_chunk", -1), ("albedo_per_channel", 0),
    ("landmark_scale", 0.0), ("landmark_scale", float("nan")), ("landmark_robust_scale", -1.0),
    ("photometric_robust_scale", 0), ("photometric_weight", -0.1), ("fov_degrees", 0.0),
    ("fov_degrees", 180.0), ("fit_shape", "yes"), ("landmark_regions", ("eyes", "cheeks")),
    ("landmark_regions", ()), ("regularization", Regularization(shape=-0.1)),
    ("regularization", {"shape": 0.1}), ("region_weights", LandmarkWeights(eyes=-1.0)),
    ("rigid_rates", LearningRates(camera_rotation=Schedule(0.0))),
    ("full_rates", LearningRates(jaw=Schedule(0.01, -0.01))),
    ("full_rates", LearningRates(jaw=0.01)), ("raster", None),
    ("landmark_solver", "gauss-newton"), ("lm_iterations", -1), ("lm_vmap_chunk", 1.0),
    ("shared_focal", 1), ("shared_focal_iterations", -5),
]


@pytest.mark.parametrize("field,value", BAD_SETTINGS, ids=[f"{f}={v!r}" for f, v in BAD_SETTINGS])
def test_every_setting_refuses_nonsense_naming_the_field(field, value):
  with pytest.raises(ConfigError, match=rf"FitConfig\.{field}"):
    FitConfig(**{field: value})


def test_every_field_is_covered_by_the_validation_tests():
  covered = {field for field, _ in BAD_SETTINGS}
  assert covered == {field.name for field in dataclasses.fields(FitConfig)}


def test_mode_is_an_enum_that_accepts_its_names():
  assert FitConfig(mode="photometric").mode is FitMode.PHOTOMETRIC
  assert FitConfig(mode="photometric").photometric and not FitConfig().photometric
  assert FitConfig().mode == "landmark"
  with pytest.raises(ConfigError, match="'landmark', 'photometric'"):
    FitConfig(mode="Photometric")
  hash(FitConfig(landmark_regions=["eyes", "lips"]))  # a list is stored as a hashable tuple


def test_coefficient_counts_are_checked_against_the_model():
  from jflame import model_loading, synthetic
  model, embedding = synthetic.synthetic_flame("small")
  loaded = model_loading.LoadedModel(model, embedding, model.name)
  with pytest.raises(ConfigError, match=rf"num_expression is 50 .* has {model.num_expression}"):
    model_loading.prepare_fit_model(loaded, FitConfig(num_shape=10, num_expression=50))


# --- The model's variant is data -----------------------------------------------------------------

@pytest.fixture(scope="module")
def flame_size_arrays():
  """Random arrays with FLAME's exact topology (not FLAME: numbers are meaningless)."""
  return random_flame_arrays(num_vertices=5023, num_faces=9976, num_shape=300,
                             num_expression=100)


def test_variant_of_the_synthetic_model():
  from jflame import synthetic
  model, _ = synthetic.synthetic_flame("small")
  assert model.variant == "synthetic" and model.is_synthetic


def test_variant_from_an_official_file_name_needs_flame_topology(tmp_path, flame_size_arrays):
  official = tmp_path / "generic_model.pkl"
  flame_pickle.save_flame_pkl(flame_size_arrays, official)
  assert flame_io.load_flame(official).variant == "flame2020"
  open_model = tmp_path / "flame2023_Open.pkl"
  shutil.copy(official, open_model)
  assert flame_io.load_flame(open_model).variant == "flame2023_open"
  renamed = tmp_path / "my_head.pkl"
  shutil.copy(official, renamed)
  assert flame_io.load_flame(renamed).variant == "unknown"
  assert flame_io.load_flame(renamed, variant="flame2020").variant == "flame2020"
  # A small model under an official name is not FLAME whatever it is called.
  impostor = tmp_path / "sub" / "generic_model.pkl"
  impostor.parent.mkdir()
  flame_pickle.save_flame_pkl(random_flame_arrays(), impostor)
  assert flame_io.load_flame(impostor).variant == "unknown"
  with pytest.raises(ModelFileError, match="unknown FLAME variant"):
    flame_io.load_flame(official, variant="flame2021")


def test_variant_travels_with_a_converted_file(tmp_path, flame_size_arrays):
  official = tmp_path / "generic_model.pkl"
  flame_pickle.save_flame_pkl(flame_size_arrays, official)
  converted = tmp_path / "anything.npz"
  flame_io.save_flame_npz(flame_io.load_flame(official), converted)
  assert flame_io.load_flame(converted).variant == "flame2020"
  with np.load(converted) as data:
    assert str(data["variant"]) == "flame2020"


def test_every_test_file_belongs_to_exactly_one_tier():
  """`make test-fast` and `make test-slow` together run every test file: each file is listed in
  one tier in tests/conftest.py, and every listed name is a file."""
  from tests import conftest
  files = {path.stem for path in (PROJECT_ROOT / "tests").glob("test_*.py")}
  fast, slow = set(conftest.FAST_SUITES), set(conftest.SLOW_SUITES)
  assert len(fast) == len(conftest.FAST_SUITES) and len(slow) == len(conftest.SLOW_SUITES)
  assert not fast & slow, fast & slow
  assert files - fast - slow == set(), f"in no tier: {sorted(files - fast - slow)}"
  assert (fast | slow) - files == set(), f"listed but not a file: {sorted((fast | slow) - files)}"


def test_the_tiers_split_the_suite_as_the_markers_say(tmp_path):
  """Collection alone: the fast tier holds no test of a slow file, the slow tier the tests marked
  slow in fast files as well as every test of a slow file. One collection (importing every test
  module is most of its time), each test listed with the tier `-m slow` / `-m "not slow"` puts
  it in: the `slow` marker as pytest's marker expressions read it."""
  (tmp_path / "tier_listing.py").write_text(
      "def pytest_collection_finish(session):\n"
      "  for item in session.items:\n"
      "    tier = 'slow' if item.get_closest_marker('slow') else 'fast'\n"
      "    print('TIER', tier, item.nodeid)\n")
  done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                         "-p", "no:cacheprovider", "-p", "tier_listing"], cwd=PROJECT_ROOT,
                        env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{PROJECT_ROOT}"),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  listed = [line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("TIER ")]
  fast = {test for tier, test in listed if tier == "fast"}
  slow = {test for tier, test in listed if tier == "slow"}
  from tests import conftest
  assert fast and slow and len(fast) + len(slow) == len(listed)
  assert not any(test.split("::")[0][len("tests/"):-3] in conftest.SLOW_SUITES for test in fast)
  assert ("tests/test_report.py::test_jflame_report_writes_the_page_of_a_dataset_or_a_split_run"
          in slow)
  assert any(test.startswith("tests/test_track_motion.py::") for test in slow)
  assert any(test.startswith("tests/test_flame.py::") for test in fast)


def test_device_mode_needs_no_mediapipe():
  """`--landmarks device` runs on an accelerator image without MediaPipe or `tflite` (graphs
  saved by tools/bench_landmarks.py --save_graphs): the engine, the annotate and fit commands
  and the device landmarker's modules import with both blocked."""
  probe = subprocess.run(
      [sys.executable, "-c", "import sys; sys.modules['mediapipe'] = None; "
       "sys.modules['tflite'] = None; import jflame.engine, jflame.cli.annotate, "
       "jflame.landmark_nets.landmarker, jflame.preprocess.pipeline; print('ok')"],
      capture_output=True, text=True, cwd=PROJECT_ROOT)
  assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-2000:]
