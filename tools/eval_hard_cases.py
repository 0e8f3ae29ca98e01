"""How well the `suspect` flag separates wrong fits from good ones on photos made hard on purpose.

  python tools/eval_hard_cases.py [--photos ../shared/assets/photos] [--noastronaut]
                                  [--output docs/ACCURACY.md] [--rows rows.csv]

Every base photo (the shared real photos, and skimage's astronaut) is fitted as it is: that fit
is the reference. Then altered copies with a known map to the base photo are fitted in the same
landmark-mode run (jflame's engine in this process, synthetic FLAME head, default FitConfig):

* turned by 90, 180, 270 and +-30, +-60 degrees about the photo's centre;
* two faces: the photo side by side with the next one (2 W x H);
* occluded: a grey block over the lower half, or the left half, of the face's landmark box;
* cut: the image cut through the face's centre, keeping its right half, or its lower half;
* tiny: the photo shrunk until the face is about 32 or 40 pixels wide, in a 1024 grey frame.

A fit of an altered copy is WRONG when its fitted landmarks, mapped back through the known map,
lie a median of more than WRONG_LANDMARK_OFFSET face sizes from the reference fit's (for two
faces: from either face's reference), or its head turns more than WRONG_HEAD_DEGREES degrees
differently from the reference's head turned with the image, or its jaw opens more than
WRONG_JAW_RADIANS differently. Otherwise it is GOOD. Photos with no fit (no face found) are
counted apart. The table gives, for each suspect rule of `jflame.quality` (by the start of its
reason), how many wrong fits it catches and how many good fits it flags.
"""

import collections
import csv
import dataclasses
import tempfile
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
import skimage.data
from absl import app, flags
from scipy.spatial.transform import Rotation

from jflame import atomic, engine, model_loading, quality
from jflame.camera import apply_affine, invert_affine
from jflame.config import FitConfig
from jflame.output import face_size
from jflame.preprocess.align import warp_affine
import benchmarking  # tools/ is a folder of scripts: its own folder is on sys.path

_PHOTOS = flags.DEFINE_string("photos", str(Path(__file__).resolve().parents[2] / "shared" /
                                            "assets" / "photos"), "Folder of base photos (*.png).")
_ASTRONAUT = flags.DEFINE_bool("astronaut", True, "Also use skimage's astronaut as a base photo.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Put the report in this Markdown file, as its section between "
    "'<!-- begin eval_hard_cases -->' and '<!-- end ... -->' (appended when it has none).")
_ROWS = flags.DEFINE_string("rows", None, "Write one CSV row per fitted case here.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Fit batch size.")

WRONG_LANDMARK_OFFSET = 0.10
WRONG_HEAD_DEGREES = 20.0
WRONG_JAW_RADIANS = 0.15
TURNS_DEGREES = (90, 180, 270, 30, -30, 60, -60)
TINY_FACE_PX = (32, 40)
TINY_FRAME = 1024


@dataclasses.dataclass
class Case:
  """An altered photo and how it maps onto its base photo(s)."""
  name: str
  kind: str
  image: np.ndarray
  # (base name, (2, 3) base pixels -> case pixels); two for two faces side by side.
  bases: list


def _read(path: Path) -> np.ndarray:
  return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _turn_about(center: np.ndarray, angle: float) -> np.ndarray:
  """Rotation by `angle` radians in image axes about `center` (written here, not taken from
  jflame, so the tool also measures older versions of jflame)."""
  cos, sin = np.cos(angle), np.sin(angle)
  linear = np.array([[cos, -sin], [sin, cos]])
  return np.concatenate([linear, (center - linear @ center)[:, None]], axis=1)


def _translation(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def build_cases(bases: dict, face_boxes: dict) -> List[Case]:
  """The altered copies of every base photo (see the module docstring)."""
  cases = []
  names = sorted(bases)
  for index, name in enumerate(names):
    image = bases[name]
    height, width = image.shape[:2]
    center = np.array([width / 2.0, height / 2.0])
    for degrees in TURNS_DEGREES:
      # Counter-clockwise on screen by `degrees`: image axes turn by -degrees.
      case_from_base = _turn_about(center, -np.deg2rad(degrees))
      turned = warp_affine(image, case_from_base, width) if width == height else None
      if turned is not None:
        cases.append(Case(f"{name}__turn{degrees:+d}", f"turned {abs(degrees)}"
                          if degrees in (90, 180, 270) else f"turned +-{abs(degrees)}",
                          turned, [(name, case_from_base)]))
    other = names[(index + 1) % len(names)]
    if other != name and bases[other].shape[0] == height:
      pair = np.concatenate([image, bases[other]], axis=1)
      cases.append(Case(f"{name}__two_faces", "two faces", pair,
                        [(name, _translation(0, 0)), (other, _translation(width, 0))]))
    x0, y0, x1, y1 = face_boxes[name]
    xm, ym = int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2))
    x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
    for label, (bx0, by0, bx1, by1) in (("lower", (x0, ym, x1, y1)), ("left", (x0, y0, xm, y1))):
      occluded = image.copy()
      occluded[max(by0, 0):by1, max(bx0, 0):bx1] = 128
      cases.append(Case(f"{name}__occluded_{label}", "occluded half", occluded,
                        [(name, _translation(0, 0))]))
    cases.append(Case(f"{name}__cut_left", "cut by the frame",
                      np.ascontiguousarray(image[:, xm:]), [(name, _translation(-xm, 0))]))
    cases.append(Case(f"{name}__cut_top", "cut by the frame",
                      np.ascontiguousarray(image[ym:, :]), [(name, _translation(0, -ym))]))
    for pixels in TINY_FACE_PX:
      scale = pixels / max(x1 - x0, y1 - y0)
      small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
      small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
      frame = np.full((TINY_FRAME, TINY_FRAME, 3), 128, np.uint8)
      left, top = TINY_FRAME // 3, TINY_FRAME // 3
      frame[top:top + small_size[1], left:left + small_size[0]] = small
      # cv2.resize scales continuous coordinates by exactly new / old size per axis.
      case_from_base = np.array([[small_size[0] / width, 0.0, left],
                                 [0.0, small_size[1] / height, top]])
      cases.append(Case(f"{name}__tiny{pixels}", "tiny face", frame, [(name, case_from_base)]))
  return cases


def fit_folder(loaded, folder: Path) -> dict:
  """file stem -> FittedImage for every photo in `folder`, one landmark-mode run."""
  options = engine.EngineOptions(batch_size=_BATCH.value, landmarks_only=True)
  fitted = engine.fit_images([folder], loaded, FitConfig(), options)
  # keyed by file stem: source names carry the extension
  return {Path(image.entry["source"]).stem: image for image in fitted}


def _head_turn(arrays) -> np.ndarray:
  return Rotation.from_rotvec(np.asarray(arrays["original_camera_rotation"], np.float64))


def compare(case_arrays, reference_arrays, case_from_base) -> dict:
  """How far a case's fit is from its base photo's fit (see the module docstring)."""
  base_from_case = invert_affine(case_from_base)
  fitted = apply_affine(base_from_case, np.asarray(case_arrays["landmarks_fitted_original"],
                                                   np.float64))
  reference = np.asarray(reference_arrays["landmarks_fitted_original"], np.float64)
  size = face_size(np.asarray(reference_arrays["landmarks_detected_original"]))
  offset = float(np.median(np.linalg.norm(fitted - reference, axis=1)) / size)
  # The image map's in-plane rotation is a roll of the camera: case camera = roll @ base camera.
  linear = case_from_base[:, :2] / np.sqrt(abs(np.linalg.det(case_from_base[:, :2])))
  roll = np.eye(3)
  roll[:2, :2] = linear
  expected = Rotation.from_matrix(roll) * _head_turn(reference_arrays)
  head = float(np.degrees((expected.inv() * _head_turn(case_arrays)).magnitude()))
  jaw = float(np.linalg.norm(np.asarray(case_arrays["jaw_rotation"]) -
                             np.asarray(reference_arrays["jaw_rotation"])))
  wrong = (offset > WRONG_LANDMARK_OFFSET or head > WRONG_HEAD_DEGREES or
           jaw > WRONG_JAW_RADIANS)
  return dict(offset=offset, head_degrees=head, jaw=jaw, wrong=wrong)


def rule_names(reason: str) -> List[str]:
  """The rules a suspect reason names: each '; '-separated part, up to its first number."""
  names = []
  for part in filter(None, reason.split("; ")):
    words = []
    for word in part.split(" "):
      if any(character.isdigit() for character in word):
        break
      words.append(word)
    names.append(" ".join(words).rstrip(":,") or part)
  return names


def evaluate(bases: dict, loaded) -> List[dict]:
  """One row per fitted case: its kind, the comparison with the reference, its quality."""
  with tempfile.TemporaryDirectory() as folder_name:
    folder = Path(folder_name)
    for name, image in bases.items():
      cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    references = fit_folder(loaded, folder)
    boxes = {}
    for name in bases:
      reference = references[name]
      if not reference.ok:
        raise SystemExit(f"base photo {name} did not fit: {reference.entry['message']}")
      landmarks = reference.record.landmarks_original[:468]
      boxes[name] = np.concatenate([landmarks.min(axis=0), landmarks.max(axis=0)])
    cases = build_cases(bases, boxes)
    for path in folder.glob("*.png"):
      path.unlink()
    for case in cases:
      cv2.imwrite(str(folder / f"{case.name}.png"), cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR))
    fitted = fit_folder(loaded, folder)
  rows = []
  for name in sorted(bases):
    rows.append(_row(name, "upright (reference)", references[name], None))
  for case in cases:
    image = fitted[case.name]
    comparison = None
    if image.ok:
      comparisons = [compare(image.arrays, references[base].arrays, case_from_base)
                     for base, case_from_base in case.bases]
      comparison = min(comparisons, key=lambda found: found["offset"])
    rows.append(_row(case.name, case.kind, image, comparison))
  return rows


def _scores(record) -> list:
  scores = getattr(record, "upright_scores", None)   # absent before the orientation search
  return [] if scores is None else list(scores)


def _row(name: str, kind: str, image, comparison: Optional[dict]) -> dict:
  entry = image.entry
  row = dict(name=name, kind=kind, status=entry["status"], wrong=None, offset=None,
             head_degrees=None, jaw=None, error=entry.get("landmark_error_relative"),
             suspect=bool(entry.get("suspect")), reason=entry.get("suspect_reason") or "",
             num_faces=entry.get("num_faces"),
             upright_score=getattr(image.record, "upright_score", None),
             outside=(None if image.arrays is None else
                      1.0 - float(np.mean(image.arrays["landmark_weights"] > 0))),
             face_px=(None if image.arrays is None else
                      face_size(np.asarray(image.arrays["landmarks_detected_original"]))),
             upright_scores=" ".join(f"{score:.2f}" for score in _scores(image.record)))
  if kind.startswith("upright"):
    row.update(wrong=False)
  elif comparison is not None:
    row.update(comparison)
  return row


def tables(rows: List[dict]) -> str:
  """The Markdown tables: outcomes per kind of case, and what each rule catches."""
  fitted = [row for row in rows if row["status"] == "ok"]
  wrong = [row for row in fitted if row["wrong"]]
  good = [row for row in fitted if not row["wrong"]]
  lines = ["| case | photos | no fit | good: ok | good: suspect | wrong: suspect | "
           "wrong: **ok** | offset median / max |", "|---|---|---|---|---|---|---|---|"]
  kinds = list(dict.fromkeys(row["kind"] for row in rows))
  for kind in kinds:
    of_kind = [row for row in rows if row["kind"] == kind]
    fits = [row for row in of_kind if row["status"] == "ok"]
    count = collections.Counter((row["wrong"], row["suspect"]) for row in fits)
    offsets = [row["offset"] for row in fits if row["offset"] is not None]
    spread = (f"{100 * np.median(offsets):.1f}% / {100 * np.max(offsets):.1f}%" if offsets
              else "-")
    lines.append(f"| {kind} | {len(of_kind)} | {len(of_kind) - len(fits)} | "
                 f"{count[(False, False)]} | {count[(False, True)]} | {count[(True, True)]} | "
                 f"{count[(True, False)]} | {spread} |")
  lines.append(f"| **all** | {len(rows)} | {len(rows) - len(fitted)} | "
               f"{sum(not r['suspect'] for r in good)} | {sum(r['suspect'] for r in good)} | "
               f"{sum(r['suspect'] for r in wrong)} | {sum(not r['suspect'] for r in wrong)} | |")
  lines += ["", f"| rule (start of `suspect_reason`) | wrong fits caught (of {len(wrong)}) | "
            f"good fits flagged (of {len(good)}) |", "|---|---|---|"]
  caught = collections.Counter(name for row in wrong for name in set(rule_names(row["reason"])))
  flagged = collections.Counter(name for row in good for name in set(rule_names(row["reason"])))
  for name in sorted(set(caught) | set(flagged)):
    lines.append(f"| {name} | {caught[name]} | {flagged[name]} |")
  lines.append(f"| any rule | {sum(r['suspect'] for r in wrong)} | "
               f"{sum(r['suspect'] for r in good)} |")
  return "\n".join(lines)


def main(argv):
  del argv
  bases = {path.stem: _read(path) for path in sorted(Path(_PHOTOS.value).glob("*.png"))}
  if _ASTRONAUT.value:
    bases["astronaut"] = skimage.data.astronaut()
  if not bases:
    raise SystemExit(f"no photos under {_PHOTOS.value} and --noastronaut")
  loaded = model_loading.load_model(None, None)
  rows = evaluate(bases, loaded)
  if _ROWS.value:
    with open(_ROWS.value, "w", newline="") as handle:
      writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  text = tables(rows)
  print(text)
  wrong_and_ok = []
  for row in rows:
    if row["status"] == "ok" and row["wrong"] and not row["suspect"]:
      wrong_and_ok.append(row["name"])
      print(f"wrong and ok: {row['name']}: offset {100 * row['offset']:.1f}%, head "
            f"{row['head_degrees']:.0f} deg, jaw {row['jaw']:.2f}, error {100 * row['error']:.1f}%")
  if _OUTPUT.value:
    output = Path(_OUTPUT.value)
    old = output.read_text() if output.is_file() else ""
    section = SECTION.format(
        device=benchmarking.device_description(), model=loaded.description,
        bases=len(bases), cases=len(rows) - len(bases), offset=100 * WRONG_LANDMARK_OFFSET,
        head=WRONG_HEAD_DEGREES, jaw=WRONG_JAW_RADIANS, tables=text,
        min_upright=quality.MIN_UPRIGHT_SCORE, outside=100 * quality.MAX_LANDMARKS_OUTSIDE,
        error=100 * quality.MAX_RELATIVE_LANDMARK_ERROR, sigma=quality.MAX_PRIOR_SIGMA,
        wrong_ok=", ".join(wrong_and_ok) or "none",
        no_wrong=", ".join(kind for kind in dict.fromkeys(row["kind"] for row in rows)
                           if not any(row["wrong"] for row in rows if row["kind"] == kind)))
    atomic.write_text(output, benchmarking.with_section(old, "eval_hard_cases", section))


SECTION = """## Hard photos: what the `suspect` flag catches

Written by `tools/eval_hard_cases.py` (do not edit by hand; rerun it):

    python tools/eval_hard_cases.py --output docs/ACCURACY.md

Device: {device}. Model: {model}. Landmark mode, default FitConfig.

{bases} base photos (the shared real photos and skimage's astronaut) are fitted as they are, the
reference; {cases} altered copies with a known map onto them are fitted in the same run: turned
about the photo's centre; two photos side by side; a grey block over the lower or the left half
of the face; the photo cut through the face's centre (keeping its right or lower half); the
photo shrunk until the face is 32 or 40 pixels wide in a 1024 grey frame. A fit is **wrong** when
its fitted landmarks, mapped back onto the base photo, lie a median of more than {offset:.0f}% of
the face size from the reference fit's, or its head turns more than {head:.0f} degrees
differently from the reference's head turned with the image, or its jaw differs by more than
{jaw} rad; otherwise **good**. "offset" is that median landmark distance (median / max over the
fitted copies of a kind). A photo where no face was found has no fit (no_face: nothing to trust).

{tables}

Wrong fits left `ok`: {wrong_ok}.

Rules (thresholds in `jflame.quality`): landmark error > {error:.0f}% of face size; shape or
expression > {sigma:.0f} sigma; not converged; unclear face: the face detector's confidence in
the upright analysis window < {min_upright} (`PreparedImage.upright_score`); face cut by the
frame: > {outside:.0f}% of the fitted landmarks outside the photo. Kinds of case without a
wrong fit in this run (so no rule needs to look at them): {no_wrong}.
"""


if __name__ == "__main__":
  app.run(main)
