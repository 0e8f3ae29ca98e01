"""The real user's path without licensed files: a FLAME-format pickle and a 105-point MediaPipe
embedding, both written here the way the official files are (not by jflame's own writer), read
by jflame and fitted with `jflame-fit --flame_model ... --embedding ...`.

The official `generic_model.pkl` is a Python 2 pickle (protocol 2) of a dict holding chumpy `Ch`
objects (GLOBAL 'chumpy.ch' 'Ch', state {'x': ndarray, ...}), a scipy.sparse csc_matrix joint
regressor and plain NumPy arrays. chumpy is not installed (and must not be), so a stand-in class
registered as module `chumpy.ch` for the duration of the dump gives the pickle the same opcodes;
the sparse matrix is a real scipy object pickled by the standard pickle module. The arrays are the
synthetic head's at FLAME's exact size and topology, without the label that marks them synthetic.
"""

import copyreg
import pickle
import pickletools
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import skimage.data

from jflame import flame, flame_io, landmarks_io, model_loading, synthetic
from jflame.errors import ModelFileError
from tests.conftest import connection_regions
from tests.test_output_files import isolated_env, load_results, obj_vertices, params_of, \
    run_command, write_rgb


class Ch:
  """Stands in for chumpy.ch.Ch when pickling: an object whose state is its __dict__."""

  def __init__(self, x):
    self.x = x
    self.dterms = ["x"]


def _chumpy_module(monkeypatch):
  """Registers modules `chumpy` and `chumpy.ch` holding the stand-in `Ch` (pickle looks the
  class up by module and name, as it would find the real one)."""
  package, module = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
  stand_in = type("Ch", (Ch,), {"__module__": "chumpy.ch", "__qualname__": "Ch"})
  module.Ch = stand_in
  package.ch = module
  monkeypatch.setitem(sys.modules, "chumpy", package)
  monkeypatch.setitem(sys.modules, "chumpy.ch", module)
  return stand_in


def official_layout(arrays, ch_class, sparse=scipy.sparse.csc_matrix):
  """The dict as FLAME's file holds it: Ch for the template, bases and rest joints, a sparse
  regressor, plain arrays for the rest, and the blend-skinning style strings."""
  content = {key: value for key, value in arrays.items() if key != "jflame_synthetic"}
  for key in ("v_template", "shapedirs", "posedirs", "J"):
    content[key] = ch_class(np.asarray(content[key], np.float64))
  content["J_regressor"] = sparse(np.asarray(content["J_regressor"], np.float64))
  content["f"] = np.asarray(content["f"], np.uint32)
  content["kintree_table"] = np.asarray(content["kintree_table"], np.int64)
  content["bs_style"], content["bs_type"] = "lbs", "lrotmin"
  return content


def _globals_in(data: bytes):
  """(module, name) of every GLOBAL opcode in a pickle."""
  return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data)
          if op.name == "GLOBAL"}


# --- Reading pickles written by plain pickle and scipy ------------------------------------------

@pytest.mark.parametrize("sparse", [
    scipy.sparse.csc_matrix, scipy.sparse.csr_matrix, scipy.sparse.coo_matrix])
@pytest.mark.parametrize("protocol", [0, 2])
def test_reads_pickles_written_by_plain_pickle_and_scipy(monkeypatch, random_arrays, sparse,
                                                         protocol):
  """A FLAME-layout pickle made by the standard pickle module (protocol 0 as Python 2 wrote by
  default, protocol 2 as FLAME's files are), with real scipy sparse regressors in each storage
  format, reads back to the same arrays."""
  content = official_layout(random_arrays, _chumpy_module(monkeypatch), sparse)
  data = pickle.dumps(content, protocol=protocol)
  found = _globals_in(data)
  assert ("chumpy.ch", "Ch") in found
  assert any(module.startswith("scipy.sparse") for module, _ in found)
  monkeypatch.delitem(sys.modules, "chumpy.ch")  # reading must not need it
  monkeypatch.delitem(sys.modules, "chumpy")
  arrays = flame_io.read_flame_pickle(data, "plain.pkl")
  for key in ("v_template", "shapedirs", "posedirs", "J", "weights", "kintree_table"):
    np.testing.assert_array_equal(arrays[key], random_arrays[key], err_msg=key)
  np.testing.assert_array_equal(arrays["f"], random_arrays["f"])
  np.testing.assert_allclose(arrays["J_regressor"], random_arrays["J_regressor"], rtol=0,
                             atol=0)
  assert arrays["bs_style"] == "lbs" and arrays["bs_type"] == "lrotmin"
  assert "chumpy" not in sys.modules


def test_reads_a_coo_regressor_pickled_by_an_older_scipy(monkeypatch, random_arrays):
  """scipy before 1.13 pickled a coo_matrix's indices as 'row' and 'col' (newer ones as
  'coords'); a file written then reads to the same regressor."""
  dense = np.asarray(random_arrays["J_regressor"], np.float64)
  rows, cols = np.nonzero(dense)

  class OldCoo:  # pickles under scipy's old module and name, with the old state layout
    def __reduce__(self):
      state = {"_shape": dense.shape, "row": rows.astype(np.int32), "col": cols.astype(np.int32),
               "data": dense[rows, cols], "has_canonical_format": True, "maxprint": 50}
      return (copyreg._reconstructor, (type(self), object, None), state)

  module = types.ModuleType("scipy.sparse.coo")
  old_coo = type("coo_matrix", (OldCoo,), {"__module__": "scipy.sparse.coo",
                                            "__qualname__": "coo_matrix"})
  module.coo_matrix = old_coo
  monkeypatch.setitem(sys.modules, "scipy.sparse.coo", module)
  content = official_layout(random_arrays, _chumpy_module(monkeypatch), lambda _: old_coo())
  data = pickle.dumps(content, protocol=2)
  assert ("scipy.sparse.coo", "coo_matrix") in _globals_in(data)
  arrays = flame_io.read_flame_pickle(data, "old_scipy.pkl")
  np.testing.assert_array_equal(arrays["J_regressor"], dense)


# --- A FLAME-size pickle and a 105-point embedding -----------------------------------------------

@pytest.fixture(scope="module")
def flame_size_files(tmp_path_factory):
  """generic_model.pkl (FLAME's size, layout and pickle opcodes) and a 105-point embedding in
  the public mediapipe_landmark_embedding.npz layout, plus the arrays they were made from."""
  folder = tmp_path_factory.mktemp("flame_files")
  arrays, embedding = synthetic.generate("flame", seed=3)
  with pytest.MonkeyPatch.context() as monkeypatch:
    content = official_layout(arrays, _chumpy_module(monkeypatch))
    data = pickle.dumps(content, protocol=2)
  assert data[:2] == b"\x80\x02"
  (folder / "generic_model.pkl").write_bytes(data)
  # 105 rows of the exact 478-point embedding, spread over the fitted regions.
  wanted = sorted(set().union(*connection_regions().values()))
  indices = np.asarray(embedding.landmark_indices)
  candidates = np.flatnonzero(np.isin(indices, wanted))
  rows = np.sort(np.random.default_rng(0).choice(candidates, 105, replace=False))
  np.savez(folder / "mediapipe_landmark_embedding.npz",
           lmk_face_idx=np.asarray(embedding.face_indices, np.int64)[rows],
           lmk_b_coords=np.asarray(embedding.barycentrics, np.float64)[rows],
           landmark_indices=indices[rows].astype(np.int64))
  return folder, arrays, indices[rows]


def test_flame_size_pickle_loads_as_flame_2020(flame_size_files):
  """load_flame reads the official-layout pickle into FLAME 2020 (by its file name and
  topology), not the synthetic model, with its arrays intact and 300 + 100 components."""
  folder, arrays, _ = flame_size_files
  model = flame_io.load_flame(folder / "generic_model.pkl")
  assert model.variant == "flame2020" and not model.is_synthetic
  assert "SYNTHETIC" not in model.name
  assert (model.num_vertices, model.faces.shape[0]) == (5023, 9976)
  assert (model.num_shape, model.num_expression) == (300, 100)
  np.testing.assert_allclose(model.v_template, arrays["v_template"], atol=1e-7)
  np.testing.assert_allclose(model.shapedirs, arrays["shapedirs"][..., :300], atol=1e-7)
  np.testing.assert_allclose(model.exprdirs, arrays["shapedirs"][..., 300:], atol=1e-7)
  np.testing.assert_allclose(model.j_regressor, arrays["J_regressor"], atol=1e-7)
  np.testing.assert_array_equal(model.faces, arrays["f"])


@pytest.mark.slow
def test_jflame_fit_with_a_flame_file_and_an_embedding(flame_size_files, tmp_path):
  """`jflame-fit --flame_model generic_model.pkl --embedding ...npz` fits a real photo with the
  given model and its 105 landmarks: status ok, landmarks within 2% of the face size, the
  model named in the result (not the synthetic one), and the mesh is that model's."""
  folder, _, embedded = flame_size_files
  photos = tmp_path / "photos"
  photos.mkdir()
  write_rgb(photos / "astronaut.png", skimage.data.astronaut())
  out = tmp_path / "out"
  done = run_command(["--input", photos, "--output", out,
                      "--flame_model", folder / "generic_model.pkl",
                      "--embedding", folder / "mediapipe_landmark_embedding.npz",
                      "--batch_size", 1, "--rigid_iterations", 60, "--full_iterations", 60],
                     tmp_path)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "SYNTHETIC" not in done.stdout and "generic_model.pkl" in done.stdout
  (result,) = load_results(out).values()
  assert str(result["status"]) == "ok"
  assert "SYNTHETIC" not in str(result["model"]) and "generic_model" in str(result["model"])
  assert float(result["landmark_error_relative"]) < 0.02, result["landmark_error_relative"]
  assert sorted(result["landmark_indices"].tolist()) == sorted(embedded.tolist())
  model = flame_io.load_flame(folder / "generic_model.pkl")
  vertices = np.asarray(flame.flame_forward(model, params_of(result))[0])
  np.testing.assert_allclose(obj_vertices(result["path"].with_suffix(".obj")), vertices,
                             atol=2e-6)


def test_a_flame_file_without_its_embedding_is_refused(flame_size_files, tmp_path):
  """A FLAME file needs its landmark embedding: without one (none given, none in the search
  folders) the command stops with exit code 2 and says what to pass."""
  folder, _, _ = flame_size_files
  photos = tmp_path / "photos"
  photos.mkdir()
  write_rgb(photos / "astronaut.png", skimage.data.astronaut())
  done = run_command(["--input", photos, "--output", tmp_path / "out",
                      "--flame_model", folder / "generic_model.pkl"], tmp_path)
  assert done.returncode == 2, done.stdout + done.stderr
  assert "embedding" in done.stderr and "--embedding" in done.stderr
  assert not list((tmp_path / "out").rglob("*.npz"))


def test_wrong_embeddings_are_refused_with_the_reason(flame_size_files, tmp_path, monkeypatch):
  """An embedding for another mesh (triangles the model lacks), a file that is not an
  embedding, and a missing file are each a ModelFileError naming the file and the problem."""
  folder, _, _ = flame_size_files
  env = isolated_env(tmp_path)
  monkeypatch.setenv("HOME", env["HOME"])
  monkeypatch.setenv("JFLAME_HOME", env["JFLAME_HOME"])
  model_path = str(folder / "generic_model.pkl")
  with pytest.raises(ModelFileError, match="needs a MediaPipe landmark embedding"):
    model_loading.load_model(model_path, None)
  with np.load(folder / "mediapipe_landmark_embedding.npz") as data:
    good = {key: data[key] for key in data.files}
  other_mesh = tmp_path / "other_mesh.npz"
  np.savez(other_mesh, **dict(good, lmk_face_idx=good["lmk_face_idx"] + 9976))
  with pytest.raises(ModelFileError, match=r"other_mesh.npz.*triangle \d+ but the model has "
                                           r"only 9976"):
    model_loading.load_model(model_path, str(other_mesh))
  not_one = tmp_path / "not_an_embedding.npz"
  np.savez(not_one, lmk_face_idx=good["lmk_face_idx"])
  with pytest.raises(ModelFileError, match="not_an_embedding.npz.*lacks lmk_b_coords"):
    model_loading.load_model(model_path, str(not_one))
  with pytest.raises(ModelFileError, match="absent.npz"):
    model_loading.load_model(model_path, str(tmp_path / "absent.npz"))
  loaded = model_loading.load_model(model_path, str(folder / "mediapipe_landmark_embedding.npz"))
  assert loaded.embedding.num_landmarks == 105 and not loaded.model.is_synthetic
  assert landmarks_io.load_mediapipe_embedding(
      folder / "mediapipe_landmark_embedding.npz").num_landmarks == 105
