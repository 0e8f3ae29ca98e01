"""Benchmark of the FLAME forward model: full mesh and landmark fast path, with and without
gradient, per image at several batch sizes; compile time separately.

  python tools/bench_forward.py [--flame_model PATH] [--batch_sizes 1,16,64,256]
"""

import numpy as np
from absl import app, flags

import jax
import jax.numpy as jnp

from jflame import flame, flame_io
import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_FLAME_MODEL = flags.DEFINE_string("flame_model", None,
                                   "FLAME .pkl/.npz; default: the synthetic FLAME-size model.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64", "256"], "Batch sizes.")
_NUM_SHAPE = flags.DEFINE_integer("num_shape", 100, "Active shape coefficients.")
_NUM_EXPRESSION = flags.DEFINE_integer("num_expression", 50, "Active expression coefficients.")
_LANDMARK_COUNTS = flags.DEFINE_list(
    "landmark_counts", ["105", "478"],
    "Surface point counts for the fast path: 105 = the public FLAME MediaPipe embedding, "
    "478 = every MediaPipe landmark (the synthetic model's embedding).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results as JSON here.")


def _load_model():
  if _FLAME_MODEL.value:
    return flame_io.load_flame(_FLAME_MODEL.value)
  from jflame import synthetic
  return synthetic.synthetic_flame("flame", seed=0)[0]


def _random_params(batch, seed):
  rng = np.random.default_rng(seed)
  params = flame.FlameParams.zeros(_NUM_SHAPE.value, _NUM_EXPRESSION.value)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(scale=0.1, size=(batch,) + x.shape), jnp.float32), params)


def main(argv):
  del argv
  model = _load_model()
  print(f"model: {model.name}: {model.num_vertices} vertices, {model.faces.shape[0]} triangles")
  print(f"device: {benchmarking.device_description()}")
  print(f"coefficients: {_NUM_SHAPE.value} shape, {_NUM_EXPRESSION.value} expression, 5 joints")
  rng = np.random.default_rng(0)
  variants = {"full mesh": lambda p: flame.flame_forward(model, p)[0]}
  chunked = {"full mesh, chunks of 16": lambda params: flame.vertices_of_batch(model, params)}
  for count in map(int, _LANDMARK_COUNTS.value):
    faces = rng.integers(0, model.faces.shape[0], count)
    rows = flame.make_surface_rows(model, faces, rng.dirichlet(np.ones(3), count),
                                   _NUM_SHAPE.value, _NUM_EXPRESSION.value)
    variants[f"landmarks K={count}"] = (lambda r: lambda p: flame.surface_points_forward(r, p)[0])(
        rows)
  programs_by_variant = {}
  for name, forward in variants.items():
    loss = lambda p, f=forward: jnp.sum(f(p) ** 2)
    programs_by_variant[name] = {"forward": jax.jit(jax.vmap(forward)),
                                 "forward+grad": jax.jit(jax.vmap(jax.value_and_grad(loss)))}
  for name, batched in chunked.items():
    programs_by_variant[name] = {"forward": jax.jit(batched)}
  results, table = [], []
  for name, programs in programs_by_variant.items():
    for batch in map(int, _BATCH_SIZES.value):
      params = _random_params(batch, batch)
      for mode, program in programs.items():
        compile_s, per_call = benchmarking.time_compiled(program, params)
        per_image_us = per_call / batch * 1e6
        results.append(dict(variant=name, mode=mode, batch=batch, per_image_us=per_image_us,
                            compile_s=compile_s))
        table.append((name, mode, batch, f"{per_image_us:,.1f}", f"{compile_s:.2f}"))
        print(table[-1], flush=True)
  print(benchmarking.markdown_table(
      ("path", "mode", "batch", "µs / image", "compile s"), table))
  benchmarking.write_json(_JSON_OUT.value, dict(device=benchmarking.device_description(),
                                                model=model.name, results=results))


if __name__ == "__main__":
  app.run(main)
