"""Runs a TFLite graph (`tflite_graph.Graph`) in JAX: one example, NHWC with its batch of 1 as
the model declares it; vmap for batches, jit at the caller. The op list is static (Python,
unrolled at trace time), the constants are arguments, so a compiled program serves any weights
of the same network. Device-safe: imports JAX and NumPy only.

Ops (TFLite's semantics, from its reference kernels): CONV_2D, DEPTHWISE_CONV_2D (filters
(O, kh, kw, I) and (1, kh, kw, C x multiplier)), MAX_POOL_2D, ADD, MUL, RELU, PRELU, PAD,
RESHAPE, CONCATENATION, STRIDED_SLICE; SAME / VALID padding as TensorFlow's; fused activations
NONE, RELU, RELU6, RELU_N1_TO_1, TANH. Any other op is refused by `check_supported` before
tracing, with its name.
"""

from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jflame.errors import InputError

SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "ADD", "MUL", "RELU", "PRELU", "PAD",
             "RESHAPE", "CONCATENATION", "STRIDED_SLICE")


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


def _conv(op, x, weights, bias):
  strides = (op.option("stride_h", 1), op.option("stride_w", 1))
  dilation = (op.option("dilation_h", 1), op.option("dilation_w", 1))
  if op.kind == "CONV_2D":
    kernel = jnp.transpose(weights, (1, 2, 3, 0))                       # OHWI -> HWIO
    groups = 1
  else:
    channels = x.shape[-1]
    kernel = jnp.reshape(weights, weights.shape[1:3] + (1, weights.shape[3]))   # HW1(C*M)
    groups = channels
  y = jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=op.option("padding", "SAME"),
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
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
    else:
      raise InputError(f"operator {kind} is not supported by jflame's interpreter")
    values[op.outputs[0]] = result
  return tuple(values[index] for index in graph.outputs)
