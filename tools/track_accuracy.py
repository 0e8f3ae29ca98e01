"""How closely jflame-track follows the face: the relative landmark error (over the face size) of
the default track against the frames-independent track (`--smoothing 0`), median, p90 and max,
on a real clip, the same clip with frames dropped (every 3rd / 5th: motion 3x / 5x faster) and
a shared photo shaken fast by a warp.

  .venv/bin/python tools/track_accuracy.py --clip ../shared/assets/clips/talking_head_182.mp4 \
      --photo ../shared/assets/photos/<one>.png --cache /tmp/track_landmarks \
      --json_out docs/benchmarks/track_accuracy.json

MediaPipe's landmarks of each clip are cached under --cache (they do not change with the fit).
"""

import json
from pathlib import Path

from absl import app, flags
import numpy as np

_CLIP = flags.DEFINE_string("clip", None, "A real clip.")
_PHOTO = flags.DEFINE_string("photo", None, "A face photo to shake by a warp (optional).")
_CACHE = flags.DEFINE_string("cache", None, "Folder for cached MediaPipe landmarks.")
_DROPS = flags.DEFINE_list("drops", ["1", "3", "5"], "Keep every n-th frame of --clip.")
_SMOOTHING = flags.DEFINE_list("smoothing", ["1", "0"], "Multipliers of the temporal weights.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures here.")


def shaken_photo_frames(photo, frames=60, size=384, fps=25.0, roll_degrees=20.0, hertz=2.5,
                        shift=0.12):
  """A photo shaken fast: in-plane rotation (peak 2 pi f A degrees / s: 314 at the defaults)
  and a sideways shift of `shift` of the frame, both sinusoids of `hertz`."""
  import cv2
  t = np.arange(frames) / fps
  angle = roll_degrees * np.sin(2 * np.pi * hertz * t)
  offset = shift * size * np.sin(2 * np.pi * hertz * t + 0.5)
  height, width = photo.shape[:2]
  zoom = size / max(height, width) * 0.9
  out = []
  for a, d in zip(angle, offset):
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), a, zoom)
    matrix[:, 2] += np.array([size / 2 - width / 2 + d, size / 2 - height / 2])
    out.append(cv2.warpAffine(photo, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE))
  return out, angle


def cached(path, compute):
  if path is not None and Path(path).is_file():
    data = np.load(path)
    return data["landmarks"], data["found"]
  landmarks, found = compute()
  if path is not None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, landmarks=landmarks, found=found)
  return landmarks, found


def relative_errors(loaded, config, landmarks, found, crop_size=256):
  """(T,) relative landmark error of a landmark-mode track of the clip (NaN without a face)."""
  import jax
  from jflame import output
  from jflame.preprocess.video import clip_crop, clip_observations
  from jflame.model_loading import prepare_fit_model
  from jflame.track import fit_clip
  crop_from_frame = clip_crop(landmarks, found, crop_size)
  observations = clip_observations(landmarks, found, crop_from_frame, crop_size)
  fit_model = prepare_fit_model(loaded, config.fit)
  result = jax.device_get(fit_clip(fit_model, observations, config, crop_size))
  indices = np.asarray(fit_model.landmark_indices)
  detected = np.asarray(observations.landmarks)[:, indices]
  size = np.asarray([output.face_size(points) for points in detected])
  return np.where(np.asarray(result.tracked), np.asarray(result.landmark_error) / size, np.nan)


def smoothed(config, factor):
  import dataclasses
  scale = lambda s: dataclasses.replace(s, **{f.name: getattr(s, f.name) * factor
                                              for f in dataclasses.fields(s)})
  return config.replace(velocity=scale(config.velocity), acceleration=scale(config.acceleration),
                        agreement=config.agreement * factor)


def summary(errors):
  errors = errors[np.isfinite(errors)]
  return dict(median=float(np.median(errors)), p90=float(np.percentile(errors, 90)),
              max=float(np.max(errors)), frames=int(errors.size))


def main(argv):
  del argv
  from jflame import model_loading
  from jflame.config import TrackConfig
  from jflame.track_runner import frames_landmarks, read_landmarks
  cache = Path(_CACHE.value) if _CACHE.value else None
  loaded = model_loading.load_model(None, None, 0, None)
  clips = {}
  if _CLIP.value:
    landmarks, found = cached(cache and cache / "clip.npz",
                              lambda: read_landmarks(_CLIP.value)[1:])
    for drop in map(int, _DROPS.value):
      clips[f"clip every {drop}"] = (landmarks[::drop], found[::drop])
  if _PHOTO.value:
    import cv2
    photo = cv2.cvtColor(cv2.imread(_PHOTO.value), cv2.COLOR_BGR2RGB)
    clips["photo shaken"] = cached(cache and cache / "shaken.npz",
                                   lambda: frames_landmarks(shaken_photo_frames(photo)[0]))
  figures = {}
  for name, (landmarks, found) in clips.items():
    for factor in map(float, _SMOOTHING.value):
      errors = relative_errors(loaded, smoothed(TrackConfig(), factor), landmarks, found)
      figures[f"{name}, smoothing {factor:g}"] = summary(errors)
      row = figures[f"{name}, smoothing {factor:g}"]
      print(f"{name:16s} smoothing {factor:g}: median {100 * row['median']:.2f}%  p90 "
            f"{100 * row['p90']:.2f}%  max {100 * row['max']:.2f}%  ({row['frames']} frames)",
            flush=True)
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
  app.run(main)
