"""The synthetic head's deformation bases: named and random identity fields, localised
expression fields, orthonormalised and scaled like a PCA basis, and smooth pose correctives."""

import dataclasses

import numpy as np

from jflame.synthetic.geometry import normalise, sigmoid, smoothstep
from jflame.synthetic.head import (EAR_CENTRE, HEAD_CENTRE, LEFT_IRIS, MIRROR, NECK_AXIS_Z,
                                   NECK_BOTTOM, RIGHT_IRIS)


def _bump(q, centre, radius):
  return np.exp(-np.sum((q - centre) ** 2, axis=-1) / (2.0 * radius ** 2))[:, None]


def _pair(q, centre, radius, direction):
  """A mirror-symmetric pair of bumps moving along `direction` and its mirror image."""
  direction = np.asarray(direction, np.float64)
  return (_bump(q, centre, radius) * direction
          + _bump(q, centre * MIRROR, radius) * (direction * MIRROR))


@dataclasses.dataclass
class FieldContext:
  """What the deformation fields are evaluated on."""
  q: np.ndarray            # (V, 3) evaluation points (eyeball vertices: their eye's centre)
  normals: np.ndarray      # (V, 3) outward vertex normals
  jaw: np.ndarray          # (V,) jaw share (0 upper face, 1 lower lip and chin)
  upper_lid: np.ndarray    # (V,) 1 above the eye's midline, 0 below
  is_eyeball: np.ndarray   # (V,) bool
  landmarks: np.ndarray    # (478, 3) reference points


def _identity_named(context):
  """Named identity deformations, from the coarsest to the finest."""
  q = context.q
  lm = context.landmarks
  side = np.tanh(q[:, :1] / 0.01)
  lower_front = sigmoid((-q[:, 1:2] - 0.02) / 0.01) * sigmoid((q[:, 2:3] + 0.05) / 0.015)
  return [
      q - HEAD_CENTRE,                                                       # overall size
      (q - HEAD_CENTRE) * np.array([1.0, 0.0, 0.0]),                         # head width
      (q - HEAD_CENTRE) * np.array([0.0, 1.0, 0.0]),                         # head height
      (q - HEAD_CENTRE) * np.array([0.0, 0.0, 1.0])                          # face depth
      * sigmoid((q[:, 2:3] + 0.03) / 0.02),
      lower_front * np.stack([0 * q[:, 0], q[:, 1], 0 * q[:, 0]], 1),        # face length
      _bump(q, lm[4], 0.016) * np.array([0.0, -0.2, 1.0]),                   # nose projection
      _bump(q, lm[2], 0.014) * (q - lm[2]) * np.array([3.0, 0.0, 0.0]),      # nose width
      _bump(q, lm[152], 0.022) * np.array([0.0, -0.4, 1.0]),                 # chin
      _pair(q, lm[172] * np.array([1.0, 0.8, 1.0]), 0.025, [1.0, 0.0, 0.2]),  # jaw width
      _pair(q, lm[50], 0.02, [0.6, 0.2, 0.6]),                               # cheekbones
      _pair(q, lm[105], 0.016, [0.0, 0.1, 1.0]),                             # brow ridge
      _pair(q, lm[473], 0.018, [1.0, 0.0, 0.0]),                             # eye spacing
      _bump(q, 0.5 * (lm[61] + lm[291]), 0.02) * (q - lm[0])                 # mouth width
      * np.array([2.0, 0.0, 0.0]),
      _bump(q, lm[10], 0.03) * np.array([0.0, 0.3, -1.0]),                   # forehead slope
      _bump(q, 0.5 * (lm[0] + lm[17]), 0.013) * np.array([0.0, 0.0, 1.0]),   # lip fullness
      _bump(q, HEAD_CENTRE + np.array([0.0, 0.02, -0.1]), 0.05)              # occiput
      * np.array([0.0, 0.0, -1.0]),
      sigmoid((-q[:, 1:2] - 0.13) / 0.015) * (q - np.array([0.0, 0.0, NECK_AXIS_Z]))
      * np.array([1.0, 0.0, 1.0]),                                           # neck thickness
      _bump(q, lm[1], 0.045) * np.array([0.0, 0.0, 1.0]),                    # face flatness
      _bump(q, HEAD_CENTRE + np.array([0.0, 0.12, 0.0]), 0.05)               # crown height
      * np.array([0.0, 1.0, 0.0]),
      _pair(q, EAR_CENTRE, 0.025, [1.0, 0.0, 0.0]),                          # ears
      _bump(q, lm[168], 0.012) * np.array([0.0, 0.0, 1.0]),                  # nose bridge
      _bump(q, lm[1], 0.08) * side * np.array([0.0, 1.0, 0.0]),              # asymmetry
  ]


def _plane_waves(rng, wavelength, waves=6):
  """A smooth random vector field (a function of points): a few random plane waves."""
  directions = normalise(rng.normal(size=(waves, 3))) * (2.0 * np.pi / wavelength)
  phases = rng.uniform(0.0, 2.0 * np.pi, waves)
  amplitudes = rng.normal(size=(waves, 3))
  return lambda points: np.sin(points @ directions.T + phases) @ amplitudes


def _random_smooth_fields(q, rng, wavelengths, symmetric, waves=4):
  """(C, V, 3) fields of plane waves, each made mirror-symmetric (or antisymmetric) about
  x = 0 as `symmetric` (C,) says; one batch of waves per field, evaluated all at once."""
  wavelengths = np.asarray(wavelengths, np.float64)
  count = len(wavelengths)
  directions = normalise(rng.normal(size=(count, waves, 3)))
  directions *= (2.0 * np.pi / wavelengths)[:, None, None]
  phases = rng.uniform(0.0, 2.0 * np.pi, (count, waves))
  amplitudes = rng.normal(size=(count, waves, 3))

  def evaluate(points):
    angles = points @ directions.reshape(-1, 3).T + phases.reshape(-1)
    waves_per_field = np.sin(angles).reshape(len(points), count, waves).transpose(1, 0, 2)
    return waves_per_field @ amplitudes

  sign = np.where(np.asarray(symmetric), 1.0, -1.0)[:, None, None]
  return 0.5 * (evaluate(q) + sign * evaluate(q * MIRROR) * MIRROR)


def identity_fields(context, rng, count):
  """Named fields, then smooth random fields of ever shorter wavelength (most symmetric)."""
  fields = _identity_named(context)[:count]
  extra = count - len(fields)
  if extra > 0:
    wavelengths = 0.25 * (1.0 + np.arange(extra) / 8.0) ** -0.6
    symmetric = rng.uniform(size=extra) < 0.75
    fields.extend(_random_smooth_fields(context.q, rng, wavelengths, symmetric))
  return fields


def _expression_named(context):
  """Named expression deformations: lips, mouth corners, brows, lids, cheeks, nose."""
  q = context.q
  lm = context.landmarks
  upper, lower = 1.0 - context.jaw[:, None], context.jaw[:, None]
  lid_up, lid_down = context.upper_lid[:, None], 1.0 - context.upper_lid[:, None]
  mouth = 0.5 * (lm[13] + lm[14])
  return [
      # Lips apart (narrower than the mouth, so the corners, where the lips meet, stay put).
      _bump(q * [1.6, 1.0, 1.0], mouth * [1.6, 1.0, 1.0], 0.022)
      * (upper * np.array([0.0, 1.0, 0.0]) - lower * np.array([0.0, 1.0, 0.2])),
      _pair(q, lm[291], 0.014, [0.4, 0.8, -0.4])                             # smile
      + _pair(q, lm[425], 0.015, [0.0, 0.5, 0.3]),
      _bump(q, mouth, 0.018) * ((q - mouth) * np.array([-25.0, 0.0, 0.0])     # pucker
                                + np.array([0.0, 0.0, 0.6])),
      _bump(q, lm[0], 0.012) * upper * np.array([0.0, 1.0, 0.3]),            # upper lip raise
      _bump(q, lm[17], 0.012) * lower * np.array([0.0, -1.0, 0.2]),          # lower lip depress
      _pair(q, lm[334], 0.02, [0.0, 1.0, 0.1]),                              # brows raise
      _pair(q, lm[336], 0.012, [-0.5, -0.7, 0.1]),                           # brows furrow
      _pair(q, lm[386], 0.009, [0.0, -1.0, 0.25]) * lid_up,                  # blink
      _pair(q, lm[374], 0.008, [0.0, -1.0, 0.0]) * lid_down
      + _pair(q, lm[386], 0.008, [0.0, 1.0, 0.0]) * lid_up,                  # eyes wide
      _pair(q, lm[425] + np.array([0.005, -0.02, -0.01]), 0.018, [0.8, 0.0, 0.6]),  # cheek puff
      _bump(q, lm[6], 0.01) * np.array([0.0, 0.6, 0.0])                      # nose wrinkle
      + _pair(q, lm[327], 0.008, [0.0, 1.0, 0.0]),
      _bump(q, mouth, 0.02) * np.array([1.0, 0.0, 0.0]),                     # mouth sideways
      _bump(q, lm[291], 0.014) * np.array([0.3, 0.8, -0.4]),                 # left smile
      _bump(q, lm[386], 0.009) * lid_up * np.array([0.0, -1.0, 0.25]),       # left blink
      _bump(q, mouth, 0.01) * np.array([0.0, 0.0, -1.0]),                    # lips roll in
      _bump(q, lm[152] + np.array([0.0, 0.012, 0.0]), 0.014)                 # chin raise
      * np.array([0.0, 1.0, 0.3]),
      _pair(q, lm[327], 0.007, [1.0, 0.0, 0.0]),                             # nostrils flare
      _pair(q, lm[336], 0.012, [0.0, 1.0, 0.0]),                             # brows inner raise
      _pair(q, lm[374], 0.008, [0.0, 1.0, 0.1]) * lid_down,                  # squint
      _bump(q, lm[334], 0.02) * np.array([0.0, 1.0, 0.1]),                   # left brow raise
  ]


def expression_fields(context, rng, count):
  """Named fields, then random localised ones (single or mirrored pairs) around face landmarks.
  Eyeballs never deform: they only follow their eye joint."""
  fields = _expression_named(context)[:count]
  q = context.q
  face_points = context.landmarks[:468]
  mouth = 0.5 * (context.landmarks[13] + context.landmarks[14])
  lip_factors = [np.ones_like(context.jaw), 1.0 - context.jaw, context.jaw]
  while len(fields) < count:
    centre = face_points[rng.integers(len(face_points))]
    radius = rng.uniform(0.008, 0.02)
    waves = _plane_waves(rng, 0.08)
    offset = rng.normal(size=3)
    field = _bump(q, centre, radius) * (waves(q) + offset)
    if rng.uniform() < 0.5:  # a mirror-symmetric pair
      field = field + _bump(q, centre * MIRROR, radius) * (waves(q * MIRROR) + offset) * MIRROR
    if np.linalg.norm(centre - mouth) < 0.03:
      # Near the mouth a field moves the upper lip, the lower lip, or both.
      field = field * lip_factors[rng.integers(3)][:, None]
    fields.append(field)
  return [np.where(context.is_eyeball[:, None], 0.0, f) for f in fields]


def orthonormal_basis(fields, rms, context):
  """Gram-Schmidt (QR) in the given order, then column k scaled to `rms[k]` per vertex.

  Eyeball vertices keep the rigid motion of their eye centre for identity and no expression,
  which the fields already encode through `context.q`.
  """
  matrix = np.stack([f.reshape(-1) for f in fields], axis=1)
  matrix /= np.linalg.norm(matrix, axis=0)
  # Cholesky QR: A = Q L^T with L lower triangular and a positive diagonal, so column k of Q is
  # field k minus its projection on the earlier fields and keeps the field's sense. Several
  # times faster than Householder QR for this tall, thin matrix, and accurate to about
  # cond(A)^2 * eps, which is ~1e-12 here: the fields are far from dependent (cond(A) < 100).
  lower = np.linalg.cholesky(matrix.T @ matrix)
  basis = matrix @ np.linalg.inv(lower).T
  num_vertices = context.q.shape[0]
  basis = basis * (np.asarray(rms) * np.sqrt(num_vertices))
  return basis.reshape(num_vertices, 3, len(fields))


def _compact_bump(q, centre, radius):
  """(1 - d^2 / r^2)^3 inside the radius, exactly 0 outside."""
  t = np.clip(1.0 - np.sum((q - centre) ** 2, axis=-1) / radius ** 2, 0.0, 1.0)
  return t ** 3


def pose_correctives(context, rng):
  """(V, 3, 36) posedirs over (R_j - I) of neck, jaw, left eye, right eye (row-major)."""
  q, normals = context.q, context.normals
  skin = (~context.is_eyeball).astype(np.float64)
  posedirs = np.zeros(q.shape + (36,))

  def column(joint, row, col):
    return 9 * (joint - 1) + 3 * row + col

  # For a rotation by a small angle t about x, R[2, 1] = sin t and R[1, 2] = -sin t, so a
  # corrective split evenly over the two entries responds to the pitch only.
  def on_pitch(joint, field):
    posedirs[:, :, column(joint, 2, 1)] += 0.5 * field
    posedirs[:, :, column(joint, 1, 2)] -= 0.5 * field

  # Neck: pitching the head forward bulges the front of the neck and flattens the back.
  # (Zero at the neck's base ring, which is bound to the global joint and stays put.)
  neck_window = (np.exp(-((q[:, 1] + 0.14) / 0.035) ** 2) * skin
                 * smoothstep(q[:, 1], NECK_BOTTOM, NECK_BOTTOM + 0.045))
  front = np.tanh((q[:, 2] - NECK_AXIS_Z) / 0.02)
  on_pitch(1, 0.02 * (neck_window * front)[:, None] * normals)
  # Jaw: the cheeks draw in as the jaw opens (only where the skin stretches, 0 < share < 1).
  jaw_window = 4.0 * context.jaw * (1.0 - context.jaw) * skin
  on_pitch(2, -0.008 * jaw_window[:, None] * normals)
  # Small smooth corrections on every neck and jaw entry, so the whole path is exercised.
  for joint, window, amplitude in ((1, neck_window, 0.003), (2, jaw_window, 0.002)):
    for entry in range(9):
      field = _random_smooth_fields(q, rng, [0.1], [True])[0]
      field *= amplitude / np.max(np.abs(field))
      posedirs[:, :, 9 * (joint - 1) + entry] += window[:, None] * field
  # Eyes: the lids follow the gaze up and down (a positive pitch turns the gaze down).
  for joint, iris_centre in ((3, LEFT_IRIS[0]), (4, RIGHT_IRIS[0])):
    near = _compact_bump(q, context.landmarks[iris_centre], 0.02) * skin
    drop = near * (0.0072 * context.upper_lid + 0.003 * (1.0 - context.upper_lid))
    on_pitch(joint, -drop[:, None] * np.array([0.0, 1.0, 0.0]))
  return posedirs
