"""The unquantized baseline: the model as loaded."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register
from .spec import QuantSpec


@register("fp16")
def keep_baseline(model: nn.Module, spec: QuantSpec, calib: Tensor | None = None, progress: bool = False,
                  device: torch.device | None = None) -> nn.Module:
    return model
