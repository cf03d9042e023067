"""The decode attention kernel against torch's scaled_dot_product_attention (CPU: Triton's interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from harness.decode_attention import decode_attention, serves


@pytest.mark.parametrize("heads,kv_heads,length,visible,dim", [(8, 2, 70, 37, 16), (4, 4, 64, 64, 16),
                                                             (6, 3, 40, 1, 16), (4, 2, 50, 20, 24)])
def test_decode_attention_matches_sdpa(heads, kv_heads, length, visible, dim):
    gen = torch.Generator().manual_seed(heads * 100 + length)
    q = torch.randn(1, heads, 1, dim, generator=gen)
    keys, values = (torch.randn(1, kv_heads, length, dim, generator=gen) for _ in range(2))
    keys[:, :, visible:] = 1e4  # stale cache entries past the position must not count
    bias = torch.zeros(1, length).masked_fill(torch.arange(length)[None] >= visible, float("-inf"))
    assert serves(q, keys, values)
    got = decode_attention(q, keys, values, bias, 0.25)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(1, 1, -1), rtol=1e-5, atol=1e-5)
