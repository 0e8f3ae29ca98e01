"""How far to trust a fit: measures computed for every fitted image and a `suspect` flag with its
reason, so a user can drop bad fits from a million rows with one filter (host side, NumPy).

* landmark error relative to the face size (`losses.landmark_error` / `output.face_size`);
* prior scores: the root-mean-square of the shape and of the expression coefficients. FLAME's
  coefficients are in units of their standard deviation, so this says how many standard
  deviations the face is from the model's mean (a typical face sits well below 1);
* convergence: the relative decrease of the last stage's loss over its last tenth of iterations
  (its last step for the few steps of the Levenberg-Marquardt stage): near 0 when the
  optimisation has settled; a large value means more iterations would still move the fit.

Two more rules look at what preprocessing saw, because a wrong face mesh is fitted well and
its fit's measures look fine (`tools/eval_hard_cases.py` measures them, docs/ACCURACY.md):

* the face detector's confidence in the upright analysis window
  (`PreparedImage.upright_scores` at the turn fitted): low for a half-hidden face, whose mesh
  then invents the hidden half (a jaw open or shut at will), and for a face fitted the wrong
  way up;
* the share of the fitted landmarks outside the photo: a face cut by the frame.
"""

import dataclasses
from typing import Optional

import numpy as np

# Limits of a trustworthy fit; a fit past any of them is `suspect`, with the reason.
MAX_RELATIVE_LANDMARK_ERROR = 0.05
MAX_PRIOR_SIGMA = 3.0
MAX_FINAL_DECREASE = 0.05
# Detector score in the upright window. Measured on the shared photos and the astronaut
# (tools/eval_hard_cases.py): clean faces, upright, turned, tiny or beside another face, scored
# 0.79-0.97; faces half under a grey block 0.72-0.85, the two of them fitted wrong (a jaw 0.2 rad
# off) 0.74 and 0.76; faces cut in half by the frame 0.57-0.66.
MIN_UPRIGHT_SCORE = 0.78
# Share of the fitted landmarks outside the photo (a face cut by the frame).
MAX_LANDMARKS_OUTSIDE = 0.2


@dataclasses.dataclass(frozen=True)
class FitQuality:
  """Quality measures of one fit (see the module docstring)."""
  landmark_error_relative: float
  shape_prior_sigma: float
  expression_prior_sigma: float
  convergence: float
  suspect: bool
  suspect_reason: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def prior_sigma(coefficients) -> float:
  """Root-mean-square of coefficients in units of their standard deviation."""
  values = np.asarray(coefficients, np.float64)
  return float(np.sqrt(np.mean(values * values))) if values.size else 0.0


def final_decrease(loss_history) -> float:
  """Relative loss decrease over the last tenth of a stage's iterations, at least its last
  step (0 when it has settled, or with fewer than two iterations to compare)."""
  history = np.asarray(loss_history, np.float64)
  if history.size < 2 or not np.all(np.isfinite(history)):
    return 0.0
  start = history[-max(history.size // 10, 1) - 1]
  return float(max(start - history[-1], 0.0) / max(abs(history[-1]), 1e-12))


def fit_quality(landmark_error_relative: float, shape, expression, loss_history, *,
                upright_score: Optional[float] = None,
                landmarks_outside: Optional[float] = None) -> FitQuality:
  """The quality of one fit, with `suspect` and a human-readable reason.

  Args:
    landmark_error_relative, shape, expression, loss_history: of the fit (module docstring).
    upright_score: the face detector's score in the analysis window as fitted (`upright_score`
      of the record); None skips that rule (a source without it, e.g. a video track).
    landmarks_outside: the share of the fitted landmarks outside the photo; None skips it.
  """
  measures = FitQuality(
      landmark_error_relative=float(landmark_error_relative),
      shape_prior_sigma=prior_sigma(shape), expression_prior_sigma=prior_sigma(expression),
      convergence=final_decrease(loss_history), suspect=False, suspect_reason="")
  reasons = []
  if not measures.landmark_error_relative <= MAX_RELATIVE_LANDMARK_ERROR:
    reasons.append(f"landmark error {100 * measures.landmark_error_relative:.1f}% of face size "
                   f"> {100 * MAX_RELATIVE_LANDMARK_ERROR:.0f}%")
  for group in ("shape", "expression"):
    sigma = getattr(measures, f"{group}_prior_sigma")
    if not sigma <= MAX_PRIOR_SIGMA:
      reasons.append(f"{group} {sigma:.1f} sigma from the mean > {MAX_PRIOR_SIGMA:.0f}")
  if upright_score is not None and not upright_score >= MIN_UPRIGHT_SCORE:
    reasons.append(f"unclear face: detector confidence {upright_score:.2f} in its upright window "
                   f"< {MIN_UPRIGHT_SCORE:.2f} (half hidden, or turned the wrong way?)")
  if landmarks_outside is not None and not landmarks_outside <= MAX_LANDMARKS_OUTSIDE:
    reasons.append(f"face cut by the frame: {100 * landmarks_outside:.0f}% of the landmarks "
                   f"outside the photo > {100 * MAX_LANDMARKS_OUTSIDE:.0f}%")
  if not measures.convergence <= MAX_FINAL_DECREASE:
    reasons.append(f"not converged: loss still fell {100 * measures.convergence:.0f}% over the "
                   "last tenth of the iterations")
  return dataclasses.replace(measures, suspect=bool(reasons), suspect_reason="; ".join(reasons))


# Clips (jflame-track): rules over a clip's frames, added to the photo rules above. A cut shows
# in the detected landmarks themselves: from one frame to the next the face's centre moves by
# more than half its size or its size changes by more than a third (a fast real head turn at
# 25 frames/s moves it a fifth of its size).
MAX_CUT_CENTRE_SHIFT = 0.5
MAX_CUT_SIZE_CHANGE = 1.33
# A stretch after a cut whose median landmark error is this many times the rest of the clip's is
# most likely another person's face fitted with the clip's one identity.
MAX_STRETCH_ERROR_RATIO = 1.5
# A fitted head that turns more than this between two neighbouring tracked frames (the fit
# jumped, not the head: 400 degrees / s at 25 frames / s is 16 degrees).
MAX_POSE_JUMP_DEGREES = 45.0


def clip_cuts(detected, found) -> list:
  """Frames where a new shot starts: (T, K, 2) detected landmarks (any pixels), (T,) found.
  A frame is a cut when, against the previous frame with a face, the face's centre moved more
  than MAX_CUT_CENTRE_SHIFT face sizes or its size changed by more than MAX_CUT_SIZE_CHANGE."""
  cuts, previous = [], None
  for index in np.flatnonzero(np.asarray(found, bool)):
    points = np.asarray(detected[index], np.float64)
    centre = (points.min(axis=0) + points.max(axis=0)) / 2.0
    extent = np.maximum(np.ptp(points, axis=0), 1e-6)
    size = float(np.sqrt(extent[0] * extent[1]))
    if previous is not None:
      shift = np.linalg.norm(centre - previous[0]) / max(size, previous[1])
      change = max(size, previous[1]) / min(size, previous[1])
      if shift > MAX_CUT_CENTRE_SHIFT or change > MAX_CUT_SIZE_CHANGE:
        cuts.append(int(index))
    previous = (centre, size)
  return cuts


def _turn_degrees(rotation_a, rotation_b) -> float:
  """Angle in degrees between two rotations given as (3,) axis-angles."""
  from scipy.spatial.transform import Rotation
  turn = Rotation.from_rotvec(rotation_a).inv() * Rotation.from_rotvec(rotation_b)
  return float(np.degrees(np.linalg.norm(turn.as_rotvec())))


def clip_frame_quality(landmark_error_relative, tracked, detected, camera_rotation):
  """`suspect` (T,) and `suspect_reason` (T,) str of every frame of a tracked clip.

  Args:
    landmark_error_relative: (T,) relative landmark error (NaN where not tracked).
    tracked: (T,) frames with a face that were fitted.
    detected: (T, K, 2) detected landmarks (any pixels; ignored where not tracked).
    camera_rotation: (T, 3) fitted camera axis-angles.
  A frame is suspect when it was not fitted (no face: its values are interpolated or held),
  when its error passes the photos' limit, when a cut starts a stretch whose error is
  MAX_STRETCH_ERROR_RATIO times the rest of the clip's (another person's face), or when the fit
  turned more than MAX_POSE_JUMP_DEGREES since the previous tracked frame.
  """
  error = np.asarray(landmark_error_relative, np.float64)
  tracked = np.asarray(tracked, bool)
  frames = len(tracked)
  reasons = [[] for _ in range(frames)]
  for index in np.flatnonzero(~tracked):
    reasons[index].append("no face detected: values interpolated or held")
  for index in np.flatnonzero(tracked & ~(error <= MAX_RELATIVE_LANDMARK_ERROR)):
    reasons[index].append(f"landmark error {100 * error[index]:.1f}% of face size > "
                          f"{100 * MAX_RELATIVE_LANDMARK_ERROR:.0f}%")
  cuts = clip_cuts(detected, tracked)
  bounds = [0] + cuts + [frames]
  for start, stop in zip(bounds[:-1], bounds[1:]):
    inside = np.zeros(frames, bool)
    inside[start:stop] = True
    here, rest = error[inside & tracked], error[~inside & tracked]
    if start in cuts:
      reasons[start].append("a cut: the face jumped from the previous frame with a face")
    if len(cuts) and here.size and rest.size and (
        np.median(here) > MAX_STRETCH_ERROR_RATIO * np.median(rest)):
      for index in np.flatnonzero(inside & tracked):
        reasons[index].append(
            f"frames {start}-{stop - 1} (between cuts) fit the clip's face worse: median error "
            f"{100 * np.median(here):.1f}% against {100 * np.median(rest):.1f}% elsewhere "
            "(another person?)")
  rotation = np.asarray(camera_rotation, np.float64)
  with_face = np.flatnonzero(tracked)
  for before, after in zip(with_face[:-1], with_face[1:]):
    turn = _turn_degrees(rotation[before], rotation[after])
    if turn > MAX_POSE_JUMP_DEGREES:
      reasons[after].append(f"pose jumped {turn:.0f} degrees from frame {before} > "
                            f"{MAX_POSE_JUMP_DEGREES:.0f}")
  suspect = np.asarray([bool(r) for r in reasons])
  return suspect, np.asarray(["; ".join(r) for r in reasons], object)
