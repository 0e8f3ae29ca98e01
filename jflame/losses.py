"""Loss terms for ONE image. Each returns a scalar; the fit sums them."""

import jax.numpy as jnp


def charbonnier(squared_norm, scale):
  """Robust penalty of a residual given its squared norm: ~ r^2 / 2 for r << scale, ~ scale * r
  for r >> scale. Smooth everywhere, including at zero."""
  return scale * scale * (jnp.sqrt(1.0 + squared_norm / (scale * scale)) - 1.0)


def landmark_loss(predicted, target, weights, crop_size, reference_size, robust_scale):
  """Weighted mean robust 2D landmark error.

  Args:
    predicted, target: (K, 2) pixel coordinates in a crop of `crop_size` pixels.
    weights: (K,) >= 0; zero ignores a landmark (missing or padding).
    reference_size: residuals are rescaled to pixels of a crop this size.
    robust_scale: Charbonnier scale in those pixels.
  """
  residual = (predicted - target) * (reference_size / crop_size)
  penalty = charbonnier(jnp.sum(residual * residual, axis=-1), robust_scale)
  return jnp.sum(weights * penalty) / jnp.maximum(jnp.sum(weights), 1e-6)


def mean_landmark_distance(predicted, target, weights):
  """Weighted mean Euclidean distance in pixels (a report, not a loss)."""
  distance = jnp.linalg.norm(predicted - target, axis=-1)
  return jnp.sum(weights * distance) / jnp.maximum(jnp.sum(weights), 1e-6)


def l2(values, weight):
  return weight * jnp.sum(values * values)
