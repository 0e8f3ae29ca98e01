"""jflame-export (issue 21): each format read back with that format's own conventions, written
here from its reader's code and documentation, not from jflame's: the mesh rebuilt from the
exported files and the fitted landmarks projected with the exported camera land on the track's
fitted landmarks (< 0.05 px) on a synthetic clip with every joint turned and a calibrated
capture; NoW's layout; the FLAME variant rule; a rerun finishes an interrupted export. The
commands on the shared real clip and photos: tests/test_export_commands.py."""

import json
import math
import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import synthetic, track_output
from jflame.camera import Camera, project
from jflame.errors import InputError
from jflame.exports import clip_export, common
from jflame.flame import FlameParams, barycentric_points, flame_forward

FRAMES, FRAME_SIZE = 12, (320, 240)
NUM_SHAPE, NUM_EXPRESSION = 20, 10


# --- GaussianAvatars' conventions, from its flame_model/flame.py, lbs.py and
# --- scene/dataset_readers.py (readCamerasFromTransforms), written out in NumPy.

def _rodrigues(rotvec):
  return Rotation.from_rotvec(np.asarray(rotvec, np.float64)).as_matrix()


def flame_lbs(model, shape, expr, full_pose, offset=0.0, scale=1.0):
  """FLAME's forward as the FLAME_PyTorch code these readers share: betas = [shape, expr] (the
  coefficients beyond the model's own must be zero); full_pose (15) = [global, neck, jaw, left
  eye, right eye]; LBS with the joints regressed from the shaped mesh. `scale` multiplies the
  template and every blend shape (IMavatar's factor 4)."""
  shape, expr = np.asarray(shape, np.float64), np.asarray(expr, np.float64)
  num_shape = min(model.shapedirs.shape[-1], len(shape))      # their n_shape: the first ones
  num_expression = min(model.exprdirs.shape[-1], len(expr))
  assert not np.any(shape[num_shape:]) and not np.any(expr[num_expression:])
  v_shaped = scale * (np.asarray(model.v_template, np.float64)
                      + np.asarray(model.shapedirs, np.float64)[..., :num_shape]
                      @ shape[:num_shape]
                      + np.asarray(model.exprdirs, np.float64)[..., :num_expression]
                      @ expr[:num_expression])
  v_shaped = v_shaped + offset
  joints = np.asarray(model.j_regressor, np.float64) @ v_shaped
  pose = np.asarray(full_pose, np.float64).reshape(5, 3)
  rotations = np.stack([_rodrigues(r) for r in pose])
  pose_feature = (rotations[1:] - np.eye(3)).reshape(-1)
  v_posed = v_shaped + scale * np.asarray(model.posedirs, np.float64) @ pose_feature
  parents = model.parents
  chain = [None] * 5
  for joint in range(5):
    local = np.eye(4)
    local[:3, :3] = rotations[joint]
    local[:3, 3] = joints[joint] - (joints[parents[joint]] if parents[joint] >= 0 else 0.0)
    chain[joint] = local if parents[joint] < 0 else chain[parents[joint]] @ local
  transforms = np.stack(chain)
  transforms[:, :3, 3] -= np.einsum("jab,jb->ja", transforms[:, :3, :3], joints)
  blended = np.einsum("vj,jab->vab", np.asarray(model.lbs_weights, np.float64), transforms)
  return np.einsum("vab,vb->va", blended[:, :3, :3], v_posed) + blended[:, :3, 3]


def gaussian_avatars_vertices(model, params: dict, num_model_vertices: int):
  """FlameHead.forward: `params` as in a flame_param npz; + translation; FLAME's own vertices
  only."""
  offset = (params["static_offset"][0, :num_model_vertices] if "static_offset" in params
            else 0.0)
  pose = np.concatenate([params["rotation"][0], params["neck_pose"][0], params["jaw_pose"][0],
                         params["eyes_pose"][0]])
  return (flame_lbs(model, params["shape"], params["expr"][0], pose, offset)
          + params["translation"][0])


def gaussian_avatars_pixels(frame: dict, points):
  """readCamerasFromTransforms + the 3DGS projection: the camera-to-world in OpenGL axes
  turned to COLMAP's, a field of view, the principal point at the image centre."""
  c2w = np.array(frame["transform_matrix"], np.float64)
  c2w[:3, 1:3] *= -1
  w2c = np.linalg.inv(c2w)
  camera = points @ w2c[:3, :3].T + w2c[:3, 3]
  width, height = frame["w"], frame["h"]
  focal = width / (2.0 * math.tan(frame["camera_angle_x"] / 2.0))
  focal_y = height / (2.0 * math.tan(2.0 * math.atan(height / (2.0 * focal)) / 2.0))
  return np.stack([focal * camera[:, 0] / camera[:, 2] + width / 2.0,
                   focal_y * camera[:, 1] / camera[:, 2] + height / 2.0], axis=-1)


# --- IMavatar's conventions, from its code/datasets/real_dataset.py (FaceDataset),
# --- code/utils/rend_util.py (load_K_Rt_from_P, get_camera_params, lift) and code/flame/FLAME.py
# --- (factor = 4), written out in NumPy.

def imavatar_camera(content: dict, frame: dict, side: int):
  """(K 3 x 3 in pixels at resolution `side`, camera-to-world 4 x 4) as FaceDataset builds them:
  intrinsics times img_res, and load_K_Rt_from_P of the world_mat through OpenCV."""
  fx, fy, cx, cy = content["intrinsics"]
  assert cy <= 1, "the old 512-pixel form"
  k = np.array([[fx * side, 0.0, cx * side], [0.0, fy * side, cy * side], [0.0, 0.0, 1.0]])
  decomposed = cv2.decomposeProjectionMatrix(np.asarray(frame["world_mat"], np.float64))
  pose = np.eye(4)
  pose[:3, :3] = decomposed[1].T
  pose[:3, 3] = (decomposed[2][:3] / decomposed[2][3])[:, 0]
  return k, pose


def imavatar_pixels(k, camera_to_world, points):
  """The pixels whose rays (get_camera_params: lift at depth -1, through the pose) pass through
  `points`: a point q in the camera is on the ray of pixel (u, v) when
  q = ((u - cx) / fx, (v - cy) / fy, 1) * (-d), d > 0."""
  world_to_camera = np.linalg.inv(camera_to_world)
  q = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
  assert np.all(q[:, 2] < 0), "behind their camera"
  return np.stack([k[0, 0] * q[:, 0] / q[:, 2] + k[0, 2], k[1, 1] * q[:, 1] / q[:, 2] + k[1, 2]],
                  axis=-1)


# --- metrical-tracker's conventions, from its tracker.py (save_checkpoint), flame/FLAME.py
# --- (6D rotations, global rotation the identity, no translation) and PyTorch3D's cameras
# --- (NDC, +X left, +Y up, row vectors) and rotation_6d_to_matrix, written out in NumPy.

def rotation_6d_to_matrix(d6):
  """PyTorch3D's rotation_6d_to_matrix: Gram-Schmidt on the two 3-vectors, which are the
  matrix's first two ROWS."""
  a1, a2 = np.asarray(d6[:3], np.float64), np.asarray(d6[3:], np.float64)
  b1 = a1 / np.linalg.norm(a1)
  b2 = a2 - (b1 @ a2) * b1
  b2 = b2 / np.linalg.norm(b2)
  return np.stack([b1, b2, np.cross(b1, b2)])


def metrical_vertices(model, flame: dict):
  """Their FLAME.forward with rot_params, neck and trans left at their defaults (identity,
  zero) and eyelids at zero: the full pose [I, I, jaw, eyes[:6], eyes[6:]]."""
  rotations = [np.eye(3), np.eye(3), rotation_6d_to_matrix(flame["jaw"][0]),
               rotation_6d_to_matrix(flame["eyes"][0, :6]),
               rotation_6d_to_matrix(flame["eyes"][0, 6:])]
  pose = np.concatenate([Rotation.from_matrix(r).as_rotvec() for r in rotations])
  return flame_lbs(model, flame["shape"][0], flame["exp"][0], pose)


def metrical_opencv_pixels(payload: dict, points):
  """x = K (R p + t) of their `opencv` camera."""
  cv = payload["opencv"]
  camera = points @ cv["R"][0].astype(np.float64).T + cv["t"][0]
  pixels = camera @ cv["K"][0].astype(np.float64).T
  return pixels[:, :2] / pixels[:, 2:]


def metrical_pytorch3d_pixels(payload: dict, points):
  """Their `camera` as PyTorch3D's PerspectiveCameras(R, T, focal_length, principal_point) in
  NDC on the square image, then transform_points_screen: X_view = X R + T (row vectors),
  ndc = fl X / Z + pp, screen = (1 - ndc) * side / 2 (+X left, +Y up in NDC)."""
  camera = payload["camera"]
  rotation = rotation_6d_to_matrix(camera["R"][0])
  view = points @ rotation + camera["t"][0]
  ndc = camera["fl"][0, 0] * view[:, :2] / view[:, 2:] + camera["pp"][0]
  height, width = payload["img_size"]
  assert height == width
  return (1.0 - ndc) * width / 2.0


# --- A synthetic clip's track folder: every joint turned, the head moving in the frame camera.

def _synthetic_track(folder, frames_folder):
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  rng = np.random.default_rng(5)
  t = np.arange(FRAMES)
  rotations = {name: np.stack([amplitude * np.sin(0.4 * t + phase + start)
                               for phase in (0.0, 1.0, 2.0)], -1).astype(np.float32)
               for start, (name, amplitude) in enumerate((
                   ("global_rotation", 0.15), ("neck_rotation", 0.1), ("jaw_rotation", 0.08),
                   ("left_eye_rotation", 0.1), ("right_eye_rotation", 0.12)))}
  shape = (rng.normal(size=NUM_SHAPE) * 0.8).astype(np.float32)
  expression = (rng.normal(size=(FRAMES, NUM_EXPRESSION)) * 0.5).astype(np.float32)
  camera = dict(
      rotation=np.stack([Rotation.from_euler("xy", [np.pi + 0.1, 0.3 * np.sin(0.3 * i)])
                         .as_rotvec() for i in t]),
      translation=np.stack([[0.01 * np.sin(0.5 * i), 0.02, 0.7 + 0.01 * i] for i in t]),
      focal_length=np.full(FRAMES, 610.0), principal_point=np.tile([171.3, 104.8], (FRAMES, 1)))
  order = list(np.asarray(embedding.landmark_indices))
  indices = order[::7]
  rows = np.asarray([order.index(index) for index in indices])

  def fitted(params, cam):
    vertices, _ = flame_forward(model, params)
    return project(cam, barycentric_points(vertices, model.faces, embedding.face_indices[rows],
                                           embedding.barycentrics[rows]))
  params = FlameParams(shape=jnp.broadcast_to(jnp.asarray(shape), (FRAMES, NUM_SHAPE)),
                       expression=jnp.asarray(expression),
                       **{k: jnp.asarray(v) for k, v in rotations.items()})
  landmarks = np.asarray(jax.vmap(fitted)(params, Camera(**{
      k: jnp.asarray(v, jnp.float32) for k, v in camera.items()})), np.float64)
  status = np.array(["tracked"] * FRAMES)
  status[3] = "interpolated"
  suspect = np.zeros(FRAMES, bool)
  suspect[3] = suspect[7] = True
  nan = np.full(FRAMES, np.nan)
  columns = dict(
      frame=t, time_s=t / 25.0, status=status, expression=expression, **rotations,
      head_rotation_deg=np.zeros((FRAMES, 3)),
      **{f"camera_{k}": v for k, v in camera.items()},
      **{f"frame_camera_{k}": v for k, v in camera.items()},
      landmarks_detected=landmarks, landmarks_fitted=landmarks, landmark_error_px=nan,
      landmark_error_relative=nan, suspect=suspect,
      suspect_reason=np.where(suspect, "a reason", ""))
  schema = track_output.table_schema(NUM_EXPRESSION, len(indices), photometric=False)
  track_output.write_table(folder / "track.parquet", columns, schema, {
      "model": json.dumps(model.name), "shape": json.dumps(shape.tolist()),
      "landmark_indices": json.dumps([int(i) for i in indices])})
  frames_folder.mkdir()
  for index in range(FRAMES):   # a pale frame with one bright pixel at the first landmark
    image = np.full((FRAME_SIZE[1], FRAME_SIZE[0], 3), 40, np.uint8)
    x, y = (int(v) for v in np.floor(landmarks[index, 0]))
    image[y, x] = 255
    cv2.imwrite(str(frames_folder / f"f{index:03d}.png"), image)
  (folder / "manifest.json").write_text(json.dumps(dict(
      jflame_track=1, status="ok", model_variant="synthetic", frame_size=list(FRAME_SIZE),
      source=str(frames_folder))))
  return model, embedding, rows


@pytest.fixture(scope="module")
def synthetic_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  track = root / "track"
  track.mkdir()
  model, embedding, rows = _synthetic_track(track, root / "frames")
  clip = common.read_tracked_clip(track)
  dataset, motion = root / "ga", root / "motion"
  warnings = clip_export.export_dataset(clip, model, dataset, None, 0.25, False)
  clip_export.export_motion(clip, model, motion)
  imavatar_folder = root / "imavatar"
  imavatar_warnings = clip_export.export_imavatar(clip, model, imavatar_folder, None, False)
  return dict(model=model, embedding=embedding, rows=rows, clip=clip, dataset=dataset,
              motion=motion, warnings=warnings, imavatar=imavatar_folder,
              imavatar_warnings=imavatar_warnings)


def _landmarks_from(model, embedding, rows, vertices):
  return np.asarray(barycentric_points(jnp.asarray(vertices, jnp.float32), model.faces,
                                       embedding.face_indices[rows],
                                       embedding.barycentrics[rows]), np.float64)


def _camera_mesh(model, clip, index):
  """jflame's mesh of frame `index` in its frame camera's coordinates (p_cam = R p + t)."""
  params = jax.tree.map(lambda leaf: jnp.asarray(leaf[index]), clip.params())
  vertices = np.asarray(flame_forward(model, params)[0], np.float64)
  rotation = _rodrigues(clip.columns["frame_camera_rotation"][index])
  return vertices @ rotation.T + clip.columns["frame_camera_translation"][index]


def test_gaussian_avatars_dataset_rebuilds_the_fitted_landmarks(synthetic_export):
  model, clip, dataset = (synthetic_export[k] for k in ("model", "clip", "dataset"))
  every = json.loads((dataset / "transforms.json").read_text())
  splits = {name: json.loads((dataset / f"transforms_{name}.json").read_text())
            for name in ("train", "val", "test")}
  # Frame 3 has no face and frame 7 is suspect: left out; the last quarter held out.
  kept = [i for i in range(FRAMES) if i not in (3, 7)]
  assert [f["timestep_index"] for f in every["frames"]] == kept
  assert [f["timestep_index"] for f in splits["test"]["frames"]] == kept[-2:]
  assert splits["val"]["frames"] == splits["test"]["frames"]
  assert [f["timestep_index"] for f in splits["train"]["frames"]] == kept[:-2]
  fitted = clip.columns["landmarks_fitted"]
  principal_point = clip.columns["frame_camera_principal_point"][0]
  errors = []
  for frame in every["frames"]:
    with np.load(dataset / frame["flame_param_path"]) as data:
      params = {key: data[key] for key in data.files}
    assert all(value.dtype == np.float32 for value in params.values())
    assert params["shape"].shape == (300,) and params["expr"].shape == (1, 100)
    assert params["eyes_pose"].shape == (1, 6)
    assert params["static_offset"].shape == (1, model.num_vertices + 120, 3)
    vertices = gaussian_avatars_vertices(model, params, model.num_vertices)
    # The whole mesh (eyeballs included) where jflame's frame camera saw it, in metres.
    np.testing.assert_allclose(vertices, _camera_mesh(model, clip, frame["timestep_index"]),
                               atol=2e-6)
    points = _landmarks_from(model, synthetic_export["embedding"], synthetic_export["rows"],
                             vertices)
    pixels = gaussian_avatars_pixels(frame, points)
    # The frame sits on the canvas with its principal point at the canvas centre.
    shift = np.array([frame["w"] / 2.0, frame["h"] / 2.0]) - principal_point
    errors.append(np.abs(pixels - (fitted[frame["timestep_index"]] + shift)).max())
    image = cv2.imread(str(dataset / frame["file_path"]))
    assert image.shape[:2] == (frame["h"], frame["w"])
    marked = np.floor(fitted[frame["timestep_index"], 0]) + 0.5 + shift   # the bright pixel
    brightest = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])[::-1]
    assert np.abs(np.asarray(brightest) + 0.5 - marked).max() <= 0.5, (brightest, marked)
  assert max(errors) < 0.05, errors
  assert "SYNTHETIC" in synthetic_export["warnings"][0]
  readme = (dataset / "README.md").read_text()
  assert "SYNTHETIC" in readme and "padded with zeros to 300" in readme
  assert "fg_mask" in readme


def test_gaussian_avatars_motion_drives_the_tracked_head(synthetic_export):
  """local_viewer's motion file: float32 only (others are dropped), every frame; with the
  identity of the dataset's canonical file it rebuilds every frame's fitted landmarks."""
  model, clip = synthetic_export["model"], synthetic_export["clip"]
  with np.load(synthetic_export["motion"] / "motion.npz") as data:
    motion = {key: data[key] for key in data.files}
  assert all(value.dtype == np.float32 for value in motion.values())
  assert motion["expr"].shape == (FRAMES, 100) and motion["eyes_pose"].shape == (FRAMES, 6)
  assert motion["dynamic_offset"].shape == (FRAMES, model.num_vertices + 120, 3)
  with np.load(synthetic_export["dataset"] / "canonical_flame_param.npz") as data:
    shape = data["shape"]
  camera = json.loads((synthetic_export["dataset"] / "transforms.json").read_text())["frames"][0]
  principal_point = clip.columns["frame_camera_principal_point"][0]
  shift = np.array([camera["w"] / 2.0, camera["h"] / 2.0]) - principal_point
  for index in range(FRAMES):
    params = {key: motion[key][index:index + 1] for key in
              ("rotation", "translation", "neck_pose", "jaw_pose", "eyes_pose", "expr")}
    vertices = gaussian_avatars_vertices(model, dict(params, shape=shape), model.num_vertices)
    points = _landmarks_from(model, synthetic_export["embedding"], synthetic_export["rows"],
                             vertices)
    error = np.abs(gaussian_avatars_pixels(camera, points)
                   - (clip.columns["landmarks_fitted"][index] + shift)).max()
    assert error < 0.05, (index, error)


def test_imavatar_folder_rebuilds_the_fitted_landmarks(synthetic_export):
  """IMavatar's loader, FLAME (x4) and ray camera on the exported folder: the head in their
  camera is jflame's in OpenGL axes, 4x larger; the fitted landmarks land on the track's
  (< 0.05 px, their pixel centres at whole numbers, the frame padded to a square); the image
  their loader opens holds the frame there; the box their loader reads holds the face."""
  model, clip, folder = (synthetic_export[k] for k in ("model", "clip", "imavatar"))
  content = json.loads((folder / "flame_params.json").read_text())
  kept = [i for i in range(FRAMES) if i not in (3, 7)]   # no face, suspect
  assert [int(f["file_path"].split("/")[-1]) for f in content["frames"]] == kept
  assert len(content["shape_params"]) == 100
  side = max(FRAME_SIZE)
  offset = np.array([(side - FRAME_SIZE[0]) // 2, (side - FRAME_SIZE[1]) // 2])
  fitted = clip.columns["landmarks_fitted"]
  errors = []
  for frame in content["frames"]:
    index = int(frame["file_path"].split("/")[-1])
    assert len(frame["expression"]) == 50 and len(frame["pose"]) == 15
    vertices = flame_lbs(model, content["shape_params"], frame["expression"], frame["pose"],
                         scale=4.0)
    k, camera_to_world = imavatar_camera(content, frame, side)
    world_to_camera = np.linalg.inv(camera_to_world)
    in_camera = vertices @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    np.testing.assert_allclose(in_camera, 4.0 * _camera_mesh(model, clip, index) * [1, -1, -1],
                               atol=1e-5)
    points = _landmarks_from(model, synthetic_export["embedding"], synthetic_export["rows"],
                             vertices)
    pixels = imavatar_pixels(k, camera_to_world, points)
    errors.append(np.abs(pixels - (fitted[index] - 0.5 + offset)).max())
    image = cv2.imread(f"{folder}/{frame['file_path']}.png")   # as FaceDataset opens it
    assert image.shape[:2] == (side, side)
    brightest = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])[::-1]
    np.testing.assert_array_equal(brightest, np.floor(fitted[index, 0]) + offset)
    box = (np.asarray(frame["bbox"]) + 1.0) * side / 2.0   # FaceDataset, before its int()
    assert np.all(box[:2] <= pixels.min(0) + 1e-3) and np.all(pixels.max(0) <= box[2:] + 1e-3)
  assert max(errors) < 0.05, errors
  readme = (folder / "README.md").read_text()
  assert "SYNTHETIC" in synthetic_export["imavatar_warnings"][0] and "SYNTHETIC" in readme
  assert "mask/" in readme and "padded with zeros to 100" in readme


def test_metrical_folder_rebuilds_the_fitted_landmarks(synthetic_export, tmp_path):
  """metrical-tracker's folder loaded as INSTA and FlashAvatar load it (torch.load of each
  checkpoint): their FLAME (6D rotations, no global rotation) through the `opencv` camera and
  through the PyTorch3D `camera` puts the landmarks where jflame's camera puts them (< 0.05 px,
  the frame padded to a square); mesh/<n>.ply is their FLAME's mesh; canonical.obj the identity
  with the jaw open 12 degrees; numbers without gaps, mapped to the clip's frames. A track that
  turned the neck, which their FLAME keeps still, is refused in one line."""
  torch = pytest.importorskip("torch")   # in the test extra: CI has it
  import trimesh
  model, clip = synthetic_export["model"], synthetic_export["clip"]
  with pytest.raises(InputError, match="neck"):
    clip_export.export_metrical(clip, model, tmp_path / "refused", None, False)
  # jflame-track fits no neck: the same clip with the neck still.
  columns = dict(clip.columns, neck_rotation=np.zeros_like(clip.columns["neck_rotation"]))
  still = common.TrackedClip(clip.folder, clip.manifest, clip.metadata, columns)
  folder = tmp_path / "metrical"
  warnings = clip_export.export_metrical(still, model, folder, None, False)
  kept = [i for i in range(FRAMES) if i not in (3, 7)]   # no face, suspect
  assert json.loads((folder / "jflame_frames.json").read_text())["clip_frame"] == kept
  assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == [
      f"{n:05d}.frame" for n in range(len(kept))]
  side = max(FRAME_SIZE)
  offset = np.array([(side - FRAME_SIZE[0]) // 2, (side - FRAME_SIZE[1]) // 2])
  focal = still.columns["frame_camera_focal_length"][0]
  principal = still.columns["frame_camera_principal_point"][0]
  errors = []
  for number, index in enumerate(kept):
    payload = torch.load(folder / "checkpoint" / f"{number:05d}.frame", weights_only=False)
    flame = payload["flame"]
    assert payload["frame_id"] == f"{number:05d}" and tuple(payload["img_size"]) == (side, side)
    assert {k: v.shape for k, v in flame.items()} == {
        "exp": (1, 100), "shape": (1, 300), "tex": (1, 140), "sh": (1, 9, 3), "eyes": (1, 12),
        "eyelids": (1, 2), "jaw": (1, 6)}
    assert all(v.dtype == np.float32 for v in flame.values())
    vertices = metrical_vertices(model, flame)
    camera_mesh = _camera_mesh(model, still, index)
    in_camera = vertices @ payload["opencv"]["R"][0].T + payload["opencv"]["t"][0]
    np.testing.assert_allclose(in_camera, camera_mesh, atol=2e-5)
    points = _landmarks_from(model, synthetic_export["embedding"], synthetic_export["rows"],
                             vertices)
    seen = _landmarks_from(model, synthetic_export["embedding"], synthetic_export["rows"],
                           camera_mesh)   # jflame's camera: f X / Z + principal point
    expected = focal * seen[:, :2] / seen[:, 2:] + principal + offset
    for pixels in (metrical_opencv_pixels(payload, points),
                   metrical_pytorch3d_pixels(payload, points)):
      errors.append(np.abs(pixels - expected).max())
    mesh = trimesh.load(folder / "mesh" / f"{number:05d}.ply", process=False)
    np.testing.assert_allclose(mesh.vertices, vertices, atol=2e-6)
    image = cv2.imread(str(folder / "input" / f"{number:05d}.png"))
    assert image.shape[:2] == (side, side)
    brightest = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])[::-1]
    np.testing.assert_array_equal(brightest, np.floor(clip.columns["landmarks_fitted"][index, 0])
                                  + offset)
  assert max(errors) < 0.05, errors
  canonical = trimesh.load(folder / "canonical.obj", process=False)
  pose = np.zeros(15)
  pose[6] = np.radians(12.0)
  np.testing.assert_allclose(canonical.vertices, flame_lbs(model, flame["shape"][0],
                                                           np.zeros(100), pose), atol=2e-6)
  readme = (folder / "README.md").read_text()
  assert "SYNTHETIC" in warnings[0] and "weights_only=False" in readme


def test_a_fit_of_another_flame_release_is_refused_and_a_rerun_finishes(synthetic_export,
                                                                         tmp_path):
  clip = synthetic_export["clip"]
  for variant, expected in (("flame2020", "flame2023.pkl"), ("unknown", "--flame_variant")):
    other = common.TrackedClip(clip.folder, dict(clip.manifest, model_variant=variant),
                               clip.metadata, clip.columns)
    with pytest.raises(InputError, match=expected):
      clip_export.export_motion(other, synthetic_export["model"], tmp_path / "refused")
  assert not (tmp_path / "refused" / "motion.npz").exists()
  # An export that stopped after some images: the same call writes the rest, keeps the others.
  copy = tmp_path / "again"
  shutil.copytree(synthetic_export["dataset"], copy)
  for name in ("images/00005.png", "transforms.json", "transforms_train.json"):
    (copy / name).unlink()
  kept = (copy / "images/00000.png").stat().st_mtime_ns
  clip_export.export_dataset(clip, synthetic_export["model"], copy, None, 0.25, False)
  assert (copy / "images/00005.png").is_file() and (copy / "transforms.json").is_file()
  assert (copy / "images/00000.png").stat().st_mtime_ns == kept
  assert (json.loads((copy / "transforms.json").read_text())
          == json.loads((synthetic_export["dataset"] / "transforms.json").read_text()))


def test_not_a_track_folder_and_a_missing_source_are_one_line(synthetic_export, tmp_path):
  with pytest.raises(InputError, match="reads a jflame-track folder.*no jflame output folder"):
    common.read_tracked_clip(tmp_path)
  clip = synthetic_export["clip"]
  moved = common.TrackedClip(clip.folder, dict(clip.manifest, source=str(tmp_path / "gone")),
                             clip.metadata, clip.columns)
  with pytest.raises(InputError, match="--source"):
    clip_export.export_dataset(moved, synthetic_export["model"], tmp_path / "o", None, 0.1, False)


# --- NoW: per photo a mesh in millimetres and its 7 points, read as NoW's compute_error does.

def _fit_folder(folder, model, photos):
  """A jflame-fit result folder as the command writes it (manifest.jsonl + one .npz per ok
  photo): {relpath: FlameParams}."""
  from jflame import manifest
  rng = np.random.default_rng(2)
  entries, params = [], {}
  for index, relpath in enumerate(photos):
    name = f"{relpath.replace('/', '_')}~{index:08x}"
    values = FlameParams(
        shape=(rng.normal(size=NUM_SHAPE) * 0.8).astype(np.float32),
        expression=(rng.normal(size=NUM_EXPRESSION)).astype(np.float32),
        global_rotation=np.float32([0.1, 0.3, 0.0]), neck_rotation=np.float32([0.1, 0, 0]),
        jaw_rotation=np.float32([0.2, 0, 0]), left_eye_rotation=np.zeros(3, np.float32),
        right_eye_rotation=np.zeros(3, np.float32))
    np.savez(folder / f"{name}.npz", model=model.name, **values.as_dict())
    entries.append(dict(name=name, status="ok", source_relpath=relpath, files=[f"{name}.npz"]))
    params[relpath] = values
  entries.append(dict(name="broken~0", status="unreadable", source_relpath="broken.jpg",
                      files=[]))
  manifest.append_entries(folder, entries)
  return params


def _on_surface(points, vertices, faces):
  """(P,) distance of each point to the nearest triangle whose plane it lies in and inside of
  which it falls (inf when none): the points must lie on the mesh."""
  a, b, c = (vertices[faces[:, k]] for k in range(3))
  normal = np.cross(b - a, c - a)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  distances = []
  for point in points:
    height = np.einsum("fk,fk->f", point - a, normal)
    foot = point - height[:, None] * normal
    areas = [np.einsum("fk,fk->f", np.cross(q - p, foot - p), normal)
             for p, q in ((a, b), (b, c), (c, a))]
    inside = np.all(np.stack(areas) >= -1e-6, axis=0)   # a point on an edge or a vertex too
    distances.append(np.min(np.abs(height[inside])) if np.any(inside) else np.inf)
  return np.asarray(distances)


def test_now_meshes_in_millimetres_and_seven_points_in_nows_order(tmp_path):
  import trimesh
  from jflame.exports import fit_export
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  results = tmp_path / "results"
  results.mkdir()
  photos = ["FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg",
            "FaMoS_180424_03335_TA/selfie/IMG_0102.jpg", "a/../escape.jpg"]
  params = _fit_folder(results, model, photos)
  fitted = fit_export.read_fitted_photos(results)
  assert sorted(photo.relpath for photo in fitted) == sorted(photos)   # the failed one skipped
  out = tmp_path / "now"
  warnings = fit_export.export_now(fitted, model, embedding, out, fitted_face=False)
  assert "SYNTHETIC" in warnings[0]
  for relpath in photos[:2]:
    stem = out / relpath[:-len(".jpg")]
    mesh = trimesh.load(f"{stem}.obj", process=False)       # as NoW's mesh loader reads it
    assert not mesh.visual.kind == "vertex"                    # no vertex colours
    points = np.load(f"{stem}.npy")
    assert points.shape == (7, 3)
    # Millimetres: the identity alone (NoW's scans are neutral), 1000x jflame's metres.
    neutral = FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(
        shape=jnp.asarray(params[relpath].shape))
    np.testing.assert_allclose(mesh.vertices, 1000 * np.asarray(flame_forward(model, neutral)[0]),
                               atol=1e-4)
    assert np.all(_on_surface(points, mesh.vertices, mesh.faces) < 1e-3)
    # NoW's order, as its landmarks_7_annotated.png shows the face from the front (x to the
    # subject's left, y up): eye corners 1-4 left to right, 5 below the nose between the
    # inner corners, mouth corners 6 and 7 below it.
    x, y = points[:, 0], points[:, 1]
    assert x[0] < x[1] < x[4] < x[2] < x[3] and x[5] < x[4] < x[6]
    assert max(y[5], y[6]) < y[4] < min(y[:4])
    eye_span = np.linalg.norm(points[3] - points[0])
    assert 40 < eye_span < 150, eye_span                        # millimetres, a head's size
  # A path that leaves its folder is written under the photo's unique name, and said so.
  assert (out / f"{fitted[2].name}.obj").is_file() and not (tmp_path / "escape.obj").exists()
  assert "a/../escape.jpg: written as" in (out / "README.md").read_text()
  # --fitted_face: the fitted expression and pose.
  face = tmp_path / "face"
  fit_export.export_now(fitted[:1], model, embedding, face, fitted_face=True)
  mesh = trimesh.load(face / (fitted[0].relpath[:-4] + ".obj"), process=False)
  np.testing.assert_allclose(mesh.vertices, 1000 * np.asarray(flame_forward(
      model, params[fitted[0].relpath])[0]), atol=1e-4)


# --- A calibrated capture (jflame-fit --cameras) as GaussianAvatars' multi-view dataset.

def _capture_folder(root, model, embedding):
  """Three calibrated cameras (lens distortion, fx != fy, off-centre principal points) around
  the small head over three moments, as jflame-fit --cameras leaves them: the camera file, the
  moments' images (one bright pixel where landmark 0 lands, through the lens) and per moment
  the npz of parameters and head pose in the world. Returns (fit folder, cameras)."""
  from jflame import camera_files
  rng = np.random.default_rng(9)
  serials = ["220700191", "221501007", "222200037"]
  sizes = [(300, 360), (280, 340), (300, 360)]
  cameras, entries = {}, {}
  for index, (serial, (width, height)) in enumerate(zip(serials, sizes)):
    yaw = np.radians((-25.0, 0.0, 30.0)[index])
    centre = 0.6 * np.array([np.sin(yaw), 0.05, np.cos(yaw)])
    w2c = camera_files.look_at(centre)
    k = np.array([[900.0 + 20 * index, 0.0, width / 2 + 9.3 - 5 * index],
                  [0.0, 905.0 + 25 * index, height / 2 - 7.1], [0.0, 0.0, 1.0]])
    distortion = [-0.08 + 0.02 * index, 0.03, 0.0006, -0.0004, 0.0]
    cameras[serial] = camera_files.RigCamera(serial, k, w2c, (width, height),
                                             np.asarray(distortion))
    entries[serial] = dict(K=k.tolist(), R=w2c[:3, :3].tolist(), t=w2c[:3, 3].tolist(),
                           width=width, height=height, distortion=distortion)
  camera_file = root / "cameras.json"
  camera_file.write_text(json.dumps(dict(jflame_cameras=1, cameras=entries)))
  frames, fit = root / "frames", root / "fit"
  fit.mkdir()
  order = list(np.asarray(embedding.landmark_indices))
  moments = []
  shape = (rng.normal(size=NUM_SHAPE) * 0.8).astype(np.float32)   # the run's one identity
  for index in range(3):
    name = f"{index:03d}"
    params = FlameParams(
        shape=shape,
        expression=(rng.normal(size=NUM_EXPRESSION) * 0.5).astype(np.float32),
        global_rotation=np.float32([0.05, 0.1 * index, 0.0]),
        neck_rotation=np.float32([0.1, -0.05, 0.02]), jaw_rotation=np.float32([0.15, 0, 0]),
        left_eye_rotation=np.float32([0.05, 0.1, 0]),
        right_eye_rotation=np.float32([0.02, 0.12, 0]))
    head_rotation = np.float64([0.1, 0.2 * index - 0.2, 0.05])
    head_translation = np.float64([0.01, -0.02, 0.03 * index])
    np.savez(fit / f"{name}.npz", model=model.name, head_rotation=head_rotation,
             head_translation=head_translation, **params.as_dict())
    world = _rodrigues(head_rotation)
    vertices = np.asarray(flame_forward(model, params)[0], np.float64) @ world.T + head_translation
    point = _landmarks_from(model, embedding, np.asarray([order.index(order[0])]), vertices)
    (frames / name).mkdir(parents=True)
    for serial, camera in cameras.items():
      width, height = camera.image_size
      image = np.full((height, width, 3), 30, np.uint8)
      x, y = (int(v) for v in np.floor(camera_files.project_points(camera, point)[0]))
      image[y, x] = 255
      cv2.imwrite(str(frames / name / f"cam_{serial}.png"), image)
    moments.append(dict(moment=name, status="ok", suspect=False, suspect_reason=""))
  (fit / "manifest.json").write_text(json.dumps(dict(
      jflame_capture=1, cameras=str(camera_file), input=str(frames), serials=serials,
      moments=moments, shared_shape=None, model_variant="synthetic")))
  return fit, cameras


def _rig_track_folder(root, fit, cameras, model):
  """The capture of `_capture_folder` as jflame-track --cameras leaves a rig track: a frame
  folder per camera (frame t: moment t), rig_track.npz with the moments' parameters and world
  head poses stacked, every moment tracked, and its manifest."""
  serials = list(cameras)
  moments = sorted(path.stem for path in fit.glob("*.npz"))
  clips = {}
  for serial in serials:
    clips[serial] = root / "clips" / f"cam_{serial}"
    clips[serial].mkdir(parents=True)
    for moment in moments:
      shutil.copy(root / "frames" / moment / f"cam_{serial}.png", clips[serial] / f"{moment}.png")
  arrays = [dict(np.load(fit / f"{moment}.npz")) for moment in moments]
  stacked = {key: np.stack([a[key] for a in arrays]) for key in arrays[0] if key != "model"}
  track = root / "rig_track"
  track.mkdir()
  np.savez(track / "rig_track.npz", model=model.name, tracked=np.ones(len(moments), bool),
           **dict(stacked, shape=stacked["shape"][0]))
  manifest = json.loads((fit / "manifest.json").read_text())
  (track / "manifest.json").write_text(json.dumps(dict(
      jflame_rig_track=1, cameras=manifest["cameras"], serials=serials,
      clips={serial: str(path) for serial, path in clips.items()},
      counts=dict(tracked=len(moments), not_tracked=0), suspect=False,
      model_variant="synthetic")))
  return track


@pytest.mark.parametrize("source", ["capture", "rig_track"])
def test_a_calibrated_capture_becomes_a_multi_view_dataset(tmp_path, source):
  """A jflame-fit --cameras folder, and the same moments as a jflame-track --cameras folder
  (frames decoded from its clips), give the same dataset."""
  from jflame.exports import capture_export
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  fit, cameras = _capture_folder(tmp_path, model, embedding)
  out = tmp_path / "ga"
  if source == "capture":
    warnings = capture_export.export_capture_dataset(fit, model, out, 0.34, False)
  else:
    warnings = capture_export.export_rig_track_dataset(
        _rig_track_folder(tmp_path, fit, cameras, model), model, out, 0.34, False)
  assert "SYNTHETIC" in warnings[0]
  every = json.loads((out / "transforms.json").read_text())
  assert len(every["frames"]) == 9 and every["camera_indices"] == [0, 1, 2]
  test = json.loads((out / "transforms_test.json").read_text())
  assert {f["timestep_index"] for f in test["frames"]} == {2}
  rows = np.arange(len(np.asarray(embedding.landmark_indices)))
  serials = list(cameras)
  for frame in every["frames"]:
    with np.load(out / frame["flame_param_path"]) as data:
      params = {key: data[key] for key in data.files}
    vertices = gaussian_avatars_vertices(model, params, model.num_vertices)
    with np.load(fit / f"{frame['timestep_index']:03d}.npz") as data:
      flame_params = FlameParams(**{k: jnp.asarray(data[k]) for k in (
          "shape", "expression", "global_rotation", "neck_rotation", "jaw_rotation",
          "left_eye_rotation", "right_eye_rotation")})
      world = (np.asarray(flame_forward(model, flame_params)[0], np.float64)
               @ _rodrigues(data["head_rotation"]).T + data["head_translation"])
    np.testing.assert_allclose(vertices, world, atol=2e-6)   # the head in the file's world
    camera = cameras[serials[frame["camera_index"]]]
    points = _landmarks_from(model, embedding, rows, vertices)
    # The reader's pinhole against the calibrated camera without its lens: same focal length
    # (fx) on the canvas, the principal point at the canvas centre.
    in_camera = points @ camera.rotation.T + camera.translation
    expected = (camera.intrinsics[0, 0] * in_camera[:, :2] / in_camera[:, 2:]
                + [frame["w"] / 2.0, frame["h"] / 2.0])
    assert np.abs(gaussian_avatars_pixels(frame, points) - expected).max() < 0.05
    # The source image's bright pixel, taken through the lens by OpenCV's own undistortPoints
    # (pixel centres at integers there: K shifted by half a pixel), lands on the canvas where
    # the reader's pinhole puts that ray (undistortion, square pixels, half-pixel convention).
    image = cv2.imread(str(out / frame["file_path"]))
    assert image.shape[:2] == (frame["h"], frame["w"])
    mask = cv2.imread(str(out / frame["fg_mask_path"]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == image.shape[:2]   # a view's mask on its image's canvas
    source = cv2.imread(str(tmp_path / "frames" / f"{frame['timestep_index']:03d}"
                            / f"cam_{serials[frame['camera_index']]}.png"))
    bright = np.unravel_index(np.argmax(source[..., 0]), source.shape[:2])[::-1]
    k_opencv = camera.intrinsics.copy()
    k_opencv[:2, 2] -= 0.5
    ray = cv2.undistortPoints(np.float64([[bright]]), k_opencv, camera.distortion)[0, 0]
    marked = camera.intrinsics[0, 0] * ray + [frame["w"] / 2.0, frame["h"] / 2.0]
    brightest = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])[::-1]
    assert np.abs(np.asarray(brightest) + 0.5 - marked).max() <= 0.55, (brightest, marked)
