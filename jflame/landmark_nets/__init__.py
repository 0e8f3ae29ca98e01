"""MediaPipe's face networks in JAX (issue 22): TFLite graphs read on the host
(`tflite_graph`), run by a small interpreter on any JAX device (`interpreter`)."""
