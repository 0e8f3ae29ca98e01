"""Accuracy of calibrated multi-view fitting against one view, on the scenes of eval_synthetic.py.

  python tools/eval_multiview.py [--num_faces 32] [--noise_px 0,1] [--views 1,2,3]
                                 [--landmark_solver lm] [--lm_iterations 5]
                                 [--full_iterations 800] [--json_out FILE]

The random faces and first cameras of tools/eval_synthetic.py (FLAME-size synthetic head, all
300 / 100 coefficients drawn, fitted with 100 / 50; 726 px focal in a 256 image) are seen by
more cameras that turn about the head by +30 degrees (2 views: 0, +30) or -30 and +30 (3 views),
each exactly calibrated; landmarks get Gaussian pixel noise. One view is the photo fit
(`fit_batch`, Levenberg-Marquardt, the focal length known) and its camera-space mesh; several
are `multiview.fit_moments` with the head's world pose. Reported as eval_synthetic reports them:
face-region vertex error after the best rigid alignment (median, p90), the depth bias of the
face centroid in the first camera, the size bias, and ms per view.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from scipy.spatial.transform import Rotation

from jflame import flame, model_loading, multiview
from jflame.camera import to_camera_space
from jflame.camera_files import RigCamera
from jflame.config import FitConfig
from jflame.fit import fit_batch
from jflame.rotation import axis_angle_to_matrix
import benchmarking  # tools/ is on sys.path, as for eval_synthetic
import eval_synthetic  # tools/ is a folder of scripts: its own folder is on sys.path

# --num_faces, --noise_px and --seed are eval_synthetic's flags (defined where it is imported).
_NUM_FACES, _NOISE, _SEED = eval_synthetic._NUM_FACES, eval_synthetic._NOISE, eval_synthetic._SEED
_VIEWS = flags.DEFINE_list("views", ["1", "2", "3"], "View counts (1: the photo fit).")
_SOLVER = flags.DEFINE_enum("landmark_solver", "lm", ["lm", "adam"], "Multi-view solver.")
_LM_ITERATIONS = flags.DEFINE_integer("lm_iterations", multiview.LM_ITERATIONS,
                                      "Multi-view Levenberg-Marquardt steps.")
_FULL_ITERATIONS = flags.DEFINE_integer("full_iterations", multiview.FULL_ITERATIONS,
                                        "Multi-view Adam full steps (--landmark_solver adam).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the rows as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per row (the median is reported).",
                                lower_bound=1)
_ALL_LANDMARKS = flags.DEFINE_bool(
    "all_landmarks", True, "Multi-view: fit every landmark the embedding has (as jflame-fit "
    "--cameras does); --noall_landmarks: the 162 of a photo's default regions.")
_PRIOR_SCALE = flags.DEFINE_float("prior_scale", multiview.RIG_PRIOR_SCALE,
                                  "Multi-view: the shape and expression priors times this "
                                  "(1: a photo's).", lower_bound=0.0)

YAWS = {2: (0.0, 30.0), 3: (-30.0, 0.0, 30.0)}
flags.register_validator("views", lambda counts: all(c in ("1", "2", "3") for c in counts),
                         "--views takes view counts 1, 2 and 3 (the rigs of YAWS)")
CROP = eval_synthetic.CROP
FOCAL = eval_synthetic.FIT_FOCAL


def _rig(centre, yaws):
  """Cameras turned about the head's centre `centre` (first-camera space = world) by `yaws`."""
  k = np.array([[FOCAL, 0, CROP / 2], [0, FOCAL, CROP / 2], [0, 0, 1]])
  cameras = []
  for yaw in yaws:
    rotation = Rotation.from_euler("y", yaw, degrees=True).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, centre - rotation @ centre
    cameras.append(RigCamera(f"{int(yaw):+d}", k, matrix, (CROP, CROP)))
  return cameras


def _views(loaded, params, cameras, noise, rng, yaws):
  """(RigViews batch of the faces, their rigs): each face's landmarks in each of its cameras."""
  model, embedding = loaded.model, loaded.embedding
  indices = np.asarray(embedding.landmark_indices)
  def camera_points(p, camera):
    vertices, _ = flame.flame_forward(model, p)
    return to_camera_space(camera, embedding.points(vertices, model.faces))
  points = np.asarray(jax.jit(jax.vmap(camera_points))(params, cameras), np.float64)
  moments, rigs = [], []
  for face_points, translation in zip(points, np.asarray(cameras.translation, np.float64)):
    rig = _rig(translation, yaws)
    landmarks = np.zeros((len(rig), 478, 2), np.float32)
    for view, camera in enumerate(rig):
      in_view = face_points @ camera.rotation.T + camera.translation
      landmarks[view, indices] = (FOCAL * in_view[:, :2] / in_view[:, 2:] + CROP / 2
                                  + rng.normal(scale=noise, size=(len(indices), 2)))
    weights = np.zeros((len(rig), 478), np.float32)
    weights[:, indices] = 1.0
    moments.append(multiview.rig_views(rig, landmarks, weights, np.ones(len(rig), bool),
                                       FitConfig()))
    rigs.append(rig)
  return jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *moments), rigs


def _world_face(model, params, rotations, translations, face):
  def one(p, rotation, translation):
    vertices, _ = flame.flame_forward(model, p)
    return vertices[:face] @ axis_angle_to_matrix(rotation).T + translation
  return np.asarray(jax.jit(jax.vmap(one))(params, rotations, translations), np.float64)


def moment_config() -> FitConfig:
  """The multi-view fit these flags ask for (their defaults: what `jflame-fit --cameras` runs,
  `multiview.rig_config`)."""
  return multiview.rig_config(
      FitConfig(landmark_solver=_SOLVER.value, lm_iterations=_LM_ITERATIONS.value,
                full_iterations=_FULL_ITERATIONS.value),
      prior_scale=_PRIOR_SCALE.value, every_landmark=_ALL_LANDMARKS.value)


def main(argv):
  del argv
  loaded = model_loading.load_model(None, None)
  face = eval_synthetic.face_region_size(loaded.model.v_template.shape[0])
  rows = []
  for noise in map(float, _NOISE.value):
    params, cameras, observations = eval_synthetic.random_scene(
        loaded, _NUM_FACES.value, _SEED.value, noise, FOCAL)
    truth = eval_synthetic._camera_vertices(loaded.model, params, cameras, face)
    for count in map(int, _VIEWS.value):
      if count == 1:
        config = FitConfig()
        fit_model = model_loading.prepare_fit_model(loaded, config)
        def run():
          return jax.block_until_ready(fit_batch(fit_model, observations, config))
        seconds = benchmarking.median_seconds(run, _REPEATS.value)   # after a compiling call
        result = run()
        fitted = eval_synthetic._camera_vertices(loaded.model, result.params, result.camera,
                                                 face)
      else:
        config = moment_config()
        fit_model = model_loading.prepare_fit_model(loaded, config)
        views, _ = _views(loaded, params, cameras, noise, np.random.default_rng(_SEED.value + 1),
                          YAWS[count])
        def run():
          return jax.block_until_ready(multiview.fit_moments(fit_model, views, config))
        seconds = benchmarking.median_seconds(run, _REPEATS.value)
        result = run()
        fitted = _world_face(loaded.model, result.params, result.head_rotation,
                             result.head_translation, face)
      row = eval_synthetic.accuracy(fitted, truth)
      if count > 1:
        row.update(all_landmarks=_ALL_LANDMARKS.value, prior_scale=_PRIOR_SCALE.value)
      row.update(views=count, noise_px=noise, solver="lm" if count == 1 else _SOLVER.value,
                 ms_per_view=1000 * seconds / (_NUM_FACES.value * count))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as stream:
      json.dump(dict(device=str(jax.devices()[0]), num_faces=_NUM_FACES.value, rows=rows),
                stream, indent=1)


if __name__ == "__main__":
  app.run(main)
