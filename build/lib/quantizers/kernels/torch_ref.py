"""The reference backend: dequantize the whole weight, then one matmul."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dequantize_matmul(x: Tensor, layer) -> Tensor:
    weight = layer.dequantize_weight(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, weight, bias)
