"""The model flags every fitting command shares (jflame-fit, jflame-annotate, jflame-track),
declared once so their meaning and help cannot drift apart."""

from absl import flags

FLAME_MODEL = flags.DEFINE_string(
    "flame_model", None, "FLAME model (.pkl or .npz). Default: $JFLAME_HOME or ~/.cache/jflame, "
    "else the built-in SYNTHETIC model (not FLAME; for trying jflame out).")
FLAME_VARIANT = flags.DEFINE_enum(
    "flame_variant", None, ["flame2020", "flame2023", "flame2023_open"],
    "Which FLAME release --flame_model is, when its file name does not say (FLAME 2020 and 2023 "
    "share their topology, so the arrays cannot tell). DECA/MICA need flame2020.")
EMBEDDING = flags.DEFINE_string(
    "embedding", None, "MediaPipe landmark embedding (.npz) for a real FLAME model.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic model (used when no FLAME file).")


def load_model():
  """The model the flags name (jflame.model_loading.load_model)."""
  from jflame import model_loading
  return model_loading.load_model(FLAME_MODEL.value, EMBEDDING.value, SEED.value,
                                  FLAME_VARIANT.value)
