"""AWQ (Lin et al., 2023): scale the input channels that carry large activations up before rounding,
and fold the inverse scale into the op that feeds them, so that the unquantized function is unchanged
and the salient weights lose less to rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import gptq, grid
from .arch import ScaleGroup, scale_groups, set_module, target_linears
from .calibration import calibrated_blocks, capture_inputs, run_block
from .registry import register
from .rtn import round_linear
from .spec import QuantSpec, QuantSpecError


@dataclass(frozen=True)
class AWQOptions:
    grid_points: int = 20  # values of α in [0, 1] tried for s = mean|x|^α / mean|w|^(1-α)
    clip_search: bool = True  # per group, then shrink the weight range where that lowers rounding error
    max_tokens: int = 8192  # calibration tokens per search (spread evenly over the samples)

    def __post_init__(self) -> None:
        if self.grid_points < 1:
            raise QuantSpecError(f"quant.grid_points={self.grid_points} must be at least 1")
        if self.max_tokens < 1:
            raise QuantSpecError(f"quant.max_tokens={self.max_tokens} must be positive")


def search_scale(x: Tensor, weight: Tensor, spec: QuantSpec, grid_points: int) -> Tensor:
    """Per-input-channel scale s minimising ‖x Wᵀ − (x/s) Q(W·s)ᵀ‖² over the α grid; s = 1 (plain
    rounding) is a candidate too, so the search never does worse than RTN on these tokens."""
    x, w = x.float(), weight.float()
    x_mean, w_mean = x.abs().mean(0), w.abs().mean(0).clamp(min=1e-8)  # a dead input channel stays finite
    reference = x @ w.T
    best_loss, best = None, torch.ones_like(x_mean)
    candidates = [None, *torch.linspace(0, 1, grid_points).tolist()] if grid_points > 1 else [None, 0.5]
    for alpha in candidates:
        if alpha is None:
            s = torch.ones_like(x_mean)
        else:
            s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # centred around 1: keeps the scaled weights in range
        w_q = grid.fake_quantize(w * s, spec.bits, spec.group_size, spec.sym) / s
        loss = (x @ w_q.T - reference).pow(2).mean()
        if torch.isfinite(loss) and (best_loss is None or loss < best_loss):
            best_loss, best = loss, s
    return best


@torch.no_grad()
def fold_scale(block: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """Divide the producing op's outputs by s and multiply the consuming linears' inputs by s."""
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm: y = weight * normalised(x)
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in group.linears:
        linear = block.get_submodule(name)
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def _group_inputs(block: nn.Module, groups: list[ScaleGroup], inputs: list[Tensor], kwargs: dict,
                  max_tokens: int) -> dict[str, Tensor]:
    """Each group's input tokens (its first linear's), about max_tokens, strided evenly, in float32.
    Only the kept tokens are stored: the full down_proj input of an 8B model would take gigabytes."""
    firsts = {g.linears[0]: block.get_submodule(g.linears[0]) for g in groups}
    total_tokens = sum(h.shape[0] * h.shape[1] for h in inputs)
    stride = -(-total_tokens // max_tokens)
    seen: dict[str, list[Tensor]] = {n: [] for n in firsts}
    with capture_inputs(firsts, lambda name, x: seen[name].append(x.reshape(-1, x.shape[-1])[::stride].float())):
        run_block(block, inputs, kwargs)
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


@dataclass(frozen=True)
class AWQGPTQOptions(gptq.GPTQOptions, AWQOptions):
    """AWQ's scale search, then GPTQ's rounding (GPTQ's mse_clip replaces AWQ's clip_search)."""

    def __post_init__(self) -> None:
        gptq.GPTQOptions.__post_init__(self)
        AWQOptions.__post_init__(self)


@register("awq", needs_calibration=True, options=AWQOptions)
@torch.no_grad()
def quantize_awq(model: nn.Module, spec: QuantSpec, calib: Tensor | None, progress: bool = False,
                 device: torch.device | None = None) -> nn.Module:
    return _quantize(model, spec, calib, progress, device, AWQOptions(**spec.options), with_gptq=False)


@register("awq_gptq", needs_calibration=True, options=AWQGPTQOptions)
@torch.no_grad()
def quantize_awq_gptq(model: nn.Module, spec: QuantSpec, calib: Tensor | None, progress: bool = False,
                      device: torch.device | None = None) -> nn.Module:
    return _quantize(model, spec, calib, progress, device, AWQGPTQOptions(**spec.options), with_gptq=True)


def _quantize(model: nn.Module, spec: QuantSpec, calib: Tensor | None, progress: bool,
              device: torch.device | None, opts: AWQOptions, with_gptq: bool) -> nn.Module:
    for block, inputs, kwargs in calibrated_blocks(model, calib, device, spec.method, progress):
        groups = scale_groups(block)
        xs = _group_inputs(block, groups, inputs, kwargs, opts.max_tokens)
        # Folding one group's scale changes no other group's inputs (q/k/v outputs are unchanged;
        # v's outputs shrink by exactly what o's inputs are scaled up by), so every search uses the
        # inputs captured once, before any folding.
        for group in groups:
            weight = torch.cat([block.get_submodule(n).weight for n in group.linears])
            fold_scale(block, group, search_scale(xs[group.linears[0]], weight, spec, opts.grid_points))
        del xs
        if with_gptq:
            gptq.quantize_block(block, inputs, kwargs, spec, opts)
        else:
            for name, linear in target_linears(block).items():
                set_module(block, name, round_linear(linear, spec, opts.clip_search))
    return model

