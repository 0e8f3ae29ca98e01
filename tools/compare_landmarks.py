"""jflame's face mesh in JAX (`jflame.landmark_nets.face_mesh`) against MediaPipe 0.10.21's own
face mesh and face detection on the CPU (issue 22's agreement table): the shared photos
upright, turned by up to 45 degrees, cut to strips, shrunk so the face is 80 to 400 pixels wide
on a larger picture, renders of the synthetic head (a capture from
tools/make_multiview_capture.py, when given) and pictures without a face; and the photos turned
by quarter turns against MediaPipe's landmarks of the upright photo turned (`--search_turns`
runs the pipeline as `--landmarks device` does).

Per image with a face in both: the mean and largest landmark distance as a share of the face's
size (the diagonal of MediaPipe's landmarks' box), the depth's mean difference, the detection
box's IoU with MediaPipe's face detection (short range). Per group: the median, p90 and max of
those over its images, and how many face / no-face decisions agree.

    .venv/bin/python tools/compare_landmarks.py --capture /tmp/cap5 --json_out out.json
"""

import json
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags

_CAPTURE = flags.DEFINE_string("capture", None, "A capture folder of tools/"
                               "make_multiview_capture.py: its cam_*.png renders are compared.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every image's figures here.")
_SEARCH_TURNS = flags.DEFINE_bool("search_turns", False, "Run the pipeline as --landmarks device "
                                  "does: the detector also tries the image's quarter turns.")
_PHOTOS = Path(__file__).resolve().parents[1] / "../shared/assets/photos"
_CANVAS = 1024


def _read(path) -> np.ndarray:
  return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _turned(rgb, degrees):
  height, width = rgb.shape[:2]
  turn = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
  return cv2.warpAffine(rgb, turn, (width, height), borderMode=cv2.BORDER_REFLECT)


def _shrunk(rgb, side, canvas=(900, 680)):
  out = np.full((canvas[1], canvas[0], 3), 120, np.uint8)
  out[50:50 + side, 70:70 + side] = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
  return out


def _groups():
  """{group: [(name, RGB image)]}, every image at most _CANVAS on each side."""
  import skimage.data
  photos = [(path.stem, _read(path)) for path in sorted(_PHOTOS.glob("*.png"))]
  groups = {"upright": photos, "turned 15-45 degrees": [], "strips": [],
            "face 80-400 px": [], "renders of the synthetic head": [], "no face": []}
  for name, image in photos:
    for degrees in (-45, -30, -15, 15, 30, 45):
      groups["turned 15-45 degrees"].append((f"{name} {degrees:+d}", _turned(image, degrees)))
    groups["strips"] += [(f"{name} wide", image[180:740].copy()),
                         (f"{name} tall", image[:, 150:850].copy())]
    for side in (160, 240, 400, 560):     # the face is about 0.5 to 0.7 of the photo's side
      groups["face 80-400 px"].append((f"{name} {side}", _shrunk(image, side)))
  if _CAPTURE.value:
    for path in sorted(Path(_CAPTURE.value).rglob("cam_*.png")):
      image = _read(path)
      if max(image.shape[:2]) <= _CANVAS:
        groups["renders of the synthetic head"].append((str(path.relative_to(_CAPTURE.value)),
                                                        image))
  groups["no face"] = [("blank", np.full((480, 640, 3), 200, np.uint8)),
                       ("noise", np.random.default_rng(0).integers(0, 256, (512, 512, 3),
                                                                   dtype=np.uint8)),
                       ("coffee", skimage.data.coffee()), ("rocket", skimage.data.rocket()),
                       ("chelsea (a cat)", skimage.data.chelsea()),
                       ("brick", cv2.cvtColor(skimage.data.brick(), cv2.COLOR_GRAY2RGB))]
  return {name: images for name, images in groups.items() if images}


def _quarter_turns(run, weights, mesh):
  """The shared photos turned by 90, 180 and 270 degrees, against MediaPipe's landmarks of the
  upright photo turned the same way (MediaPipe's own mesh on an upside-down face is laid over
  it upright; --search_turns is what fixes that)."""
  import jax.numpy as jnp
  means, largest = [], []
  for path in sorted(_PHOTOS.glob("*.png")):
    upright = _read(path)
    height, width = upright.shape[:2]
    normalized = np.array([(p.x, p.y) for p in
                           mesh.process(upright).multi_face_landmarks[0].landmark])
    points = normalized * (width, height) + 0.5
    face_size = float(np.linalg.norm(points.max(0) - points.min(0)))
    for turns in (1, 2, 3):
      image = np.ascontiguousarray(np.rot90(upright, turns))
      expected = points.copy()
      for _ in range(turns):       # one counter-clockwise quarter turn of a (w, h) picture
        expected = np.stack([expected[:, 1], width - expected[:, 0]], -1)
        width, height = height, width
      canvas = np.zeros((1, _CANVAS, _CANVAS, 3), np.uint8)
      canvas[0, :image.shape[0], :image.shape[1]] = image
      got = run(weights, jnp.asarray(canvas),
                jnp.asarray([[image.shape[1], image.shape[0]]], jnp.int32))
      distance = np.linalg.norm(np.asarray(got.landmarks[0, :, :2]) - expected, axis=1)
      means.append(100 * distance.mean() / face_size)
      largest.append(100 * distance.max() / face_size)
  return dict(images=len(means), decisions_agree=None, faces=len(means),
              mean_pct=_summary(means), max_pct=_summary(largest), depth_pct=None,
              box_iou_min=None)


def _summary(values):
  values = np.asarray(values, np.float64)
  if not values.size:
    return None
  return dict(median=float(np.median(values)), p90=float(np.percentile(values, 90)),
              max=float(values.max()))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import mediapipe as mp
  from jflame.landmark_nets import face_mesh, tflite_graph
  networks = face_mesh.FaceNetworks(*tflite_graph.face_graphs())
  weights = face_mesh.network_weights(networks)
  run = jax.jit(jax.vmap(lambda w, image, size: face_mesh.face_landmarks(
      networks, w, image, size, _SEARCH_TURNS.value), in_axes=(None, 0, 0)))
  mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                         refine_landmarks=True)
  detection = mp.solutions.face_detection.FaceDetection(model_selection=0,
                                                        min_detection_confidence=0.5)
  rows, table = [], {}
  for group, images in _groups().items():
    measured = []
    for name, image in images:
      height, width = image.shape[:2]
      canvas = np.zeros((1, _CANVAS, _CANVAS, 3), np.uint8)
      canvas[0, :height, :width] = image
      got = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], run(
          weights, jnp.asarray(canvas), jnp.asarray([[width, height]], jnp.int32)))
      faces = mesh.process(image).multi_face_landmarks
      row = dict(group=group, image=name, jax_found=bool(got.found), mediapipe_found=bool(faces))
      if faces and got.found:
        normalized = np.array([(p.x, p.y, p.z) for p in faces[0].landmark])
        expected = normalized[:, :2] * (width, height) + 0.5
        face_size = float(np.linalg.norm(expected.max(0) - expected.min(0)))
        distance = np.linalg.norm(got.landmarks[:, :2] - expected, axis=1) / face_size
        row.update(face_px=face_size, mean_pct=100 * float(distance.mean()),
                   max_pct=100 * float(distance.max()),
                   depth_pct=100 * float(np.abs(got.landmarks[:, 2] - normalized[:, 2] * width)
                                         .mean()) / face_size)
        detections = detection.process(image).detections
        if detections:
          box = detections[0].location_data.relative_bounding_box
          ref = np.array([box.xmin * width, box.ymin * height, (box.xmin + box.width) * width,
                          (box.ymin + box.height) * height])
          low, high = np.maximum(ref[:2], got.box[:2]), np.minimum(ref[2:], got.box[2:])
          overlap = float(np.prod(np.maximum(high - low, 0)))
          row["box_iou"] = overlap / (float(np.prod(ref[2:] - ref[:2]))
                                      + float(np.prod(got.box[2:] - got.box[:2])) - overlap)
      rows.append(row)
      measured.append(row)
    table[group] = dict(
        images=len(measured),
        decisions_agree=sum(r["jax_found"] == r["mediapipe_found"] for r in measured),
        faces=sum(r["mediapipe_found"] for r in measured),
        **{key: _summary([r[key] for r in measured if key in r])
           for key in ("mean_pct", "max_pct", "depth_pct")},
        box_iou_min=min((r["box_iou"] for r in measured if "box_iou" in r), default=None))
  table["quarter turns (against MediaPipe upright, turned)"] = _quarter_turns(run, weights, mesh)
  mesh.close()
  detection.close()
  print("| images | n | decisions agree | faces | mean distance % (median / p90 / max) | "
        "largest distance % (median / p90 / max) | box IoU (min) |")
  print("|---|---|---|---|---|---|---|")
  for group, entry in table.items():
    def cell(key, digits=3):
      summary = entry[key]
      if summary is None:
        return "-"
      return " / ".join(f"{summary[k]:.{digits}f}" for k in ("median", "p90", "max"))
    iou = entry["box_iou_min"]
    agree = "-" if entry["decisions_agree"] is None else entry["decisions_agree"]
    print(f"| {group} | {entry['images']} | {agree} | {entry['faces']} | "
          f"{cell('mean_pct')} | {cell('max_pct')} | {'-' if iou is None else f'{iou:.3f}'} |")
  worst = sorted((r for r in rows if "mean_pct" in r), key=lambda r: -r["mean_pct"])[:3]
  print("worst:", [(r["image"], round(r["mean_pct"], 3), round(r["max_pct"], 3)) for r in worst])
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).write_text(json.dumps(dict(groups=table, images=rows), indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
