"""Photometric fitting: recovery of lighting, albedo and pose from a synthetic photometric target,
and the photometric command output on a real photograph."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jflame import flame, synthetic
from jflame.camera import FRONTAL_ROTATION, Camera, project, screen_space, to_camera_space
from jflame.config import FitConfig
from jflame.fit import fit_batch, make_fit_model
from jflame.observation import Observation
from jflame.render import (Appearance, face_adjacency, laplacian_albedo_model, render_mesh,
                           vertex_normals)

SIZE = 96
NUM_SHAPE, NUM_EXPRESSION = 20, 10


@pytest.fixture(scope="module")
def scene():
  """Two synthetic faces rendered with known albedo and lighting over a grey background."""
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  albedo = laplacian_albedo_model(model.v_template, model.faces, 8)
  neighbors = jnp.asarray(face_adjacency(np.asarray(model.faces)))
  config = FitConfig(num_shape=NUM_SHAPE, num_expression=NUM_EXPRESSION, mode="photometric",
                     albedo_per_channel=8)
  rng = np.random.default_rng(0)
  truths, images, masks, detected = [], [], [], []
  for _ in range(2):
    params = flame.FlameParams.zeros(NUM_SHAPE, NUM_EXPRESSION).replace(
        expression=jnp.asarray(rng.normal(size=NUM_EXPRESSION) * 0.5, jnp.float32))
    rotation = Rotation.from_rotvec(FRONTAL_ROTATION) * Rotation.from_rotvec(
        rng.normal(size=3) * 0.12)
    camera = Camera(rotation=jnp.asarray(rotation.as_rotvec(), jnp.float32),
                    translation=jnp.asarray([0.0, 0.0, 0.75], jnp.float32),
                    focal_length=jnp.asarray(726.0 * SIZE / 256, jnp.float32),
                    principal_point=jnp.asarray([SIZE / 2, SIZE / 2], jnp.float32))
    neutral = Appearance.neutral(albedo.num_coefficients)
    lighting = neutral.lighting * jnp.asarray([1.1, 0.95, 0.85])
    lighting = lighting.at[1:4].set(jnp.asarray(rng.normal(size=(3, 3)) * 0.6, jnp.float32))
    appearance = Appearance(
        texture=jnp.asarray(rng.normal(size=albedo.num_coefficients) * 0.1, jnp.float32),
        lighting=lighting)
    vertices, _ = flame.flame_forward(model, params)
    normals = vertex_normals(to_camera_space(camera, vertices), model.faces)
    rendered = render_mesh(screen_space(camera, vertices), model.faces, normals, albedo,
                           appearance, SIZE, SIZE, config.raster, neighbors)
    alpha = np.asarray(rendered.alpha)
    images.append(np.asarray(rendered.image) + (1.0 - alpha)[..., None] * 0.3)
    masks.append((alpha > 0.99).astype(np.float32))
    pixels = np.asarray(project(camera, embedding.points(vertices, model.faces)))
    landmarks = np.zeros((478, 2), np.float32)
    landmarks[np.asarray(embedding.landmark_indices)] = pixels
    detected.append(landmarks)
    truths.append((params, camera, appearance))
  observation = Observation(
      landmarks=jnp.asarray(np.stack(detected)), landmark_weights=jnp.ones((2, 478)),
      image=jnp.asarray(np.stack(images), jnp.float32), face_mask=jnp.asarray(np.stack(masks)),
      valid=jnp.ones(2, bool))
  indices = np.asarray(embedding.landmark_indices)
  fit_model = make_fit_model(model, embedding.face_indices, embedding.barycentrics, indices,
                             np.ones(len(indices)), config, albedo)
  return fit_model, observation, config, truths


def test_recovers_lighting_albedo_and_pose(scene):
  fit_model, observation, config, truths = scene
  result = fit_batch(fit_model, observation, config)
  start = fit_batch(fit_model, observation, config.replace(full_iterations=0))
  assert np.all(np.asarray(result.fitted))
  error, start_error = np.asarray(result.photometric_error), np.asarray(start.photometric_error)
  assert np.all(error < 0.015) and np.all(error < 0.4 * start_error), (error, start_error)
  for i, (params, camera, appearance) in enumerate(truths):
    texture = np.asarray(result.appearance.texture[i])
    assert np.corrcoef(texture, np.asarray(appearance.texture))[0, 1] > 0.75
    # Band 0 trades against the albedo's constant part; the directional band-1 light is
    # recoverable: its per-channel directions line up with the truth.
    fitted_light = np.asarray(result.appearance.lighting[i, 1:4]).ravel()
    true_light = np.asarray(appearance.lighting[1:4]).ravel()
    cosine = fitted_light @ true_light / (np.linalg.norm(fitted_light) * np.linalg.norm(true_light))
    assert cosine > 0.8, cosine
    rotation_error = Rotation.from_rotvec(np.asarray(result.camera.rotation[i])).inv() * \
        Rotation.from_rotvec(np.asarray(camera.rotation))
    assert rotation_error.magnitude() < 0.03


def test_photometric_term_moves_the_fit(scene):
  """Same landmarks, different photo: the photometric stage must react to the pixels (a fit
  that ignored the image would give identical geometry). The directional light, which neither
  the landmarks nor the start (ambient light matched to the photo's mean colour) can tell, is
  found from the shading alone, in both the photo and a darker copy of it."""
  fit_model, observation, config, truths = scene
  darker = observation.replace(image=observation.image * 0.6)
  bright = fit_batch(fit_model, observation, config)
  dark = fit_batch(fit_model, darker, config)
  ratio = np.asarray(dark.appearance.lighting[:, 0]) / np.asarray(bright.appearance.lighting[:, 0])
  np.testing.assert_allclose(ratio, 0.6, atol=0.12)
  for fitted in (bright, dark):
    for i, (_, _, appearance) in enumerate(truths):
      light = np.asarray(fitted.appearance.lighting[i, 1:4]).ravel()
      true_light = np.asarray(appearance.lighting[1:4]).ravel()
      cosine = light @ true_light / max(np.linalg.norm(light) * np.linalg.norm(true_light), 1e-12)
      angle = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
      assert angle < 40.0, (i, angle)  # about 20-25 degrees when the photo drives the fit


def _texture_space_file(path, model, size=32, components=6, seed=0):
  """A FLAME_texture.npz-format file for the small synthetic head: UVs from a frontal planar
  projection, smooth random colour components (0-255, BGR, as in the real file)."""
  rng = np.random.default_rng(seed)
  vertices = np.asarray(model.v_template)
  uv = (vertices[:, :2] - vertices[:, :2].min(0)) / np.ptp(vertices[:, :2], axis=0)
  grid = np.linspace(0, 1, size)
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  waves = [np.cos(np.pi * (i % 3) * xx) * np.cos(np.pi * (i // 3) * yy) for i in range(components)]
  basis = np.stack([np.stack([w * rng.normal() for _ in range(3)], -1) for w in waves], -1) * 20
  np.savez(path, mean=np.full((size, size, 3), [110.0, 135.0, 180.0]), tex_dir=basis, vt=uv,
           ft=np.asarray(model.faces))


def test_uv_texture_space_drives_the_photometric_fit(scene, tmp_path):
  """With a UV texture space the fit moves its coefficients and lowers the colour error."""
  from jflame.albedo_io import load_texture_albedo
  fit_model, observation, config, _ = scene
  model = synthetic.synthetic_flame("small", seed=0)[0]
  _texture_space_file(tmp_path / "FLAME_texture.npz", model)
  albedo = load_texture_albedo(tmp_path / "FLAME_texture.npz", np.asarray(model.faces))
  uv_model = fit_model.replace(albedo=albedo)
  result = fit_batch(uv_model, observation, config)
  start = fit_batch(uv_model, observation, config.replace(full_iterations=0))
  assert result.appearance.texture.shape == (2, 6)
  assert np.all(np.abs(np.asarray(result.appearance.texture)).max(axis=1) > 0.05)
  assert np.all(np.asarray(result.photometric_error) < 0.8 * np.asarray(start.photometric_error))


def test_an_encoders_texture_and_lighting_are_where_the_photometric_fit_starts(scene, tmp_path):
  """DECA's texture and lighting (an InitialGuess) start the photometric stage of a fit with a
  texture space, slot by slot: an estimated slot starts at the guess (lighting in the renderer's
  units, as FitResult reports it), a slot without an estimate at the photo-matched ambient
  light and mean albedo."""
  from jflame.albedo_io import load_texture_albedo
  from jflame.starting_point import InitialGuess
  fit_model, observation, config, truths = scene
  model = synthetic.synthetic_flame("small", seed=0)[0]
  _texture_space_file(tmp_path / "FLAME_texture.npz", model)
  uv_model = fit_model.replace(albedo=load_texture_albedo(tmp_path / "FLAME_texture.npz",
                                                          np.asarray(model.faces)))
  rng = np.random.default_rng(5)
  lighting = np.stack([np.asarray(truth[2].lighting) for truth in truths]).astype(np.float32)
  texture = rng.normal(size=(2, 8)).astype(np.float32) * 0.3  # more than the space's 6
  guess = InitialGuess(estimated=np.array([True, False]), texture=texture, lighting=lighting)
  start = fit_batch(uv_model, observation, config.replace(full_iterations=0), guess)
  unguessed = fit_batch(uv_model, observation, config.replace(full_iterations=0))
  np.testing.assert_allclose(np.asarray(start.appearance.lighting[0]), lighting[0], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(start.appearance.texture[0]), texture[0, :6], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(start.appearance.lighting[1]),
                             np.asarray(unguessed.appearance.lighting[1]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(start.appearance.texture[1]), 0.0)
  assert not np.allclose(np.asarray(unguessed.appearance.lighting[0]), lighting[0], atol=0.05)


def test_a_flame_texture_file_is_refused_for_the_synthetic_head(tmp_path):
  from jflame import model_loading
  from jflame.engine import EngineOptions
  from jflame.errors import ConfigError
  model, embedding = synthetic.synthetic_flame("small", seed=0)
  _texture_space_file(tmp_path / "FLAME_texture.npz", model)
  loaded = model_loading.LoadedModel(model, embedding, model.name)
  options = EngineOptions(texture_model=str(tmp_path / "FLAME_texture.npz"))
  with pytest.raises(ConfigError, match="synthetic"):
    model_loading.load_albedo(loaded, options)
