"""MediaPipe's face mesh in JAX against MediaPipe itself (issue 22): ms per image of jflame's
landmark pipeline (`jflame.landmark_nets.face_mesh`: detector, region, crop, attention mesh,
refinement, projection; jit + vmap) at several batch sizes on this machine's default JAX device,
MediaPipe's face mesh per image on the CPU (static images, one face, irises; the graph jflame's
host preprocessing runs), and the pipeline's FLOPs per image from XLA's cost analysis. The input
is a shared photo at `--side` pixels (device mode sends images at most 512 pixels long).

    .venv/bin/python tools/bench_landmarks.py --batches 1,16,64 --json_out out.json

A device machine has neither MediaPipe nor `tflite`: write the graphs on the host, carry the
(git-ignored) folder, and read them there (tools/device_check.sh does when they exist):

    .venv/bin/python tools/bench_landmarks.py --save_graphs .device_assets
    python tools/bench_landmarks.py --graphs .device_assets --batches 1,64,1024
"""

import json
from pathlib import Path

import numpy as np
from absl import app, flags

import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes of the JAX pipeline.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
_SIDE = flags.DEFINE_integer("side", 512, "Images are this many pixels on each side.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures here.")
_GRAPHS = flags.DEFINE_string("graphs", None, "Read the two networks from graphs saved in this "
                              "folder instead of the installed MediaPipe.")
_SAVE_GRAPHS = flags.DEFINE_string("save_graphs", None, "Write the installed MediaPipe's two face "
                                   "networks as graphs into this folder for a device machine, "
                                   "and stop.")
_PHOTO = Path(__file__).resolve().parents[1] / "../shared/assets/photos/ffhq_00000.png"


def _photo(side: int) -> np.ndarray:
  """A shared photo (or the astronaut without the shared assets), RGB, side x side."""
  import cv2
  if _PHOTO.is_file():
    image = cv2.cvtColor(cv2.imread(str(_PHOTO)), cv2.COLOR_BGR2RGB)
  else:
    import skimage.data
    image = skimage.data.astronaut()
  return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from jflame.errors import JFlameError
  from jflame.landmark_nets import face_mesh, tflite_graph
  try:
    if _SAVE_GRAPHS.value:
      for path in tflite_graph.save_face_graphs(_SAVE_GRAPHS.value):
        print(f"wrote {path}")
      return
    networks = face_mesh.FaceNetworks(*tflite_graph.face_graphs(_GRAPHS.value))
  except JFlameError as error:
    raise SystemExit(f"bench_landmarks.py: {error}") from None
  weights = face_mesh.network_weights(networks)
  run = jax.jit(jax.vmap(lambda w, image, size: face_mesh.face_landmarks(networks, w, image, size),
                         in_axes=(None, 0, 0)))
  photo = _photo(_SIDE.value)
  figures = dict(pipeline="face detector + attention face mesh (478 points)",
                 device=str(jax.devices()[0]), image_side=_SIDE.value, jax={})
  for batch in (int(b) for b in _BATCHES.value):
    images = jnp.asarray(np.repeat(photo[None], batch, 0))
    sizes = jnp.full((batch, 2), _SIDE.value, jnp.int32)
    compiled = run.lower(weights, images, sizes).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    found = bool(np.all(compiled(weights, images, sizes).found))
    seconds = benchmarking.median_seconds(
        lambda: jax.block_until_ready(compiled(weights, images, sizes)), _REPEATS.value)
    figures["jax"][batch] = dict(ms_per_image=1000 * seconds / batch, face_found=found,
                                 flops_per_image=float(cost.get("flops", 0.0)) / batch)
  try:
    import mediapipe as mp
  except ImportError:
    figures["mediapipe_ms_per_image"] = None
  else:
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                         refine_landmarks=True) as reference:
      figures["mediapipe_ms_per_image"] = 1000 * benchmarking.median_seconds(
          lambda: reference.process(photo), max(_REPEATS.value, 20))
  print(json.dumps(figures, indent=1))
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
