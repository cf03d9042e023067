"""Dense packing of `bits`-bit codes into bytes.

Along each row, every run of 8 codes becomes `bits` bytes (8 × bits bits), so int4
takes two codes per byte, int3 eight codes per three bytes, and int8 is stored as is.
A row whose length is not a multiple of 8 is padded with zero codes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _word_dtype(bits: int) -> torch.dtype:
    # 8 codes of up to 4 bits fit in 32 bits (sums wrap modulo 2^32 without losing bits).
    return torch.int32 if bits <= 4 else torch.int64


def packed_columns(in_features: int, bits: int) -> int:
    if bits == 8:
        return in_features
    return -(-in_features // 8) * bits


def pack(q: Tensor, bits: int) -> Tensor:
    """uint8 codes (rows, n) -> uint8 (rows, packed_columns(n, bits))."""
    if bits == 8:
        return q.to(torch.uint8).contiguous()
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
    rows = packed.shape[0]
    dtype = _word_dtype(bits)
    byte_shifts = torch.arange(bits, dtype=dtype, device=packed.device) * 8
    words = (packed.reshape(rows, -1, bits).to(dtype) << byte_shifts).sum(dim=-1, dtype=dtype)
    code_shifts = torch.arange(8, dtype=dtype, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> code_shifts) & (2**bits - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
