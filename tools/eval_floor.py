"""The accuracy floor of landmark fitting on the scenes of eval_synthetic.py: what no estimator
can beat, from a linearised analysis at the truth.

  python tools/eval_floor.py [--num_faces 16] [--noise_px 1] [--views 1,2,3] [--samples 200]

Each face of `eval_synthetic.random_scene` (every one of the synthetic head's 300 shape and 100
expression coefficients drawn from N(0, 0.5^2), a known focal length) is seen by 1, 2 (0, +30
degrees) or 3 (-30, 0, +30) exactly calibrated cameras, as in eval_multiview.py. The unknowns are
all 400 coefficients and the head's rotation and translation; the data are every landmark the
embedding has, with Gaussian noise of `--noise_px` in every view. Linearised at the truth
(landmark Jacobian J, noise sigma), with the prior the faces are drawn from (coefficients
N(0, 0.5^2), the pose free), the best estimator's error is Gaussian with the posterior
covariance (J^T J / sigma^2 + P)^-1: no fit of these landmarks, with any solver, truncation or
prior, does better on average. Its face-region error (samples of that error mapped to the face
patch's vertices, each sample rigidly aligned as eval_synthetic aligns a fit) and depth error
(the face centroid in the first camera) are reported as eval_synthetic reports a fit's:
median / p90 of every vertex of every sample, and the RMS depth error.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jflame import flame, model_loading
from jflame.camera import project_calibrated, to_camera_space
from jflame.camera_files import padded_distortion
from jflame.rotation import axis_angle_to_matrix
import eval_multiview  # tools/ is a folder of scripts: its own folder is on sys.path
import eval_synthetic

# --num_faces, --noise_px, --seed: eval_synthetic's; --views: eval_multiview's.
_NUM_FACES, _NOISE, _SEED = eval_synthetic._NUM_FACES, eval_synthetic._NOISE, eval_synthetic._SEED
_VIEWS = eval_multiview._VIEWS
_SAMPLES = flags.DEFINE_integer("samples", 200, "Error samples per face.", lower_bound=1)
_JSON_OUT = eval_multiview._JSON_OUT

PRIOR_SIGMA = 0.5   # random_scene's coefficients
YAWS = {1: (0.0,), **eval_multiview.YAWS}


def _scene_functions(model, embedding, face, truth_params, truth_camera, rigs):
  """theta (S + E + 6) -> (landmark pixels of every view (V * K * 2,), face vertices in the
  first camera (F * 3,)); theta = shape, expression, rotation delta, translation delta."""
  num_shape, num_expression = model.num_shape, model.num_expression
  rotation0 = axis_angle_to_matrix(truth_camera.rotation)

  def of(theta):
    params = truth_params.replace(shape=theta[:num_shape],
                                  expression=theta[num_shape:num_shape + num_expression])
    delta, shift = theta[-6:-3], theta[-3:]
    vertices, _ = flame.flame_forward(model, params)
    rotation = axis_angle_to_matrix(delta) @ rotation0
    to_first = lambda points: points @ rotation.T + truth_camera.translation + shift
    landmarks = to_first(embedding.points(vertices, model.faces))
    pixels = [project_calibrated(jnp.asarray(camera.intrinsics, jnp.float32),
                                 jnp.asarray(camera.world_to_camera, jnp.float32),
                                 jnp.asarray(padded_distortion(camera), jnp.float32), landmarks)
              for camera in rigs]
    return jnp.concatenate([p.reshape(-1) for p in pixels]), to_first(vertices[:face]).reshape(-1)
  return of


def face_floor(model, embedding, face, params, camera, yaws, noise_px, samples, rng):
  """(per-vertex distances of every sample (samples * F,), depth errors (samples,)), metres."""
  truth = to_camera_space(camera, flame.flame_forward(model, params)[0][:face])
  rigs = eval_multiview._rig(np.asarray(camera.translation, np.float64), yaws)
  theta = jnp.concatenate([params.shape, params.expression, jnp.zeros(6, jnp.float32)])
  of = _scene_functions(model, embedding, face, params, camera, rigs)
  d_pixels, d_vertices = jax.jit(jax.jacfwd(of))(theta)
  d_pixels, d_vertices = np.asarray(d_pixels, np.float64), np.asarray(d_vertices, np.float64)
  coefficients = model.num_shape + model.num_expression
  prior = np.r_[np.full(coefficients, 1.0 / PRIOR_SIGMA ** 2), np.zeros(6)]
  precision = d_pixels.T @ d_pixels / noise_px ** 2 + np.diag(prior)
  # Error samples e ~ N(0, precision^-1): solve L^T e = z with precision = L L^T.
  factor = np.linalg.cholesky(precision)
  errors = np.linalg.solve(factor.T, rng.normal(size=(len(theta), samples)))
  moved = (d_vertices @ errors).T.reshape(samples, face, 3)
  truth = np.asarray(truth, np.float64)
  distances = np.concatenate([eval_synthetic._rigid_residuals(truth + m, truth) for m in moved])
  return distances, moved[:, :, 2].mean(1)


def main(argv):
  del argv
  loaded = model_loading.load_model(None, None)
  model, embedding = loaded.model, loaded.embedding
  face = eval_synthetic.face_region_size(model.v_template.shape[0])
  rows = []
  for noise in map(float, _NOISE.value):
    params, cameras, _ = eval_synthetic.random_scene(loaded, _NUM_FACES.value, _SEED.value, noise,
                                                     eval_synthetic.FIT_FOCAL)
    for count in map(int, _VIEWS.value):
      rng = np.random.default_rng(_SEED.value)
      distances, depths = [], []
      for index in range(_NUM_FACES.value):
        one = jax.tree.map(lambda x: x[index], params)
        camera = jax.tree.map(lambda x: x[index], cameras)
        d, z = face_floor(model, embedding, face, one, camera, YAWS[count], max(noise, 1e-3),
                          _SAMPLES.value, rng)
        distances.append(d)
        depths.append(z)
      distances, depths = np.concatenate(distances), np.concatenate(depths)
      row = dict(views=count, noise_px=noise, landmarks=int(embedding.landmark_indices.shape[0]),
                 floor_median_mm=1000 * float(np.median(distances)),
                 floor_p90_mm=1000 * float(np.percentile(distances, 90)),
                 floor_depth_rms_mm=1000 * float(np.sqrt(np.mean(depths ** 2))))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as stream:
      json.dump(dict(num_faces=_NUM_FACES.value, samples=_SAMPLES.value, rows=rows), stream,
                indent=1)


if __name__ == "__main__":
  app.run(main)
