"""`--engine=ray`: the engine's stages on Ray Data give the rows of the local engine, spread the
preprocessing over the cluster's nodes and resume after a kill the same way.

Ray is the optional `ray` extra, which `make test` installs. Without it the module is skipped on
a developer's machine and fails under CI ($CI set): a path CI skips is a path that breaks. One
local cluster of two nodes serves the whole module (starting Ray costs seconds)."""

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import skimage.data

from jflame import dataset, engine, model_loading, sinks, sources
from jflame.config import FitConfig
from tests.conftest import (HOLD_AFTER_FIRST_SHARD, PROJECT_ROOT, shared_compilation_cache,
                            shared_photos)

try:
  import ray
  import ray.data
  from ray import cluster_utils

  from jflame import ray_engine
except ImportError as error:
  if os.environ.get("CI"):
    pytest.fail(f"CI must run the Ray engine's tests, but {error} (make test installs the "
                f"ray extra: pip install -e '.[test,ray]')", pytrace=False)
  pytest.skip(f"Ray is an optional extra ({error}): make install, or "
              f"pip install -e '.[test,ray]'", allow_module_level=True)

pytestmark = [
    # ray.init starts its processes with fork+exec, which JAX's generic fork warning flags.
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    # Ray Data copying its own DataContext touches its own deprecated settings.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CONFIG = FitConfig(rigid_iterations=20, full_iterations=20)
FLAGS = ["--rigid_iterations=20", "--full_iterations=20"]
# Batches of two: eight inputs make four batches, enough to land on both nodes; the first
# (coffee, corrupt) has nothing to fit, so each actor's first fit is a later batch.
OPTIONS = engine.EngineOptions(batch_size=2, landmarks_only=True)
COMPARED = dataset.FLAME_PARAMETERS + ("camera_rotation", "camera_translation",
                                       "camera_focal_length", "landmarks_fitted",
                                       "landmark_error_px")
OBJECT_STORE = 160 * 1024 ** 2


# Each node's memory resource holds one preprocessing task's reservation: two tasks in flight
# cannot share a node, so Ray must place them on both (left to itself it may keep them on one).
NODE_MEMORY = ray_engine.PREPARE_MEMORY * 3 // 2


@pytest.fixture(scope="module")
def cluster():
  """A local Ray cluster of two nodes of two logical CPUs each (the machine has two cores: the
  CPU counts are slots, not cores), with small object stores; its address."""
  node = dict(num_cpus=2, memory=NODE_MEMORY, object_store_memory=OBJECT_STORE)
  nodes = cluster_utils.Cluster(initialize_head=True,
                                head_node_args=dict(node, include_dashboard=False))
  nodes.add_node(**node)
  nodes.wait_for_nodes()
  ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
  yield nodes.address
  ray.shutdown()
  nodes.shutdown()


@pytest.fixture(scope="module")
def loaded_model():
  return model_loading.load_model(None, None)


def _write_rgb(path, rgb):
  cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """The shared real photographs (linked, not copied), a corrupt file and a photo without a
  face: eight inputs."""
  folder = tmp_path_factory.mktemp("photos")
  for photo in shared_photos():
    (folder / photo.name).symlink_to(photo)
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


def _ray_engine(loaded):
  """The Ray engine as jflame-annotate makes it: its actors keep their programs in the suite's
  compilation cache, so they load the local engine's compiled fit (same program, same flags)."""
  return ray_engine.engine_on_ray(loaded, CONFIG, OPTIONS,
                                  compilation_cache=str(shared_compilation_cache()))


def _rows(folder):
  """Current rows keyed by their source's path under the input folder (one row per id)."""
  rows = dataset.open(folder).to_table().to_pylist()
  assert len({row["id"] for row in rows}) == len(rows)
  return {row["source_relpath"]: row for row in rows}


@pytest.fixture(scope="module")
def both_runs(cluster, loaded_model, photos, tmp_path_factory):
  """The local engine into one folder, the Ray engine into another, from the same inputs and
  settings; (local folder, Ray folder, Ray summary)."""
  local, distributed = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
  _annotate(engine.Engine(loaded_model, CONFIG, OPTIONS), photos, local, loaded_model)
  summary = _annotate(_ray_engine(loaded_model), photos, distributed, loaded_model)
  return local, distributed, summary


def test_preprocessing_and_fit_are_separate_stages(cluster, loaded_model, photos, capsys):
  """Preprocessing runs as CPU tasks over the cluster, not inside the fit actors (Ray Data fuses
  a task stage into the next actor stage when their resource requests match)."""
  fitter = ray_engine.RayFitter(loaded_model, CONFIG, OPTIONS)
  fitter.dataset_of(sources.list_sources([str(photos)])).explain()
  physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
  assert "TaskPoolMapOperator[Map(prepare_fit_batch)]" in physical, physical
  assert "ActorPoolMapOperator[Map(FitActor)]" in physical, physical


def _assert_same_rows(got, expected):
  """Row for row: the same ids, statuses, messages, sources and (same compiled program, same
  inputs) the same fitted numbers."""
  assert sorted(got) == sorted(expected)
  for name, row in got.items():
    want = expected[name]
    assert (row["status"], row["message"]) == (want["status"], want["message"]), name
    assert (row["id"], row["source_path"], row["source_size"]) == (
        want["id"], want["source_path"], want["source_size"]), name
    for column in COMPARED:
      if want[column] is None:
        assert row[column] is None, (name, column)
      else:
        np.testing.assert_allclose(row[column], want[column], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name}: {column}")


def test_ray_rows_equal_the_local_engine_rows(both_runs, photos):
  local, distributed, summary = both_runs
  expected, got = _rows(local), _rows(distributed)
  assert len(got) == 8 == len(list(photos.iterdir()))
  statuses = {name: row["status"] for name, row in got.items()}
  assert statuses["corrupt.jpg"] == "unreadable" and statuses["coffee.png"] == "no_face"
  assert sum(status == "ok" for status in statuses.values()) >= 5, statuses
  _assert_same_rows(got, expected)
  # The summary counts what the dataset holds; one compile (the one actor's first batch with
  # a face), whose images alone have no fit time; the local engine's buckets.
  assert summary["engine"] == "ray" and summary["interrupted"] is None
  assert summary["this_run"] == {status: sum(s == status for s in statuses.values())
                                 for status in set(statuses.values())}
  assert summary["ray"]["compiles"] == 1 and summary["batch_buckets"] == [2]
  timings = summary["timings"]
  assert timings["first_fit_s"] > 0 and timings["fit_s"] > 0 and timings["preprocess_s"] > 0
  untimed = [name for name, row in got.items() if row["status"] == "ok" and row["fit_ms"] is None]
  assert len(untimed) == 2, untimed  # the compiled batch: two photos


def test_preprocessing_ran_on_both_nodes(both_runs):
  """Each prepared batch records the node its task ran on: the four batches of the Ray run
  went to both nodes of the cluster, and the rows (compared with the local engine's above) are
  right."""
  _, _, summary = both_runs
  nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
  placed = summary["ray"]["prepare_batches"]
  assert summary["ray"]["nodes"] == 2 == len(nodes)
  assert set(placed) == nodes, placed
  assert sum(placed.values()) == 4 == sum(summary["ray"]["fit_batches"].values())


def test_ray_resume_redoes_only_the_changed_source(both_runs, loaded_model, photos):
  _, distributed, _ = both_runs
  before = _rows(distributed)
  shards_before = dataset.read_index(distributed)["shards"]
  changed = photos / "coffee.png"
  _write_rgb(changed, cv2.resize(skimage.data.coffee(), (300, 200),
                                 interpolation=cv2.INTER_AREA))
  summary = _annotate(_ray_engine(loaded_model), photos, distributed, loaded_model)
  assert summary["this_run"] == {"skipped": 7, "no_face": 1}
  index = dataset.read_index(distributed)
  assert index["shards"][:len(shards_before)] == shards_before
  newest, = index["shards"][len(shards_before):]
  assert newest["rows"] == 1 and newest["supersedes"] == [before["coffee.png"]["row_uid"]]
  after = _rows(distributed)
  assert sorted(after) == sorted(before)
  assert after["coffee.png"]["row_uid"] != before["coffee.png"]["row_uid"]
  assert after["coffee.png"]["image_width"] == 300
  for name in set(before) - {"coffee.png"}:
    assert after[name]["row_uid"] == before[name]["row_uid"], name


# Runs jflame-annotate with one change: once a write of this run has committed a shard, the
# writer thread waits until the run ends (an interrupt: Engine.run's finally finishes the
# writer) or the process is killed. The run cannot finish before the test's signal, however
# loaded the machine, and the signal always lands with a shard committed and work in flight.
def _shard_count(output):
  return len(dataset.read_index(output)["shards"]) if (output / "index.json").is_file() else 0


def _signal_after_a_new_shard(args, env, output, signum):
  """Runs the held command, sends `signum` once it has committed a shard; (exit code, stderr)."""
  before = _shard_count(output)
  process = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_SHARD, *args],
                             cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while (process.poll() is None and time.monotonic() < deadline
           and _shard_count(output) == before):
      time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signum)
    try:
      _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGUSR1)
      time.sleep(3)
      process.kill()
      pytest.fail(f"no exit 120 s after signal {signum}:\n{process.communicate()[1][-6000:]}")
  finally:
    process.kill()
    process.wait()
  return process.returncode, stderr


def test_interrupted_and_killed_ray_runs_resume_to_one_row_per_input(cluster, both_runs, photos,
                                                                    tmp_path, command_env):
  """On the cluster (--ray_address): SIGTERM after the first committed shard ends the command
  as Ctrl-C does (exit 130, one line, the rows kept); SIGKILL after the next shard loses only
  uncommitted rows; the same command again leaves one row per input, keeps every row committed
  before (not refitted), and the rows are the local engine's."""
  output = tmp_path / "out"
  args = [f"--input={photos}", f"--output={output}", "--engine=ray",
          f"--ray_address={cluster}", "--batch_size=2", "--rows_per_shard=2", "--overlays=none",
          "--noreport", *FLAGS]

  code, stderr = _signal_after_a_new_shard(args, command_env, output, signal.SIGTERM)
  assert code == 130 and "interrupted:" in stderr and "Traceback" not in stderr, stderr[-3000:]
  summary = json.loads((output / "run_summary.json").read_text())
  assert summary["interrupted"] == "KeyboardInterrupt" and summary["engine"] == "ray"
  kept = _rows(output)
  assert len(kept) >= 2 and sum(summary["this_run"].values()) == len(kept)

  code, _ = _signal_after_a_new_shard(args, command_env, output, signal.SIGKILL)
  assert code == -signal.SIGKILL
  ids = dataset.open(output).to_table(columns=["id"]).column("id").to_pylist()
  assert len(ids) == len(set(ids)) > len(kept)  # every committed shard reads, no id twice
  kept = _rows(output)

  done = subprocess.run([sys.executable, "-m", "jflame.cli.annotate", *args], cwd=PROJECT_ROOT,
                        env=command_env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((output / "run_summary.json").read_text())
  assert summary["this_run"]["skipped"] == len(kept)
  relpaths = dataset.open(output).to_table(columns=["source_relpath"]).column(
      "source_relpath").to_pylist()
  assert sorted(relpaths) == sorted(path.name for path in photos.iterdir())  # one row each
  listed = {shard["name"] for shard in dataset.read_index(output)["shards"]}
  assert {path.name for path in (output / "shards").iterdir()} == listed  # no torn leftovers
  rows = _rows(output)
  for name, row in kept.items():
    assert rows[name]["row_uid"] == row["row_uid"], name
  local, _, _ = both_runs
  expected = _rows(local)
  expected["coffee.png"] = rows["coffee.png"]  # rewritten by the resume test when it ran first
  _assert_same_rows(rows, expected)
