"""A TFLite model as a plain graph jflame's JAX interpreter runs (host side: needs `tflite`).

`read_tflite(path)` parses the flatbuffer with the `tflite` package and returns a `Graph`: the
operators in execution order (kind, input and output tensor indices, options as plain values),
the constant tensors as float32 / int32 NumPy arrays, and the model's input and output tensors.
DEQUANTIZE of a constant (MediaPipe ships float16 weights) is folded at read time, so the
interpreter never sees it. A custom operator's options (a FlexBuffer map: MediaPipe's
attention model keeps its landmark subsets and output sizes there) become the same plain values. `save_graph` / `load_graph` write and read the same graph as one .npz
(constants) with its structure as JSON inside, which is what a device machine without `tflite` or
MediaPipe loads.
"""

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from jflame.errors import InputError

GRAPH_FORMAT_VERSION = 2
# TFLite's TensorType codes -> NumPy.
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8,
           10: np.float64}
_PADDING = {0: "SAME", 1: "VALID"}
_ACTIVATION = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH"}


@dataclasses.dataclass(frozen=True)
class Op:
  """One operator: `kind` (TFLite's builtin name, or CUSTOM:<name>), its tensors, its options
  as (name, value) pairs (hashable: the op list is static in a compiled program)."""
  kind: str
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]
  options: Tuple[Tuple[str, object], ...] = ()

  def option(self, name, default=None):
    return dict(self.options).get(name, default)


@dataclasses.dataclass(frozen=True)
class Graph:
  ops: Tuple[Op, ...]
  constants: Dict[int, np.ndarray]
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]
  names: Dict[int, str]
  shapes: Dict[int, Tuple[int, ...]]

  def output_names(self) -> Tuple[str, ...]:
    return tuple(self.names[index] for index in self.outputs)


# MediaPipe 0.10.21's face models, inside its installed package (Apache-2.0; read where the user
# installed them, never copied into this repository).
FACE_DETECTOR = "modules/face_detection/face_detection_short_range.tflite"
FACE_LANDMARKER = "modules/face_landmark/face_landmark_with_attention.tflite"


def installed_mediapipe_model(relative: str) -> Path:
  """The path of one of MediaPipe's bundled models in the installed `mediapipe` package (found
  without importing it)."""
  import importlib.util
  spec = importlib.util.find_spec("mediapipe")
  if spec is None or not spec.submodule_search_locations:
    raise InputError(f"the mediapipe package is not installed; its model {relative} is read from "
                     "it (pip install mediapipe==0.10.21)")
  path = Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise InputError(f"MediaPipe's model file not found: {path} (mediapipe 0.10.21 ships it)")
  return path


# The names `save_face_graphs` writes in a folder, for a machine without MediaPipe or `tflite`.
SAVED_DETECTOR = "face_detector.npz"
SAVED_LANDMARKER = "face_landmarker.npz"


def face_graphs(saved_folder=None) -> Tuple[Graph, Graph]:
  """(detector, landmarker): from `saved_folder` where `save_face_graphs` wrote them, else
  from the folder named by $JFLAME_LANDMARK_GRAPHS (a machine without MediaPipe), else from
  the installed MediaPipe."""
  import os
  saved_folder = saved_folder or os.environ.get("JFLAME_LANDMARK_GRAPHS") or None
  if saved_folder is None:
    return (read_tflite(installed_mediapipe_model(FACE_DETECTOR)),
            read_tflite(installed_mediapipe_model(FACE_LANDMARKER)))
  folder = Path(saved_folder)
  return load_graph(folder / SAVED_DETECTOR), load_graph(folder / SAVED_LANDMARKER)


def save_face_graphs(folder) -> Tuple[Path, Path]:
  """Writes the installed MediaPipe's two face graphs into `folder` (created)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = (folder / SAVED_DETECTOR, folder / SAVED_LANDMARKER)
  for graph, path in zip(face_graphs(), paths):
    save_graph(graph, path)
  return paths


def _options(op, kind: str) -> Tuple[Tuple[str, object], ...]:
  """The options jflame's interpreter reads, as plain values."""
  table = op.BuiltinOptions()
  if table is None:
    return ()

  def read(cls, fields):
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return tuple((name, convert(getattr(options, method)()))
                 for name, method, convert in fields)
  padding = ("padding", "Padding", _PADDING.get)
  activation = ("activation", "FusedActivationFunction", _ACTIVATION.get)
  if kind == "CONV_2D":
    from tflite.Conv2DOptions import Conv2DOptions
    return read(Conv2DOptions, [padding, activation, ("stride_h", "StrideH", int),
                                ("stride_w", "StrideW", int),
                                ("dilation_h", "DilationHFactor", int),
                                ("dilation_w", "DilationWFactor", int)])
  if kind == "DEPTHWISE_CONV_2D":
    from tflite.DepthwiseConv2DOptions import DepthwiseConv2DOptions
    return read(DepthwiseConv2DOptions, [
        padding, activation, ("stride_h", "StrideH", int), ("stride_w", "StrideW", int),
        ("multiplier", "DepthMultiplier", int), ("dilation_h", "DilationHFactor", int),
        ("dilation_w", "DilationWFactor", int)])
  if kind == "MAX_POOL_2D":
    from tflite.Pool2DOptions import Pool2DOptions
    return read(Pool2DOptions, [padding, activation, ("stride_h", "StrideH", int),
                                ("stride_w", "StrideW", int),
                                ("filter_h", "FilterHeight", int),
                                ("filter_w", "FilterWidth", int)])
  if kind in ("ADD", "MUL"):
    from tflite.AddOptions import AddOptions
    from tflite.MulOptions import MulOptions
    return read(AddOptions if kind == "ADD" else MulOptions, [activation])
  if kind == "CONCATENATION":
    from tflite.ConcatenationOptions import ConcatenationOptions
    return read(ConcatenationOptions, [("axis", "Axis", int), activation])
  if kind == "STRIDED_SLICE":
    from tflite.StridedSliceOptions import StridedSliceOptions
    return read(StridedSliceOptions, [(name, method, int) for name, method in (
        ("begin_mask", "BeginMask"), ("end_mask", "EndMask"),
        ("shrink_axis_mask", "ShrinkAxisMask"), ("ellipsis_mask", "EllipsisMask"),
        ("new_axis_mask", "NewAxisMask"))])
  return ()


def _hashable(value):
  """Options are part of a static op list: lists become tuples (FlexBuffer vectors, JSON)."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(item) for item in value)
  return value


def _custom_options(op) -> Tuple[Tuple[str, object], ...]:
  """A custom operator's FlexBuffer map of options as sorted (name, value) pairs."""
  if not op.CustomOptionsLength():
    return ()
  from flatbuffers import flexbuffers
  options = flexbuffers.Loads(op.CustomOptionsAsNumpy().tobytes())
  if not isinstance(options, dict):
    return ()
  return tuple(sorted((str(name), _hashable(value)) for name, value in options.items()))


def read_tflite(path) -> Graph:
  """The graph of a .tflite file (its first subgraph)."""
  try:
    import tflite
    from tflite.BuiltinOperator import BuiltinOperator
  except ImportError:
    raise InputError("reading a .tflite model needs the `tflite` package (pip install "
                     "tflite)") from None
  path = Path(path)
  if not path.is_file():
    raise InputError(f"model file not found: {path}")
  try:
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
  except Exception as error:  # flatbuffers raises anything on bytes that are no model
    raise InputError(f"{path}: not a TFLite model ({type(error).__name__})") from None
  if graph is None:
    raise InputError(f"{path}: not a TFLite model (no subgraph)")
  builtin_names = {value: name for name, value in BuiltinOperator.__dict__.items()
                   if not name.startswith("_")}
  constants, names, shapes = {}, {}, {}
  for index in range(graph.TensorsLength()):
    tensor = graph.Tensors(index)
    names[index] = tensor.Name().decode()
    shapes[index] = tuple(int(v) for v in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    data = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if isinstance(data, np.ndarray) and data.size:
      dtype = _DTYPES.get(tensor.Type())
      if dtype is None:
        raise InputError(f"{path}: tensor {names[index]} has TFLite type {tensor.Type()}, "
                         "which jflame's reader does not know")
      constants[index] = data.view(dtype).reshape(shapes[index])
  ops = []
  for number in range(graph.OperatorsLength()):
    op = graph.Operators(number)
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    kind = builtin_names.get(builtin, str(builtin))
    custom = kind == "CUSTOM"
    if custom:
      kind = f"CUSTOM:{code.CustomCode().decode()}"
    inputs = tuple(int(v) for v in op.InputsAsNumpy()) if op.InputsLength() else ()
    outputs = tuple(int(v) for v in op.OutputsAsNumpy())
    if kind == "DEQUANTIZE" and inputs[0] in constants:
      constants[outputs[0]] = constants[inputs[0]].astype(np.float32)
      continue
    ops.append(Op(kind, inputs, outputs, _custom_options(op) if custom else _options(op, kind)))
  used = {index for op in ops for index in op.inputs}
  constants = {index: (array.astype(np.float32) if array.dtype.kind == "f" else
                       array.astype(np.int32))
               for index, array in constants.items() if index in used}
  return Graph(ops=tuple(ops), constants=constants,
               inputs=tuple(int(v) for v in graph.InputsAsNumpy()),
               outputs=tuple(int(v) for v in graph.OutputsAsNumpy()), names=names,
               shapes=shapes)


def save_graph(graph: Graph, path) -> None:
  """Writes the graph as one .npz (atomically): its constants and its structure as JSON."""
  from jflame.atomic import atomic_path
  structure = dict(
      version=GRAPH_FORMAT_VERSION, inputs=list(graph.inputs), outputs=list(graph.outputs),
      names={str(k): v for k, v in graph.names.items()},
      shapes={str(k): list(v) for k, v in graph.shapes.items()},
      ops=[dict(kind=op.kind, inputs=list(op.inputs), outputs=list(op.outputs),
                options=[[name, value] for name, value in op.options]) for op in graph.ops])
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, structure=np.array(json.dumps(structure)),
             **{f"constant_{index}": array for index, array in graph.constants.items()})


def load_graph(path) -> Graph:
  """A graph written by `save_graph` (needs neither `tflite` nor MediaPipe)."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"landmark network file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as stored:
      structure = json.loads(str(stored["structure"]))
      constants = {int(key[len("constant_"):]): stored[key] for key in stored.files
                   if key.startswith("constant_")}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
    raise InputError(f"{path}: not a network graph written by jflame ({error})") from None
  if structure.get("version") != GRAPH_FORMAT_VERSION:
    raise InputError(f"{path}: network graph version {structure.get('version')!r}; this "
                     f"jflame reads {GRAPH_FORMAT_VERSION} (convert the model again)")
  ops = tuple(Op(op["kind"], tuple(op["inputs"]), tuple(op["outputs"]),
                 tuple((name, _hashable(value)) for name, value in op["options"]))
              for op in structure["ops"])
  return Graph(ops=ops, constants=constants, inputs=tuple(structure["inputs"]),
               outputs=tuple(structure["outputs"]),
               names={int(k): v for k, v in structure["names"].items()},
               shapes={int(k): tuple(v) for k, v in structure["shapes"].items()})
