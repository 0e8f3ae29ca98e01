"""MediaPipe analysis and `prepare_image` on real photographs."""

import hashlib
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.ndimage
import skimage.data
from PIL import Image

from jflame.camera import apply_affine, invert_affine
from jflame.errors import ModelFileError
from jflame.preprocess import (STATUS_NO_FACE, STATUS_OK, STATUS_UNREADABLE, AnalyzerOptions,
                               FaceAnalyzer, Preprocessor, prepare_image, read_image,
                               stack_observations)
from jflame.preprocess import masks, pipeline
from jflame.preprocess.align import warp_affine

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "photos"
FFHQ_PHOTOS = sorted(PHOTOS.glob("*.png")) if PHOTOS.is_dir() else []


@pytest.fixture(scope="module")
def analyzer():
  with FaceAnalyzer() as face_analyzer:
    yield face_analyzer


@pytest.fixture(scope="module")
def astronaut():
  return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_record(analyzer, astronaut):
  return prepare_image(astronaut, analyzer, crop_size=256, name="astronaut")


def _inside_polygon(point, polygon):
  """Even-odd rule: does a ray to the right of `point` cross the polygon an odd number of times?"""
  x, y = point
  inside = False
  for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
    if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
      inside = not inside
  return inside


def _value_at(image, point):
  """Nearest-pixel value of an (H, W) image at a continuous point (centres at +0.5)."""
  return image[int(np.floor(point[1])), int(np.floor(point[0]))]


def test_astronaut_has_one_face_and_a_full_record(astronaut_record):
  record = astronaut_record
  assert record.status == STATUS_OK and record.message == ""
  assert record.num_faces == 1 and record.detection_score > 0.8
  assert (record.image_width, record.image_height) == (512, 512)
  assert record.crop.shape == (256, 256, 3) and record.crop.dtype == np.uint8
  assert record.landmarks.shape == (478, 2) and record.landmarks.dtype == np.float32
  assert record.landmarks_original.shape == (478, 2)
  assert record.landmarks_z.shape == (478,) and np.all(np.isfinite(record.landmarks_z))
  np.testing.assert_array_equal(record.landmark_weights, 1.0)
  for mask in (record.face_mask, record.foreground_mask):
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() <= 1
  # The nose tip is closer to the camera (smaller z) than the sides of the face.
  depth = record.landmarks_z
  assert depth[1] < depth[234] and depth[1] < depth[454]


def test_astronaut_landmarks_lie_in_the_detection_box(astronaut_record):
  box = astronaut_record.detection_box
  size = box[2] - box[0]
  landmarks = astronaut_record.landmarks_original
  loose_low, loose_high = box[:2] - 0.25 * size, box[2:] + 0.25 * size
  assert np.all((landmarks >= loose_low) & (landmarks <= loose_high))
  for index in (1, 13, 468, 473):   # nose tip, lips, irises: well inside
    assert np.all((landmarks[index] >= box[:2]) & (landmarks[index] <= box[2:]))


def test_astronaut_iris_centres_lie_in_their_eye_contours(astronaut_record):
  landmarks = astronaut_record.landmarks_original
  right_eye, left_eye = landmarks[list(masks.RIGHT_EYE)], landmarks[list(masks.LEFT_EYE)]
  assert _inside_polygon(landmarks[masks.RIGHT_IRIS_CENTER], right_eye)
  assert _inside_polygon(landmarks[masks.LEFT_IRIS_CENTER], left_eye)
  assert not _inside_polygon(landmarks[masks.RIGHT_IRIS_CENTER], left_eye)
  # The subject's left eye appears on the image's right.
  assert left_eye[:, 0].mean() > right_eye[:, 0].mean()


def test_crop_transform_round_trips_and_maps_the_landmarks(astronaut_record):
  record = astronaut_record
  original_from_crop = invert_affine(record.crop_from_original)
  round_trip = apply_affine(record.crop_from_original,
                            apply_affine(original_from_crop, record.landmarks.astype(np.float64)))
  assert np.abs(round_trip - record.landmarks).max() < 1e-3
  mapped = apply_affine(record.crop_from_original, record.landmarks_original)
  assert np.abs(mapped - record.landmarks).max() < 1e-3


def test_crop_pixels_sample_the_original_where_the_transform_says(astronaut_record, astronaut):
  record = astronaut_record
  rows, cols = np.mgrid[0:256, 0:256]
  centres = np.stack([cols + 0.5, rows + 0.5], axis=-1).reshape(-1, 2)
  source = apply_affine(invert_affine(record.crop_from_original), centres) - 0.5
  reference = np.stack([scipy.ndimage.map_coordinates(astronaut[..., c].astype(float),
                                                      [source[:, 1], source[:, 0]], order=1)
                        for c in range(3)], axis=-1).reshape(256, 256, 3)
  assert np.abs(record.crop - reference).mean() < 1.0


def test_crop_levels_the_eyes_and_centres_the_face(astronaut_record):
  landmarks = astronaut_record.landmarks
  right_eye = landmarks[list(masks.RIGHT_EYE)].mean(axis=0)
  left_eye = landmarks[list(masks.LEFT_EYE)].mean(axis=0)
  assert abs(right_eye[1] - left_eye[1]) < 1e-3
  low, high = landmarks[:468].min(axis=0), landmarks[:468].max(axis=0)
  np.testing.assert_allclose((low + high) / 2, [128, 128], atol=1e-3)
  assert abs(np.max(high - low) - 256 / 1.5) < 1e-3


def test_face_mask_covers_skin_but_not_eyes_or_open_mouth(astronaut_record):
  record = astronaut_record
  landmarks, face_mask = record.landmarks, record.face_mask
  for index in (1, 4, 50, 280, 205, 425, 151, 199):   # nose, cheeks, forehead, chin
    assert _value_at(face_mask, landmarks[index]) > 0.99, index
  for index in (masks.RIGHT_IRIS_CENTER, masks.LEFT_IRIS_CENTER):
    assert _value_at(face_mask, landmarks[index]) < 0.01, index
  upper_lip, lower_lip = landmarks[13], landmarks[14]
  assert np.linalg.norm(lower_lip - upper_lip) > 6   # the astronaut smiles with open lips
  assert _value_at(face_mask, (upper_lip + lower_lip) / 2) < 0.01
  assert face_mask[2, 2] == 0 and face_mask[-3, -3] == 0   # corners are background
  assert _value_at(record.foreground_mask, landmarks[1]) > 0.9
  assert record.foreground_mask[3, 3] < 0.5   # the wall behind her


def test_brows_mask_covers_the_eyebrows_and_nothing_else_of_the_face(astronaut_record):
  """The eyebrows a rig's photometric fit leaves out of its skin mask (hair the albedo space
  cannot draw): the middle of each brow covered, the eyes, the nose, the forehead between the
  brows and the cheeks not, a small part of the face."""
  record = astronaut_record
  landmarks = record.landmarks
  brows = masks.brows_mask(landmarks, record.crop_size)
  for upper, lower in ((105, 52), (334, 282)):          # each brow's upper and lower contour
    assert _value_at(brows, (landmarks[upper] + landmarks[lower]) / 2) > 0.9
  for index in (masks.RIGHT_IRIS_CENTER, masks.LEFT_IRIS_CENTER, 1, 151, 9, 205, 425):
    assert _value_at(brows, landmarks[index]) < 0.01, index
  assert 0.01 < brows.sum() / record.face_mask.sum() < 0.1     # measured 0.024
  skin = masks.face_region_mask(landmarks, record.crop_size, without_brows=True)
  assert _value_at(skin, (landmarks[105] + landmarks[52]) / 2) < 0.01       # left out there
  assert _value_at(skin, landmarks[151]) > 0.99 and _value_at(skin, landmarks[1]) > 0.99


def test_array_and_file_sources_give_the_same_record(analyzer, astronaut, astronaut_record,
                                                     tmp_path):
  path = tmp_path / "astronaut.png"
  Image.fromarray(astronaut).save(path)
  record = prepare_image(path, analyzer)
  assert record.name == "astronaut" and record.source == path
  np.testing.assert_array_equal(record.landmarks, astronaut_record.landmarks)
  np.testing.assert_array_equal(record.crop, astronaut_record.crop)


def test_rotated_photo_gives_rotated_landmarks_and_a_level_crop(analyzer, astronaut,
                                                                astronaut_record):
  angle = np.deg2rad(25.0)
  cos, sin = np.cos(angle), np.sin(angle)
  center = np.array([256.0, 256.0])
  rotation = np.array([[cos, -sin], [sin, cos]])
  rotated_from_original = np.concatenate([rotation, (center - rotation @ center)[:, None]], 1)
  rotated = warp_affine(astronaut, rotated_from_original, 512)
  record = prepare_image(rotated, analyzer)
  assert record.ok and record.num_faces == 1
  expected = apply_affine(rotated_from_original, astronaut_record.landmarks_original)
  errors = np.linalg.norm(record.landmarks_original - expected, axis=1)
  assert np.median(errors) < 2.0
  # Levelled: the crops of both photographs show the face the same way up.
  assert np.median(np.linalg.norm(record.landmarks - astronaut_record.landmarks, axis=1)) < 2.5


def test_no_eye_levelling_keeps_the_photo_axes(analyzer, astronaut):
  record = prepare_image(astronaut, analyzer, crop_size=128, level_eyes=False,
                         mask_with_foreground=True)
  assert record.ok and record.crop.shape == (128, 128, 3)
  assert record.crop_from_original[0, 1] == 0 and record.crop_from_original[1, 0] == 0
  assert np.all(record.face_mask <= record.foreground_mask + 1e-6)


def test_face_cut_by_the_image_border(analyzer, astronaut, astronaut_record):
  # Keep columns 215.. only: the subject's right cheek and eye are outside the photo.
  cut = np.ascontiguousarray(astronaut[:, 215:])
  record = prepare_image(cut, analyzer)
  assert record.ok
  outside = record.landmarks_original[:, 0] < 0
  assert outside.any() and not outside.all()
  np.testing.assert_array_equal(record.landmark_weights, (~outside).astype(np.float32))
  # The crop shows black and the face mask is zero left of the photo's edge.
  edge = apply_affine(record.crop_from_original, np.array([[0.0, 130.0], [0.0, 170.0]]))
  left_of_edge = (int(edge[:, 1].mean()), int(edge[:, 0].min()) - 3)
  assert record.face_mask[left_of_edge] == 0 and np.all(record.crop[left_of_edge] == 0)


def test_mediapipe_pixel_convention_is_corrected(analyzer, astronaut):
  """`face_landmarks` returns pixels with centres at +0.5 (see mediapipe_face's docstring):
  mirroring an image moves mean x to W - x, and halving it moves points to x / 2."""
  face = astronaut[20:276, 100:356]
  size = 96
  mirror_offsets, halving_offsets = [], []
  for shift in range(0, 16, 2):   # shifted copies average out the landmark model's noise
    shifted = np.roll(face, (shift, -shift), axis=(0, 1))
    large = cv2.resize(shifted, (2 * size, 2 * size), interpolation=cv2.INTER_AREA)
    small = cv2.resize(large, (size, size), interpolation=cv2.INTER_AREA)
    large_points = analyzer.face_landmarks(large)[0][:, :2]
    small_points = analyzer.face_landmarks(small)[0][:, :2]
    mirrored = analyzer.face_landmarks(np.ascontiguousarray(small[:, ::-1]))[0][:, :2]
    halving_offsets.append((small_points - large_points / 2).mean(axis=0))
    mirror_offsets.append(mirrored[:, 0].mean() - (size - small_points[:, 0].mean()))
  # Uncorrected, these would be -1.0 and -0.25.
  assert abs(np.mean(mirror_offsets)) < 0.5
  assert np.all(np.abs(np.mean(halving_offsets, axis=0)) < 0.15)


@pytest.mark.skipif(not FFHQ_PHOTOS, reason=f"FFHQ photos not found under {PHOTOS}")
@pytest.mark.parametrize("path", FFHQ_PHOTOS, ids=lambda path: path.stem)
def test_ffhq_photo_has_one_centred_face(analyzer, path):
  record = prepare_image(path, analyzer)
  assert record.ok and record.num_faces == 1, record.message
  assert (record.image_width, record.image_height) == (1024, 1024)
  landmarks = record.landmarks_original
  assert np.all((landmarks > 150) & (landmarks < 950))
  # FFHQ's alignment puts eye_centre + 0.1 * (mouth_centre - eye_centre) at the image centre,
  # with the eyes level.
  right_eye = landmarks[list(masks.RIGHT_EYE)].mean(axis=0)
  left_eye = landmarks[list(masks.LEFT_EYE)].mean(axis=0)
  eye_centre = (right_eye + left_eye) / 2
  mouth_centre = (landmarks[61] + landmarks[291]) / 2
  np.testing.assert_allclose(eye_centre + 0.1 * (mouth_centre - eye_centre), [512, 512], atol=16)
  eye_line = left_eye - right_eye
  assert abs(np.degrees(np.arctan2(eye_line[1], eye_line[0]))) < 5
  np.testing.assert_array_equal(record.landmark_weights, 1.0)


def test_unreadable_files_give_failed_records(analyzer, astronaut, tmp_path):
  good = tmp_path / "good.jpg"
  Image.fromarray(astronaut).save(good)
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(good.read_bytes()[:2000])
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  text = tmp_path / "text.jpg"
  text.write_text("hello")
  for path in (corrupt, empty, text, tmp_path / "missing.png"):
    record = prepare_image(path, analyzer)
    assert record.status == STATUS_UNREADABLE and not record.ok
    assert str(path) in record.message
    assert record.crop is None and record.name == path.stem
  record = prepare_image(np.zeros((10, 10, 3), np.float32), analyzer)
  assert record.status == STATUS_UNREADABLE and "dtype" in record.message


def test_images_without_a_face_give_no_face_records(analyzer):
  for image in (skimage.data.coffee(), np.full((240, 320, 3), 128, np.uint8)):
    record = prepare_image(image, analyzer)
    assert record.status == STATUS_NO_FACE and record.num_faces == 0
    assert "no face" in record.message and record.landmarks is None


@pytest.mark.parametrize("large_on_left", [False, True])
def test_group_photo_picks_the_largest_face(analyzer, astronaut, large_on_left):
  canvas = np.full((600, 1000, 3), 200, np.uint8)
  small = cv2.resize(astronaut, (384, 384), interpolation=cv2.INTER_AREA)
  large_x, small_x = (20, 590) if large_on_left else (470, 20)
  canvas[40:552, large_x:large_x + 512] = astronaut
  canvas[150:534, small_x:small_x + 384] = small
  record = prepare_image(canvas, analyzer)
  assert record.ok and record.num_faces == 2
  assert record.message == "2 faces; fitted the largest"
  nose = record.landmarks_original[1]
  assert large_x < nose[0] < large_x + 512
  box_width = record.detection_box[2] - record.detection_box[0]
  assert box_width > 90   # the large face's box is about 100 px wide, the small one's 75 px


def test_small_face_in_a_large_photo_is_found_by_the_tiled_search(analyzer, astronaut,
                                                                   astronaut_record):
  # A 140-pixel face in a 3000 x 2000 photo: under the whole-image detector's reach (checked
  # through the private single-pass method, so the test shows the tiles did the work).
  photo = np.full((2000, 3000, 3), 90, np.uint8)
  photo[600:1300, 1800:2500] = cv2.resize(astronaut, (700, 700), interpolation=cv2.INTER_AREA)
  assert not analyzer._detect(photo, short_range_fallback=True)
  record = prepare_image(photo, analyzer)
  assert record.ok and record.num_faces == 1
  expected_nose = np.array([1800.0, 600.0]) + astronaut_record.landmarks_original[1] * 700 / 512
  assert np.linalg.norm(record.landmarks_original[1] - expected_nose) < 4


def test_missing_or_invalid_task_model_raises_model_file_error(tmp_path):
  missing = tmp_path / "face_landmarker.task"
  with pytest.raises(ModelFileError, match="face_landmarker.task.*not found.*Download"):
    FaceAnalyzer(AnalyzerOptions(landmarker_task_path=str(missing)))
  bogus = tmp_path / "bogus.task"
  bogus.write_bytes(b"not a model")
  with pytest.raises(ModelFileError, match="could not load"):
    FaceAnalyzer(AnalyzerOptions(landmarker_task_path=str(bogus)))


def test_closed_analyzer_refuses_work(astronaut):
  face_analyzer = FaceAnalyzer()
  face_analyzer.close()
  face_analyzer.close()   # idempotent
  with pytest.raises(ValueError, match="closed"):
    face_analyzer.detect_faces(astronaut)


# Agreement of the fast landmark path (reduced JPEG decode, no segmentation or masks) with the
# full path (full-size decode, every step), in fractions of the face size (longer side of the
# mesh's box). Measured on the six FFHQ photos as 1024-pixel q90 JPEGs: mean distance <= 0.23%,
# largest <= 0.83%. Moving a photo by one pixel moves the landmarks as much (mean <= 0.33%,
# largest <= 0.88%): this is the face mesh's own noise, not a bias of the fast path.
FAST_PATH_MEAN_TOLERANCE = 0.004
FAST_PATH_MAX_TOLERANCE = 0.012


def _relative_landmark_distances(record, reference):
  """(mean, max) landmark distance between two records over the reference's face size."""
  points = reference.landmarks_original
  face_size = np.max(points[:468].max(axis=0) - points[:468].min(axis=0))
  distances = np.linalg.norm(record.landmarks_original - points, axis=1)
  return distances.mean() / face_size, distances.max() / face_size


def _fast_and_full_records(analyzer, pixels, path, monkeypatch):
  """The landmarks_only record of `pixels` saved as a q90 JPEG, the reductions it was decoded
  at, and the full record of the same JPEG decoded at full size."""
  Image.fromarray(pixels).save(path, quality=90)
  reductions = []
  decode_image = pipeline.decode_image

  def spying_decode(*args, **kwargs):
    decoded = decode_image(*args, **kwargs)
    reductions.append(decoded.reduction)
    return decoded

  with monkeypatch.context() as patch:
    patch.setattr(pipeline, "decode_image", spying_decode)
    fast = prepare_image(path, analyzer, landmarks_only=True)
  return fast, reductions, prepare_image(read_image(path), analyzer)


@pytest.mark.skipif(not FFHQ_PHOTOS, reason=f"FFHQ photos not found under {PHOTOS}")
@pytest.mark.parametrize("photo", FFHQ_PHOTOS, ids=lambda path: path.stem)
def test_landmark_path_agrees_with_the_full_path_on_real_photos(analyzer, photo, tmp_path,
                                                                monkeypatch):
  fast, reductions, full = _fast_and_full_records(
      analyzer, read_image(photo), tmp_path / f"{photo.stem}.jpg", monkeypatch)
  assert fast.ok and full.ok and fast.num_faces == full.num_faces == 1
  # The faces are large: detection, window and crop all come from one half-size decode.
  assert reductions == [2]
  mean, largest = _relative_landmark_distances(fast, full)
  assert mean < FAST_PATH_MEAN_TOLERANCE and largest < FAST_PATH_MAX_TOLERANCE, (mean, largest)
  assert fast.face_mask is None and fast.foreground_mask is None
  assert fast.crop.shape == full.crop.shape and fast.crop.dtype == np.uint8
  np.testing.assert_array_equal(fast.landmark_weights, full.landmark_weights)


def test_landmark_path_decodes_again_where_the_face_needs_it(analyzer, astronaut, tmp_path,
                                                             monkeypatch):
  # A 1024-pixel photo whose face is too small for a half-size window: detection runs on the
  # half-size decode, the window and the crop on a full-size one.
  large = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
  fast, reductions, full = _fast_and_full_records(analyzer, large, tmp_path / "large.jpg",
                                                  monkeypatch)
  assert fast.ok and reductions == [2, 1]
  mean, largest = _relative_landmark_distances(fast, full)
  assert mean < FAST_PATH_MEAN_TOLERANCE and largest < FAST_PATH_MAX_TOLERANCE, (mean, largest)


def test_landmarks_only_skips_the_masks_and_keeps_the_rest(analyzer, astronaut, astronaut_record):
  record = prepare_image(astronaut, analyzer, crop_size=256, landmarks_only=True)
  assert record.ok and record.face_mask is None and record.foreground_mask is None
  for field in ("landmarks", "landmarks_original", "landmarks_z", "landmark_weights", "crop",
                "crop_from_original", "detection_box"):
    np.testing.assert_array_equal(getattr(record, field), getattr(astronaut_record, field))
  observation = stack_observations([record, astronaut_record], 2, 256)
  assert not observation.face_mask[0].any() and observation.face_mask[1].any()
  np.testing.assert_array_equal(observation.landmarks[0], observation.landmarks[1])
  with Preprocessor(256, landmarks_only=True) as preprocessor:
    [again] = preprocessor.prepare([astronaut])
  assert again.ok and again.face_mask is None
  np.testing.assert_array_equal(again.landmarks, record.landmarks)


def test_file_records_say_which_bytes_were_read(analyzer, astronaut, astronaut_record, tmp_path):
  path = tmp_path / "astronaut.jpg"
  Image.fromarray(astronaut).save(path, quality=90)
  record = prepare_image(path, analyzer, landmarks_only=True)
  data = path.read_bytes()
  assert record.ok and record.source_size == len(data)
  assert record.source_mtime_ns == path.stat().st_mtime_ns
  assert record.source_hash == hashlib.sha256(data).hexdigest()
  # Unreadable bytes are still recorded; a missing file and an array have none.
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(data[:1000])
  record = prepare_image(corrupt, analyzer)
  assert record.status == STATUS_UNREADABLE and record.source_size == 1000
  assert record.source_hash == hashlib.sha256(data[:1000]).hexdigest()
  record = prepare_image(tmp_path / "missing.jpg", analyzer)
  assert record.status == STATUS_UNREADABLE and record.source_hash is None
  assert astronaut_record.source_size is None and astronaut_record.source_hash is None
  assert astronaut_record.source_mtime_ns is None


def test_decompression_bomb_warning_becomes_the_record_message(analyzer, astronaut, tmp_path,
                                                               monkeypatch):
  path = tmp_path / "astronaut.png"
  Image.fromarray(astronaut).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)   # 512 x 512 is over it
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    record = prepare_image(path, analyzer, landmarks_only=True)
  assert record.status == STATUS_OK and "decompression-bomb" in record.message


@pytest.mark.skipif(len(FFHQ_PHOTOS) < 2, reason=f"FFHQ photos not found under {PHOTOS}")
def test_two_real_faces_side_by_side_say_so_and_fit_the_larger(analyzer):
  left = cv2.resize(read_image(FFHQ_PHOTOS[0]), (512, 512), interpolation=cv2.INTER_AREA)
  right = cv2.resize(read_image(FFHQ_PHOTOS[1]), (400, 400), interpolation=cv2.INTER_AREA)
  canvas = np.zeros((512, 1024, 3), np.uint8)
  canvas[:, :512] = left
  canvas[56:456, 568:968] = right
  record = prepare_image(canvas, analyzer, landmarks_only=True)
  assert record.ok and record.num_faces == 2
  assert record.message == "2 faces; fitted the largest"
  assert np.all(record.landmarks_original[:, 0] < 512)


def test_small_face_in_a_large_jpeg_is_searched_at_full_size(analyzer, astronaut,
                                                             astronaut_record, tmp_path):
  # As the tiled-search test above, from a JPEG: the quarter-size decode shows no face, so the
  # full-size image (and its tiles) is searched.
  photo = np.full((2000, 3000, 3), 90, np.uint8)
  photo[600:1300, 1800:2500] = cv2.resize(astronaut, (700, 700), interpolation=cv2.INTER_AREA)
  path = tmp_path / "group.jpg"
  Image.fromarray(photo).save(path, quality=90)
  record = prepare_image(path, analyzer, landmarks_only=True)
  assert record.ok and record.num_faces == 1
  expected_nose = np.array([1800.0, 600.0]) + astronaut_record.landmarks_original[1] * 700 / 512
  assert np.linalg.norm(record.landmarks_original[1] - expected_nose) < 4
