"""What the optional ONNX encoders (DECA, MICA) share: finding a model file, opening it with
onnxruntime on the best device present, checking its inputs and outputs against what the encoder
needs, running batches, and the `InitialGuess` their estimates become.

Batching: a model exported with a dynamic batch axis gets up to `max_batch` images per call; one
exported with a fixed batch N gets chunks of exactly N, the last one zero-padded and the padding
dropped from the results. Both kinds are accepted.

All of this is host code (NumPy in, NumPy out); nothing runs inside jit.
"""

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import onnxruntime

from jflame.assets import WORKSPACE_HINT, find_asset, search_folders
from jflame.errors import ModelFileError

# CUDA when onnxruntime-gpu is installed, else CPU. TensorRT is left out on purpose: it builds an
# engine for every new input shape, which costs minutes on a first run.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_MAX_BATCH = 32

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}


def choose_providers(available: Optional[Sequence[str]] = None) -> list:
  """The execution providers to ask for, best first: CUDA when available, then CPU."""
  if available is None:
    available = onnxruntime.get_available_providers()
  chosen = [provider for provider in PREFERRED_PROVIDERS if provider in available]
  return chosen or list(available)


def resolve_model_file(explicit: Optional[str], default_names: Sequence[str], what: str) -> Path:
  """The model file to use: `explicit` when given, else the first default name found in the
  search folders (see jflame.assets).

  Raises:
    ModelFileError: the file is missing; the message names it and every place searched.
  """
  path = find_asset(explicit, default_names, what)
  if path is None:
    places = ", ".join(str(folder / name) for folder in search_folders()
                       for name in default_names)
    raise ModelFileError(f"{what} not found: looked for {places}. Export it to ONNX and put it "
                         f"in one of those places or pass its path. {WORKSPACE_HINT}")
  return path


def find_model_file(explicit: Optional[str], default_names: Sequence[str],
                    what: str) -> Optional[Path]:
  """Like `resolve_model_file`, but None when nothing was given and nothing is installed, for
  encoders that are used only when present. An explicit path that is missing still raises."""
  return find_asset(explicit, default_names, what)


def _dims(shape) -> Tuple[Optional[int], ...]:
  """An onnxruntime shape with symbolic (named or unknown) axes as None."""
  return tuple(size if isinstance(size, int) and size > 0 else None for size in shape)


def _format_dims(dims) -> str:
  return "(" + ", ".join("?" if size is None else str(size) for size in dims) + ")"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """An expected input or output: its sizes after the batch axis (None: any size) and the
  element types allowed."""
  sizes: Tuple[Optional[int], ...]
  types: Tuple[str, ...] = tuple(_NUMPY_TYPES)

  def describe(self) -> str:
    return f"(batch, {', '.join('any' if s is None else str(s) for s in self.sizes)}) float"

  def fits(self, node) -> bool:
    """Whether an onnxruntime NodeArg can be this tensor. Symbolic sizes in the model can only
    be checked when it runs (see `OnnxModel.check_result`)."""
    dims = _dims(node.shape)
    if node.type not in self.types or len(dims) != len(self.sizes) + 1:
      return False
    return all(found is None or wanted is None or found == wanted
               for found, wanted in zip(dims[1:], self.sizes))


def describe_node(node) -> str:
  """One model input/output as the user would recognise it: name, shape and element type."""
  return f"{node.name!r} {_format_dims(_dims(node.shape))} {node.type}"


class OnnxModel:
  """One onnxruntime session of a single-input network, with its input checked.

  Attributes:
    path: the model file.
    what: what it is, for messages ("DECA encoder").
    session: the onnxruntime.InferenceSession.
    input_name: the name of its one input.
    input_type: the NumPy dtype the input is given in (float32, float16 or float64).
    batch_size: the fixed batch size of the input, or None when the batch axis is dynamic.
    max_batch: the most images per call when the batch axis is dynamic.
    outputs: the output NodeArgs, in the model's order.
  """

  def __init__(self, path, what: str, input_spec: TensorSpec,
               providers: Optional[Sequence[str]] = None, max_batch: int = DEFAULT_MAX_BATCH):
    """Opens `path` and checks that its one input fits `input_spec`.

    Raises:
      ModelFileError: missing, not an ONNX model onnxruntime can load, or with inputs other
        than the one the encoder feeds.
    """
    self.path = Path(path)
    self.what = what
    self.max_batch = max(1, int(max_batch))
    if not self.path.is_file():
      raise ModelFileError(f"{what} file not found: {self.path}. {WORKSPACE_HINT}")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3   # errors only: a CPU fallback is not worth a warning per run
    try:
      self.session = onnxruntime.InferenceSession(
          str(self.path), sess_options=options,
          providers=list(providers) if providers is not None else choose_providers())
    # onnxruntime's own exceptions (InvalidProtobuf, Fail, ...) share no base below Exception.
    except Exception as error:  # pylint: disable=broad-except
      raise ModelFileError(f"{what} {self.path} could not be loaded by onnxruntime (is it an "
                           f"ONNX model?): {error}. {WORKSPACE_HINT}") from error
    inputs = self.session.get_inputs()
    if len(inputs) != 1 or not input_spec.fits(inputs[0]):
      self.mismatch(f"one input {input_spec.describe()}",
                    ", ".join(describe_node(node) for node in inputs) or "no inputs")
    self.input_name = inputs[0].name
    self.input_type = _NUMPY_TYPES[inputs[0].type]
    self.batch_size = _dims(inputs[0].shape)[0]
    self.outputs = self.session.get_outputs()

  @property
  def providers(self) -> list:
    """The execution providers the session really uses."""
    return self.session.get_providers()

  def mismatch(self, expected: str, found: str):
    """Raises the ModelFileError for a model that is not what the encoder expects."""
    raise ModelFileError(f"{self.what} {self.path} does not fit: expected {expected}, found "
                         f"{found}. Export it again with that layout. {WORKSPACE_HINT}")

  def output_dims(self) -> Dict[str, Tuple[Optional[int], ...]]:
    """Output name -> sizes after the batch axis (None where symbolic)."""
    return {node.name: _dims(node.shape)[1:] for node in self.outputs}

  def describe_outputs(self) -> str:
    return ", ".join(describe_node(node) for node in self.outputs) or "no outputs"

  def check_result(self, name: str, array: np.ndarray, sizes: Tuple[int, ...]):
    """Checks an output array's sizes after the batch axis once the model has run (a model with
    symbolic output sizes can only be checked here)."""
    if tuple(array.shape[1:]) != tuple(sizes):
      self.mismatch(f"output {name!r} of shape (batch, {', '.join(map(str, sizes))})",
                    f"{array.shape} when run")

  def run(self, inputs: np.ndarray, output_names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Runs the network on a batch.

    Args:
      inputs: (N, ...) the input of N images (any N >= 0).
      output_names: the outputs wanted.
    Returns:
      Output name -> (N, ...) float32 array.
    """
    inputs = np.asarray(inputs)
    count = inputs.shape[0]
    if count == 0:
      # One dummy run gives the output sizes, which may be symbolic in the model.
      dummy = self.run(np.zeros((1,) + inputs.shape[1:], inputs.dtype), output_names)
      return {name: result[:0] for name, result in dummy.items()}
    chunk = self.batch_size or self.max_batch
    pieces = {name: [] for name in output_names}
    for start in range(0, count, chunk):
      block = inputs[start:start + chunk]
      used = block.shape[0]
      if self.batch_size is not None and used < self.batch_size:
        padding = np.zeros((self.batch_size - used,) + block.shape[1:], block.dtype)
        block = np.concatenate([block, padding])
      results = self.session.run(list(output_names),
                                 {self.input_name: block.astype(self.input_type, copy=False)})
      for name, result in zip(output_names, results):
        pieces[name].append(np.asarray(result, np.float32)[:used])
    return {name: np.concatenate(parts) for name, parts in pieces.items()}
