"""Numerics pins for tests that compare with float64 or NumPy references, on the pinned JAX 0.7
and on newer releases, on a CPU and on an accelerator.

GPUs run float32 matrix products in TF32 by default (about 1e-3 relative), which the library
accepts (the forward model moves by at most ~0.02 mm) but a comparison with a float64 reference
at 1e-5 does not; such tests pin the precision to "highest". Float64 gradient checks need x64,
whose context manager moved from `jax.experimental.enable_x64` (0.7) to `jax.enable_x64` (newer
releases, where the experimental one is gone).
"""

import jax


def enable_x64():
  """Context manager: float64 arrays and computations inside the block."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as experimental_enable_x64  # JAX 0.7
  return experimental_enable_x64()


def highest_matmul_precision():
  """Context manager: float32 matrix products at full precision (no TF32 or bf16 passes)."""
  return jax.default_matmul_precision("highest")
