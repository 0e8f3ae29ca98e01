"""The batch split over several devices gives the single-device answer (8 CPU devices forced in
a subprocess, since XLA reads the flag at start-up)."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import PROJECT_ROOT

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from jflame import landmarks, sharding, synthetic
    from jflame.config import FitConfig
    from jflame.fit import fit_batch, make_fit_model
    from tests.test_fit import _scene, _with_crop
    model, embedding = synthetic.synthetic_flame("small")
    config = FitConfig(num_shape=20, num_expression=10, rigid_iterations=20, full_iterations=20)
    indices = np.asarray(embedding.landmark_indices)
    fit_model = make_fit_model(model, embedding.face_indices, embedding.barycentrics, indices,
                               np.ones(len(indices)), config)
    _, _, observation = _scene(model, embedding, 8, seed=0)
    observation = _with_crop(observation, 64)
    single = fit_batch(jax.device_put(fit_model, jax.devices()[0]),
                       jax.device_put(observation, jax.devices()[0]), config)
    mesh = sharding.batch_mesh()
    split = fit_batch(sharding.replicate(fit_model, mesh), sharding.shard_batch(observation, mesh),
                      config)
    assert len(split.params.expression.sharding.device_set) == 8
    # The LM stage fixes its float32 optimum to about 3e-3 px; sharding reorders the sums.
    np.testing.assert_allclose(split.landmarks_2d, single.landmarks_2d, atol=5e-3)
    np.testing.assert_allclose(split.params.expression, single.params.expression, atol=1e-3)
    print("sharded ok")
""")


def test_batch_split_over_eight_devices_matches_one_device():
  # Eight devices added to the suite's XLA flags, not in their place: the test flags
  # (conftest.TEST_XLA_FLAGS: no LLVM optimisation, the classic emitters) halve the two fits'
  # compile.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0 and "sharded ok" in done.stdout, done.stderr[-3000:]
