"""PyTorch's built-in int4 kernels (tinygemm on CUDA, its CPU counterpart), fed from our storage.

They take 4-bit codes in their own tiled layout and a (K/group, N, 2) table of scale and zero
with w = (q − 8)·scale + zero. Ours is w = (q − z)·s, so zero = (8 − z)·s: the asymmetric grid maps
exactly. The conversion is done once per layer (`prepare_*`) and kept beside our packed storage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layer_format import LayerFormat

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8  # K must be a multiple of INNER_K_TILES * 16 for the CUDA layout


def _format_why_not(layer: LayerFormat, k_multiple: int) -> str | None:
    if layer.bits != 4:
        return f"it serves 4-bit weights only, not {layer.bits}-bit"
    if layer.group_size not in GROUP_SIZES:
        return f"it needs a group size in {GROUP_SIZES}, not {layer.group_size}"
    if layer.in_features % layer.group_size or layer.in_features % k_multiple:
        return (f"the width {layer.in_features} must be a multiple of the group size and of {k_multiple} "
                "(no ragged groups)")
    if layer.out_features % 8:
        return f"the output width {layer.out_features} must be a multiple of 8"
    return None


def tinygemm_why_not(layer: LayerFormat, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "it runs on CUDA only (on the CPU: cpu_int4)"
    return _format_why_not(layer, INNER_K_TILES * 16)


def cpu_why_not(layer: LayerFormat, device: torch.device) -> str | None:
    if device.type != "cpu":
        return "it runs on the CPU only (on CUDA: tinygemm)"
    return _format_why_not(layer, 2)


def _scales_and_zeros(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    params = layer.grid_params()
    scale = params.scale.float()
    zero = (8 - params.zero.float()) * scale
    return torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous()


def prepare_tinygemm(layer: nn.Module) -> None:
    if getattr(layer, "_tinygemm", None) is None:
        codes = layer.codes()
        # aten's CUDA input layout: two codes per byte, the even column in the high nibble.
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, INNER_K_TILES)
        layer._tinygemm = packed, _scales_and_zeros(layer, torch.bfloat16)


# Above this many rows tinygemm is slower than dequantizing once and calling cuBLAS (docs/kernels.md).
MAX_TINYGEMM_ROWS = 16


def tinygemm_forward(x: Tensor, layer: nn.Module) -> Tensor:
    prepare_tinygemm(layer)
    packed, scales_and_zeros = layer._tinygemm
    # tinygemm computes in bf16 only
    return _forward(x, layer, MAX_TINYGEMM_ROWS, _dense_weight, lambda flat: torch.ops.aten._weight_int4pack_mm(
        flat.to(torch.bfloat16), packed, layer.group_size, scales_and_zeros).to(x.dtype))


def _forward(x: Tensor, layer: nn.Module, max_rows: int, dense_weight, int4_matmul) -> Tensor:
    """y = x Wᵀ + b through int4_matmul on (rows, K) inputs, or a dense matmul above max_rows rows."""
    flat = x.reshape(-1, layer.in_features)
    if flat.shape[0] > max_rows:
        return torch.nn.functional.linear(x, dense_weight(layer, x.dtype), layer.bias)
    y = int4_matmul(flat)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def _dense_weight(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    try:
        from .triton_lowbit import dequantize
    except ImportError:  # no triton: the reference's dequantization
        return layer.dequantize_weight(dtype)
    return dequantize(layer, dtype)


def prepare_cpu(layer: nn.Module) -> None:
    if getattr(layer, "_cpu_int4", None) is None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.codes().to(torch.int32), INNER_K_TILES)
        layer._cpu_int4 = packed, _scales_and_zeros(layer, torch.float32)


# The CPU kernel is for decoding: at many rows it is far slower than the reference (docs/kernels.md).
MAX_CPU_INT4_ROWS = 4


def cpu_forward(x: Tensor, layer: nn.Module) -> Tensor:
    prepare_cpu(layer)
    packed, scales_and_zeros = layer._cpu_int4
    return _forward(x, layer, MAX_CPU_INT4_ROWS, lambda m, dtype: m.dequantize_weight(dtype),
                    lambda flat: torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, layer.group_size,
                                                                              scales_and_zeros.to(x.dtype)))
