"""DECA's coarse encoder, exported to ONNX, as an optional initialiser (host side, onnxruntime).

DECA (Feng et al. 2021) regresses from one 224 x 224 face crop a 236-number code, split in the
order of its `param_list`:
  shape 100 | tex 50 | exp 50 | pose 6 (global 3, jaw 3) | cam 3 (s, tx, ty) | light 27 (9 x 3)
Rotations are axis-angle (DECA's default `jaw_type = 'aa'`), the camera is weak perspective
(normalised image x = s (X + tx), y = -s (Y + ty), each in [-1, 1] over the crop), and the light
is 9 SH coefficients per RGB channel, row-major (coefficient, channel).

The crop follows DECA's TestData with its FAN detector: the bounding box of the 68 iBUG
landmarks, side (width + height) / 2 * 1.1 * 1.25 truncated to whole pixels, centred on the box,
resized to 224 (skimage convention: the square's edges land on pixel centres 0 and 223),
bilinear, zero outside, RGB in [0, 1], NCHW. jflame has MediaPipe landmarks, not iBUG ones: the
box is taken over the MediaPipe landmarks that lie where iBUG's extreme points do (jaw contour
and upper eyebrow edges). The crop is cut from the record's levelled crop, so DECA sees an
upright face and its rotations are relative to the crop, like the fit's.

An ONNX file is accepted with one output, the (N, 236) code, or with six outputs named like
DECA's code dictionary ("shape", "tex", "exp", "pose", "cam", "light"; light as (N, 27) or
(N, 9, 3)); see WORKSPACE.md for the export.
"""

import dataclasses
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from jflame.initializers.onnx_runtime import (DEFAULT_MAX_BATCH, OnnxModel, TensorSpec, find_model_file,
                                       resolve_model_file)
from jflame.errors import ConfigError
from jflame.preprocess.align import warp_affine
from jflame.render.shading import sh_lighting_from_deca

DEFAULT_FILE_NAMES = ("deca_encoder.onnx",)
WHAT = "DECA encoder"

DECA_INPUT_SIZE = 224
DECA_CROP_SCALE = 1.25
# DECA enlarges a box of 68 landmarks by 1.1 before the crop scale (`bbox2point`, 'kpt68').
DECA_LANDMARK_BOX_SCALE = 1.1
DECA_CODE_LAYOUT = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3),
                    ("light", 27))
DECA_CODE_SIZE = sum(size for _, size in DECA_CODE_LAYOUT)

# MediaPipe landmarks whose bounding box stands in for that of the 68 iBUG landmarks: the jaw
# contour from ear to ear and the upper edges of the eyebrows. MediaPipe also covers the
# forehead, which iBUG does not; including it would make the crop larger than DECA's.
IBUG_BOX_CONTOUR = (127, 234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361,
                    323, 454, 356)
IBUG_BOX_BROWS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
IBUG_BOX_LANDMARKS = IBUG_BOX_CONTOUR + IBUG_BOX_BROWS

# DECA's light acts on normals of the posed mesh in FLAME axes (y up, z towards the viewer);
# jflame's acts on camera-space normals (OpenCV axes). DECA's orthographic camera relates them by
# diag(1, -1, -1), which flips every basis function odd in y or z (jflame's basis order:
# 1, y, z, x, xy, yz, 3z^2 - 1, xz, x^2 - y^2).
_CAMERA_FROM_DECA_FRAME_SIGNS = np.array([1, -1, -1, 1, -1, 1, 1, -1, 1], np.float32)

_NAMED_OUTPUT_SIZES = {"shape": [(None,)], "tex": [(None,)], "exp": [(None,)], "pose": [(6,)],
                       "cam": [(3,)], "light": [(27,), (9, 3)]}


@dataclasses.dataclass(frozen=True)
class DecaCode:
  """DECA's estimates for N images (NumPy float32, leading axis N).

  Attributes:
    shape: (N, 100) FLAME 2020 identity coefficients.
    expression: (N, 50) FLAME 2020 expression coefficients.
    global_rotation: (N, 3) axis-angle of the head in DECA's camera frame (x right, y up).
    jaw_rotation: (N, 3) axis-angle of FLAME's jaw joint.
    camera: (N, 3) weak perspective (s, tx, ty), see the module docstring.
    texture: (N, 50) coefficients of DECA's albedo space (FLAME_albedo_from_BFM by default).
    lighting: (N, 9, 3) the light in jflame.render.shading's convention (camera axes).
    deca_lighting: (N, 9, 3) the light as DECA gives it.
    deca_from_crop: (N, 2, 3) affine, record crop pixels -> DECA input pixels (jflame's pixel
      convention), to bring DECA's projections back to the crop; None when parsed from a bare
      code.
  """
  shape: np.ndarray
  expression: np.ndarray
  global_rotation: np.ndarray
  jaw_rotation: np.ndarray
  camera: np.ndarray
  texture: np.ndarray
  lighting: np.ndarray
  deca_lighting: np.ndarray
  deca_from_crop: Optional[np.ndarray] = None


def lighting_from_deca(deca_lighting) -> np.ndarray:
  """(..., 9, 3) DECA SH lighting -> the same light in jflame's convention: DECA's basis order
  and constants (`sh_lighting_from_deca`), then DECA's FLAME axes -> camera axes."""
  deca_lighting = np.asarray(deca_lighting, np.float32)
  flat = deca_lighting.reshape(-1, 9, 3)
  reordered = np.asarray(jax.vmap(sh_lighting_from_deca)(flat), np.float32)
  return (reordered * _CAMERA_FROM_DECA_FRAME_SIGNS[:, None]).reshape(deca_lighting.shape)


def code_from_parts(parts: Dict[str, np.ndarray]) -> DecaCode:
  """DECA's code dictionary (shape, tex, exp, pose, cam, light; leading axis N) -> DecaCode."""
  parts = {name: np.asarray(value, np.float32) for name, value in parts.items()}
  deca_lighting = parts["light"].reshape(-1, 9, 3)
  return DecaCode(shape=parts["shape"], expression=parts["exp"],
                  global_rotation=parts["pose"][:, :3], jaw_rotation=parts["pose"][:, 3:6],
                  camera=parts["cam"], texture=parts["tex"],
                  lighting=lighting_from_deca(deca_lighting), deca_lighting=deca_lighting)


def parse_deca_code(code) -> DecaCode:
  """(N, 236) DECA code -> DecaCode (see the module docstring for the layout)."""
  code = np.asarray(code, np.float32)
  if code.ndim != 2 or code.shape[1] != DECA_CODE_SIZE:
    raise ValueError(f"A DECA code is (N, {DECA_CODE_SIZE}); got {code.shape}.")
  parts, start = {}, 0
  for name, size in DECA_CODE_LAYOUT:
    parts[name] = code[:, start:start + size]
    start += size
  return code_from_parts(parts)


def deca_box(landmarks) -> np.ndarray:
  """(4,) left, top, right, bottom of the iBUG-68-like landmark box (DECA's `bbox`)."""
  points = np.asarray(landmarks, np.float64)[list(IBUG_BOX_LANDMARKS), :2]
  return np.concatenate([points.min(axis=0), points.max(axis=0)])


def deca_crop_transform(landmarks, input_size: int = DECA_INPUT_SIZE) -> np.ndarray:
  """The affine (2, 3) from the landmarks' image to DECA's input, both in jflame's pixel
  convention (centres at +0.5).

  DECA maps the corners of its square onto pixel centres 0 and input_size - 1 in skimage's
  convention (centres at integers), so its scale is (input_size - 1) / side and the half-pixel
  offsets of the two conventions are added back here.
  """
  left, top, right, bottom = deca_box(landmarks)
  box_size = (right - left + bottom - top) / 2.0 * DECA_LANDMARK_BOX_SCALE
  side = float(int(box_size * DECA_CROP_SCALE))   # DECA truncates to whole pixels
  center = np.array([(left + right) / 2.0, (top + bottom) / 2.0])
  scale = (input_size - 1) / side
  translation = scale * (side / 2.0 - center) + 0.5
  return np.array([[scale, 0.0, translation[0]], [0.0, scale, translation[1]]])


def deca_input_image(image: np.ndarray, landmarks) -> tuple:
  """One DECA input from an RGB uint8 image and its 478 landmarks (same pixels).

  Returns:
    (image (3, 224, 224) float32 RGB in [0, 1], affine (2, 3) image -> DECA input).
  """
  affine = deca_crop_transform(landmarks)
  # Interpolate in [0, 1] floats, as DECA does, rather than in rounded uint8 values.
  crop = warp_affine(np.asarray(image, np.float32) / 255.0, affine, DECA_INPUT_SIZE)
  return np.ascontiguousarray(crop.transpose(2, 0, 1)), affine


def deca_inputs(records: Sequence) -> tuple:
  """DECA inputs for ok PreparedImage records, cut from their crops.

  Returns:
    (images (N, 3, 224, 224) float32, affines (N, 2, 3) record crop -> DECA input).
  Raises:
    ConfigError: a record that is not ok.
  """
  images = np.zeros((len(records), 3, DECA_INPUT_SIZE, DECA_INPUT_SIZE), np.float32)
  affines = np.zeros((len(records), 2, 3), np.float64)
  for index, record in enumerate(records):
    if not record.ok:
      raise ConfigError(f"Record {record.name!r} has status {record.status!r}; only ok records "
                        "can be encoded.")
    images[index], affines[index] = deca_input_image(record.crop, record.landmarks)
  return images, affines


class DecaEncoder:
  """DECA's coarse encoder in an onnxruntime session.

  Create it with `DecaEncoder.load` (the file must exist) or `DecaEncoder.find` (None when the
  user has not installed one).
  """

  def __init__(self, model: OnnxModel):
    """Wraps an opened model after checking its outputs.

    Raises:
      ModelFileError: outputs that are neither the 236 code nor DECA's six named parts.
    """
    self.model = model
    dims = model.output_dims()
    if len(dims) == 1:
      (name, sizes), = dims.items()
      if sizes not in ((DECA_CODE_SIZE,), (None,)):
        model.mismatch(f"one output (batch, {DECA_CODE_SIZE}) or six named outputs "
                       f"{'/'.join(_NAMED_OUTPUT_SIZES)}", model.describe_outputs())
      self.code_output = name
      self.output_names = [name]
    else:
      missing = [part for part in _NAMED_OUTPUT_SIZES if part not in dims]
      wrong = [part for part, allowed in _NAMED_OUTPUT_SIZES.items()
               if part in dims and not any(_sizes_fit(dims[part], sizes) for sizes in allowed)]
      problems = ([f"missing {missing}"] if missing else []) + (
          [f"wrong size {wrong}"] if wrong else [])
      if problems:
        model.mismatch(f"one output (batch, {DECA_CODE_SIZE}), or outputs shape, tex, exp "
                       "(batch, K), pose (batch, 6), cam (batch, 3) and light (batch, 27 or 9, 3) "
                       f"({'; '.join(problems)})", model.describe_outputs())
      self.code_output = None
      self.output_names = list(_NAMED_OUTPUT_SIZES)

  @classmethod
  def load(cls, path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
           max_batch: int = DEFAULT_MAX_BATCH) -> "DecaEncoder":
    """Opens `path`, or `deca_encoder.onnx` from the search folders.

    Raises:
      ModelFileError: missing (the message names the places searched), not ONNX, or not shaped
        like DECA's encoder.
    """
    path = resolve_model_file(path, DEFAULT_FILE_NAMES, WHAT)
    model = OnnxModel(path, WHAT, TensorSpec((3, DECA_INPUT_SIZE, DECA_INPUT_SIZE)), providers,
                      max_batch)
    return cls(model)

  @classmethod
  def find(cls, path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
           max_batch: int = DEFAULT_MAX_BATCH) -> Optional["DecaEncoder"]:
    """Like `load`, but None when no path is given and none is installed."""
    if find_model_file(path, DEFAULT_FILE_NAMES, WHAT) is None:
      return None
    return cls.load(path, providers, max_batch)

  def encode_images(self, images: np.ndarray) -> DecaCode:
    """Runs the encoder on prepared inputs (N, 3, 224, 224) float32 RGB in [0, 1]."""
    outputs = self.model.run(images, self.output_names)
    if self.code_output is not None:
      code = outputs[self.code_output]
      self.model.check_result(self.code_output, code, (DECA_CODE_SIZE,))
      return parse_deca_code(code)
    for part in ("pose", "cam"):
      self.model.check_result(part, outputs[part], _NAMED_OUTPUT_SIZES[part][0])
    if outputs["light"].shape[1:] not in _NAMED_OUTPUT_SIZES["light"]:
      self.model.check_result("light", outputs["light"], (27,))
    return code_from_parts(outputs)

  def encode(self, records: Sequence) -> DecaCode:
    """Crops and encodes ok PreparedImage records; `deca_from_crop` is set."""
    images, affines = deca_inputs(records)
    return dataclasses.replace(self.encode_images(images), deca_from_crop=affines)


def _sizes_fit(found, wanted) -> bool:
  return len(found) == len(wanted) and all(
      f is None or w is None or f == w for f, w in zip(found, wanted))
