"""What the initialisers hand to the fit: estimates per batch slot, all optional.

The weight-free landmark initialiser needs none of this; DECA/MICA (ONNX, optional) or the user
fill it. The fit treats an estimated shape as given (kept by its closed-form start, refined or
held by stage 2 per FitConfig.fit_shape) and an estimated expression as the prior mean of its
start.
"""

from typing import Optional, Sequence

import numpy as np
from flax import struct

from jflame.errors import ConfigError


@struct.dataclass
class InitialGuess:
  """Encoder estimates for a batch, in jflame's conventions (NumPy, leading batch axis B).

  A field is None when no encoder given estimates it. Slots of failed records and padding slots
  hold zeros and `estimated` False.

  Attributes:
    estimated: (B,) bool, True where an encoder ran on the slot's record.
    shape: (B, S) FLAME identity coefficients (MICA when given, else DECA).
    expression: (B, E) FLAME expression coefficients (DECA).
    jaw_rotation: (B, 3) axis-angle, radians (DECA).
    texture: (B, T) albedo coefficients of DECA's texture space (DECA).
    lighting: (B, 9, 3) SH lighting in jflame.render.shading's convention (DECA).
  """
  estimated: np.ndarray
  shape: Optional[np.ndarray] = None
  expression: Optional[np.ndarray] = None
  jaw_rotation: Optional[np.ndarray] = None
  texture: Optional[np.ndarray] = None
  lighting: Optional[np.ndarray] = None


def fit_coefficient_count(coefficients: np.ndarray, count: int) -> np.ndarray:
  """(N, K) coefficients -> (N, count): the leading ones, zero-padded when count > K (a zero
  coefficient is the model's mean along that direction)."""
  coefficients = np.asarray(coefficients, np.float32)
  fitted = np.zeros(coefficients.shape[:1] + (count,), np.float32)
  kept = min(count, coefficients.shape[1])
  fitted[:, :kept] = coefficients[:, :kept]
  return fitted


def initial_guess_for_batch(records: Sequence, batch_size: int, deca=None, mica=None, *,
                            num_shape: int, num_expression: int,
                            num_texture: Optional[int] = None) -> InitialGuess:
  """Runs the given encoders on the ok records of one batch and lays their estimates out in the
  batch's slots (slot i is records[i], as in `jflame.preprocess.stack_observations`).

  Args:
    records: at most `batch_size` PreparedImage records (any status).
    batch_size: B.
    deca: an `initializers.deca.DecaEncoder`, or None.
    mica: an `initializers.mica.MicaEncoder`, or None. Its shape replaces DECA's (MICA is the
      identity specialist; DECA's shape is the fallback).
    num_shape, num_expression: the fit's coefficient counts; estimates are truncated or
      zero-padded to them.
    num_texture: the same for texture; None keeps the encoder's count.
  Returns:
    An InitialGuess with the fields the given encoders estimate.
  Raises:
    ConfigError: more records than batch_size.
  """
  if len(records) > batch_size:
    raise ConfigError(f"{len(records)} records do not fit a batch of {batch_size}; split them "
                      "into chunks of batch_size first.")
  slots = np.array([slot for slot, record in enumerate(records) if record.ok], np.int64)
  estimated = np.zeros((batch_size,), bool)
  if deca is None and mica is None:
    return InitialGuess(estimated=estimated)
  estimated[slots] = True
  ok_records = [records[slot] for slot in slots]

  def in_slots(values: np.ndarray) -> np.ndarray:
    batch = np.zeros((batch_size,) + values.shape[1:], np.float32)
    batch[slots] = values
    return batch

  fields = {}
  if deca is not None:
    code = deca.encode(ok_records)
    texture_count = code.texture.shape[1] if num_texture is None else num_texture
    fields.update(shape=fit_coefficient_count(code.shape, num_shape),
                  expression=fit_coefficient_count(code.expression, num_expression),
                  jaw_rotation=code.jaw_rotation,
                  texture=fit_coefficient_count(code.texture, texture_count),
                  lighting=code.lighting)
  if mica is not None:
    fields["shape"] = fit_coefficient_count(mica.encode(ok_records), num_shape)
  return InitialGuess(estimated=estimated,
                      **{name: in_slots(values) for name, values in fields.items()})
