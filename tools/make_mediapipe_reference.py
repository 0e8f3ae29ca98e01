"""Regenerates jflame/data/mediapipe_face.npz: a symmetric 3D reference face in MediaPipe's layout.

The synthetic FLAME-format model (`jflame.synthetic`) shapes its face through these points. They
come from running MediaPipe FaceMesh (478 landmarks, iris refinement on) on a real photograph that
is ours to use, `skimage.data.astronaut()` (public domain, NASA), and on its mirror image:

1. Both runs give 478 points (x, y in normalised image units, z in the same units as x). They are
   turned into FLAME axes (x to the subject's left, y up, z towards the viewer) in pixels.
2. The mirrored run says which landmark is which landmark's mirror twin: mirrored landmark i sits
   where the original run put i's twin. The twins are matched by an optimal assignment.
3. The symmetry plane is fitted (twin differences give its normal, twin midpoints its offset), the
   face is rotated so that plane is x = 0, pitched so the eye-corner to mouth-corner line is
   vertical, and averaged with its own mirror image so it is exactly symmetric.
4. It is scaled to metres with the distance between the iris centres set to 63 mm, and placed with
   the origin midway between the iris centres.

The file also carries MediaPipe's face-mesh triangles (oriented outwards, towards +z), the ordered
boundary loops (face oval, eyes, inner lips) and the landmark index set of every region, so the
runtime never needs MediaPipe itself.

Usage: .venv/bin/python tools/make_mediapipe_reference.py [--output jflame/data/mediapipe_face.npz]
"""

import argparse
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from jflame.atomic import atomic_path

NUM_LANDMARKS = 478
INTEROCULAR_METRES = 0.063
RIGHT_IRIS_CENTRE = 468  # Subject's right eye (image left in a frontal photograph).
LEFT_IRIS_CENTRE = 473
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "jflame" / "data" / "mediapipe_face.npz"


def detect_landmarks(face_mesh, image):
  """(478, 3) landmarks in FLAME axes, pixel units: x right in the image, y up, z to the camera.

  MediaPipe's z is expressed in the same normalised unit as x (image width), so multiplying both
  by the width keeps the point cloud isotropic.
  """
  result = face_mesh.process(np.ascontiguousarray(image))
  if not result.multi_face_landmarks:
    raise RuntimeError("MediaPipe found no face in the reference photograph.")
  height, width = image.shape[:2]
  raw = np.array([[p.x, p.y, p.z] for p in result.multi_face_landmarks[0].landmark])
  return np.stack([raw[:, 0] * width, -raw[:, 1] * height, -raw[:, 2] * width], axis=1)


def mirror_twins(points, points_from_mirror, image_width):
  """twin[i] = the landmark that is i's mirror image, from a run on the flipped photograph."""
  # Flip the mirrored run back into the original image: mirrored landmark i lands where the
  # original run put twin(i). Match in 2D (z is the least reliable coordinate).
  unflipped = points_from_mirror[:, :2] * np.array([-1.0, 1.0]) + np.array([image_width, 0.0])
  cost = np.linalg.norm(unflipped[:, None, :] - points[None, :, :2], axis=-1)
  rows, cols = linear_sum_assignment(cost)
  twin = np.empty(len(points), np.int64)
  twin[rows] = cols
  # A mirror correspondence is an involution; anything else means a detection went wrong.
  if not np.array_equal(twin[twin], np.arange(len(twin))):
    raise RuntimeError("The mirror correspondence is not an involution; inspect the detections.")
  return twin


def symmetry_frame(points, twin):
  """Rotation (3, 3) and centre (3,) that put the face's symmetry plane at x = 0."""
  paired = np.flatnonzero(twin != np.arange(len(twin)))
  differences = points[paired] - points[twin[paired]]
  # The twin differences are all parallel to the plane normal: take their main direction.
  _, _, vt = np.linalg.svd(differences, full_matrices=False)
  normal = vt[0] * np.sign(vt[0][0])
  midpoints = 0.5 * (points + points[twin])
  centre = midpoints.mean(axis=0)
  # Complete the frame: y as close to the image's up direction as the plane allows.
  up = np.array([0.0, 1.0, 0.0]) - normal * normal[1]
  up /= np.linalg.norm(up)
  forward = np.cross(normal, up)
  return np.stack([normal, up, forward]), centre


def rotation_about_x(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def symmetrise(points, twin):
  """Frontalised, levelled, exactly symmetric copy of `points` (same units)."""
  rotation, centre = symmetry_frame(points, twin)
  aligned = (points - centre) @ rotation.T
  # Pitch: the line from the mouth corners to the eye corners is vertical.
  eyes = aligned[[33, 133, 263, 362]].mean(axis=0)
  mouth = aligned[[61, 291]].mean(axis=0)
  line = eyes - mouth
  aligned = aligned @ rotation_about_x(-np.arctan2(line[2], line[1])).T
  mirrored = aligned[twin] * np.array([-1.0, 1.0, 1.0])
  return 0.5 * (aligned + mirrored)


def asymmetry(points, twin):
  """RMS distance between a point cloud and its best rigid mirror image (for the z-scale check)."""
  mirrored = points[twin] * np.array([-1.0, 1.0, 1.0])
  a = points - points.mean(0)
  b = mirrored - mirrored.mean(0)
  u, _, vt = np.linalg.svd(b.T @ a)
  d = np.sign(np.linalg.det(u @ vt))
  rot = u @ np.diag([1.0, 1.0, d]) @ vt
  return np.sqrt(np.mean(np.sum((b @ rot - a) ** 2, axis=1)))


def oriented_triangles(edges):
  """Triangles of MediaPipe's face mesh from its edge set, consistently oriented.

  Every 3-cycle of the edge graph is a candidate; a cycle whose three edges are each shared by
  three candidates is a hole-spanning cycle, not a face, and is dropped.
  """
  neighbours = {}
  for a, b in edges:
    neighbours.setdefault(a, set()).add(b)
    neighbours.setdefault(b, set()).add(a)
  candidates = set()
  for a, b in edges:
    for c in neighbours[a] & neighbours[b]:
      candidates.add(tuple(sorted((a, b, c))))

  def edge_uses(tris):
    uses = {}
    for t in tris:
      for i in range(3):
        uses.setdefault(tuple(sorted((t[i], t[(i + 1) % 3]))), []).append(t)
    return uses

  uses = edge_uses(candidates)
  spurious = {t for t in candidates
              if all(len(uses[tuple(sorted((t[i], t[(i + 1) % 3])))]) > 2 for i in range(3))}
  triangles = sorted(candidates - spurious)
  uses = edge_uses(triangles)
  if any(len(u) > 2 for u in uses.values()):
    raise RuntimeError("MediaPipe's edge set did not resolve into a manifold triangle mesh.")
  # Orient by flood fill: neighbours must traverse their shared edge in opposite directions.
  index = {t: i for i, t in enumerate(triangles)}
  oriented = [None] * len(triangles)
  for seed in range(len(triangles)):
    if oriented[seed] is not None:
      continue
    oriented[seed] = triangles[seed]
    stack = [seed]
    while stack:
      current = oriented[stack.pop()]
      for i in range(3):
        a, b = current[i], current[(i + 1) % 3]
        for other in uses[tuple(sorted((a, b)))]:
          j = index[other]
          if oriented[j] is not None:
            continue
          c = [v for v in other if v not in (a, b)][0]
          oriented[j] = (b, a, c)  # Shared edge reversed.
          stack.append(j)
  return np.array(oriented, np.int64)


def ordered_loop(edges, start):
  """Orders the vertices of a closed edge loop, starting at `start`."""
  neighbours = {}
  for a, b in edges:
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  loop = [start]
  previous = None
  while True:
    options = [n for n in neighbours[loop[-1]] if n != previous]
    nxt = options[0] if previous is not None else min(options)
    if nxt == start:
      break
    previous = loop[-1]
    loop.append(nxt)
  if len(loop) != len(neighbours):
    raise RuntimeError("Edge set is not a single closed loop.")
  return np.array(loop, np.int64)


def vertex_set(edges):
  return np.array(sorted({v for edge in edges for v in edge}), np.int64)


def orient_loop(loop, points, counter_clockwise_seen_from=np.array([0.0, 0.0, 1.0])):
  """Reverses `loop` if needed so it runs counter-clockwise seen from the given direction."""
  centred = points[loop] - points[loop].mean(0)
  area = np.cross(centred, np.roll(centred, -1, axis=0)).sum(0)
  return loop if area @ counter_clockwise_seen_from > 0 else loop[::-1]


def build_reference():
  """Runs MediaPipe and returns the dict that goes into the .npz file."""
  import mediapipe as mp
  from mediapipe.python.solutions import face_mesh_connections as conn
  from skimage import data

  image = data.astronaut()
  with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True,
                                       max_num_faces=1) as face_mesh:
    points = detect_landmarks(face_mesh, image)
    points_from_mirror = detect_landmarks(face_mesh, image[:, ::-1])
  twin = mirror_twins(points, points_from_mirror, image.shape[1])

  # MediaPipe documents z as "roughly the same scale as x". A check: a rigid face is mirror
  # symmetric only at its true depth scale, so the residual should be least near 1 (for a nearly
  # frontal photograph like this one it is flat, and the check only rules out gross errors).
  z_scales = np.array([0.5, 0.75, 1.0, 1.25, 1.5])
  z_residuals = np.array([asymmetry(points * np.array([1.0, 1.0, s]), twin) for s in z_scales])

  symmetric = symmetrise(points, twin)
  scale = INTEROCULAR_METRES / np.linalg.norm(symmetric[LEFT_IRIS_CENTRE]
                                              - symmetric[RIGHT_IRIS_CENTRE])
  positions = symmetric * scale
  positions -= 0.5 * (positions[LEFT_IRIS_CENTRE] + positions[RIGHT_IRIS_CENTRE])
  positions[:, 0] = np.where(twin == np.arange(NUM_LANDMARKS), 0.0, positions[:, 0])

  edges = {tuple(sorted(e)) for e in conn.FACEMESH_TESSELATION}
  triangles = oriented_triangles(edges)
  normals = np.cross(positions[triangles[:, 1]] - positions[triangles[:, 0]],
                     positions[triangles[:, 2]] - positions[triangles[:, 0]])
  if normals[:, 2].sum() < 0:  # Outward = towards the viewer (+z) for a face.
    triangles = triangles[:, ::-1]

  def loop(edge_set, start):
    return orient_loop(ordered_loop(edge_set, start), positions)

  regions = {
      "eyes": np.union1d(vertex_set(conn.FACEMESH_LEFT_EYE), vertex_set(conn.FACEMESH_RIGHT_EYE)),
      "iris": np.arange(468, 478),
      "lips": vertex_set(conn.FACEMESH_LIPS),
      "brows": np.union1d(vertex_set(conn.FACEMESH_LEFT_EYEBROW),
                          vertex_set(conn.FACEMESH_RIGHT_EYEBROW)),
      "nose": vertex_set(conn.FACEMESH_NOSE),
      "face_oval": vertex_set(conn.FACEMESH_FACE_OVAL),
  }
  inner_lip_edges = [e for e in conn.FACEMESH_LIPS
                     if set(e) <= {78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310,
                                   311, 312, 13, 82, 81, 80, 191}]
  result = {
      "positions": positions.astype(np.float32),
      "mirror": twin.astype(np.int16),
      "triangles": triangles.astype(np.int16),
      "face_oval_loop": loop(conn.FACEMESH_FACE_OVAL, 10).astype(np.int16),
      "left_eye_loop": loop(conn.FACEMESH_LEFT_EYE, 362).astype(np.int16),
      "right_eye_loop": loop(conn.FACEMESH_RIGHT_EYE, 133).astype(np.int16),
      "inner_lips_loop": loop(inner_lip_edges, 78).astype(np.int16),
      "source": np.array(
          f"MediaPipe FaceMesh {mp.__version__} (refine_landmarks=True) on "
          "skimage.data.astronaut() (public domain, NASA) and its mirror image; symmetrised, "
          f"frontalised, iris centres {INTEROCULAR_METRES * 1000:.0f} mm apart, metres, FLAME "
          "axes (x subject's left, y up, z towards the viewer), origin between the iris centres. "
          "Made by tools/make_mediapipe_reference.py."),
  }
  for name, indices in regions.items():
    result[f"region_{name}"] = indices.astype(np.int16)
  report = ", ".join(f"{s:.2f}: {r:.3f}" for s, r in zip(z_scales, z_residuals))
  return result, f"asymmetry residual (px) by z scale: {report}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where to write the .npz")
  args = parser.parse_args()
  reference, z_check = build_reference()
  with atomic_path(args.output, suffix=".npz") as tmp:
    np.savez_compressed(tmp, **reference)
  positions = reference["positions"]
  print(f"wrote {args.output}: {len(positions)} landmarks, "
        f"{len(reference['triangles'])} triangles, face width "
        f"{np.ptp(positions[:, 0]) * 1000:.1f} mm, height {np.ptp(positions[:, 1]) * 1000:.1f} mm, "
        f"depth {np.ptp(positions[:, 2]) * 1000:.1f} mm; {z_check}")


if __name__ == "__main__":
  main()
