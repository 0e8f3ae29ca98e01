"""The README's library example, run as written on two shared photos: `fit_images` returns one
fit per photo in input order, each its own photo's, and equal to the step-by-step calls."""

import re
import shutil

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, shared_photos


def _library_blocks() -> str:
  readme = (PROJECT_ROOT / "README.md").read_text()
  section = readme.split("### As a library", 1)[1].split("\n## ", 1)[0]
  return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_the_readme_library_example_fits_each_photo_in_order(tmp_path, capsys, monkeypatch):
  photos = shared_photos()[:2]
  if len(photos) < 2:
    pytest.skip("needs two shared photos (../shared/assets/photos)")
  # Copied under the README's names, in the reverse of name order: input order must win.
  shutil.copy(photos[1], tmp_path / "a.jpg")
  shutil.copy(photos[0], tmp_path / "b.jpg")
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(_library_blocks(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  fitted, records, results = namespace["fitted"], namespace["records"], namespace["results"]
  printed = capsys.readouterr().out.splitlines()
  assert [image.entry["source_relpath"] for image in fitted] == ["a.jpg", "b.jpg"]
  assert [line.split()[0] for line in printed] == [image.entry["name"] for image in fitted]
  assert all(image.entry["status"] == "ok" for image in fitted)
  assert (tmp_path / "a.obj").is_file()
  # Each fit is its own photo's: the engine's detected landmarks are those the step-by-step
  # preprocessing found in the same file, and the fits agree.
  take = namespace["jflame"].take
  for slot, image in enumerate(fitted):
    record = records[slot]
    np.testing.assert_allclose(image.arrays["landmarks_detected_original"],
                               record.landmarks_original[image.arrays["landmark_indices"]],
                               atol=1e-3)
    np.testing.assert_allclose(image.arrays["expression"],
                               np.asarray(take(results, slot).params.expression), atol=1e-3)
  other = np.linalg.norm(fitted[0].arrays["landmarks_detected_original"]
                         - records[1].landmarks_original[fitted[0].arrays["landmark_indices"]],
                         axis=-1)
  assert np.median(other) > 5.0  # the two photos differ: the check above can fail
