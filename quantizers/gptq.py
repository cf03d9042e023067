"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import grid
from .arch import decoder_layers, set_module, target_linears
from .calibration import blocks_with_inputs, capture_inputs, run_block
from .linear import QuantLinear
from .registry import register
from .spec import QuantSpec, QuantSpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    percdamp: float = 0.01  # dampening, as a fraction of the mean of diag(H)
    block_size: int = 128  # columns updated lazily together
    act_order: bool = True  # columns in descending diag(H); groups stay static (contiguous in storage)
    mse_clip: bool = False  # per group, search the range shrink with least rounding error

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


def solve(W: Tensor, H: Tensor, spec: QuantSpec, opts: GPTQOptions) -> tuple[Tensor, grid.GridParams]:
    """GPTQ's codes and grid parameters for weight W (out, in) given its input Hessian H (in, in)."""
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
    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else torch.arange(columns)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_cholesky(H, opts.percdamp)

    order = perm.tolist()
    codes = torch.zeros_like(W, dtype=torch.uint8)
    scale = torch.zeros(W.shape[0], grid.n_groups(columns, spec.group_size), dtype=torch.float16, device=W.device)
    zero = torch.zeros_like(scale, dtype=torch.uint8)
    for i1 in range(0, columns, opts.block_size):
        i2 = min(i1 + opts.block_size, columns)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // size
            if static is None and col % size == 0:  # groups computed on the fly as their first column arrives
                upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :size]  # the group's columns, as updated so far
                p = find_params(upcoming, spec.bits, -1, spec.sym)
                scale[:, g], zero[:, g] = p.scale[:, 0], p.zero[:, 0]
            elif static is not None:
                scale[:, g], zero[:, g] = static.scale[:, g], static.zero[:, g]
            s, z = scale[:, g].float(), zero[:, g].float()
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, 2**spec.bits - 1)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (w - (q - z) * s) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * Hinv[i1 + i, i1 + i : i2][None]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return codes, grid.GridParams(scale=scale, zero=zero)


@register("gptq", needs_calibration=True)
@torch.no_grad()
def quantize_gptq(model: nn.Module, spec: QuantSpec, calib: Tensor | None, progress: bool = False) -> nn.Module:
    if calib is None:
        raise QuantSpecError("gptq needs calibration samples")
    opts = GPTQOptions(**spec.options)
    blocks = blocks_with_inputs(model, calib)
    for _, block, inputs, kwargs in tqdm(blocks, desc="gptq", disable=not progress, unit="block",
                                         total=len(decoder_layers(model))):
        linears = target_linears(block)
        hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in linears.items()}
        with capture_inputs(linears, lambda name, x, hessians=hessians: hessians[name].add_batch(x)):
            run_block(block, inputs, kwargs)
        for name, linear in linears.items():
            codes, params = solve(linear.weight, hessians[name].H, spec, opts)
            set_module(block, name, QuantLinear.from_codes(linear, codes, params, spec.group_size, spec.sym, spec.bits))
    return model
