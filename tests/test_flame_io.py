"""Loading FLAME files without chumpy: round trips, the restricted unpickler, clear errors."""

import os
import pickle

import numpy as np
import pytest

from jflame import flame, flame_io
from jflame.errors import ModelFileError, UnsafePickleError
from tests import flame_pickle
from tests.conftest import FLAME_FILE_NAMES, SHARED_ASSETS, real_flame_files

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")


def _vertices(model, seed=0):
  rng = np.random.default_rng(seed)
  params = flame.FlameParams.zeros(model.num_shape, model.num_expression)
  params = params.replace(shape=params.shape + rng.normal(size=model.num_shape),
                          expression=params.expression + rng.normal(size=model.num_expression),
                          jaw_rotation=params.jaw_rotation + np.array([0.2, 0.0, 0.0]))
  return np.asarray(flame.flame_forward(model, params)[0])


def test_pickle_to_npz_round_trip_keeps_vertices(tmp_path, random_arrays):
  pkl_path, npz_path = tmp_path / "model.pkl", tmp_path / "model.npz"
  flame_pickle.save_flame_pkl(random_arrays, pkl_path)
  from_pickle = flame_io.load_flame(pkl_path)
  flame_io.save_flame_npz(from_pickle, npz_path)
  from_npz = flame_io.load_flame(npz_path)
  assert from_pickle.num_shape == 12 and from_pickle.num_expression == 6  # inferred split
  assert from_npz.name == from_pickle.name == "FLAME model.pkl"
  np.testing.assert_allclose(_vertices(from_npz), _vertices(from_pickle), atol=1e-6)
  direct = flame_io.flame_model_from_arrays(random_arrays, "direct")
  np.testing.assert_allclose(_vertices(from_pickle), _vertices(direct), atol=1e-6)


def test_pickle_holds_chumpy_and_sparse_like_the_official_files(random_arrays):
  data = flame_pickle.flame_pickle_bytes(random_arrays)
  assert b"chumpy.ch\nCh" in data and b"scipy.sparse.csc\ncsc_matrix" in data
  arrays = flame_io.read_flame_pickle(data)
  np.testing.assert_allclose(arrays["J_regressor"], random_arrays["J_regressor"])
  np.testing.assert_allclose(arrays["shapedirs"], random_arrays["shapedirs"])


def test_explicit_expression_count_overrides_inference(random_arrays):
  model = flame_io.flame_model_from_arrays(random_arrays, "x", num_expression=10)
  assert (model.num_shape, model.num_expression) == (8, 10)


class _Exploit:
  def __reduce__(self):
    return (print, ("this must never run",))


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path, capsys):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"v_template": _Exploit()}, protocol=2))
  with pytest.raises(UnsafePickleError, match=r"global (__builtin__|builtins)\.print"):
    flame_io.load_flame(path)
  assert "must never run" not in capsys.readouterr().out


def test_missing_damaged_and_wrong_files_name_the_file(tmp_path, random_arrays):
  with pytest.raises(ModelFileError, match=r"not found: .*absent\.pkl.*WORKSPACE\.md"):
    flame_io.load_flame(tmp_path / "absent.pkl")
  truncated = tmp_path / "truncated.pkl"
  truncated.write_bytes(flame_pickle.flame_pickle_bytes(random_arrays)[:5000])
  with pytest.raises(ModelFileError, match="truncated.pkl"):
    flame_io.load_flame(truncated)
  incomplete = tmp_path / "incomplete.pkl"
  flame_pickle.save_flame_pkl({k: v for k, v in random_arrays.items() if k != "weights"}, incomplete)
  with pytest.raises(ModelFileError, match="missing weights"):
    flame_io.load_flame(incomplete)
  mismatched = dict(random_arrays, weights=random_arrays["weights"][:-1])
  with pytest.raises(ModelFileError, match="lbs_weights has shape"):
    flame_io.flame_model_from_arrays(mismatched, "x")
  foreign_npz = tmp_path / "foreign.npz"
  np.savez(foreign_npz, a=np.zeros(3))
  with pytest.raises(ModelFileError, match="jflame-convert-flame"):
    flame_io.load_flame(foreign_npz)


def test_a_converted_npz_loads_the_same_model(tmp_path, random_arrays):
  # (The command itself runs as a subprocess below: importing a command module would define
  # its flags in the test process.)
  pkl_path, npz_path = tmp_path / "in.pkl", tmp_path / "out.npz"
  flame_pickle.save_flame_pkl(random_arrays, pkl_path)
  flame_io.save_flame_npz(flame_io.load_flame(pkl_path), npz_path)
  np.testing.assert_allclose(_vertices(flame_io.load_flame(npz_path)),
                             _vertices(flame_io.load_flame(pkl_path)), atol=1e-6)


@pytest.mark.parametrize("name", FLAME_FILE_NAMES)
def test_real_flame_file_when_present(name, tmp_path):
  matches = [p for p in real_flame_files() if p.name == name]
  if not matches:
    pytest.skip(f"no official {name} under {SHARED_ASSETS} (FLAME is licensed by its authors "
                "and is not shipped; see WORKSPACE.md)")
  model = flame_io.load_flame(matches[0])
  assert model.num_vertices == 5023 and model.faces.shape == (9976, 3)
  assert model.num_joints == 5 and not model.is_synthetic
  vertices = _vertices(model)
  assert np.all(np.isfinite(vertices)) and np.abs(vertices).max() < 1.0  # metres, head-sized
  flame_io.save_flame_npz(model, tmp_path / "model.npz")
  np.testing.assert_allclose(_vertices(flame_io.load_flame(tmp_path / "model.npz")), vertices,
                             atol=1e-6)


def test_convert_command_on_the_synthetic_pickle(tmp_path):
  """The installed console entry point, end to end, on the synthetic model's official-format
  pickle (chumpy objects, sparse regressor)."""
  import subprocess
  import sys
  from jflame import synthetic
  from tests.conftest import PROJECT_ROOT
  flame_pickle.save_flame_pkl(synthetic.synthetic_flame_arrays("small", seed=0), tmp_path / "s.pkl")
  done = subprocess.run([sys.executable, "-m", "jflame.cli.convert_flame", str(tmp_path / "s.pkl"),
                         str(tmp_path / "s.npz")], cwd=PROJECT_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "SYNTHETIC" in done.stdout and "20 shape + 10 expression" in done.stdout
  converted = flame_io.load_flame(tmp_path / "s.npz")
  assert converted.is_synthetic
  np.testing.assert_allclose(_vertices(converted), _vertices(flame_io.load_flame(tmp_path / "s.pkl")),
                             atol=1e-6)
  assert (tmp_path / "s.npz").stat().st_size < (tmp_path / "s.pkl").stat().st_size


@pytest.mark.parametrize("command, listed, wrong_uses", [
    ("convert_flame", ("--num_expression", "--flame_variant"),
     ([], ["only-one.pkl"], ["missing.pkl", "out.npz"], ["--num_expression", "x", "a", "b"])),
    ("build_embedding", ("--output", "--reference_embedding", "--yaw_degrees", "--report"),
     (["extra"], ["--yaw_degrees", "left,right"], ["--size", "9"])),
])
def test_tool_commands_run_like_the_others(tmp_path, command, listed, wrong_uses):
  """jflame-convert-flame and jflame-build-embedding run through the same runner as the fitting
  commands: --help lists their own flags and exits 0; a missing argument, a missing file, a bad
  flag value each exit 2 with one line on stderr and no traceback."""
  import subprocess
  import sys
  from tests.conftest import PROJECT_ROOT

  def run(*args):
    return subprocess.run([sys.executable, "-m", f"jflame.cli.{command}", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
  shown = run("--help")
  assert shown.returncode == 0, shown.stderr
  for flag in listed:
    assert f"  {flag}:" in shown.stdout, (flag, shown.stdout)
  for args in wrong_uses:
    done = run(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (args, done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and lines[0].startswith(f"{command}.py: "), lines
