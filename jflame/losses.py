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


def landmark_error(predicted, detected, is_detected):
  """THE landmark error jflame reports (a measure, not a loss): the mean Euclidean distance in
  pixels between fitted and detected landmarks, over the fitted landmarks that were detected.

  Every detected landmark counts the same: region weights shape the fit, not its measure, so
  the error means the same whatever the weights. Divided by the face size it is
  `landmark_error_relative`.

  Args:
    predicted, detected: (K, 2) pixels.
    is_detected: (K,) bool (or 0/1), False for missing landmarks and padding.
  """
  counted = jnp.asarray(is_detected, predicted.dtype)
  distance = jnp.linalg.norm(predicted - detected, axis=-1)
  return jnp.sum(counted * distance) / jnp.maximum(jnp.sum(counted), 1.0)


def l2(values, weight):
  return weight * jnp.sum(values * values)


def photometric_loss(rendered, photo, mask, robust_scale):
  """Mean robust colour difference over the face mask.

  Args:
    rendered: (H, W, 3) render with premultiplied alpha (black where nothing is drawn, so mask
      pixels the mesh fails to cover cost as much as wrong colours and pull the mesh over them).
    photo: (H, W, 3) in [0, 1].
    mask: (H, W) in [0, 1], the face region (hair, background, eyes and mouth excluded).
    robust_scale: Charbonnier scale in colour units.
  """
  residual = rendered - photo
  penalty = charbonnier(jnp.sum(residual * residual, axis=-1), robust_scale)
  return jnp.sum(mask * penalty) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean_abs(rendered, photo, mask):
  """Mean absolute colour error over the mask, per channel (a report, not a loss)."""
  error = jnp.mean(jnp.abs(rendered - photo), axis=-1)
  return jnp.sum(mask * error) / jnp.maximum(jnp.sum(mask), 1.0)
