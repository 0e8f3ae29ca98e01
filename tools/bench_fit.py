"""Benchmark of landmark-mode fitting: images per second at several batch sizes (both stages,
compile time separately), and host preprocessing separately.

  python tools/bench_fit.py [--batch_sizes 1,16,64,256] [--rigid_iterations 200]
                            [--full_iterations 200] [--flame_model PATH] [--mode photometric]
                            [--tile_size N] [--tiles_per_step N]
                            [--landmark_solvers adam,lm] [--lm_iterations N]

Several --landmark_solvers are timed side by side at each batch size (same process, same
observations), so their ratio holds on a noisy machine.

Fitting is timed on synthetic landmark observations (known faces projected by known cameras),
so it measures the device program alone; preprocessing is timed on real photographs.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
from absl import app, flags

import jax
import jax.numpy as jnp

from jflame import flame, model_loading
from jflame.camera import FRONTAL_ROTATION, Camera, project
from jflame.config import FitConfig
from jflame.fit import fit_batch
from jflame.observation import Observation
import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64", "256"], "Batch sizes.")
_RIGID = flags.DEFINE_integer("rigid_iterations", 200, "Stage 1 iterations.")
_FULL = flags.DEFINE_integer("full_iterations", 200, "Stage 2 iterations.")
_FLAME_MODEL = flags.DEFINE_string("flame_model", None, "FLAME file (default: synthetic).")
_EMBEDDING = flags.DEFINE_string("embedding", None, "Embedding for a real FLAME model.")
_CROP = flags.DEFINE_integer("crop_size", 256, "Crop size (and photometric render size).")
_MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "Fitting mode.")
_VMAP_CHUNK = flags.DEFINE_integer("vmap_chunk", 0, "FitConfig.vmap_chunk (0: whole batch).")
_TILE_SIZE = flags.DEFINE_integer("tile_size", None,
                                  "RasterSettings.tile_size (default: FitConfig's).")
_TILES_PER_STEP = flags.DEFINE_integer("tiles_per_step", None,
                                       "RasterSettings.tiles_per_step (0: per-backend default).")
_PREPROCESS_IMAGES = flags.DEFINE_integer("preprocess_images", 24,
                                          "Photographs to preprocess (0 skips that part).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results as JSON here.")
_SOLVERS = flags.DEFINE_list("landmark_solvers", ["lm", "adam"],
                             "FitConfig.landmark_solver values to time side by side.")
_LM_ITERATIONS = flags.DEFINE_integer("lm_iterations", None,
                                      "FitConfig.lm_iterations (default: the config's).")


def synthetic_observations(loaded, count, crop_size, seed=0, photometric=False):
  """Landmarks of random faces seen by random cameras, with 0.5 px noise (and, for photometric
  fitting, shaded renders of the faces as photos with their masks)."""
  model, embedding = loaded.model, loaded.embedding
  rng = np.random.default_rng(seed)
  params = flame.FlameParams.zeros(model.num_shape, model.num_expression)
  params = jax.tree.map(lambda x: jnp.asarray(
      rng.normal(scale=0.5, size=(count,) + x.shape) * (x.ndim == 1 and x.shape[0] > 3),
      jnp.float32), params)
  rotations = np.stack([(jax.numpy.asarray(FRONTAL_ROTATION) + rng.normal(scale=0.1, size=3))
                        for _ in range(count)])
  cameras = Camera(rotation=jnp.asarray(rotations, jnp.float32),
                   translation=jnp.asarray(np.c_[rng.normal(scale=0.01, size=(count, 2)),
                                                 rng.uniform(0.6, 0.9, count)], jnp.float32),
                   focal_length=jnp.full(count, 726.0 * crop_size / 256, jnp.float32),
                   principal_point=jnp.full((count, 2), crop_size / 2, jnp.float32))

  def landmarks_of(p, camera):
    vertices, _ = flame.flame_forward(model, p)
    return project(camera, embedding.points(vertices, model.faces))

  pixels = np.asarray(jax.jit(jax.vmap(landmarks_of))(params, cameras))
  detected = np.zeros((count, 478, 2), np.float32)
  detected[:, np.asarray(embedding.landmark_indices)] = pixels + rng.normal(
      scale=0.5, size=pixels.shape)
  images = masks = None  # a landmark batch carries no images (as the engine's)
  if photometric:
    images, masks = _rendered_photos(model, params, cameras, crop_size)
  return Observation(landmarks=jnp.asarray(detected),
                     landmark_weights=jnp.ones((count, 478), jnp.float32),
                     image=images, face_mask=masks, valid=jnp.ones(count, bool),
                     size=crop_size)


def _rendered_photos(model, params, cameras, size):
  """Shaded renders of the faces (mean albedo, light from above) over grey, and their masks."""
  from jflame.camera import screen_space, to_camera_space
  from jflame.render import (Appearance, RasterSettings, face_adjacency, laplacian_albedo_model,
                             render_mesh, vertex_normals)
  albedo = laplacian_albedo_model(model.v_template, model.faces, 4)
  neighbors = jnp.asarray(face_adjacency(np.asarray(model.faces)))
  appearance = Appearance.neutral(albedo.num_coefficients)
  appearance = appearance.replace(lighting=appearance.lighting.at[1].set(0.8))

  def photo(p, camera):
    vertices, _ = flame.flame_forward(model, p)
    normals = vertex_normals(to_camera_space(camera, vertices), model.faces)
    out = render_mesh(screen_space(camera, vertices), model.faces, normals, albedo, appearance,
                      size, size, RasterSettings(cull_backfaces=True), neighbors)
    return out.image + (1.0 - out.alpha[..., None]) * 0.4, (out.alpha > 0.99).astype(jnp.float32)

  return jax.jit(jax.vmap(photo))(params, cameras)


def bench_preprocessing(count, crop_size):
  import skimage.data
  from jflame.preprocess import Preprocessor
  photo_folder = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "photos"
  photos = sorted(photo_folder.glob("*.png")) if photo_folder.is_dir() else []
  sources = (photos or [skimage.data.astronaut()]) * count
  sources = sources[:count]
  with Preprocessor(crop_size) as preprocessor:
    preprocessor.prepare(sources[:2])  # warm-up
    start = time.perf_counter()
    records = preprocessor.prepare(sources)
    elapsed = time.perf_counter() - start
  ok = sum(r.ok for r in records)
  what = f"{len(photos)} FFHQ photos (1024x1024)" if photos else "astronaut (512x512)"
  return dict(images=count, ok=ok, source=what, per_image_ms=1000 * elapsed / count)


def main(argv):
  del argv
  loaded = model_loading.load_model(_FLAME_MODEL.value, _EMBEDDING.value)
  config = FitConfig(rigid_iterations=_RIGID.value, full_iterations=_FULL.value, mode=_MODE.value,
                     vmap_chunk=_VMAP_CHUNK.value)
  raster = {name: flag.value for name, flag in (("tile_size", _TILE_SIZE),
                                                ("tiles_per_step", _TILES_PER_STEP))
            if flag.value is not None}
  config = config.replace(raster=dataclasses.replace(config.raster, **raster))
  if _LM_ITERATIONS.value is not None:
    config = config.replace(lm_iterations=_LM_ITERATIONS.value)
  fit_model = model_loading.prepare_fit_model(loaded, config)
  print(f"model: {loaded.model.name}")
  print(f"device: {benchmarking.device_description()}")
  print(f"config: {config.mode} mode, {config.rigid_iterations} + {config.full_iterations} "
        f"iterations (adam) or {config.lm_iterations} (lm), "
        f"{config.num_shape} shape + {config.num_expression} expression, "
        f"{fit_model.landmark_indices.shape[0]} landmarks, crop {_CROP.value}, vmap_chunk "
        f"{config.vmap_chunk}, {config.raster}")
  rows, results = [], []
  for batch in map(int, _BATCH_SIZES.value):
    observations = synthetic_observations(loaded, batch, _CROP.value, seed=batch,
                                          photometric=config.photometric)
    for solver in _SOLVERS.value:
      solver_config = config.replace(landmark_solver=solver)
      compile_s, per_call = benchmarking.time_compiled(
          lambda obs: fit_batch(fit_model, obs, solver_config).params, observations, repeats=3,
          min_seconds=0.5)
      result = fit_batch(fit_model, observations, solver_config)
      error = float(np.median(np.asarray(result.landmark_error)))
      results.append(dict(batch=batch, landmark_solver=solver,
                          per_image_ms=1000 * per_call / batch, images_per_s=batch / per_call,
                          compile_s=compile_s, median_landmark_error_px=error))
      rows.append((batch, solver, f"{1000 * per_call / batch:.2f}", f"{batch / per_call:,.1f}",
                   f"{compile_s:.1f}", f"{error:.2f}"))
      print(rows[-1], flush=True)
  print(benchmarking.markdown_table(
      ("batch", "solver", "ms / image", "images / s", "compile s", "median landmark error px"),
      rows))
  payload = dict(device=benchmarking.device_description(), model=loaded.model.name,
                 mode=config.mode, crop_size=_CROP.value,
                 rigid_iterations=config.rigid_iterations, full_iterations=config.full_iterations,
                 lm_iterations=config.lm_iterations,
                 fit=results)
  if _PREPROCESS_IMAGES.value:
    payload["preprocess"] = bench_preprocessing(_PREPROCESS_IMAGES.value, _CROP.value)
    print(f"preprocessing (1 process): {payload['preprocess']}")
  benchmarking.write_json(_JSON_OUT.value, payload)


if __name__ == "__main__":
  app.run(main)
