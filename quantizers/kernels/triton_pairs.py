"""Batch-1 GEMV for 4-bit codes, two weights per instruction (bf16x2), for bf16 activations on sm_80+.

The plain word GEMV (`triton_lowbit`) spends ~5 instructions per weight (shift, mask, to-float, FMA)
and was measured bound by that work, not by memory. Here each int32 word of 8 codes is dequantized
two codes at a time, as bf16 pairs, by a magic number: OR-ing a code c < 128 into the mantissa of
bf16 128.0 (0x4300) gives exactly 128 + c, so one LOP3 per pair turns (c_i, c_i+4) — code i in the
low half-word, code i+4 in the high one, as `packing` stores them — into two bf16 numbers; a bf16x2
FMA subtracts 136 (the codes centred on 8) and another multiplies by (x_i, x_i+4) and accumulates.
About 2.3 instructions per weight. A word's two lanes (4 products each) are summed in float32; the
rest of the reduction, scales and zero points are float32 as in the word GEMV:
y = Σ_g s_g (Σ_{w in g} dot_w − (z_g − 8) Σx_g).

The products are rounded to bf16 (8-bit significand), as the reference rounds each dequantized weight
to bf16 before its matmul: measured relative error against exact float32 arithmetic 2.1e-3 here,
2.9e-3 for the reference (H100, Llama-3-8B layer shapes, random codes, an outlier channel in x).

Triton's CPU interpreter cannot run inline PTX: there `_dot_word` computes the same pairs exactly in
float32, so the tests check the data movement (pairs, halves, groups, masks) and the GPU check
(`python -m harness bench`) the PTX.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# $1: a word of 8 codes; $2..$5: x pairs (x_i, x_i+4) as bf16x2. Out: Σ (c − 8)·x as float32 bits.
_DOT_WORD_PTX = tl.constexpr("""{
.reg .b32 t, s, one, centre, zero, acc;
.reg .f32 a, b;
mov.b32 one, 0x3f803f80;
mov.b32 centre, 0xc308c308;
mov.b32 zero, 0;
lop3.b32 t, $1, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, centre;
fma.rn.bf16x2 acc, t, $2, zero;
shr.u32 s, $1, 4;
lop3.b32 t, s, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, centre;
fma.rn.bf16x2 acc, t, $3, acc;
shr.u32 s, $1, 8;
lop3.b32 t, s, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, centre;
fma.rn.bf16x2 acc, t, $4, acc;
shr.u32 s, $1, 12;
lop3.b32 t, s, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 t, t, one, centre;
fma.rn.bf16x2 acc, t, $5, acc;
shl.b32 t, acc, 16;
and.b32 s, acc, 0xffff0000;
mov.b32 a, t;
mov.b32 b, s;
add.f32 a, a, b;
mov.b32 $0, a;
}""")  # lop3 0xea: (a & b) | c


@triton.jit
def _halves(pair):
    """The two bf16 of a packed pair as float32 (a bf16 is the top half of a float32)."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _pair_dot(word, pair, SHIFT: tl.constexpr):
    lo_x, hi_x = _halves(pair)
    lo_code = ((word >> SHIFT) & 15) - 8
    hi_code = ((word >> (SHIFT + 16)) & 15) - 8
    return lo_code.to(tl.float32) * lo_x + hi_code.to(tl.float32) * hi_x


@triton.jit
def _dot_word(word, p0, p1, p2, p3, INTERPRET: tl.constexpr):
    """Σ (c − 8)·x over each word's 8 codes, as float32."""
    if INTERPRET:  # the same pairs, in exact float32 arithmetic
        return _pair_dot(word, p0, 0) + _pair_dot(word, p1, 4) + _pair_dot(word, p2, 8) + _pair_dot(word, p3, 12)
    return tl.inline_asm_elementwise(_DOT_WORD_PTX, "=r,r,r,r,r,r", [word, p0, p1, p2, p3], dtype=tl.int32,
                                     is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _x_pairs(x32_ptr, words, in_words):
    """Per word column, the pairs (x_i, x_i+4) for i = 0..3 as bf16x2, from one 16-byte load of x's 8 bf16
    (x viewed as int32: a0 = (x0, x1), a1 = (x2, x3), a2 = (x4, x5), a3 = (x6, x7))."""
    W: tl.constexpr = words.shape[0]
    xw = tl.load(x32_ptr + words[:, None] * 4 + tl.arange(0, 4)[None, :], mask=in_words[:, None], other=0)
    even, odd = tl.split(tl.reshape(xw, (W, 2, 2)))  # columns (0, 2) and (1, 3)
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    p0 = (a0 & 0xFFFF) | (a2 << 16)
    p1 = ((a0 >> 16) & 0xFFFF) | (a2 & -65536)
    p2 = (a1 & 0xFFFF) | (a3 << 16)
    p3 = ((a1 >> 16) & 0xFFFF) | (a3 & -65536)
    return p0, p1, p2, p3


@triton.jit
def _group_params(s_ptr, z_ptr, index, mask, SYM: tl.constexpr):
    scale = tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        return scale, tl.full(scale.shape, 8.0, tl.float32)
    return scale, tl.load(z_ptr + index, mask=mask, other=0).to(tl.float32)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n in (4, 8, 16, 32) for k in (512, 1024, 2048) for w in (4, 8)]


@triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "SYM"])
@triton.jit
def _gemv_kernel(x_ptr, x32_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, stride_q, n_groups, K: tl.constexpr,
                 GROUP: tl.constexpr, SYM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    W: tl.constexpr = BLOCK_K // 8  # words per tile
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = k0 // 8 + tl.arange(0, W)
        in_words = words < K // 8
        word = tl.load(q_ptr + rows[:, None] * stride_q + words[None, :], mask=in_rows[:, None] & in_words[None, :],
                       other=0)
        p0, p1, p2, p3 = _x_pairs(x32_ptr, words, in_words)
        dot = _dot_word(word, p0[None, :], p1[None, :], p2[None, :], p3[None, :], INTERPRET)
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        if GROUP >= BLOCK_K:  # the tile lies in one group
            scale, zero = _group_params(s_ptr, z_ptr, rows * n_groups + k0 // GROUP, in_rows, SYM)
            acc += scale * (tl.sum(dot, axis=1) - (zero - 8.0) * tl.sum(x, axis=0))
        else:
            PER_TILE: tl.constexpr = BLOCK_K // GROUP
            dot_g = tl.sum(tl.reshape(dot, (BLOCK_N, PER_TILE, GROUP // 8)), axis=2)
            x_g = tl.sum(tl.reshape(x, (PER_TILE, GROUP)), axis=1)
            groups = k0 // GROUP + tl.arange(0, PER_TILE)
            scale, zero = _group_params(s_ptr, z_ptr, rows[:, None] * n_groups + groups[None, :],
                                        in_rows[:, None] & (groups[None, :] < n_groups), SYM)
            acc += tl.sum(scale * (dot_g - (zero - 8.0) * x_g[None, :]), axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=in_rows)


def serves(x: Tensor, layer, group: int) -> bool:
    """4-bit rows of whole int32 words, groups a power of two of whole words (or one per row, given as a
    power of two past the width), bf16 activations, and a GPU with bf16x2 FMA (sm_80+)."""
    if layer.bits != 4 or layer.in_features % 8 or x.dtype != torch.bfloat16 or group < 8 or group & (group - 1):
        return False
    return INTERPRET or (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0))


def gemv(x: Tensor, layer, group: int) -> Tensor:
    """x (K,) bf16 -> (N,) bf16 through the packed 4-bit weights."""
    n, k = layer.out_features, layer.in_features
    x = x.contiguous()
    q = layer.qweight.view(torch.int32)
    zeros = layer.scales if layer.sym else layer.zeros  # unused when symmetric
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, x.view(torch.int32), q, layer.scales, zeros, out, n, q.stride(0), layer.scales.shape[1],
                       K=k, GROUP=group, SYM=layer.sym, INTERPRET=INTERPRET)
    return out
