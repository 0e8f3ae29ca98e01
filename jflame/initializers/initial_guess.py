"""The encoders' estimates for one batch, laid out per slot as a
`jflame.starting_point.InitialGuess`."""

from typing import Optional, Sequence

import numpy as np

from jflame.errors import ConfigError
from jflame.starting_point import InitialGuess, fit_coefficient_count


def initial_guess_for_batch(records: Sequence, batch_size: int, deca=None, mica=None, *,
                            num_shape: int, num_expression: int,
                            num_texture: Optional[int] = None) -> InitialGuess:
  """Runs the given encoders on the ok records of one batch and lays their estimates out in the
  batch's slots (slot i is records[i], as in `jflame.preprocess.stack_observations`).

  Args:
    records: at most `batch_size` PreparedImage records (any status).
    batch_size: B.
    deca: an `jflame.initializers.deca.DecaEncoder`, or None.
    mica: an `jflame.initializers.mica.MicaEncoder`, or None. Its shape replaces DECA's (MICA is the
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
