"""The bundled quantizers: `quantize(model, spec, calib)` on any transformers causal LM."""

from . import awq, baseline, gptq, rtn  # noqa: F401  (registers the methods)
from .kernels import BACKENDS, BackendError, LayerFormat, check_backend
from .linear import QuantLinear, dequantized_once, use_backend
from .registry import QUANTIZERS, get_quantizer, quantize, register
from .spec import QuantSpec, QuantSpecError

__all__ = [
    "BACKENDS", "QUANTIZERS", "BackendError", "LayerFormat", "QuantLinear", "QuantSpec", "QuantSpecError",
    "check_backend", "dequantized_once", "get_quantizer", "quantize", "register", "use_backend",
]
