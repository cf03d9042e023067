"""The unquantized baseline: the model as loaded."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register
from .spec import QuantSpec


@register("fp16")
def keep_baseline(model: nn.Module, spec: QuantSpec, calib: Tensor | None = None, progress: bool = False) -> nn.Module:
    return model
