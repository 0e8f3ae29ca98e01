"""The size of the pictures jflame writes, shared by their writers (`jflame.output`, the
report): a picture's longer side is at most MAX_PICTURE_SIDE pixels, whatever the photo's size
(a 12000 x 12000 photo made a 59 MB overlay before), and what is drawn on it is scaled with it.
Host only: NumPy and OpenCV."""

import numpy as np

MAX_PICTURE_SIDE = 2048


def fit_within(image, max_side: int = MAX_PICTURE_SIDE):
  """(image, scale): the image downscaled (area averaging) so that its longer side is at most
  `max_side`, and the (2, 3) affine that takes its old pixel coordinates to the new ones (the
  identity when it already fits). Pixel edges map to edges, so with jflame's pixel centres at
  +0.5 a point's coordinates scale by new size / old size on each axis."""
  height, width = np.shape(image)[:2]
  if max(height, width) <= max_side:
    return image, np.eye(2, 3)
  import cv2  # only a picture that is too large needs OpenCV here
  factor = max_side / max(height, width)
  size = (min(max(int(round(width * factor)), 1), max_side),
          min(max(int(round(height * factor)), 1), max_side))
  smaller = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
  return smaller, np.array([[size[0] / width, 0.0, 0.0], [0.0, size[1] / height, 0.0]])


def compose_affine(second, first) -> np.ndarray:
  """The (2, 3) affine that applies `first`, then `second`."""
  second = np.asarray(second, np.float64)
  return second[:, :2] @ np.asarray(first, np.float64) + np.concatenate(
      [np.zeros((2, 2)), second[:, 2:]], axis=1)
