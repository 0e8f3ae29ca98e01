"""Runs a TFLite graph (`tflite_graph.Graph`) in JAX: one example, NHWC with its batch of 1 as
the model declares it; vmap for batches, jit at the caller. The op list is static (Python,
unrolled at trace time), the constants are arguments, so a compiled program serves any weights
of the same network. Device-safe: imports JAX and NumPy only.

Ops (TFLite's semantics, from its reference kernels): CONV_2D, DEPTHWISE_CONV_2D (filters
(O, kh, kw, I) and (1, kh, kw, C x multiplier)), MAX_POOL_2D, ADD, MUL, RELU, PRELU, PAD,
RESHAPE, CONCATENATION, STRIDED_SLICE; SAME / VALID padding as TensorFlow's; fused activations
NONE, RELU, RELU6, RELU_N1_TO_1, TANH. MediaPipe's attention face mesh adds three custom ops,
version 2 as its model declares them (their behaviour from MediaPipe's kernels in
mediapipe/util/tflite/operations): Landmarks2TransformMatrix (a region's similarity transform
from its landmarks), TransformTensorBilinear (a feature map resampled through it, half-pixel
centres, zero outside) and TransformLandmarks (points mapped through it). Any other op is
refused by `check_supported` before tracing, with its name.
"""

from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jflame.errors import InputError

SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "ADD", "MUL", "RELU", "PRELU", "PAD",
             "RESHAPE", "CONCATENATION", "STRIDED_SLICE", "CUSTOM:Landmarks2TransformMatrix",
             "CUSTOM:TransformTensorBilinear", "CUSTOM:TransformLandmarks")


def check_supported(ops, where: str = "the network") -> None:
  """Raises InputError (one line) naming the ops of `ops` this interpreter does not run."""
  unknown = sorted({op.kind for op in ops} - set(SUPPORTED))
  if unknown:
    raise InputError(f"{where} uses operators jflame's interpreter does not run: "
                     f"{', '.join(unknown)}")


def _activation(x, name):
  if name is None:
    return x
  if name == "RELU":
    return jnp.maximum(x, 0.0)
  if name == "RELU6":
    return jnp.clip(x, 0.0, 6.0)
  if name == "RELU_N1_TO_1":
    return jnp.clip(x, -1.0, 1.0)
  if name == "TANH":
    return jnp.tanh(x)
  raise InputError(f"fused activation {name} is not supported")


def _same_padding(size: int, kernel: int, stride: int, dilation: int):
  """TensorFlow's SAME padding (before, after) of one axis: the extra cell goes after."""
  span = (kernel - 1) * dilation + 1
  total = max((-(-size // stride) - 1) * stride + span - size, 0)
  return total // 2, total - total // 2


def _depthwise(x, kernel, strides, dilation, padding):
  """A depthwise convolution (multiplier 1) as a sum of shifted, scaled copies: XLA:CPU runs a
  grouped convolution of these shapes ~25x slower (docs/BENCHMARKS.md)."""
  _, height, width, _ = x.shape
  kh, kw = kernel.shape[:2]
  if padding == "SAME":
    pads = [_same_padding(height, kh, strides[0], dilation[0]),
            _same_padding(width, kw, strides[1], dilation[1])]
  else:
    pads = [(0, 0), (0, 0)]
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (x.shape[1] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
  out_w = (x.shape[2] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
  total = 0.0
  for i in range(kh):
    for j in range(kw):
      top, left = i * dilation[0], j * dilation[1]
      window = x[:, top:top + (out_h - 1) * strides[0] + 1:strides[0],
                 left:left + (out_w - 1) * strides[1] + 1:strides[1]]
      total = total + window * kernel[i, j]
  return total


def _conv(op, x, weights, bias):
  strides = (op.option("stride_h", 1), op.option("stride_w", 1))
  dilation = (op.option("dilation_h", 1), op.option("dilation_w", 1))
  padding = op.option("padding", "SAME")
  if op.kind == "DEPTHWISE_CONV_2D" and weights.shape[3] == x.shape[-1]:
    y = _depthwise(x, weights[0], strides, dilation, padding)                 # (kh, kw, C)
  else:
    if op.kind == "CONV_2D":
      kernel = jnp.transpose(weights, (1, 2, 3, 0))                           # OHWI -> HWIO
      groups = 1
    else:
      kernel = jnp.reshape(weights, weights.shape[1:3] + (1, weights.shape[3]))   # HW1(C*M)
      groups = x.shape[-1]
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias
  return _activation(y, op.option("activation"))


def _strided_slice(op, x, begin, end, strides):
  slices = []
  shrink = []
  for axis in range(x.ndim):
    start = None if op.option("begin_mask", 0) >> axis & 1 else int(begin[axis])
    stop = None if op.option("end_mask", 0) >> axis & 1 else int(end[axis])
    step = int(strides[axis])
    if op.option("shrink_axis_mask", 0) >> axis & 1:
      stop, step = (start + 1 if start != -1 else None), 1
      shrink.append(axis)
    slices.append(slice(start, stop, step))
  y = x[tuple(slices)]
  return jnp.squeeze(y, axis=tuple(shrink)) if shrink else y


def _rotation(angle):
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])


def _landmarks_to_transform_matrix(op, landmarks):
  """(1, 4, 4): output cell (x, y, 0, 1) -> input position, for a crop of the region of the
  subset's landmarks (V2: turned so the rotation pair is level, scaled by scale_x / scale_y
  about the subset's centre in the turned frame)."""
  points = landmarks[0, :, :2]
  left, right = points[op.option("left_rotation_idx")], points[op.option("right_rotation_idx")]
  rotation = op.option("target_rotation_radians", 0.0) - jnp.arctan2(right[1] - left[1],
                                                                     right[0] - left[0])
  subset = points[np.asarray(op.option("subset_idxs"), np.int32).reshape(-1)]
  turned = subset @ _rotation(rotation).T
  low, high = turned.min(axis=0), turned.max(axis=0)
  centre = _rotation(-rotation) @ ((low + high) / 2.0)
  out = jnp.asarray([op.option("output_width"), op.option("output_height")], jnp.float32)
  scale = jnp.asarray([op.option("scale_x"), op.option("scale_y")], jnp.float32) * (high - low) / out
  # shift(centre) . rotate(-rotation) . scale . shift(-out / 2), as the kernel composes it.
  linear = _rotation(-rotation) * scale[None, :]
  offset = centre - linear @ (out / 2.0)
  matrix = jnp.zeros((4, 4), jnp.float32).at[:2, :2].set(linear).at[:2, 3].set(offset)
  return matrix.at[2, 2].set(1.0).at[3, 3].set(1.0)[None]


def _transform_tensor_bilinear(op, features, matrix):
  """(1, out_h, out_w, C): `features` (1, H, W, C) read bilinearly at the matrix's image of
  each output cell (V2: cell centres at +0.5 on both sides), zero where that falls outside."""
  _, height, width, channels = features.shape
  out_h, out_w = op.option("output_height"), op.option("output_width")
  m = matrix[0]
  y, x = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32),
                      jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
  source_x = m[0, 0] * (x + 0.5) + m[0, 1] * (y + 0.5) + m[0, 3] - 0.5
  source_y = m[1, 0] * (x + 0.5) + m[1, 1] * (y + 0.5) + m[1, 3] - 0.5
  inside = (source_x >= 0) & (source_x <= width - 1) & (source_y >= 0) & (source_y <= height - 1)
  x0, y0 = jnp.floor(source_x), jnp.floor(source_y)
  right, lower = source_x - x0, source_y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def read(row, column):
    valid = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    value = features[0, jnp.clip(row, 0, height - 1), jnp.clip(column, 0, width - 1)]
    return jnp.where(valid[..., None], value, 0.0)
  upper = (1 - right)[..., None] * read(y0, x0) + right[..., None] * read(y0, x0 + 1)
  below = (1 - right)[..., None] * read(y0 + 1, x0) + right[..., None] * read(y0 + 1, x0 + 1)
  result = lower[..., None] * below + (1 - lower)[..., None] * upper
  return jnp.where(inside[..., None], result, 0.0).reshape(1, out_h, out_w, channels)


def _transform_landmarks(points, matrix):
  """(1, N, 2) points through the matrix's x and y rows (z taken as 0, w as 1)."""
  m = matrix[0]
  return points @ m[:2, :2].T + m[:2, 3]


def weights_of(graph) -> Dict[int, np.ndarray]:
  """The graph's float constants (the network's weights): `run_graph`'s traced argument."""
  return {index: array for index, array in graph.constants.items() if array.dtype.kind == "f"}


def run_graph(graph, weights: Mapping[int, jax.Array], inputs: Dict[int, jax.Array]
              ) -> Tuple[jax.Array, ...]:
  """The graph's outputs for `inputs` (tensor index -> array) with `weights` (`weights_of`'s
  keys). The graph's integer constants (shapes, paddings, slice bounds) are read as static
  values, so close over `graph` (it is not an argument a compiled function can trace)."""
  values = dict(weights)
  values.update(inputs)

  def get(index):
    if index < 0:
      return None
    return values[index] if index in values else jnp.asarray(graph.constants[index])

  def static(index):
    return np.asarray(graph.constants[index])
  for op in graph.ops:
    args = [get(index) for index in op.inputs]
    kind = op.kind
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
      result = _conv(op, args[0], args[1], args[2] if len(args) > 2 else None)
    elif kind == "MAX_POOL_2D":
      result = jax.lax.reduce_window(
          args[0], -jnp.inf, jax.lax.max, (1, op.option("filter_h"), op.option("filter_w"), 1),
          (1, op.option("stride_h"), op.option("stride_w"), 1), op.option("padding", "VALID"))
      result = _activation(result, op.option("activation"))
    elif kind == "ADD":
      result = _activation(args[0] + args[1], op.option("activation"))
    elif kind == "MUL":
      result = _activation(args[0] * args[1], op.option("activation"))
    elif kind == "RELU":
      result = jnp.maximum(args[0], 0.0)
    elif kind == "PRELU":
      result = jnp.where(args[0] >= 0, args[0], args[0] * args[1])
    elif kind == "PAD":
      result = jnp.pad(args[0], [tuple(int(v) for v in row) for row in static(op.inputs[1])])
    elif kind == "RESHAPE":
      # The declared output shape (static models; the shape input may be computed).
      result = jnp.reshape(args[0], graph.shapes[op.outputs[0]])
    elif kind == "CONCATENATION":
      result = _activation(jnp.concatenate(args, axis=op.option("axis", 0)),
                           op.option("activation"))
    elif kind == "STRIDED_SLICE":
      result = _strided_slice(op, args[0], static(op.inputs[1]), static(op.inputs[2]),
                              static(op.inputs[3]))
    elif kind == "CUSTOM:Landmarks2TransformMatrix":
      result = _landmarks_to_transform_matrix(op, args[0])
    elif kind == "CUSTOM:TransformTensorBilinear":
      result = _transform_tensor_bilinear(op, args[0], args[1])
    elif kind == "CUSTOM:TransformLandmarks":
      result = _transform_landmarks(args[0], args[1])
    else:
      raise InputError(f"operator {kind} is not supported by jflame's interpreter")
    values[op.outputs[0]] = result
  return tuple(values[index] for index in graph.outputs)
