"""The bundled quantizers: `quantize(model, spec, calib)` on any transformers causal LM."""

from . import awq, baseline, gptq, rtn  # noqa: F401  (registers the methods)
from .linear import QuantLinear
from .registry import QUANTIZERS, get_quantizer, quantize, register
from .spec import QuantSpec, QuantSpecError

__all__ = ["QUANTIZERS", "QuantLinear", "QuantSpec", "QuantSpecError", "get_quantizer", "quantize", "register"]
