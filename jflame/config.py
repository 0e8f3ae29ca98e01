"""Fitting settings: frozen and hashable, so a FitConfig can be a static argument of jit.

Every default lives here, once. Learning rates follow the seed table of the design guide
(expression 0.01 -> 0.005 with L2 0.025; jaw 0.025 -> 0.01; eyes 0.03 -> 0.01; shape 0.001 with
L2 0.1; texture 0.005; lighting 0.005).
"""

import dataclasses
from typing import Optional, Tuple

import optax

from jflame.landmarks import LandmarkWeights
from jflame.render.rasterize import RasterSettings


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A learning rate that moves linearly from `start` to `end` over a stage (constant when
  `end` is None)."""
  start: float
  end: Optional[float] = None

  def optax_schedule(self, steps: int):
    if self.end is None or self.end == self.start:
      return optax.constant_schedule(self.start)
    return optax.linear_schedule(self.start, self.end, max(steps, 1))


@dataclasses.dataclass(frozen=True)
class LearningRates:
  """Adam learning rate per parameter group; None freezes the group in that stage."""
  shape: Optional[Schedule] = None
  expression: Optional[Schedule] = None
  jaw: Optional[Schedule] = None
  eyes: Optional[Schedule] = None
  neck: Optional[Schedule] = None
  global_rotation: Optional[Schedule] = None
  camera_rotation: Optional[Schedule] = None
  camera_translation: Optional[Schedule] = None
  focal_length: Optional[Schedule] = None
  texture: Optional[Schedule] = None
  lighting: Optional[Schedule] = None

  def groups(self):
    return tuple(field.name for field in dataclasses.fields(self))


# Stage 1: rigid camera only. Rotation in radians, translation in metres (Adam steps are about
# the learning rate in size).
RIGID_RATES = LearningRates(camera_rotation=Schedule(0.05, 0.005),
                            camera_translation=Schedule(0.01, 0.001))
# Stage 2: the seed table, plus a small camera refinement.
FULL_RATES = LearningRates(
    shape=Schedule(0.001), expression=Schedule(0.01, 0.005), jaw=Schedule(0.025, 0.01),
    eyes=Schedule(0.03, 0.01), camera_rotation=Schedule(0.005, 0.001),
    camera_translation=Schedule(0.002, 0.0005), texture=Schedule(0.005),
    lighting=Schedule(0.005))


@dataclasses.dataclass(frozen=True)
class Regularization:
  """Weights of the L2 penalties (weight * sum of squares) on coefficient groups."""
  shape: float = 0.1
  expression: float = 0.025
  jaw: float = 0.0
  eyes: float = 0.0
  texture: float = 0.01
  lighting: float = 0.0


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Everything that shapes the compiled fitting program.

  Attributes:
    num_shape, num_expression: active coefficients (the rest of the model's basis is unused).
    rigid_iterations, full_iterations: Adam steps of stage 1 (camera) and stage 2 (all).
    rigid_rates, full_rates: per-group learning rates of each stage.
    regularization: L2 weights.
    landmark_scale: landmark residuals are measured in pixels of a crop of this size, whatever
      the actual crop size, so loss weights do not depend on the crop resolution.
    landmark_robust_scale: Charbonnier scale (those pixels): quadratic below, linear above, so a
      few bad detections cannot dominate.
    region_weights: landmark weights by region.
    landmark_regions: MediaPipe regions whose landmarks are fitted (162 of the 478), or None
      for every landmark of the embedding.
    fit_shape: False holds shape at its initial value (from an initialiser or the user).
    fov_degrees: field of view for the initial focal length.
    init_rounds: rounds of the weight-free initialiser (camera <-> linear shape/expression
      solve); 0 starts from the mean face with a closed-form camera.
    init_num_shape, init_num_expression: leading components the initialiser's linear solve
      estimates (its cost grows with their square); the optimiser refines all of them.
    mode: "landmark" or "photometric".
    photometric_weight: weight of the photometric term against the landmark term (photometric
      mode, stage 2).
    photometric_robust_scale: Charbonnier scale of colour residuals (colour units in [0, 1]).
    albedo_per_channel: size per colour channel of the built-in Laplacian albedo basis.
    raster: rasterizer settings of the photometric render (render size = crop size).
    vmap_chunk: 0 vectorises the whole batch; N vectorises N images at a time and runs the
      chunks in sequence inside the same program. On a CPU, photometric fitting is fastest
      with small chunks (each image's render stays in cache); on an accelerator use 0.
    landmark_solver: "adam" (the optax stages above) or "lm": Levenberg-Marquardt on the same
      landmark objective (jflame.solve) replaces the rigid stage and, in landmark mode, the full
      stage too; photometric mode still runs its Adam full stage after it.
    lm_iterations: Levenberg-Marquardt steps (fixed; converged images stop moving).
    lm_vmap_chunk: with landmark_solver "lm" and vmap_chunk 0, images vectorised at a time:
      each image's Jacobian and normal matrix (~0.3 MB) stay in a CPU's cache in chunks of 16,
      not over a whole batch of 256 (3x slower per image on the 2-core CPU). 0 vectorises the
      whole batch (accelerators).
    shared_focal: the valid images of a batch share one camera, and one focal
      length is solved for all of them (jflame.solve.solve_shared_focal), starting from the
      fov_degrees focal. From one image the focal length is weakly determined: keep False.
    shared_focal_iterations: steps of that joint solve (the focal direction is poorly
      conditioned, so it needs more than lm_iterations; the images are then fitted again with
      the solved focal).
  """
  num_shape: int = 100
  num_expression: int = 50
  rigid_iterations: int = 200
  full_iterations: int = 200
  rigid_rates: LearningRates = RIGID_RATES
  full_rates: LearningRates = FULL_RATES
  regularization: Regularization = Regularization()
  landmark_scale: float = 256.0
  landmark_robust_scale: float = 2.0
  region_weights: LandmarkWeights = LandmarkWeights()
  landmark_regions: Optional[Tuple[str, ...]] = ("iris", "eyes", "lips", "brows", "nose",
                                                 "face_oval")
  fit_shape: bool = True
  fov_degrees: float = 20.0
  init_rounds: int = 3
  init_num_shape: int = 40
  init_num_expression: int = 30
  mode: str = "landmark"
  photometric_weight: float = 10.0
  photometric_robust_scale: float = 0.05
  albedo_per_channel: int = 16
  raster: RasterSettings = RasterSettings(cull_backfaces=True)
  vmap_chunk: int = 0
  landmark_solver: str = "lm"
  lm_iterations: int = 5
  lm_vmap_chunk: int = 16
  shared_focal: bool = False
  shared_focal_iterations: int = 30

  def replace(self, **changes) -> "FitConfig":
    return dataclasses.replace(self, **changes)
