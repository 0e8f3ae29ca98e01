"""`--engine=ray`: the engine's stages on Ray Data give the rows of the local engine and resume
the same way. Needs the optional extra (`make test-ray` installs it); skipped without Ray."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

from jflame import dataset, engine, runner, sinks, sources
from jflame.config import FitConfig
from tests.conftest import PROJECT_ROOT

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'jflame[ray]' "
                          "(or make test-ray)")
pytest.importorskip("ray.data", reason="Ray Data is missing: pip install 'jflame[ray]'")
ray_engine = pytest.importorskip("jflame.ray_engine")

pytestmark = [
    # ray.init starts its processes with fork+exec, which JAX's generic fork warning flags.
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    # Ray Data copying its own DataContext touches its own deprecated settings.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CONFIG = FitConfig(rigid_iterations=20, full_iterations=20)
OPTIONS = engine.EngineOptions(batch_size=4, landmarks_only=True)
COMPARED = dataset.FLAME_PARAMETERS + ("camera_rotation", "camera_translation",
                                       "camera_focal_length", "landmarks_fitted")


@pytest.fixture(scope="module")
def cluster():
  """A local Ray cluster of two CPUs (the machine is shared), stopped after the module."""
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
           configure_logging=False)
  yield ray.get_runtime_context().gcs_address
  ray.shutdown()


@pytest.fixture(scope="module")
def loaded_model():
  return runner.load_model(None, None)


def _write_rgb(path, rgb):
  cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Six inputs: the astronaut at three scales and a crop, a corrupt file, a photo without a
  face. Two batches of four (the second in a bucket of two)."""
  folder = tmp_path_factory.mktemp("photos")
  astronaut = skimage.data.astronaut()
  _write_rgb(folder / "astronaut.png", astronaut)
  _write_rgb(folder / "astronaut_small.png", cv2.resize(astronaut, (320, 320),
                                                        interpolation=cv2.INTER_AREA))
  _write_rgb(folder / "astronaut_large.png", cv2.resize(astronaut, (640, 640)))
  _write_rgb(folder / "astronaut_crop.png", astronaut[:320, 60:420])
  (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
  _write_rgb(folder / "coffee.png", skimage.data.coffee())
  return folder


def _sink(folder, loaded, run):
  return sinks.DatasetSink(
      folder, loaded.model.faces, loaded.model.name,
      sinks.dataset_settings(loaded, CONFIG, OPTIONS.crop_size, run.landmark_indices),
      rows_per_shard=100, overlays="none")


def _annotate(run, photos, folder, loaded):
  return run.run(sources.list_sources([str(photos)]), _sink(folder, loaded, run))


def _rows(folder):
  return {row["id"]: row for row in dataset.open(folder).to_table().to_pylist()}


@pytest.fixture(scope="module")
def both_runs(cluster, loaded_model, photos, tmp_path_factory):
  """The local engine into A, the Ray engine into B, from the same photos and settings."""
  local, distributed = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
  _annotate(engine.Engine(loaded_model, CONFIG, OPTIONS), photos, local, loaded_model)
  summary = _annotate(ray_engine.RayEngine(loaded_model, CONFIG, OPTIONS), photos, distributed,
                      loaded_model)
  return local, distributed, summary


def test_preprocessing_and_fit_are_separate_stages(cluster, loaded_model, photos, capsys):
  """Preprocessing runs as CPU tasks over the cluster, not inside the fit actors (Ray Data fuses
  a task stage into the next actor stage when their resource requests match)."""
  run = ray_engine.RayEngine(loaded_model, CONFIG, OPTIONS)
  run.dataset_of(sources.list_sources([str(photos)])).explain()
  physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
  assert "TaskPoolMapOperator[Map(prepare_fit_batch)]" in physical, physical
  assert "ActorPoolMapOperator[Map(FitActor)]" in physical, physical


def test_ray_rows_equal_the_local_engine_rows(both_runs):
  local, distributed, summary = both_runs
  expected, got = _rows(local), _rows(distributed)
  assert sorted(got) == sorted(expected) and len(got) == 6
  statuses = {name: row["status"] for name, row in got.items()}
  assert statuses == {name: row["status"] for name, row in expected.items()}
  assert statuses["corrupt.jpg"] == "unreadable" and statuses["coffee.png"] == "no_face"
  assert statuses["astronaut.png"] == "ok", got["astronaut.png"]["message"]
  for name, row in got.items():
    assert row["message"] == expected[name]["message"], name
    assert row["source_path"] == expected[name]["source_path"]
    for column in COMPARED:
      if expected[name][column] is None:
        assert row[column] is None, (name, column)
      else:
        np.testing.assert_allclose(row[column], expected[name][column], atol=1e-5,
                                   err_msg=f"{name}: {column}")
  assert summary["engine"] == "ray" and summary["this_run"] == {
      status: sum(s == status for s in statuses.values()) for status in set(statuses.values())}


def test_ray_resume_redoes_only_the_changed_source(both_runs, loaded_model, photos):
  _, distributed, _ = both_runs
  before = _rows(distributed)
  shards_before = dataset.read_index(distributed)["shards"]
  changed = photos / "astronaut_small.png"
  _write_rgb(changed, cv2.resize(skimage.data.astronaut(), (352, 352),
                                 interpolation=cv2.INTER_AREA))
  summary = _annotate(ray_engine.RayEngine(loaded_model, CONFIG, OPTIONS), photos, distributed,
                      loaded_model)
  assert summary["this_run"] == {"skipped": 5, "ok": 1}
  index = dataset.read_index(distributed)
  assert index["shards"][:len(shards_before)] == shards_before
  newest, = index["shards"][len(shards_before):]
  assert newest["rows"] == 1
  assert newest["supersedes"] == [before["astronaut_small.png"]["row_uid"]]
  after = _rows(distributed)
  assert sorted(after) == sorted(before)
  assert after["astronaut_small.png"]["row_uid"] != before["astronaut_small.png"]["row_uid"]
  assert after["astronaut_small.png"]["image_width"] == 352
  for name in set(before) - {"astronaut_small.png"}:
    assert after[name]["row_uid"] == before[name]["row_uid"], name


def test_annotate_command_runs_on_the_cluster(cluster, photos, tmp_path):
  """The command joins the test's cluster (--ray_address) and writes the same kind of rows."""
  output = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "jflame.cli.annotate", f"--input={photos}", f"--output={output}",
       "--engine=ray", f"--ray_address={cluster}", "--batch_size=4", "--rigid_iterations=5",
       "--full_iterations=5", "--overlays=none", "--nocompilation_cache"],
      capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((output / "run_summary.json").read_text())
  assert summary["engine"] == "ray" and summary["counts"]["ok"] >= 1
  assert len(_rows(output)) == 6
