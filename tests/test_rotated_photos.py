"""Faces at any in-plane rotation: fitted as well as upright, or `suspect`; never `ok` and wrong.

Real photos turned by quarter turns and by +-30 / +-60 degrees go through the engine in one
landmark-mode batch beside the upright photos; each turned fit is checked against the upright
photo's fit through the known turn (landmarks, head rotation, jaw), not by its own error only:
a scrambled face mesh (eyes on the mouth) is fitted with a small error.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import engine, model_loading, quality
from jflame.camera import apply_affine, invert_affine
from jflame.config import FitConfig
from jflame.output import face_size
from jflame.preprocess.align import warp_affine
from tests.conftest import shared_photos

TURNS_DEGREES = (90, 180, 270, 30, -30, 60, -60)
PHOTOS = 2


def _turned(image, degrees):
  """The photo turned counter-clockwise on screen about its centre, and the (2, 3) map of its
  pixels (centres at +0.5) into the turned photo."""
  height, width = image.shape[:2]
  angle = -np.deg2rad(degrees)       # image axes (y down): counter-clockwise is negative
  linear = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  center = np.array([width / 2.0, height / 2.0])
  turned_from_photo = np.concatenate([linear, (center - linear @ center)[:, None]], axis=1)
  return warp_affine(image, turned_from_photo, width), turned_from_photo


@pytest.fixture(scope="module")
def turned_run(tmp_path_factory):
  photos = shared_photos()[:PHOTOS]
  folder = tmp_path_factory.mktemp("turned")
  maps = {}
  for path in photos:
    photo = cv2.imread(str(path))
    cv2.imwrite(str(folder / f"{path.stem}.png"), photo)
    for degrees in TURNS_DEGREES:
      turned, turned_from_photo = _turned(photo, degrees)
      name = f"{path.stem}_turned{degrees:+d}"
      cv2.imwrite(str(folder / f"{name}.png"), turned)
      maps[name] = (path.stem, turned_from_photo)
  options = engine.EngineOptions(batch_size=16, landmarks_only=True)
  fitted = engine.fit_images([folder], model_loading.load_model(None, None), FitConfig(), options)
  return {Path(image.entry["source"]).stem: image for image in fitted}, maps


def _head(arrays):
  return Rotation.from_rotvec(np.asarray(arrays["original_camera_rotation"], np.float64))


def test_turned_faces_fit_like_upright_or_are_suspect(turned_run):
  images, maps = turned_run
  assert len(maps) == PHOTOS * len(TURNS_DEGREES)
  for name, (upright_name, turned_from_photo) in maps.items():
    upright, turned = images[upright_name], images[name]
    assert upright.ok and not upright.entry["suspect"], upright.entry
    assert turned.ok, turned.entry
    if turned.entry["suspect"]:
      continue
    reference, arrays = upright.arrays, turned.arrays
    # Within 1.2x of the upright photo's landmark error...
    assert (arrays["landmark_error_relative"] <= 1.2 * reference["landmark_error_relative"]), (
        name, arrays["landmark_error_relative"], reference["landmark_error_relative"])
    # ...and the same face: fitted landmarks turned back onto the upright photo's,
    size = face_size(reference["landmarks_detected_original"])
    back = apply_affine(invert_affine(turned_from_photo),
                        np.asarray(arrays["landmarks_fitted_original"], np.float64))
    offset = np.median(np.linalg.norm(back - reference["landmarks_fitted_original"], axis=1))
    assert offset < 0.03 * size, (name, offset / size)
    # the head turned with the photo (a turn of the photo is a roll of the camera),
    roll = np.eye(3)
    roll[:2, :2] = turned_from_photo[:, :2]
    expected = Rotation.from_matrix(roll) * _head(reference)
    assert np.degrees((expected.inv() * _head(arrays)).magnitude()) < 10.0, name
    # and the same jaw.
    assert np.linalg.norm(arrays["jaw_rotation"] - reference["jaw_rotation"]) < 0.1, name


def test_upside_down_faces_are_found_the_right_way_up(turned_run):
  images, maps = turned_run
  for name, (upright_name, _) in maps.items():
    record = images[name].record
    degrees = int(name.rsplit("turned", 1)[1])
    if degrees in (90, 180, 270):
      # A photo turned counter-clockwise by d degrees: its window is set upright by d / 90
      # clockwise quarter turns, which are 4 - d / 90 counter-clockwise ones.
      assert record.upright_turns == (4 - degrees // 90) % 4, (name, record.upright_scores)
    assert record.upright_score >= quality.MIN_UPRIGHT_SCORE, (name, record.upright_scores)


def test_suspect_rules_name_what_preprocessing_saw():
  clean = quality.fit_quality(0.01, np.zeros(3), np.zeros(3), [1.0, 1.0],
                              upright_score=0.9, landmarks_outside=0.0)
  assert not clean.suspect and clean.suspect_reason == ""
  unclear = quality.fit_quality(0.01, np.zeros(3), np.zeros(3), [1.0, 1.0],
                                upright_score=0.7, landmarks_outside=0.0)
  assert unclear.suspect and unclear.suspect_reason.startswith("unclear face")
  assert "0.70" in unclear.suspect_reason
  cut = quality.fit_quality(0.01, np.zeros(3), np.zeros(3), [1.0, 1.0], upright_score=0.9,
                            landmarks_outside=0.4)
  assert cut.suspect and cut.suspect_reason.startswith("face cut by the frame: 40%")
  # Without what preprocessing saw (a video frame, an older caller) only the fit's own rules.
  assert not quality.fit_quality(0.01, np.zeros(3), np.zeros(3), [1.0, 1.0]).suspect
