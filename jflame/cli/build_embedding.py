"""jflame-build-embedding: a MediaPipe landmark embedding for a FLAME-topology model, made by
rendering the model and running MediaPipe on the renders (see jflame.embedding_builder).

  jflame-build-embedding --output mediapipe_embedding.npz [--flame_model PATH]
                         [--reference_embedding KNOWN.npz] [--report report.json]

Exit status: 0 when written, 2 for a usage or file problem (one line), 130 when interrupted.
"""

import json

from absl import flags

from jflame.cli import app as cli_app

_OUTPUT = flags.DEFINE_string("output", "mediapipe_embedding.npz", "Embedding file to write.")
_FLAME_MODEL = flags.DEFINE_string("flame_model", None, "FLAME file (default: synthetic).")
_REFERENCE = flags.DEFINE_string("reference_embedding", None,
                                 "Known MediaPipe embedding to compare with (optional).")
_SIZE = flags.DEFINE_integer("size", 512, "Render size in pixels.", lower_bound=64,
                             upper_bound=2048)
_YAWS = flags.DEFINE_list("yaw_degrees", ["-20", "0", "20"], "Views: head yaw angles.")
_REPORT = flags.DEFINE_string("report", None, "Write the comparison as JSON here.")


def main(argv):
  if len(argv) > 1:
    return cli_app.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    yaws = [float(y) for y in _YAWS.value]
  except ValueError:
    return cli_app.usage_error(f"--yaw_degrees takes numbers, got {','.join(_YAWS.value)}")
  from jflame import embedding_builder, landmarks_io, model_loading
  from jflame.errors import JFlameError
  from jflame.preprocess import FaceAnalyzer
  try:
    loaded = model_loading.load_model(_FLAME_MODEL.value, _REFERENCE.value)
    with FaceAnalyzer() as analyzer:
      embedding, counts = embedding_builder.build_embedding(loaded.model, _SIZE.value, yaws,
                                                            analyzer)
    landmarks_io.save_mediapipe_embedding(embedding, _OUTPUT.value)
  except (JFlameError, OSError) as err:
    return cli_app.usage_error(str(err))
  print(f"{embedding.num_landmarks} landmarks embedded on {loaded.model.name}; faces found per "
        f"view {counts}; written to {_OUTPUT.value}")
  if loaded.embedding is not None:
    report = embedding_builder.compare(embedding, loaded.embedding, loaded.model)
    print(json.dumps(report, indent=2))
    if _REPORT.value:
      with open(_REPORT.value, "w") as handle:
        json.dump(report, handle, indent=2)
  return cli_app.EXIT_OK


def run():
  cli_app.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
