"""Shared test fixtures: where the team's real assets live, and a tiny random FLAME-format model."""

import functools
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = PROJECT_ROOT.parent / "shared" / "assets"
FLAME_FILE_NAMES = ("generic_model.pkl", "male_model.pkl", "female_model.pkl", "flame2023.pkl",
                    "flame2023_no_jaw.pkl", "flame2023_Open.pkl")


def shared_photos():
  """The real photographs under ../shared/assets/photos, or a skip that says why."""
  folder = SHARED_ASSETS / "photos"
  photos = sorted(folder.glob("*.png")) if folder.is_dir() else []
  if not photos:
    pytest.skip(f"no real photographs under {folder} (a fresh clone has no ../shared)")
  return photos


def real_flame_files():
  """Official FLAME model files somewhere under ../shared/assets (usually none: FLAME is
  licensed by its authors, see WORKSPACE.md)."""
  if not SHARED_ASSETS.is_dir():
    return []
  return sorted(p for name in FLAME_FILE_NAMES for p in SHARED_ASSETS.rglob(name))


def random_flame_arrays(seed=0, num_vertices=60, num_faces=80, num_shape=12, num_expression=6):
  """A small random model with the official FLAME pickle keys. Numbers are meaningless; the
  structure (5-joint chain, decreasing basis norms per group) is FLAME's."""
  rng = np.random.default_rng(seed)
  weights = rng.random((num_vertices, 5)) ** 3
  j_regressor = rng.random((5, num_vertices)) * (rng.random((5, num_vertices)) < 0.3)
  return dict(
      v_template=rng.normal(scale=0.1, size=(num_vertices, 3)),
      f=rng.integers(0, num_vertices, (num_faces, 3)).astype(np.uint32),
      shapedirs=np.concatenate(
          [rng.normal(scale=0.01, size=(num_vertices, 3, num_shape)) *
           np.geomspace(1.0, 0.05, num_shape),
           rng.normal(scale=0.01, size=(num_vertices, 3, num_expression)) *
           np.geomspace(1.0, 0.2, num_expression)], axis=-1),
      posedirs=rng.normal(scale=0.01, size=(num_vertices, 3, 36)),
      J_regressor=j_regressor / j_regressor.sum(1, keepdims=True),
      weights=weights / weights.sum(1, keepdims=True),
      kintree_table=np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
      J=np.zeros((5, 3)))


@pytest.fixture
def random_arrays():
  return random_flame_arrays()


@functools.lru_cache(maxsize=None)
def connection_regions() -> dict:
  """MediaPipe's own region sets (its face-mesh connection lists), independent of jflame's
  reference file; the refined model's 10 iris points are 468..477 (centres 468 and 473)."""
  from mediapipe.python.solutions import face_mesh_connections as mp

  def points(edges):
    return frozenset(i for edge in edges for i in edge)
  return dict(iris=frozenset(range(468, 478)),
              eyes=points(mp.FACEMESH_LEFT_EYE | mp.FACEMESH_RIGHT_EYE),
              lips=points(mp.FACEMESH_LIPS),
              brows=points(mp.FACEMESH_LEFT_EYEBROW | mp.FACEMESH_RIGHT_EYEBROW),
              nose=points(mp.FACEMESH_NOSE), face_oval=points(mp.FACEMESH_FACE_OVAL))


def expected_region_weights(weights, regions=None) -> dict:
  """{MediaPipe index: weight} of the landmarks in `regions` (default all six) under the
  LandmarkWeights `weights`, written out from MediaPipe's sets: a landmark in several regions
  takes the first one's weight (iris, eyes, lips, brows, nose, face oval)."""
  sets = connection_regions()
  expected = {}
  for region, members in sets.items():
    for index in members:
      expected.setdefault(index, getattr(weights, region))
  wanted = set().union(*(sets[r] for r in (regions or sets)))
  return {index: weight for index, weight in expected.items() if index in wanted}
