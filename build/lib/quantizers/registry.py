"""name -> quantizer function, filled by @register."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .spec import QuantSpec, QuantSpecError

QuantizeFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class Quantizer:
    name: str
    quantize: QuantizeFn  # (model, spec, calib, progress, device) -> model, modified in place
    needs_calibration: bool
    options: type | None = None  # a dataclass of the method's own knobs, validated on construction

    def check_options(self, options: dict) -> None:
        """Raise QuantSpecError for an unknown or invalid option, before any work starts."""
        if self.options is None:
            if options:
                raise QuantSpecError(f"{self.name} takes no options; got {', '.join(sorted(options))}")
            return
        known = set(self.options.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise QuantSpecError(f"{self.name} has no option {', '.join(sorted(unknown))}: "
                                 f"its options are {', '.join(sorted(known))}")
        self.options(**options)


QUANTIZERS: dict[str, Quantizer] = {}


def register(name: str, needs_calibration: bool = False, options: type | None = None
             ) -> Callable[[QuantizeFn], QuantizeFn]:
    def add(fn: QuantizeFn) -> QuantizeFn:
        QUANTIZERS[name] = Quantizer(name, fn, needs_calibration, options)
        return fn

    return add


def get_quantizer(name: str) -> Quantizer:
    if name not in QUANTIZERS:
        raise QuantSpecError(f"unknown quantization method {name!r}: choose one of {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def quantize(model: nn.Module, spec: QuantSpec, calib: Tensor | None = None, progress: bool = False,
             device: torch.device | str | None = None) -> nn.Module:
    """Quantize `model` in place as `spec` says; `calib` is (n_samples, seqlen) token ids.

    `device` is where the work runs (default: where the model is). A model kept on the CPU is
    quantized on a GPU one block at a time, so the GPU never holds the whole model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return get_quantizer(spec.method).quantize(model, spec, calib, progress=progress, device=device)
