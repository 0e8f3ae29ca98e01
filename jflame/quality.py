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
