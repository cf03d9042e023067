"""Batch-1 GEMV for 4- and 3-bit codes, two weights per instruction (bf16x2), bf16 activations, sm_80+.

The plain word GEMV (`triton_lowbit`) spends ~5 instructions per weight (shift, mask, to-float, FMA)
and was measured bound by that work, not by memory. Here codes are dequantized two at a time, as bf16
pairs, by a magic number: OR-ing a code c < 128 into the mantissa of bf16 128.0 (0x4300) gives exactly
128 + c, so one LOP3 turns two codes 16 bits apart in a 32-bit word into two bf16 numbers; a bf16x2 FMA
centres them (c − 8 at 4 bits, c − 4 at 3) and another multiplies by the matching pair of x and
accumulates: about 2.3 instructions per weight.
- 4 bits: an int32 word of 8 codes holds code i and i+4 16 bits apart, as `packing` stores them.
- 3 bits (`_dot_32_codes`): `packing` stores chunks of 32 codes as three int32 (in three planes of the row)
  whose halves hold codes 2j and 2j+1 (the last pair one bit per word), so that the x pairs are x's own
  adjacent bf16 and the three words loads of whole 16-byte vectors (faster than a bit-stream layout:
  docs/kernels.md).
A word's two lanes are summed in float32, and the rest is float32 as in the word GEMV:
y = Σ_g s_g (Σ_{w in g} dot_w − (z_g − centre) Σx_g).

The products are rounded to bf16 (8-bit significand), as the reference rounds each dequantized weight
to bf16 before its matmul: its error against exact float32 arithmetic is no larger than the reference's
(docs/kernels.md).

Not for 8 bits: splitting each byte into two nibble pairs (16·(128 + hi) − 2304 + (128 + lo) = c − 128)
ran no faster than the word GEMV, which at 8 bits is already bound by bandwidth (docs/kernels.md).

Triton's CPU interpreter cannot run inline PTX: there `_code_pair_dot` multiplies the same pairs exactly
in float32, so the tests check the data movement (pairs, halves, groups, masks) and the GPU check
(`python -m harness bench`) the PTX.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _ptx_pair(src: str, shift: int, x: str, first: bool, mask: str, acc: str = "acc") -> list[str]:
    """The code pair at bits (shift, shift + 16) of src: 128 + c by the bf16x2 magic number (lop3 0xea is
    (a & b) | c), minus 128 + centre, times the x pair, accumulated."""
    lines = [f"shr.u32 s, {src}, {shift};"] if shift else []
    return lines + [f"lop3.b32 t, {'s' if shift else src}, {mask}, 0x43004300, 0xea;",
                    "fma.rn.bf16x2 t, t, one, centre;", f"fma.rn.bf16x2 {acc}, t, {x}, {'zero' if first else acc};"]


def _ptx(centre: str, body: list[str], accs: tuple[str, ...] = ("acc",)) -> tl.constexpr:
    """An asm block: registers and constants, the body, and the lanes of the accumulators summed as float32
    into $0."""
    total = []
    for i, acc in enumerate(accs):
        total += [f"shl.b32 t, {acc}, 16;", f"and.b32 s, {acc}, 0xffff0000;", "mov.b32 a, t;", "mov.b32 b, s;",
                  "add.f32 f, a, b;" if i == 0 else "add.f32 f, f, a;\nadd.f32 f, f, b;"]
    return tl.constexpr("\n".join([
        "{", ".reg .b32 u, t, s, one, centre, zero, acc, acc2;", ".reg .f32 a, b, f;", "mov.b32 one, 0x3f803f80;",
        f"mov.b32 centre, {centre};", "mov.b32 zero, 0;", *body, *total, "mov.b32 $0, f;", "}"]))


# $1: a word of 8 4-bit codes; $2..$5: x pairs (x_i, x_i+4) as bf16x2. Out: Σ (c − 8)·x as float32 bits.
_DOT_WORD_PTX = _ptx("0xc308c308", [line for i in range(4) for line in _ptx_pair("$1", 4 * i, f"${2 + i}", i == 0,
                                                                                 "0x000f000f")])

# $1..$3: the three words of a chunk of 32 3-bit codes (see `packing`); $4..$19: x pairs (x_2j, x_2j+1).
# Pairs 0-9 go to acc, 10-15 to acc2 (fewer bf16 additions in a row). The last pair's bits, one per
# word, are gathered with three lop3. Out: Σ (c − 4)·x as float32 bits.
_DOT_CHUNK3_PTX = _ptx("0xc304c304", [
    *[line for j in range(15) for line in _ptx_pair(f"${1 + j // 5}", 3 * (j % 5), f"${4 + j}", j in (0, 10),
                                                     "0x00070007", "acc" if j < 10 else "acc2")],
    "shr.u32 s, $1, 15;", "lop3.b32 u, s, 0x00010001, 0x43004300, 0xea;",
    "shr.u32 s, $2, 14;", "lop3.b32 u, s, 0x00020002, u, 0xea;",
    "shr.u32 s, $3, 13;", "lop3.b32 t, s, 0x00040004, u, 0xea;",
    "fma.rn.bf16x2 t, t, one, centre;", "fma.rn.bf16x2 acc2, t, $19, acc2;"], ("acc", "acc2"))


@triton.jit
def _halves(pair):
    """The two bf16 of a packed pair as float32 (a bf16 is the top half of a float32)."""
    return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _code_pair_dot(a, b, pair, SHIFT: tl.constexpr, MASK: tl.constexpr, CENTRE: tl.constexpr):
    lo_x, hi_x = _halves(pair)
    return ((((a >> SHIFT) & MASK) - CENTRE).to(tl.float32) * lo_x
            + (((b >> SHIFT) & MASK) - CENTRE).to(tl.float32) * hi_x)


@triton.jit
def _dot_word(word, p0, p1, p2, p3, INTERPRET: tl.constexpr):
    """Σ (c − 8)·x over each word's 8 codes, as float32."""
    if INTERPRET:  # the same pairs, in exact float32 arithmetic
        high = word >> 16
        return (_code_pair_dot(word, high, p0, 0, 15, 8) + _code_pair_dot(word, high, p1, 4, 15, 8)
                + _code_pair_dot(word, high, p2, 8, 15, 8) + _code_pair_dot(word, high, p3, 12, 15, 8))
    return tl.inline_asm_elementwise(_DOT_WORD_PTX, "=r,r,r,r,r,r", [word, p0, p1, p2, p3], dtype=tl.int32,
                                     is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _pair(a, b, HIGH: tl.constexpr):
    """(x_a, x_b) as one bf16x2 from two int32 views of x (two bf16 each): their low or high halves."""
    if HIGH:
        return ((a >> 16) & 0xFFFF) | (b & -65536)
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def _x_quad(x32_ptr, index, mask):
    """x viewed as int32 (x_2m, x_2m+1) at index + 0..3, per column, from one 16-byte load each."""
    W: tl.constexpr = index.shape[0]
    xw = tl.load(x32_ptr + index[:, None] + tl.arange(0, 4)[None, :], mask=mask[:, None], other=0)
    even, odd = tl.split(tl.reshape(xw, (W, 2, 2)))  # columns (0, 2) and (1, 3)
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _x_pairs(x32_ptr, words, in_words):
    """Per word column, the pairs (x_i, x_i+4) for i = 0..3, from x's 8 bf16 (a0 = (x0, x1), a1 = (x2, x3),
    a2 = (x4, x5), a3 = (x6, x7))."""
    a0, a1, a2, a3 = _x_quad(x32_ptr, words * 4, in_words)
    return _pair(a0, a2, False), _pair(a0, a2, True), _pair(a1, a3, False), _pair(a1, a3, True)


@triton.jit
def _last_pair(w0, w1, w2, SHIFT: tl.constexpr):
    """Code 30 (SHIFT 15) or 31 (SHIFT 31) of a 3-bit chunk: one bit of each word."""
    return ((w0 >> SHIFT) & 1) | ((w1 >> (SHIFT - 1)) & 2) | ((w2 >> (SHIFT - 2)) & 4)


@triton.jit
def _dot_chunk3(w0, w1, w2, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
                INTERPRET: tl.constexpr):
    """Σ (c − 4)·x over each chunk's 32 codes, as float32."""
    if INTERPRET:  # the same pairs, in exact float32 arithmetic
        h0, h1, h2 = w0 >> 16, w1 >> 16, w2 >> 16
        return (_code_pair_dot(w0, h0, p0, 0, 7, 4) + _code_pair_dot(w0, h0, p1, 3, 7, 4)
                + _code_pair_dot(w0, h0, p2, 6, 7, 4) + _code_pair_dot(w0, h0, p3, 9, 7, 4)
                + _code_pair_dot(w0, h0, p4, 12, 7, 4) + _code_pair_dot(w1, h1, p5, 0, 7, 4)
                + _code_pair_dot(w1, h1, p6, 3, 7, 4) + _code_pair_dot(w1, h1, p7, 6, 7, 4)
                + _code_pair_dot(w1, h1, p8, 9, 7, 4) + _code_pair_dot(w1, h1, p9, 12, 7, 4)
                + _code_pair_dot(w2, h2, p10, 0, 7, 4) + _code_pair_dot(w2, h2, p11, 3, 7, 4)
                + _code_pair_dot(w2, h2, p12, 6, 7, 4) + _code_pair_dot(w2, h2, p13, 9, 7, 4)
                + _code_pair_dot(w2, h2, p14, 12, 7, 4)
                + _code_pair_dot(_last_pair(w0, w1, w2, 15), _last_pair(w0, w1, w2, 31), p15, 0, 7, 4))
    return tl.inline_asm_elementwise(_DOT_CHUNK3_PTX, "=r" + ",r" * 19,
                                     [w0, w1, w2, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14,
                                      p15], dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _dot_32_codes(q_ptr, x32_ptr, rows, chunks, mask, in_chunks, stride_q, PLANE: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """Σ (c − 4)·x per chunk of 32 3-bit codes: its three words lie PLANE int32 apart; its x pairs
    (x_2j, x_2j+1), j < 16, are 16 consecutive int32 of x, read in four 16-byte loads."""
    base = q_ptr + rows[:, None] * stride_q + chunks[None, :]
    w0 = tl.load(base, mask=mask, other=0)
    w1 = tl.load(base + PLANE, mask=mask, other=0)
    w2 = tl.load(base + 2 * PLANE, mask=mask, other=0)
    p0, p1, p2, p3 = _x_quad(x32_ptr, chunks * 16, in_chunks)
    p4, p5, p6, p7 = _x_quad(x32_ptr, chunks * 16 + 4, in_chunks)
    p8, p9, p10, p11 = _x_quad(x32_ptr, chunks * 16 + 8, in_chunks)
    p12, p13, p14, p15 = _x_quad(x32_ptr, chunks * 16 + 12, in_chunks)
    return _dot_chunk3(w0, w1, w2, p0[None, :], p1[None, :], p2[None, :], p3[None, :], p4[None, :], p5[None, :],
                       p6[None, :], p7[None, :], p8[None, :], p9[None, :], p10[None, :], p11[None, :], p12[None, :],
                       p13[None, :], p14[None, :], p15[None, :], INTERPRET)


@triton.jit
def _dot_chunks(q_ptr, x32_ptr, rows, chunks, mask, in_chunks, stride_q, K: tl.constexpr, BITS: tl.constexpr,
                INTERPRET: tl.constexpr):
    if BITS == 4:  # a chunk is one int32 word of 8 codes
        word = tl.load(q_ptr + rows[:, None] * stride_q + chunks[None, :], mask=mask, other=0)
        p0, p1, p2, p3 = _x_pairs(x32_ptr, chunks, in_chunks)
        return _dot_word(word, p0[None, :], p1[None, :], p2[None, :], p3[None, :], INTERPRET)
    return _dot_32_codes(q_ptr, x32_ptr, rows, chunks, mask, in_chunks, stride_q, K // 32, INTERPRET)


@triton.jit
def _group_params(s_ptr, z_ptr, index, mask, BITS: tl.constexpr, SYM: tl.constexpr):
    """Scales and zero points of the groups at `index` (a symmetric grid's zero is 2^(bits-1)); shared with
    `triton_lowbit`."""
    scale = tl.load(s_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        zero = tl.full(scale.shape, float(1 << (BITS - 1)), tl.float32)
    else:
        zero = tl.load(z_ptr + index, mask=mask, other=0).to(tl.float32)
    return scale, zero


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n in (4, 8, 16, 32) for k in (512, 1024, 2048, 4096) for w in (4, 8)]


# Triton 3.2+ keeps autotuning results in its cache (per kernel source, GPU, Triton version and key): a shape
# is tuned once per machine, not once per process.
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

CHUNK = {4: 8, 3: 32}  # codes per chunk: one int32 word at 4 bits, three at 3 bits


@triton.autotune(configs=_configs(), key=["N", "K", "BITS", "GROUP", "SYM"], **AUTOTUNE_CACHE)
@triton.jit
def _gemv_kernel(x_ptr, x32_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, stride_q, n_groups, K: tl.constexpr,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, INTERPRET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    CODES: tl.constexpr = 8 if BITS == 4 else 32  # per chunk
    MID: tl.constexpr = 8.0 if BITS == 4 else 4.0  # the centre the dot products are taken about
    C: tl.constexpr = BLOCK_K // CODES  # chunks per tile
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        chunks = k0 // CODES + tl.arange(0, C)
        in_chunks = chunks < K // CODES
        dot = _dot_chunks(q_ptr, x32_ptr, rows, chunks, in_rows[:, None] & in_chunks[None, :], in_chunks, stride_q,
                          K, BITS, INTERPRET)
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        if GROUP >= BLOCK_K:  # the tile lies in one group
            scale, zero = _group_params(s_ptr, z_ptr, rows * n_groups + k0 // GROUP, in_rows, BITS, SYM)
            acc += scale * (tl.sum(dot, axis=1) - (zero - MID) * tl.sum(x, axis=0))
        else:
            PER_TILE: tl.constexpr = BLOCK_K // GROUP
            dot_g = tl.sum(tl.reshape(dot, (BLOCK_N, PER_TILE, GROUP // CODES)), axis=2)
            x_g = tl.sum(tl.reshape(x, (PER_TILE, GROUP)), axis=1)
            groups = k0 // GROUP + tl.arange(0, PER_TILE)
            scale, zero = _group_params(s_ptr, z_ptr, rows[:, None] * n_groups + groups[None, :],
                                        in_rows[:, None] & (groups[None, :] < n_groups), BITS, SYM)
            acc += tl.sum(scale * (dot_g - (zero - MID) * x_g[None, :]), axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=in_rows)


def serves(x: Tensor, layer, group: int) -> bool:
    """4-bit rows of whole int32 words or 3-bit rows of whole 32-code chunks, groups a power of two of whole
    chunks (or one per row, given as a power of two past the width), bf16 activations, and a GPU with
    bf16x2 FMA (sm_80+)."""
    codes = CHUNK.get(layer.bits)
    if codes is None or layer.in_features % codes or x.dtype != torch.bfloat16:
        return False
    if group < codes or group & (group - 1):
        return False
    return INTERPRET or (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0))


def gemv(x: Tensor, layer, group: int) -> Tensor:
    """x (K,) bf16 -> (N,) bf16 through the packed weights."""
    n, k = layer.out_features, layer.in_features
    x = x.contiguous()
    q = layer.qweight.view(torch.int32)
    zeros = layer.scales if layer.sym else layer.zeros  # unused when symmetric
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, x.view(torch.int32), q, layer.scales, zeros, out, n, q.stride(0), layer.scales.shape[1],
                       K=k, BITS=layer.bits, GROUP=group, SYM=layer.sym, INTERPRET=INTERPRET)
    return out
