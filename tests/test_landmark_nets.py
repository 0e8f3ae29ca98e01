"""MediaPipe's face networks in JAX (issue 22): the TFLite graph read by jflame
(`landmark_nets.tflite_graph`) and run by its JAX interpreter gives the outputs of TFLite's own
interpreter (tflite-runtime) on the same input; the detector's decoding and suppression give
MediaPipe's own face detection's box; the attention mesh's custom operators equal loops written
here from MediaPipe's kernels; the whole face mesh in JAX (`landmark_nets.face_mesh`) gives
MediaPipe's face mesh's 478 landmarks on photos turned, scaled and without a face; a graph saved
for a device and loaded back runs the same; operators the interpreter does not run and missing
files are one line."""

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
  """The detector saved and loaded runs bit for bit the same; both face graphs saved in a folder
  (as a device machine reads them) load with the same ops, custom options included."""
  saved = tflite_graph.face_graphs(tflite_graph.save_face_graphs(tmp_path / "graphs")[0].parent)
  for loaded, original in zip(saved, tflite_graph.face_graphs()):
    assert loaded.ops == original.ops and loaded.inputs == original.inputs
    assert all(np.array_equal(loaded.constants[k], v) for k, v in original.constants.items())
  assert any(op.option("subset_idxs") for op in saved[1].ops)
  tflite_graph.save_graph(detector, tmp_path / "detector.npz")
  loaded = tflite_graph.load_graph(tmp_path / "detector.npz")
  assert loaded.ops == detector.ops and loaded.outputs == detector.outputs
  batch = _inputs()[:1]
  for name, value in _jax_outputs(loaded, batch).items():
    np.testing.assert_array_equal(value, _jax_outputs(detector, batch)[name])


def test_unknown_operators_and_missing_files_are_one_line(tmp_path):
  segmenter = tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
      "modules/selfie_segmentation/selfie_segmentation.tflite"))
  with pytest.raises(InputError, match="CUSTOM:Convolution2DTransposeBias") as caught:
    interpreter.check_supported(segmenter.ops, "selfie_segmentation.tflite")
  assert "\n" not in str(caught.value)
  for call in (lambda: tflite_graph.read_tflite(tmp_path / "absent.tflite"),
               lambda: tflite_graph.load_graph(tmp_path / "absent.npz")):
    with pytest.raises(InputError, match="absent"):
      call()
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a model at all")
  for call in (lambda: tflite_graph.read_tflite(junk), lambda: tflite_graph.load_graph(junk)):
    with pytest.raises(InputError, match="junk.npz: not a") as caught:
      call()
    assert "\n" not in str(caught.value)


def _letterboxed(rgb):
  """(input (128, 128, 3) in [-1, 1], Letterbox): the image scaled to fit, centred, bilinear."""
  from jflame.landmark_nets import face_detector
  height, width = rgb.shape[:2]
  placed = face_detector.letterbox(width, height)
  size = face_detector.INPUT_SIZE
  scaled = (round(size * placed.share[0]), round(size * placed.share[1]))
  left, top = (size - scaled[0]) // 2, (size - scaled[1]) // 2
  canvas = np.full((size, size, 3), -1.0, np.float32)
  canvas[top:top + scaled[1], left:left + scaled[0]] = cv2.resize(
      rgb, scaled, interpolation=cv2.INTER_LINEAR).astype(np.float32) / 127.5 - 1.0
  return canvas, face_detector.Letterbox((scaled[0] / size, scaled[1] / size),
                                         (left / size, top / size))


def test_the_strongest_face_is_mediapipes_first_detection(detector):
  """Anchors, decoding, weighted suppression and the letterbox removed in JAX: on the astronaut
  and the shared photos (and a wide crop of one, letterboxed) the box overlaps MediaPipe's
  own face detection's first box by IoU >= 0.9 (the issue's bar; measured 0.91-0.98) with its
  score within 0.03; a blank tile has a face for neither."""
  import mediapipe as mp
  from jflame.landmark_nets import face_detector
  anchors = jnp.asarray(face_detector.ssd_anchors())
  assert anchors.shape == (896, 2)
  weights = {k: jnp.asarray(v) for k, v in interpreter.weights_of(detector).items()}

  @jax.jit
  def detect(image):
    regressors, scores = interpreter.run_graph(detector, weights, {detector.inputs[0]:
                                                                   image[None]})
    return face_detector.strongest_face(*face_detector.decode(regressors[0], scores[0],
                                                              anchors))
  images = [skimage.data.astronaut()]
  for path in sorted((SHARED_ASSETS / "photos").glob("*.png"))[:3]:
    images.append(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
  images.append(images[-1][:700].copy())                      # a wide crop: letterboxed
  images.append(np.full((90, 160, 3), 200, np.uint8))
  with mp.solutions.face_detection.FaceDetection(model_selection=0,
                                                 min_detection_confidence=0.5) as reference:
    for image in images:
      height, width = image.shape[:2]
      canvas, placed = _letterboxed(image)
      found, score, box, _ = detect(jnp.asarray(canvas))
      box, _ = face_detector.to_image(box, jnp.zeros((6, 2)), placed, width, height)
      detections = reference.process(image).detections
      assert bool(found) == bool(detections), (image.shape, float(score))
      if not detections:
        continue
      relative = detections[0].location_data.relative_bounding_box
      expected = np.array([relative.xmin * width, relative.ymin * height,
                           (relative.xmin + relative.width) * width,
                           (relative.ymin + relative.height) * height])
      got = np.asarray(box, np.float64)
      low, high = np.maximum(expected[:2], got[:2]), np.minimum(expected[2:], got[2:])
      overlap = np.prod(np.maximum(high - low, 0.0))
      iou = overlap / (np.prod(expected[2:] - expected[:2]) + np.prod(got[2:] - got[:2])
                       - overlap)
      assert iou >= 0.9, (image.shape, iou)
      assert abs(float(score) - detections[0].score[0]) < 0.03


# The attention mesh's custom operators, as loops over MediaPipe's kernels (version 2, in
# mediapipe/util/tflite/operations), against the interpreter's vectorised ones.

def _matrix_loop(landmarks, left, right, subset, out_w, out_h, scale_x, scale_y):
  """landmarks_to_transform_matrix.cc, v2::LandmarksToTransformMatrixV2, line by line."""
  import math
  rotation = 0.0 - math.atan2(landmarks[right][1] - landmarks[left][1],
                              landmarks[right][0] - landmarks[left][0])
  c, s = math.cos(rotation), math.sin(rotation)
  turned = [(c * landmarks[i][0] - s * landmarks[i][1], s * landmarks[i][0] + c * landmarks[i][1])
            for i in subset]
  xs, ys = [p[0] for p in turned], [p[1] for p in turned]
  mid = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
  crop = (math.cos(-rotation) * mid[0] - math.sin(-rotation) * mid[1],
          math.sin(-rotation) * mid[0] + math.cos(-rotation) * mid[1])

  def mat(rows):
    return np.array(rows, np.float64)
  r = -rotation
  t = mat([[1, 0, 0, crop[0]], [0, 1, 0, crop[1]], [0, 0, 1, 0], [0, 0, 0, 1]])
  t = t @ mat([[math.cos(r), -math.sin(r), 0, 0], [math.sin(r), math.cos(r), 0, 0],
               [0, 0, 1, 0], [0, 0, 0, 1]])
  t = t @ np.diag([scale_x * (max(xs) - min(xs)) / out_w, scale_y * (max(ys) - min(ys)) / out_h,
                   1, 1])
  return t @ mat([[1, 0, 0, -out_w / 2], [0, 1, 0, -out_h / 2], [0, 0, 1, 0], [0, 0, 0, 1]])


def _bilinear_loop(features, m, out_h, out_w):
  """transform_tensor_bilinear.cc, v2::TransformTensorBilinearV2, line by line."""
  import math
  height, width, channels = features.shape
  x_t = [m[0, 0], m[0, 1], m[0, 2], m[0, 3] + m[0, 0] * 0.5 + m[0, 1] * 0.5 - 0.5]
  y_t = [m[1, 0], m[1, 1], m[1, 2], m[1, 3] + m[1, 0] * 0.5 + m[1, 1] * 0.5 - 0.5]
  out = np.zeros((out_h, out_w, channels))
  for oy in range(out_h):
    for ox in range(out_w):
      tx, ty = x_t[0] * ox + x_t[1] * oy + x_t[3], y_t[0] * ox + y_t[1] * oy + y_t[3]
      if tx < 0 or tx > width - 1 or ty < 0 or ty > height - 1:
        continue

      def value(h, w):
        return 0.0 if h < 0 or w < 0 or h >= height or w >= width else features[h, w]
      fx, fy = math.floor(tx), math.floor(ty)
      right, lower = tx - fx, ty - fy
      upper = (1 - right) * value(fy, fx) + right * value(fy, fx + 1)
      below = (1 - right) * value(fy + 1, fx) + right * value(fy + 1, fx + 1)
      out[oy, ox] = lower * below + (1 - lower) * upper
  return out


def test_the_attention_meshs_custom_operators_are_mediapipes_kernels():
  """Landmarks2TransformMatrix, TransformTensorBilinear (a region partly outside the map:
  zeros there, the edge cells blended) and TransformLandmarks, each with the options the model
  carries, on random inputs, within float32 rounding of the kernels' loops."""
  landmarker = tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
      tflite_graph.FACE_LANDMARKER))
  kinds = {op.kind: op for op in landmarker.ops}
  interpreter.check_supported(landmarker.ops)
  # The lips' region (its 80 points; the kernel reads them as pairs, an odd last one twice).
  to_matrix = next(op for op in landmarker.ops if op.kind == "CUSTOM:Landmarks2TransformMatrix"
                   and len(op.option("subset_idxs")) == 80)
  random = np.random.default_rng(0)
  landmarks = random.uniform(0, 48, (468, 3)).astype(np.float32)
  got = np.asarray(interpreter._landmarks_to_transform_matrix(to_matrix,
                                                              jnp.asarray(landmarks[None])))[0]
  expected = _matrix_loop(landmarks, to_matrix.option("left_rotation_idx"),
                          to_matrix.option("right_rotation_idx"), to_matrix.option("subset_idxs"),
                          16, 16, to_matrix.option("scale_x"), to_matrix.option("scale_y"))
  np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max())

  bilinear = kinds["CUSTOM:TransformTensorBilinear"]
  features = random.normal(size=(48, 48, 4)).astype(np.float32)
  turn = 0.4
  matrix = np.eye(4, dtype=np.float32)
  matrix[:2, :2] = 2.2 * np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
  matrix[:2, 3] = (30.0, -4.0)                                 # the top rows fall outside
  got = np.asarray(interpreter._transform_tensor_bilinear(bilinear, jnp.asarray(features[None]),
                                                          jnp.asarray(matrix[None])))[0]
  expected = _bilinear_loop(features, matrix.astype(np.float64), 16, 16)
  assert (expected == 0).all(axis=-1).mean() > 0.1 and (expected != 0).all(axis=-1).mean() > 0.5
  np.testing.assert_allclose(got, expected, atol=1e-4)          # float32 positions ~50

  points = random.normal(size=(1, 80, 2)).astype(np.float32)
  got = np.asarray(interpreter._transform_landmarks(jnp.asarray(points), jnp.asarray(
      matrix[None])))
  expected = np.stack([points[0] @ matrix[0, :2] + matrix[0, 3],
                       points[0] @ matrix[1, :2] + matrix[1, 3]], -1)
  np.testing.assert_allclose(got[0], expected, atol=1e-5)


def _turned(rgb, degrees):
  """The photo turned about its centre, the corners filled from the edges (a tilted camera)."""
  height, width = rgb.shape[:2]
  turn = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
  return cv2.warpAffine(rgb, turn, (width, height), borderMode=cv2.BORDER_REFLECT)


def _placed_small(rgb, side, canvas):
  """The photo shrunk to `side` pixels on a grey canvas (a small face in a big picture)."""
  out = np.full((canvas[1], canvas[0], 3), 120, np.uint8)
  out[40:40 + side, 60:60 + side] = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
  return out


def test_the_face_mesh_in_jax_gives_mediapipes_landmarks():
  """The whole face mesh (detector, region, crop, attention network, refinement, projection)
  in one vmapped program on images of several sizes on one canvas, against MediaPipe 0.10.21's
  face mesh (static images, one face, irises) on each image: two shared photos upright, turned
  by 30 and -45 degrees, cut to a wide strip, shrunk so the face is ~90 pixels wide; a blank
  picture and a texture without a face. Per image the mean landmark distance within 0.1% of the
  face's size and the largest within 0.3% (the issue's bars: 0.5% and 1.5%), the same
  face / no-face decision, the detection box's IoU with the mesh's own detection >= 0.9."""
  import mediapipe as mp
  from jflame.landmark_nets import face_mesh
  photos = sorted((SHARED_ASSETS / "photos").glob("*.png"))
  if not photos:
    pytest.skip("the shared photos are not here (../shared/assets/photos)")
  first, second = (cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
                   for path in photos[:2])
  images = [first, second, _turned(first, 30), _turned(second, -45), first[200:720].copy(),
            _placed_small(second, 200, (640, 400)), np.full((300, 500, 3), 200, np.uint8),
            skimage.data.coffee()]
  canvas = np.zeros((len(images), max(i.shape[0] for i in images),
                     max(i.shape[1] for i in images), 3), np.uint8)
  sizes = np.zeros((len(images), 2), np.int32)
  for number, image in enumerate(images):
    canvas[number, :image.shape[0], :image.shape[1]] = image
    sizes[number] = image.shape[1], image.shape[0]
  networks = face_mesh.FaceNetworks(
      tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
          tflite_graph.FACE_DETECTOR)),
      tflite_graph.read_tflite(tflite_graph.installed_mediapipe_model(
          tflite_graph.FACE_LANDMARKER)))
  run = jax.jit(jax.vmap(lambda weights, image, size: face_mesh.face_landmarks(
      networks, weights, image, size), in_axes=(None, 0, 0)))
  got = run(face_mesh.network_weights(networks), jnp.asarray(canvas), jnp.asarray(sizes))
  with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                       refine_landmarks=True) as reference:
    for number, image in enumerate(images):
      height, width = image.shape[:2]
      faces = reference.process(image).multi_face_landmarks
      assert bool(got.found[number]) == bool(faces), (number, float(got.presence[number]))
      if not faces:
        continue
      normalized = np.array([(p.x, p.y, p.z) for p in faces[0].landmark])
      expected = normalized[:, :2] * (width, height) + 0.5
      face_size = np.linalg.norm(expected.max(0) - expected.min(0))
      distance = np.linalg.norm(np.asarray(got.landmarks[number, :, :2]) - expected, axis=1)
      # The bars are 0.5% and 1.5%; these catch a half-pixel slip on a 200-pixel face.
      assert distance.mean() <= 0.001 * face_size, (number, distance.mean() / face_size)
      assert distance.max() <= 0.003 * face_size, (number, distance.max() / face_size)
      depth = np.asarray(got.landmarks[number, :, 2]) - normalized[:, 2] * width
      assert np.abs(depth).mean() <= 0.005 * face_size, number
      # The box: the mesh's region is 1.5 box sides about its centre, so the landmarks'
      # extent lies inside the box grown by half.
      box = np.asarray(got.box[number])
      grown = np.concatenate([box[:2] - 0.25 * (box[2:] - box[:2]),
                              box[2:] + 0.25 * (box[2:] - box[:2])])
      assert (expected.min(0) >= grown[:2] - 2).all() and (expected.max(0) <= grown[2:] + 2).all()


def test_device_mode_preprocessing_decodes_small_and_frames_the_device_landmarks(tmp_path):
  """`--landmarks device`'s host side (`Preprocessor` with a `DeviceLandmarker`): one record per
  input in order (a corrupt file unreadable, a picture without a face no_face); a 2048-pixel
  JPEG reaches the device at 512 pixels (a DCT-reduced decode) and its landmarks are twice the
  1024-pixel copy's; the photo turned upside down gives the upright photo's landmarks turned
  about the centre (the face's region follows its eyes), within 1% of the face size; the crop
  shows the face where the record's landmarks say (its mean colour at the eyes is the photo's)."""
  from jflame.landmark_nets.landmarker import DeviceLandmarker
  from jflame.preprocess.pipeline import DEVICE_MAX_SIDE, Preprocessor, decode_for_device
  photos = sorted((SHARED_ASSETS / "photos").glob("*.png"))
  if not photos:
    pytest.skip("the shared photos are not here (../shared/assets/photos)")
  bgr = cv2.imread(str(photos[0]))
  names = ["upright.jpg", "large.jpg", "upside_down.jpg", "corrupt.jpg", "coffee.png"]
  cv2.imwrite(str(tmp_path / names[0]), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
  cv2.imwrite(str(tmp_path / names[1]), cv2.resize(bgr, (2048, 2048),
                                                   interpolation=cv2.INTER_CUBIC),
              [cv2.IMWRITE_JPEG_QUALITY, 95])
  cv2.imwrite(str(tmp_path / names[2]), bgr[::-1, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
  (tmp_path / names[3]).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
  cv2.imwrite(str(tmp_path / names[4]), cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR))
  paths = [tmp_path / name for name in names]
  decoded = decode_for_device((paths[1], "large"))
  assert max(decoded.pixels.shape[:2]) == DEVICE_MAX_SIDE
  np.testing.assert_array_equal(decoded.scale, (4.0, 4.0))
  # A 1000 x 333 strip: 512 x 170 sent, each axis scaled by its own rounding.
  cv2.imwrite(str(tmp_path / "strip.png"), cv2.resize(bgr, (1000, 333)))
  strip = decode_for_device((tmp_path / "strip.png", "strip"))
  assert strip.pixels.shape[:2] == (170, 512)
  np.testing.assert_allclose(strip.scale, (1000 / 512, 333 / 170))
  with Preprocessor(256, landmarks_only=True,
                    device_landmarks=DeviceLandmarker(4, DEVICE_MAX_SIDE)) as preprocessor:
    records = preprocessor.prepare(paths, names)
  assert [r.name for r in records] == names
  assert [r.status for r in records] == ["ok", "ok", "ok", "unreadable", "no_face"]
  upright, large, upside_down = records[:3]
  points = upright.landmarks_original
  face_size = np.linalg.norm(points.max(0) - points.min(0))
  assert large.image_width == 2048 and large.crop.shape == (256, 256, 3)
  assert np.abs(large.landmarks_original / 2.0 - points).mean() < 0.005 * face_size
  turned_back = (1024.0, 1024.0) - upside_down.landmarks_original
  assert np.abs(turned_back - points).mean() < 0.01 * face_size
  rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float64)
  for record in (upright, upside_down):
    image = rgb if record is upright else rgb[::-1, ::-1]
    for eye in (468, 473):                                         # the irises' centres
      x, y = record.landmarks[eye].astype(int)
      u, v = record.landmarks_original[eye].astype(int)
      crop_colour = record.crop[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
      photo_colour = image[v - 2:v + 3, u - 2:u + 3].reshape(-1, 3).mean(0)
      assert np.abs(crop_colour - photo_colour).max() < 40, (record.name, eye)
  assert upright.upright_score > 0.8 and upright.num_faces == 1
  assert "no face" in records[4].message
  # Without encoders the engine asks for no crops: the same landmarks, no crop warped (the
  # same four readable images: the same compiled bucket).
  with Preprocessor(256, landmarks_only=True, device_crops=False,
                    device_landmarks=DeviceLandmarker(4, DEVICE_MAX_SIDE)) as preprocessor:
    bare = preprocessor.prepare(paths, names)[0]
  assert bare.crop is None
  np.testing.assert_allclose(bare.landmarks, upright.landmarks, atol=1e-4)


def test_where_the_landmarks_run_is_chosen_and_refused_in_one_line():
  """--landmarks: device refused (one line) for a photometric fit and for the Ray engine; auto on
  this CPU keeps MediaPipe and says why; mediapipe is taken as asked."""
  from jflame.engine import landmark_source
  from jflame.errors import ConfigError
  for photometric, engine in ((True, "local"), (False, "ray")):
    with pytest.raises(ConfigError) as caught:
      landmark_source("device", photometric, engine)
    assert "\n" not in str(caught.value) and "--landmarks mediapipe" in str(caught.value)
  assert landmark_source("device", False, "local") == ("device", "")
  assert landmark_source("mediapipe", False, "local") == ("mediapipe", "")
  if jax.default_backend() == "cpu":
    source, note = landmark_source("auto", False, "local")
    assert source == "mediapipe" and "no accelerator" in note


def test_tracking_mode_in_jax_follows_mediapipes_tracking_mode():
  """`jflame-track --landmarks device`: MediaPipe's tracking mode in JAX (the region from the
  previous frame's landmarks, the detector only after a loss) through `jflame.track_runner`'s
  reader, in chunks of 64 frames with the state carried across them, against MediaPipe's own tracking mode (`VideoLandmarker`) on the
  shared clip with six blank frames cut in (the face lost and found again): the same frames
  found, per frame mean landmark distance median <= 0.1% and max <= 1% of the face size
  (measured on the clip alone: 0.016%, p90 0.052%, max 0.22%)."""
  from jflame.preprocess.video import VideoLandmarker, open_clip
  from jflame.track_runner import frames_landmarks
  clip = SHARED_ASSETS / "clips" / "talking_head_182.mp4"
  if not clip.is_file():
    pytest.skip(f"the shared clip is not here ({clip})")
  frames = list(open_clip(str(clip), 25.0)[1])[:60]
  frames = frames[:30] + [np.full_like(frames[0], 90)] * 6 + frames[30:]
  with VideoLandmarker() as reference:
    expected = [reference.landmarks(frame) for frame in frames]
  points, found = frames_landmarks(iter(frames), where="device")
  got = [p if f else None for p, f in zip(points, found)]
  assert len(got) == len(frames)
  assert [g is not None for g in got] == [e is not None for e in expected]
  assert sum(e is None for e in expected) == 6
  shares = []
  for points, truth in zip(got, expected):
    if truth is not None:
      face_size = np.linalg.norm(truth.max(0) - truth.min(0))
      shares.append(np.linalg.norm(points - truth, axis=1).mean() / face_size)
  assert np.median(shares) <= 0.001 and max(shares) <= 0.01, (np.median(shares), max(shares))


def test_missing_networks_are_one_line_and_auto_falls_back_with_a_note(tmp_path, monkeypatch):
  """Device landmarks whose saved networks are missing: one line naming the file; `auto` on an
  accelerator then keeps MediaPipe and says why in the note the run summary records."""
  from jflame.engine import landmark_source
  from jflame.landmark_nets.landmarker import DeviceLandmarker
  with pytest.raises(InputError) as caught:
    DeviceLandmarker(4, 512, saved_graphs=str(tmp_path / "absent"))
  assert "face_detector.npz" in str(caught.value) and "\n" not in str(caught.value)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("JFLAME_LANDMARK_GRAPHS", str(tmp_path / "absent"))
  source, note = landmark_source("auto", False, "local")
  assert source == "mediapipe" and "face_detector.npz" in note
  monkeypatch.delenv("JFLAME_LANDMARK_GRAPHS")
  assert landmark_source("auto", False, "local") == ("device", "auto: an accelerator")
  assert landmark_source("auto", True, "local")[0] == "mediapipe"
