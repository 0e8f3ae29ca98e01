"""jflame.initializers: optional DECA / MICA encoders run with onnxruntime.

Installed as `jflame.initializers` (the repository keeps it in its own top-level folder). It
depends on jflame's model, fitting and preprocessing modules and never the other way round: only
`jflame.model_loading`/`jflame.engine` and the commands use it. The weight-free landmark initialiser
and the `InitialGuess` type are part of fitting and live in `jflame.starting_point`.
"""
