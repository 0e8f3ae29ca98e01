"""Small mesh and geometry helpers of the synthetic head (NumPy, host side)."""

import numpy as np
import scipy.sparse
import scipy.sparse.linalg



def normalise(vectors, axis=-1):
  return vectors / np.linalg.norm(vectors, axis=axis, keepdims=True)


def vertex_normals(vertices, triangles):
  corners = vertices[triangles]
  face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  normals = np.zeros_like(vertices)
  for corner in range(3):
    np.add.at(normals, triangles[:, corner], face_normals)
  length = np.linalg.norm(normals, axis=1, keepdims=True)
  return normals / np.maximum(length, 1e-12)


def smoothstep(x, lo, hi):
  t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def edge_key(a, b, num_vertices):
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  return lo.astype(np.int64) * num_vertices + hi


def strip(loop_a, loop_b):
  """Triangles joining two closed rings of equal length, consistently oriented (the caller
  flips the whole band if it faces the wrong way)."""
  a, b = np.asarray(loop_a), np.asarray(loop_b)
  a_next, b_next = np.roll(a, -1), np.roll(b, -1)
  return np.concatenate([np.stack([a, b, a_next], 1), np.stack([a_next, b, b_next], 1)])


def fan(loop, apex):
  loop = np.asarray(loop)
  return np.stack([loop, np.full_like(loop, apex), np.roll(loop, -1)], 1)


def inside_polygon(points, polygon):
  """Even-odd test of (N, 2) points against a closed (P, 2) polygon."""
  x, y = points[:, 0:1], points[:, 1:2]
  x0, y0 = polygon[None, :, 0], polygon[None, :, 1]
  x1, y1 = np.roll(x0, -1, axis=1), np.roll(y0, -1, axis=1)
  straddles = (y0 > y) != (y1 > y)
  with np.errstate(divide="ignore", invalid="ignore"):
    crossing_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
  return np.sum(straddles & (x < crossing_x), axis=1) % 2 == 1


def _near_polygon_edge(points, polygon, factor):
  """True for (N, 2) points closer to some edge of the closed polygon than `factor` times that
  edge's length."""
  start = polygon[None, :, :]
  edge = np.roll(polygon, -1, axis=0)[None] - start
  length_sq = np.sum(edge * edge, axis=-1)
  # Only points near the polygon's bounding box can be near an edge.
  reach = factor * np.sqrt(length_sq.max())
  candidate = np.all((points > polygon.min(0) - reach) & (points < polygon.max(0) + reach), axis=1)
  near = points[candidate]
  t = np.clip(np.sum((near[:, None, :] - start) * edge, axis=-1) / length_sq, 0.0, 1.0)
  distance_sq = np.sum((start + t[..., None] * edge - near[:, None, :]) ** 2, axis=-1)
  result = np.zeros(len(points), bool)
  result[candidate] = np.any(distance_sq < factor ** 2 * length_sq, axis=1)
  return result


def outside_loop(directions, loop_directions, pole, margin=0.75):
  """True for unit directions clearly outside a closed loop of directions around `pole`: not
  inside it, and not so near an edge that the edge could be missing from a Delaunay
  triangulation that includes them."""
  plane = stereographic(directions, pole)
  loop_plane = stereographic(loop_directions, pole)
  return ~inside_polygon(plane, loop_plane) & ~_near_polygon_edge(plane, loop_plane, margin)


def stereographic(directions, pole):
  """Projects unit directions from the antipode of `pole` onto the plane through the origin."""
  pole = normalise(np.asarray(pole, np.float64))
  helper = np.array([0.0, 0.0, 1.0]) if abs(pole[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
  u = normalise(np.cross(helper, pole))
  v = np.cross(pole, u)
  denominator = 1.0 + directions @ pole
  return np.stack([directions @ u, directions @ v], 1) / np.maximum(denominator, 1e-9)[:, None]


def graph_laplacian(num_vertices, triangles):
  """Uniform (umbrella) Laplacian L = I - D^-1 A as a sparse matrix."""
  edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
  edges = np.concatenate([edges, edges[:, ::-1]])
  adjacency = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                                      shape=(num_vertices, num_vertices)).tocsr()
  adjacency.data[:] = 1.0  # duplicate edges summed above; count each once
  degree = np.maximum(np.asarray(adjacency.sum(axis=1)).ravel(), 1.0)
  identity = scipy.sparse.identity(num_vertices, format="csr")
  return identity - scipy.sparse.diags(1.0 / degree) @ adjacency


def solve_dirichlet(operator, values, known):
  """Solves operator @ x = 0 on the unknown rows, with x fixed to `values` where `known`."""
  values = np.array(values, np.float64)
  unknown = ~known
  if not unknown.any():
    return values
  operator = operator.tocsr()
  a = operator[unknown][:, unknown].tocsc()
  rhs = -operator[unknown][:, known] @ values[known]
  values[unknown] = scipy.sparse.linalg.spsolve(a, rhs)
  return values
