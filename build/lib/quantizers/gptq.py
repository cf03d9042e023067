"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import grid
from .arch import set_module, target_linears
from .calibration import calibrated_blocks, capture_inputs, run_block
from .linear import QuantLinear
from .registry import register
from .spec import QuantSpec, QuantSpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    percdamp: float = 0.01  # dampening, as a fraction of the mean of diag(H)
    block_size: int = 128  # columns updated lazily together
    act_order: bool = True  # columns in descending diag(H); groups stay static (contiguous in storage)
    mse_clip: bool = True  # per group, search the range shrink with least rounding error
    true_sequential: bool = True  # each linear's inputs come from the block's already-quantized linears

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise QuantSpecError(f"quant.percdamp={self.percdamp} must be in [0, 1)")
        if self.block_size < 1:
            raise QuantSpecError(f"quant.block_size={self.block_size} must be positive")


class Hessian:
    """Running H = 2/n · Σ x xᵀ over the calibration tokens, in float32."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add_batch(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.n / (self.n + x.shape[0])
        self.n += x.shape[0]
        x = x * (2 / self.n) ** 0.5
        self.H += x.T @ x


def _inverse_hessian_cholesky(H: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of H⁻¹, retrying with more dampening when H is not positive definite."""
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(6):
        damp = percdamp * 10**attempt if percdamp > 0 else 1e-6 * 10**attempt
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * torch.eye(len(H), device=H.device))
        if info == 0:
            if attempt:
                log.warning("GPTQ: Hessian not positive definite; solved with percdamp=%g", damp)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise RuntimeError("GPTQ: the Hessian stays singular even with heavy dampening")


def solve(W: Tensor, H: Tensor, spec: QuantSpec, opts: GPTQOptions, kernel: str = "auto"
          ) -> tuple[Tensor, grid.GridParams]:
    """GPTQ's codes and grid parameters for weight W (out, in) given its input Hessian H (in, in).

    `kernel` runs the column loop of each block: "torch" (one column at a time), "triton" (one
    launch per block; static groups only), or "auto" (triton on a GPU when act-order is on)."""
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the Hessian holds NaN or inf: the calibration activations overflowed")
    W, H = W.float().clone(), H.clone()
    columns = W.shape[1]
    size = grid.effective_group_size(columns, spec.group_size)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    find_params = grid.search_params if opts.mse_clip else grid.compute_params
    static = find_params(W, spec.bits, spec.group_size, spec.sym) if opts.act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else torch.arange(columns, device=H.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, opts.percdamp)
    d = torch.diagonal(Hinv)

    # Columns as rows (W transposed): each column read and updated is one contiguous row.
    Wt, group_of = W.T.contiguous(), perm // size
    codes_t = torch.empty_like(Wt)
    if static is not None:
        scale, zero = static.scale, static.zero
    else:
        scale = torch.zeros(W.shape[0], grid.n_groups(columns, spec.group_size), dtype=torch.float16, device=W.device)
        zero = torch.zeros_like(scale, dtype=torch.uint8)
    block_kernel = _block_kernel(kernel, W.device, static is not None)
    for i1 in range(0, columns, opts.block_size):
        i2 = min(i1 + opts.block_size, columns)
        W1, Err1 = Wt[i1:i2].clone(), torch.empty_like(Wt[i1:i2])
        if static is not None:  # every column's group parameters, gathered once per block
            S, Z = scale.float().T[group_of[i1:i2]], zero.float().T[group_of[i1:i2]]
        if block_kernel is not None:
            codes_t[i1:i2], Err1 = block_kernel(W1, S, Z, Hinv[i1:i2, i1:i2], 2**spec.bits - 1)
        else:
            for i in range(i2 - i1):
                if static is not None:
                    s, z = S[i], Z[i]
                elif (i1 + i) % size == 0:  # no act-order: a group's parameters when its first column arrives
                    upcoming = torch.cat([W1[i:], Wt[i2:]])[:size].T  # its columns, as updated so far
                    p = find_params(upcoming, spec.bits, -1, spec.sym)
                    g = (i1 + i) // size
                    scale[:, g], zero[:, g] = p.scale[:, 0], p.zero[:, 0]
                    s, z = p.scale[:, 0].float(), p.zero[:, 0].float()
                w, q, err = W1[i], codes_t[i1 + i], Err1[i]
                torch.div(w, s, out=q).round_().add_(z).clamp_(0, 2**spec.bits - 1)
                torch.addcmul(w, q - z, s, value=-1, out=err).div_(d[i1 + i])  # (w - ŵ) / [H⁻¹]_ii
                W1[i:].addr_(Hinv[i1 + i, i1 + i : i2], err, alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    codes = codes_t.T[:, torch.argsort(perm)].to(torch.uint8)  # back to the original column order
    return codes, grid.GridParams(scale=scale, zero=zero)


def _block_kernel(kernel: str, device: torch.device, static_groups: bool):
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel={kernel!r}: use auto, torch or triton")
    if kernel == "torch" or kernel == "auto" and (device.type != "cuda" or not static_groups):
        return None
    if not static_groups:
        raise ValueError("the triton block kernel needs static groups (act_order=true)")
    try:
        from .kernels.gptq_block import quantize_block  # imports triton
    except ImportError:
        if kernel == "triton":
            raise
        log.warning("GPTQ: triton is not installed; the column loop runs in torch (slower)")
        return None
    return quantize_block


@register("gptq", needs_calibration=True, options=GPTQOptions)
@torch.no_grad()
def quantize_gptq(model: nn.Module, spec: QuantSpec, calib: Tensor | None, progress: bool = False,
                  device: torch.device | None = None) -> nn.Module:
    opts = GPTQOptions(**spec.options)
    for block, inputs, kwargs in calibrated_blocks(model, calib, device, spec.method, progress):
        quantize_block(block, inputs, kwargs, spec, opts)
    return model


def quantize_block(block: nn.Module, inputs: list[Tensor], kwargs: dict, spec: QuantSpec, opts: GPTQOptions) -> None:
    """Replace every linear of one decoder block by its GPTQ-quantized QuantLinear."""
    linears = target_linears(block)
    stages = _sequential_stages(block, linears, inputs, kwargs) if opts.true_sequential else (
        _sharing_one_input(block_hessians(block, linears, inputs, kwargs)))
    for names, hessian in stages:
        # GPTQ treats rows independently: linears that read one input are solved as one matrix.
        weight = torch.cat([linears[n].weight for n in names])
        codes, params = solve(weight, hessian.H, spec, opts)
        row = 0
        for n in names:
            rows = slice(row, row + linears[n].out_features)
            part = grid.GridParams(scale=params.scale[rows], zero=params.zero[rows])
            set_module(block, n, QuantLinear.from_codes(linears[n], codes[rows], part, spec.group_size, spec.sym,
                                                        spec.bits))
            row = rows.stop


class _GroupComplete(Exception):
    pass


def block_hessians(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[Tensor], kwargs: dict,
                    first_group_only: bool = False) -> dict[str, Hessian]:
    """Each linear's input Hessian over the calibration samples; linears that read the very same
    tensor (q, k, v; gate, up) share one Hessian, accumulated once. With `first_group_only`, each
    forward stops as soon as the first group of linears has its input."""
    hessians: dict[str, Hessian] = {}
    last: dict[str, object] = {}

    def on_input(name: str, x: Tensor) -> None:
        if last.get("x") is x:
            hessians.setdefault(name, last["hessian"])
            return
        if first_group_only and last:
            raise _GroupComplete
        hessian = hessians.setdefault(name, Hessian(x.shape[-1], x.device))
        hessian.add_batch(x)
        last.update(x=x, hessian=hessian)

    with capture_inputs(linears, on_input):
        for batch in inputs:
            last.clear()
            try:
                run_block(block, [batch], kwargs)
            except _GroupComplete:
                pass
    return hessians


def _sharing_one_input(hessians: dict[str, Hessian]) -> list[tuple[list[str], Hessian]]:
    groups: dict[int, tuple[list[str], Hessian]] = {}
    for name, hessian in hessians.items():
        groups.setdefault(id(hessian), ([], hessian))[0].append(name)
    return list(groups.values())


def _sequential_stages(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[Tensor], kwargs: dict
                       ) -> Iterator[tuple[list[str], Hessian]]:
    """The reference implementation's true-sequential order: groups of linears in the order the block
    runs them, each group's Hessian captured after the caller has quantized the groups before it."""
    done: set[str] = set()
    while len(done) < len(linears):
        pending = {n: m for n, m in linears.items() if n not in done}
        names, hessian = _sharing_one_input(block_hessians(block, pending, inputs, kwargs, True))[0]
        yield names, hessian
        done.update(names)
