"""Triton kernels that read QuantLinear's packed storage directly: any bit width, any group size
(ragged last group included), symmetric or asymmetric.

- `gemv`: batch-1 decode, y = x Wᵀ with W dequantized in registers: the weights are read once, in
  their packed size, which is what makes low-bit decoding faster than bf16 (it is memory-bound).
  4- and 3-bit weights with bf16 activations go to `triton_pairs` (two weights per instruction).
- `dequantize`: the dense weight in the activations' dtype, for a prefill's cuBLAS GEMM (compute-
  bound: the one extra pass over the weights costs little next to the matmul).

Storage (see `packing`): along a row, code k sits at bit k·bits of the little-endian byte stream,
except at 3 bits (chunks of 32 codes in three int32 planes, read whole by `_chunk_codes3` and the pair GEMV).
GPTQ's act-order is stored un-permuted (static groups), so there is no permutation to apply here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_pairs
from .triton_pairs import AUTOTUNE_CACHE, _group_params


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


# The word kernels read whole words of codes instead of single codes, and the GEMV applies scales per
# group, not per weight: y = Σ_g s_g (q_g·x_g − z_g Σx_g). The dequantize kernel's words hold 8 codes
# (`bits` bytes: one int32 at 4 bits, two at 8, bytes at 2); the GEMV's, see _gemv_layout. 3 bits are
# stored in chunks of 32 codes for the pair GEMV (`triton_pairs`); elsewhere they take the code kernels.
WORD_BITS = (2, 4, 8)


@triton.jit
def _words(q_ptr, rows, words, mask, stride_q, BITS: tl.constexpr):
    """(lo, hi) int32 halves of each 8-code word; hi is used at 8 bits only."""
    if BITS == 4:  # q_ptr is an int32 view of the storage
        lo = tl.load(q_ptr + rows * stride_q + words, mask=mask, other=0)
        hi = lo
    elif BITS == 8:  # int32 view: two per word
        lo = tl.load(q_ptr + rows * stride_q + 2 * words, mask=mask, other=0)
        hi = tl.load(q_ptr + rows * stride_q + 2 * words + 1, mask=mask, other=0)
    else:  # bytes
        base = q_ptr + rows * stride_q + words * BITS
        lo = tl.load(base, mask=mask, other=0).to(tl.int32)
        for b in tl.static_range(1, BITS):
            lo = lo | (tl.load(base + b, mask=mask, other=0).to(tl.int32) << (8 * b))
        hi = lo
    return lo, hi


@triton.jit
def _gemv_load(q_ptr, rows, words, mask, stride_q, BITS: tl.constexpr, INTS: tl.constexpr):
    """One word per (row, word): an int32 of the storage (INTS = 1), or with INTS = 0 the BITS bytes
    of an 8-code word joined into one int32."""
    if INTS == 0:
        base = q_ptr + rows * stride_q + words * BITS
        word = tl.load(base, mask=mask, other=0).to(tl.int32)
        for b in tl.static_range(1, BITS):
            word = word | (tl.load(base + b, mask=mask, other=0).to(tl.int32) << (8 * b))
    else:
        word = tl.load(q_ptr + rows * stride_q + words, mask=mask, other=0)
    return word


@triton.jit
def _gemv_code(word, INDEX: tl.constexpr, BITS: tl.constexpr):
    """Code INDEX of each word (codes are little-endian bit fields)."""
    return (word >> (BITS * INDEX)) & ((1 << BITS) - 1)


@triton.jit
def _as_float(code):
    """Codes (< 2^23) to float32 exactly: OR-ed into the mantissa of 2^23, minus 2^23, in place of an
    int-to-float conversion per weight (a little faster at 8 bits: docs/kernels.md)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes(lo, hi, BITS: tl.constexpr):
    """(rows, words) int32 words -> (rows, words, 8) codes, in storage order."""
    index = tl.arange(0, 8)[None, None, :]
    if BITS == 8:
        word = tl.where(index < 4, lo[:, :, None], hi[:, :, None])
        codes = (word >> (8 * (index % 4))) & 255
    else:
        codes = (lo[:, :, None] >> (BITS * index)) & ((1 << BITS) - 1)
    return codes


def _gemv_configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: one config, no tuning runs
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256})]
    # Wide tiles put many loads in flight per program: decode is bound by memory latency and bandwidth
    # (what else was tried: docs/kernels.md).
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n in (2, 4, 8, 16) for k in (512, 1024, 2048) for w in (4, 8)]


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "BITS", "GROUP", "SYM", "CODES"], **AUTOTUNE_CACHE)
@triton.jit
def _gemv_words_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, stride_q, n_groups, K: tl.constexpr,
                       BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, CODES: tl.constexpr,
                       INTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    W: tl.constexpr = BLOCK_K // CODES  # words per tile
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = k0 // CODES + tl.arange(0, W)
        mask = in_rows[:, None] & (words[None, :] < (K + CODES - 1) // CODES)
        word = _gemv_load(q_ptr, rows[:, None], words[None, :], mask, stride_q, BITS, INTS)
        # One code of every word at a time (measured 2x faster here than a (rows, words, codes) tile).
        dot = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        x_sum = tl.zeros((W,), dtype=tl.float32)
        for i in tl.static_range(CODES):
            cols = words * CODES + i
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            dot += _as_float(_gemv_code(word, i, BITS)) * x[None, :]
            x_sum += x
        if GROUP >= BLOCK_K:  # the tile lies in one group
            scale, zero = _group_params(s_ptr, z_ptr, rows * n_groups + k0 // GROUP, in_rows, BITS, SYM)
            acc += scale * (tl.sum(dot, axis=1) - zero * tl.sum(x_sum, axis=0))
        else:
            PER_TILE: tl.constexpr = BLOCK_K // GROUP
            dot_g = tl.sum(tl.reshape(dot, (BLOCK_N, PER_TILE, GROUP // CODES)), axis=2)
            x_g = tl.sum(tl.reshape(x_sum, (PER_TILE, GROUP // CODES)), axis=1)
            groups = k0 // GROUP + tl.arange(0, PER_TILE)
            index = rows[:, None] * n_groups + groups[None, :]
            scale, zero = _group_params(s_ptr, z_ptr, index, in_rows[:, None] & (groups[None, :] < n_groups),
                                        BITS, SYM)
            acc += tl.sum(scale * (dot_g - zero * x_g[None, :]), axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def _dequantize_words_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_q, n_groups, BITS: tl.constexpr,
                             GROUP: tl.constexpr, SYM: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.program_id(1) * W + tl.arange(0, W)
    mask = (rows[:, None] < N) & (words[None, :] < (K + 7) // 8)
    lo, hi = _words(q_ptr, rows[:, None], words[None, :], mask, stride_q, BITS)
    scale, zero = _group_params(s_ptr, z_ptr, rows[:, None] * n_groups + (words[None, :] * 8) // GROUP, mask,
                                BITS, SYM)
    codes = _as_float(_codes(lo, hi, BITS))  # (BLOCK_N, W, 8)
    w = tl.reshape((codes - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, W * 8))
    cols = tl.program_id(1) * W * 8 + tl.arange(0, W * 8)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


@triton.jit
def _chunk_codes3(w0, w1, w2):
    """(rows, chunks) of a 3-bit chunk's three words (see `packing`) -> (rows, chunks, 32) codes: codes
    0-29 are 3-bit fields of one word, codes 30 and 31 one bit of each word (bits 15 and 31)."""
    r = tl.arange(0, 32)[None, None, :]
    pair = r // 2
    w0, w1, w2 = w0[:, :, None], w1[:, :, None], w2[:, :, None]
    word = tl.where(pair < 5, w0, tl.where(pair < 10, w1, w2))
    field = (word >> (3 * (pair % 5) + 16 * (r % 2))) & 7
    top = 15 + 16 * (r % 2)
    spread = ((w0 >> top) & 1) | (((w1 >> top) & 1) << 1) | (((w2 >> top) & 1) << 2)
    return tl.where(pair == 15, spread, field)


@triton.jit
def _dequantize_chunks3_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_q, plane, n_groups, GROUP: tl.constexpr,
                               SYM: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr):
    """3 bits: C chunks of 32 codes per program, their three words `plane` int32 apart."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunks = tl.program_id(1) * C + tl.arange(0, C)
    mask = (rows[:, None] < N) & (chunks[None, :] < plane)
    base = q_ptr + rows[:, None] * stride_q + chunks[None, :]
    codes = _chunk_codes3(tl.load(base, mask=mask, other=0), tl.load(base + plane, mask=mask, other=0),
                          tl.load(base + 2 * plane, mask=mask, other=0))
    cols = chunks[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]  # (1, C, 32)
    in_out = (rows[:, None, None] < N) & (cols < K)
    if GROUP % 32 == 0:  # a chunk lies in one group: one scale and zero per chunk, not per code
        group = (chunks[None, :, None] * 32) // GROUP
        scale, zero = _group_params(s_ptr, z_ptr, rows[:, None, None] * n_groups + group, mask[:, :, None], 3, SYM)
    else:
        scale, zero = _group_params(s_ptr, z_ptr, rows[:, None, None] * n_groups + cols // GROUP, in_out, 3, SYM)
    w = (_as_float(codes) - zero) * scale
    tl.store(out_ptr + rows[:, None, None] * K + cols, w.to(out_ptr.dtype.element_ty), mask=in_out)


def _dequantize3(layer, out: Tensor) -> Tensor:
    zeros, scales, group, n_groups = _format(layer)
    q = layer.qweight.view(torch.int32)
    n, plane = q.shape[0], q.shape[1] // 3
    grid = (triton.cdiv(n, 16), triton.cdiv(plane, 16))
    _dequantize_chunks3_kernel[grid](q, scales, zeros, out, n, layer.in_features, q.stride(0), plane, n_groups,
                                     GROUP=group, SYM=layer.sym, BLOCK_N=16, C=16)
    return out


def _word_path(layer) -> bool:
    """Whether the word kernels serve this format: whole words in storage, groups of whole words that
    tile evenly with the kernels' power-of-two blocks (or one group per row)."""
    group = layer.in_features if layer.group_size == -1 else layer.group_size
    one_group = layer.scales.shape[1] == 1
    if layer.bits not in WORD_BITS or (layer.bits == 8 and layer.in_features % 8):
        return False
    return one_group or (group >= 8 and group & (group - 1) == 0)


def _kernel_group(layer) -> int:
    """The group size the word and pair kernels are given: one group per row becomes a power of two past
    the width, so that every tile lies in group 0."""
    if layer.scales.shape[1] == 1:
        return triton.next_power_of_2(max(layer.in_features, 512))
    return layer.group_size


def _word_storage(layer) -> tuple[Tensor, int, int]:
    """The storage as the word kernels read it, its row stride, and the group size they are given."""
    q = layer.qweight.view(torch.int32) if layer.bits in (4, 8) else layer.qweight
    return q, q.stride(0), _kernel_group(layer)


def _gemv_layout(layer) -> tuple[Tensor, int, int, int]:
    """The storage as the GEMV reads it: (view, row stride, codes per word, 1 for int32 words or 0 for
    bytes). Whole int32 where the rows allow: 4 codes at 8 bits, 8 at 4, 16 at 2."""
    bits, k, group = layer.bits, layer.in_features, _kernel_group(layer)
    codes = {8: 4, 4: 8, 2: 16}.get(bits)
    if codes and k % codes == 0 and group >= codes:
        q = layer.qweight.view(torch.int32)
        return q, q.stride(0), codes, 1
    return layer.qweight, layer.qweight.stride(0), 8, 0


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
    kernel_group = _kernel_group(layer)
    if triton_pairs.serves(x, layer, kernel_group):  # 4- and 3-bit, bf16: two weights per instruction
        return triton_pairs.gemv(x, layer, kernel_group)
    if layer.bits == 3:  # other activations (or groups the pair kernel does not tile): through the dense weight
        return dequantize(layer, x.dtype) @ x
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    if _word_path(layer):
        group = kernel_group
        q, stride, codes, ints = _gemv_layout(layer)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_words_kernel[grid](x.contiguous(), q, scales, zeros, out, n, stride, n_groups, K=k, BITS=layer.bits,
                                 GROUP=group, SYM=layer.sym, CODES=codes, INTS=ints)
        return out
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
    if layer.bits == 3:
        return _dequantize3(layer, out)
    if _word_path(layer):
        q, stride, group = _word_storage(layer)
        grid = (triton.cdiv(n, 16), triton.cdiv(-(-k // 8), 64))
        _dequantize_words_kernel[grid](q, scales, zeros, out, n, k, stride, n_groups, BITS=layer.bits, GROUP=group,
                                       SYM=layer.sym, BLOCK_N=16, W=64)
        return out
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 128))
    _dequantize_kernel[grid](layer.qweight, scales, zeros, out, n, k, layer.qweight.stride(0), layer.qweight.shape[1],
                             n_groups, BITS=layer.bits, GROUP=group, SYM=layer.sym, BLOCK_N=32, BLOCK_K=128)
    return out
