"""Rasterization of one triangle mesh into one image: hard visibility plus differentiable geometry.

The split follows nvdiffrast. Visibility (which triangle is nearest at each pixel centre) is a
discrete choice and carries no gradient; everything that depends continuously on the vertices is
recomputed from the current vertex positions for the chosen triangle, so it is differentiable:
perspective-correct barycentrics, depth, and the antialiasing edge weights that give silhouettes
and occlusion boundaries their gradient.

Visibility: every triangle covers its pixel-centre bounding box with square tiles of
`tile_size` pixels. All (triangle, tile) pairs form one flat work list, and a `lax.while_loop`
walks it in fixed-size chunks: each chunk tests its pixels against the triangle and writes
(quantised inverse depth, triangle id) packed into one int32 with a single scatter-min, so the
nearest triangle wins and ties go to the lower id. The work is proportional to the pixel area the
triangles' boxes cover, not to triangles x pixels, and a triangle of any size is drawn whole: a
big one simply contributes more tiles and, if needed, more loop trips.

Soft coverage: analytic antialiasing in the manner of nvdiffrast's `antialias`. It was chosen
over a SoftRas-style sigmoid band or K nearest faces per pixel because it widens no splat
footprint and needs no per-pixel candidate lists, it antialiases colour at occlusion boundaries
inside the image (nose over cheek) as well as the outline against the background, and its
derivative is the exact derivative of a pixel's area-integrated colour for a straight edge.
Silhouette edges (where the surface ends or turns away, found from `face_adjacency` and the
screen orientation of each face) are walked along the rows or columns of pixel centres they
cross; each crossing between two pixel centres moves part of one pixel's area to the surface
seen by its neighbour. The resulting sparse list (`Fragments.edge_pixel`, `edge_source` and the
differentiable `edge_weight`) costs in proportion to the silhouettes' length; `antialias(image,
fragments)` blends any image with it, and `Fragments.coverage` is the antialiased hard mask.
Gradients reach an edge only where it crosses between two pixel centres (a one-pixel band), as
in nvdiffrast: enough to align outlines that start within a few pixels.

Conventions (see `jflame.camera`): screen vertices are (x_pixel, y_pixel, depth) with pixel
centres at +0.5, x right, y down, depth = camera z in metres, > 0 in front of the camera.
A triangle whose vertices appear clockwise on screen (x right, y down), i.e. one that is
counter-clockwise seen from the camera in a y-up frame, is front-facing: that is how FLAME's
outward-oriented faces appear from outside.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jflame.errors import ConfigError

_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class RasterSettings:
  """Static rasterizer settings (hashable; pass as a static argument).

  Attributes:
    tile_size: side in pixels of the square tiles a triangle's bounding box is covered with.
      Only a speed knob: a triangle of any size is drawn whole. Small values waste fewer pixel
      tests on small triangles; 4 suits FLAME at 128-512 pixels.
    tiles_per_step: tiles processed per trip of the rasterization loop; 0 picks one per
      backend: on an accelerator enough to cover a typical head crop in one or two trips, on a
      CPU cache-sized trips of about 32k pixel tests. Only a speed/memory knob.
    cull_backfaces: skip triangles that face away from the camera. Faster (the back of a
      head never generates work) and exact for closed meshes; leave it off when the inside of
      an open mesh may be visible.
    antialias: compute the analytic edge weights (soft coverage and silhouette gradients).
      Without them `coverage` is the hard mask and outlines carry no gradient.
    max_antialias_pairs: most pixel pairs that silhouette edges cross (about the silhouettes'
      length in pixels, hidden ones included); 0 picks 8 * (height + width). Crossings beyond
      it get no antialiasing.
    max_silhouette_edges: most silhouette edges considered; 0 picks max(256, F / 4).
    near: triangles with a vertex closer to the camera than this (metres) are not drawn.
    background_depth: depth written where no triangle is visible.
  """
  tile_size: int = 4
  tiles_per_step: int = 0
  cull_backfaces: bool = False
  antialias: bool = True
  max_antialias_pairs: int = 0
  max_silhouette_edges: int = 0
  near: float = 1e-3
  background_depth: float = 0.0

  def __post_init__(self):
    if self.tile_size < 1:
      raise ConfigError(f"RasterSettings.tile_size must be >= 1, got {self.tile_size}.")
    if self.tiles_per_step < 0:
      raise ConfigError(
          f"RasterSettings.tiles_per_step must be >= 0 (0 = automatic), got {self.tiles_per_step}.")
    for name in ("max_antialias_pairs", "max_silhouette_edges"):
      if getattr(self, name) < 0:
        raise ConfigError(f"RasterSettings.{name} must be >= 0 (0 = automatic), got "
                          f"{getattr(self, name)}.")
    if not self.near > 0.0:
      raise ConfigError(f"RasterSettings.near must be > 0 metres, got {self.near}.")


@struct.dataclass
class Fragments:
  """What the rasterizer knows about each pixel of one image.

  Attributes:
    triangle_id: (H, W) int32, the visible triangle at the pixel centre, -1 for background.
    vertex_ids: (H, W, 3) int32, that triangle's vertex indices (0 for background).
    barycentrics: (H, W, 3) perspective-correct barycentrics of the pixel centre (0 for
      background); differentiable w.r.t. the screen vertices.
    depth: (H, W) camera-space depth in metres (`background_depth` for background).
    coverage: (H, W) soft alpha in [0, 1]: the antialiased hard mask.
    edge_pixel: (M,) int32 flat index (row * W + column) of a pixel that a silhouette edge
      cuts; M = `max_antialias_pairs` (0 when antialiasing is off).
    edge_source: (M,) int32 flat index of its neighbour across the edge.
    edge_weight: (M,) fraction of the pixel's area that shows the neighbour's surface, in
      [0, 0.5] (0 for unused entries); differentiable w.r.t. the edge's vertices.
  """
  triangle_id: jax.Array
  vertex_ids: jax.Array
  barycentrics: jax.Array
  depth: jax.Array
  coverage: jax.Array
  edge_pixel: jax.Array
  edge_source: jax.Array
  edge_weight: jax.Array

  @property
  def mask(self) -> jax.Array:
    """(H, W) bool, True where a triangle is visible at the pixel centre."""
    return self.triangle_id >= 0


def face_adjacency(faces) -> np.ndarray:
  """Host-side edge neighbours of every face, for exact silhouette detection.

  Args:
    faces: (F, 3) integer vertex indices.

  Returns:
    (F, 3) int32: entry [f, k] is the other face that shares edge (faces[f, k], faces[f, k+1 mod
    3]), or -1 on a mesh boundary. On a non-manifold edge faces are paired arbitrarily and the
    rest count as boundary.
  """
  faces = np.asarray(faces, np.int64).reshape(-1, 3)
  num_faces = faces.shape[0]
  start = faces.reshape(-1)
  end = np.roll(faces, -1, axis=1).reshape(-1)
  lo, hi = np.minimum(start, end), np.maximum(start, end)
  edge_key = lo * (int(faces.max(initial=0)) + 1) + hi
  order = np.argsort(edge_key, kind="stable")
  sorted_key = edge_key[order]
  neighbors = np.full(3 * num_faces, -1, np.int64)
  # Half-edges of one edge are adjacent after sorting; pair the first two of every run.
  run_start = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
  first = np.flatnonzero(run_start[:-1] & (sorted_key[1:] == sorted_key[:-1]))
  a, b = order[first], order[first + 1]
  neighbors[a], neighbors[b] = b // 3, a // 3
  return neighbors.reshape(num_faces, 3).astype(np.int32)


def _signed_area2(xy):
  """Twice the signed screen area of (..., 3, 2) triangles (negative = front-facing)."""
  d1 = xy[..., 1, :] - xy[..., 0, :]
  d2 = xy[..., 2, :] - xy[..., 0, :]
  return d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]


def _triangle_setup(screen_vertices, faces, height, width, settings):
  """Per-triangle data the visibility pass needs (no gradient).

  Returns (one row per triangle, so the tile loop gathers whole rows):
    coefficients: (F, 15) float: for each edge k the canonical start point (x, y) and the
      edge-normal (a, b) oriented so that the inside is >= 0, then the three per-vertex factors
      of the inverse-depth plane.
    boxes: (F, 5) int32 pixel-centre bounding box (col_lo, row_lo, col_hi, row_hi) and the number
      of tiles across it.
    num_tiles: (F,) int32 tiles each triangle needs (0 when it is not drawn).
    depth_range: (2,) inverse-depth range used to quantise depth.
    drawn: (F,) bool, the triangle is rasterized.
    area2: (F,) twice the signed screen area.
  """
  dtype = screen_vertices.dtype
  corners = screen_vertices[faces]                       # (F, 3, 3)
  xy, z = corners[..., :2], corners[..., 2]
  area2 = _signed_area2(xy)
  drawn = jnp.all(z > settings.near, axis=-1) & (area2 != 0) & jnp.all(jnp.isfinite(xy), (-1, -2))
  if settings.cull_backfaces:
    drawn &= area2 < 0
  orientation = jnp.where(area2 < 0, -1.0, 1.0).astype(dtype)

  # Edge k runs from vertex k to vertex k + 1. Its function is evaluated from the endpoint with
  # the lower vertex index so that two triangles sharing the edge compute exactly negated values:
  # a pixel centre on a shared edge is inside at least one of them (no cracks).
  start_ids, end_ids = faces, jnp.roll(faces, -1, axis=1)
  start_xy, end_xy = xy, jnp.roll(xy, -1, axis=1)
  swapped = start_ids > end_ids
  lo_xy = jnp.where(swapped[..., None], end_xy, start_xy)
  hi_xy = jnp.where(swapped[..., None], start_xy, end_xy)
  sign = jnp.where(swapped, -1.0, 1.0).astype(dtype) * orientation[:, None]
  normal_a = (lo_xy[..., 1] - hi_xy[..., 1]) * sign      # E(p) = a (p.x - lo.x) + b (p.y - lo.y)
  normal_b = (hi_xy[..., 0] - lo_xy[..., 0]) * sign
  # Barycentric of vertex k is E_{k+1} / |area2|; inverse depth is their 1/z-weighted sum.
  inv_abs_area = 1.0 / jnp.where(drawn, jnp.abs(area2), 1.0)
  inv_z = 1.0 / jnp.where(drawn[:, None], z, 1.0)
  depth_factors = jnp.roll(inv_z, 1, axis=1) * inv_abs_area[:, None]  # factor for E_k: 1/z_{k-1}
  coefficients = jnp.concatenate(
      [jnp.stack([lo_xy[..., 0], lo_xy[..., 1], normal_a, normal_b], -1).reshape(-1, 12),
       depth_factors], axis=1)

  # Pixel (col, row) has its centre at (col + 0.5, row + 0.5). Clip before the integer cast so
  # far-away vertices cannot overflow.
  lo = jnp.clip(jnp.min(xy, axis=1) - 0.5, -1.0, jnp.array([width, height], dtype))
  hi = jnp.clip(jnp.max(xy, axis=1) - 0.5, -1.0, jnp.array([width, height], dtype))
  col_lo = jnp.maximum(jnp.ceil(lo[:, 0]).astype(jnp.int32), 0)
  row_lo = jnp.maximum(jnp.ceil(lo[:, 1]).astype(jnp.int32), 0)
  col_hi = jnp.minimum(jnp.floor(hi[:, 0]).astype(jnp.int32), width - 1)
  row_hi = jnp.minimum(jnp.floor(hi[:, 1]).astype(jnp.int32), height - 1)
  tile = settings.tile_size
  tiles_x = jnp.maximum(col_hi - col_lo + tile, 0) // tile
  tiles_y = jnp.maximum(row_hi - row_lo + tile, 0) // tile
  num_tiles = jnp.where(drawn, tiles_x * tiles_y, 0).astype(jnp.int32)
  boxes = jnp.stack([col_lo, row_lo, col_hi, row_hi, jnp.maximum(tiles_x, 1)], axis=1)

  vertex_inv_z = 1.0 / jnp.maximum(corners[..., 2], settings.near)
  used = jnp.broadcast_to(drawn[:, None], vertex_inv_z.shape)
  depth_range = jnp.stack([jnp.min(jnp.where(used, vertex_inv_z, jnp.inf)),
                           jnp.max(jnp.where(used, vertex_inv_z, -jnp.inf))])
  return coefficients, boxes, num_tiles, depth_range, drawn, area2


def _default_max_pairs(height, width):
  # Silhouettes of a head cross about one pixel pair per pixel of their length, a few times
  # the image side; eight times the side sum leaves a wide margin.
  return 8 * (height + width)


def _default_max_edges(num_faces):
  # A closed mesh of F faces shows on the order of sqrt(F) silhouette edges; folds (ears,
  # eyelids, lips) and hidden ones add more. A quarter of the faces is far above that.
  return max(256, num_faces // 4)


# Pixel tests per trip of the tile loop on a CPU. Each trip builds and scatters arrays of this
# many keys; past a few hundred KiB they leave the cache, and a 256-pixel FLAME crop rasterized
# in trips of 32k tests runs about twice as fast as in one or two trips of 160k.
_CPU_PIXELS_PER_STEP = 32768


def _default_tiles_per_step(num_faces, height, width, tile, backend="gpu"):
  # On an accelerator: about one tile per triangle or enough tiles to cover the image once,
  # whichever is more: one or two trips for a head crop (few, wide steps keep it busy), without
  # making a tiny mesh pay for a huge chunk. On a CPU: the cache-sized trips above.
  wide = int(max(256, min(num_faces, 4 * height * width // (tile * tile)),
                 height * width // (tile * tile)))
  if backend == "cpu":
    return min(wide, max(16, _CPU_PIXELS_PER_STEP // (tile * tile)))
  return wide


def _visibility(screen_vertices, faces, height, width, settings):
  """(H, W) int32 id of the nearest triangle at each pixel centre (-1 for background), and
  the per-triangle `drawn` flags and doubled signed areas."""
  num_faces = faces.shape[0]
  id_bits = max(int(num_faces).bit_length(), 1)
  # Depth levels must stay exact in float32 (24-bit mantissa) so the clamp keeps them in range.
  depth_bits = min(31 - id_bits, 22)
  if depth_bits < 8:
    raise ConfigError(f"{num_faces} triangles leave too few bits to pack depth with the id; "
                      "split the mesh into parts of at most 2^23 triangles.")
  depth_levels = float(2 ** depth_bits - 1)
  tile = settings.tile_size
  chunk = settings.tiles_per_step or _default_tiles_per_step(num_faces, height, width, tile,
                                                             jax.default_backend())

  coefficients, boxes, num_tiles, depth_range, drawn, area2 = _triangle_setup(
      screen_vertices, faces, height, width, settings)
  tile_end = jnp.cumsum(num_tiles, dtype=jnp.int32)
  total_tiles = tile_end[-1]
  depth_scale = depth_levels / jnp.maximum(depth_range[1] - depth_range[0], 1e-12)

  offsets = jnp.arange(tile, dtype=jnp.int32)
  dtype = screen_vertices.dtype

  def draw_chunk(step, keys):
    # Candidate pixels are laid out (T, T, C) with the C tiles on the minor axis, which XLA
    # vectorises; (C, T, T) would leave most of each vector empty.
    work = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
    tri = jnp.minimum(jnp.searchsorted(tile_end, work, side="right").astype(jnp.int32),
                      num_faces - 1)
    local = work - (tile_end[tri] - num_tiles[tri])
    col_lo, row_lo, col_hi, row_hi, tiles_x = boxes[tri].T
    cols = col_lo + tile * (local % tiles_x) + offsets[:, None]          # (T, C)
    rows = row_lo + tile * (local // tiles_x) + offsets[:, None]
    coef = coefficients[tri].T                                           # (15, C)
    px = cols.astype(dtype)[None, :, :] + 0.5                            # (1, T, C)
    py = rows.astype(dtype)[:, None, :] + 0.5                            # (T, 1, C)

    def edge(k):
      start_x, start_y, normal_a, normal_b = coef[4 * k:4 * k + 4]
      return normal_a * (px - start_x) + normal_b * (py - start_y)

    e0, e1, e2 = edge(0), edge(1), edge(2)
    inside = (e0 >= 0) & (e1 >= 0) & (e2 >= 0)
    inside &= (cols <= col_hi)[None, :, :] & (rows <= row_hi)[:, None, :]
    inside &= work < total_tiles
    inv_depth = coef[12] * e0 + coef[13] * e1 + coef[14] * e2
    level = jnp.clip((depth_range[1] - inv_depth) * depth_scale, 0.0, depth_levels)
    key = jnp.where(inside, (level.astype(jnp.int32) << id_bits) | tri, _INT32_MAX)
    # A rejected candidate writes the no-op key to its own (clamped) pixel: sending them all to
    # one dump slot makes the scatter several times slower on CPU.
    pixel = (jnp.minimum(rows, height - 1)[:, None, :] * width
             + jnp.minimum(cols, width - 1)[None, :, :])
    return keys.at[pixel.reshape(-1)].min(key.reshape(-1), mode="promise_in_bounds")

  num_steps = (total_tiles + chunk - 1) // chunk
  keys = jnp.full((height * width,), _INT32_MAX, jnp.int32)
  _, keys = jax.lax.while_loop(lambda state: state[0] < num_steps,
                               lambda state: (state[0] + 1, draw_chunk(state[0], state[1])),
                               (jnp.zeros((), jnp.int32), keys))
  triangle_id = jnp.where(keys == _INT32_MAX, -1, keys & ((1 << id_bits) - 1))
  return triangle_id.reshape(height, width), drawn, area2


# Per-pixel work below keeps one (H, W) plane per triangle corner instead of (H, W, 3) arrays:
# XLA on CPU vectorises along the minor axis, and a minor axis of 3 wastes most of each vector
# and turns sums over corners into slow small reductions.


def _next(k):
  return (k + 1) % 3


def _after_next(k):
  return (k + 2) % 3


def _pixel_geometry(screen_vertices, faces, triangle_id, settings):
  """Differentiable per-pixel geometry of the visible triangles.

  Returns:
    vertex_ids: (H, W, 3) int32 vertex indices of each pixel's triangle (0 on background).
    barycentrics: 3 (H, W) planes, perspective-correct.
    depth: (H, W).
  """
  height, width = triangle_id.shape
  dtype = screen_vertices.dtype
  hit = triangle_id >= 0
  safe_id = jnp.maximum(triangle_id, 0)
  vertex_ids = faces[safe_id]
  # One gather of each visible triangle's corners (x, y, 1 / depth) per pixel: under vmap
  # every gather from a batched table builds a batched index array, so one wide gather is
  # faster than one per coordinate. Inverse depths come from the (F, 3) table, not per pixel.
  table = screen_vertices[faces]
  inverse_depth = 1.0 / jnp.where(table[..., 2] > settings.near, table[..., 2], 1.0)
  table = jnp.concatenate([table[..., :2], inverse_depth[..., None]], axis=-1)
  corners = table.reshape(-1, 9)[safe_id]                                # (H, W, 9)
  centre_x = (jnp.arange(width, dtype=dtype) + 0.5)[None, :]
  centre_y = (jnp.arange(height, dtype=dtype) + 0.5)[:, None]
  x = [corners[..., 3 * k] - centre_x for k in range(3)]
  y = [corners[..., 3 * k + 1] - centre_y for k in range(3)]
  # Twice the signed area of (pixel centre, v_{k+1}, v_{k+2}): the screen-space barycentric of
  # corner k times twice the triangle's area, which cancels in the perspective correction.
  edge_values = [x[_next(k)] * y[_after_next(k)] - x[_after_next(k)] * y[_next(k)]
                 for k in range(3)]
  weighted = [edge_values[k] * corners[..., 3 * k + 2] for k in range(3)]
  total = weighted[0] + weighted[1] + weighted[2]
  # Background pixels point at triangle 0, which may be degenerate or behind the camera: keep
  # the divisions finite there so neither values nor gradients become NaN.
  total = jnp.where(hit & (total != 0), total, 1.0)
  scale = 1.0 / total
  barycentrics = [jnp.where(hit, w * scale, 0.0) for w in weighted]
  area = edge_values[0] + edge_values[1] + edge_values[2]
  depth = jnp.where(hit, area * scale, settings.background_depth)
  return vertex_ids, barycentrics, depth


@struct.dataclass
class _Crossings:
  """Fixed-size list of pixel pairs whose centres a silhouette edge separates.

  Pairs run along u (x for horizontal pairs, y for vertical ones); the edge meets the line of
  pixel centres v = origin_v + 0.5 between the first pixel (centre origin_u + 0.5) and the
  second. Attributes: pixel: flat index of the pixel the edge cuts (the one nearer the
  crossing); source: the other pixel of the pair; vertical: vertical pair; start/end: the
  edge's vertex ids; receiver_first: the cut pixel is the first one; valid: entry in use.
  """
  pixel: jax.Array
  source: jax.Array
  origin_u: jax.Array
  origin_v: jax.Array
  vertical: jax.Array
  start: jax.Array
  end: jax.Array
  receiver_first: jax.Array
  valid: jax.Array


def _silhouette_edges(faces, face_neighbors, drawn, area2, max_edges):
  """Compact list of silhouette edges: where the drawn surface ends or folds away.

  Edge k of face f joins corners k and k + 1. It is a silhouette edge when f is drawn and the
  face across it is missing, not drawn (culled, degenerate, behind the camera) or oriented the
  other way on screen. A fold edge between two drawn faces is listed once, for the
  front-facing one. Returns (face, corner k, valid), each (max_edges,).
  """
  facing = jnp.where(drawn, jnp.sign(area2), 0.0)
  has_neighbor = face_neighbors >= 0
  neighbor_facing = jnp.where(has_neighbor, facing[jnp.maximum(face_neighbors, 0)], 0.0)
  is_silhouette = drawn[:, None] & (neighbor_facing != facing[:, None])
  is_silhouette &= (neighbor_facing == 0) | (facing[:, None] < 0)
  (edge,) = jnp.nonzero(is_silhouette.reshape(-1), size=max_edges, fill_value=0)
  valid = jnp.arange(max_edges) < jnp.sum(is_silhouette)
  return edge // 3, edge % 3, valid


def _find_crossings(fixed_vertices, faces, triangle_id, depth, edges, max_pairs):
  """Walks the silhouette edges along rows/columns of pixel centres (no gradient).

  A steep edge (|dy| >= |dx|) is met by horizontal pixel pairs on every row of centres it
  spans, a flat one by vertical pairs on every column, so each crossing is counted once (rows
  and columns are half-open at the edge's upper end so consecutive edges do not share one). A
  crossing is kept when the pixel on the edge's inner side shows a surface and the other
  pixel shows background or something farther away than the edge. The pixel on the
  inner side need not show the edge's own triangle: near a silhouette the last triangles are
  often slivers that hold no pixel centre. Each kept crossing at t (from the
  first pixel's centre) cuts max(0, 0.5 - t) of the first pixel or max(0, t - 0.5) of the
  second; only that pixel is listed.
  """
  height, width = triangle_id.shape
  face, corner, edge_valid = edges
  corners = faces[face]
  start_id = jnp.take_along_axis(corners, corner[:, None], axis=1)[:, 0]
  end_id = jnp.take_along_axis(corners, ((corner + 1) % 3)[:, None], axis=1)[:, 0]
  third_id = jnp.take_along_axis(corners, ((corner + 2) % 3)[:, None], axis=1)[:, 0]
  a, b, c = (fixed_vertices[i] for i in (start_id, end_id, third_id))
  vertical = jnp.abs(b[:, 1] - a[:, 1]) < jnp.abs(b[:, 0] - a[:, 0])  # flat edge: vertical pairs
  along = lambda p: jnp.where(vertical, p[:, 1], p[:, 0])
  across = lambda p: jnp.where(vertical, p[:, 0], p[:, 1])
  a_u, a_v, b_u, b_v, c_u, c_v = along(a), across(a), along(b), across(b), along(c), across(c)
  lines = jnp.where(vertical, width, height)     # lines of centres across the pair axis
  cells = jnp.where(vertical, height, width)     # pixels along the pair axis
  lo = jnp.clip(jnp.minimum(a_v, b_v), -1.0, lines + 1.0)
  hi = jnp.clip(jnp.maximum(a_v, b_v), -1.0, lines + 1.0)
  first_line = jnp.maximum(jnp.ceil(lo - 0.5).astype(jnp.int32), 0)
  last_line = jnp.minimum(jnp.ceil(hi - 0.5).astype(jnp.int32) - 1, lines - 1)
  count = jnp.where(edge_valid, jnp.maximum(last_line - first_line + 1, 0), 0)
  count_end = jnp.cumsum(count, dtype=jnp.int32)

  item = jnp.arange(max_pairs, dtype=jnp.int32)
  edge = jnp.minimum(jnp.searchsorted(count_end, item, side="right").astype(jnp.int32),
                     count.shape[0] - 1)
  line = first_line[edge] + item - (count_end[edge] - count[edge])
  centre_v = line.astype(fixed_vertices.dtype) + 0.5
  span_v = jnp.where(b_v[edge] != a_v[edge], b_v[edge] - a_v[edge], 1.0)
  cross_u = a_u[edge] + (centre_v - a_v[edge]) * (b_u[edge] - a_u[edge]) / span_v
  first_cell = jnp.floor(jnp.clip(cross_u - 0.5, -2.0, cells[edge] + 1.0)).astype(jnp.int32)
  in_image = (item < count_end[-1]) & (first_cell >= 0) & (first_cell <= cells[edge] - 2)
  first_cell = jnp.clip(first_cell, 0, cells[edge] - 2)
  is_vertical = vertical[edge]
  pixel_first = jnp.where(is_vertical, first_cell * width + line, line * width + first_cell)
  pixel_second = pixel_first + jnp.where(is_vertical, width, 1)
  # The first pixel lies on the triangle's side when the third corner does.
  third_side = ((b_u[edge] - a_u[edge]) * (c_v[edge] - a_v[edge])
                - (b_v[edge] - a_v[edge]) * (c_u[edge] - a_u[edge]))
  first_inner = (third_side > 0) == (b_v[edge] - a_v[edge] > 0)
  inner = jnp.where(first_inner, pixel_first, pixel_second)
  outer = jnp.where(first_inner, pixel_second, pixel_first)
  # Depth of the edge where it crosses (inverse depth is linear along a screen-space line).
  fraction = (centre_v - a_v[edge]) / span_v
  edge_depth = 1.0 / ((1.0 - fraction) / a[edge, 2] + fraction / b[edge, 2])
  flat_id = triangle_id.reshape(-1)
  flat_depth = depth.reshape(-1)
  outer_depth = flat_depth[outer]
  visible = (flat_id[inner] >= 0) & ((flat_id[outer] < 0) | (
      (outer_depth > edge_depth) & (outer_depth > flat_depth[inner])))
  t = cross_u - (first_cell.astype(fixed_vertices.dtype) + 0.5)
  receiver_first = t < 0.5
  return _Crossings(pixel=jnp.where(receiver_first, pixel_first, pixel_second),
                    source=jnp.where(receiver_first, pixel_second, pixel_first),
                    origin_u=first_cell, origin_v=line, vertical=is_vertical,
                    start=start_id[edge], end=end_id[edge], receiver_first=receiver_first,
                    valid=in_image & visible)


def _edge_weights(screen_vertices, crossings: _Crossings):
  """(M,) differentiable cut fractions, recomputed from the current positions of the listed
  crossing edges."""
  dtype = screen_vertices.dtype
  start = screen_vertices[crossings.start]
  end = screen_vertices[crossings.end]
  vertical = crossings.vertical
  # Along the pair axis u, across it v: the edge meets the line v = centre at u = t.
  start_u = jnp.where(vertical, start[:, 1], start[:, 0])
  start_v = jnp.where(vertical, start[:, 0], start[:, 1])
  end_u = jnp.where(vertical, end[:, 1], end[:, 0])
  end_v = jnp.where(vertical, end[:, 0], end[:, 1])
  centre_u = crossings.origin_u.astype(dtype) + 0.5
  centre_v = crossings.origin_v.astype(dtype) + 0.5
  span_v = end_v - start_v
  span_v = jnp.where(crossings.valid & (span_v != 0), span_v, 1.0)
  t = (start_u - centre_u) + (centre_v - start_v) * (end_u - start_u) / span_v
  weight = jnp.where(crossings.receiver_first, 0.5 - t, t - 0.5)
  return jnp.where(crossings.valid, jnp.clip(weight, 0.0, 0.5), 0.0)


def antialias(image, fragments: Fragments):
  """Analytic antialiasing of an (H, W, C) image rendered with `fragments`.

  Each pixel a silhouette edge cuts takes its neighbour's colour over the fraction of its area
  that the neighbour's surface covers. Differentiable w.r.t. the image and, through
  `fragments.edge_weight`, the vertex positions; the work is proportional to the silhouettes'
  length, not the image. Shade background pixels with the background colour (zero for
  premultiplied alpha) before calling this.
  """
  height, width, channels = image.shape
  flat = image.reshape(height * width, channels)
  weight = fragments.edge_weight.astype(image.dtype)
  # A pixel cut from several sides (a one-pixel-wide gap) could receive more than its area.
  total = jnp.zeros((height * width,), image.dtype).at[fragments.edge_pixel].add(weight)
  share = weight / jnp.maximum(total[fragments.edge_pixel], 1.0)
  change = share[:, None] * (flat[fragments.edge_source] - flat[fragments.edge_pixel])
  return flat.at[fragments.edge_pixel].add(change).reshape(height, width, channels)


def rasterize(screen_vertices, faces, height: int, width: int,
              settings: RasterSettings = RasterSettings(),
              face_neighbors: Optional[jax.Array] = None) -> Fragments:
  """Rasterizes one mesh into one (height, width) image.

  Args:
    screen_vertices: (V, 3) float (x_pixel, y_pixel, depth in metres), as from
      `jflame.camera.screen_space`.
    faces: (F, 3) int32 vertex indices. Degenerate faces (e.g. (0, 0, 0) padding) are ignored.
    height, width: static image size in pixels.
    settings: static `RasterSettings`.
    face_neighbors: (F, 3) int32 `face_adjacency(faces)`, computed once per topology on the
      host; antialiasing needs it to find silhouette edges. It may be omitted when `faces` is a
      concrete array (it is then computed here, on the host, at every call) or when
      `settings.antialias` is False.

  Returns:
    `Fragments`; barycentrics, depth, edge weights and coverage are differentiable w.r.t.
    `screen_vertices`, the triangle ids are not.

  Raises:
    ConfigError: antialiasing without `face_neighbors` while `faces` is traced (inside jit or
      vmap over faces).
  """
  if settings.antialias and face_neighbors is None:
    if isinstance(faces, jax.core.Tracer):
      raise ConfigError(
          "rasterize needs face_neighbors=face_adjacency(faces) (computed once on the host) to "
          "antialias when the faces are traced; pass it, or RasterSettings(antialias=False).")
    face_neighbors = face_adjacency(np.asarray(faces))
  return _rasterize(screen_vertices, faces, height, width, settings, face_neighbors)


@functools.partial(jax.jit, static_argnames=("height", "width", "settings"))
def _rasterize(screen_vertices, faces, height, width, settings, face_neighbors):
  faces = faces.astype(jnp.int32)
  fixed_vertices = jax.lax.stop_gradient(screen_vertices)
  triangle_id, drawn, area2 = _visibility(fixed_vertices, faces, height, width, settings)
  vertex_ids, barycentric_planes, depth = _pixel_geometry(
      screen_vertices, faces, triangle_id, settings)
  barycentrics = jnp.stack(barycentric_planes, axis=-1)
  mask = (triangle_id >= 0).astype(screen_vertices.dtype)
  if not settings.antialias:
    no_edges = jnp.zeros((0,), jnp.int32)
    return Fragments(triangle_id, vertex_ids, barycentrics, depth, mask, no_edges, no_edges,
                     jnp.zeros((0,), screen_vertices.dtype))
  edges = _silhouette_edges(faces, face_neighbors, drawn, area2,
                            settings.max_silhouette_edges or _default_max_edges(faces.shape[0]))
  crossings = _find_crossings(fixed_vertices, faces, triangle_id, jax.lax.stop_gradient(depth),
                              edges,
                              settings.max_antialias_pairs or _default_max_pairs(height, width))
  fragments = Fragments(triangle_id, vertex_ids, barycentrics, depth, mask, crossings.pixel,
                        crossings.source, _edge_weights(screen_vertices, crossings))
  coverage = antialias(mask[..., None], fragments)[..., 0]
  return fragments.replace(coverage=coverage)
