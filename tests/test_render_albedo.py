"""Albedo models: the built-in Laplacian basis and the FLAME UV texture loaders (on small
synthetic .npz files with the real files' keys and conventions)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jflame.errors import ConfigError, ModelFileError
from jflame.albedo_io import load_texture_albedo
from jflame.render import (Appearance, albedo_texture, laplacian_albedo_model, pixel_albedo,
                           rasterize, render_mesh, sample_texture, vertex_albedo)
from jflame.render.albedo import DEFAULT_SKIN_RGB, graph_laplacian
from tests.test_render_reference import icosphere

# Compared with float64 / NumPy references: full float32 matmul precision (GPUs default to TF32).
pytestmark = pytest.mark.usefixtures("reference_precision")

# A unit quad split into two triangles, with UVs covering the whole texture; the UV faces
# differ from the geometry faces (as FLAME's ft does from its f).
QUAD_FACES = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
QUAD_VT = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
QUAD_FT = np.array([[0, 1, 2], [0, 2, 3]])


def _write_flame_texture(path, size=8, components=4, seed=0):
  rng = np.random.default_rng(seed)
  mean_bgr = rng.uniform(0, 255, (size, size, 3))
  basis_bgr = rng.normal(0, 20, (size, size, 3, components))
  np.savez(path, mean=mean_bgr, tex_dir=basis_bgr, vt=QUAD_VT, ft=QUAD_FT)
  return mean_bgr, basis_bgr


def test_flame_texture_space_loads_as_rgb_in_unit_range(tmp_path):
  path = tmp_path / "FLAME_texture.npz"
  mean_bgr, basis_bgr = _write_flame_texture(path)
  model = load_texture_albedo(path, QUAD_FACES, num_components=2)
  assert model.is_texture and model.texture_size == 8 and model.num_coefficients == 2
  np.testing.assert_allclose(model.mean.reshape(8, 8, 3), mean_bgr[..., ::-1] / 255, rtol=1e-6)
  np.testing.assert_allclose(model.basis.reshape(8, 8, 3, 2), basis_bgr[..., ::-1, :2] / 255,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.face_uvs, QUAD_VT[QUAD_FT])
  coefficients = jnp.asarray([0.5, -1.0])
  texture = np.asarray(albedo_texture(model, coefficients))
  expected = (mean_bgr + basis_bgr[..., :2] @ np.array([0.5, -1.0]))[..., ::-1] / 255
  np.testing.assert_allclose(texture, expected, rtol=1e-5, atol=1e-6)


def test_texture_is_downsampled_by_block_averaging(tmp_path):
  path = tmp_path / "FLAME_texture.npz"
  mean_bgr, _ = _write_flame_texture(path)
  model = load_texture_albedo(path, QUAD_FACES, texture_size=4)
  assert model.texture_size == 4 and model.num_coefficients == 4
  expected = mean_bgr.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))[..., ::-1] / 255
  np.testing.assert_allclose(model.mean.reshape(4, 4, 3), expected, rtol=1e-5)
  with pytest.raises(ConfigError, match="divide"):
    load_texture_albedo(path, QUAD_FACES, texture_size=3)


def test_bfm_albedo_with_uvs_from_another_file(tmp_path):
  size, components = 4, 3
  rng = np.random.default_rng(1)
  mu = rng.uniform(0, 1, size * size * 3)
  pc = rng.normal(0, 0.1, (size * size * 3, components))
  albedo_path = tmp_path / "FLAME_albedo_from_BFM.npz"
  np.savez(albedo_path, MU=mu, PC=pc)
  with pytest.raises(ModelFileError, match="uv_path"):
    load_texture_albedo(albedo_path, QUAD_FACES)
  uv_path = tmp_path / "FLAME_texture.npz"
  _write_flame_texture(uv_path)
  model = load_texture_albedo(albedo_path, QUAD_FACES, uv_path=uv_path)
  # Values already in [0, 1] are not rescaled; channels still go BGR -> RGB.
  np.testing.assert_allclose(model.mean.reshape(size, size, 3),
                             mu.reshape(size, size, 3)[..., ::-1], rtol=1e-6)
  assert model.num_coefficients == components


def test_missing_or_malformed_files_say_where_they_come_from(tmp_path):
  with pytest.raises(ModelFileError, match="FLAME_texture.npz.*not found.*FLAME website"):
    load_texture_albedo(tmp_path / "FLAME_texture.npz", QUAD_FACES)
  garbage = tmp_path / "broken.npz"
  garbage.write_bytes(b"not a zip archive")
  with pytest.raises(ModelFileError, match="broken.npz.*readable"):
    load_texture_albedo(garbage, QUAD_FACES)
  wrong_keys = tmp_path / "wrong.npz"
  np.savez(wrong_keys, something=np.zeros(3))
  with pytest.raises(ModelFileError, match="'mean' and 'tex_dir'.*'MU' and 'PC'"):
    load_texture_albedo(wrong_keys, QUAD_FACES)
  path = tmp_path / "FLAME_texture.npz"
  _write_flame_texture(path)
  with pytest.raises(ModelFileError, match="do not fit"):
    load_texture_albedo(path, np.zeros((5, 3), np.int32))


def test_texture_lookup_is_bilinear_with_v_up():
  texture = jnp.arange(4 * 4 * 1, dtype=jnp.float32).reshape(4, 4, 1)
  # Texel (row 0, column 0) is the top-left corner: u = 0.125, v = 1 - 0.125.
  np.testing.assert_allclose(sample_texture(texture, jnp.asarray([0.125, 0.875])), [0.0])
  np.testing.assert_allclose(sample_texture(texture, jnp.asarray([0.375, 0.875])), [1.0])
  np.testing.assert_allclose(sample_texture(texture, jnp.asarray([0.125, 0.625])), [4.0])
  # Half-way between four texels, and clamping beyond the outer texel centres.
  np.testing.assert_allclose(sample_texture(texture, jnp.asarray([0.25, 0.75])), [2.5])
  np.testing.assert_allclose(sample_texture(texture, jnp.asarray([1.0, 0.0])), [15.0])


def test_uv_albedo_per_pixel_and_per_vertex(tmp_path):
  path = tmp_path / "FLAME_texture.npz"
  _write_flame_texture(path)
  model = load_texture_albedo(path, QUAD_FACES, num_components=3)
  coefficients = jnp.asarray([0.3, -0.2, 0.1])
  texture = albedo_texture(model, coefficients)
  # The quad at constant depth covers pixels 2..13 of a 16 x 16 image: u runs with x, v up.
  screen = jnp.asarray([[2.0, 2.0, 1.0], [14.0, 2.0, 1.0], [14.0, 14.0, 1.0], [2.0, 14.0, 1.0]])
  fragments = rasterize(screen, QUAD_FACES, 16, 16)
  albedo = np.asarray(pixel_albedo(model, coefficients, fragments, QUAD_FACES))
  for row, col in [(2, 2), (5, 9), (13, 13), (8, 3)]:
    uv = jnp.asarray([(col + 0.5 - 2) / 12, 1 - (row + 0.5 - 2) / 12])
    np.testing.assert_allclose(albedo[row, col], sample_texture(texture, uv), atol=1e-5)
  assert np.all(albedo[0] == 0) and np.all(albedo[:, 15] == 0)
  per_vertex = np.asarray(vertex_albedo(model, coefficients))
  np.testing.assert_allclose(per_vertex[2], sample_texture(texture, jnp.asarray([1.0, 0.0])))
  # render_mesh with neutral light shows the texture itself.
  image = render_mesh(screen, QUAD_FACES, jnp.tile(jnp.asarray([[0.0, 0.0, -1.0]]), (4, 1)),
                      model, Appearance(coefficients, Appearance.neutral(3).lighting), 16, 16)
  np.testing.assert_allclose(image.image[5, 9], albedo[5, 9], atol=1e-5)


def test_laplacian_basis_is_smooth_orthonormal_and_per_channel():
  vertices, faces = icosphere(2)
  model = laplacian_albedo_model(vertices, faces, num_per_channel=6)
  num_vertices = len(vertices)
  assert not model.is_texture and model.num_coefficients == 18
  np.testing.assert_allclose(model.mean, np.tile(DEFAULT_SKIN_RGB, (num_vertices, 1)), atol=1e-7)
  basis = np.asarray(model.basis)
  functions = basis[:, 0, :6]
  # Channel blocks: red coefficients move only red, and all channels share the functions.
  assert np.all(basis[:, 0, 6:] == 0) and np.all(basis[:, 1, :6] == 0)
  np.testing.assert_array_equal(basis[:, 1, 6:12], functions)
  np.testing.assert_array_equal(basis[:, 2, 12:], functions)
  # Unit RMS, mutually orthogonal, first constant, each an eigenvector with growing eigenvalue.
  np.testing.assert_allclose(functions.T @ functions / num_vertices, np.eye(6), atol=1e-4)
  assert np.std(functions[:, 0]) < 1e-4
  laplacian = graph_laplacian(num_vertices, faces)
  energy = np.einsum("vk,vk->k", functions, laplacian @ functions) / num_vertices
  assert np.all(np.diff(energy) >= -1e-4) and energy[1] > 0.01
  residual = laplacian @ functions - functions * energy
  assert np.abs(residual).max() < 1e-3
  np.testing.assert_allclose(vertex_albedo(model, jnp.zeros(18)), model.mean)


def test_laplacian_basis_gives_each_part_of_a_split_mesh_its_own_constant():
  vertices, faces = icosphere(1)
  n = len(vertices)
  two_parts = np.concatenate([faces, faces + n])
  model = laplacian_albedo_model(np.concatenate([vertices, vertices + 3]), two_parts, 4)
  first_two = np.asarray(model.basis)[:, 0, :2]
  # Both lowest functions are constant on each part, and together they separate the parts.
  for f in first_two.T:
    assert np.std(f[:n]) < 1e-4 and np.std(f[n:]) < 1e-4
  assert np.linalg.matrix_rank(np.stack([first_two[0], first_two[n]]), tol=1e-3) == 2
  with pytest.raises(ConfigError):
    laplacian_albedo_model(vertices, faces, num_per_channel=0)
