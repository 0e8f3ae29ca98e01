"""MediaPipe's face networks in JAX (issue 22): the TFLite graph read by jflame
(`landmark_nets.tflite_graph`) and run by its JAX interpreter gives the outputs of TFLite's own
interpreter (tflite-runtime) on the same input; a graph saved for a device and loaded back runs
the same; operators the interpreter does not run and missing files are one line."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from jflame.errors import InputError
from jflame.landmark_nets import interpreter, tflite_graph
from tests.conftest import SHARED_ASSETS


def _detector_input(rgb):
  """The detector's input as MediaPipe feeds it: 128 x 128 RGB scaled to [-1, 1]."""
  small = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
  return small[None] / 127.5 - 1.0


def _inputs():
  """The astronaut, the shared photos (when present), one turned upside down, a blank tile."""
  images = [skimage.data.astronaut()]
  images += [cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
             for path in sorted((SHARED_ASSETS / "photos").glob("*.png"))[:2]]
  images.append(images[-1][::-1].copy())
  images.append(np.full((64, 64, 3), 200, np.uint8))
  return np.concatenate([_detector_input(image) for image in images])


@pytest.fixture(scope="module")
def detector():
  return tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
      tflite_graph.FACE_DETECTOR))


def _tflite_outputs(path, batch):
  from tflite_runtime.interpreter import Interpreter
  model = Interpreter(model_path=str(path))
  model.allocate_tensors()
  outputs = {}
  for image in batch:
    model.set_tensor(model.get_input_details()[0]["index"], image[None])
    model.invoke()
    for detail in model.get_output_details():
      outputs.setdefault(detail["name"], []).append(model.get_tensor(detail["index"])[0])
  return {name: np.stack(values) for name, values in outputs.items()}


def _jax_outputs(graph, batch):
  run = jax.jit(jax.vmap(lambda weights, image: interpreter.run_graph(
      graph, weights, {graph.inputs[0]: image[None]}), in_axes=(None, 0)))
  weights = {k: jnp.asarray(v) for k, v in interpreter.weights_of(graph).items()}
  return {name: np.asarray(value)[:, 0]
          for name, value in zip(graph.output_names(), run(weights, jnp.asarray(batch)))}


def test_the_face_detector_in_jax_gives_tflites_outputs(detector):
  """Box regressors (896 x 16) and scores (896) of every anchor within 1e-5 of their scale:
  vmapped over five images, one compiled program."""
  path = tflite_graph.installed_mediapipe_model(tflite_graph.FACE_DETECTOR)
  interpreter.check_supported(detector.ops, str(path))
  batch = _inputs()
  expected = _tflite_outputs(path, batch)
  got = _jax_outputs(detector, batch)
  assert set(got) == {"regressors", "classificators"} == set(expected)
  for name in got:
    assert got[name].shape == expected[name].shape, name
    scale = np.abs(expected[name]).max()
    assert np.abs(got[name] - expected[name]).max() <= 1e-5 * scale, name
  # The photos have a face (a confident anchor), the blank tile none.
  scores = 1.0 / (1.0 + np.exp(-np.clip(expected["classificators"][..., 0], -80.0, 80.0)))
  assert scores[0].max() > 0.9 and scores[-1].max() < 0.5


def test_a_graph_saved_for_a_device_runs_the_same(detector, tmp_path):
  tflite_graph.save_graph(detector, tmp_path / "detector.npz")
  loaded = tflite_graph.load_graph(tmp_path / "detector.npz")
  assert loaded.ops == detector.ops and loaded.outputs == detector.outputs
  batch = _inputs()[:1]
  for name, value in _jax_outputs(loaded, batch).items():
    np.testing.assert_array_equal(value, _jax_outputs(detector, batch)[name])


def test_unknown_operators_and_missing_files_are_one_line(tmp_path):
  landmarker = tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
      tflite_graph.FACE_LANDMARKER))
  with pytest.raises(InputError, match="CUSTOM:Landmarks2TransformMatrix") as caught:
    interpreter.check_supported(landmarker.ops, "face_landmark_with_attention.tflite")
  assert "\n" not in str(caught.value)
  for call in (lambda: tflite_graph.read_tflite(tmp_path / "absent.tflite"),
               lambda: tflite_graph.load_graph(tmp_path / "absent.npz")):
    with pytest.raises(InputError, match="absent"):
      call()
