"""Issue 20, criterion 2: a synthetic capture end to end (MediaPipe on the renders, the capture
fit) against its truth, beside single-view fits of the same images.

  python tools/make_multiview_capture.py --output /tmp/capture --views 5 --moments 4
  python tools/eval_capture.py --capture /tmp/capture [--noall_landmarks] [--prior_scale 1]
      [--mode photometric [--photometric_weight W] [--photometric_iterations N]]
      [--nosingle_view] [--json_out FILE]

Prints per moment and over all moments: the world mesh's face region against the truth (median,
p90, max, in millimetres, as written and after the best rigid alignment), its size bias, the
views in which MediaPipe found the face, and each view's landmark error (px) in the capture fit
beside a single-view fit of that image (`jflame-fit`'s fit, the same landmarks) and beside the
TRUE head's landmark points projected into the view (what a fit that found the truth would
score: MediaPipe's view-dependent placement).
"""

import json
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import trimesh
from absl import app, flags

from jflame import FitConfig, camera_files, capture_runner, fit_images, model_loading, multiview
import eval_multiview  # tools/ is a folder of scripts: its own folder is on sys.path
import eval_synthetic

_CAPTURE = flags.DEFINE_string("capture", None, "A folder written by make_multiview_capture.py.")
_MODE = flags.DEFINE_enum("mode", "landmark", ["landmark", "photometric"], "The capture fit's mode.")
_PHOTOMETRIC_WEIGHT = flags.DEFINE_float(
    "photometric_weight", None, "Photometric mode: the render's weight (default: the rig's).")
_PHOTOMETRIC_ITERATIONS = flags.DEFINE_integer(
    "photometric_iterations", None, "Photometric mode: Adam steps (default: a photo fit's).")
_SINGLE_VIEW = flags.DEFINE_bool("single_view", True, "Fit every image alone too (the landmark "
                                 "errors' ratio).")
# --all_landmarks, --prior_scale (and the solver's flags) and --json_out are eval_multiview's.
_JSON_OUT = eval_multiview._JSON_OUT
_ALBEDO_PER_CHANNEL = flags.DEFINE_integer(
    "albedo_per_channel", None, "Photometric mode: the built-in Laplacian albedo basis's size "
    "per colour channel (default: FitConfig's).")


def _single_view_errors(loaded, config, capture: Path) -> dict:
  """{(moment, serial): landmark error px} of every image fitted alone by the photo engine."""
  images = sorted((capture / "frames").glob("*/cam_*.png"))
  errors = {}
  for path, fitted in zip(images, fit_images(images, loaded, config)):
    error = (float(fitted.arrays["landmark_error_px"]) if fitted.arrays is not None
             else float("nan"))
    errors[(path.parent.name, path.stem[len("cam_"):])] = error
  return errors


def truth_view_errors(loaded, cameras, vertices_world, result) -> np.ndarray:
  """(V,) px: each view's mean distance from MediaPipe's detected landmarks to the TRUE head's
  landmark points (of `vertices_world`, one moment's) projected through that view's camera
  (`cameras`: serial -> RigCamera), over the points the capture fit used: what the views'
  landmark errors would read if the fit found the truth exactly."""
  embedding = loaded.embedding
  points = np.asarray(embedding.points(jnp.asarray(vertices_world, jnp.float32),
                                       loaded.model.faces))
  order = {int(index): row for row, index in enumerate(np.asarray(embedding.landmark_indices))}
  rows = np.array([order[int(index)] for index in result["landmark_indices"]])
  errors = []
  for view, serial in enumerate(result["serials"]):
    detected = np.asarray(result["landmarks_detected"][view], np.float64)
    seen = np.all(np.isfinite(detected), axis=1)
    if not bool(result["view_has_face"][view]) or not seen.any():
      errors.append(np.nan)
      continue
    projected = camera_files.project_points(cameras[str(serial)], points[rows])
    errors.append(float(np.linalg.norm(projected - detected, axis=1)[seen].mean()))
  return np.array(errors)


def main(argv):
  del argv
  capture = Path(_CAPTURE.value)
  loaded = model_loading.load_model(None, None)
  config = landmark_config = eval_multiview.moment_config()
  if _MODE.value == "photometric":
    default = FitConfig()
    if not eval_multiview._SOLVER.present:   # the command's choice in photometric mode
      config = config.replace(landmark_solver=multiview.PHOTOMETRIC_LANDMARK_SOLVER)
    config = config.replace(
        mode="photometric",
        full_iterations=_PHOTOMETRIC_ITERATIONS.value or default.full_iterations,
        photometric_weight=(config.photometric_weight if _PHOTOMETRIC_WEIGHT.value is None
                            else _PHOTOMETRIC_WEIGHT.value),
        albedo_per_channel=_ALBEDO_PER_CHANNEL.value or default.albedo_per_channel)
  face = eval_synthetic.face_region_size(loaded.model.v_template.shape[0])
  truth = np.load(capture / "truth.npz")
  _, cameras = capture_runner.open_capture(capture / "camera_params.json", capture / "frames")
  scratch = Path(tempfile.mkdtemp(prefix="eval_capture_"))
  try:
    manifest = capture_runner.fit_capture(loaded, config, capture / "camera_params.json",
                                          capture / "frames", scratch / "capture")
    single = (_single_view_errors(loaded, landmark_config, capture) if _SINGLE_VIEW.value
              else {})
    rows, distances, aligned = [], [], []
    for index, moment in enumerate(truth["moments"]):
      entry = manifest["moments"][index]
      fitted = np.asarray(trimesh.load(scratch / "capture" / f"{moment}.obj",
                                       process=False).vertices)[:face]
      world = truth["vertices_world"][index][:face]
      distance = 1000 * np.linalg.norm(fitted - world, axis=1)
      accuracy = eval_synthetic.accuracy(fitted[None], world[None])
      with np.load(scratch / "capture" / f"{moment}.npz") as result:
        capture_errors = np.asarray(result["landmark_error_px"], np.float64)
        truth_errors = truth_view_errors(loaded, cameras, truth["vertices_world"][index], result)
      serials = manifest["serials"]
      rows.append(dict(
          moment=str(moment), views_with_face=entry["views_with_face"],
          world_median_mm=float(np.median(distance)), aligned_median_mm=accuracy["median_mm"],
          size_bias_pct=accuracy["size_bias_pct"],
          view_error_px={s: float(e) for s, e in zip(serials, capture_errors)},
          truth_view_error_px={s: float(e) for s, e in zip(serials, truth_errors)},
          single_view_error_px={s: float(single.get((str(moment), s), np.nan))
                                for s in serials}))
      distances.append(distance)
      aligned.append(accuracy["median_mm"])
      print(json.dumps(rows[-1]), flush=True)
    every = np.concatenate(distances)
    ratios = [row["view_error_px"][s] / row["single_view_error_px"][s] for row in rows
              for s in row["view_error_px"]
              if np.isfinite(row["view_error_px"][s]) and np.isfinite(
                  row["single_view_error_px"][s])]
    truth_ratios = [row["truth_view_error_px"][s] / row["single_view_error_px"][s]
                    for row in rows for s in row["view_error_px"]
                    if np.isfinite(row["truth_view_error_px"][s]) and np.isfinite(
                        row["single_view_error_px"][s])]
    summary = dict(views=len(manifest["serials"]), moments=len(rows),
                   all_landmarks=config.landmark_regions is None, mode=_MODE.value,
                   photometric_weight=config.photometric_weight,
                   photometric_iterations=config.full_iterations if config.photometric else 0,
                   prior_scale=eval_multiview._PRIOR_SCALE.value,
                   world_median_mm=float(np.median(every)),
                   world_p90_mm=float(np.percentile(every, 90)),
                   world_max_mm=float(every.max()),
                   aligned_median_mm=float(np.median(aligned)),
                   view_to_single_ratio_median=float(np.median(ratios)) if ratios else None,
                   view_to_single_ratio_max=float(np.max(ratios)) if ratios else None,
                   truth_to_single_ratio_median=(float(np.median(truth_ratios)) if truth_ratios
                                                 else None),
                   truth_to_single_ratio_min=(float(np.min(truth_ratios)) if truth_ratios
                                              else None))
    print(json.dumps(summary), flush=True)
    if _JSON_OUT.value:
      Path(_JSON_OUT.value).write_text(json.dumps(dict(summary=summary, moments=rows),
                                                  indent=1) + "\n")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("capture")
  app.run(main)
