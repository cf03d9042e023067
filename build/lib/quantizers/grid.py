"""The uniform affine grid: w ≈ (q - z) · s per group of `group_size` input columns.

Codes q are unsigned integers in [0, 2^bits - 1]. A group size that does not divide the
input width leaves a ragged last group; the range of every group includes zero, so
padding the ragged group with zeros does not change its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Scales are stored in float16; keep them above its subnormal floor.
MIN_SCALE = 1e-6


@dataclass
class GridParams:
    scale: Tensor  # (out, n_groups) float16, as stored
    zero: Tensor  # (out, n_groups) uint8 code of the real value 0


def n_groups(in_features: int, group_size: int) -> int:
    size = in_features if group_size == -1 else group_size
    return -(-in_features // size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def to_groups(w: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, n_groups, group_size), zero-padding a ragged last group."""
    out_features, in_features = w.shape
    size = effective_group_size(in_features, group_size)
    pad = n_groups(in_features, group_size) * size - in_features
    return torch.nn.functional.pad(w, (0, pad)).reshape(out_features, -1, size)


def from_groups(wg: Tensor, in_features: int) -> Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def compute_params(w: Tensor, bits: int, group_size: int, sym: bool, clip: Tensor | float = 1.0) -> GridParams:
    """Min-max grid parameters per group; `clip` shrinks the range (per group or scalar)."""
    wg = to_groups(w.float(), group_size)
    maxq = 2**bits - 1
    wmin = wg.amin(dim=-1).clamp(max=0) * clip
    wmax = wg.amax(dim=-1).clamp(min=0) * clip
    if sym:
        scale = 2 * torch.maximum(-wmin, wmax) / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (wmax - wmin) / maxq
    scale = _to_float16_rounding_up(scale.clamp(min=MIN_SCALE))
    if not sym:
        zero = torch.round(-wmin / scale.float()).clamp(0, maxq)
    return GridParams(scale=scale, zero=zero.to(torch.uint8))


def search_params(w: Tensor, bits: int, group_size: int, sym: bool, steps: int = 20, max_shrink: float = 0.2,
                  norm: float = 2.4, hessian: Tensor | None = None) -> GridParams:
    """Grid parameters whose range is shrunk per group by the factor (1 down to 1 - max_shrink) that
    minimises the group's rounding error: clipping a few outliers buys finer steps. The error is
    sum |w - ŵ|^norm, or with the inputs' `hessian` (in, in) the group's output error eᵀ H_g e."""
    blocks = None if hessian is None else diagonal_blocks(hessian, group_size)
    best_err = best_clip = None
    for clip in torch.linspace(1.0, 1.0 - max_shrink, steps).tolist():
        params = compute_params(w, bits, group_size, sym, clip)
        e = to_groups(dequantize(quantize(w, params, bits, group_size), params, group_size) - w.float(), group_size)
        if blocks is None:
            err = (e.abs() ** norm).sum(dim=-1)
        else:  # per group g: e_g H_gg e_gᵀ, batched over groups
            e = e.transpose(0, 1)
            err = ((e @ blocks) * e).sum(dim=-1).T
        if best_err is None:
            best_err, best_clip = err, torch.full_like(err, clip)
        else:
            better = err < best_err
            best_err, best_clip = torch.where(better, err, best_err), torch.where(better, clip, best_clip)
    return compute_params(w, bits, group_size, sym, best_clip)


def diagonal_blocks(hessian: Tensor, group_size: int) -> Tensor:
    """(in, in) -> (n_groups, size, size): the blocks of one group's columns with themselves,
    zero-padded for a ragged last group as to_groups pads the weights."""
    in_features = hessian.shape[0]
    size, count = effective_group_size(in_features, group_size), n_groups(in_features, group_size)
    pad = count * size - in_features
    padded = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))
    return padded.reshape(count, size, count, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _to_float16_rounding_up(scale: Tensor) -> Tensor:
    # A stored scale below the true one would shrink the grid and clip the extremes by more than half a step.
    stored = scale.to(torch.float16)
    return torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, torch.inf)),
                       stored)


def quantize(w: Tensor, params: GridParams, bits: int, group_size: int) -> Tensor:
    """Integer codes (out, in) as uint8."""
    wg = to_groups(w.float(), group_size)
    scale = params.scale.float().unsqueeze(-1)
    zero = params.zero.float().unsqueeze(-1)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, 2**bits - 1)
    return from_groups(q, w.shape[1]).to(torch.uint8)


def dequantize(q: Tensor, params: GridParams, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """scale × (q − zero) in float32, rounded once to `dtype`: every backend's numbers (a bf16 product would
    round the float16 scale to bf16's 8 bits first)."""
    in_features = q.shape[1]
    qg = to_groups(q.float(), group_size)
    w = (qg - params.zero.float().unsqueeze(-1)) * params.scale.float().unsqueeze(-1)
    return from_groups(w, in_features).to(dtype)


def fake_quantize(w: Tensor, bits: int, group_size: int, sym: bool) -> Tensor:
    """Round to nearest on the min-max grid and back: what RTN's forward computes."""
    params = compute_params(w, bits, group_size, sym)
    return dequantize(quantize(w, params, bits, group_size), params, group_size, w.dtype)
