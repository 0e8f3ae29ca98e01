"""How long one fit program takes to trace, lower, compile and run, under the XLA_FLAGS of the
process: what the test suite's flags (tests/conftest.py, TEST_XLA_FLAGS) and a user's buy.

  XLA_FLAGS="--xla_backend_optimization_level=0" python tools/bench_compile.py --mode photometric

Each run is one cold process (the persistent compilation cache is off), so compare runs of this
script, one flag set each. The scene: the small synthetic head, crops of `--crop_size`, the
images grey and the landmarks the head's own points (the timing does not depend on them).
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

import jax
import jax.numpy as jnp

from jflame import camera as camera_lib
from jflame import flame, synthetic
from jflame.config import FitConfig
from jflame.fit import fit_batch, make_fit_model
from jflame.observation import Observation
from jflame.render import laplacian_albedo_model

_MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "Fit mode.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images in the batch.", lower_bound=1)
_CROP_SIZE = flags.DEFINE_integer("crop_size", 96, "Crop size (pixels).", lower_bound=16)
_ITERATIONS = flags.DEFINE_integer("iterations", 40, "Adam steps of each stage.",
                                    lower_bound=0)


def _scene(mode, batch, size, iterations):
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  config = FitConfig(num_shape=20, num_expression=10, mode=mode, albedo_per_channel=8,
                     rigid_iterations=iterations, full_iterations=iterations)
  albedo = laplacian_albedo_model(model.v_template, model.faces, 8) if mode == "photometric" \
      else None
  indices = np.asarray(embedding.landmark_indices)
  fit_model = make_fit_model(model, embedding.face_indices, embedding.barycentrics, indices,
                             np.ones(len(indices)), config, albedo)
  camera = camera_lib.Camera(
      rotation=jnp.asarray(camera_lib.FRONTAL_ROTATION, jnp.float32),
      translation=jnp.asarray([0.0, 0.0, 0.75], jnp.float32),
      focal_length=jnp.asarray(726.0 * size / 256, jnp.float32),
      principal_point=jnp.asarray([size / 2, size / 2], jnp.float32))
  vertices, _ = flame.flame_forward(model, flame.FlameParams.zeros(20, 10))
  landmarks = np.zeros((478, 2), np.float32)
  landmarks[indices] = np.asarray(camera_lib.project(camera, embedding.points(vertices,
                                                                               model.faces)))
  observation = Observation(
      landmarks=jnp.asarray(np.repeat(landmarks[None], batch, 0)),
      landmark_weights=jnp.ones((batch, 478)),
      image=jnp.full((batch, size, size, 3), 0.5, jnp.float32),
      face_mask=jnp.ones((batch, size, size), jnp.float32), valid=jnp.ones(batch, bool))
  return fit_model, observation, config


def main(_):
  jax.config.update("jax_enable_compilation_cache", False)
  fit_model, observation, config = _scene(_MODE.value, _BATCH.value, _CROP_SIZE.value,
                                          _ITERATIONS.value)
  seconds = {}
  start = time.perf_counter()
  traced = fit_batch.trace(fit_model, observation, config)
  seconds["trace"] = time.perf_counter() - start
  start = time.perf_counter()
  lowered = traced.lower()
  seconds["lower"] = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds["compile"] = time.perf_counter() - start
  for run in ("first_run", "second_run"):
    start = time.perf_counter()
    jax.block_until_ready(compiled(fit_model, observation))
    seconds[run] = time.perf_counter() - start
  print(json.dumps(dict(mode=_MODE.value, batch=_BATCH.value, crop_size=_CROP_SIZE.value,
                        iterations=_ITERATIONS.value, xla_flags=os.environ.get("XLA_FLAGS", ""),
                        device=str(jax.devices()[0]),
                        seconds={k: round(v, 2) for k, v in seconds.items()})))


if __name__ == "__main__":
  try:
    app.run(main)
  except KeyboardInterrupt:
    print("interrupted: nothing measured", file=sys.stderr)
    sys.exit(130)
