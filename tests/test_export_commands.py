"""jflame-export as a user runs it (issue 21): the shared real clip tracked and exported through
the commands, rebuilt with GaussianAvatars' and IMavatar's conventions (tests/test_export.py) to
< 0.05 px; the
same photos through jflame-fit and jflame-annotate exported as NoW's layout; usage problems one
line and exit 2."""

import json

import cv2
import numpy as np
import pytest

from jflame import synthetic, track_output
from tests.conftest import SHARED_ASSETS, shared_photos
from tests.test_export import (_landmarks_from, flame_lbs, gaussian_avatars_pixels,
                               gaussian_avatars_vertices, imavatar_camera, imavatar_pixels,
                               metrical_opencv_pixels, metrical_pytorch3d_pixels,
                               metrical_vertices)
from tests.test_output_files import run_command


# --- The shared real clip, through the commands as a user runs them.

CLIP = SHARED_ASSETS / "clips" / "talking_head_182.mp4"
EXPORT = ("-m", "jflame.cli.export")


def _check_mask(path, size, landmarks):
  """A foreground mask on the image's canvas: the person where the face's fitted landmarks are
  (every one within 5 px of it: in profile the fitted nose-tip and lip points lie a few pixels
  past the real silhouette, which the mask follows; the face's centre well inside), nothing in
  the canvas's top corners."""
  mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  assert mask is not None and mask.ndim == 2 and mask.shape == size, path
  x, y = np.clip(np.floor(landmarks).astype(int).T, 0, [[size[1] - 1], [size[0] - 1]])
  near = cv2.dilate(mask, np.ones((11, 11), np.uint8))
  assert np.mean(near[y, x] > 127) >= 0.98, (path, np.mean(near[y, x] > 127))
  assert mask[int(np.median(y)), int(np.median(x))] > 200, path
  assert max(mask[0, 0], mask[0, -1]) < 64, path


def test_the_shared_clip_exports_and_rebuilds_its_landmarks(tmp_path):
  if not CLIP.is_file():
    pytest.skip(f"no shared clip at {CLIP}")
  track = tmp_path / "track"
  done = run_command(["--input", CLIP, "--output", track, "--max_frames", "24", "--nooverlay",
                      "--noplot"], tmp_path, script=("-m", "jflame.cli.track"))
  assert done.returncode == 0, done.stderr[-2000:]
  dataset, motion, imavatar = tmp_path / "ga", tmp_path / "motion", tmp_path / "imavatar"
  metrical = tmp_path / "metrical"
  for output, name in ((dataset, "gaussian_avatars"), (motion, "gaussian_avatars_motion"),
                       (imavatar, "imavatar"), (metrical, "metrical")):
    done = run_command(["--input", track, "--format", name, "--output", output], tmp_path,
                       script=EXPORT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning:" in done.stderr and "SYNTHETIC" in done.stderr
    if name == "metrical":   # what the reader needs and jflame cannot make
      assert "warning: No masks" in done.stderr
  model, embedding = synthetic.synthetic_flame("flame", seed=0)
  metadata, columns = track_output.read_table(track / "track.parquet")
  order = list(np.asarray(embedding.landmark_indices))
  rows = np.asarray([order.index(index) for index in metadata["landmark_indices"]])
  every = json.loads((dataset / "transforms.json").read_text())
  assert len(every["frames"]) == int(np.sum(~columns["suspect"]))
  principal_point = columns["frame_camera_principal_point"][0]
  errors = []
  for frame in every["frames"]:
    with np.load(dataset / frame["flame_param_path"]) as data:
      params = {key: data[key] for key in data.files}
    points = _landmarks_from(model, embedding, rows,
                             gaussian_avatars_vertices(model, params, model.num_vertices))
    shift = np.array([frame["w"] / 2.0, frame["h"] / 2.0]) - principal_point
    errors.append(np.abs(gaussian_avatars_pixels(frame, points)
                         - (columns["landmarks_fitted"][frame["timestep_index"]] + shift)).max())
    assert cv2.imread(str(dataset / frame["file_path"])).shape[:2] == (frame["h"], frame["w"])
    _check_mask(dataset / frame["fg_mask_path"], (frame["h"], frame["w"]),
                columns["landmarks_fitted"][frame["timestep_index"]] + shift)
  assert max(errors) < 0.05, errors
  # The motion file drives the dataset's identity: the same landmarks, frame by frame.
  with np.load(motion / "motion.npz") as data:
    assert data["expr"].shape == (24, 100)
    moves = {key: data[key] for key in data.files}
  with np.load(dataset / "canonical_flame_param.npz") as data:
    shape = data["shape"]
  for frame in every["frames"]:
    t = frame["timestep_index"]
    params = {key: moves[key][t:t + 1] for key in ("rotation", "neck_pose", "jaw_pose",
                                                   "eyes_pose", "expr", "translation")}
    points = _landmarks_from(model, embedding, rows, gaussian_avatars_vertices(
        model, dict(params, shape=shape), model.num_vertices))
    shift = np.array([frame["w"] / 2.0, frame["h"] / 2.0]) - principal_point
    errors.append(np.abs(gaussian_avatars_pixels(frame, points)
                         - (columns["landmarks_fitted"][t] + shift)).max())
  assert max(errors) < 0.05, errors
  # IMavatar's folder, read with its conventions: the same landmarks, on the square canvas.
  content = json.loads((imavatar / "flame_params.json").read_text())
  assert len(content["frames"]) == len(every["frames"])
  frame_size = json.loads((track / "manifest.json").read_text())["frame_size"]
  side = max(frame_size)
  offset = (side - np.asarray(frame_size)) // 2
  errors = []
  for frame in content["frames"]:
    index = int(frame["file_path"].split("/")[-1])
    vertices = flame_lbs(model, content["shape_params"], frame["expression"], frame["pose"],
                         scale=4.0)
    k, camera_to_world = imavatar_camera(content, frame, side)
    pixels = imavatar_pixels(k, camera_to_world, _landmarks_from(model, embedding, rows,
                                                                 vertices))
    errors.append(np.abs(pixels - (columns["landmarks_fitted"][index] - 0.5 + offset)).max())
    assert cv2.imread(f"{imavatar}/{frame['file_path']}.png").shape[:2] == (side, side)
    _check_mask(imavatar / "mask" / f"{index:05d}.png", (side, side),
                columns["landmarks_fitted"][index] + offset)
  assert max(errors) < 0.05, errors
  # metrical-tracker's folder, loaded with torch as INSTA and FlashAvatar load it.
  torch = pytest.importorskip("torch")
  clip_frames = json.loads((metrical / "jflame_frames.json").read_text())["clip_frame"]
  assert len(clip_frames) == len(every["frames"])
  errors = []
  for number, index in enumerate(clip_frames):
    payload = torch.load(metrical / "checkpoint" / f"{number:05d}.frame", weights_only=False)
    points = _landmarks_from(model, embedding, rows, metrical_vertices(model, payload["flame"]))
    for pixels in (metrical_opencv_pixels(payload, points),
                   metrical_pytorch3d_pixels(payload, points)):
      errors.append(np.abs(pixels - (columns["landmarks_fitted"][index] + offset)).max())
  assert max(errors) < 0.05, errors
  # Usage problems: one line, exit 2.
  for args, said in (([], "--input is required"),
                     (["--input", tmp_path, "--format", "gaussian_avatars", "--output",
                       tmp_path / "x"], "it is no jflame output folder"),
                     (["--input", track, "--format", "gaussian_avatars", "--output", track],
                      "--output is the --input folder"),
                     (["--input", track, "--format", "insta", "--output", tmp_path / "y"],
                      "--format")):
    done = run_command(args, tmp_path, script=EXPORT)
    assert done.returncode == 2 and said in done.stderr, (args, done.stderr[-1000:])
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_now_from_a_fit_folder_and_from_a_dataset_of_the_same_photos(tmp_path):
  """jflame-fit and jflame-annotate on two shared photos, each exported through the command:
  the same files, the same meshes (one engine fits both)."""
  photos = tmp_path / "photos"
  photos.mkdir()
  for photo in shared_photos()[:2]:
    (photos / photo.name).symlink_to(photo)
  fitted, annotated = tmp_path / "results", tmp_path / "dataset"
  for script, out, extra in ((("-m", "jflame.cli.fit"), fitted, []),
                             (("-m", "jflame.cli.annotate"), annotated, ["--noreport"])):
    done = run_command(["--input", photos, "--output", out, *extra], tmp_path, script=script)
    assert done.returncode == 0, done.stderr[-2000:]
  exports = {}
  for source in (fitted, annotated):
    out = tmp_path / f"now_{source.name}"
    done = run_command(["--input", source, "--format", "now", "--output", out], tmp_path,
                       script=EXPORT)
    assert done.returncode == 0 and "SYNTHETIC" in done.stderr, done.stderr[-2000:]
    exports[source.name] = out
  names = sorted(photo.stem for photo in photos.iterdir())
  for out in exports.values():
    assert sorted(path.stem for path in out.glob("*.npy")) == names
  for name in names:
    first, second = (np.load(exports[key] / f"{name}.npy") for key in ("results", "dataset"))
    np.testing.assert_allclose(first, second, atol=0.05)        # millimetres
  done = run_command(["--input", fitted, "--format", "gaussian_avatars", "--output",
                      tmp_path / "wrong"], tmp_path, script=EXPORT)
  assert done.returncode == 2 and "it is a jflame-fit result folder, which exports as now" in (
      done.stderr)
