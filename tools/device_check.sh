#!/usr/bin/env bash
# One prepared check for an accelerator machine (issues 10, 12): the device test suites, then
# the fit, render and clip-tracking benchmarks, each step under its own time limit so the whole
# fits in ~9 minutes on an H100. Needs only python with JAX (+ the accelerator plugin), NumPy,
# SciPy, optax, flax, absl-py and pytest; no MediaPipe, OpenCV or trimesh (issue 22's
# annotate_device step runs when pyarrow, Pillow, OpenCV and tqdm are there). Run from the
# repository root:
#
#   OUT=/some/folder bash tools/device_check.sh            # full settings (accelerator)
#   QUICK=1 OUT=/tmp/check bash tools/device_check.sh      # small settings, minutes on a CPU
#
# Writes under $OUT: environment.json, tests_core/tests_fit .xml (JUnit) and .log,
# fit_landmark.json, fit_photometric.json, render.json, track.json, one .log per step, and
# summary.json (each step's exit status and seconds, the test counts and failures, the headline
# numbers). A failed or timed-out step is recorded and the next one still runs; exit status 0.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device_check_out}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Each step is its own process; none should hold the accelerator's memory for the next.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # step NAME LIMIT_S COMMAND...: run, log, record exit status and seconds.
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo -e "$name\t$rc\t$((SECONDS - start))" >> "$STEPS"
  echo "   exit $rc after $((SECONDS - start)) s"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
}

# The device suites in two parts, so a slow part cannot take the other's report with it: the
# comparisons with references (forward model, renderer), then the fits.
CORE_TESTS=(tests/test_flame.py tests/test_render_*.py tests/test_synthetic.py tests/test_optim.py
            tests/test_bare_image.py)
FIT_TESTS=(tests/test_fit.py tests/test_fit_photometric.py)
[ -f tests/test_solve.py ] && FIT_TESTS+=(tests/test_solve.py)
if [ "$QUICK" = 1 ]; then
  CORE_TESTS=(tests/test_flame.py tests/test_render_gradients.py tests/test_bare_image.py)
  FIT_TESTS=(tests/test_fit.py -k recovers_expression)
  CORE_LIMIT=900; FIT_LIMIT=900; BENCH_LIMIT=600
  LANDMARK=(--batch_sizes 1,8 --rigid_iterations 20 --full_iterations 20)
  PHOTOMETRIC=(--batch_sizes 1 --rigid_iterations 10 --full_iterations 10 --crop_size 64)
  RENDER=(--sizes 64 --batch_sizes 1,4 --repeats 2 --batch_modes vmap)
  TRACK_FRAMES=64
else
  CORE_LIMIT=120; FIT_LIMIT=150; BENCH_LIMIT=0
  LANDMARK=(--batch_sizes 1,64,1024)
  PHOTOMETRIC=(--batch_sizes 1,64)
  RENDER=(--sizes 256 --batch_sizes 1,64 --repeats 5 --batch_modes vmap)
  TRACK_FRAMES=1024   # issue 12: the clip fit alone, >= 5,000 frames / s on an H100
fi
limit() { [ "$BENCH_LIMIT" -gt 0 ] && echo "$BENCH_LIMIT" || echo "$1"; }

step environment 120 "$PY" - "$OUT/environment.json" <<'PYEOF'
import importlib, json, platform, sys
info = dict(python=platform.python_version(), machine=platform.machine())
for name in ("jax", "jaxlib", "numpy", "scipy", "optax", "flax", "absl", "pytest", "cv2",
             "mediapipe", "trimesh"):
  try:
    module = importlib.import_module(name)
    info[name] = getattr(module, "__version__", "present")
  except Exception as error:  # absent or broken: say which
    info[name] = f"absent ({type(error).__name__})"
import jax
info["devices"] = [str(d) for d in jax.devices()]
info["device_kind"] = jax.devices()[0].device_kind
info["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PYEOF

step tests_core "$CORE_LIMIT" "$PY" -m pytest -v -p no:cacheprovider -m device --durations=10 \
  --junitxml="$OUT/tests_core.xml" "${CORE_TESTS[@]}"
step tests_fit "$FIT_LIMIT" "$PY" -m pytest -v -p no:cacheprovider -m device --durations=10 \
  --junitxml="$OUT/tests_fit.xml" "${FIT_TESTS[@]}"
step fit_landmark "$(limit 60)" "$PY" tools/bench_fit.py --preprocess_images 0 "${LANDMARK[@]}" \
  --json_out "$OUT/fit_landmark.json"
step fit_photometric "$(limit 110)" "$PY" tools/bench_fit.py --mode photometric \
  --preprocess_images 0 "${PHOTOMETRIC[@]}" --json_out "$OUT/fit_photometric.json"
step render "$(limit 60)" "$PY" tools/bench_render.py "${RENDER[@]}" --json_out "$OUT/render.json"
step track "$(limit 60)" "$PY" tools/bench_track.py --frames "$TRACK_FRAMES" \
  --json_out "$OUT/track.json"
# Issue 22: MediaPipe's face mesh in JAX (detector + attention mesh, image to 478 landmarks), from
# graphs written on the host (the device has neither MediaPipe nor tflite):
# `tools/bench_landmarks.py --save_graphs .device_assets`, then carry .device_assets.
if [ -f .device_assets/face_detector.npz ] && [ -f .device_assets/face_landmarker.npz ]; then
  if [ "$QUICK" = 1 ]; then LANDMARK_BATCHES=1,16; else LANDMARK_BATCHES=1,64,1024; fi
  step landmarks "$(limit 60)" "$PY" tools/bench_landmarks.py \
    --graphs .device_assets --batches "$LANDMARK_BATCHES" --json_out "$OUT/landmarks.json"
  # Issue 22 criterion 3: annotation end to end in device mode (JPEG and PNG bytes to committed
  # Parquet rows; the workers read and decode, the face mesh and the fit run on the device),
  # with the host's decode-only rate beside it. jflame-annotate needs pyarrow, Pillow, OpenCV and
  # tqdm (not MediaPipe in device mode); the step is skipped, and says so, without them.
  if "$PY" -c "import pyarrow, PIL, cv2, tqdm" > /dev/null 2>&1; then
    if [ "$QUICK" = 1 ]; then ANNOTATE=(--images 64 --batch_size 32 --workers 2); else
      ANNOTATE=(--images 4096 --batch_size 1024 --workers "$(( $(nproc) - 2 ))"); fi
    JFLAME_LANDMARK_GRAPHS=.device_assets step annotate_device "$(limit 150)" "$PY" \
      tools/bench_annotate.py --landmarks device "${ANNOTATE[@]}" --resume_rows 1000 \
      --json_out "$OUT/annotate_device.json"
  else
    echo -e "annotate_device\tskipped: pyarrow, Pillow, OpenCV or tqdm missing\t0" >> "$STEPS"
  fi
fi

"$PY" - "$OUT" <<'PYEOF'
import json, sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
out = Path(sys.argv[1])
summary = dict(steps={})
for line in (out / "steps.tsv").read_text().splitlines():
  name, rc, seconds = line.split("\t")
  if not rc.lstrip("-").isdigit():      # a step that did not run says why
    summary["steps"][name] = dict(exit=None, note=rc)
    continue
  summary["steps"][name] = dict(exit=int(rc), seconds=int(seconds),
                                timed_out=int(rc) in (124, 137))
for part in ("tests_core", "tests_fit"):
  try:
    suite = ElementTree.parse(out / f"{part}.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    summary[part] = dict(total=int(suite.get("tests")), failures=int(suite.get("failures")),
                         errors=int(suite.get("errors")), skipped=int(suite.get("skipped")),
                         seconds=float(suite.get("time")), failed=failed)
  except (OSError, ElementTree.ParseError, AttributeError, TypeError) as error:
    summary[part] = f"no JUnit report ({error}); see {part}.log"
for name in ("fit_landmark", "fit_photometric"):
  path = out / f"{name}.json"
  if path.exists():
    data = json.loads(path.read_text())
    summary[name] = {f"batch {r['batch']}": dict(ms_per_image=round(r["per_image_ms"], 3),
                                                 images_per_s=round(r["images_per_s"], 1))
                     for r in data["fit"]}
if (out / "render.json").exists():
  data = json.loads((out / "render.json").read_text())
  summary["render"] = {f"{r['mode']} {r['size']} batch {r['batch']} {r['batch_mode']}":
                       round(r["per_image_ms"], 3) for r in data["results"]}
if (out / "landmarks.json").exists():
  data = json.loads((out / "landmarks.json").read_text())
  summary["landmarks"] = {f"batch {batch}": round(r["ms_per_image"], 4)
                          for batch, r in data["jax"].items()}
if (out / "annotate_device.json").exists():
  data = json.loads((out / "annotate_device.json").read_text())
  summary["annotate_device"] = {key: data[key] for key in (
      "images", "workers", "batch_size", "end_to_end_images_per_s",
      "engine_steady_images_per_s", "preprocessing_steady_images_per_s") if key in data}
if (out / "track.json").exists():
  data = json.loads((out / "track.json").read_text())["fit_landmark"]
  summary["track"] = dict(frames=data["frames"], frames_per_s=round(data["frames_per_s"], 1))
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PYEOF
