"""The host's handle on the face mesh on the device (`--landmarks device`): the two networks read
once, one compiled program per bucket of images (the smallest power of two that holds them, up
to the run's batch size), NumPy in and out. Images are placed at the top left of a square canvas
of `max_side` pixels, so every image of a run shares the program of its bucket. The detector
also sees each image's quarter turns (`face_mesh.face_landmarks`' `search_turns`), as the
host pipeline's upright-window search does, so a turned or upside-down photo is fitted upright.
"""

from typing import Iterable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jflame.landmark_nets import face_mesh, interpreter, tflite_graph


def _networks(saved_graphs: Optional[str]):
  """(FaceNetworks, their weights on the device), every operator checked before tracing."""
  networks = face_mesh.FaceNetworks(*tflite_graph.face_graphs(saved_graphs))
  for graph, name in zip(networks, ("face detector", "face mesh")):
    interpreter.check_supported(graph.ops, f"MediaPipe's {name}")
  return networks, face_mesh.network_weights(networks)


class DeviceLandmarker:
  """`landmarker(images)` -> (found (n,), landmarks (n, 478, 3), box (n, 4), score (n,)) for a
  list of (h, w, 3) uint8 RGB images whose longer side is at most `max_side`: landmarks in
  each image's pixels (centres at +0.5), box in MediaPipe's pixel frame.

  Raises (from the constructor):
    InputError: the networks' files are missing, unreadable or use operators jflame does not
      run (one line naming the file).
  """

  def __init__(self, batch_size: int, max_side: int, saved_graphs: Optional[str] = None):
    self.networks, self.weights = _networks(saved_graphs)
    self.batch_size, self.max_side = batch_size, max_side
    networks = self.networks
    self._run = jax.jit(jax.vmap(
        lambda weights, image, size: face_mesh.face_landmarks(networks, weights, image, size,
                                                              search_turns=True),
        in_axes=(None, 0, 0)))

  def _bucket(self, count: int) -> int:
    return min(self.batch_size, 1 << max(count - 1, 0).bit_length())

  def __call__(self, images: List[np.ndarray]) -> Tuple[np.ndarray, ...]:
    parts = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      bucket = self._bucket(len(chunk))
      canvas = np.zeros((bucket, self.max_side, self.max_side, 3), np.uint8)
      sizes = np.full((bucket, 2), self.max_side, np.int32)    # empty slots: a blank image
      for slot, image in enumerate(chunk):
        height, width = image.shape[:2]
        if max(height, width) > self.max_side:
          raise ValueError(f"an image of {width} x {height} pixels is larger than the "
                           f"landmarker's {self.max_side}")
        canvas[slot, :height, :width] = image
        sizes[slot] = width, height
      result = jax.device_get(self._run(self.weights, jnp.asarray(canvas), jnp.asarray(sizes)))
      parts.append(tuple(np.asarray(field)[:len(chunk)] for field in
                         (result.found, result.landmarks, result.box, result.score)))
    if not parts:
      return (np.zeros((0,), bool), np.zeros((0, face_mesh.NUM_LANDMARKS, 3), np.float32),
              np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))
    return tuple(np.concatenate(field) for field in zip(*parts))


class DeviceTracker:
  """MediaPipe's tracking mode on the device for ONE clip (`face_mesh.track_landmarks`): frames
  go in order, `chunk` at a time through one compiled program, the tracking state carried from
  chunk to chunk. Frames larger than `max_side` are shrunk (area averaging) first.

  Raises (from the constructor): as DeviceLandmarker.
  """

  def __init__(self, max_side: int, chunk: int = 64, saved_graphs: Optional[str] = None):
    self.networks, self.weights = _networks(saved_graphs)
    self.max_side, self.chunk = max_side, chunk
    networks = self.networks
    self._run = jax.jit(lambda weights, frames, sizes, state: face_mesh.track_landmarks(
        networks, weights, frames, sizes, state))

  def _shrunk(self, frame: np.ndarray) -> Tuple[np.ndarray, float]:
    longest = max(frame.shape[:2])
    if longest <= self.max_side:
      return frame, 1.0
    import cv2
    scale = self.max_side / longest
    size = (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), longest / max(size)

  def track(self, frames: Iterable[np.ndarray]):
    """Yields (landmarks (478, 2) float32 in the frame's pixels, centres at +0.5, or None) per
    RGB uint8 frame, in order, a chunk at a time."""
    state = face_mesh.start_tracking()
    pending = []
    frames = iter(frames)
    while True:
      frame = next(frames, None)
      if frame is not None:
        pending.append(self._shrunk(frame))
        if len(pending) < self.chunk:
          continue
      if not pending:
        return
      canvas = np.zeros((self.chunk, self.max_side, self.max_side, 3), np.uint8)
      sizes = np.full((self.chunk, 2), self.max_side, np.int32)
      for slot, (image, _) in enumerate(pending):
        canvas[slot, :image.shape[0], :image.shape[1]] = image
        sizes[slot] = image.shape[1], image.shape[0]
      landmarks, found, after = self._run(self.weights, jnp.asarray(canvas), jnp.asarray(sizes),
                                          state)
      # The padded slots of a clip's last chunk come after its last frame: their state is
      # never used.
      state = after
      landmarks, found = jax.device_get((landmarks, found))
      for slot, (_, scale) in enumerate(pending):
        yield (np.asarray(landmarks[slot, :, :2] * scale, np.float32) if found[slot] else None)
      pending = []
      if frame is None:
        return
