"""What the device sees of one photograph, after host-side preprocessing.

Everything is in the pixel frame of the aligned square crop (see `jflame.camera` for the pixel
convention). A batch is the same dataclass with a leading batch axis on every array; padding
images in a batch have all landmark weights zero and `valid` False.
"""

from typing import Optional

import jax
from flax import struct


@struct.dataclass
class Observation:
  """One preprocessed image (or, with a leading axis, a batch of them).

  Attributes:
    landmarks: (N, 2) detected 2D landmarks in crop pixels, MediaPipe order (N = 478).
    landmark_weights: (N,) >= 0; zero marks a landmark as missing/invalid.
    image: (S, S, 3) float32 RGB in [0, 1], the aligned crop; None where only the landmarks
      are fitted (landmark mode never reads it, so a batch need not carry and ship it).
    face_mask: (S, S) float32 in [0, 1], skin region used by the photometric loss; None with
      `image`.
    valid: () bool, False for batch padding and for images whose preprocessing failed.
    size: S when `image` is None (static: it shapes the compiled program, like the image does).
  """
  landmarks: jax.Array
  landmark_weights: jax.Array
  image: Optional[jax.Array]
  face_mask: Optional[jax.Array]
  valid: jax.Array
  size: int = struct.field(pytree_node=False, default=0)

  @property
  def crop_size(self) -> int:
    if self.image is not None:
      return self.image.shape[-2]
    if self.size <= 0:
      raise ValueError("An Observation without an image needs its crop size (size=S).")
    return self.size
