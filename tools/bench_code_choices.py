"""Re-measures the small host-side figures behind choices the code makes (docs/BENCHMARKS.md,
"Figures behind code choices"): the content hash, the 2 x 2 affine inverse, and OpenCV's
INTER_AREA at integer against fractional ratios. Prints one JSON line per figure.

  .venv/bin/python tools/bench_code_choices.py
"""

import hashlib
import json
import timeit

import cv2
import numpy as np

from jflame.camera import invert_affine


def best_ms(statement, number):
  """Best of 5 repeats, milliseconds per call (the least disturbed by other work)."""
  return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e3


def main():
  rng = np.random.default_rng(0)
  jpeg = rng.integers(0, 256, 140_000, dtype=np.uint8).tobytes()
  for name in ("sha256", "blake2b"):
    print(json.dumps({"figure": f"hash of 140 KB, {name}", "ms": round(
        best_ms(lambda: hashlib.new(name, jpeg).hexdigest(), 200), 4)}))
  affine = np.array([[0.9, 0.1, 12.0], [-0.1, 0.9, 30.0]])

  def lapack_inverse():
    full = np.vstack([affine, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]
  np.testing.assert_allclose(lapack_inverse(), invert_affine(affine), atol=1e-12)
  for name, function in (("np.linalg.inv", lapack_inverse), ("written out", lambda: invert_affine(
      affine))):
    print(json.dumps({"figure": f"affine inverse, {name} (no MediaPipe threads running)",
                      "ms": round(best_ms(function, 2000), 5)}))
  image = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
  for name, size in (("integer ratio 4", (256, 256)), ("fractional ratio 4.1", (250, 250))):
    print(json.dumps({"figure": f"INTER_AREA 1024 px RGB, {name}", "ms": round(best_ms(
        lambda: cv2.resize(image, size, interpolation=cv2.INTER_AREA), 50), 3)}))


if __name__ == "__main__":
  main()
