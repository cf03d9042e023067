"""AWQ (Lin et al., 2023): scale the input channels that carry large activations up before rounding,
and fold the inverse scale into the op that feeds them, so that the unquantized function is unchanged
and the salient weights lose less to rounding."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import gptq, grid
from .arch import ScaleGroup, scale_groups, set_module, target_linears
from .calibration import calibrated_blocks, capture_inputs, map_tensors, run_block
from .registry import register
from .rtn import round_linear
from .spec import QuantSpec, QuantSpecError


@dataclass(frozen=True)
class AWQOptions:
    grid_points: int = 20  # values of α in [0, 1] tried for s = mean|x|^α / mean|w|^(1-α)
    clip_search: bool = True  # then shrink each group's range where that lowers the layer's output error
    max_tokens: int = 16384  # calibration tokens the scale search runs the watched modules on
    # (at most one calibration batch: calibration.TOKENS_PER_BATCH)

    def __post_init__(self) -> None:
        if self.grid_points < 1:
            raise QuantSpecError(f"quant.grid_points={self.grid_points} must be at least 1")
        if self.max_tokens < 1:
            raise QuantSpecError(f"quant.max_tokens={self.max_tokens} must be positive")


def search_scale(x_mean: Tensor, weight: Tensor, spec: QuantSpec, grid_points: int,
                 output: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-input-channel scale s minimising ‖output(W) − output(Q(W·s)/s)‖² over the α grid, where
    `output(W)` is the watched module's output with the group's weights W (rows of its linears
    stacked). s = 1 (plain rounding) is a candidate too: the search never does worse than RTN here."""
    w = weight.float()
    x_mean, w_mean = x_mean.float(), w.abs().mean(0).clamp(min=1e-8)  # a dead channel stays finite
    reference = output(w).float()
    best_loss, best = None, torch.ones_like(x_mean)
    candidates = [None, *torch.linspace(0, 1, grid_points).tolist()] if grid_points > 1 else [None, 0.5]
    for alpha in candidates:
        if alpha is None:
            s = torch.ones_like(x_mean)
        else:
            s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # centred around 1: keeps the scaled weights in range
        w_q = grid.fake_quantize(w * s, spec.bits, spec.group_size, spec.sym) / s
        loss = (output(w_q).float() - reference).pow(2).mean()
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


class _Watched:
    """A float32 copy of the module a scale search watches, called on its captured float32 inputs
    with the group's linears given new weights: half-precision activations of this size overflow."""

    def __init__(self, block: nn.Module, group: ScaleGroup, args: tuple, kwargs: dict) -> None:
        self.module = copy.deepcopy(block.get_submodule(group.watch)).float()
        prefix = group.watch + "."
        self.linears = [self.module.get_submodule(n.removeprefix(prefix) if n != group.watch else "")
                        for n in group.linears]
        self.args, self.kwargs = args, kwargs

    def __call__(self, weight: Tensor) -> Tensor:
        for linear, rows in zip(self.linears, weight.split([m.out_features for m in self.linears]), strict=True):
            linear.weight.data = rows
        out = self.module(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _capture(block: nn.Module, groups: list[ScaleGroup], inputs: list[Tensor], kwargs: dict, max_tokens: int
             ) -> tuple[dict[str, Tensor], dict[str, tuple[tuple, dict]]]:
    """Per group, mean |x| of its input channels over all calibration tokens; per watched module, its
    inputs for the first samples of the first batch (about max_tokens tokens), in float32."""
    firsts = {g.linears[0]: block.get_submodule(g.linears[0]) for g in groups}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(firsts, 0)
    watched: dict[str, tuple[tuple, dict]] = {}
    batch, seqlen = inputs[0].shape[:2]
    keep = max(1, min(batch, max_tokens // seqlen))

    def first_samples(t: Tensor) -> Tensor:
        t = t[:keep] if t.dim() and t.shape[0] == batch else t
        return t.float() if t.is_floating_point() else t

    def on_linear_input(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + x.float().abs().sum(0)
        counts[name] += x.shape[0]

    def on_watched_input(name: str, args: tuple, kw: dict) -> None:
        if name not in watched:
            watched[name] = map_tensors((args, kw), first_samples)

    handles = [block.get_submodule(g.watch).register_forward_pre_hook(
        lambda _m, args, kw, name=g.watch: on_watched_input(name, args, kw), with_kwargs=True) for g in groups]
    try:
        with capture_inputs(firsts, on_linear_input):
            run_block(block, inputs, kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in firsts}, watched


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
        x_means, watched = _capture(block, groups, inputs, kwargs, opts.max_tokens)
        # Folding one group's scale changes no other group's inputs (q/k/v outputs are unchanged;
        # v's outputs shrink by exactly what o's inputs are scaled up by), so every search uses the
        # inputs captured once, before any folding. Each watched copy is made after the folds before it.
        for group in groups:
            weight = torch.cat([block.get_submodule(n).weight for n in group.linears])
            output = _Watched(block, group, *watched[group.watch])
            fold_scale(block, group, search_scale(x_means[group.linears[0]], weight, spec, opts.grid_points, output))
        del watched
        if with_gptq:
            gptq.quantize_block(block, inputs, kwargs, spec, opts)
        else:
            _round_block(block, inputs, kwargs, spec, opts.clip_search)
    return model


def _round_block(block: nn.Module, inputs: list[Tensor], kwargs: dict, spec: QuantSpec, clip_search: bool) -> None:
    """Round every linear of the scaled block, each range clipped for its own output error."""
    linears = target_linears(block)
    hessians = gptq.block_hessians(block, linears, inputs, kwargs) if clip_search else {}
    for name, linear in linears.items():
        hessian = hessians[name].H if clip_search else None
        set_module(block, name, round_linear(linear, spec, clip_search, hessian))
