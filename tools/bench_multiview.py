"""Issue 20, criterion 4: a moment of three calibrated views against a single-view photo fit at
the same batch, on the FLAME-size synthetic scenes of tools/eval_multiview.py.

  python tools/bench_multiview.py [--batches 8,32] [--timed_calls 15] [--clip_moments 100]
      [--photometric_moments 1]

The two fits are timed interleaved (one call each, in turn, `--timed_calls` times; medians), so a
noisy machine slows both alike. Prints ms per image, ms per moment and their ratio (the
criterion: moments/s >= 1/3 of images/s). With --clip_moments N, also a rig's clip of N moments
(`rig_track.track_rig`, the temporal model over the clip, the shape held) against the same N
moments fitted alone (`multiview.fit_moments`), interleaved the same way. With
--photometric_moments N, photometric mode: N moments of three views (`jflame-fit --cameras
--mode photometric`'s settings, crop 256; the command fits one moment a call) against N photos
(`jflame-fit --mode photometric`), the views' crops and the photos blank under a full mask (the
time does not depend on what the pixels hold).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jflame import model_loading, multiview, rig_track
from jflame.config import FitConfig, TrackConfig
from jflame.fit import fit_batch
import eval_multiview  # tools/ is a folder of scripts: its own folder is on sys.path
import eval_synthetic

_BATCHES = flags.DEFINE_list("batches", ["8", "32"], "Faces (and moments) per call.")
_TIMED = flags.DEFINE_integer("timed_calls", 15, "Timed calls of each fit.", lower_bound=1)
_CLIP_MOMENTS = flags.DEFINE_integer("clip_moments", 0, "Moments of a rig clip to time too "
                                     "(0: none).", lower_bound=0)
_PHOTOMETRIC_MOMENTS = flags.DEFINE_integer(
    "photometric_moments", 0, "Moments (and photos) a call of the photometric fits to time too "
    "(0: none).", lower_bound=0)


def _interleaved(fits: dict) -> dict:
  """{name: median seconds} of the callables, each compiled first, then called in turn."""
  times = {name: [] for name in fits}
  for run in fits.values():
    run()   # compile
  for _ in range(_TIMED.value):
    for name, run in fits.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(values)) for name, values in times.items()}


def main(argv):
  del argv
  loaded = model_loading.load_model(None, None)
  photo_config = FitConfig()
  moment_config = eval_multiview.moment_config()   # what jflame-fit --cameras runs
  photo_model = model_loading.prepare_fit_model(loaded, photo_config)
  moment_model = model_loading.prepare_fit_model(loaded, moment_config)
  for batch in map(int, _BATCHES.value):
    params, cameras, observations = eval_synthetic.random_scene(
        loaded, batch, 0, 1.0, eval_multiview.FOCAL)
    views, _ = eval_multiview._views(loaded, params, cameras, 1.0, np.random.default_rng(1),
                                     eval_multiview.YAWS[3])
    fits = dict(
        photo=lambda: jax.block_until_ready(fit_batch(photo_model, observations, photo_config)),
        moment=lambda: jax.block_until_ready(multiview.fit_moments(moment_model, views,
                                                                   moment_config)))
    medians = _interleaved(fits)
    photo, moment = medians["photo"], medians["moment"]
    print(json.dumps(dict(batch=batch, device=str(jax.devices()[0]),
                          lm_iterations=moment_config.lm_iterations,
                          ms_per_image=1000 * photo / batch, ms_per_moment=1000 * moment / batch,
                          moments_per_s_over_images_per_s=photo / moment)), flush=True)


  if _CLIP_MOMENTS.value:
    count = _CLIP_MOMENTS.value
    params, cameras, observations = eval_synthetic.random_scene(
        loaded, count, 0, 1.0, eval_multiview.FOCAL)
    views, _ = eval_multiview._views(loaded, params, cameras, 1.0, np.random.default_rng(1),
                                     eval_multiview.YAWS[3])
    track_config = TrackConfig(fit=moment_config)
    shape = rig_track.clip_shape(moment_model, views, track_config)
    photo_landmarks = len(model_loading.fitted_landmark_indices(loaded, FitConfig()))
    medians = _interleaved(dict(
        alone=lambda: jax.block_until_ready(multiview.fit_moments(
            moment_model, views, moment_config, shape)),
        clip=lambda: jax.block_until_ready(rig_track.track_rig(
            moment_model, views, track_config, shape, photo_landmarks))))
    print(json.dumps(dict(clip_moments=count, views=3, device=str(jax.devices()[0]),
                          clip_lm_iterations=track_config.clip_lm_iterations,
                          clip_cg_iterations=track_config.clip_cg_iterations,
                          ms_per_moment_alone=1000 * medians["alone"] / count,
                          ms_per_moment_clip=1000 * medians["clip"] / count,
                          clip_over_alone=medians["clip"] / medians["alone"])), flush=True)


  if _PHOTOMETRIC_MOMENTS.value:
    _time_photometric(loaded, _PHOTOMETRIC_MOMENTS.value)


def _time_photometric(loaded, count: int):
  photo_config = FitConfig(mode="photometric")
  moment_config = eval_multiview.moment_config().replace(
      mode="photometric", full_iterations=photo_config.full_iterations,
      landmark_solver=multiview.PHOTOMETRIC_LANDMARK_SOLVER)   # what the command runs
  photo_model = model_loading.prepare_fit_model(loaded, photo_config)
  moment_model = model_loading.prepare_fit_model(loaded, moment_config)
  params, cameras, observations = eval_synthetic.random_scene(
      loaded, count, 0, 1.0, eval_multiview.FOCAL)
  size = observations.image.shape[1]
  observations = observations.replace(face_mask=jnp.ones((count, size, size), jnp.float32))
  views, _ = eval_multiview._views(loaded, params, cameras, 1.0, np.random.default_rng(1),
                                   eval_multiview.YAWS[3])
  count_views = views.valid.shape[1]
  photos = multiview.ViewPhotos(   # the views' images are crop-sized: the crop is the image
      images=jnp.zeros((count, count_views, size, size, 3), jnp.float32),
      face_masks=jnp.ones((count, count_views, size, size), jnp.float32),
      crop_from_image=jnp.tile(jnp.eye(2, 3), (count, count_views, 1, 1)))
  medians = _interleaved(dict(
      photo=lambda: jax.block_until_ready(fit_batch(photo_model, observations, photo_config)),
      moment=lambda: jax.block_until_ready(multiview.fit_moments(
          moment_model, views, moment_config, None, photos))))
  print(json.dumps(dict(photometric_moments=count, views=count_views, crop=size,
                        device=str(jax.devices()[0]),
                        photometric_iterations=moment_config.full_iterations,
                        ms_per_photo=1000 * medians["photo"] / count,
                        ms_per_moment=1000 * medians["moment"] / count,
                        moment_over_photo_per_view=medians["moment"] / medians["photo"]
                        / count_views)), flush=True)


if __name__ == "__main__":
  app.run(main)
