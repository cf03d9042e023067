"""Attention of one new token over the static KV cache, as one small Triton kernel.

At batch 1 and one query, `F.scaled_dot_product_attention` picks cuDNN's flash kernel, which tiles 64
queries for one: measured on an H100 (8B-shaped model, cache of 200) 8.1 µs per layer, 10% of a 4-bit
decode step. Here one program per query head streams its key/value head once with an online softmax
(float32 statistics), reading the cache in place (grouped-query heads share it through L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale, stride_qh, stride_kh, stride_kl,
                             L: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr,
                             BLOCK_L: tl.constexpr):
    head = tl.program_id(0)
    dims = tl.arange(0, D_POW2)
    in_dims = dims < D
    q = tl.load(q_ptr + head * stride_qh + dims, mask=in_dims, other=0.0).to(tl.float32) * scale
    kv = head // GROUP
    m = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)  # running maximum, a scalar
    total = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
    acc = tl.zeros((D_POW2,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        inside = pos < L
        at = kv * stride_kh + pos[:, None] * stride_kl + dims[None, :]
        k = tl.load(k_ptr + at, mask=inside[:, None] & in_dims[None, :], other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + pos, mask=inside, other=float("-inf")).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) + bias
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing visible yet
        p = tl.exp(s - m_safe)
        rescale = tl.exp(m - m_safe)
        v = tl.load(v_ptr + at, mask=inside[:, None] & in_dims[None, :], other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        total = total * rescale + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + head * D + dims, (acc / total).to(out_ptr.dtype.element_ty), mask=in_dims)


def serves(q: Tensor, keys: Tensor, values: Tensor) -> bool:
    """One query, the cache contiguous."""
    return (q.shape[0] == 1 and q.shape[2] == 1 and q.stride(-1) == 1 and keys.is_contiguous()
            and values.is_contiguous() and q.shape[1] % keys.shape[1] == 0)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """q (1, H, 1, D), keys and values (1, H_kv, L, D), bias (1, L) additive -> (1, 1, H·D)."""
    _, heads, _, d = q.shape
    length = keys.shape[2]
    out = torch.empty(1, 1, heads * d, device=q.device, dtype=q.dtype)
    _decode_attention_kernel[(heads,)](q, keys, values, bias, out, scale, q.stride(1), keys.stride(1),
                                       keys.stride(2), L=length, GROUP=heads // keys.shape[1], D=d,
                                       D_POW2=triton.next_power_of_2(d), BLOCK_L=32)
    return out
