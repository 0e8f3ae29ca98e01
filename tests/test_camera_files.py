"""Camera files of capture rigs (issue 20): each format and intrinsics form read into jflame's
convention and checked by projecting with OpenCV's own `projectPoints` from the file's numbers;
every way a camera file goes wrong ends in one line naming the file and the camera."""

import json

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import camera_files
from jflame.errors import ConfigError, InputError

HEAD = np.random.default_rng(0).normal(scale=0.05, size=(40, 3))   # points around the origin


def _rig(yaws_degrees=(-30.0, 0.0, 30.0), distance=1.0):
  """serial -> world-to-camera of cameras around the origin, looking at it."""
  centres = [distance * np.array([np.sin(np.radians(yaw)), 0.05, np.cos(np.radians(yaw))])
             for yaw in yaws_degrees]
  return {f"2216{index:04d}": camera_files.look_at(centre)
          for index, centre in enumerate(centres)}


def _k(fx, fy, cx, cy, skew=0.0):
  return [[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]


def _opencv_pixels(k, world_to_camera, distortion, points):
  rvec, _ = cv2.Rodrigues(world_to_camera[:3, :3])
  pixels, _ = cv2.projectPoints(points.astype(np.float64), rvec, world_to_camera[:3, 3],
                                np.asarray(k, np.float64),
                                np.asarray(distortion, np.float64) if len(distortion) else None)
  return pixels[:, 0]


def _write(path, content):
  path.write_text(json.dumps(content))
  return path


def test_nersemble_file_with_one_shared_intrinsics_and_sizes_from_the_images(tmp_path):
  rig = _rig()
  k = _k(2400.0, 2410.0, 1090.0, 1620.0)   # off-centre principal point, non-square image
  path = _write(tmp_path / "camera_params.json",
                dict(world_2_cam={s: m.tolist() for s, m in rig.items()}, intrinsics=k))
  sizes = {serial: (2200, 3208) for serial in rig}
  cameras = camera_files.load_cameras(path, image_sizes=sizes)
  assert list(cameras) == list(rig)
  for serial, camera in cameras.items():
    assert camera.image_size == (2200, 3208)
    np.testing.assert_allclose(camera_files.project_points(camera, HEAD),
                               _opencv_pixels(k, rig[serial], [], HEAD), atol=1e-6)
    # The camera sits where the rig put it and the head is in front of it.
    assert np.all((HEAD @ camera.rotation.T + camera.translation)[:, 2] > 0)


def test_nersemble_file_with_intrinsics_per_camera_and_a_size_in_the_file(tmp_path):
  rig = _rig()
  ks = {serial: _k(2000.0 + 100 * i, 2000.0 + 100 * i, 500.0 + i, 700.0 - i)
        for i, serial in enumerate(rig)}
  path = _write(tmp_path / "camera_params.json",
                dict(world_2_cam={s: m.tolist() for s, m in rig.items()}, intrinsics=ks,
                     width=1100, height=1604))
  cameras = camera_files.load_cameras(path)
  for serial, camera in cameras.items():
    assert camera.image_size == (1100, 1604)
    np.testing.assert_allclose(camera_files.project_points(camera, HEAD),
                               _opencv_pixels(ks[serial], rig[serial], [], HEAD), atol=1e-6)


def _ava256(tmp_path, rig, k, distortion):
  """Ava-256's camera_calibration.json as its capture ships it: K and T transposed, the world in
  millimetres, four distortion coefficients."""
  entries = []
  for serial, world_to_camera in rig.items():
    t = world_to_camera.copy()
    t[:3, 3] *= 1000.0
    entries.append({"cameraId": serial, "projectionModel": "Pinhole",
                    "distortionModel": "RadialAndTangential", "K": np.asarray(k).T.tolist(),
                    "distortion": list(distortion), "T": t.T.tolist()})
  return _write(tmp_path / "camera_calibration.json", {"KRT": entries})


@pytest.mark.parametrize("downsample", [1, 4])
def test_ava256_file_read_as_their_loader_reads_it(tmp_path, downsample):
  """Ava-256's `load_camera_calibration` + AvaDataset: intrin = K^T, extrin = T[:4, :3]^T,
  dist + [0] (radial-tangential), focal and principal point divided by `downsample`, the world
  in millimetres: jflame's camera (metres) projects a head as OpenCV does from those numbers."""
  rig = _rig()
  k = _k(10355.1, 10348.6, 1413.1, 1783.6)
  distortion = [-0.0734, 0.0439, -0.0034, 0.0030]
  path = _ava256(tmp_path, rig, k, distortion)
  size = (2668 // downsample, 4096 // downsample)
  cameras = camera_files.load_cameras(path, image_sizes={serial: size for serial in rig})
  assert list(cameras) == list(rig)
  for serial, camera in cameras.items():
    assert camera.image_size == size
    entry = next(e for e in json.loads(path.read_text())["KRT"] if e["cameraId"] == serial)
    intrin = np.array(entry["K"]).T
    intrin[:2] /= downsample
    extrin = np.array(entry["T"])[:4, :3].T
    world_to_camera = np.vstack([extrin, [0.0, 0.0, 0.0, 1.0]])
    expected = _opencv_pixels(intrin, world_to_camera, entry["distortion"] + [0.0],
                              HEAD * 1000.0)
    np.testing.assert_allclose(camera_files.project_points(camera, HEAD), expected, atol=1e-6)
    np.testing.assert_allclose(camera.centre, -rig[serial][:3, :3].T @ rig[serial][:3, 3],
                               atol=1e-9)   # metres


def test_ava256_file_without_images_is_for_full_size_and_a_wrong_size_is_one_line(tmp_path):
  rig = _rig()
  path = _ava256(tmp_path, rig, _k(10355.1, 10348.6, 1413.1, 1783.6), [0.0] * 4)
  assert all(camera.image_size == (2668, 4096)
             for camera in camera_files.load_cameras(path).values())
  _refused(path, "calibrated for 2668 x 4096 images but its image is 1000 x 1000",
           image_sizes={serial: (1000, 1000) for serial in rig})


@pytest.mark.parametrize("distortion", [
    [-0.21, 0.08, 0.001, -0.0007],
    [-0.21, 0.08, 0.001, -0.0007, 0.02],
    [0.1, -0.05, 0.002, 0.001, 0.01, 0.05, -0.02, 0.01],
    [0.1, -0.05, 0.002, 0.001, 0.01, 0.05, -0.02, 0.01, 0.001, -0.002, 0.0015, 0.0005]])
def test_jflame_format_with_lens_distortion_projects_as_opencv_does(tmp_path, distortion):
  rig = _rig()
  k = _k(1800.0, 1790.0, 620.0, 510.0)   # OpenCV's model has no skew
  path = _write(tmp_path / "cameras.json", dict(jflame_cameras=1, cameras={
      serial: dict(K=k, R=m[:3, :3].tolist(), t=m[:3, 3].tolist(), width=1280, height=1024,
                   distortion=distortion) for serial, m in rig.items()}))
  cameras = camera_files.load_cameras(path)
  for serial, camera in cameras.items():
    got = camera_files.project_points(camera, HEAD)
    np.testing.assert_allclose(got, _opencv_pixels(k, rig[serial], distortion, HEAD),
                               atol=1e-6)
    # and the distortion moves the pixels (the comparison can fail)
    assert np.abs(got - _opencv_pixels(k, rig[serial], [], HEAD)).max() > 0.1


def test_skew_is_applied_as_the_intrinsic_matrix_says(tmp_path):
  """K's skew (OpenCV's projectPoints ignores it): u = fx x + s y + cx."""
  rig = _rig((0.0,))
  path = _write(tmp_path / "cameras.json", dict(jflame_cameras=1, cameras={
      serial: dict(K=_k(1800.0, 1790.0, 620.0, 510.0, skew=3.0), R=m[:3, :3].tolist(),
                   t=m[:3, 3].tolist(), width=1280, height=1024) for serial, m in rig.items()}))
  camera, = camera_files.load_cameras(path).values()
  in_camera = HEAD @ camera.rotation.T + camera.translation
  x, y = in_camera[:, 0] / in_camera[:, 2], in_camera[:, 1] / in_camera[:, 2]
  np.testing.assert_allclose(camera_files.project_points(camera, HEAD),
                             np.stack([1800 * x + 3 * y + 620, 1790 * y + 510], -1), atol=1e-9)


def _nersemble(tmp_path, rig, **extra):
  content = dict(world_2_cam={s: np.asarray(m).tolist() for s, m in rig.items()},
                 intrinsics=_k(2400.0, 2400.0, 1100.0, 1600.0), width=2200, height=3208)
  content.update(extra)
  return _write(tmp_path / "camera_params.json", content)


def _refused(path, match, image_sizes=None):
  with pytest.raises((ConfigError, InputError), match=match) as caught:
    camera_files.load_cameras(path, image_sizes=image_sizes)
  message = str(caught.value)
  assert "\n" not in message and str(path) in message
  return message


def test_a_file_without_image_size_is_refused_unless_the_images_give_it(tmp_path):
  rig = _rig()
  path = _write(tmp_path / "camera_params.json", dict(
      world_2_cam={s: m.tolist() for s, m in rig.items()}, intrinsics=_k(2400, 2400, 1100, 1600)))
  message = _refused(path, "no image size for camera")
  assert "never assumed" in message
  assert len(camera_files.load_cameras(
      path, image_sizes={s: (2200, 3208) for s in rig})) == 3
  # A size in the file that disagrees with the images: the intrinsics are for other images.
  sized = _nersemble(tmp_path, rig)
  _refused(sized, "calibrated for 2200 x 3208 images but its image is 550 x 802",
           image_sizes={s: (550, 802) for s in rig})


def test_cameras_that_cannot_be_cameras_are_refused_naming_the_camera(tmp_path):
  rig = _rig()
  serial = next(iter(rig))
  bent = dict(rig)
  bent[serial] = rig[serial].copy()
  bent[serial][:3, :3] *= 1.1
  _refused(_nersemble(tmp_path, bent), f"camera {serial}: the extrinsics' 3 x 3 block is not "
                                       "a rotation")
  mirrored = dict(rig)
  mirrored[serial] = rig[serial].copy()
  mirrored[serial][:3, 0] *= -1
  _refused(_nersemble(tmp_path, mirrored), "not a rotation")
  _refused(_nersemble(tmp_path, rig, intrinsics=np.asarray(_k(2400, 2400, 1100, 1600)).T.tolist()),
           "transposed K")
  _refused(_nersemble(tmp_path, rig, intrinsics=_k(-2400, 2400, 1100, 1600)), "positive")
  _refused(_nersemble(tmp_path, rig, intrinsics=_k(2400, 2400, 4400, 1600)),
           r"principal point \(4400, 1600\) lies outside its 2200 x 3208 image")
  _refused(_nersemble(tmp_path, rig, intrinsics={serial: _k(2400, 2400, 1100, 1600)}),
           "has extrinsics but no intrinsics")
  _refused(_nersemble(tmp_path, {serial: np.eye(3)}), r"world_2_cam must be 4 x 4")
  path = _write(tmp_path / "cameras.json", dict(jflame_cameras=1, cameras={serial: dict(
      K=_k(1800, 1800, 600, 500), R=np.eye(3).tolist(), t=[0, 0, 1], width=1200, height=1000,
      distortion=[0.1, 0.2, 0.3])}))
  _refused(path, "distortion must be OpenCV's")
  _refused(_write(tmp_path / "cameras.json", dict(jflame_cameras=2, cameras={})),
           "reads version 1")
  _refused(_write(tmp_path / "other.json", dict(frames=[])), "not a camera file jflame reads")
  (tmp_path / "broken.json").write_text("{not json")
  _refused(tmp_path / "broken.json", "not a JSON camera file")
  _refused(tmp_path / "absent.json", "camera file not found")


def test_camera_to_world_extrinsics_are_refused(tmp_path):
  rig = _rig((-40.0, -15.0, 10.0, 35.0))
  assert len(camera_files.load_cameras(_nersemble(tmp_path, rig))) == 4
  inverted = {serial: np.linalg.inv(matrix) for serial, matrix in rig.items()}
  message = _refused(_nersemble(tmp_path, inverted), "look away from the point their axes meet")
  assert "camera-to-world" in message


def test_one_camera_turned_by_ten_degrees_still_loads(tmp_path):
  """A small calibration error is not detectable from the file alone; the fit flags that view
  (its landmarks disagree); loading must not refuse it."""
  rig = _rig()
  serial = list(rig)[1]
  turned = dict(rig)
  turned[serial] = rig[serial].copy()
  # Turned in place: both R and t of the world-to-camera turn.
  turned[serial] = np.diag([1.0, 1.0, 1.0, 1.0])
  turned[serial][:3, :3] = Rotation.from_euler("y", 10, degrees=True).as_matrix()
  turned[serial] = turned[serial] @ rig[serial]
  cameras = camera_files.load_cameras(_nersemble(tmp_path, turned))
  moved = camera_files.project_points(cameras[serial], HEAD)
  assert np.abs(moved - _opencv_pixels(_k(2400, 2400, 1100, 1600), rig[serial], [], HEAD)
                ).max() > 100


def test_a_moment_folder_matches_its_images_to_the_cameras(tmp_path):
  serials = ["222200037", "222200038", "222200039"]
  folder = tmp_path / "timestep_000000"
  folder.mkdir()
  image = np.zeros((30, 20, 3), np.uint8)
  for serial in serials:
    cv2.imwrite(str(folder / f"cam_{serial}.png"), image)
  (folder / "notes.txt").write_text("not an image")
  images = camera_files.moment_images(folder, serials)
  assert list(images) == serials and images[serials[0]].name == "cam_222200037.png"
  assert camera_files.image_size_of(images[serials[0]]) == (20, 30)
  with pytest.raises(InputError, match="no image of camera.s. 222200040"):
    camera_files.moment_images(folder, serials + ["222200040"])
  cv2.imwrite(str(folder / "cam_999.jpg"), image)
  with pytest.raises(InputError, match="images of cameras the camera file does not have: "
                                       "cam_999"):
    camera_files.moment_images(folder, serials)
  (folder / "cam_999.jpg").unlink()
  cv2.imwrite(str(folder / "cam_222200037.jpg"), image)
  with pytest.raises(InputError, match="two images of camera 222200037"):
    camera_files.moment_images(folder, serials)


def test_the_device_projection_equals_the_host_one_and_has_true_gradients(tmp_path):
  """`camera.project_calibrated` (JAX, what a multi-view fit differentiates) against the host
  projection checked above, and its gradients against finite differences."""
  import jax
  import jax.numpy as jnp
  from jax.test_util import check_grads
  from jflame.camera import project_calibrated
  rig = _rig()
  distortion = [-0.21, 0.08, 0.001, -0.0007, 0.02, 0.01, -0.005, 0.002]
  path = _write(tmp_path / "cameras.json", dict(jflame_cameras=1, cameras={
      serial: dict(K=_k(1800.0, 1790.0, 620.0, 510.0, skew=2.0), R=m[:3, :3].tolist(),
                   t=m[:3, 3].tolist(), width=1280, height=1024, distortion=distortion)
      for serial, m in rig.items()}))
  cameras = list(camera_files.load_cameras(path).values())
  stack = lambda field: jnp.asarray(np.stack([field(c) for c in cameras]), jnp.float32)
  intrinsics, extrinsics = stack(lambda c: c.intrinsics), stack(lambda c: c.world_to_camera)
  distortions = stack(camera_files.padded_distortion)
  # All views at once, as a fit batches them.
  pixels = jax.jit(jax.vmap(project_calibrated, in_axes=(0, 0, 0, None)))(
      intrinsics, extrinsics, distortions, jnp.asarray(HEAD, jnp.float32))
  for view, camera in enumerate(cameras):
    np.testing.assert_allclose(np.asarray(pixels[view]), camera_files.project_points(camera, HEAD),
                               atol=2e-3)
  points = jnp.asarray(HEAD[:6], jnp.float32)
  project = lambda k, e, p: project_calibrated(k, e, distortions[0], p)
  check_grads(project, (intrinsics[0], extrinsics[0], points), order=1, modes=("rev",),
              atol=0.05, rtol=0.05, eps=1e-3)
