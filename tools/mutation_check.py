"""`make mutation`: re-make the wrong changes of issue 13 one at a time and check that the tests
named for each one fail (docs/TESTING.md has the table). Not part of CI: it runs a few dozen
fits and commands, about 15 minutes on a 2-core CPU.

    python tools/mutation_check.py              # every change
    python tools/mutation_check.py priors mode  # the changes whose description contains a word

Each change is an exact text replacement in one source file; the file is restored afterwards
(also on Ctrl-C). A change whose original text is no longer in the file is reported as STALE:
the code moved, so update its entry here and in docs/TESTING.md. Exit status 1 when a change
went unnoticed (or is stale).
"""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (description, file, original text, wrong text, tests that must fail)
MUTATIONS = [
  ("robust loss made quadratic", "jflame/losses.py",
    "  return scale * scale * (jnp.sqrt(1.0 + squared_norm / (scale * scale)) - 1.0)",
    "  return 0.5 * squared_norm",
    ["tests/test_fit_behaviour.py::test_charbonnier_is_quadratic_near_zero_and_linear_far_out",
     "tests/test_fit_behaviour.py::"
     "test_the_robust_fit_undoes_most_of_an_outliers_pull_on_the_start"]),
  # The Adam loss's normalisation (the landmark stage's solver since the Levenberg-Marquardt
  # became the default is caught by the next entry's test).
  ("crop-size normalisation dropped", "jflame/losses.py",
    "  residual = (predicted - target) * (reference_size / crop_size)",
    "  residual = (predicted - target)",
    ["tests/test_fit_behaviour.py::test_landmark_loss_is_a_weighted_mean_in_reference_crop_pixels"]),
  ("crop-size normalisation dropped from the Levenberg-Marquardt", "jflame/fit.py",
    "pixel_scale=jnp.asarray(config.landmark_scale / crop_size, jnp.float32),",
    "pixel_scale=jnp.asarray(1.0, jnp.float32),",
    ["tests/test_fit_behaviour.py::test_crop_size_does_not_change_the_fit"]),
  ("region weights dropped from the landmark loss", "jflame/fit.py",
    "  weights = detection_weights * fit_model.landmark_weights * observation.valid",
    "  weights = detection_weights * observation.valid",
    ["tests/test_fit_behaviour.py::test_a_heavily_weighted_region_is_followed_closely"]),
  ("all priors multiplied by 0", "jflame/fit.py",
    "  return (losses.l2(flame_params.shape, weights.shape)",
    "  return 0.0 * (losses.l2(flame_params.shape, weights.shape)",
    ["tests/test_fit_behaviour.py::test_priors_pull_an_unconstrained_coefficient_to_zero"]),
  ("DECA expression guess ignored", "jflame/fit.py",
    "      expression_mean = jnp.where(guess.estimated, guess.expression, expression_mean)",
    "      expression_mean = expression_mean",
    ["tests/test_fit_behaviour.py::test_an_initial_guess_is_where_the_fit_starts"]),
  ("region selection ignored (478 landmarks)", "jflame/model_loading.py",
    "  return landmarks.select_regions(loaded.embedding, config.landmark_regions, reference)",
    "  return loaded.embedding",
    ["tests/test_fit_behaviour.py::"
     "test_default_fit_uses_mediapipes_162_feature_landmarks_with_their_region_weights",
     "tests/test_output_files.py::test_flags_reach_the_configuration_and_the_files"]),
  ("later batches get the first batch's photos (prefetch reloads the same chunk)",
    "jflame/engine.py",
    "preprocessor.prepare_iter([s.path for s in batch],\n"
    "                                                           [s.name for s in batch])))",
    "preprocessor.prepare_iter([s.path for s in first],\n"
    "                                                           [s.name for s in first])))",
    ["tests/test_output_files.py::test_every_batch_is_fitted_and_each_result_is_its_photos"]),
  (".obj with x and z swapped", "jflame/output.py",
    "  mesh = trimesh.Trimesh(vertices=np.asarray(vertices, np.float64),",
    "  mesh = trimesh.Trimesh(vertices=np.asarray(vertices, np.float64)[:, [2, 1, 0]],",
    ["tests/test_output_files.py::test_obj_mesh_is_the_fitted_model_in_metres",
     "tests/test_output_files.py::test_ply_meshes_are_the_fitted_model_in_metres"]),
  ("--mode ignored (always landmark)", "jflame/cli/common.py",
    "full_iterations=FULL_ITERATIONS.value, mode=MODE.value,",
    "full_iterations=FULL_ITERATIONS.value, mode=\"landmark\",",
    ["tests/test_output_files.py::test_mode_flag_makes_a_photometric_fit"]),
  ("render in the pictures 3.5x too bright", "jflame/fit.py",
    "  return FittedMeshes(vertices=vertices, pixels=pixels, render=renders.image,",
    "  return FittedMeshes(vertices=vertices, pixels=pixels, render=renders.image * 3.5,",
    ["tests/test_output_files.py::test_written_render_is_the_renderers_output"]),
  ("photometric term multiplied by 0", "jflame/fit.py",
    "      loss = (loss + config.photometric_weight * photometric_loss(variables)",
    "      loss = (loss + config.photometric_weight * 0.0 * photometric_loss(variables)",
    ["tests/test_fit_photometric.py::test_photometric_term_moves_the_fit"]),
  ("a rig's photometric term multiplied by 0", "jflame/multiview.py",
    "      loss = (loss + config.photometric_weight * photometric_loss(variables)",
    "      loss = (loss + config.photometric_weight * 0.0 * photometric_loss(variables)",
    ["tests/test_multiview.py::test_the_photometric_stage_pulls_the_head_to_what_every_view_shows"]),
  ("a rig track's photometric term multiplied by 0", "jflame/rig_track.py",
    "    cost = landmark_cost + fit_config.photometric_weight * jnp.sum(",
    "    cost = landmark_cost + fit_config.photometric_weight * 0.0 * jnp.sum(",
    ["tests/test_rig_track.py::test_photometric_mode_pulls_every_moment_to_what_the_views_show"]),
]


def main(words):
  missed = 0
  for name, path, old, new, tests in MUTATIONS:
    if words and not any(word in name for word in words):
      continue
    source = ROOT / path
    original = source.read_text()
    if original.count(old) != 1:
      print(f"STALE  {name}: the original text is not (once) in {path}", flush=True)
      missed += 1
      continue
    source.write_text(original.replace(old, new))
    try:
      for test in tests:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               test], cwd=ROOT, capture_output=True, text=True)
        caught = done.returncode != 0
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'} {name} | {test} | "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    finally:
      source.write_text(original)
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
