"""The temporal model of a clip: what smoothing a track costs, and where it lets go.

Each per-frame quantity (expression, jaw, eyes, camera rotation and translation) pays for its
first and second differences between frames. A difference is Charbonnier beyond about twice
its noise (`robust_square`), and its weight falls where the detected landmarks themselves move
(`motion_weights`), so the data term never gives way before the smoothing does. Functions take
per-frame leaves (T, ...) of ONE run of consecutive frames (a segment, or a whole clip).

The weights and scales are traced values (`TemporalWeights`), not part of the compiled program:
a clip tracked with `--smoothing 0`, 0.5 or 1 runs one program.
"""

import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp

from jflame.config import Smoothness, TrackConfig
from jflame.fit import FitVariables

_WEIGHT_FIELDS = ("velocity", "acceleration", "velocity_scale", "acceleration_scale",
                  "motion_scale", "agreement")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TemporalWeights:
  """TrackConfig's temporal weights as traced scalars (fields as TrackConfig's; a Smoothness
  becomes {group: scalar})."""
  velocity: Dict[str, jax.Array]
  acceleration: Dict[str, jax.Array]
  velocity_scale: Dict[str, jax.Array]
  acceleration_scale: Dict[str, jax.Array]
  motion_scale: jax.Array
  agreement: jax.Array


def temporal_weights(config: TrackConfig) -> TemporalWeights:
  """The config's temporal weights, to pass to a compiled track as arguments."""
  def value(field):
    held = getattr(config, field)
    if isinstance(held, Smoothness):
      return {group.name: jnp.float32(getattr(held, group.name))
              for group in dataclasses.fields(held)}
    return jnp.float32(held)
  return TemporalWeights(**{field: value(field) for field in _WEIGHT_FIELDS})


def without_temporal_weights(config: TrackConfig) -> TrackConfig:
  """The config with its temporal weights zeroed: the compiled program's static part (read
  inside it, a weight would be 0 and the track unsmoothed; the weights travel as
  `temporal_weights`)."""
  zero = Smoothness(**{group.name: 0.0 for group in dataclasses.fields(Smoothness)})
  return config.replace(velocity=zero, acceleration=zero, velocity_scale=zero,
                        acceleration_scale=zero, motion_scale=0.0, agreement=0.0)


def per_frame_leaves(variables: FitVariables):
  """(group, values, scale) of every smoothed per-frame quantity (translation in mm)."""
  flame = variables.flame
  eyes = jnp.concatenate([flame.left_eye_rotation, flame.right_eye_rotation], axis=-1)
  return (("expression", flame.expression, 1.0), ("jaw", flame.jaw_rotation, 1.0),
          ("eyes", eyes, 1.0), ("rotation", variables.camera_rotation, 1.0),
          ("translation", variables.camera_translation, 1000.0))


def robust_square(squared, scale):
  """Charbonnier penalty of a difference's squared norm: the square below `scale`, linear (slope
  2 scale) above it (0: the plain square)."""
  on = scale > 0
  safe = jnp.where(on, scale, 1.0)
  return jnp.where(on, 2.0 * safe * safe * (jnp.sqrt(1.0 + squared / (safe * safe)) - 1.0),
                   squared)


def _squared_differences(variables: FitVariables):
  """(group, first (T-1,), second (T-2,)) squared norms of each group's differences."""
  for group, values, scale in per_frame_leaves(variables):
    first = jnp.diff(values * scale, axis=0)
    second = jnp.diff(first, axis=0)
    yield group, jnp.sum(first * first, -1), jnp.sum(second * second, -1)


def _difference_weights(weights: TemporalWeights, group: str, frames: int, motion_weights):
  """The group's weights of its first (T-1,) and second (T-2,) differences."""
  first = jnp.full(frames - 1, weights.velocity[group], jnp.float32)
  second = jnp.full(frames - 2, weights.acceleration[group], jnp.float32)
  if motion_weights is not None:
    first, second = first * motion_weights[:-1, 0], second * motion_weights[:-2, 1]
  return first, second


def temporal_penalty(variables: FitVariables, weights: TemporalWeights, motion_weights=None):
  """Sum of weighted robust first and second differences over ONE run of frames (per-frame
  leaves (L, ...)); `motion_weights` (L, 2) scale the difference starting at each frame."""
  total = 0.0
  frames = variables.camera_rotation.shape[0]
  for group, first, second in _squared_differences(variables):
    first_weight, second_weight = _difference_weights(weights, group, frames, motion_weights)
    total = (total
             + jnp.sum(first_weight * robust_square(first, weights.velocity_scale[group]))
             + jnp.sum(second_weight
                       * robust_square(second, weights.acceleration_scale[group])))
  return total


def _robust_slope(squared, scale):
  """d robust_square / d squared: 1 / sqrt(1 + squared / scale^2) (1 for the plain square)."""
  on = scale > 0
  safe = jnp.where(on, scale, 1.0)
  return jnp.where(on, 1.0 / jnp.sqrt(1.0 + squared / (safe * safe)), 1.0)


def majorizer_weights(variables: FitVariables, weights: TemporalWeights, motion_weights=None):
  """{group: (first (T-1,), second (T-2,))} weights of the plain squared differences whose sum
  touches `temporal_penalty` at `variables` from above up to a constant (iteratively
  reweighted least squares: robust_square is concave in the squared norm)."""
  frames = variables.camera_rotation.shape[0]
  majorizer = {}
  for group, first, second in _squared_differences(variables):
    first_weight, second_weight = _difference_weights(weights, group, frames, motion_weights)
    majorizer[group] = (
        first_weight * _robust_slope(first, weights.velocity_scale[group]),
        second_weight * _robust_slope(second, weights.acceleration_scale[group]))
  return majorizer


def weighted_squares(variables: FitVariables, weights) -> jax.Array:
  """Sum of the squared differences weighted by `majorizer_weights` (a quadratic form)."""
  total = 0.0
  for group, first, second in _squared_differences(variables):
    first_weight, second_weight = weights[group]
    total = total + jnp.sum(first_weight * first) + jnp.sum(second_weight * second)
  return total


def _coherent_motion(points, difference, both, cells: int = 3):
  """How far the face moved coherently between frames, in the difference's units: over a
  `cells` x `cells` grid of the face (positions `points` (K, 2)), the least-squares affine fit
  of the landmark difference (K, 2) in each cell, the largest of their root-mean-square
  lengths, over landmarks `both` (K,) seen. A head turn, a jaw or a blink moves many
  neighbouring landmarks alike; the detector's independent jitter does not, and a cell's fit
  keeps only 3 / (its landmarks) of its energy."""
  weight = both.astype(points.dtype)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  centre = jnp.sum(weight[:, None] * points, 0) / count
  spread = jnp.sqrt(jnp.sum(weight[:, None] * (points - centre) ** 2, 0) / count) + 1e-6
  normalised = (points - centre) / spread
  cell = jnp.clip(jnp.floor((normalised + 1.5) / 3.0 * cells), 0, cells - 1).astype(jnp.int32)
  cell = cell[:, 0] * cells + cell[:, 1]
  basis = jnp.concatenate([jnp.ones_like(normalised[:, :1]), normalised], axis=1)   # (K, 3)

  def fitted_motion(index):
    inside = weight * (cell == index)
    normal = basis.T @ (inside[:, None] * basis) + 1e-4 * jnp.eye(3)
    coefficients = jnp.linalg.solve(normal, basis.T @ (inside[:, None] * difference))
    fitted = basis @ coefficients
    members = jnp.sum(inside)
    rms = jnp.sqrt(jnp.sum(inside * jnp.sum(fitted * fitted, -1)) / jnp.maximum(members, 1.0))
    return jnp.where(members >= 12, rms, 0.0)
  return jnp.max(jax.vmap(fitted_motion)(jnp.arange(cells * cells)))


def motion_weights(targets, reference_per_pixel: float, motion_scale):
  """(T, 2) factors of the temporal weights of the first and second difference starting at each
  frame: 1 / (1 + (m / motion_scale)^2), with m the coherent motion of the detected landmarks
  there (`_coherent_motion`, reference pixels: `reference_per_pixel` of them per crop pixel); 1
  where a frame involved has no face, and everywhere when `motion_scale` is 0."""
  valid = targets.valid
  # Frames before the first face and after the last one (padding included) are held at their
  # nearest tracked frame after the fit: a difference that reaches them would only drag the end
  # of the track towards values that are thrown away.
  span = (jax.lax.cummax(valid.astype(jnp.int32)) > 0) & (
      jax.lax.cummax(valid.astype(jnp.int32), reverse=True) > 0)
  first_span = span[1:] & span[:-1]
  second_span = span[2:] & span[1:-1] & span[:-2]
  points = targets.landmarks * reference_per_pixel
  seen = targets.is_detected & valid[:, None]
  on = motion_scale > 0

  def factor(anchor, difference, both):
    motion = jax.vmap(_coherent_motion)(anchor, difference, both)
    ratio = motion / jnp.where(on, motion_scale, 1.0)
    return jnp.where(on & (jnp.sum(both, -1) >= 6), 1.0 / (1.0 + ratio * ratio), 1.0)
  first = factor(points[:-1], points[1:] - points[:-1], seen[1:] & seen[:-1])
  second = factor(points[1:-1], points[2:] - 2.0 * points[1:-1] + points[:-2],
                  seen[2:] & seen[1:-1] & seen[:-2])
  first = jnp.where(first_span, first, 0.0)
  second = jnp.where(second_span, second, 0.0)
  first = jnp.concatenate([first, jnp.zeros(1)])
  second = jnp.concatenate([second, jnp.zeros(2)])
  return jnp.stack([first, second], axis=1).astype(jnp.float32)


def agreement_penalty(variables: FitVariables, overlap: int, weights: TemporalWeights):
  """Squared difference of neighbouring segments' values of the `overlap` frames they share
  (leaves (G, L, ...)), times the agreement weight."""
  if not overlap or variables.camera_rotation.shape[0] < 2:
    return 0.0
  total = 0.0
  for _, values, scale in per_frame_leaves(variables):
    gap = (values[:-1, -overlap:] - values[1:, :overlap]) * scale
    total = total + jnp.sum(gap * gap)
  return weights.agreement * total
