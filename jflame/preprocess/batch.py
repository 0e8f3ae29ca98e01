"""Prepared records -> one fixed-shape batched `Observation` (NumPy; the fit moves it to device).

The device program must always see the same shapes, so a batch has exactly `batch_size` slots:
records fill the first slots in order, and failed records and padding slots hold zeros with
`valid` False and all landmark weights zero. Records prepared with `landmarks_only` have no face
mask; theirs is zero (the landmark fit does not read it).
"""

from typing import Sequence

import numpy as np

from jflame.errors import ConfigError
from jflame.observation import Observation
from jflame.preprocess.mediapipe_face import NUM_LANDMARKS
from jflame.preprocess.pipeline import PreparedImage


def stack_observations(records: Sequence[PreparedImage], batch_size: int,
                       crop_size: int, images: bool = True) -> Observation:
  """Stacks up to `batch_size` records into a batched `Observation` of NumPy arrays.

  Slot i holds records[i]; slots of failed records and slots past the records are padding.

  Args:
    records: at most `batch_size` records (any status).
    batch_size: B, the leading axis of every array.
    crop_size: S; every ok record must have crops of this size.
    images: False for a landmark fit: the Observation then holds no crops and masks (None), which
      saves converting and moving B x S x S x 4 floats that the fit would never read.

  Returns:
    Observation with landmarks (B, 478, 2) float32, landmark_weights (B, 478) float32,
    image (B, S, S, 3) float32 in [0, 1] and face_mask (B, S, S) float32 (or both None, see
    `images`), valid (B,) bool.

  Raises:
    ConfigError: more records than batch_size, or an ok record with another crop size.
  """
  if len(records) > batch_size:
    raise ConfigError(f"{len(records)} records do not fit a batch of {batch_size}; split them "
                      "into chunks of batch_size first.")
  landmarks = np.zeros((batch_size, NUM_LANDMARKS, 2), np.float32)
  landmark_weights = np.zeros((batch_size, NUM_LANDMARKS), np.float32)
  image = np.zeros((batch_size, crop_size, crop_size, 3), np.float32) if images else None
  face_mask = np.zeros((batch_size, crop_size, crop_size), np.float32) if images else None
  valid = np.zeros((batch_size,), bool)
  for slot, record in enumerate(records):
    if not record.ok:
      continue
    # A device-mode record made for a landmark fit carries no crop (only its landmarks).
    if record.crop is None and images:
      raise ConfigError(f"Record {record.name!r} has no crop; an image batch needs records "
                        "prepared with their crops.")
    if record.crop is not None and record.crop_size != crop_size:
      raise ConfigError(f"Record {record.name!r} has {record.crop_size}-pixel crops but the "
                        f"batch is for {crop_size}; preprocess with crop_size={crop_size}.")
    landmarks[slot] = record.landmarks
    landmark_weights[slot] = record.landmark_weights
    if images:
      image[slot] = record.crop.astype(np.float32) / 255.0
      if record.face_mask is not None:   # None from landmarks_only preprocessing
        face_mask[slot] = record.face_mask
    valid[slot] = True
  return Observation(landmarks=landmarks, landmark_weights=landmark_weights, image=image,
                     face_mask=face_mask, valid=valid, size=crop_size)
