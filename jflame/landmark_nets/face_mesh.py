"""MediaPipe's face mesh for still images in JAX: from a decoded image to 478 landmarks, the way
MediaPipe 0.10.21's face mesh computes them with `static_image_mode` and one face
(face_landmark_front_cpu.pbtxt and its subgraphs), on any JAX device. Per image, pure; vmap for
batches, jit at the caller.

1. The short-range detector on the image letterboxed into 128 x 128 (bilinear, zero border,
   values in [-1, 1]); the strongest face (`face_detector`). With `search_turns` (jflame's
   rule, not MediaPipe's) the detector also sees the image turned by 1, 2 and 3 quarter turns
   and a turn is taken when it beats the level image by TURN_MARGIN: MediaPipe's detector
   places its eye points on an upside-down face as if it were upright, and the mesh then
   lays an upright face over it.
2. The face's region: its box's centre, a square of 1.5 times the box's longer side, turned so
   the detector's two eye points are level (FaceDetectionFrontDetectionToRoi).
3. That region read into 192 x 192 (bilinear, border replicated, values in [0, 1], rounded to
   whole levels first as OpenCV's warp of a uint8 image rounds them).
4. The attention mesh network; its lips, eyes and irises refine the 468-point mesh (irises'
   depth the mean of their eye's contour, tensors_to_face_landmarks_with_attention.pbtxt).
5. The points mapped back to the image (LandmarkProjectionCalculator); depth scaled like x.

Images of one batch share one array shape: each sits at the top left of its canvas, with its own
(width, height). Landmarks come in jflame's pixel convention (`jflame.camera`: centres at +0.5),
as `preprocess.mediapipe_face.FaceAnalyzer.face_landmarks` gives them. Device-safe: JAX and
NumPy only; the graphs are read on the host (`tflite_graph`).
"""

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jflame.landmark_nets import face_detector, interpreter

MESH_INPUT_SIZE = 192
ROI_SCALE = 1.5
MIN_PRESENCE = 0.5
# The host pipeline's rules for turned faces (`preprocess.pipeline`, measured there): a quarter
# turn is taken when its face beats the level image's by TURN_MARGIN, never when the level face
# scores UPRIGHT_ENOUGH; a turned face must score TURNED_MIN_SCORE (weak detections on grey
# renders of the synthetic head won turned by 0.1 at 0.6-0.7) and, beside a level one, be the
# same face (centres within TURNED_SAME_FACE box sides).
TURN_MARGIN = 0.08
UPRIGHT_ENOUGH = 0.88
TURNED_MIN_SCORE = 0.75
TURNED_SAME_FACE = 0.5
NUM_MESH_POINTS = 468
NUM_LANDMARKS = 478

# MediaPipe's refinement of the mesh (tensors_to_face_landmarks_with_attention.pbtxt): which mesh
# points each refining output replaces (x and y; the mesh keeps its depth there).
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
        78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415,
        76, 77, 90, 180, 85, 16, 315, 404, 320, 307, 306, 184, 74, 73, 72, 11, 302, 303, 304, 408,
        62, 96, 89, 179, 86, 15, 316, 403, 319, 325, 292, 183, 42, 41, 38, 12, 268, 271, 272, 407)
LEFT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 130, 25,
            110, 24, 23, 22, 26, 112, 243, 247, 30, 29, 27, 28, 56, 190, 226, 31, 228, 229, 230,
            231, 232, 233, 244, 113, 225, 224, 223, 222, 221, 189, 35, 124, 46, 53, 52, 65, 143,
            111, 117, 118, 119, 120, 121, 128, 245, 156, 70, 63, 105, 66, 107, 55, 193)
RIGHT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398, 359,
             255, 339, 254, 253, 252, 256, 341, 463, 467, 260, 259, 257, 258, 286, 414, 446, 261,
             448, 449, 450, 451, 452, 453, 464, 342, 445, 444, 443, 442, 441, 413, 265, 353, 276,
             283, 282, 295, 372, 340, 346, 347, 348, 349, 350, 357, 465, 383, 300, 293, 334, 296,
             336, 285, 417)
# An iris's depth: the mean depth of its eye's lid contour (the first 16 points of the eye).
EYE_CONTOUR = 16


class FaceNetworks(NamedTuple):
  """The two graphs (`tflite_graph.Graph`, static: close over them)."""
  detector: object
  mesh: object


class FaceLandmarks(NamedTuple):
  """One image's result. found: a face detected and the mesh sure of it; landmarks (478, 3):
  x, y in image pixels (centres at +0.5), z MediaPipe's relative depth in the same units;
  box (4,): the detection's x0, y0, x1, y1 in pixels; score: the detector's; presence: the
  mesh's face probability."""
  found: jax.Array
  landmarks: jax.Array
  box: jax.Array
  score: jax.Array
  presence: jax.Array


def network_weights(networks: FaceNetworks) -> dict:
  """The traced argument of `face_landmarks`: each graph's float constants."""
  return {name: {index: jnp.asarray(array)
                 for index, array in interpreter.weights_of(graph).items()}
          for name, graph in networks._asdict().items()}


def _rotation(angle):
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])


def sample_square(image, size, centre, side, angle, out_size: int, replicate: bool):
  """(out_size, out_size, 3) float32 levels in [0, 255]: the square of `side` pixels about
  `centre` turned by `angle` (radians, y down), read bilinearly from the image's `size` =
  (width, height) at the top left of `image` (H, W, 3), as OpenCV's warpPerspective reads
  ImageToTensorCalculator's region: output pixel u samples centre + R (u - out / 2) side / out
  (pixel centres at whole numbers); outside the image the border replicated or zero."""
  steps = jnp.arange(out_size, dtype=jnp.float32) - out_size / 2.0
  grid = jnp.stack(jnp.meshgrid(steps, steps, indexing="xy"), -1) * (side / out_size)
  source = centre + grid @ _rotation(angle).T
  width, height = size[0], size[1]
  low = jnp.floor(source)
  fraction = source - low
  low = low.astype(jnp.int32)

  def read(dx, dy):
    x, y = low[..., 0] + dx, low[..., 1] + dy
    value = image[jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)].astype(jnp.float32)
    if replicate:
      return value
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return jnp.where(inside[..., None], value, 0.0)
  fx, fy = fraction[..., :1], fraction[..., 1:]
  top = (1 - fx) * read(0, 0) + fx * read(1, 0)
  bottom = (1 - fx) * read(0, 1) + fx * read(1, 1)
  return jnp.round((1 - fy) * top + fy * bottom)


def _strongest_face(networks: FaceNetworks, weights, image, size, turn):
  """(found, score, box corners (4, 2), keypoints (6, 2)) in the image's pixels (MediaPipe's
  frame: centres at whole numbers): the detector on the image letterboxed and turned by `turn`
  quarter turns (the letterbox square read turned about the image's centre)."""
  size_f = size.astype(jnp.float32)
  longest = jnp.max(size_f)
  angle = turn * (jnp.pi / 2.0)
  letterboxed = sample_square(image, size, size_f / 2.0, longest, angle, face_detector.INPUT_SIZE,
                              replicate=False) / 127.5 - 1.0
  detector = networks.detector
  regressors, scores = interpreter.run_graph(detector, weights["detector"],
                                             {detector.inputs[0]: letterboxed[None]})
  found, score, box, keypoints = face_detector.strongest_face(*face_detector.decode(
      regressors[0], scores[0], jnp.asarray(face_detector.ssd_anchors())))
  corners = jnp.stack([box[:2], box[2:], jnp.stack([box[0], box[3]]), jnp.stack([box[2], box[1]])])

  def to_image(points):          # [0, 1] of the turned square -> the image's pixels
    return size_f / 2.0 + ((points - 0.5) * longest) @ _rotation(angle).T
  return found, score, to_image(corners), to_image(keypoints)


def _quarter_turn(found, score, corners):
  """The quarter turn (0-3) whose detection to take, by the host pipeline's rules."""
  level = jnp.where(found[0], score[0], 0.0)
  centres = (corners[:, 0] + corners[:, 1]) / 2.0
  level_side = jnp.max(jnp.abs(corners[0, 1] - corners[0, 0]))
  same_face = (jnp.linalg.norm(centres - centres[0], axis=-1)
               <= TURNED_SAME_FACE * level_side)
  allowed = found & (score >= TURNED_MIN_SCORE) & (same_face | ~found[0])
  allowed = allowed & (score >= level + TURN_MARGIN) & ~(found[0] & (level >= UPRIGHT_ENOUGH))
  candidate = jnp.argmax(jnp.where(allowed, score, -1.0))
  return jnp.where(allowed[candidate], candidate, 0)


def face_region(corners, keypoints):
  """(centre (2,), side, angle): the mesh's square from a detection (its box's corners and
  keypoints in pixels), as FaceDetectionFrontDetectionToRoi makes it: turned so that keypoint
  0 -> 1 (the eyes) is level, 1.5 times the box's longer side."""
  centre = (corners[0] + corners[1]) / 2.0
  side = ROI_SCALE * jnp.max(jnp.abs(corners[1] - corners[0]))
  delta = keypoints[1] - keypoints[0]
  angle = -jnp.arctan2(-delta[1], delta[0])
  angle = angle - 2.0 * jnp.pi * jnp.floor((angle + jnp.pi) / (2.0 * jnp.pi))
  return centre, side, angle


def refined_mesh(outputs) -> jax.Array:
  """(478, 3) in the 192-pixel input's units: the mesh with its lips, eyes and irises refined."""
  mesh, lips, left_eye, right_eye, left_iris, right_iris = (
      jnp.reshape(output, (-1,)) for output in outputs[:6])
  points = mesh.reshape(NUM_MESH_POINTS, 3)
  for indices, refined in ((LIPS, lips), (LEFT_EYE, left_eye), (RIGHT_EYE, right_eye)):
    points = points.at[np.asarray(indices), :2].set(refined.reshape(-1, 2))
  irises = []
  for eye, iris in ((LEFT_EYE, left_iris), (RIGHT_EYE, right_iris)):
    depth = jnp.mean(points[np.asarray(eye[:EYE_CONTOUR]), 2])
    xy = iris.reshape(-1, 2)
    irises.append(jnp.concatenate([xy, jnp.full((xy.shape[0], 1), depth)], -1))
  return jnp.concatenate([points] + irises)


def face_landmarks(networks: FaceNetworks, weights: Mapping, image, size,
                   search_turns: bool = False) -> FaceLandmarks:
  """One image's face mesh: `image` (H, W, 3) uint8 with the picture at its top left, `size`
  (2,) int32 its (width, height). Close over `networks`; `weights` from `network_weights`.
  `search_turns`: also try the image's quarter turns (module docstring)."""
  size = jnp.asarray(size, jnp.int32)
  if search_turns:
    found, score, corners, keypoints = jax.vmap(
        lambda turn: _strongest_face(networks, weights, image, size, turn))(
            jnp.arange(4, dtype=jnp.float32))
    best = _quarter_turn(found, score, corners)
    found, score, corners, keypoints = (found[best], score[best], corners[best],
                                        keypoints[best])
  else:
    found, score, corners, keypoints = _strongest_face(networks, weights, image, size, 0.0)
  box = jnp.concatenate([corners.min(axis=0), corners.max(axis=0)])
  landmarks, presence = mesh_in_region(networks, weights, image, size,
                                       *face_region(corners, keypoints))
  return FaceLandmarks(found & (presence > MIN_PRESENCE), landmarks, box, score, presence)


def mesh_in_region(networks: FaceNetworks, weights: Mapping, image, size, centre, side, angle):
  """(landmarks (478, 3) in jflame's pixel convention, presence): the mesh of the square region
  read from the image (steps 3-5 of the module docstring)."""
  crop = sample_square(image, size, centre, side, angle, MESH_INPUT_SIZE, replicate=True) / 255.0
  mesh = networks.mesh
  outputs = interpreter.run_graph(mesh, weights["mesh"], {mesh.inputs[0]: crop[None]})
  presence = jax.nn.sigmoid(jnp.reshape(outputs[6], ()))
  points = refined_mesh(outputs) / MESH_INPUT_SIZE
  xy = centre + (points[:, :2] - 0.5) @ _rotation(angle).T * side + 0.5
  return jnp.concatenate([xy, points[:, 2:] * side], -1), presence


def region_from_landmarks(landmarks):
  """(centre, side, angle): the next frame's square from this frame's landmarks (jflame's
  pixel convention), as FaceLandmarkLandmarksToRoi makes it: the landmarks' box, turned so the
  outer eye corners (33 -> 263) are level, 1.5 times its longer side."""
  points = landmarks[:, :2] - 0.5
  low, high = points.min(axis=0), points.max(axis=0)
  delta = points[263] - points[33]
  angle = -jnp.arctan2(-delta[1], delta[0])
  angle = angle - 2.0 * jnp.pi * jnp.floor((angle + jnp.pi) / (2.0 * jnp.pi))
  return (low + high) / 2.0, ROI_SCALE * jnp.max(high - low), angle


class TrackState(NamedTuple):
  """What tracking carries from one frame to the next: whether a face was kept, and its
  landmarks (478, 3)."""
  tracked: jax.Array
  landmarks: jax.Array


def start_tracking() -> TrackState:
  return TrackState(jnp.asarray(False), jnp.zeros((NUM_LANDMARKS, 3), jnp.float32))


def track_landmarks(networks: FaceNetworks, weights: Mapping, frames, sizes, state: TrackState):
  """MediaPipe's face mesh in tracking mode (video, one face) over frames (T, H, W, 3), each
  with its (width, height) in sizes (T, 2) at its top left: a frame whose predecessor kept a
  face reads its region from the predecessor's landmarks (no detection); otherwise the
  detector finds it (at the level image, as MediaPipe does); a face is kept while the mesh's
  presence is above MIN_PRESENCE.

  Returns:
    (landmarks (T, 478, 3), found (T,), the state after the last frame: pass it with the
    clip's next frames).
  """
  def step(state, frame_and_size):
    frame, size = frame_and_size
    def from_detection(_):
      found, _, corners, keypoints = _strongest_face(networks, weights, frame, size, 0.0)
      return (found,) + face_region(corners, keypoints)

    def from_previous(_):
      return (jnp.asarray(True),) + region_from_landmarks(state.landmarks)
    found, centre, side, angle = jax.lax.cond(state.tracked, from_previous, from_detection, None)
    landmarks, presence = mesh_in_region(networks, weights, frame, size, centre, side, angle)
    kept = found & (presence > MIN_PRESENCE)
    return TrackState(kept, landmarks), (landmarks, kept)
  state, (landmarks, found) = jax.lax.scan(step, state,
                                           (frames, jnp.asarray(sizes, jnp.int32)))
  return landmarks, found, state
