"""Dense packing of `bits`-bit codes into bytes.

Along each row, every run of 8 codes becomes `bits` bytes (8 × bits bits), so int4
takes two codes per byte and int8 is stored as is. A row whose length is not a multiple
of 8 is padded with zero codes.

3 bits are laid out for the GEMV (`kernels.triton_pairs`), which dequantizes two codes at
once from the two 16-bit halves of an int32: a row is padded to chunks of 32 codes and
stored as three planes of int32 (all chunks' word 0, then word 1, then word 2), 12 bytes
per chunk as in a plain bit stream. Codes 2j and 2j+1 (j < 15) sit at bits 3(j % 5) and
16 + 3(j % 5) of word j // 5; the last pair's three bits are bit 15 (code 30) and bit 31
(code 31) of words 0, 1, 2.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _word_dtype(bits: int) -> torch.dtype:
    # 8 codes of up to 4 bits fit in 32 bits (sums wrap modulo 2^32 without losing bits).
    return torch.int32 if bits <= 4 else torch.int64


CHUNK3 = 32  # codes per 3-bit chunk (three int32)


def packed_columns(in_features: int, bits: int) -> int:
    if bits == 8:
        return in_features
    if bits == 3:
        return -(-in_features // CHUNK3) * 12
    return -(-in_features // 8) * bits


@functools.cache
def _chunk3_bit_positions(device: torch.device) -> Tensor:
    """(32 · 3,): where bit b of code r of a 3-bit chunk lies among the chunk's 96 bits (32 × word + bit),
    made once per device (unpacking runs at every forward of the reference backend)."""
    pos = []
    for r in range(CHUNK3):
        j, half = divmod(r, 2)
        if j < 15:
            pos.append([32 * (j // 5) + 3 * (j % 5) + 16 * half + b for b in range(3)])
        else:  # the last pair: one bit in each word
            pos.append([32 * b + 15 + 16 * half for b in range(3)])
    return torch.tensor(pos, device=device).reshape(-1)


def _pack3(q: Tensor) -> Tensor:
    rows, n = q.shape
    codes = torch.nn.functional.pad(q, (0, (-n) % CHUNK3)).reshape(rows, -1, CHUNK3)
    chunks = codes.shape[1]
    bits = (codes[..., None] >> torch.arange(3, device=q.device, dtype=torch.uint8)) & 1  # (rows, chunks, 32, 3)
    stream = torch.zeros(rows, chunks, 96, dtype=torch.uint8, device=q.device)
    stream[..., _chunk3_bit_positions(q.device)] = bits.reshape(rows, chunks, 96)
    byte_bits = stream.reshape(rows, chunks, 3, 4, 8).permute(0, 2, 1, 3, 4)  # planes first, little-endian bytes
    shifts = torch.arange(8, device=q.device, dtype=torch.uint8)
    return (byte_bits << shifts).sum(-1, dtype=torch.uint8).reshape(rows, -1)


def _unpack3(packed: Tensor, n: int) -> Tensor:
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    byte_bits = (packed.reshape(rows, 3, -1, 4, 1) >> shifts) & 1  # (rows, planes, chunks, bytes, 8)
    stream = byte_bits.permute(0, 2, 1, 3, 4).reshape(rows, -1, 96)
    bits = stream[..., _chunk3_bit_positions(packed.device)].reshape(rows, -1, CHUNK3, 3)
    codes = (bits << torch.arange(3, device=packed.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return codes.reshape(rows, -1)[:, :n]


def pack(q: Tensor, bits: int) -> Tensor:
    """uint8 codes (rows, n) -> uint8 (rows, packed_columns(n, bits))."""
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if bits == 3:
        return _pack3(q.to(torch.uint8))
    rows, n = q.shape
    dtype = _word_dtype(bits)
    codes = torch.nn.functional.pad(q, (0, (-n) % 8)).reshape(rows, -1, 8).to(dtype)
    code_shifts = torch.arange(8, dtype=dtype, device=q.device) * bits
    words = (codes << code_shifts).sum(dim=-1, dtype=dtype)
    byte_shifts = torch.arange(bits, dtype=dtype, device=q.device) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(rows, -1)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: uint8 (rows, packed_columns(n, bits)) -> uint8 codes (rows, n)."""
    if bits == 8:
        return packed
    if bits == 3:
        return _unpack3(packed, n)
    rows = packed.shape[0]
    dtype = _word_dtype(bits)
    byte_shifts = torch.arange(bits, dtype=dtype, device=packed.device) * 8
    words = (packed.reshape(rows, -1, bits).to(dtype) << byte_shifts).sum(dim=-1, dtype=dtype)
    code_shifts = torch.arange(8, dtype=dtype, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> code_shifts) & (2**bits - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
