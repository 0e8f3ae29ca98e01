"""What each part of the landmark fit does, pinned by its observable effect on synthetic scenes
with known answers: region selection and weights, the crop-size normalisation of the landmark
loss, the robust (Charbonnier) penalty, the priors, and initial guesses.

Three compiled programs serve the whole file (the fit compiles once per config and crop size):
CONFIG at crop 256 with a guess, the same at crop 128, and a zero-iteration CONFIG that shows the
fit's start. The model is the small synthetic head with one shape and one expression component
made invisible to the landmarks (their basis columns zeroed), so nothing but the start and the
priors can move them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import enable_x64
from jax.test_util import check_grads
from scipy.spatial.transform import Rotation

import jflame
from jflame import flame, losses, synthetic
from jflame.camera import FRONTAL_ROTATION, Camera, project
from jflame.config import FitConfig
from jflame.fit import fit_batch
from jflame.starting_point import InitialGuess
from jflame.landmarks import LandmarkWeights
from jflame.observation import Observation
from tests.conftest import connection_regions, expected_region_weights

NUM_SHAPE, NUM_EXPRESSION = 10, 5
HIDDEN_SHAPE, HIDDEN_EXPRESSION = 9, 4  # components the landmarks cannot see
BATCH = 4
CONFIG = FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION, rigid_iterations=40,
                   full_iterations=60)
START_ONLY = CONFIG.replace(rigid_iterations=0, full_iterations=0, lm_iterations=0)
# The landmark stage is Levenberg-Marquardt by default and Adam on request: the robust loss and
# the priors are written once for each (jflame.solve, jflame.losses / fit.regularization), so
# their tests run both.
SOLVERS = ("lm", "adam")

@pytest.fixture(scope="module")
def head():
  """The small synthetic head with HIDDEN_SHAPE / HIDDEN_EXPRESSION zeroed, and its embedding."""
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  model = model.replace(shapedirs=model.shapedirs.at[..., HIDDEN_SHAPE].set(0.0),
                        exprdirs=model.exprdirs.at[..., HIDDEN_EXPRESSION].set(0.0))
  return jflame.LoadedModel(model, embedding, model.name)


def _fit_model(loaded, config=CONFIG, weights=None):
  """The runner's fit model, optionally with other per-landmark weights."""
  fit_model = jflame.prepare_fit_model(loaded, config)
  if weights is not None:
    fit_model = fit_model.replace(landmark_weights=jnp.asarray(weights, jnp.float32))
  return fit_model


def _scene(loaded, seed, count=BATCH, noise_px=0.3, crop=256):
  """Known faces through known cameras: (params, detected (count, 478, 2) in crop pixels)."""
  model, embedding = loaded.model, loaded.embedding
  rng = np.random.default_rng(seed)
  truths, detected = [], np.zeros((count, 478, 2), np.float32)
  for i in range(count):
    params = flame.FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(
        shape=jnp.asarray(rng.normal(size=NUM_SHAPE) * 0.8, jnp.float32),
        expression=jnp.asarray(rng.normal(size=NUM_EXPRESSION) * 0.6, jnp.float32),
        jaw_rotation=jnp.asarray([rng.uniform(0.0, 0.2), 0.0, 0.0], jnp.float32))
    turn = Rotation.from_rotvec(rng.normal(size=3) * [0.1, 0.25, 0.05])
    camera = Camera(rotation=jnp.asarray((Rotation.from_rotvec(FRONTAL_ROTATION) * turn)
                                         .as_rotvec(), jnp.float32),
                    translation=jnp.asarray([0.0, 0.0, rng.uniform(0.65, 0.8)], jnp.float32),
                    focal_length=jnp.asarray(726.0 * crop / 256, jnp.float32),
                    principal_point=jnp.asarray([crop / 2, crop / 2], jnp.float32))
    vertices, _ = flame.flame_forward(model, params)
    pixels = np.asarray(project(camera, embedding.points(vertices, model.faces)))
    detected[i, np.asarray(embedding.landmark_indices)] = pixels + rng.normal(
        scale=noise_px * crop / 256, size=pixels.shape)
    truths.append(params)
  return truths, detected


def _observation(detected, crop=256):
  count = detected.shape[0]
  return Observation(landmarks=jnp.asarray(detected, jnp.float32),
                     landmark_weights=jnp.ones((count, 478), jnp.float32),
                     image=jnp.zeros((count, crop, crop, 3), jnp.float32),
                     face_mask=jnp.zeros((count, crop, crop), jnp.float32),
                     valid=jnp.ones(count, bool))


def _guess(shape=None, expression=None, jaw=None, estimated=None):
  """An InitialGuess with all three fields present (so every fit here shares one program)."""
  def filled(values, size):
    return np.zeros((BATCH, size), np.float32) if values is None else np.asarray(values,
                                                                                 np.float32)
  return InitialGuess(estimated=np.zeros(BATCH, bool) if estimated is None else
                      np.asarray(estimated, bool),
                      shape=filled(shape, NUM_SHAPE), expression=filled(expression,
                                                                        NUM_EXPRESSION),
                      jaw_rotation=filled(jaw, 3))


def _fit(fit_model, detected, config=CONFIG, guess=None, crop=256):
  result = fit_batch(fit_model, _observation(detected, crop), config, guess or _guess())
  return jax.tree.map(np.asarray, result)


def _residuals(result, detected, fit_model):
  """(B, K) distance of each fitted landmark to its detection, crop pixels."""
  targets = detected[:, np.asarray(fit_model.landmark_indices)]
  return np.linalg.norm(result.landmarks_2d - targets, axis=-1)


# --- Region selection and weights -------------------------------------------------------------

def test_default_fit_uses_mediapipes_162_feature_landmarks_with_their_region_weights(head):
  """Region selection: the default config fits the iris, eye, lip, brow, nose and face-oval
  landmarks (162 of 478, as MediaPipe's own connection sets list them) and weights each by its
  region; `landmark_regions` and `region_weights` in the config decide both."""
  default = _fit_model(head, FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION))
  indices = np.asarray(default.landmark_indices)
  expected = expected_region_weights(LandmarkWeights())
  assert len(indices) == len(expected) == 162
  assert set(indices.tolist()) == set(expected)
  np.testing.assert_allclose(default.landmark_weights, [expected[i] for i in indices])

  odd = LandmarkWeights(iris=3.0, eyes=5.0, lips=7.0, brows=11.0, nose=13.0, face_oval=17.0,
                        other=19.0)
  lips_and_nose = _fit_model(head, FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION,
                                             landmark_regions=("lips", "nose"),
                                             region_weights=odd))
  expected = expected_region_weights(odd, ("lips", "nose"))
  indices = np.asarray(lips_and_nose.landmark_indices)
  assert set(indices.tolist()) == set(expected) and len(indices) == len(expected)
  np.testing.assert_allclose(lips_and_nose.landmark_weights, [expected[i] for i in indices])

  everything = _fit_model(head, FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION,
                                          landmark_regions=None, region_weights=odd))
  indices = np.asarray(everything.landmark_indices)
  assert sorted(indices.tolist()) == list(range(478))
  in_regions = expected_region_weights(odd)
  np.testing.assert_allclose(everything.landmark_weights,
                             [in_regions.get(i, odd.other) for i in indices])


def test_a_heavily_weighted_region_is_followed_closely(head):
  """Region weights reach the landmark loss: when the nose detections disagree with the rest of
  the face (shifted 6 px), weighting the nose 100x more than the rest makes the fit follow the
  nose and give up on the rest; weighting it 100x less does the opposite."""
  _, detected = _scene(head, seed=11)
  base = _fit_model(head)
  indices = np.asarray(base.landmark_indices)
  nose = np.isin(indices, sorted(connection_regions()["nose"] - connection_regions()["lips"]))
  detected = detected.copy()
  detected[:, indices[nose]] += np.array([6.0, -4.0], np.float32)
  strong_nose = _fit(_fit_model(head, weights=np.where(nose, 10.0, 0.1)), detected)
  weak_nose = _fit(_fit_model(head, weights=np.where(nose, 0.1, 10.0)), detected)
  strong, weak = _residuals(strong_nose, detected, base), _residuals(weak_nose, detected, base)
  nose_strong, nose_weak = strong[:, nose].mean(axis=1), weak[:, nose].mean(axis=1)
  rest_strong, rest_weak = strong[:, ~nose].mean(axis=1), weak[:, ~nose].mean(axis=1)
  assert np.all(nose_strong < 0.5 * nose_weak), (nose_strong, nose_weak)
  assert np.all(rest_weak < 0.5 * rest_strong), (rest_weak, rest_strong)


# --- The landmark loss ------------------------------------------------------------------------

def test_charbonnier_is_quadratic_near_zero_and_linear_far_out():
  """The robust penalty, against its formula: r^2/2 for r << scale, scale * r for r >> scale,
  with a finite, correct gradient everywhere (including zero)."""
  scale = 2.0
  r = np.array([0.0, 0.2, 0.5, 3.0, 40.0, 400.0])
  expected = scale**2 * (np.sqrt(1.0 + r**2 / scale**2) - 1.0)
  np.testing.assert_allclose(losses.charbonnier(jnp.asarray(r**2), scale), expected, rtol=1e-5,
                             atol=1e-7)
  near = float(losses.charbonnier(jnp.asarray(0.2**2), scale))
  assert near == pytest.approx(0.5 * 0.2**2, rel=5e-3)  # quadratic near zero
  slope = (losses.charbonnier(jnp.asarray(410.0**2), scale) -
           losses.charbonnier(jnp.asarray(400.0**2), scale)) / 10.0
  assert float(slope) == pytest.approx(scale, rel=1e-2)  # linear, not quadratic, far out
  with enable_x64():
    check_grads(lambda x: losses.charbonnier(jnp.sum(x * x), scale),
                (jnp.asarray([0.0, 0.0], jnp.float64),), order=2, modes=["rev"])
    check_grads(lambda x: losses.charbonnier(jnp.sum(x * x), scale),
                (jnp.asarray([3.0, -40.0], jnp.float64),), order=2, modes=["rev"])


def test_landmark_loss_is_a_weighted_mean_in_reference_crop_pixels():
  """landmark_loss, written out: residuals rescaled to the reference crop, each landmark's
  Charbonnier penalty weighted by its weight, divided by the sum of the weights."""
  rng = np.random.default_rng(0)
  predicted, target = rng.uniform(0, 128, (30, 2)), rng.uniform(0, 128, (30, 2))
  weights = rng.uniform(0, 3, 30)
  weights[:5] = 0.0
  r2 = np.sum(((predicted - target) * (256 / 128))**2, axis=1)
  expected = np.sum(weights * 4.0 * (np.sqrt(1 + r2 / 4.0) - 1)) / weights.sum()
  value = losses.landmark_loss(jnp.asarray(predicted), jnp.asarray(target), jnp.asarray(weights),
                               128, 256.0, 2.0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_robust_fit_undoes_most_of_an_outliers_pull_on_the_start(head, solver):
  """The Charbonnier penalty bounds an outlier's pull. Five face-oval detections moved 60 or
  180 px off drag the closed-form start (a least-squares solve) along with them; the robust
  stages then pull the rest of the face most of the way back to the clean fit (a quadratic loss
  would keep about the least-squares answer)."""
  _, detected = _scene(head, seed=12, count=1)
  fit_model = _fit_model(head)
  indices = np.asarray(fit_model.landmark_indices)
  oval = sorted(connection_regions()["face_oval"])
  # Five neighbouring contour points on one cheek: the five rightmost in the image.
  cheek = [oval[i] for i in np.argsort(detected[0, oval, 0])[-5:]]
  scenes = np.repeat(detected, BATCH, axis=0)
  scenes[1, cheek, 0] += 60.0
  scenes[2, cheek, 0] += 180.0
  scenes[3, cheek, 0] -= 180.0
  others = ~np.isin(indices, cheek)

  def shift(result):  # mean move of the other landmarks against the clean slot 0
    moved = result.landmarks_2d[1:, others] - result.landmarks_2d[:1, others]
    return np.linalg.norm(moved, axis=-1).mean(axis=1)

  start = shift(_fit(fit_model, scenes, START_ONLY))
  fitted = shift(_fit(fit_model, scenes, CONFIG.replace(landmark_solver=solver)))
  assert np.all(start > 1.0), start                 # the start is dragged along
  assert np.all(fitted < 0.5 * start), (fitted, start)


def test_crop_size_does_not_change_the_fit(head):
  """The landmark loss measures residuals in pixels of a 256-pixel crop whatever the crop size,
  so the same faces seen in a 128-pixel crop give the same fit (landmarks at half the pixel
  coordinates, the same coefficients)."""
  truths, detected = _scene(head, seed=13)
  fit_model = _fit_model(head)
  at_256 = _fit(fit_model, detected)
  at_128 = _fit(fit_model, detected * 0.5, crop=128)
  assert np.all(at_256.fitted) and np.all(at_128.fitted)
  np.testing.assert_allclose(2.0 * at_128.landmarks_2d, at_256.landmarks_2d, atol=0.05)
  np.testing.assert_allclose(at_128.params.shape, at_256.params.shape, atol=0.02)
  np.testing.assert_allclose(at_128.params.expression, at_256.params.expression, atol=0.02)
  np.testing.assert_allclose(2.0 * at_128.landmark_error, at_256.landmark_error, rtol=0.02)


# --- Priors and initial guesses ---------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
def test_priors_pull_an_unconstrained_coefficient_to_zero(head, solver):
  """The L2 priors: a shape and an expression component that no landmark sees, started away
  from zero by a guess, are pulled back to zero by their priors alone (without priors nothing
  would move them)."""
  _, detected = _scene(head, seed=14)
  shape, expression = np.zeros((BATCH, NUM_SHAPE)), np.zeros((BATCH, NUM_EXPRESSION))
  shape[:, HIDDEN_SHAPE] = 0.04
  expression[:, HIDDEN_EXPRESSION] = [0.2, -0.2, 0.3, -0.3]
  guess = _guess(shape=shape, expression=expression, estimated=np.ones(BATCH, bool))
  fit_model = _fit_model(head)
  start = _fit(fit_model, detected, START_ONLY, guess)
  np.testing.assert_allclose(start.params.shape[:, HIDDEN_SHAPE], 0.04, atol=1e-6)
  np.testing.assert_allclose(start.params.expression[:, HIDDEN_EXPRESSION],
                             expression[:, HIDDEN_EXPRESSION], atol=1e-5)
  result = _fit(fit_model, detected, CONFIG.replace(landmark_solver=solver), guess)
  if solver == "lm":
    # The LM stage keeps an encoder's shape as given (MICA is the identity specialist), so
    # the guessed shape's hidden component stays; the expression's prior still acts.
    np.testing.assert_allclose(result.params.shape[:, HIDDEN_SHAPE], 0.04, atol=1e-6)
  else:
    assert np.all(np.abs(result.params.shape[:, HIDDEN_SHAPE]) < 0.25 * 0.04), \
        result.params.shape[:, HIDDEN_SHAPE]
  assert np.all(np.abs(result.params.expression[:, HIDDEN_EXPRESSION]) <
                0.25 * np.abs(expression[:, HIDDEN_EXPRESSION])), \
      result.params.expression[:, HIDDEN_EXPRESSION]


def test_an_initial_guess_is_where_the_fit_starts(head):
  """Each group of an initial guess (from DECA: shape, expression, jaw; from MICA: shape)
  reaches the fit: the start keeps the guessed shape and jaw, starts every expression
  coefficient towards the guess (a hidden one exactly at it); unguessed slots ignore it."""
  truths, detected = _scene(head, seed=15, count=2)
  detected = np.concatenate([detected, detected])    # slots 2, 3: the same faces, no guess
  rng = np.random.default_rng(5)
  shape = rng.normal(size=(BATCH, NUM_SHAPE)) * 1.5
  expression = rng.normal(size=(BATCH, NUM_EXPRESSION)) * 1.5
  jaw = np.tile([[0.3, 0.05, -0.02]], (BATCH, 1))
  estimated = np.array([True, True, False, False])
  fit_model = _fit_model(head)
  start = _fit(fit_model, detected, START_ONLY, _guess(shape, expression, jaw, estimated))
  guessed, plain = slice(0, 2), slice(2, 4)
  np.testing.assert_allclose(start.params.shape[guessed], shape[guessed], atol=1e-6)
  np.testing.assert_allclose(start.params.jaw_rotation[guessed], jaw[guessed], atol=1e-6)
  np.testing.assert_allclose(start.params.expression[guessed, HIDDEN_EXPRESSION],
                             expression[guessed, HIDDEN_EXPRESSION], atol=1e-5)
  np.testing.assert_allclose(start.params.jaw_rotation[plain], 0.0, atol=1e-7)
  np.testing.assert_allclose(start.params.expression[plain, HIDDEN_EXPRESSION], 0.0, atol=1e-7)
  assert np.all(np.abs(start.params.shape[plain] - shape[guessed]).max(axis=1) > 0.5)
  # The seen expression coefficients start from a solve whose prior is centred on the guess:
  # the guess moves them towards itself.
  visible = [i for i in range(NUM_EXPRESSION) if i != HIDDEN_EXPRESSION]
  moved = (start.params.expression[guessed] - start.params.expression[plain])[:, visible]
  towards = (expression[guessed] - start.params.expression[plain])[:, visible]
  cosine = np.sum(moved * towards, axis=1) / (np.linalg.norm(moved, axis=1) *
                                              np.linalg.norm(towards, axis=1))
  assert np.all(cosine > 0.3), cosine
  # And the fit goes on from there: the kept shape stays within the few steps' reach.
  result = _fit(fit_model, detected, CONFIG, _guess(shape, expression, jaw, estimated))
  assert np.all(np.abs(result.params.shape[guessed] - shape[guessed]) < 0.1)
