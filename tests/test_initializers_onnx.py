"""The optional ONNX encoders (DECA, MICA) end to end, with tiny ONNX models built here.

No real weights exist on this machine, so the networks are stand-ins whose outputs are known
functions of their inputs (channel means through a fixed linear map): that proves which input
the encoders feed and which output entries land in which field. The crops are checked against
DECA's and insightface's own recipes re-done here with skimage and OpenCV, and the lighting
conversion against DECA's SH shading formula written out in NumPy.
"""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.transform import estimate_transform, warp

from jflame.initializers import deca as deca_module
from jflame.initializers import mica as mica_module
from jflame.initializers.deca import DecaEncoder, deca_input_image, lighting_from_deca
from jflame.initializers.mica import MicaEncoder
from jflame.initializers.initial_guess import InitialGuess, initial_guess_for_batch
from jflame.initializers.onnx_runtime import choose_providers
from jflame.camera import apply_affine, invert_affine
from jflame.errors import ModelFileError
from jflame.preprocess import FaceAnalyzer, PreparedImage, prepare_image
from jflame.render.shading import sh_shading

onnx = pytest.importorskip("onnx", reason="onnx (a test dependency) builds the tiny models")
helper = onnx.helper
TensorProto = onnx.TensorProto

DECA_LAYOUT = {"shape": (0, 100), "tex": (100, 150), "exp": (150, 200), "pose": (200, 206),
               "cam": (206, 209), "light": (209, 236)}


# --- tiny ONNX models -------------------------------------------------------------------------

def _save(path, nodes, inputs, outputs, weights):
  graph = helper.make_graph(nodes, "stand_in", inputs, outputs,
                            initializer=[onnx.numpy_helper.from_array(np.asarray(value), name)
                                         for name, value in weights.items()])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  onnx.save(model, str(path))
  return str(path)


def _pooled_linear(path, image_size, weight, bias, batch="N", split=None, kept=None):
  """image (batch, 3, S, S) -> per-channel mean (batch, 3) -> mean @ weight.T + bias.

  With `split` (name -> size), the result is split into named outputs; "light" is reshaped
  to (batch, 9, 3). With `kept`, only the first `kept` entries are output, through a slice whose
  end is computed from the data, so that the file cannot state the output's size.
  """
  weight = np.asarray(weight, np.float32)
  bias = np.asarray(bias, np.float32)
  size = weight.shape[0]
  nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
           helper.make_node("Flatten", ["pooled"], ["means"], axis=1),
           helper.make_node("Gemm", ["means", "weight", "bias"], ["code"], transB=1)]
  weights = {"weight": weight, "bias": bias}
  image = helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                        [batch, 3, image_size, image_size])
  if kept is not None:
    weights.update(zero=np.zeros((1, 1), np.float32), kept=np.full((1, 1), kept, np.float32),
                   flat=np.array([1], np.int64), start=np.array([0], np.int64),
                   axis=np.array([1], np.int64))
    nodes[-1].output[0] = "full_code"
    nodes += [helper.make_node("ReduceMax", ["means"], ["largest"], keepdims=1),
              helper.make_node("Mul", ["largest", "zero"], ["nothing"]),
              helper.make_node("Add", ["nothing", "kept"], ["end_2d"]),
              helper.make_node("Reshape", ["end_2d", "flat"], ["end_float"]),
              helper.make_node("Cast", ["end_float"], ["end"], to=TensorProto.INT64),
              helper.make_node("Slice", ["full_code", "start", "end", "axis"], ["code"])]
  if split is None:
    outputs = [helper.make_tensor_value_info("code", TensorProto.FLOAT,
                                             [batch, size if kept is None else "K"])]
  else:
    names = [name if name != "light" else "light_flat" for name in split]
    weights["split_sizes"] = np.array(list(split.values()), np.int64)
    weights["light_shape"] = np.array([-1, 9, 3], np.int64)
    nodes += [helper.make_node("Split", ["code", "split_sizes"], names, axis=1),
              helper.make_node("Reshape", ["light_flat", "light_shape"], ["light"])]
    outputs = [helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [batch, 9, 3] if name == "light" else [batch, part])
               for name, part in split.items()]
  return _save(path, nodes, [image], outputs, weights)


def _linear(path, weight, bias, batch="N"):
  """vector (batch, K) -> vector @ weight.T + bias."""
  nodes = [helper.make_node("Gemm", ["embedding", "weight", "bias"], ["shape"], transB=1)]
  inputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                          [batch, weight.shape[1]])]
  outputs = [helper.make_tensor_value_info("shape", TensorProto.FLOAT, [batch, weight.shape[0]])]
  return _save(path, nodes, inputs, outputs,
               {"weight": np.asarray(weight, np.float32), "bias": np.asarray(bias, np.float32)})


@pytest.fixture(scope="module")
def deca_weights():
  rng = np.random.default_rng(0)
  # The bias makes every code entry distinct, so a field read from the wrong slice shows up.
  return rng.normal(scale=0.5, size=(236, 3)), np.arange(236) / 10.0 - 5.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, deca_weights):
  folder = tmp_path_factory.mktemp("onnx")
  rng = np.random.default_rng(1)
  weight, bias = deca_weights
  arcface = (rng.normal(size=(512, 3)), rng.normal(size=512))
  mapping = (rng.normal(scale=0.1, size=(300, 512)), rng.normal(size=300))
  single_mica = (rng.normal(size=(300, 3)), rng.normal(size=300))
  split = {name: end - start for name, (start, end) in DECA_LAYOUT.items()}
  return dict(
      deca=_pooled_linear(folder / "deca_encoder.onnx", 224, weight, bias),
      deca_named=_pooled_linear(folder / "deca_named.onnx", 224, weight, bias, split=split),
      deca_fixed=_pooled_linear(folder / "deca_fixed.onnx", 224, weight, bias, batch=2),
      arcface=_pooled_linear(folder / "mica_arcface.onnx", 112, *arcface),
      mapping=_linear(folder / "mica_mapping.onnx", *mapping),
      mica=_pooled_linear(folder / "mica.onnx", 112, *single_mica),
      arcface_weights=arcface, mapping_weights=mapping, mica_weights=single_mica)


@pytest.fixture(scope="module")
def astronaut_record():
  with FaceAnalyzer() as analyzer:
    record = prepare_image(skimage.data.astronaut(), analyzer, crop_size=256, name="astronaut")
  assert record.ok, record.message
  return record


@pytest.fixture(scope="module")
def three_records(astronaut_record):
  """Three ok records with different pixels (the encoders' stand-ins see channel means)."""
  darker = dataclasses.replace(astronaut_record, name="darker", crop=astronaut_record.crop // 2)
  swapped = dataclasses.replace(astronaut_record, name="swapped",
                                crop=np.ascontiguousarray(astronaut_record.crop[..., ::-1]))
  return [astronaut_record, darker, swapped]


def _channel_means(images):
  return images.astype(np.float64).mean(axis=(2, 3))


# --- DECA -------------------------------------------------------------------------------------

def test_deca_crop_is_decas_own_recipe(astronaut_record):
  record = astronaut_record
  # DECA's TestData with FAN ('kpt68' box), in skimage's pixel convention (centres at integers).
  points = record.landmarks.astype(np.float64)[list(deca_module.IBUG_BOX_LANDMARKS)] - 0.5
  left, top = points.min(axis=0)
  right, bottom = points.max(axis=0)
  old_size = (right - left + bottom - top) / 2 * 1.1
  center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
  size = int(old_size * 1.25)
  source = np.array([[center[0] - size / 2, center[1] - size / 2],
                     [center[0] - size / 2, center[1] + size / 2],
                     [center[0] + size / 2, center[1] - size / 2]])
  transform = estimate_transform("similarity", source, np.array([[0, 0], [0, 223], [223, 0]]))
  expected = warp(record.crop / 255.0, transform.inverse, output_shape=(224, 224))

  image, affine = deca_input_image(record.crop, record.landmarks)
  assert image.shape == (3, 224, 224) and image.dtype == np.float32
  # The same map, once the two pixel conventions are accounted for.
  probe = np.array([[10.0, 20.0], [150.0, 90.0], [240.0, 250.0]])
  np.testing.assert_allclose(apply_affine(affine, probe + 0.5) - 0.5, transform(probe),
                             atol=1e-9)
  # The same pixels, RGB in [0, 1], channels first (OpenCV's and skimage's bilinear differ
  # only in OpenCV's 1/32-pixel weight quantisation).
  difference = np.abs(image.transpose(1, 2, 0) - expected)
  assert difference.mean() < 1e-3 and difference.max() < 0.02


def test_deca_box_stands_in_for_the_68_landmark_box(astronaut_record):
  landmarks = astronaut_record.landmarks
  left, top, right, bottom = deca_module.deca_box(landmarks)
  inner = landmarks[[33, 133, 362, 263, 1, 61, 291, 468, 473]]   # eye corners, nose, mouth, iris
  assert np.all((inner >= [left, top]) & (inner <= [right, bottom]))
  assert landmarks[10, 1] < top - 10         # forehead (MediaPipe only) is left out
  assert bottom == pytest.approx(landmarks[:468, 1].max(), abs=1.0)   # the chin is the bottom
  # For a portrait, DECA's square lies inside the record's crop: nothing is cut off.
  corners = apply_affine(invert_affine(deca_module.deca_crop_transform(landmarks)),
                         np.array([[0.0, 0.0], [224.0, 224.0]]))
  assert np.all((corners >= 0) & (corners <= astronaut_record.crop_size))


def test_deca_code_lands_in_the_right_fields(models, deca_weights, three_records):
  weight, bias = deca_weights
  encoder = DecaEncoder.load(models["deca"])
  code = encoder.encode(three_records)
  images, affines = deca_module.deca_inputs(three_records)
  expected = _channel_means(images) @ weight.T + bias
  slices = {name: expected[:, start:end] for name, (start, end) in DECA_LAYOUT.items()}
  np.testing.assert_allclose(code.shape, slices["shape"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(code.texture, slices["tex"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(code.expression, slices["exp"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(code.global_rotation, slices["pose"][:, :3], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(code.jaw_rotation, slices["pose"][:, 3:], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(code.camera, slices["cam"], rtol=1e-5, atol=1e-4)
  # Light is (coefficient, channel) row-major in the code.
  np.testing.assert_allclose(code.deca_lighting, slices["light"].reshape(-1, 9, 3), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(code.lighting, lighting_from_deca(code.deca_lighting), rtol=1e-6)
  np.testing.assert_allclose(code.deca_from_crop, affines)
  # The three records really gave three different codes.
  assert np.ptp(code.shape[:, 0]) > 1e-3


def test_named_outputs_and_fixed_batch_give_the_same_code(models, three_records):
  reference = DecaEncoder.load(models["deca"]).encode(three_records)
  named = DecaEncoder.load(models["deca_named"]).encode(three_records)
  fixed_encoder = DecaEncoder.load(models["deca_fixed"])
  assert fixed_encoder.model.batch_size == 2     # 3 records: a full chunk and a padded one
  fixed = fixed_encoder.encode(three_records)
  chunked = DecaEncoder.load(models["deca"], max_batch=2).encode(three_records)
  for other in (named, fixed, chunked):
    for field in ("shape", "expression", "global_rotation", "jaw_rotation", "camera",
                  "texture", "lighting"):
      np.testing.assert_allclose(getattr(other, field), getattr(reference, field), rtol=1e-5,
                                 atol=1e-5)


def _deca_add_sh_light(normals, light):
  """DECA's `add_SHlight` for (K, 3) normals and a (9, 3) light, written out from its source."""
  pi = np.pi
  constants = np.array([
      1 / np.sqrt(4 * pi), (2 * pi / 3) * np.sqrt(3 / (4 * pi)),
      (2 * pi / 3) * np.sqrt(3 / (4 * pi)), (2 * pi / 3) * np.sqrt(3 / (4 * pi)),
      (pi / 4) * 3 * np.sqrt(5 / (12 * pi)), (pi / 4) * 3 * np.sqrt(5 / (12 * pi)),
      (pi / 4) * 3 * np.sqrt(5 / (12 * pi)), (pi / 4) * (3 / 2) * np.sqrt(5 / (12 * pi)),
      (pi / 4) * (1 / 2) * np.sqrt(5 / (4 * pi))])
  x, y, z = normals.T
  basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x**2 - y**2, 3 * z**2 - 1], 1)
  return (basis * constants) @ light


def test_converted_lighting_shades_like_deca():
  rng = np.random.default_rng(3)
  normals = rng.normal(size=(200, 3))
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  deca_light = rng.normal(size=(2, 9, 3))
  converted = lighting_from_deca(deca_light)
  assert converted.shape == (2, 9, 3)
  # DECA lights FLAME-axis normals (y up, z to the viewer); jflame lights camera-axis ones.
  camera_normals = normals * np.array([1.0, -1.0, -1.0])
  for index in range(2):
    expected = _deca_add_sh_light(normals, deca_light[index])
    shading = np.asarray(sh_shading(camera_normals.astype(np.float32), converted[index]))
    np.testing.assert_allclose(shading, expected, rtol=1e-4, atol=1e-4)


# --- MICA -------------------------------------------------------------------------------------

def _landmarks_with_keypoints(keypoints):
  landmarks = np.zeros((478, 2))
  landmarks[list(mica_module.FIVE_POINT_LANDMARKS)] = keypoints
  return landmarks


def test_arcface_alignment_puts_exact_keypoints_on_the_template():
  # Keypoints made from the template by a known similarity (jflame pixel convention) must be
  # mapped back onto it exactly.
  angle, scale, shift = 0.3, 2.7, np.array([55.0, 31.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  keypoints = (scale * (mica_module.ARCFACE_TEMPLATE + 0.5) @ rotation.T) + shift
  affine = mica_module.arcface_transform(_landmarks_with_keypoints(keypoints))
  np.testing.assert_allclose(apply_affine(affine, keypoints) - 0.5, mica_module.ARCFACE_TEMPLATE,
                             atol=1e-9)


def test_arcface_crop_is_insightfaces_norm_crop(astronaut_record):
  record = astronaut_record
  keypoints = mica_module.five_keypoints(record.landmarks)
  # Image order as RetinaFace gives it: image-left eye, image-right eye, nose, mouth corners.
  assert keypoints[0, 0] < keypoints[1, 0] and keypoints[3, 0] < keypoints[4, 0]
  assert keypoints[0, 1] < keypoints[2, 1] < keypoints[3, 1]
  # insightface: skimage's similarity estimate on OpenCV-convention points, cv2.warpAffine.
  opencv_keypoints = keypoints - 0.5
  matrix = estimate_transform("similarity", opencv_keypoints, mica_module.ARCFACE_TEMPLATE).params
  expected = cv2.warpAffine(record.crop, matrix[:2], (112, 112), borderValue=0.0)
  blob, aligned = mica_module.arcface_input_image(record.crop, record.landmarks)
  difference = np.abs(aligned.astype(int) - expected.astype(int))
  assert difference.max() <= 1   # the same warp; at most a rounding apart
  # The five points land on the template up to what a smile does to a similarity fit.
  placed = apply_affine(mica_module.arcface_transform(record.landmarks), keypoints) - 0.5
  np.testing.assert_allclose(placed, opencv_keypoints @ matrix[:2, :2].T + matrix[:2, 2],
                             atol=1e-6)
  residual = np.linalg.norm(placed - mica_module.ARCFACE_TEMPLATE, axis=1)
  assert residual.mean() < 8.0 and residual[:2].max() < 4.0   # of 112 pixels
  # (x - 127.5) / 127.5, RGB, channels first.
  np.testing.assert_allclose(blob, (aligned.transpose(2, 0, 1) - 127.5) / 127.5, atol=1e-6)


def test_mica_two_files_normalise_the_embedding(models, three_records):
  encoder = MicaEncoder.load(arcface_path=models["arcface"], mapping_path=models["mapping"])
  shape = encoder.encode(three_records)
  blobs = mica_module.arcface_inputs(three_records)
  arcface_weight, arcface_bias = models["arcface_weights"]
  mapping_weight, mapping_bias = models["mapping_weights"]
  embedding = _channel_means(blobs) @ arcface_weight.T + arcface_bias
  embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
  np.testing.assert_allclose(shape, embedding @ mapping_weight.T + mapping_bias, rtol=1e-4,
                             atol=1e-4)
  assert shape.shape == (3, 300)


def test_mica_one_file(models, three_records):
  shape = MicaEncoder.load(models["mica"]).encode(three_records)
  weight, bias = models["mica_weights"]
  expected = _channel_means(mica_module.arcface_inputs(three_records)) @ weight.T + bias
  np.testing.assert_allclose(shape, expected, rtol=1e-4, atol=1e-4)


# --- the batch guess --------------------------------------------------------------------------

def test_initial_guess_fills_ok_slots_and_pads_to_the_fit(models, deca_weights, three_records):
  failed = PreparedImage(name="lost", source=None, status="no_face", message="no face")
  records = [three_records[0], failed, three_records[1]]
  deca = DecaEncoder.load(models["deca"])
  mica = MicaEncoder.load(models["mica"])
  guess = initial_guess_for_batch(records, 4, deca=deca, mica=mica, num_shape=320,
                                  num_expression=20, num_texture=64)
  np.testing.assert_array_equal(guess.estimated, [True, False, True, False])
  ok = [three_records[0], three_records[1]]
  code = deca.encode(ok)
  mica_shape = mica.encode(ok)
  assert guess.shape.shape == (4, 320) and guess.expression.shape == (4, 20)
  assert guess.texture.shape == (4, 64) and guess.lighting.shape == (4, 9, 3)
  assert guess.jaw_rotation.shape == (4, 3)
  for slot, index in ((0, 0), (2, 1)):
    np.testing.assert_allclose(guess.shape[slot, :300], mica_shape[index], rtol=1e-6)
    np.testing.assert_array_equal(guess.shape[slot, 300:], 0.0)            # zero-padded
    np.testing.assert_allclose(guess.expression[slot], code.expression[index, :20], rtol=1e-6)
    np.testing.assert_allclose(guess.texture[slot, :50], code.texture[index], rtol=1e-6)
    np.testing.assert_array_equal(guess.texture[slot, 50:], 0.0)
    np.testing.assert_allclose(guess.jaw_rotation[slot], code.jaw_rotation[index], rtol=1e-6)
    np.testing.assert_allclose(guess.lighting[slot], code.lighting[index], rtol=1e-6)
  for slot in (1, 3):                                                      # failed, padding
    for field in (guess.shape, guess.expression, guess.jaw_rotation, guess.texture,
                  guess.lighting):
      np.testing.assert_array_equal(field[slot], 0.0)

  deca_only = initial_guess_for_batch(records, 4, deca=deca, num_shape=60, num_expression=80)
  np.testing.assert_allclose(deca_only.shape[0], code.shape[0, :60], rtol=1e-6)
  np.testing.assert_array_equal(deca_only.expression[0, 50:], 0.0)
  assert deca_only.texture.shape == (4, 50)

  nothing = initial_guess_for_batch(records, 4, num_shape=10, num_expression=10)
  assert isinstance(nothing, InitialGuess) and nothing.shape is None
  assert not nothing.estimated.any()
  all_failed = initial_guess_for_batch([failed], 2, deca=deca, num_shape=10, num_expression=10)
  assert all_failed.shape.shape == (2, 10) and not all_failed.shape.any()


# --- files and errors -------------------------------------------------------------------------

@pytest.fixture
def empty_search_folders(tmp_path, monkeypatch):
  home = tmp_path / "jflame_home"
  home.mkdir()
  monkeypatch.setenv("JFLAME_HOME", str(home))
  monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "user"))
  return home


def test_missing_files_name_the_file_and_the_places_searched(empty_search_folders, tmp_path):
  with pytest.raises(ModelFileError, match="nowhere.onnx"):
    DecaEncoder.load(str(tmp_path / "nowhere.onnx"))
  with pytest.raises(ModelFileError) as error:
    DecaEncoder.load()
  assert "deca_encoder.onnx" in str(error.value)
  assert str(empty_search_folders) in str(error.value) and "WORKSPACE.md" in str(error.value)
  assert str(tmp_path / "user" / ".cache" / "jflame") in str(error.value)
  with pytest.raises(ModelFileError) as error:
    MicaEncoder.load()
  for name in ("mica.onnx", "mica_arcface.onnx", "mica_mapping.onnx", str(empty_search_folders)):
    assert name in str(error.value)
  assert DecaEncoder.find() is None and MicaEncoder.find() is None


def test_files_in_the_search_folder_are_found(empty_search_folders, models):
  (empty_search_folders / "deca_encoder.onnx").write_bytes(Path(models["deca"]).read_bytes())
  (empty_search_folders / "mica_arcface.onnx").write_bytes(Path(models["arcface"]).read_bytes())
  assert DecaEncoder.find().model.path == empty_search_folders / "deca_encoder.onnx"
  with pytest.raises(ModelFileError, match="mica_mapping.onnx"):   # half a pair
    MicaEncoder.load()
  (empty_search_folders / "mica_mapping.onnx").write_bytes(Path(models["mapping"]).read_bytes())
  encoder = MicaEncoder.find()
  assert encoder.mapping.path == empty_search_folders / "mica_mapping.onnx"


def test_a_file_that_is_not_onnx_is_a_model_file_error(tmp_path):
  path = tmp_path / "deca_encoder.onnx"
  path.write_bytes(b"this is not a protobuf")
  with pytest.raises(ModelFileError, match="deca_encoder.onnx.*could not be loaded"):
    DecaEncoder.load(str(path))


def test_wrong_sizes_are_model_file_errors(tmp_path, deca_weights):
  weight, bias = deca_weights
  rng = np.random.default_rng(4)
  short = _pooled_linear(tmp_path / "short_code.onnx", 224, weight[:200], bias[:200])
  with pytest.raises(ModelFileError, match=r"short_code.onnx.*expected.*236.*found.*200"):
    DecaEncoder.load(short)
  small_input = _pooled_linear(tmp_path / "small_input.onnx", 128, weight, bias)
  with pytest.raises(ModelFileError, match=r"small_input.onnx.*224.*found.*128"):
    DecaEncoder.load(small_input)
  # Output sizes the file leaves symbolic are checked when the model runs.
  symbolic = _pooled_linear(tmp_path / "symbolic.onnx", 224, weight, bias, kept=200)
  encoder = DecaEncoder.load(symbolic)
  with pytest.raises(ModelFileError, match="symbolic.onnx"):
    encoder.encode_images(np.zeros((1, 3, 224, 224), np.float32))
  short_mapping = _linear(tmp_path / "short_mapping.onnx", rng.normal(size=(100, 512)),
                          np.zeros(100))
  arcface = _pooled_linear(tmp_path / "arc.onnx", 112, rng.normal(size=(512, 3)), np.zeros(512))
  with pytest.raises(ModelFileError, match=r"short_mapping.onnx.*300"):
    MicaEncoder.load(arcface_path=arcface, mapping_path=short_mapping)


def test_providers_prefer_cuda_then_cpu(models):
  assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
      "CPUExecutionProvider"]
  assert choose_providers(["CPUExecutionProvider", "TensorrtExecutionProvider",
                           "CUDAExecutionProvider"]) == ["CUDAExecutionProvider",
                                                         "CPUExecutionProvider"]
  assert "CPUExecutionProvider" in DecaEncoder.load(models["deca"]).model.providers


@pytest.mark.slow
def test_encoder_guess_drives_the_fit_and_is_refused_for_other_head_models(models, three_records,
                                                                           tmp_path):
  """A MICA shape reaches the fit through the runner's guess; with a model that is not FLAME
  2020 (here the synthetic one) an explicitly given encoder is a clear error."""
  import jax
  import jax.numpy as jnp
  from jflame import model_loading, synthetic
  from jflame.config import FitConfig
  from jflame.engine import EngineOptions
  from jflame.errors import ConfigError
  from jflame.fit import fit_batch
  from jflame.preprocess import stack_observations
  model, embedding = synthetic.synthetic_flame("small")
  loaded = model_loading.LoadedModel(model, embedding, model.name)
  options = EngineOptions(mica_model=str(models["mica"]))
  with pytest.raises(ConfigError, match="FLAME 2020.*--flame_variant"):
    model_loading.load_encoders(loaded, options)
  # The variant, not the file name, decides: the same model stated as FLAME 2020 takes them.
  as_2020 = model_loading.LoadedModel(model.replace(variant="flame2020"), embedding, "renamed.pkl")
  assert model_loading.load_encoders(as_2020, options)[1] is not None
  config = FitConfig(num_shape=20, num_expression=10, rigid_iterations=3, full_iterations=3,
                     fit_shape=False)
  mica = MicaEncoder.load(str(models["mica"]))
  guess = initial_guess_for_batch(three_records, 4, mica=mica, num_shape=20, num_expression=10)
  observation = stack_observations(three_records, 4, three_records[0].crop_size)
  result = fit_batch(model_loading.prepare_fit_model(loaded, config),
                     jax.tree.map(jnp.asarray, observation), config, guess)
  ok = np.asarray(guess.estimated)
  np.testing.assert_allclose(np.asarray(result.params.shape)[ok], guess.shape[ok], atol=1e-6)
