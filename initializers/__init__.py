"""Initial fit variables: the weight-free landmark initialiser (always available) and, when the
user has their ONNX weights, DECA/MICA encoders."""
