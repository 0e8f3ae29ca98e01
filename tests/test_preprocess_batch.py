"""Batching records into a fixed-shape Observation, and the parallel preprocessing path."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from jflame import sources
from jflame.errors import ConfigError, ModelFileError
from jflame.observation import Observation
from jflame.preprocess import (STATUS_NO_FACE, STATUS_OK, STATUS_UNREADABLE, AnalyzerOptions,
                               FaceAnalyzer, Preprocessor, prepare_image,
                               prepare_images, stack_observations)

CROP = 96


@pytest.fixture(scope="module")
def records():
  """An ok record, a no-face record and a second ok record (the astronaut mirrored)."""
  astronaut = skimage.data.astronaut()
  with FaceAnalyzer() as analyzer:
    return [prepare_image(astronaut, analyzer, CROP, name="a"),
            prepare_image(skimage.data.coffee(), analyzer, CROP, name="coffee"),
            prepare_image(np.ascontiguousarray(astronaut[:, ::-1]), analyzer, CROP, name="b")]


def test_stack_fills_slots_in_order_and_pads(records):
  assert [record.status for record in records] == [STATUS_OK, STATUS_NO_FACE, STATUS_OK]
  observation = stack_observations(records, batch_size=5, crop_size=CROP)
  assert isinstance(observation, Observation) and observation.crop_size == CROP
  assert observation.landmarks.shape == (5, 478, 2) and observation.landmarks.dtype == np.float32
  assert observation.landmark_weights.shape == (5, 478)
  assert observation.image.shape == (5, CROP, CROP, 3) and observation.image.dtype == np.float32
  assert observation.face_mask.shape == (5, CROP, CROP)
  assert observation.valid.dtype == bool
  np.testing.assert_array_equal(observation.valid, [True, False, True, False, False])
  for slot, record in ((0, records[0]), (2, records[2])):
    np.testing.assert_array_equal(observation.landmarks[slot], record.landmarks)
    np.testing.assert_array_equal(observation.landmark_weights[slot], record.landmark_weights)
    np.testing.assert_allclose(observation.image[slot], record.crop / 255.0, atol=1e-7)
    np.testing.assert_array_equal(observation.face_mask[slot], record.face_mask)
  assert 0.0 <= observation.image.min() and observation.image.max() <= 1.0
  for slot in (1, 3, 4):
    for array in (observation.landmarks, observation.landmark_weights, observation.image,
                  observation.face_mask):
      assert not array[slot].any(), slot


def test_a_landmark_batch_carries_no_images_but_knows_its_crop_size(records):
  """For a landmark fit the batch leaves out the crops and masks (the fit never reads them) and
  keeps everything it does read, slot for slot."""
  full = stack_observations(records, batch_size=4, crop_size=CROP)
  bare = stack_observations(records, batch_size=4, crop_size=CROP, images=False)
  assert bare.image is None and bare.face_mask is None and bare.crop_size == CROP
  for name in ("landmarks", "landmark_weights", "valid"):
    np.testing.assert_array_equal(getattr(bare, name), getattr(full, name), err_msg=name)
  with pytest.raises(ValueError, match="needs its crop size"):
    _ = Observation(landmarks=bare.landmarks, landmark_weights=bare.landmark_weights, image=None,
                    face_mask=None, valid=bare.valid).crop_size


def test_stack_rejects_overfull_batches_and_other_crop_sizes(records):
  with pytest.raises(ConfigError, match="do not fit a batch of 2"):
    stack_observations(records, batch_size=2, crop_size=CROP)
  with pytest.raises(ConfigError, match="crop_size=128"):
    stack_observations(records, batch_size=3, crop_size=128)
  empty = stack_observations([], batch_size=2, crop_size=CROP)
  assert not empty.valid.any() and empty.image.shape == (2, CROP, CROP, 3)


def test_parallel_path_returns_the_serial_records_in_order(tmp_path):
  astronaut = skimage.data.astronaut()
  for folder in ("x", "y"):
    (tmp_path / folder).mkdir()
  Image.fromarray(astronaut).save(tmp_path / "x" / "astronaut.png")
  Image.fromarray(skimage.data.coffee()).save(tmp_path / "x" / "coffee.png")
  (tmp_path / "x" / "broken.jpg").write_text("not a photo")
  Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(tmp_path / "y" / "astronaut.png")
  found = sources.list_sources([str(tmp_path / "x"), str(tmp_path / "y")])
  paths, names = [s.path for s in found], [s.name for s in found]
  assert [name.split("~")[0] for name in names] == ["astronaut.png", "broken.jpg", "coffee.png",
                                                    "astronaut.png"]
  assert len(set(names)) == 4
  serial = prepare_images(paths, CROP, workers=1, names=names)
  progress = []
  # One pool for the run, used for two chunks; the second chunk is submitted before the first
  # is collected, as a runner overlapping preprocessing with fitting would.
  with Preprocessor(CROP, workers=2) as preprocessor:
    first = preprocessor.prepare_iter(paths[:3], names[:3])
    second = preprocessor.prepare_iter(paths[3:], names[3:])
    parallel = list(first) + preprocessor.prepare(paths[3:], names[3:],
                                                  progress=lambda r: progress.append(r.name))
    assert [record.name for record in second] == names[3:]
  assert progress == names[3:]
  assert [record.name for record in serial] == names
  assert [record.status for record in serial] == [STATUS_OK, STATUS_UNREADABLE, STATUS_NO_FACE,
                                                   STATUS_OK]
  for one, other in zip(serial, parallel, strict=True):
    assert (one.name, one.source, one.status, one.message) == (
        other.name, other.source, other.status, other.message)
    if one.ok:
      np.testing.assert_allclose(one.landmarks, other.landmarks, atol=1e-4)
      np.testing.assert_allclose(one.crop_from_original, other.crop_from_original, atol=1e-6)
  # Mirroring the photo mirrors the face: the second astronaut's nose is on the other side.
  assert abs(serial[0].landmarks_original[1, 0] + serial[3].landmarks_original[1, 0] - 512) < 3


def test_bad_task_models_are_reported_not_hung_on(tmp_path):
  image = np.zeros((32, 32, 3), np.uint8)
  missing = AnalyzerOptions(landmarker_task_path=str(tmp_path / "absent.task"))
  with pytest.raises(ModelFileError, match="not found"):
    prepare_images([image, image], workers=2, analyzer_options=missing)
  # An existing but invalid file fails inside each worker; the first result re-raises it.
  bogus = tmp_path / "bogus.task"
  bogus.write_bytes(b"not a model")
  invalid = AnalyzerOptions(landmarker_task_path=str(bogus))
  with pytest.raises(ModelFileError, match="could not load"):
    prepare_images([image, image], workers=2, analyzer_options=invalid)
