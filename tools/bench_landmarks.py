"""MediaPipe's face networks in JAX against TFLite's own interpreter (issue 22): ms per image of
the JAX network (jit + vmap) at several batch sizes on this machine's default JAX device, TFLite's
per image on the CPU, and the network's FLOPs per image from XLA's cost analysis.

    .venv/bin/python tools/bench_landmarks.py --batches 1,16,64 --json_out out.json

Only the face detector runs in JAX so far (the 478-point network needs MediaPipe's three custom
operators). Needs tflite-runtime for the TFLite column (installed by `make install`).

A device machine has neither MediaPipe nor `tflite`: write the graph on the host, carry the
(git-ignored) folder, and read it there (tools/device_check.sh does when the file exists):

    .venv/bin/python tools/bench_landmarks.py --save_graph .device_assets/face_detector.npz
    python tools/bench_landmarks.py --graph .device_assets/face_detector.npz --batches 1,64,1024
"""

import json
from pathlib import Path

import numpy as np
from absl import app, flags

import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes of the JAX network.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures here.")
_GRAPH = flags.DEFINE_string("graph", None, "Read the detector from this saved graph (.npz) "
                             "instead of the installed MediaPipe.")
_SAVE_GRAPH = flags.DEFINE_string("save_graph", None, "Write the installed MediaPipe's detector "
                                  "as a graph (.npz) for a device machine, and stop.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from jflame.landmark_nets import interpreter, tflite_graph
  from jflame.errors import JFlameError
  try:
    if _GRAPH.value:
      path, graph = None, tflite_graph.load_graph(_GRAPH.value)
    else:
      path = tflite_graph.installed_mediapipe_model(tflite_graph.FACE_DETECTOR)
      graph = tflite_graph.read_tflite(path)
  except JFlameError as error:
    raise SystemExit(f"bench_landmarks.py: {error}") from None
  if _SAVE_GRAPH.value:
    tflite_graph.save_graph(graph, _SAVE_GRAPH.value)
    print(f"wrote {_SAVE_GRAPH.value}")
    return
  weights = {k: jnp.asarray(v) for k, v in interpreter.weights_of(graph).items()}
  size = graph.shapes[graph.inputs[0]][1:3]
  run = jax.jit(jax.vmap(lambda w, image: interpreter.run_graph(
      graph, w, {graph.inputs[0]: image[None]}), in_axes=(None, 0)))
  rng = np.random.default_rng(0)
  figures = dict(network="face_detection_short_range", device=str(jax.devices()[0]),
                 input=list(size), jax={})
  for batch in (int(b) for b in _BATCHES.value):
    images = jnp.asarray(rng.uniform(-1, 1, (batch,) + tuple(size) + (3,)), jnp.float32)
    compiled = run.lower(weights, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    seconds = benchmarking.median_seconds(lambda: jax.block_until_ready(compiled(weights, images)),
                              _REPEATS.value)
    figures["jax"][batch] = dict(ms_per_image=1000 * seconds / batch,
                                 flops_per_image=float(cost.get("flops", 0.0)) / batch)
  try:
    from tflite_runtime.interpreter import Interpreter
  except ImportError:
    Interpreter = None
  if Interpreter is None or path is None:
    figures["tflite_ms_per_image"] = None
  else:
    model = Interpreter(model_path=str(path), num_threads=1)
    model.allocate_tensors()
    image = rng.uniform(-1, 1, (1,) + tuple(size) + (3,)).astype(np.float32)

    def invoke():
      model.set_tensor(model.get_input_details()[0]["index"], image)
      model.invoke()
    figures["tflite_ms_per_image"] = 1000 * benchmarking.median_seconds(
        invoke, max(_REPEATS.value, 20))
  print(json.dumps(figures, indent=1))
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
