"""What a restricted unpickler may build: NumPy arrays and scalars, nothing that runs code.

Shared by the FLAME model loader (chumpy pickles) and the landmark embedding loader (np.save of
a pickled dict); each adds the few stand-ins its files need and refuses every other global.
"""

import numpy as np


def numpy_globals() -> dict:
  """(module, name) -> callable for the globals NumPy's own pickles reference, under the module
  names NumPy 1 writes (numpy.core) and NumPy 2 writes (numpy._core)."""
  try:
    from numpy._core import multiarray  # NumPy 2 (and 1.26); numpy.core is deprecated in 2
  except ImportError:
    from numpy.core import multiarray
  allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = multiarray._reconstruct
    allowed[(module, "scalar")] = multiarray.scalar
  return allowed
