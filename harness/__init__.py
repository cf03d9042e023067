"""quantbench: an accuracy-vs-precision benchmarking harness for language models."""
