"""The device modules on a bare accelerator image: `import jflame`, the forward model, the
renderer and the fit import and run with MediaPipe, OpenCV, trimesh, Pillow, onnxruntime and
scikit-image absent (they are needed only where photographs are read and results written)."""

import subprocess
import sys
import textwrap

from tests.conftest import PROJECT_ROOT

HOST_LIBRARIES = ("cv2", "mediapipe", "trimesh", "PIL", "onnxruntime", "skimage")

PROBE = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
      sys.modules[name] = None   # any import of it now raises ImportError
    import jax.numpy as jnp
    import jflame
    from jflame import config, fit, flame, model_loading, render
    loaded = model_loading.load_model()                            # the synthetic head
    settings = jflame.FitConfig(mode="photometric", rigid_iterations=2, full_iterations=2,
                                num_shape=10, num_expression=10, albedo_per_channel=2)
    fit_model = model_loading.prepare_fit_model(loaded, settings)
    crop = 32
    observations = jflame.Observation(
        landmarks=jnp.full((1, 478, 2), crop / 2.0) + jnp.arange(478.0)[None, :, None] % 7,
        landmark_weights=jnp.ones((1, 478)), image=jnp.full((1, crop, crop, 3), 0.5),
        face_mask=jnp.ones((1, crop, crop)), valid=jnp.ones(1, bool))
    result = jflame.fit_batch(fit_model, observations, settings)
    print("ok", result.params.shape.shape, result.photometric_error.shape)
    print(sorted(m for m in {blocked!r} if sys.modules.get(m) is not None))
""")


def test_device_modules_import_and_fit_without_host_libraries():
  probe = subprocess.run([sys.executable, "-c", PROBE.format(blocked=HOST_LIBRARIES)],
                         capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
  assert probe.returncode == 0, probe.stderr[-3000:]
  lines = probe.stdout.strip().splitlines()
  assert lines[-2] == "ok (1, 10) (1,)", probe.stdout
  assert lines[-1] == "[]", probe.stdout
