"""Triton kernels that read QuantLinear's packed storage directly: any bit width, any group size
(ragged last group included), symmetric or asymmetric.

- `gemv`: batch-1 decode, y = x Wᵀ with W dequantized in registers: the weights are read once, in
  their packed size, which is what makes low-bit decoding faster than bf16 (it is memory-bound).
- `dequantize`: the dense weight in the activations' dtype, for a prefill's cuBLAS GEMM (compute-
  bound: the one extra pass over the weights costs little next to the matmul).

Storage (see `packing`): along a row, code k sits at bit k·bits of the little-endian byte stream.
GPTQ's act-order is stored un-permuted (static groups), so there is no permutation to apply here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _load_codes(q_ptr, rows, cols, mask, stride_q, packed_cols, BITS: tl.constexpr):
    """Codes (len(rows), len(cols)) as int32 from the packed byte rows."""
    bit = cols * BITS
    byte = bit // 8
    lo = tl.load(q_ptr + rows * stride_q + byte, mask=mask, other=0).to(tl.int32)
    if BITS == 8:
        return lo
    if 8 % BITS == 0:  # 2 and 4 bits: a code never spans two bytes
        return (lo >> (bit % 8)) & ((1 << BITS) - 1)
    hi = tl.load(q_ptr + rows * stride_q + byte + 1, mask=mask & (byte + 1 < packed_cols), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def _dequantize_tile(q_ptr, s_ptr, z_ptr, rows, cols, mask, stride_q, packed_cols, n_groups,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr):
    q = _load_codes(q_ptr, rows, cols, mask, stride_q, packed_cols, BITS).to(tl.float32)
    group = rows * n_groups + cols // GROUP
    scale = tl.load(s_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        zero = float(1 << (BITS - 1))
    else:
        zero = tl.load(z_ptr + group, mask=mask, other=0).to(tl.float32)
    return (q - zero) * scale


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, stride_q, packed_cols, n_groups,
                 K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        w = _dequantize_tile(q_ptr, s_ptr, z_ptr, rows[:, None], cols[None, :], mask, stride_q, packed_cols,
                             n_groups, BITS, GROUP, SYM)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_q, packed_cols, n_groups,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = _dequantize_tile(q_ptr, s_ptr, z_ptr, rows[:, None], cols[None, :], mask, stride_q, packed_cols, n_groups,
                         BITS, GROUP, SYM)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(n_rows: int) -> int:
    # Enough programs to fill the GPU (a few per SM) even for the narrow k/v projections.
    return 4 if n_rows <= 2048 else 8


def _format(layer) -> tuple[Tensor, Tensor, int, int]:
    zeros = layer.scales if layer.sym else layer.zeros  # unused when symmetric
    group = layer.in_features if layer.group_size == -1 else layer.group_size
    return zeros, layer.scales, group, layer.scales.shape[1]


def gemv(x: Tensor, layer) -> Tensor:
    """x (K,) -> (N,) through the packed weights, in x's dtype."""
    zeros, scales, group, n_groups = _format(layer)
    n, k = layer.out_features, layer.in_features
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    block_n = _rows_per_program(n)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x.contiguous(), layer.qweight, scales, zeros, out, n, layer.qweight.stride(0), layer.qweight.shape[1],
        n_groups, K=k, BITS=layer.bits, GROUP=group, SYM=layer.sym, BLOCK_N=block_n, BLOCK_K=256)
    return out


def dequantize(layer, dtype: torch.dtype) -> Tensor:
    """The dense (N, K) weight in `dtype`."""
    zeros, scales, group, n_groups = _format(layer)
    n, k = layer.out_features, layer.in_features
    out = torch.empty(n, k, device=layer.qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 128))
    _dequantize_kernel[grid](layer.qweight, scales, zeros, out, n, k, layer.qweight.stride(0), layer.qweight.shape[1],
                             n_groups, BITS=layer.bits, GROUP=group, SYM=layer.sym, BLOCK_N=32, BLOCK_K=128)
    return out
