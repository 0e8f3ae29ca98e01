"""Benchmarks of jflame-track: the clip fit alone (synthetic clip, FLAME-size model) and the whole
command on a real clip (decode, MediaPipe tracking, fit, overlay video).

  .venv/bin/python tools/bench_track.py --frames 256 --clip clip_512.mp4 \
      --json_out docs/benchmarks/track_cpu.json

Compile time is listed apart; the fit figures are the median of 5 timed repeats on the same
shapes (benchmarking.time_compiled).
"""

import json
import time

from absl import app, flags
import jax
import numpy as np

import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_FRAMES = flags.DEFINE_integer("frames", 256, "Frames of the synthetic clip (fit-only figure).")
_CLIP = flags.DEFINE_string("clip", None, "A real clip for the end-to-end figure (optional).")
_MODES = flags.DEFINE_list("modes", ["landmark"], "landmark and/or photometric.")
_PHOTOMETRIC_FRAMES = flags.DEFINE_integer("photometric_frames", 32, "Frames of the "
                                           "photometric figure.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures here.")


def synthetic_clip(model, embedding, frames, crop, num_shape, num_expression, seed=0):
  """Landmarks of the synthetic head moving smoothly (0.5 px noise), as an Observation."""
  import jax.numpy as jnp
  from scipy.spatial.transform import Rotation
  from jflame import flame
  from jflame.camera import FRONTAL_ROTATION, Camera, project
  from jflame.observation import Observation
  rng = np.random.default_rng(seed)
  t = np.arange(frames) / 25.0
  shape = rng.normal(size=num_shape) * 0.5
  expression = np.zeros((frames, num_expression))
  expression[:, :3] = np.sin(2 * np.pi * np.outer(t, [0.7, 0.4, 1.1])) * [0.8, 0.6, 0.5]
  params = flame.FlameParams.zeros(num_shape, num_expression)
  params = jax.tree.map(lambda x: jnp.broadcast_to(x, (frames,) + x.shape), params).replace(
      shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (frames, num_shape)),
      expression=jnp.asarray(expression, jnp.float32),
      jaw_rotation=jnp.asarray(np.stack([0.1 + 0.08 * np.sin(6 * t), 0 * t, 0 * t], 1),
                               jnp.float32))
  yaw = 0.3 * np.sin(2 * np.pi * 0.3 * t)
  rotation = (Rotation.from_rotvec(FRONTAL_ROTATION)
              * Rotation.from_rotvec(np.stack([0 * t, yaw, 0 * t], 1))).as_rotvec()
  vertices = jax.jit(jax.vmap(lambda p: flame.flame_forward(model, p)[0]))(params)
  indices = np.asarray(embedding.landmark_indices)
  observed = np.zeros((frames, 478, 2), np.float32)
  for i in range(frames):
    camera = Camera(rotation=jnp.asarray(rotation[i], jnp.float32),
                    translation=jnp.asarray([0.0, 0.0, 0.75], jnp.float32),
                    focal_length=jnp.asarray(726.0, jnp.float32),
                    principal_point=jnp.asarray([crop / 2, crop / 2], jnp.float32))
    observed[i, indices] = np.asarray(project(camera, embedding.points(vertices[i],
                                                                          model.faces)))
  observed[:, indices] += rng.normal(scale=0.5, size=(frames, len(indices), 2))
  return Observation(landmarks=observed, landmark_weights=np.ones((frames, 478), np.float32),
                     image=None, face_mask=None, valid=np.ones(frames, bool), size=crop)


def bench_fit(loaded, config, observation, crop):
  from jflame.model_loading import prepare_fit_model
  from jflame.track import fit_clip, segment_count
  fit_model = prepare_fit_model(loaded, config.fit)
  # Median of 5 timed repeats: one call on this noisy VM varied by up to 40%.
  compile_s, seconds = benchmarking.time_compiled(
      lambda o: fit_clip(fit_model, o, config, crop), observation)
  result = fit_clip(fit_model, observation, config, crop)
  frames = observation.valid.shape[0]
  return dict(frames=frames, segments=segment_count(frames, config),
              segment_length=config.segment_length, overlap=config.overlap,
              iterations=config.fit.full_iterations,
              photometric_iterations=(config.photometric_iterations
                                      if config.fit.photometric else 0),
              compile_s=compile_s, seconds=seconds, frames_per_s=frames / seconds,
              s_per_frame=seconds / frames,
              median_landmark_error_px=float(np.median(result.landmark_error)))


def main(argv):
  del argv
  from jflame import synthetic
  from jflame.model_loading import LoadedModel
  from jflame.config import TrackConfig
  model, embedding = synthetic.synthetic_flame("flame", seed=0)
  loaded = LoadedModel(model, embedding, "synthetic (FLAME size)")
  figures = dict(device=str(jax.devices()[0]), jax=jax.__version__)
  if "landmark" in _MODES.value:
    config = TrackConfig()
    observation = synthetic_clip(model, embedding, _FRAMES.value, 256, config.fit.num_shape,
                                 config.fit.num_expression)
    figures["fit_landmark"] = bench_fit(loaded, config, observation, 256)
    print("fit (landmark):", figures["fit_landmark"], flush=True)
  if "photometric" in _MODES.value and _CLIP.value:
    import tempfile
    from jflame import track_runner
    config = TrackConfig().replace(fit=TrackConfig().fit.replace(mode="photometric"))
    with tempfile.TemporaryDirectory() as folder:
      options = track_runner.TrackOptions(output_dir=folder, crop_size=128,
                                          max_frames=_PHOTOMETRIC_FRAMES.value,
                                          write_overlay=False, write_plot=False)
      track_runner.track_video(loaded, config, options, _CLIP.value)     # compiles
      start = time.perf_counter()
      manifest = track_runner.track_video(loaded, config, options, _CLIP.value)
      seconds = time.perf_counter() - start
    figures["photometric_end_to_end"] = dict(
        frames=manifest["frames"], crop=128, seconds=seconds,
        s_per_frame=seconds / manifest["frames"], timings=manifest["timings"],
        iterations=config.fit.full_iterations,
        photometric_iterations=config.photometric_iterations)
    print("photometric:", figures["photometric_end_to_end"], flush=True)
  if _CLIP.value and "landmark" in _MODES.value:
    import tempfile
    from jflame import track_runner
    config = TrackConfig()
    with tempfile.TemporaryDirectory() as folder:
      options = track_runner.TrackOptions(output_dir=folder)
      track_runner.track_video(loaded, config, options, _CLIP.value)     # compiles
      start = time.perf_counter()
      manifest = track_runner.track_video(loaded, config, options, _CLIP.value)
      seconds = time.perf_counter() - start
    figures["landmark_end_to_end"] = dict(
        frames=manifest["frames"], frame_size=manifest["frame_size"], seconds=seconds,
        frames_per_s=manifest["frames"] / seconds, timings=manifest["timings"],
        median_landmark_error_px=manifest["landmark_error_px_median"])
    print("end to end (landmark):", figures["landmark_end_to_end"], flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as file:
      json.dump(figures, file, indent=1)


if __name__ == "__main__":
  app.run(main)
