"""Round to nearest: each weight to the closest point of its group's min-max grid."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import grid
from .arch import set_module, target_linears
from .linear import QuantLinear
from .registry import register
from .spec import QuantSpec


@register("rtn")
@torch.no_grad()
def quantize_rtn(model: nn.Module, spec: QuantSpec, calib: Tensor | None = None, progress: bool = False,
                 device: torch.device | None = None) -> nn.Module:
    linears = target_linears(model, spec.quantize_lm_head)
    for name, linear in tqdm(linears.items(), desc="rtn", disable=not progress, unit="layer"):
        home = linear.weight.device
        linear.to(device or home)
        set_module(model, name, round_linear(linear, spec).to(home))
    return model


def round_linear(linear: nn.Linear, spec: QuantSpec, clip_search: bool = False,
                 hessian: Tensor | None = None) -> QuantLinear:
    """The linear's weights rounded to nearest on its groups' grid. With clip_search the range is shrunk
    first, by the factor that minimises the weights' rounding error or, given the inputs' `hessian`,
    the layer's output error (which tolerates more clipping: up to half the range)."""
    if not clip_search:
        params = grid.compute_params(linear.weight, spec.bits, spec.group_size, spec.sym)
    elif hessian is None:
        params = grid.search_params(linear.weight, spec.bits, spec.group_size, spec.sym)
    else:
        params = grid.search_params(linear.weight, spec.bits, spec.group_size, spec.sym, max_shrink=0.5,
                                    hessian=hessian)
    codes = grid.quantize(linear.weight, params, spec.bits, spec.group_size)
    return QuantLinear.from_codes(linear, codes, params, spec.group_size, spec.sym, spec.bits)
