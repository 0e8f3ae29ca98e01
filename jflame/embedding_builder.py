"""Builds a MediaPipe landmark embedding for any FLAME-topology model by rendering it
(the library behind `jflame-build-embedding`).

The model (rest pose, skin-coloured, lit from the front and above) is rendered from a few
views with jflame's rasterizer; MediaPipe's face mesh runs on each render; every detected
landmark is carried back onto the surface through the rasterizer's triangle id and
perspective-correct barycentrics at that pixel; the views are averaged in model space and
snapped to the nearest surface point. No third-party embedding file is needed. With a model
whose embedding is known (the synthetic one, or --reference_embedding), it reports how far the
built embedding lands from it.
"""

import numpy as np

import jax
import jax.numpy as jnp

from jflame import landmarks, landmarks_io
from jflame.camera import Camera, screen_space, to_camera_space
from jflame.render import (Appearance, RasterSettings, face_adjacency, laplacian_albedo_model,
                           neutral_lighting, render_mesh, vertex_normals)
from jflame.render.rasterize import Fragments

def view_camera(model, yaw_degrees, size, fov_degrees=20.0):
  """A camera looking at the face centre from the front, turned by `yaw_degrees` about the
  head's vertical axis, framing the face to about 60% of the image."""
  from scipy.spatial.transform import Rotation
  vertices = np.asarray(model.v_template)
  face = vertices[vertices[:, 2] > np.percentile(vertices[:, 2], 70)]
  centre = face.mean(axis=0)
  width = np.ptp(face[:, 0])
  focal = (size / 2) / np.tan(np.deg2rad(fov_degrees) / 2)
  distance = focal * width / (0.6 * size)
  rotation = Rotation.from_rotvec([np.pi, 0, 0]) * Rotation.from_euler("y", yaw_degrees,
                                                                        degrees=True)
  matrix = rotation.as_matrix()
  translation = np.array([0.0, 0.0, distance]) - matrix @ centre
  return Camera(rotation=jnp.asarray(rotation.as_rotvec(), jnp.float32),
                translation=jnp.asarray(translation, jnp.float32),
                focal_length=jnp.asarray(focal, jnp.float32),
                principal_point=jnp.asarray([size / 2, size / 2], jnp.float32))


def render_view(model, camera, size):
  """A grey-skin render of the rest-pose model and its fragments (host arrays)."""
  faces = model.faces
  vertices = model.v_template
  albedo = laplacian_albedo_model(vertices, faces, 1)
  lighting = neutral_lighting() * 0.75
  lighting = lighting.at[1].set(0.9).at[2].set(-0.9)  # from above (y) and the camera (-z)
  normals = vertex_normals(to_camera_space(camera, vertices), faces)
  output = render_mesh(screen_space(camera, vertices), faces, normals, albedo,
                       Appearance(texture=jnp.zeros(3), lighting=lighting), size, size,
                       RasterSettings(cull_backfaces=True),
                       jnp.asarray(face_adjacency(np.asarray(faces))))
  image = np.asarray(output.image) + (1 - np.asarray(output.alpha))[..., None] * 0.15
  return np.clip(image * 255, 0, 255).astype(np.uint8), jax.device_get(output.fragments)


def back_project(points_2d, fragments: Fragments, vertices_3d, faces):
  """Model-space surface points under (K, 2) pixel positions (nearest pixel's triangle and
  barycentrics); NaN where the pixel shows background."""
  height, width = fragments.triangle_id.shape
  cols = np.clip(np.floor(points_2d[:, 0]).astype(int), 0, width - 1)
  rows = np.clip(np.floor(points_2d[:, 1]).astype(int), 0, height - 1)
  triangle = np.asarray(fragments.triangle_id)[rows, cols]
  barycentric = np.asarray(fragments.barycentrics)[rows, cols]
  points = np.einsum("kc,kcd->kd", barycentric, vertices_3d[faces[np.maximum(triangle, 0)]])
  points[triangle < 0] = np.nan
  return points


def closest_surface_points(points, vertices, faces, radius=0.02):
  """(face index, barycentrics) of the closest surface point to each of (K, 3) points, among
  triangles with a corner within `radius` metres (Ericson's point-triangle regions)."""
  corners = vertices[faces]  # (F, 3, 3)
  face_ids, barycentrics = [], []
  for point in points:
    near = np.flatnonzero(np.min(np.linalg.norm(corners - point, axis=2), axis=1) < radius)
    if near.size == 0:
      near = np.arange(len(faces))
    bary = _closest_barycentrics(point, corners[near])
    closest = np.einsum("fc,fcd->fd", bary, corners[near])
    best = int(np.argmin(np.linalg.norm(closest - point, axis=1)))
    face_ids.append(near[best])
    barycentrics.append(bary[best])
  return np.asarray(face_ids, np.int32), np.asarray(barycentrics, np.float32)


def _closest_barycentrics(p, triangles):
  """Barycentrics of the closest point on each of (F, 3, 3) triangles to point p."""
  a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
  ab, ac, ap = b - a, c - a, p - a
  d1, d2 = np.einsum("fd,fd->f", ab, ap), np.einsum("fd,fd->f", ac, ap)
  bp, cp = p - b, p - c
  d3, d4 = np.einsum("fd,fd->f", ab, bp), np.einsum("fd,fd->f", ac, bp)
  d5, d6 = np.einsum("fd,fd->f", ab, cp), np.einsum("fd,fd->f", ac, cp)
  va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
  with np.errstate(divide="ignore", invalid="ignore"):
    denom = 1.0 / (va + vb + vc)
    v, w = vb * denom, vc * denom
    result = np.stack([1 - v - w, v, w], axis=1)
    t_ab = d1 / (d1 - d3)
    t_ac = d2 / (d2 - d6)
    t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
  zero, one = np.zeros_like(d1), np.ones_like(d1)
  regions = [  # (condition, barycentrics) of Ericson's vertex and edge regions
      ((d1 <= 0) & (d2 <= 0), lambda: np.stack([one, zero, zero], 1)),
      ((d3 >= 0) & (d4 <= d3), lambda: np.stack([zero, one, zero], 1)),
      ((d6 >= 0) & (d5 <= d6), lambda: np.stack([zero, zero, one], 1)),
      ((vc <= 0) & (d1 >= 0) & (d3 <= 0), lambda: np.stack([1 - t_ab, t_ab, zero], 1)),
      ((vb <= 0) & (d2 >= 0) & (d6 <= 0), lambda: np.stack([1 - t_ac, zero, t_ac], 1)),
      ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
       lambda: np.stack([zero, 1 - t_bc, t_bc], 1)),
  ]
  assigned = np.zeros(len(d1), bool)
  for condition, values in regions:
    take = condition & ~assigned
    if np.any(take):
      result[take] = values()[take]
    assigned |= take
  return np.nan_to_num(result)


def build_embedding(model, size, yaws, analyzer):
  """(embedding, per-view detection counts)."""
  vertices = np.asarray(model.v_template, np.float64)
  faces = np.asarray(model.faces)
  samples, counts = [], []
  for yaw in yaws:
    camera = view_camera(model, yaw, size)
    image, fragments = render_view(model, camera, size)
    meshes = analyzer.face_landmarks(image)
    counts.append(len(meshes))
    if meshes:
      samples.append(back_project(np.asarray(meshes[0])[:, :2], fragments, vertices, faces))
  if not samples:
    raise RuntimeError("MediaPipe found no face in any render of the model.")
  stacked = np.stack(samples)
  seen = np.any(np.all(np.isfinite(stacked), axis=2), axis=0)  # on the surface in some view
  mean = np.full(stacked.shape[1:], np.nan)
  mean[seen] = np.nanmedian(stacked[:, seen], axis=0)
  found = np.all(np.isfinite(mean), axis=1)
  face_ids, barycentrics = closest_surface_points(mean[found], vertices, faces)
  embedding = landmarks.LandmarkEmbedding(
      face_indices=jnp.asarray(face_ids), barycentrics=jnp.asarray(barycentrics),
      landmark_indices=jnp.asarray(np.flatnonzero(found), jnp.int32),
      name=f"built by rendering {model.name} from yaws {list(yaws)}")
  return embedding, counts


def compare(built, reference, model):
  """Distances (mm) between built and reference landmark points on the rest mesh, overall and
  per MediaPipe region."""
  vertices, faces = model.v_template, model.faces
  ref_points = dict(zip(np.asarray(reference.landmark_indices).tolist(),
                        np.asarray(reference.points(vertices, faces))))
  built_points = np.asarray(built.points(vertices, faces))
  distances = {}
  for index, point in zip(np.asarray(built.landmark_indices).tolist(), built_points):
    if index in ref_points:
      distances[index] = 1000 * float(np.linalg.norm(point - ref_points[index]))
  regions = landmarks_io.load_mediapipe_reference().regions
  report = dict(compared=len(distances),
                mean_mm=float(np.mean(list(distances.values()))),
                median_mm=float(np.median(list(distances.values()))),
                p90_mm=float(np.percentile(list(distances.values()), 90)))
  for name, members in regions.items():
    values = [distances[i] for i in members.tolist() if i in distances]
    if values:
      report[f"{name}_mean_mm"] = float(np.mean(values))
  return report
