"""Export formats: merged checkpoints, GGUF, the mixed-precision quantized format, and the equivalence gate."""
