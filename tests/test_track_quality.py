"""A tracked clip's frames flagged as photos are (jflame.quality): no face, a large error, a cut
to another face, a pose that jumps; and the error plot leaves gaps where nothing was fitted."""

import numpy as np
from scipy.spatial.transform import Rotation

from jflame import quality, track_output

FRAMES = 30


def face(centre, size, seed):
  """(K, 2) landmarks spread over a square face of `size` pixels around `centre`."""
  rng = np.random.default_rng(seed)
  return np.asarray(centre) + size * (rng.random((60, 2)) - 0.5)


def test_clip_flags_no_face_large_errors_a_cut_to_another_face_and_a_pose_jump():
  detected = np.stack([face([100 + t, 100], 80, 0) for t in range(FRAMES)])
  detected[20:] = np.stack([face([300 + t, 140], 60, 1) for t in range(10)])   # a cut at 20
  error = np.full(FRAMES, 0.015)
  error[20:] = 0.035            # the clip's one identity fits the other face worse
  error[5] = 0.08               # one bad frame
  tracked = np.ones(FRAMES, bool)
  tracked[10] = False           # no face
  error[10] = np.nan
  rotation = np.tile(Rotation.from_euler("y", 5, degrees=True).as_rotvec(), (FRAMES, 1))
  rotation[14] = Rotation.from_euler("y", 70, degrees=True).as_rotvec()  # the fit jumped
  assert quality.clip_cuts(detected, tracked) == [20]
  suspect, reasons = quality.clip_frame_quality(error, tracked, detected, rotation)
  flagged = set(np.flatnonzero(suspect))
  assert flagged == {5, 10, 14, 15} | set(range(20, FRAMES)), sorted(flagged)
  assert "8.0% of face size" in reasons[5]
  assert "no face" in reasons[10]
  assert "pose jumped 65 degrees from frame 13" in reasons[14]
  assert "from frame 14" in reasons[15]       # and back
  assert "a cut" in reasons[20] and "another person" in reasons[25]
  assert reasons[0] == "" and not suspect[0]


def test_a_cut_to_the_same_face_flags_only_the_cut():
  detected = np.stack([face([100, 100], 80, 0)] * 10 + [face([300, 100], 80, 0)] * 10)
  error = np.full(20, 0.015)
  suspect, reasons = quality.clip_frame_quality(error, np.ones(20, bool), detected,
                                                np.zeros((20, 3)))
  assert list(np.flatnonzero(suspect)) == [10] and "a cut" in reasons[10]


def _plot_inputs():
  times = np.arange(FRAMES) / 25.0
  tracked = np.ones(FRAMES, bool)
  tracked[10:13] = False
  error = np.where(tracked, 1.0 + np.arange(FRAMES) / 10.0, np.nan)
  status = track_output.frame_statuses(tracked)
  suspect = ~tracked
  suspect[20] = True   # a fitted frame flagged, e.g. a large error
  return (times, status, np.zeros((FRAMES, 3)), np.zeros((FRAMES, 3)), np.zeros((FRAMES, 3)),
          np.zeros((FRAMES, 5)), error, suspect)


def test_error_plot_leaves_a_gap_where_no_face_was_fitted():
  times, status, *_, error, _ = inputs = _plot_inputs()
  tracked = status == track_output.STATUS_TRACKED
  figure = track_output.track_figure(*inputs)
  line = np.asarray(figure.axes[-1].lines[0].get_ydata(), float)
  title = figure.axes[-1].get_title()
  assert np.all(np.isnan(line[10:13])) and np.all(np.isfinite(line[tracked]))
  fitted = error[tracked]
  assert f"p90 {np.percentile(fitted, 90):.2f} px" in title, title
  assert f"max {fitted.max():.2f} px" in title, title
  # The suspect frames are marked where there is an error to mark (not without a face).
  marks = figure.axes[-1].lines[1]
  assert marks.get_label() == "suspect"
  np.testing.assert_array_equal(marks.get_xdata(), times[[20]])
  assert len(figure.axes) == 5 and all(np.array_equal(axis.lines[0].get_xdata(), times)
                                       for axis in figure.axes)


PLOT_KEEPS_THE_BACKEND = """
import sys
import matplotlib
matplotlib.use("template")
from matplotlib import pyplot
from tests.test_track_quality import _plot_inputs
from jflame import track_output
track_output.plot_track(sys.argv[1], *_plot_inputs())
print(matplotlib.get_backend(), len(pyplot.get_fignums()))
"""


def test_writing_the_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
  """A library caller with its own backend keeps it (and no figure is left in pyplot's list);
  the PNG is written all the same, a picture, not a blank."""
  import subprocess
  import sys
  import cv2
  from tests.conftest import PROJECT_ROOT
  path = tmp_path / "track.png"
  done = subprocess.run([sys.executable, "-c", PLOT_KEEPS_THE_BACKEND, str(path)],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["template", "0"], done.stdout
  plot = cv2.imread(str(path))
  assert plot.shape == (990, 900, 3) and plot.std() > 5, plot.shape
