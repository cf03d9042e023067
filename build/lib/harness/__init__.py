"""quantbench: an accuracy-vs-precision benchmarking harness for language models."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package: found wherever it is installed
