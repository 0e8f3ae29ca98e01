"""Benchmark of the JAX renderer on a FLAME-size mesh: render, and render + gradient.

The mesh is a closed, head-sized deformed ellipsoid with FLAME's face count (9976 triangles; its
4990 vertices are padded with 33 unused ones to FLAME's 5023), framed like a face crop so it
covers about half of the image. "render" is `render_mesh` with the built-in per-vertex albedo and
SH lighting; "render+grad" is the value and gradient of a photometric L2 loss (composited over a
grey background, against a target image) w.r.t. the model-space vertices, the lighting and the
albedo coefficients, which is what one photometric fitting step costs. Each configuration is
compiled once (timed separately) and then timed as the median of several runs after a warm-up,
with `block_until_ready`. Per-image times are batch time / batch size. A batch of one runs the
plain single-image function; larger batches run under `vmap` (all images at once) and/or
`lax.map` (one image at a time inside one program). The machine's load average is recorded
with the results: on a shared machine the numbers are only as quiet as the machine.

  python tools/bench_render.py --sizes=128,256,512 --batch_sizes=1,16,64 --json_out=render.json
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jflame.camera import Camera, screen_space, to_camera_space
from jflame.render import (Appearance, RasterSettings, face_adjacency, laplacian_albedo_model,
                           render_mesh, vertex_normals)

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["128", "256", "512"], "Square render sizes in pixels.")
flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Images per call.")
flags.DEFINE_integer("max_batch_pixels", 64 * 256 * 256,
                     "Skip configurations with more batch * pixels than this (memory/time).")
flags.DEFINE_integer("repeats", 7, "Timed runs per configuration (median reported).")
flags.DEFINE_bool("cull_backfaces", True, "RasterSettings.cull_backfaces.")
flags.DEFINE_bool("antialias", True, "RasterSettings.antialias.")
flags.DEFINE_integer("tile_size", 4, "RasterSettings.tile_size.")
flags.DEFINE_integer("albedo_per_channel", 16, "Built-in albedo basis functions per channel.")
flags.DEFINE_list("batch_modes", ["vmap", "map"],
                  "How a batch is run: 'vmap' (all images at once) and/or 'map' (lax.map, one "
                  "image at a time inside one compiled program; on a CPU this keeps each image's "
                  "working set in cache).")
flags.DEFINE_string("json_out", None, "Write the results as JSON to this path.")

FLAME_NUM_VERTICES = 5023
FLAME_NUM_FACES = 9976


def head_mesh():
  """A closed head-sized mesh with FLAME's triangle count: a latitude-longitude grid of 86
  meridians and 58 rings on an ellipsoid (poles on the vertical axis) with a nose-like bump,
  in FLAME's model axes (metres, y up, z towards the viewer).

  Returns:
    (vertices (5023, 3) float32, faces (9976, 3) int32).
  """
  meridians, rings = 86, 58
  polar = np.pi * np.arange(1, rings + 1) / (rings + 1)
  azimuth = 2 * np.pi * np.arange(meridians) / meridians
  polar, azimuth = np.meshgrid(polar, azimuth, indexing="ij")
  direction = np.stack([np.sin(polar) * np.sin(azimuth), np.cos(polar),
                        np.sin(polar) * np.cos(azimuth)], -1).reshape(-1, 3)
  direction = np.concatenate([[[0, 1, 0]], direction, [[0, -1, 0]]])
  nose = 0.02 * np.exp(-((direction[:, 0] / 0.15) ** 2 + (direction[:, 1] / 0.3) ** 2)) * (
      direction[:, 2] > 0)
  vertices = direction * np.array([0.09, 0.12, 0.1]) + nose[:, None] * np.array([0, 0, 1])
  ring_start = lambda r: 1 + r * meridians
  faces = []
  for m in range(meridians):
    n = (m + 1) % meridians
    faces.append([0, ring_start(0) + n, ring_start(0) + m])
    for r in range(rings - 1):
      a, b = ring_start(r) + m, ring_start(r) + n
      c, d = ring_start(r + 1) + m, ring_start(r + 1) + n
      faces += [[a, b, c], [b, d, c]]
    last = len(direction) - 1
    faces.append([last, ring_start(rings - 1) + m, ring_start(rings - 1) + n])
  faces = np.asarray(faces, np.int32)
  # Make every face counter-clockwise seen from outside, as FLAME's are.
  corners = vertices[faces]
  outward = np.einsum("fi,fi->f", np.cross(corners[:, 1] - corners[:, 0],
                                           corners[:, 2] - corners[:, 0]), corners.mean(1))
  faces[outward < 0] = faces[outward < 0][:, ::-1]
  padding = np.zeros((FLAME_NUM_VERTICES - len(vertices), 3))  # unused, like nothing at all
  vertices = np.concatenate([vertices, padding]).astype(np.float32)
  assert faces.shape == (FLAME_NUM_FACES, 3), faces.shape
  return vertices, faces


def make_step(faces, neighbors, albedo_model, size, settings):
  """The per-image render and loss+gradient functions (vmapped and jitted by the caller)."""

  def render(vertices, rotation, appearance):
    camera = Camera.frontal(size)
    camera = camera.replace(rotation=camera.rotation + rotation)
    points_cam = to_camera_space(camera, vertices)
    return render_mesh(screen_space(camera, vertices), faces, vertex_normals(points_cam, faces),
                       albedo_model, appearance, size, size, settings, neighbors)

  def loss(vertices, rotation, appearance, target):
    out = render(vertices, rotation, appearance)
    composite = out.image + (1.0 - out.alpha[..., None]) * 0.5
    return jnp.mean((composite - target) ** 2)

  def forward(vertices, rotation, appearance, target):
    del target
    out = render(vertices, rotation, appearance)
    return out.image, out.alpha

  return forward, jax.value_and_grad(loss, argnums=(0, 2))


def time_call(fn, args, repeats):
  """(compile seconds, median seconds, all seconds) of fn(*args)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times), times


def batched(fn, mode):
  """fn over a leading batch axis, all at once ('vmap') or one image at a time ('map')."""
  if mode == "single":
    return jax.jit(lambda *args: jax.tree_util.tree_map(
        lambda a: a[None], fn(*jax.tree_util.tree_map(lambda a: a[0], args))))
  if mode == "vmap":
    return jax.jit(jax.vmap(fn))
  return jax.jit(lambda *args: jax.lax.map(lambda a: fn(*a), args))


def run_benchmark(sizes, batch_sizes, repeats, settings, albedo_per_channel, max_batch_pixels,
                  batch_modes=("vmap",)):
  vertices, faces = head_mesh()
  neighbors = jnp.asarray(face_adjacency(faces))
  albedo_model = laplacian_albedo_model(vertices, faces, albedo_per_channel)
  faces = jnp.asarray(faces)
  rng = np.random.default_rng(0)
  results = []
  for size in sizes:
    forward, value_and_grad = make_step(faces, neighbors, albedo_model, size, settings)
    for batch in batch_sizes:
      if batch * size * size > max_batch_pixels:
        continue
      args = (jnp.asarray(np.broadcast_to(vertices, (batch,) + vertices.shape)),
              jnp.asarray(rng.normal(0.0, 0.05, (batch, 3)), jnp.float32),
              jax.vmap(lambda _: Appearance.neutral(albedo_model.num_coefficients))(
                  jnp.arange(batch)),
              jnp.asarray(rng.uniform(0.0, 1.0, (batch, size, size, 3)), jnp.float32))
      # A batch of one runs the plain single-image function (vmap of one only adds overhead).
      for batch_mode in (("single",) if batch == 1 else batch_modes):
        for name, fn in (("render", forward), ("render+grad", value_and_grad)):
          compile_s, median_s, times = time_call(batched(fn, batch_mode), args, repeats)
          results.append(dict(mode=name, batch_mode=batch_mode, size=size, batch=batch,
                              compile_s=compile_s, batch_ms=1e3 * median_s,
                              per_image_ms=1e3 * median_s / batch,
                              min_batch_ms=1e3 * min(times), repeats=repeats))
          print(f"{name:12s} {size:4d}px batch {batch:3d} {batch_mode:4s}: "
                f"{1e3 * median_s / batch:8.2f} ms/image (compile {compile_s:.1f} s)", flush=True)
  return results


def markdown_table(results):
  lines = ["| mode | size | batch | batching | ms / image (median) | ms / batch | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['mode']} | {r['size']} | {r['batch']} | {r['batch_mode']} | "
                 f"{r['per_image_ms']:.2f} | {r['batch_ms']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  settings = RasterSettings(tile_size=FLAGS.tile_size, cull_backfaces=FLAGS.cull_backfaces,
                            antialias=FLAGS.antialias)
  load_before = os.getloadavg()
  results = run_benchmark([int(s) for s in FLAGS.sizes], [int(b) for b in FLAGS.batch_sizes],
                          FLAGS.repeats, settings, FLAGS.albedo_per_channel,
                          FLAGS.max_batch_pixels, FLAGS.batch_modes)
  load_after = os.getloadavg()
  print()
  print(f"devices: {jax.devices()} ({os.cpu_count()} CPUs); settings: {settings}")
  print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
  print(markdown_table(results))
  if FLAGS.json_out:
    # Write to a temporary name, then rename: an interrupted run leaves no half-written file.
    temporary = FLAGS.json_out + ".tmp"
    with open(temporary, "w") as f:
      json.dump(dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                     settings=str(settings), num_vertices=FLAME_NUM_VERTICES,
                     num_faces=FLAME_NUM_FACES, load_average_before=load_before[0],
                     load_average_after=load_after[0], results=results), f, indent=2)
    os.replace(temporary, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
