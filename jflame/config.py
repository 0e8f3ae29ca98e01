"""Fitting settings: frozen and hashable, so a FitConfig (a photo) or a TrackConfig (a clip) can
be a static argument of jit; both validate on construction with the same helpers.

Every default lives here, once. Learning rates follow the seed table of the design guide
(expression 0.01 -> 0.005 with L2 0.025; jaw 0.025 -> 0.01; eyes 0.03 -> 0.01; shape 0.001 with
L2 0.1; texture 0.005; lighting 0.005).
"""

import dataclasses
import enum
import functools
import math
from typing import Optional, Tuple

import optax

from jflame.errors import ConfigError
from jflame.landmarks import REGION_NAMES, LandmarkWeights
from jflame.render.rasterize import RasterSettings


def _parse_choice(cls, field: str, value):
  """`value` as the str enum `cls`, or a ConfigError naming the field and its choices."""
  try:
    return cls(value)
  except ValueError:
    raise ConfigError(f"FitConfig.{field} must be one of {[m.value for m in cls]}, got "
                      f"{value!r}.") from None


class FitMode(str, enum.Enum):
  """What the fit matches: detected landmarks only, or landmarks plus the photo's colours
  (through jflame's rasterizer). A str enum, so "landmark" and FitMode.LANDMARK compare equal
  and the value writes to JSON as its name."""
  LANDMARK = "landmark"
  PHOTOMETRIC = "photometric"

  @classmethod
  def parse(cls, value) -> "FitMode":
    return _parse_choice(cls, "mode", value)


class LandmarkSolver(str, enum.Enum):
  """The landmark stage: Levenberg-Marquardt (`jflame.solve`) or the optax Adam stages. A str
  enum like FitMode: "lm" and LandmarkSolver.LM compare equal."""
  LM = "lm"
  ADAM = "adam"

  @classmethod
  def parse(cls, value) -> "LandmarkSolver":
    return _parse_choice(cls, "landmark_solver", value)


def _require(condition: bool, field: str, allowed: str, value, owner: str = "FitConfig") -> None:
  if not condition:
    raise ConfigError(f"{owner}.{field} must be {allowed}, got {value!r}.")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A learning rate that moves linearly from `start` to `end` over a stage (constant when
  `end` is None)."""
  start: float
  end: Optional[float] = None

  def validate(self, field: str) -> None:
    _require(_is_number(self.start) and self.start > 0, f"{field}.start", "a number > 0",
             self.start)
    _require(self.end is None or (_is_number(self.end) and self.end > 0), f"{field}.end",
             "None or a number > 0", self.end)

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

  def validate(self, field: str) -> None:
    for group in self.groups():
      schedule = getattr(self, group)
      _require(schedule is None or isinstance(schedule, Schedule), f"{field}.{group}",
               "None or a Schedule", schedule)
      if schedule is not None:
        schedule.validate(f"{field}.{group}")


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
    mode: FitMode.LANDMARK or FitMode.PHOTOMETRIC (the strings "landmark" and "photometric"
      are accepted and converted).
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
  mode: FitMode = FitMode.LANDMARK
  photometric_weight: float = 10.0
  photometric_robust_scale: float = 0.05
  albedo_per_channel: int = 16
  raster: RasterSettings = RasterSettings(cull_backfaces=True)
  vmap_chunk: int = 0
  landmark_solver: LandmarkSolver = LandmarkSolver.LM
  lm_iterations: int = 5
  lm_vmap_chunk: int = 16
  shared_focal: bool = False
  shared_focal_iterations: int = 30

  def __post_init__(self):
    """Refuses settings that cannot mean anything, naming the field and what it accepts
    (counts against the model are checked where the model is known, in `make_fit_model`)."""
    object.__setattr__(self, "mode", FitMode.parse(self.mode))
    object.__setattr__(self, "landmark_solver", LandmarkSolver.parse(self.landmark_solver))
    if isinstance(self.landmark_regions, list):
      object.__setattr__(self, "landmark_regions", tuple(self.landmark_regions))
    for field in ("num_shape", "num_expression"):
      value = getattr(self, field)
      _require(_is_int(value) and value >= 1, field, "an integer >= 1", value)
    for field in ("rigid_iterations", "full_iterations", "init_rounds", "init_num_shape",
                  "init_num_expression", "vmap_chunk", "lm_iterations", "lm_vmap_chunk",
                  "shared_focal_iterations"):
      value = getattr(self, field)
      _require(_is_int(value) and value >= 0, field, "an integer >= 0", value)
    _require(_is_int(self.albedo_per_channel) and self.albedo_per_channel >= 1,
             "albedo_per_channel", "an integer >= 1", self.albedo_per_channel)
    for field in ("landmark_scale", "landmark_robust_scale", "photometric_robust_scale"):
      value = getattr(self, field)
      _require(_is_number(value) and value > 0, field, "a number > 0", value)
    _require(_is_number(self.photometric_weight) and self.photometric_weight >= 0,
             "photometric_weight", "a number >= 0", self.photometric_weight)
    _require(_is_number(self.fov_degrees) and 0 < self.fov_degrees < 180, "fov_degrees",
             "a number of degrees in (0, 180)", self.fov_degrees)
    _require(isinstance(self.fit_shape, bool), "fit_shape", "True or False", self.fit_shape)
    _require(isinstance(self.shared_focal, bool), "shared_focal", "True or False",
             self.shared_focal)
    for field, rates in (("rigid_rates", self.rigid_rates), ("full_rates", self.full_rates)):
      _require(isinstance(rates, LearningRates), field, "a LearningRates", rates)
      rates.validate(field)
    _require(isinstance(self.regularization, Regularization), "regularization",
             "a Regularization", self.regularization)
    for group in dataclasses.fields(self.regularization):
      value = getattr(self.regularization, group.name)
      _require(_is_number(value) and value >= 0, f"regularization.{group.name}", "a number >= 0",
               value)
    _require(isinstance(self.region_weights, LandmarkWeights), "region_weights",
             "a LandmarkWeights", self.region_weights)
    for region in dataclasses.fields(self.region_weights):
      value = getattr(self.region_weights, region.name)
      _require(_is_number(value) and value >= 0, f"region_weights.{region.name}",
               "a number >= 0", value)
    regions = self.landmark_regions
    _require(regions is None or (isinstance(regions, tuple) and len(regions) > 0
                                 and all(name in REGION_NAMES for name in regions)),
             "landmark_regions", f"None or a non-empty tuple of {list(REGION_NAMES)}", regions)
    _require(isinstance(self.raster, RasterSettings), "raster", "a RasterSettings", self.raster)

  @property
  def photometric(self) -> bool:
    return self.mode is FitMode.PHOTOMETRIC

  def replace(self, **changes) -> "FitConfig":
    return dataclasses.replace(self, **changes)


# --- a clip (jflame-track) ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Smoothness:
  """Weights of one order of temporal difference, per group: weight * squared difference between
  neighbouring frames, summed over the group's values and averaged over frames. Units:
  coefficients as they are, rotations in radians, camera translation in millimetres."""
  expression: float = 0.0
  jaw: float = 0.0
  eyes: float = 0.0
  rotation: float = 0.0
  translation: float = 0.0


# Fewer iterations than a single photo needs: the clip's joint start is close to its answer. The
# shared shape gets ten times a photo's rate: every frame pulls on it, and the start's
# linearisation leaves more to correct than 0.001 per step can in 150 steps. No
# rigid stage: the start's cameras are already fitted, and the rigid stage's large first steps
# only move them away (measured: landmark error 1.8 -> 2.7 px after 30 rigid steps).
TRACK_FIT = FitConfig(rigid_iterations=0, full_iterations=150,
                      full_rates=dataclasses.replace(FULL_RATES, shape=Schedule(0.01, 0.001)))
# The photometric refinement moves every group but shape at rates a few times below stage 2's:
# the landmark stages have done the large moves.
PHOTOMETRIC_RATES = LearningRates(
    expression=Schedule(0.003), jaw=Schedule(0.005), eyes=Schedule(0.005),
    camera_rotation=Schedule(0.002), camera_translation=Schedule(0.0005),
    texture=Schedule(0.03), lighting=Schedule(0.03), shape=Schedule(0.001))


@dataclasses.dataclass(frozen=True)
class TrackConfig:
  """Settings of a clip fit (static: hashable, part of the compiled program).

  Attributes:
    fit: the per-frame settings (coefficient counts, iterations, rates, priors, mode).
    segment_length: frames per segment.
    overlap: frames shared by neighbouring segments (< segment_length).
    velocity, acceleration: weights of first and second temporal differences.
    velocity_scale, acceleration_scale: per group, the difference (norm over the group's values)
      up to which its penalty is the square and beyond which it grows linearly (Charbonnier,
      `robust_square`); 0: the square everywhere.
    motion_scale: reference pixels (0: off). The weights of the differences starting at a frame
      are divided by 1 + (m / motion_scale)^2, m the coherent motion of the detected landmarks
      there (`motion_weights`): still stretches are smoothed fully, moving ones let go.
    agreement: weight of the squared difference between two segments' values of a frame they
      share (same units as the temporal weights).
    clip_lm_iterations: Levenberg-Marquardt steps over the whole clip after the Adam stages
      (`jflame.clip_solve`), which then fit the frames independently but for the shape; the
      temporal terms join the solve. 0: they join the Adam stages instead.
    clip_cg_iterations: conjugate-gradient iterations per step of that solve.
    shape_frames: with the clip solve, the Adam stages (which settle the shared shape; the solve
      holds it) fit this many frames with a face, spread evenly over the clip, and the solve
      starts the others from their closed-form start (0: every frame). Their cost then no
      longer grows with the clip.
    photometric_iterations: photometric mode: steps of the photometric stage after the
      landmark stages.
    photometric_rates: its learning rates.
    segment_chunk: segments of the landmark stages vectorised at a time, the chunks run in
      sequence in the same program (0: all at once). All at once is fastest on a CPU too
      (docs/BENCHMARKS.md, video tracking).
    photometric_segment_chunk: the same for the photometric stage, whose renders make a
      frame's step megabytes: chunks bound the memory of a long clip (on an accelerator with
      room, 0 vectorises them all).
  """
  fit: FitConfig = TRACK_FIT
  segment_length: int = 32
  overlap: int = 4
  # Measured on the synthetic clips of tests/test_track.py: these weights cut a static head's
  # landmark jitter about 4x against independent fits. On their own (quadratic, as they were)
  # they held real head turns 20-40 px off their landmarks: the Charbonnier data term gives way
  # beyond 2 px, a quadratic prior never does. Two things now make them give way first:
  # `motion_scale` (weights fall where the detected landmarks themselves move) and the scales
  # (each difference is penalised quadratically up to its scale, linearly beyond). Measured on
  # the shared real clip, 3x / 5x frame-dropped and a photo shaken at 314 degrees / s: relative
  # landmark error p90 18-31% -> within 1.1x of frames fitted independently (docs/ACCURACY.md).
  velocity: Smoothness = Smoothness(expression=0.04, jaw=4.0, eyes=0.2, rotation=4.0,
                                    translation=0.01)
  acceleration: Smoothness = Smoothness(expression=0.4, jaw=40.0, eyes=1.0, rotation=100.0,
                                        translation=0.2)
  # About twice each group's frame-to-frame noise in independent fits of a still head (units as
  # the weights': radians, millimetres, coefficients).
  velocity_scale: Smoothness = Smoothness(expression=1.0, jaw=0.05, eyes=0.2, rotation=0.05,
                                          translation=5.0)
  acceleration_scale: Smoothness = Smoothness(expression=1.0, jaw=0.03, eyes=0.1, rotation=0.01,
                                              translation=2.0)
  motion_scale: float = 1.0
  agreement: float = 100.0
  # Three steps of 30 iterations settle the smoothing from the frames' own starts; with 20 the
  # still stretches stopped short of the optimum (docs/ACCURACY.md, video tracking).
  clip_lm_iterations: int = 3
  clip_cg_iterations: int = 30
  shape_frames: int = 64
  photometric_iterations: int = 40
  photometric_rates: LearningRates = PHOTOMETRIC_RATES
  segment_chunk: int = 0
  photometric_segment_chunk: int = 4

  def __post_init__(self):
    require = functools.partial(_require, owner="TrackConfig")
    require(isinstance(self.fit, FitConfig), "fit", "a FitConfig", self.fit)
    for field in ("segment_length", "overlap", "clip_lm_iterations", "clip_cg_iterations",
                  "shape_frames", "photometric_iterations", "segment_chunk",
                  "photometric_segment_chunk"):
      value = getattr(self, field)
      require(_is_int(value) and value >= 0, field, "an integer >= 0", value)
    require(self.segment_length >= 2, "segment_length", "an integer >= 2", self.segment_length)
    require(self.overlap < self.segment_length, "overlap", "smaller than segment_length",
            self.overlap)
    for name in ("velocity", "acceleration", "velocity_scale", "acceleration_scale"):
      smoothness = getattr(self, name)
      require(isinstance(smoothness, Smoothness), name, "a Smoothness", smoothness)
      for group in dataclasses.fields(smoothness):
        value = getattr(smoothness, group.name)
        require(_is_number(value) and value >= 0, f"{name}.{group.name}", "a number >= 0",
                value)
    for field in ("motion_scale", "agreement"):
      value = getattr(self, field)
      require(_is_number(value) and value >= 0, field, "a number >= 0", value)
    require(isinstance(self.photometric_rates, LearningRates), "photometric_rates",
            "a LearningRates", self.photometric_rates)
    self.photometric_rates.validate("photometric_rates")

  @property
  def stride(self) -> int:
    return self.segment_length - self.overlap

  def replace(self, **changes) -> "TrackConfig":
    return dataclasses.replace(self, **changes)
