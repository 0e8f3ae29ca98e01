"""MICA's identity estimate (Zielon et al. 2022), exported to ONNX, as an optional initialiser
(host side, onnxruntime): 300 FLAME 2020 shape coefficients from one face photograph.

MICA runs insightface's recipe, then its own mapping network:
1. Five keypoints (eye centres, nose tip, mouth corners, in image order: the subject's right
   eye first, as RetinaFace gives them). From MediaPipe's 478 landmarks: the iris centres 468 and
   473, the nose tip 1, and the mouth corners 61 and 291.
2. A least-squares similarity (Umeyama, no reflection) onto ArcFace's 112 x 112 template, then a
   bilinear warp, zero outside (insightface's `norm_crop`).
3. RGB (insightface swaps its BGR input to RGB), (x - 127.5) / 127.5, NCHW.
4. ArcFace (an iResNet-100 whose last layers MICA fine-tuned) -> 512 numbers, L2-normalised.
5. The mapping network -> 300 shape coefficients.

Two ways to ship it (see WORKSPACE.md): one file `mica.onnx` doing 4-5 (image -> (N, 300)),
or two files, `mica_arcface.onnx` (image -> (N, 512)) and `mica_mapping.onnx` ((N, 512) ->
(N, 300)), with the normalisation in between done here (normalising twice changes nothing, so an
ArcFace export that already normalises is fine too).
"""

from typing import Optional, Sequence

import numpy as np

from jflame.initializers.onnx_runtime import (DEFAULT_MAX_BATCH, OnnxModel, TensorSpec, find_model_file,
                                       resolve_model_file)
from jflame.assets import WORKSPACE_HINT, search_folders
from jflame.errors import ConfigError, ModelFileError
from jflame.preprocess.align import warp_affine
from jflame.preprocess.masks import LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER

SINGLE_FILE_NAMES = ("mica.onnx",)
ARCFACE_FILE_NAMES = ("mica_arcface.onnx",)
MAPPING_FILE_NAMES = ("mica_mapping.onnx",)
WHAT = "MICA identity encoder"

ARCFACE_SIZE = 112
ARCFACE_EMBEDDING_SIZE = 512
MICA_NUM_SHAPE = 300
# insightface's `arcface_dst`: where the five keypoints go in a 112 x 112 crop, in OpenCV's pixel
# convention (centres at integers).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
NOSE_TIP = 1
RIGHT_MOUTH_CORNER = 61    # the subject's right: on the image's left
LEFT_MOUTH_CORNER = 291
FIVE_POINT_LANDMARKS = (RIGHT_IRIS_CENTER, LEFT_IRIS_CENTER, NOSE_TIP, RIGHT_MOUTH_CORNER,
                        LEFT_MOUTH_CORNER)


def five_keypoints(landmarks) -> np.ndarray:
  """(478, 2) MediaPipe landmarks -> (5, 2) RetinaFace-style keypoints, same pixels."""
  return np.asarray(landmarks, np.float64)[list(FIVE_POINT_LANDMARKS), :2]


def similarity_least_squares(source, target) -> np.ndarray:
  """The similarity (2, 3) minimising sum |A source_k - target_k|^2, without reflection
  (Umeyama 1991)."""
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
  source_centred, target_centred = source - source_mean, target - target_mean
  covariance = target_centred.T @ source_centred / len(source)
  u, singular, vt = np.linalg.svd(covariance)
  # Flip the weakest axis when the best orthogonal map would be a reflection.
  signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = u @ np.diag(signs) @ vt
  scale = np.sum(singular * signs) / np.mean(np.sum(source_centred**2, axis=1))
  translation = target_mean - scale * rotation @ source_mean
  return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def arcface_transform(landmarks) -> np.ndarray:
  """The affine (2, 3) from the landmarks' image to the 112 x 112 ArcFace crop, both in jflame's
  pixel convention (centres at +0.5); the fit itself is done in OpenCV's, as insightface does."""
  opencv_keypoints = five_keypoints(landmarks) - 0.5
  opencv_map = similarity_least_squares(opencv_keypoints, ARCFACE_TEMPLATE)
  linear = opencv_map[:, :2]
  translation = opencv_map[:, 2] + 0.5 - linear @ np.array([0.5, 0.5])
  return np.concatenate([linear, translation[:, None]], axis=1)


def arcface_input_image(image: np.ndarray, landmarks) -> tuple:
  """One ArcFace input from an RGB uint8 image and its 478 landmarks (same pixels).

  Returns:
    (blob (3, 112, 112) float32, (RGB - 127.5) / 127.5; aligned crop (112, 112, 3) uint8).
  """
  # insightface warps without a pre-filter, and MICA's ArcFace was trained on such crops.
  aligned = warp_affine(np.asarray(image, np.uint8), arcface_transform(landmarks), ARCFACE_SIZE,
                        prefilter=False)
  blob = (aligned.astype(np.float32) - 127.5) / 127.5
  return np.ascontiguousarray(blob.transpose(2, 0, 1)), aligned


def arcface_inputs(records: Sequence) -> np.ndarray:
  """(N, 3, 112, 112) ArcFace inputs for ok PreparedImage records, cut from their crops.

  Raises:
    ConfigError: a record that is not ok.
  """
  blobs = np.zeros((len(records), 3, ARCFACE_SIZE, ARCFACE_SIZE), np.float32)
  for index, record in enumerate(records):
    if not record.ok:
      raise ConfigError(f"Record {record.name!r} has status {record.status!r}; only ok records "
                        "can be encoded.")
    blobs[index], _ = arcface_input_image(record.crop, record.landmarks)
  return blobs


def _single_output(model: OnnxModel, size: int) -> str:
  """The name of the model's one (batch, size) output, or ModelFileError."""
  dims = model.output_dims()
  if len(dims) != 1 or next(iter(dims.values())) not in ((size,), (None,)):
    model.mismatch(f"one output (batch, {size})", model.describe_outputs())
  return next(iter(dims))


class MicaEncoder:
  """MICA in one or two onnxruntime sessions.

  Create it with `MicaEncoder.load` (the files must exist) or `MicaEncoder.find` (None when the
  user has installed none).
  """

  def __init__(self, identity: OnnxModel, mapping: Optional[OnnxModel] = None,
               num_shape: int = MICA_NUM_SHAPE):
    """Wraps opened models after checking their outputs.

    Args:
      identity: the whole network (image -> shape) when `mapping` is None, else ArcFace
        (image -> embedding).
      mapping: the mapping network (embedding -> shape), or None.
      num_shape: the shape coefficients the network gives (MICA: 300).
    Raises:
      ModelFileError: outputs of other sizes.
    """
    self.identity = identity
    self.mapping = mapping
    self.num_shape = num_shape
    if mapping is None:
      self.identity_output = _single_output(identity, num_shape)
    else:
      self.identity_output = _single_output(identity, ARCFACE_EMBEDDING_SIZE)
      self.mapping_output = _single_output(mapping, num_shape)

  @classmethod
  def load(cls, path: Optional[str] = None, arcface_path: Optional[str] = None,
           mapping_path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
           max_batch: int = DEFAULT_MAX_BATCH, num_shape: int = MICA_NUM_SHAPE
           ) -> "MicaEncoder":
    """Opens MICA: `path` (one file), else `arcface_path` and `mapping_path` (two files; a half
    not given is looked for in the search folders), else the search folders: `mica.onnx` first,
    then the pair `mica_arcface.onnx` + `mica_mapping.onnx`.

    Raises:
      ModelFileError: nothing found (the message names every place searched), half a pair,
        not ONNX, or not shaped like MICA.
    """
    arcface_spec = TensorSpec((3, ARCFACE_SIZE, ARCFACE_SIZE))
    if path is None and arcface_path is None and mapping_path is None:
      path = find_model_file(None, SINGLE_FILE_NAMES, WHAT)
    if path is not None:
      path = resolve_model_file(path, SINGLE_FILE_NAMES, WHAT)
      return cls(OnnxModel(path, WHAT, arcface_spec, providers, max_batch), None, num_shape)
    # Two files: one given on its own is completed from the search folders.
    arcface_path = arcface_path or find_model_file(None, ARCFACE_FILE_NAMES, WHAT)
    mapping_path = mapping_path or find_model_file(None, MAPPING_FILE_NAMES, WHAT)
    if arcface_path is None and mapping_path is None:
      raise _not_found_error()
    if arcface_path is None or mapping_path is None:
      raise ModelFileError(
          f"MICA in two files needs both {ARCFACE_FILE_NAMES[0]} and {MAPPING_FILE_NAMES[0]}; "
          f"only {arcface_path or mapping_path} was given or found (searched "
          f"{_searched_folders()}). {WORKSPACE_HINT}")
    arcface_path = resolve_model_file(arcface_path, ARCFACE_FILE_NAMES, "MICA ArcFace network")
    mapping_path = resolve_model_file(mapping_path, MAPPING_FILE_NAMES, "MICA mapping network")
    identity = OnnxModel(arcface_path, "MICA ArcFace network", arcface_spec, providers,
                         max_batch)
    mapping = OnnxModel(mapping_path, "MICA mapping network",
                        TensorSpec((ARCFACE_EMBEDDING_SIZE,)), providers, max_batch)
    return cls(identity, mapping, num_shape)

  @classmethod
  def find(cls, path: Optional[str] = None, arcface_path: Optional[str] = None,
           mapping_path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
           max_batch: int = DEFAULT_MAX_BATCH, num_shape: int = MICA_NUM_SHAPE
           ) -> Optional["MicaEncoder"]:
    """Like `load`, but None when no path is given and none is installed."""
    nothing_given = path is None and arcface_path is None and mapping_path is None
    if nothing_given and all(
        find_model_file(None, names, WHAT) is None
        for names in (SINGLE_FILE_NAMES, ARCFACE_FILE_NAMES, MAPPING_FILE_NAMES)):
      return None
    return cls.load(path, arcface_path, mapping_path, providers, max_batch, num_shape)

  def encode_blobs(self, blobs: np.ndarray) -> np.ndarray:
    """(N, 3, 112, 112) ArcFace inputs -> (N, num_shape) float32 shape coefficients."""
    result = self.identity.run(blobs, [self.identity_output])[self.identity_output]
    if self.mapping is None:
      self.identity.check_result(self.identity_output, result, (self.num_shape,))
      return result
    self.identity.check_result(self.identity_output, result, (ARCFACE_EMBEDDING_SIZE,))
    # MICA's mapping network was trained on unit-length embeddings (F.normalize).
    embedding = result / np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
    shape = self.mapping.run(embedding, [self.mapping_output])[self.mapping_output]
    self.mapping.check_result(self.mapping_output, shape, (self.num_shape,))
    return shape

  def encode(self, records: Sequence) -> np.ndarray:
    """Aligns and encodes ok PreparedImage records -> (N, num_shape) shape coefficients."""
    return self.encode_blobs(arcface_inputs(records))


def _searched_folders() -> str:
  return ", ".join(str(folder) for folder in search_folders())


def _not_found_error() -> ModelFileError:
  """The error for no MICA at all: both layouts and every folder searched."""
  return ModelFileError(
      f"{WHAT} not found: looked for {SINGLE_FILE_NAMES[0]}, or the pair "
      f"{ARCFACE_FILE_NAMES[0]} + {MAPPING_FILE_NAMES[0]}, in {_searched_folders()}. Export MICA "
      f"to ONNX (one file, or ArcFace and the mapping network as two), put it in one of those "
      f"folders or pass its path. {WORKSPACE_HINT}")
