"""Kernel backends for QuantLinear's forward: name -> fn(x, layer) -> y."""

from __future__ import annotations

from .torch_ref import dequantize_matmul

KERNELS = {"torch": dequantize_matmul}
