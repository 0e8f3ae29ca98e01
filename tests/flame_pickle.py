"""Writes FLAME arrays as the official files are laid out: a Python 2 pickle holding chumpy Ch
objects and a scipy csc_matrix, without chumpy or scipy's pickling (tests only: jflame reads such
files, `jflame.flame_io.load_flame`, and never writes them)."""

import io
import pickle
import struct

import numpy as np

from jflame.atomic import atomic_path


class _GlobalRef:
  """A global that the written pickle names without this process importing it."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that REDUCE callables be callable
    raise TypeError("placeholder only")


class _ForeignObject:
  """An instance of a class that is not installed here (chumpy.ch.Ch, scipy's csc_matrix),
  written the way Python 2 pickled new-style objects: copy_reg._reconstructor, then state."""

  def __init__(self, module, name, state):
    self.class_ref, self.state = _GlobalRef(module, name), state

  def __reduce__(self):
    return (_GlobalRef("copy_reg", "_reconstructor"),
            (self.class_ref, _GlobalRef("__builtin__", "object"), None), self.state)


class _ForeignPickler(pickle._Pickler):
  """Writes pickles as Python 2 did (the pure-Python pickler lets us add dispatch entries)."""
  dispatch = pickle._Pickler.dispatch.copy()

  def _save_global_ref(self, ref):
    self.write(pickle.GLOBAL + f"{ref.module}\n{ref.name}\n".encode("ascii"))
    self.memoize(ref)

  dispatch[_GlobalRef] = _save_global_ref

  def _save_python2_str(self, data):
    # Python 2 wrote byte strings (NumPy's raw array data among them) as str opcodes; Python 3
    # reads them back as latin1 text, which NumPy accepts for exactly this case.
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(data)

  dispatch[bytes] = _save_python2_str


def _sparse_csc_state(dense):
  dense = np.asarray(dense, np.float64)
  cols, rows = np.nonzero(dense.T)  # column-major order
  indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=dense.shape[1]))])
  return {"_shape": dense.shape, "data": dense[rows, cols], "indices": rows.astype(np.int32),
          "indptr": indptr.astype(np.int32), "maxprint": 50}


def flame_pickle_bytes(arrays: dict) -> bytes:
  """A pickle laid out like the official FLAME files: shapedirs, posedirs and v_template as
  chumpy Ch objects, J_regressor as a scipy csc_matrix, everything else plain."""
  chumpy_keys = ("v_template", "shapedirs", "posedirs")
  content = {}
  for key, value in arrays.items():
    if key in chumpy_keys:
      content[key] = _ForeignObject("chumpy.ch", "Ch",
                                    {"x": np.asarray(value, np.float64), "dterms": ["x"]})
    elif key == "J_regressor":
      content[key] = _ForeignObject("scipy.sparse.csc", "csc_matrix", _sparse_csc_state(value))
    else:
      content[key] = value
  buffer = io.BytesIO()
  _ForeignPickler(buffer, protocol=2).dump(content)
  return buffer.getvalue()


def save_flame_pkl(arrays: dict, path):
  """Writes official-key FLAME arrays as a chumpy-style pickle that `load_flame` reads."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(flame_pickle_bytes(arrays))
