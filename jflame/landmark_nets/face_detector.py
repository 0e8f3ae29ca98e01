"""MediaPipe's short-range face detector around its network: the input it is fed, the anchors
and decoding of its outputs, and the strongest face, as MediaPipe's face detection graph
computes them (options of `face_detection_short_range.pbtxt`: SSD anchors of 4 layers with
strides 8, 16, 16, 16 and fixed size; scores through a sigmoid clipped at 100; box and 6
keypoints scaled by 128 about their anchor; weighted non-maximum suppression at IoU 0.3; the
letterbox removed). Per image, pure; vmap for batches.
"""

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 128
NUM_KEYPOINTS = 6
SCORE_CLIP = 100.0
MIN_SCORE = 0.5
SUPPRESSION_IOU = 0.3


def ssd_anchors() -> np.ndarray:
  """(896, 2) anchor centres (x, y) in [0, 1] (MediaPipe's SsdAnchorsCalculator with the
  detector's options: layers of equal stride are one grid, 2 anchors per layer and cell,
  fixed size 1)."""
  strides = (8, 16, 16, 16)
  centres = []
  layer = 0
  while layer < len(strides):
    same = sum(1 for stride in strides[layer:] if stride == strides[layer])
    cells = int(np.ceil(INPUT_SIZE / strides[layer]))
    per_cell = 2 * same
    y, x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    grid = np.stack([(x + 0.5) / cells, (y + 0.5) / cells], -1).reshape(-1, 1, 2)
    centres.append(np.repeat(grid, per_cell, axis=1).reshape(-1, 2))
    layer += same
  return np.concatenate(centres).astype(np.float32)


class Letterbox(NamedTuple):
  """How an image sits in the detector's square input: its scaled size's share of the square
  (x, y) and the padding before it (x, y), both in [0, 1] of the square."""
  share: Tuple[float, float]
  offset: Tuple[float, float]


def letterbox(width: int, height: int) -> Letterbox:
  """The image scaled to fit the square, keeping its aspect, centred (ImageToTensorCalculator
  with keep_aspect_ratio)."""
  longest = max(width, height)
  share = (width / longest, height / longest)
  return Letterbox(share, ((1.0 - share[0]) / 2.0, (1.0 - share[1]) / 2.0))


def decode(regressors, classificators, anchors):
  """(scores (N,), boxes (N, 4) as x0, y0, x1, y1, keypoints (N, 6, 2)) in [0, 1] of the square
  input, from the network's raw outputs (N, 16) and (N, 1)."""
  raw = regressors / INPUT_SIZE
  centre = raw[:, :2] + anchors
  half = raw[:, 2:4] / 2.0
  boxes = jnp.concatenate([centre - half, centre + half], axis=-1)
  keypoints = raw[:, 4:4 + 2 * NUM_KEYPOINTS].reshape(-1, NUM_KEYPOINTS, 2) + anchors[:, None]
  scores = jax.nn.sigmoid(jnp.clip(classificators[:, 0], -SCORE_CLIP, SCORE_CLIP))
  return scores, boxes, keypoints


def _iou(box, boxes):
  low = jnp.maximum(box[:2], boxes[:, :2])
  high = jnp.minimum(box[2:], boxes[:, 2:])
  inter = jnp.prod(jnp.maximum(high - low, 0.0), axis=-1)
  area = lambda b: jnp.prod(jnp.maximum(b[..., 2:] - b[..., :2], 0.0), axis=-1)
  return inter / jnp.maximum(area(box) + area(boxes) - inter, 1e-12)


def strongest_face(scores, boxes, keypoints):
  """(found, score, box (4,), keypoints (6, 2)): the first detection of MediaPipe's weighted
  non-maximum suppression, the score-weighted mean of every candidate above the score
  threshold overlapping the best one by more than the suppression IoU (its score the best's)."""
  best = jnp.argmax(scores)
  members = (scores >= MIN_SCORE) & (_iou(boxes[best], boxes) > SUPPRESSION_IOU)
  weights = jnp.where(members, scores, 0.0)
  total = jnp.maximum(jnp.sum(weights), 1e-12)
  box = jnp.sum(weights[:, None] * boxes, 0) / total
  points = jnp.sum(weights[:, None, None] * keypoints, 0) / total
  return scores[best] >= MIN_SCORE, scores[best], box, points


def to_image(box, keypoints, placed: Letterbox, width: int, height: int):
  """The square input's box and keypoints in the image's pixels (the letterbox removed)."""
  share = jnp.asarray(placed.share)
  offset = jnp.asarray(placed.offset)
  size = jnp.asarray([width, height], jnp.float32)
  corners = (box.reshape(2, 2) - offset) / share * size
  return corners.reshape(4), (keypoints - offset) / share * size
